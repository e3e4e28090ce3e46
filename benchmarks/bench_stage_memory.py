"""Resident memory of a pipeline rank: only its own stage's weights stay on it.

A GPT (TinyGPT of tests/models.py, 8 blocks, n_embd 512, vocabulary 8,192: ~134 MB of fp32
weights) is built normally on each of 2 gloo ranks and cut into 2 stages at ``h.4``. After
binding, each rank's resident set (after a tiny model was parallelized first, so the code
loaded lazily is resident already) (``/proc/self/statm``, after ``gc.collect()`` and glibc's
``malloc_trim``) is measured against the same process before the model was built, three ways,
each in fresh processes:

- ``kept``: the caller still holds the local model (its weights are the user's, whale leaves
  them alone): the whole model stays resident;
- ``dropped``: ``model = wh.parallelize(model, ...)``, the usual script: only the rank's stage;
- ``released``: the caller keeps the object but calls ``program.release_local_model(model)``.

Run::

    python benchmarks/bench_stage_memory.py
    python benchmarks/bench_stage_memory.py --n-layer 12 --n-embd 768
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _launch import run_on_ranks

import whale as wh
from tests.models import TinyGPT

MiB = 2**20


def resident_bytes() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages back to the OS
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def worker(rank: int, world: int, args, results, mode: str) -> None:
    x = torch.randint(0, args.vocab, (4, 16), generator=torch.Generator().manual_seed(0))
    config = wh.Config(stage_boundaries=[f"h.{args.n_layer // 2}"], num_micro_batch=2)
    # A tiny model first: the code whale and torch load lazily (fx, export) is then resident
    # before the measurement, which sees the weights.
    tiny = TinyGPT(vocab=args.vocab, block_size=16, n_layer=args.n_layer, n_head=2, n_embd=8)
    wh.parallelize(tiny, loss_fn=_loss, example_inputs=(x,), config=config)
    del tiny
    before = resident_bytes()
    torch.manual_seed(0)
    model = TinyGPT(vocab=args.vocab, block_size=16, n_layer=args.n_layer, n_head=8, n_embd=args.n_embd)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    program = wh.parallelize(model, loss_fn=_loss, example_inputs=(x,), config=config)
    if mode == "dropped":
        del model
    elif mode == "released":
        program.release_local_model(model)
    after = resident_bytes()
    row = (rank, model_bytes, program.memory()["param_bytes"], after - before)
    rows: list = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        results.put(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--n-embd", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()
    print(f"TinyGPT n_layer={args.n_layer} n_embd={args.n_embd} vocab={args.vocab}, 2 stages on 2 gloo ranks")
    print(f"{'caller':<10} {'rank':>4} {'model MiB':>10} {'stage params MiB':>17} {'RSS growth MiB':>15} {'RSS/model':>10}")
    for mode in ("kept", "dropped", "released"):
        for rank, model_bytes, own, grown in run_on_ranks(worker, args, mode):
            print(f"{mode:<10} {rank:>4} {model_bytes / MiB:>10.1f} {own / MiB:>17.1f} {grown / MiB:>15.1f} "
                  f"{grown / model_bytes:>10.2f}")


if __name__ == "__main__":
    main()
