"""Data parallel (``replicate``) against the local model, on real gloo processes.

Tolerances: see tests/equivalence.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from tests.equivalence import assert_equivalent
from tests.world import CaseError
from whale.runtime.guard.batch_check import digest_digits, digits_agree
from whale.runtime.host_reduce import shared_memory_free

CASES = "tests.dp_cases"


def _same_on_every_rank(outs: list[dict]) -> None:
    for other in outs[1:]:
        assert other["loss"] == outs[0]["loss"], "every rank returns the global loss"
        for name, p in outs[0]["params"].items():
            assert torch.equal(other["params"][name], p), f"replicas diverged at {name}"


@pytest.mark.parametrize(
    "kind, kwargs, rows",
    [
        ("gpt", {}, (4, 4)),
        ("gpt", {"row_weights": (3, 1), "num_micro_batch": 2}, (6, 2)),
        ("gpt", {"row_weights": (1, 3), "batch": "local"}, (2, 6)),
        ("cnn", {"row_weights": (5, 3)}, (5, 3)),
        ("gpt", {"bucket_cap_mb": 0.005}, (4, 4)),
    ],
    ids=["gpt-even", "gpt-uneven-microbatch", "gpt-uneven-local-rows", "cnn-uneven", "gpt-many-buckets"],
)
def test_equivalence_world2(world2, kind, kwargs, rows):
    outs = world2.run(f"{CASES}:equivalence", kind, 8, **kwargs)
    assert tuple(outs[0]["rows"]) == rows
    assert_equivalent(outs[0])
    _same_on_every_rank(outs)


@pytest.mark.parametrize(
    "kind, kwargs, rows",
    [
        ("gpt", {"row_weights": (1, 2, 3, 2)}, (1, 2, 3, 2)),
        ("cnn", {}, (2, 2, 2, 2)),
        ("gpt", {"replicate_count": 2}, (2, 2, 2, 2)),
    ],
    ids=["gpt-uneven", "cnn-even", "gpt-replicate2x2"],
)
def test_equivalence_world4(world4, kind, kwargs, rows):
    outs = world4.run(f"{CASES}:equivalence", kind, 8, **kwargs)
    assert tuple(outs[0]["rows"]) == rows
    assert_equivalent(outs[0])
    _same_on_every_rank(outs)


def test_loss_rides_on_the_gradient_all_reduce(world2):
    # After the first step, a step's only collectives are the gradient buckets' all-reduces:
    # the global loss and the batch check travel in the last bucket. With bf16 traffic the
    # fingerprint would not sum exactly, so they take one all-reduce of their own.
    same = world2.run(f"{CASES}:collectives_per_step", shared_memory=False)
    assert len(same[0]["calls"]) == same[0]["buckets"] >= 1
    cast = world2.run(f"{CASES}:collectives_per_step", grad_comm_dtype=torch.bfloat16)
    assert len(cast[0]["calls"]) == cast[0]["buckets"] + 1
    assert same[0]["loss"] == same[1]["loss"]
    assert same[0]["loss"] == pytest.approx(cast[0]["loss"], rel=1e-6)


@pytest.mark.skipif(shared_memory_free() == 0, reason="this host has no /dev/shm")
def test_gradients_meet_in_shared_memory_on_one_host(world2):
    # The pool's ranks share a host: no gradient crosses the process group, only two
    # one-element barriers per bucket; the result is the same bits as over the process group.
    shm = world2.run(f"{CASES}:collectives_per_step")
    assert shm[0]["calls"] == [1] * (2 * shm[0]["buckets"])
    sockets = world2.run(f"{CASES}:collectives_per_step", shared_memory=False)
    assert shm[0]["loss"] == sockets[0]["loss"]
    for name, grad in shm[0]["grads"].items():
        assert torch.equal(grad, sockets[0]["grads"][name]), name


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**20 - 1), min_size=1, max_size=64), st.booleans())
def test_digest_digits_sum_exactly_in_float32(fingerprints, same):
    if same:
        fingerprints = [fingerprints[0]] * len(fingerprints)
    rows = torch.stack([digest_digits(torch.tensor(f)) for f in fingerprints]).float()
    summed = rows.sum(0).tolist()
    assert digits_agree(summed, len(fingerprints)) == (len(set(fingerprints)) == 1)


def test_bf16_gradient_communication(world2):
    # bf16 keeps 8 bits of mantissa: each all-reduced gradient is within ~2**-8 relative.
    out = world2.run(f"{CASES}:equivalence", "gpt", 8, grad_comm_dtype=torch.bfloat16)[0]
    for name, ref in out["ref_grads"][0].items():
        assert_close(out["grads"][0][name], ref, rtol=1e-2, atol=1e-4, msg=name)


def test_replicas_start_from_rank0_weights(world2):
    sums = world2.run(f"{CASES}:replicas_start_equal")
    assert sums[0] == sums[1]


def test_full_state_dict_round_trip(world2):
    assert world2.run(f"{CASES}:state_dict_round_trip") == [True, True]


@pytest.mark.parametrize(
    "case, needle",
    [
        ("different_shapes_per_rank", "shapes or dtypes differ"),
        ("different_shapes_in_a_later_step", "differ in this step"),
        ("batch_too_small", "cannot be split over 2 replicas"),
        ("local_rows_not_as_planned", "local_slice(8)"),
        ("too_few_rows_for_micro_batches", "num_micro_batch=2 is larger than the 1 rows replica 1"),
    ],
)
def test_bad_batches_are_named(world2, case, needle):
    with pytest.raises(CaseError) as info:
        world2.run(f"{CASES}:{case}")
    assert info.value.type_name == "ValueError"
    assert needle in info.value.message


@pytest.mark.parametrize(
    "config",
    [
        {},  # the flags ride on the gradient all-reduce (through shared memory on this host)
        {"shared_memory": False, "grad_comm_dtype": torch.bfloat16},  # over gloo, cast to bf16
        {"zero_stage": 1},
        {"zero_stage": 2},
        {"zero_stage": 3},
    ],
    ids=["shm", "bf16", "zero1", "zero2", "zero3"],
)
def test_a_parameter_no_rank_used_keeps_no_gradient(world2, config):
    """As on the local model (and as DDP leaves it): a parameter one rank did not use sends zeros
    and gets the sum of the others; one no rank used keeps ``grad is None``, so AdamW's weight
    decay leaves it as it was. Tolerances of tests/equivalence.py; bf16 traffic: 1e-2."""
    tol = {"rtol": 1e-2, "atol": 1e-2} if "grad_comm_dtype" in config else {"rtol": 1e-4, "atol": 1e-6}
    for out in world2.run(f"{CASES}:routed", **config):
        assert_close(torch.tensor(out["loss"]), torch.tensor(out["ref_loss"]), rtol=tol["rtol"], atol=0)
        for step, (grads, ref) in enumerate(zip(out["grads"], out["ref_grads"])):
            assert {n for n, g in grads.items() if g is None} == {n for n, g in ref.items() if g is None}, step
            for n, g in ref.items():
                if g is not None:
                    assert_close(grads[n], g, **tol, msg=f"step {step} grad {n}")
        # step 0: a on rank 0's rows only, b on rank 1's; step 1: b on no rank's
        assert out["ref_grads"][1]["b.weight"] is None and out["ref_grads"][0]["b.weight"] is not None
        first, second = out["params"]
        for n, p in out["ref_params"][0].items():  # after the first step (later steps compound round-off)
            assert_close(first[n], p, rtol=0, atol=5e-4 if "grad_comm_dtype" not in config else 5e-3, msg=n)
        assert torch.equal(first["never.weight"], out["ref_params"][0]["never.weight"])
        for n in ("never.weight", "never.bias", "b.weight", "b.bias"):  # no gradient in step 1: not moved
            assert torch.equal(second[n], first[n]), n
