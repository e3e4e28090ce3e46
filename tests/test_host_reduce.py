"""The shared-memory all-reduce of ranks on one host, against the process group's.

Tolerances: with 2 ranks a sum is one addition, a + b, so it is bit-for-bit the process
group's. With 4 ranks the order of the additions differs from gloo's ring (rounding then
differs by a few ulps; 1e-5 relative in float32, 1e-2 in bfloat16), but every rank gets the
same bits, because one rank sums each chunk and writes it to all.
"""

from __future__ import annotations

import pytest
import torch

from whale.runtime.host_reduce import shared_memory_free

CASES = "tests.host_cases"
pytestmark = pytest.mark.skipif(shared_memory_free() == 0, reason="this host has no /dev/shm")
# Odd sizes: fewer elements than ranks, one element, chunks that do not divide evenly.
SIZES = [1, 3, 1000, 12_345]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_ranks_sum_bit_for_bit(world2, dtype):
    for out in world2.run(f"{CASES}:sums", SIZES, dtype):
        assert all(out["equal"]), out["equal"]
        assert all(out["same_everywhere"])
        assert out["left_in_shm"] == []  # unlinked once every rank mapped them


def test_four_ranks_agree_everywhere(world4):
    for out in world4.run(f"{CASES}:sums", SIZES, "float32"):
        assert all(out["close"])
        assert all(out["same_everywhere"])
        assert out["left_in_shm"] == []


def test_full_shared_memory_falls_back_on_every_rank_with_a_warning(world2):
    outs = world2.run(f"{CASES}:full_shared_memory_falls_back")
    reference = world2.run(f"{CASES}:reference_step")[0]
    for out in outs:
        assert not out["host"]
        assert any("rank 1: [Errno 28] No space left on device" in w for w in out["warnings"]), out["warnings"]
        assert out["loss"] == reference["loss"]
        for name, grad in out["grads"].items():
            assert torch.equal(grad, reference["grads"][name]), name
