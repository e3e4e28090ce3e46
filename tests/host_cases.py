"""Cases run on every rank of a gloo pool for the shared-memory all-reduce tests."""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

import whale as wh
from tests.dp_cases import _model_and_batches
from whale.runtime import host_reduce
from whale.runtime.host_reduce import HostLink, HostReduce


def sums(sizes: list[int], dtype: str) -> dict:
    """Each rank fills buffers of ``sizes`` with its own numbers; the shared-memory sums
    against the process group's, and which files it left in /dev/shm."""
    dtype = getattr(torch, dtype)
    link = HostLink(dist.new_group(list(range(dist.get_world_size()))))
    host = HostReduce([(n, dtype) for n in sizes], link)
    out = {"equal": [], "close": [], "same_everywhere": []}
    for step in range(2):  # twice: buffers are reused
        expected = []
        for i, n in enumerate(sizes):
            g = torch.Generator().manual_seed(100 * step + 10 * i + dist.get_rank())
            values = torch.randn(n, generator=g).to(dtype)
            host.buffer(i).copy_(values)
            expected.append(values.clone())
        pending = [host.start(i) for i in range(len(sizes))]
        for want in expected:
            dist.all_reduce(want)
        for i, work in enumerate(pending):
            work.wait()
            got = host.buffer(i).clone()
            out["equal"].append(torch.equal(got, expected[i]))
            out["close"].append(torch.allclose(got.double(), expected[i].double(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2 if dtype == torch.bfloat16 else 1e-5))
            every: list = [None] * dist.get_world_size()
            dist.all_gather_object(every, got)
            out["same_everywhere"].append(all(torch.equal(e, got) for e in every))
    out["left_in_shm"] = [f for f in os.listdir("/dev/shm") if f.startswith(f"whale-{os.getpid()}-")]
    return out


def full_shared_memory_falls_back() -> dict:
    """Rank 1 cannot make its segments: every rank warns and sums over the process group."""
    model, batches, loss_fn = _model_and_batches("gpt", 8)
    real = host_reduce._create_segment

    def full(numel, dtype):
        if dist.get_rank() == 1:
            raise OSError(28, "No space left on device")
        return real(numel, dtype)

    host_reduce._create_segment = full
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],))
            program.parameters()  # binds: the reducer is made here
    finally:
        host_reduce._create_segment = real
    loss = program.step(*batches[0])
    return {
        "warnings": [str(w.message) for w in caught],
        "host": program._reducer._host is not None,
        "loss": loss.item(),
        "grads": {n: p.grad.clone() for n, p in program.named_parameters()},
    }


def reference_step() -> dict:
    model, batches, loss_fn = _model_and_batches("gpt", 8)
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],), config=wh.Config(shared_memory=False))
    loss = program.step(*batches[0])
    return {"loss": loss.item(), "grads": {n: p.grad.clone() for n, p in program.named_parameters()}}
