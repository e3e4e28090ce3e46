"""benchmarks/_launch.py: a rank that raises or dies is reported, and no rank is left waiting."""

from __future__ import annotations

import glob
import os
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from _launch import RankFailed, run_on_ranks


def _sum_ranks(rank, world, args, results) -> None:
    t = torch.tensor([float(rank + args)])
    dist.all_reduce(t)
    if rank == 0:
        results.put(t.item())


def _rank1_raises(rank, world, args, results) -> None:
    if rank == 1:
        raise ValueError("rank one's own error")
    dist.barrier()  # rank 0 would wait here forever (until gloo's timeout)
    results.put("unreachable")


def _rank1_dies(rank, world, args, results) -> None:
    if rank == 1:
        os._exit(7)
    dist.barrier()


def test_results_come_back():
    assert run_on_ranks(_sum_ranks, 10, world=2) == 21.0


def _error_files() -> set[str]:
    """The traceback files torch's spawn leaves in the temporary directory."""
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "pytorch-errorfile-*")))


def test_a_rank_that_raises_is_named_and_every_rank_ends():
    began, before = time.monotonic(), _error_files()
    with pytest.raises(RankFailed) as info:
        run_on_ranks(_rank1_raises, None, world=2)
    assert str(info.value).startswith("benchmark rank 1 raised")
    assert "ValueError: rank one's own error" in str(info.value)
    assert time.monotonic() - began < 60  # not gloo's timeout
    assert _error_files() <= before, "a rank's traceback file was left in the temporary directory"


def test_a_rank_that_dies_is_named():
    with pytest.raises(RankFailed, match="^benchmark rank 1 exited with code 7"):
        run_on_ranks(_rank1_dies, None, world=2)
