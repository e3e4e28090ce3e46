"""Checkpoints: ``wh.checkpoint`` on a tensor-parallel model against DCP on the same model under
FSDP2 (``fully_shard``: every parameter a DTensor sharded on dim 0), both with AdamW state.

The model is a stack of MLP blocks (Linear d->4d, GELU, Linear 4d->d), ~300 MB of fp32
parameters at the defaults, ~900 MB of state with AdamW's two moments. whale splits every block
over the 2 ranks (column/row-parallel pairs: each rank half of each weight); FSDP2 shards every
parameter over the same 2 ranks. Both take one training step first, so the optimizer holds its
moments, then save and load through ``torch.distributed.checkpoint``'s file system writer:
whale through ``wh.checkpoint.save/load`` (a program's shards as chunks with global offsets, a
hidden directory renamed into place), FSDP2 through ``get_state_dict``/``dcp.save`` and
``dcp.load``/``set_state_dict``. Rounds alternate (whale, DCP, whale, ...); each time is the
slowest rank's, between barriers; the printed ratios are whale's over DCP's, medians over rounds.
Bytes per rank are the sizes of the ``__<rank>_*.distcp`` files each rank wrote.

Run (spawns its own 2-process gloo group; writes under --dir, default a temporary directory)::

    python benchmarks/bench_checkpoint.py
    python benchmarks/bench_checkpoint.py --rounds 5 --dim 1024 --layers 6
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _launch import run_on_ranks

import whale as wh


class Stack(nn.Module):
    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return took.item()


def _rank_bytes(path: Path, rank: int) -> int:
    return sum(f.stat().st_size for f in path.rglob(f"__{rank}_*.distcp"))


def _whale(args, root: Path, x, y):
    torch.manual_seed(0)
    model = Stack(args.dim, args.layers)
    wh.annotate(model, {"blocks": wh.split(2)})
    program = wh.parallelize(model, loss_fn=_mse, example_inputs=(x,))
    opt = torch.optim.AdamW(program.parameters(), lr=1e-4)
    program.step(x, y)
    opt.step()
    opt.zero_grad()

    def save() -> None:
        wh.checkpoint.save(root, program, opt, step=1)

    def load() -> None:
        wh.checkpoint.load(root, program, opt)

    return save, load, lambda: wh.checkpoint.latest(root)


def _fsdp(args, root: Path, x, y):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Stack(args.dim, args.layers)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = x.shape[0] // dist.get_world_size()
    mine = slice(dist.get_rank() * rows, (dist.get_rank() + 1) * rows)
    _mse(model(x[mine]), y[mine]).backward()
    opt.step()
    opt.zero_grad()
    path = root / "fsdp"

    def save() -> None:
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)

    def load() -> None:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    return save, load, lambda: path


def _worker(rank: int, world: int, args, results) -> None:
    root = Path(args.dir)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, args.dim, generator=g), torch.randn(8, args.dim, generator=g)
    kinds = {"whale": _whale(args, root / "whale", x, y), "dcp": _fsdp(args, root / "dcp", x, y)}
    times = {(k, op): [] for k in kinds for op in ("save", "load")}
    for _ in range(args.rounds):
        for kind, (save, load, _) in kinds.items():
            times[(kind, "save")].append(_timed(save))
        for kind, (save, load, _) in kinds.items():
            times[(kind, "load")].append(_timed(load))
    sizes = {}
    for kind, (_, _, where) in kinds.items():
        mine = torch.tensor([_rank_bytes(where(), r) for r in range(world)], dtype=torch.float64)
        sizes[kind] = mine.tolist()
    params = sum(p.numel() for p in Stack(args.dim, args.layers).parameters()) if rank == 0 else 0
    if rank == 0:
        results.put({"times": {f"{k}/{op}": v for (k, op), v in times.items()}, "sizes": sizes, "params": params})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    made = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="whale-bench-ckpt-")
    try:
        out = run_on_ranks(_worker, args, world=2, threads=1)
    finally:
        if made:
            shutil.rmtree(args.dir, ignore_errors=True)
    mb = 2**20
    print(f"model: {args.layers} MLP blocks of d={args.dim}, {out['params'] / 1e6:.1f} M parameters "
          f"({out['params'] * 4 / mb:.0f} MiB fp32, AdamW moments on top), 2 gloo ranks, {args.rounds} rounds")
    print(f"{'':14s} {'whale (split)':>16s} {'DCP (FSDP2)':>16s} {'whale / DCP':>12s}")
    for op in ("save", "load"):
        w = statistics.median(out["times"][f"whale/{op}"])
        d = statistics.median(out["times"][f"dcp/{op}"])
        print(f"{op + ' (s)':14s} {w:16.3f} {d:16.3f} {w / d:12.2f}")
    for r in range(2):
        w, d = out["sizes"]["whale"][r], out["sizes"]["dcp"][r]
        print(f"{f'rank {r} (MiB)':14s} {w / mb:16.1f} {d / mb:16.1f} {w / d:12.2f}")


if __name__ == "__main__":
    main()
