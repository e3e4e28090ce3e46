"""Ranks that disagree fail loudly, on every rank, naming the difference (issue 16, item 4).

Setups (Config fields) are compared when the program binds; batches (shapes and a checksum of
values) at every step. Multi-process cases share the session's gloo pool (tests/world.py).
"""

from __future__ import annotations

import pytest
import torch

from whale.runtime.guard.batch_check import (
    BatchCheck,
    digest_digits,
    digits_agree,
    labelled,
    value_checksum,
)

CASES = "tests.guard_cases"


@pytest.mark.parametrize(
    "field, mine, theirs, shown",
    [
        ("grad_comm_dtype", None, "bfloat16", "Config.grad_comm_dtype differs: None on rank 0, torch.bfloat16 on rank 1"),
        ("bucket_cap_mb", 25.0, 0.001, "Config.bucket_cap_mb differs: 25.0 on rank 0, 0.001 on rank 1"),
        ("num_micro_batch", 1, 2, "Config.num_micro_batch differs: 1 on rank 0, 2 on rank 1"),
    ],
)
def test_a_config_differing_between_ranks_is_named_on_every_rank(world2, field, mine, theirs, shown):
    outs = world2.run(f"{CASES}:config_differs", field, mine, theirs)
    for out in outs:
        assert shown in out["error"], out["error"]
        assert "the plan differs" not in out["error"]  # the cause, not its consequence
        assert out["left"] == []


def test_differing_buckets_in_shared_memory_are_named_and_leave_nothing(world2):
    for out in world2.run(f"{CASES}:buckets_differ_in_shared_memory"):
        assert "rank 0: 2 of 2,000 elements; rank 1: 3 of 3,000 elements" in out["error"], out["error"]
        assert out["left"] == []


@pytest.mark.parametrize(
    "how, later, needle",
    [
        ("values", False, "input 0: values differ, same shape int64[8, 16] (ranks [0] vs [1])"),
        ("values", True, "the ranks' inputs differ in this step"),
        ("rows", False, "target: values differ"),
        ("one_value", True, "input 0: values differ"),
    ],
)
def test_same_shapes_other_values_raise_on_every_rank(world2, how, later, needle):
    outs = world2.run(f"{CASES}:dp_batch_values_differ", how, later)
    assert all(needle in o["error"] for o in outs), outs[0]["error"]
    assert outs[0]["loss"] == outs[1]["loss"]  # and the next agreeing step trains on


def test_pipeline_ranks_with_other_values_raise_and_recover(world2):
    outs = world2.run(f"{CASES}:pp_batch_values_differ", "values")
    assert all("input 0: values differ" in o["error"] for o in outs), outs[0]["error"]
    assert outs[0]["loss"] == outs[1]["loss"]


def test_local_rows_within_one_pipeline_must_agree(world2):
    # Two stages form one replica: both ranks must pass the replica's rows, alike.
    outs = world2.run(f"{CASES}:pp_batch_values_differ", "values", "local")
    assert all("input 0: values differ" in o["error"] and "batch='local'" in o["error"] for o in outs)


@pytest.mark.parametrize("default_local", [True, False])
def test_local_batches_are_each_ranks_own_rows(world2, default_local):
    for out in world2.run(f"{CASES}:local_batches", default_local):
        assert out["loss"][0] == pytest.approx(out["loss"][1], rel=1e-6)
        assert out["grads_close"]


def test_the_value_check_can_be_turned_off(world2):
    outs = world2.run(f"{CASES}:values_unchecked")
    assert outs[0]["loss"] == outs[1]["loss"]


def test_checksum_sees_values_positions_and_every_bit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=g)
    base = int(value_checksum(x))
    assert int(value_checksum(x.clone())) == base
    assert int(value_checksum(x.flip(0))) != base  # rows in another order
    y = x.clone()
    y.view(torch.int32)[3, 5] ^= 1 << 30  # one high bit of one value
    assert int(value_checksum(y)) != base
    assert int(value_checksum(x.t())) != base  # a non-contiguous view hashes its values in order
    for t in (torch.arange(10), torch.ones(3, dtype=torch.bool), torch.zeros(4, dtype=torch.bfloat16),
              torch.zeros(2, dtype=torch.complex64), torch.empty(0, 3)):  # fmt: skip
        value_checksum(t)  # every dtype and the empty tensor


def test_digest_digits_agree_exactly_when_digests_do():
    def check(x):
        return BatchCheck(labelled((x,), {}, None), 0, local=False, values=True, device=torch.device("cpu"))

    a, b = check(torch.arange(16)), check(torch.arange(16) + 1)
    same = (digest_digits(a.world_digest) * 3).tolist()
    assert digits_agree(same, 3)
    mixed = (digest_digits(a.world_digest) * 2 + digest_digits(b.world_digest)).tolist()
    assert not digits_agree(mixed, 3)


@pytest.mark.parametrize("config", [{}, {"stage_boundaries": ["bert.encoder.layer.1"]}])
def test_a_transformers_keyword_input_that_differs_is_named(world2, config):
    outs = world2.run(f"{CASES}:hf_mask_differs", "bert", **config)
    needle = "input 'attention_mask': values differ"
    assert all(needle in o["error"] and "input_ids" not in o["error"] for o in outs), outs[0]["error"]
    assert outs[0]["loss"] == outs[1]["loss"]


def test_a_plan_differing_alone_says_where_plans_come_from():
    from whale.runtime.guard.setup_check import _differences

    ranks = [[("Config.num_micro_batch", 1, "1"), ("the plan", p, f"digest {p}")] for p in (5, 5, 6)]
    (problem,) = _differences(ranks)
    assert problem.startswith("the plan differs: digest 5 on ranks 0, 1, digest 6 on rank 2")
    assert "Config(cluster=...)" in problem
    ranks[2][0] = ("Config.num_micro_batch", 2, "2")  # the cause is named, not its consequence
    assert _differences(ranks) == ["Config.num_micro_batch differs: 1 on ranks 0, 1, 2 on rank 2"]


@pytest.mark.parametrize("kwargs", [{"timeout": 0}, {"timeout": -5}, {"step_timeout": 0}, {"step_timeout": True}, {"timeout": "60"}])
def test_init_refuses_bad_timeouts_before_joining(kwargs):
    import whale as wh

    with pytest.raises(ValueError, match=r"wh.init\((timeout|step_timeout)=.*must be a number of seconds > 0"):
        wh.init("gloo", **kwargs)


def test_config_batch_mode_is_checked():
    import whale as wh

    with pytest.raises(ValueError, match="Config\\(batch='locale'\\): use 'global'"):
        wh.Config(batch="locale")
    with pytest.raises(TypeError, match="check_batch_values"):
        wh.Config(check_batch_values="yes")


def test_a_step_broken_on_one_rank_refuses_the_next_and_says_why():
    from whale.runtime.guard.step_state import StepRefused, StepState, every_rank

    state = StepState()
    state.failed(2, every_rank(ValueError("the ranks passed different batches")))
    state.check(3)  # raised on every rank alike: the program trains on
    state.failed(3, RuntimeError("a bad value in the loss"))
    with pytest.raises(StepRefused, match=r"call 4 refused: step 3 raised on this rank .*a bad value in the loss"):
        state.check(4)
