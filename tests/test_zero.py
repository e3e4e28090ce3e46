"""ZeRO (``Config(zero_stage=1|2|3)``) against the local model, on real gloo processes.

Tolerances: loss, gradients and the first step's parameters as tests/equivalence.py states
(the shards' gradients are the same row-weighted sums, reduce-scattered instead of
all-reduced: only the order of fp32 additions may differ). Three further steps in a row are
compared with the same program under zero_stage=0: an AdamW update is elementwise, so a shard
steps exactly as its slice of the full parameter does; with two ranks each summed element is
the same two-term sum either way, so the states must agree to round-off (atol 1e-6;
stage 3: see _check_steps).
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from tests.equivalence import LR, assert_equivalent
from tests.world import CaseError
from whale import Config
from whale.runtime.host_reduce import shared_memory_free
from whale.runtime.process_group import FLAT_COLLECTIVES

CASES = "tests.zero_cases"


def _check_steps(out: dict, stage: int) -> None:
    assert_close(torch.tensor(out["steps_loss"]), torch.tensor(out["plain_steps_loss"]), rtol=1e-6, atol=0)
    # Stage 3 reduce-scatters each micro-batch's gradients and adds them up in its shard; the
    # other stages reduce the accumulated sum once: fp32 round-off in the order of additions,
    # which Adam amplifies to O(lr) on entries whose gradient is round-off (the attention key
    # bias, see tests/equivalence.py), so there every entry must agree to 5% of lr.
    atol = 5 * LR / 100 if stage == 3 else 1e-6
    for name, want in out["plain_steps_state"].items():
        assert_close(out["steps_state"][name], want, rtol=0, atol=atol, msg=f"after 3 steps: {name}")


def _check_memory(outs: list[dict], stage: int, dp: int) -> None:
    for out in outs:
        mem = out["memory"]
        whole = mem["unsharded_numel"]  # weights tied across pipeline stages stay whole
        share = (mem["model_numel"] - whole) / dp
        # Each parameter is cut in dp chunks of ceil(n/dp): a rank's shards are its 1/dp share
        # give or take one element per parameter.
        assert abs(mem["shard_numel"] - whole - share) <= 0.1 * share, mem
        assert mem["opt_numel"] == 2 * mem["shard_numel"], mem  # AdamW: exp_avg, exp_avg_sq
        if stage == 3:
            assert mem["resident_numel"] == whole, mem  # between steps only the shards remain
        else:
            assert mem["resident_numel"] == mem["model_numel"], mem


@pytest.mark.parametrize(
    "stage, kwargs, rows",
    [
        (1, {}, (4, 4)),
        (1, {"shared_memory": False, "row_weights": (1, 3)}, (2, 6)),
        (2, {"row_weights": (3, 1), "num_micro_batch": 2, "bucket_cap_mb": 0.005}, (6, 2)),
        (3, {"row_weights": (1, 3), "num_micro_batch": 2}, (2, 6)),
    ],
    ids=["zero1", "zero1-sockets-uneven", "zero2-uneven-microbatch-buckets", "zero3-uneven-microbatch"],
)
def test_equivalence_world2(world2, stage, kwargs, rows):
    outs = world2.run(f"{CASES}:equivalence", "gpt", 8, stage, **kwargs)
    assert tuple(outs[0]["rows"]) == rows
    for out in outs:
        assert_equivalent(out)
        _check_steps(out, stage)
    _check_memory(outs, stage, 2)


@pytest.mark.parametrize("value", [4, -1, "2", True, 1.0])
def test_unknown_zero_stage_is_named(value):
    with pytest.raises(ValueError, match=r"zero_stage=.*choose one of \[0, 1, 2, 3\]"):
        Config(zero_stage=value)


@pytest.mark.parametrize("stage", [1, 3])
def test_optimizer_on_the_full_model_is_caught_at_its_first_step(world2, stage):
    with pytest.raises(CaseError) as err:
        world2.run(f"{CASES}:full_model_optimizer", stage)
    assert err.value.type_name == "ValueError"
    assert f"zero_stage={stage}" in err.value.message
    assert "program.parameters()" in err.value.message
    assert "'wte.weight'" in err.value.message or "'blocks." in err.value.message


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_inside_a_two_stage_pipeline(world4, stage):
    """Each stage's data-parallel group (2 replicas, rows 6 and 2) shards its stage."""
    outs = world4.run(f"{CASES}:pipeline_equivalence", stage)
    assert outs[0]["plan"] == (2, 2)
    for out in outs:
        # Each rank compares its own stage's parameters (train_distributed names them).
        assert_equivalent(out, names=[n for n in out["params"]])
    _check_memory(outs, stage, 2)


@pytest.mark.parametrize("stage", [1, 3])
def test_beside_tensor_parallel(world4, stage):
    """2-way split blocks inside 2 replicas: ZeRO shards each tensor-parallel shard further."""
    outs = world4.run(f"{CASES}:equivalence", "gpt", 8, stage, split=("blocks",))
    for out in outs:
        assert_equivalent(out)
        _check_steps(out, stage)
    _check_memory(outs, stage, 2)


@pytest.mark.parametrize("name, stage", [("gpt2", 3), ("llama", 2)])
def test_transformers_model(world2, name, stage):
    """A transformers model (GPT-2: lm_head tied to wte; Llama: GQA, rotary buffers), uneven rows."""
    outs = world2.run(f"{CASES}:hf_equivalence", name, stage, row_weights=(3, 1), num_micro_batch=2)
    for out in outs:
        assert_equivalent(out)
    _check_memory(outs, stage, 2)


@pytest.mark.skipif(shared_memory_free() == 0, reason="this host has no /dev/shm")
def test_zero1_gathers_through_shared_memory_on_one_host(world2):
    """Stage 1 on one host: gradients summed and updated shards gathered in the buckets'
    shared-memory segments; no collective carries them (only barriers, all-reduces of 1)."""
    out = world2.run(f"{CASES}:collectives", 1)[0]
    assert set(out["calls"]) == {"all_reduce"}, out


@pytest.mark.parametrize("stage", [2, 3])
def test_collectives_per_step(world2, stage):
    """Stage 2: one reduce-scatter per bucket in backward, one all-gather per bucket for the
    updated shards, one all-reduce (the loss, the batch check and which parameters no rank
    used: they keep no gradient). Stage 3: each unit
    (3 blocks and the root) gathered for its forward and again for its backward, one
    reduce-scatter each; no gradient all-reduce."""
    out = world2.run(f"{CASES}:collectives", stage)[0]
    n = out["units"]
    assert n == (4 if stage == 3 else n) and n > 1, out
    gathers = 2 * n if stage == 3 else n
    flat = FLAT_COLLECTIVES
    assert out["calls"] == {"all_reduce": 1, flat["reduce_scatter"]: n, flat["all_gather"]: gathers}, out
    if stage == 3:
        # One layer at a time: the root, the running block and the one prefetched after it.
        assert out["peak"] <= out["root"] + 2 * out["block"] < out["model"], out
