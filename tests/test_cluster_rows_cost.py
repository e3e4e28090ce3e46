"""``Config(cluster="auto")`` rows follow the cost model's step time, not speed alone
(:func:`whale.planner.annotated.cluster_rows.rows_by_cost`); pure logic, no processes.

The distributed equivalence of such rows (loss, gradients by name, parameters after AdamW) is
tests/test_cluster_auto.py's, whose measured rows are checked against these functions.
"""

from __future__ import annotations

import dataclasses

import pytest

from examples.gpt import GPT, GPTConfig, SyntheticCorpus
from whale.capture import capture
from whale.ir.devices import CPU_PROFILE
from whale.ir.plan import Plan
from whale.ir.topology import Cluster, Node
from whale.planner.annotated.cluster_rows import rows_by_cost, rows_on_cluster
from whale.planner.cost.model_profile import profile_model
from whale.planner.cost.plan_cost import candidate_of
from whale.planner.cost.predict import CostModel
from whale.planner.measure import slowed

_ROWS = 24


@pytest.fixture(scope="module")
def gpt_profile():
    cfg = GPTConfig(n_layer=2, n_embd=64, n_head=2, block_size=32, vocab_size=128)
    x, _ = SyntheticCorpus(cfg.vocab_size).batch(_ROWS, cfg.block_size, 0)
    return profile_model(capture(GPT(cfg), (x,)), _ROWS)


def _device(name: str, *, overhead: float, speed: float = 0.02, memory: int = 64 << 30):
    """A CPU at ``speed`` of its datasheet rates (a core, as cluster='auto' measures one) with
    ``overhead`` seconds per operation and an AdamW step of 20 us per tensor."""
    return dataclasses.replace(slowed(CPU_PROFILE, 1 / speed, name), op_overhead=overhead,
                               optimizer_step=(("adamw", 2e-5, 2e-9),), memory_bytes=memory)  # fmt: skip


def _dp(world: int = 2) -> Plan:
    return Plan(world_size=world, pipelines=tuple((r,) for r in range(world)), row_weights=(1.0,) * world,
                replica_groups=(tuple(range(world)),))  # fmt: skip


def _cluster(*devices) -> Cluster:
    return Cluster(nodes=(Node(name="n", devices=tuple(devices)),))


def _step(profile, cluster, plan, rows) -> float:
    plan = dataclasses.replace(plan, row_weights=tuple(float(r) for r in rows))
    return CostModel(profile, cluster).predict(candidate_of(plan, profile, _ROWS)).step_time


def test_a_rank_with_larger_fixed_costs_gets_fewer_rows_than_speed_gives(gpt_profile):
    # Same peak rate, so speed alone splits evenly; rank 1 pays 10x the cost per operation
    # (a slower host, a busier driver): it must take fewer rows.
    cluster = _cluster(_device("fast", overhead=2e-6), _device("fixed", overhead=2e-5))
    plan = _dp()
    assert rows_on_cluster(plan, cluster, example_rows=_ROWS).rows(_ROWS) == (12, 12)  # speed alone
    rows = rows_on_cluster(plan, cluster, example_rows=_ROWS, profile=gpt_profile).rows(_ROWS)
    assert 12 < rows[0] < _ROWS - 1 and sum(rows) == _ROWS, rows  # between even and all-but-one
    # The rows minimise the predicted step (brute force over every split as the oracle).
    best = min(_step(gpt_profile, cluster, plan, (r, _ROWS - r)) for r in range(1, _ROWS))
    assert _step(gpt_profile, cluster, plan, rows) == pytest.approx(best, rel=1e-9)
    assert _step(gpt_profile, cluster, plan, rows) < _step(gpt_profile, cluster, plan, (12, 12))


def test_a_device_slower_in_everything_gets_less_than_its_speed_share(gpt_profile):
    # Rank 1 is 2x slower in rates, per-operation and optimizer costs alike (what an emulated
    # 2x rank measures): the costs that do not shrink with rows are paid twice there too, so
    # rank 0 takes more than the 2/3 that speed gives (16 of 24).
    fast = _device("fast", overhead=5e-6)
    cluster = _cluster(fast, slowed(fast, 2.0, "slow2"))
    plan = _dp()
    assert rows_on_cluster(plan, cluster, example_rows=_ROWS).rows(_ROWS) == (16, 8)
    rows = rows_by_cost(plan, cluster, gpt_profile, _ROWS)
    assert 16 < rows[0] < _ROWS - 1, rows
    best = min(_step(gpt_profile, cluster, plan, (r, _ROWS - r)) for r in range(1, _ROWS))
    assert _step(gpt_profile, cluster, plan, rows) == pytest.approx(best, rel=1e-9)
    # Without fixed costs (none per operation, none per optimizer tensor or parameter), the
    # cost model's rows are the speed split.
    lean = dataclasses.replace(fast, op_overhead=0.0, optimizer_step=(("adamw", 0.0, 0.0),))
    lean_cluster = _cluster(lean, slowed(lean, 2.0, "slow2"))
    assert abs(rows_by_cost(plan, lean_cluster, gpt_profile, _ROWS)[0] - 16) <= 1


def test_replicas_of_one_device_class_share_alike_and_memory_still_caps(gpt_profile):
    fast, slow = _device("fast", overhead=5e-6), _device("slow", overhead=1e-5, speed=0.01)
    rows = rows_by_cost(_dp(4), _cluster(fast, slow, fast, slow), gpt_profile, _ROWS)
    assert rows[0] == rows[2] and rows[1] == rows[3] and rows[0] > rows[1] and sum(rows) == _ROWS, rows
    # A cap (what memory holds) bounds the fast replicas; the rest go to the slow ones.
    capped = rows_by_cost(_dp(4), _cluster(fast, slow, fast, slow), gpt_profile, _ROWS, capacity=[5, 100, 5, 100])
    assert capped[0] == capped[2] == 5 and capped[1] + capped[3] == 14, capped
    with pytest.raises(ValueError, match="no 24 rows fit"):
        rows_by_cost(_dp(2), _cluster(fast, slow), gpt_profile, _ROWS, capacity=[5, 5])


def test_pipeline_replicas_take_rows_by_their_schedules_predicted_time():
    # Two replicas of a 2-stage pipeline (1F1B, 2 micro-batches): replica 0 on two fast
    # devices, replica 1 with a slow second stage. Rows minimise the slowest replica's simulated
    # schedule (brute force as the oracle), so replica 1 takes fewer.
    from whale.planner.schedules.generate import make_schedule

    cfg = GPTConfig(n_layer=2, n_embd=64, n_head=2, block_size=32, vocab_size=128)
    x, _ = SyntheticCorpus(cfg.vocab_size).batch(_ROWS, cfg.block_size, 0)
    profile = profile_model(capture(GPT(cfg), (x,)), _ROWS, boundaries=["blocks.1"])
    fast = _device("fast", overhead=5e-6)
    cluster = _cluster(fast, fast, fast, slowed(fast, 2.0, "slow2"))
    plan = Plan(world_size=4, pipelines=((0, 2), (1, 3)), row_weights=(1.0, 1.0), replica_groups=((0, 1),),
                num_stages=2, schedule=make_schedule("1f1b", 2, 2), num_micro_batch=2,
                stage_boundaries=("blocks.1",))  # fmt: skip
    rows = rows_on_cluster(plan, cluster, example_rows=_ROWS, profile=profile).rows(_ROWS)
    assert rows[0] > rows[1] >= 2 and sum(rows) == _ROWS, rows
    costs = CostModel(profile, cluster)

    def step(r0: int) -> float:
        trial = dataclasses.replace(plan, row_weights=(float(r0), float(_ROWS - r0)))
        return costs.predict(candidate_of(trial, profile, _ROWS)).step_time

    assert step(rows[0]) == pytest.approx(min(step(r) for r in range(2, _ROWS - 1)), rel=1e-9)
