"""``Config(adaptive_rows=True)``: rows follow the replicas' measured speeds, results do not change.

The balancing logic is tested without processes (a simulated cluster whose replicas take
``overhead + rows * cost`` seconds); two gloo ranks, rank 1 emulated 8x slower (a margin over
the scatter of millisecond steps on a loaded host, which raises the gain a move must show)
(``WHALE_EMULATE_SLOWDOWN``), check that rows move toward rank 0, that every rank runs the
same rows at every step, and that every step equals the local model.

Tolerances (fp32): the loss and gradients as tests/equivalence.py (rtol 1e-6; atol 1e-6, rtol
1e-4: only the order of additions differs, rows weighting each replica's gradient). Parameters
after each AdamW step (from the reference's weights, the program's own optimizer state): entries
with an ordinary gradient that step (|g| > 1e-5) to 2e-6, since Adam's update then moves by
~lr * 1e-8 * |dg| / |g|**2; every entry to 5% of lr after the first step (Adam's first update
of an entry whose gradient is round-off moves it by O(lr), tests/equivalence.py). Later steps'
near-zero entries carry the round-off in their optimizer state and are compared through the
gradients only. Buffers of the state dict (constant here) must match, rtol 1e-5.

``sync_batch_norm`` is refused with ``adaptive_rows``: its all-reduces inside forward and
backward make the fast replica wait for the slow one, so their compute times look alike.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch.testing import assert_close

import whale as wh
from tests.equivalence import LR
from whale.ir.plan import Plan
from whale.runtime.adaptive import RowBalancer, check_adaptive_plan, rows_for_speeds

CASES = "tests.adaptive_cases"


# ---- the balancing logic, without processes ---------------------------------------------------


def test_rows_for_speeds_proportional_with_a_minimum():
    assert rows_for_speeds(12, [2.0, 1.0]) == (8, 4)
    assert rows_for_speeds(12, [1.0, 1.0, 1.0]) == (4, 4, 4)
    assert rows_for_speeds(12, [20.0, 1.0], minimum=3) == (9, 3)
    assert rows_for_speeds(10, [1.0, 1.0, 100.0], minimum=2) == (2, 2, 6)
    with pytest.raises(ValueError, match="at least 6 rows"):
        rows_for_speeds(5, [1.0, 1.0], minimum=3)
    with pytest.raises(ValueError, match="speeds must be finite numbers > 0"):
        rows_for_speeds(8, [1.0, 0.0])


def _simulate(costs_of_step, *, total=48, steps=40, every=2, window=5, threshold=0.05, noise=0.0,
              overhead=0.0, seed=0):
    """Run the balancer as the program does (observe every step after the first, decide every
    ``every`` steps); per step the rows and the step's time (the slowest replica's)."""
    rng = random.Random(seed)
    n = len(costs_of_step(0))
    balancer = RowBalancer(n, window=window, threshold=threshold, minimum=1)
    rows, history, pending = (total // n,) * n, [], 0
    for step in range(steps):
        costs = costs_of_step(step)
        seconds = [(overhead + r * c) * (1 + rng.uniform(-noise, noise)) for r, c in zip(rows, costs)]
        history.append((rows, max(seconds)))
        if step == 0:
            continue
        balancer.observe(seconds, rows)
        pending += 1
        if pending == every:
            pending = 0
            rows = balancer.propose(rows) or rows
    return history, balancer


def test_moves_rows_toward_the_faster_replica():
    history, balancer = _simulate(lambda s: (1.0, 2.0))
    assert history[-1][0] == (32, 16)
    assert len(balancer.moves) == 1, balancer.moves  # one move reaches balance; none after


def test_recovers_from_a_mid_run_slowdown_within_a_few_steps():
    # Replica 1 runs 2x slower from step 10; with a fixed overhead per step the per-row cost
    # misleads at first, so more than one move may be needed.
    slow_from = 10

    def costs(step):
        return (1.0, 2.0 if step >= slow_from else 1.0)

    history, _ = _simulate(costs, steps=40, overhead=4.0, noise=0.03)
    balanced = min(max(4.0 + r * c for r, c in zip((r0, 48 - r0), (1.0, 2.0))) for r0 in range(1, 48))
    within = next(s for s in range(slow_from, 40) if history[s][1] <= 1.1 * balanced)
    assert within - slow_from <= 8, [h for h in history[slow_from:]]
    assert all(t <= 1.15 * balanced for _, t in history[within:]), history[within:]


def test_noise_near_balance_moves_nothing():
    # Equal replicas, +-4% noise per step: the predicted gain never clears 5%.
    history, balancer = _simulate(lambda s: (1.0, 1.0), noise=0.04, steps=60, seed=3)
    assert balancer.moves == [] and history[-1][0] == (24, 24)


def test_a_noisy_host_asks_for_a_clearer_gain():
    # Equal replicas, +-30% noise per step: the threshold grows with the scatter of the window
    # (RowBalancer.noise), so rows rarely move; a fixed 5% alone moves them ~10 times here.
    for seed in range(5):
        _, balancer = _simulate(lambda s: (1.0, 1.0), noise=0.3, steps=60, seed=seed)
        assert len(balancer.moves) <= 3, (seed, balancer.moves)
    # A real 2x slowdown under +-20% noise is still followed within a few steps.
    history, _ = _simulate(lambda s: (1.0, 2.0 if s >= 10 else 1.0), noise=0.2, steps=40, overhead=4.0)
    assert any(rows[0] >= 30 for rows, _ in history[10:20]), history[10:20]


def test_one_slow_step_moves_nothing():
    # A neighbour stretches replica 0 once (step 5, 3x): the median of the window ignores it.
    _, balancer = _simulate(lambda s: (3.0 if s == 5 else 1.0, 1.0), steps=20)
    assert balancer.moves == []


def test_threshold_zero_still_stops_at_the_proportional_split():
    history, balancer = _simulate(lambda s: (1.0, 3.0), threshold=0.0, steps=30)
    assert history[-1][0] == (36, 12) and len(balancer.moves) == 1


def test_replicas_of_several_ranks_go_at_their_slowest_ranks_pace(monkeypatch):
    # Two tensor-parallel replicas of two ranks each ((0, 2) and (1, 3)), seen from rank 0: the
    # exchange sums every rank's notes; replica 1 is slow through its rank 3 alone.
    import torch.distributed as dist

    from whale.runtime.adaptive import AdaptiveRows

    plan = Plan(world_size=4, pipelines=((0, 2), (1, 3)), row_weights=(1.0, 1.0), replica_groups=((0, 1),),
                tensor_parallel=2)
    seconds = {0: 1.0, 1: 1.0, 2: 1.0, 3: 3.0}

    def all_reduce(notes, *args, **kwargs):
        for r, t in seconds.items():
            if r != 0:
                notes[r] = torch.tensor([[t, 12.0]] * notes.shape[1], dtype=notes.dtype)

    monkeypatch.setattr(dist, "get_world_size", lambda *a: 4)
    monkeypatch.setattr(dist, "get_rank", lambda *a: 0)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    rebalancer = AdaptiveRows(plan, wh.Config(adaptive_rows=True, adaptive_every=2, adaptive_window=2))
    for _ in range(3):  # the first step is not timed
        rebalancer.record(seconds[0], 12)
    new = rebalancer.after_step(plan, torch.device("cpu"))
    assert new.rows(24) == (18, 6) and new.pinned_rows is None
    assert rebalancer.moves == [(2, (12, 12), (18, 6), pytest.approx(0.5))]
    assert rebalancer.after_step(new, torch.device("cpu")) is new  # no notes yet: no exchange


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"adaptive_every": 0}, r"Config\(adaptive_every=0\) must be an int >= 1"),
        ({"adaptive_every": 2.5}, r"Config\(adaptive_every=2.5\) must be an int >= 1"),
        ({"adaptive_every": True}, r"Config\(adaptive_every=True\) must be an int >= 1"),
        ({"adaptive_window": -1}, r"Config\(adaptive_window=-1\) must be an int >= 1"),
        ({"adaptive_threshold": 1.5}, r"Config\(adaptive_threshold=1.5\) must be a number in \[0, 1\)"),
        ({"adaptive_threshold": -0.1}, r"must be a number in \[0, 1\)"),
        ({"adaptive_threshold": "5%"}, r"must be a number in \[0, 1\)"),
        ({"adaptive_rows": True, "stage_boundaries": ["blocks.1"]}, r"not pipeline stages"),
        ({"adaptive_rows": True, "sync_batch_norm": True}, r"wait for the slowest inside forward"),
    ],
)
def test_bad_config_is_refused_with_the_field_and_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        wh.Config(**kwargs)


def test_adaptive_rows_must_be_a_bool():
    with pytest.raises(TypeError, match=r"Config\(adaptive_rows=...\) is a bool, got 'yes'"):
        wh.Config(adaptive_rows="yes")
    assert wh.Config.from_dict({"adaptive_rows": True, "adaptive_every": 4}).adaptive_every == 4


def test_pipeline_plans_are_refused():
    from whale.planner.schedules.generate import make_schedule

    plan = Plan(world_size=2, pipelines=((0, 1),), row_weights=(1.0,), replica_groups=((0,),),
                num_micro_batch=2, num_stages=2, schedule=make_schedule("1f1b", 2, 2))
    with pytest.raises(ValueError, match="adaptive_rows=True.*this plan has 2 stages"):
        check_adaptive_plan(plan, wh.Config(adaptive_rows=True, num_micro_batch=2))
    check_adaptive_plan(plan, wh.Config())  # off: nothing to check
    dp = Plan(world_size=4, pipelines=((0, 2), (1, 3)), row_weights=(1.0, 1.0), replica_groups=((0, 1),),
              tensor_parallel=2)
    with pytest.raises(ValueError, match="only on micro-batches of 8 rows"):
        check_adaptive_plan(dp, wh.Config(adaptive_rows=True), fixed_rows=8)


def test_pipeline_refused_on_every_rank(world2):
    messages = world2.run(f"{CASES}:pipeline_refused")
    assert all("this plan has 2 stages" in m for m in messages), messages


# ---- two ranks, rank 1 emulated 8x slower -----------------------------------------------------


def _assert_steps_equal(out: dict) -> None:
    ref = out["ref"]
    names = sorted(ref["grads"][0])
    assert_close(torch.tensor(out["loss"]), torch.tensor(ref["loss"]), rtol=1e-6, atol=0)
    for step, (grads, want) in enumerate(zip(out["grads"], ref["grads"])):
        for name in names:
            assert_close(grads[name], want[name], rtol=1e-4, atol=1e-6, msg=f"step {step} grad {name}")
    for step, (state, want) in enumerate(zip(out["states"], ref["states"])):
        for key, value in want.items():
            got = state[key]
            if key in ref["grads"][step]:
                ordinary = ref["grads"][step][key].abs() > 1e-5
                assert_close(got[ordinary], value[ordinary], rtol=0, atol=2e-6, msg=f"step {step} param {key}")
                if step == 0:
                    assert_close(got, value, rtol=0, atol=5 * LR / 100, msg=f"step 0 param {key}")
            elif value.is_floating_point():
                assert_close(got, value, rtol=1e-5, atol=1e-7, msg=f"step {step} buffer {key}")
            else:
                assert torch.equal(got, value), f"step {step} buffer {key}"


def _check(outs: list[dict], total: int) -> None:
    assert outs[0]["rows"] == outs[1]["rows"], "the ranks ran different rows"
    assert outs[0]["moves"] == outs[1]["moves"]
    rows = outs[0]["rows"]
    assert rows[0] == (total // 2, total // 2), rows
    assert rows[-1][0] >= 0.6 * total, (rows, outs[0]["estimate"])  # toward rank 0 (8x faster: 8/9 balanced)
    assert outs[0]["moves"], "no move"
    for out in outs:
        _assert_steps_equal(out)


def test_gpt_micro_batches_move_toward_the_fast_rank_and_equal_the_local_model(world2):
    # The default adaptive_every=2: decisions after steps 4, 6 and 8 (the window of 3 is full).
    outs = world2.run(f"{CASES}:equivalence", "gpt", rows=16, steps=10, num_micro_batch=2,
                      adaptive_window=3)
    _check(outs, 16)
    assert min(min(r) for r in outs[0]["rows"]) >= 2  # one row per micro-batch at least


def test_transformers_gpt2_local_batches_follow_the_rows(world2):
    pytest.importorskip("transformers")
    outs = world2.run(f"{CASES}:equivalence", "gpt2", rows=12, steps=8, batch="local", adaptive_window=3,
                      adaptive_every=1)
    _check(outs, 12)


