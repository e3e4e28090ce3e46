"""Tensor parallel: whale ``split`` against ``torch.distributed.tensor.parallel``, and a 100k-class
classifier sharded by whale against data parallel.

Part 1 (``block``): one transformer block (attention with separate q/k/v projections, MLP,
LayerNorms, residuals), the same weights and inputs, sharded 2 ways by whale (``shard_model``)
and by DTensor's ``parallelize_module`` with ``ColwiseParallel`` on q, k, v, fc and
``RowwiseParallel`` on the output projections. Rounds alternate (whale, DTensor, whale, ...); the
printed ratio is whale's throughput over DTensor's in the same round (forward, backward, AdamW).

Part 2 (``classifier``): features + a 100k-class head trained by whale's data parallel (each rank
a full copy) and by whale's split classifier (each rank half the classes, vocabulary-parallel
cross-entropy). Each runs in fresh processes so the peak RSS per rank is its own; the split
model is built on the meta device and only its shards are ever allocated.

Run (spawns its own 2-process groups)::

    python benchmarks/bench_tp.py
    python benchmarks/bench_tp.py --part block --rounds 7 --embd 512
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import whale as wh  # noqa: E402
from whale.capture import capture  # noqa: E402
from whale.rewrite import shard_model  # noqa: E402
from _launch import run_on_ranks  # noqa: E402


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 heads: the local count on a shard, as torchtitan writes it for DTensor
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.fc, self.proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class Classifier(nn.Module):
    def __init__(self, d_in: int, width: int, classes: int, split: bool) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(d_in, width), nn.ReLU())
        with wh.split() if split else contextlib.nullcontext():
            self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _time(step, opt, steps: int, warmup: int) -> float:
    for i in range(warmup + steps):
        if i == warmup:
            dist.barrier()
            start = time.perf_counter()
        step()
        opt.step()
        opt.zero_grad(set_to_none=True)
    dist.barrier()
    return (time.perf_counter() - start) / steps


def _block_worker(rank: int, args, results) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq, args.embd)
    local = Block(args.embd, args.heads)
    wh.annotate(local, {"": wh.split()})
    state = local.state_dict()
    sharded = shard_model(local, capture(local, (x,)))
    whale_opt = torch.optim.AdamW(sharded.module.parameters(), lr=1e-4)

    mesh = init_device_mesh("cpu", (2,))
    dt = Block(args.embd, args.heads)
    dt.load_state_dict(state)
    col, row = ColwiseParallel(), RowwiseParallel()
    dt = parallelize_module(dt, mesh, {"attn.q": col, "attn.k": col, "attn.v": col, "attn.o": row, "fc": col, "proj": row})
    dt_opt = torch.optim.AdamW(dt.parameters(), lr=1e-4)
    with torch.no_grad():  # same function before timing
        assert torch.allclose(sharded.module(x), dt(x), atol=1e-5)

    ratios, w_s, d_s = [], [], []
    for _ in range(args.rounds):
        w = _time(lambda: sharded.module(x).pow(2).mean().backward(), whale_opt, args.steps, args.warmup)
        d = _time(lambda: dt(x).pow(2).mean().backward(), dt_opt, args.steps, args.warmup)
        w_s.append(w)
        d_s.append(d)
        ratios.append(d / w)
    if rank == 0:
        results.put((ratios, w_s, d_s))


def _classifier_worker(rank: int, args, results) -> None:
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.rows, args.d_in, generator=g), torch.randint(args.classes, (args.rows,), generator=g))
               for _ in range(args.warmup + args.steps)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    if args.mode == "dp":
        model = Classifier(args.d_in, args.width, args.classes, split=False)
        program = wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=(batches[0][0],))
        params, step = list(program.parameters()), program.step
    else:
        with torch.device("meta"):
            model = Classifier(args.d_in, args.width, args.classes, split=True)
        sharded = shard_model(model, capture(model, (batches[0][0],)), loss_fn=F.cross_entropy)
        sharded.module.to_empty(device="cpu")
        for p in sharded.module.parameters():
            nn.init.normal_(p, std=0.02)
        params = list(sharded.module.parameters())

        def step(x, y):
            loss = sharded.loss_fn(sharded.module(x), y)
            loss.backward()
            return loss

    opt = torch.optim.AdamW(params, lr=1e-3)
    it = iter(batches)
    seconds = _time(lambda: step(*next(it)), opt, args.steps, args.warmup)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    state = sum(p.numel() * p.element_size() * 4 for p in params)  # weights, grads, 2 Adam moments
    if rank == 0:
        results.put((seconds, (peak - base) / 1024, peak / 1024, state / 2**20))


def _entry(rank: int, world: int, args, results, target: str) -> None:
    {"block": _block_worker, "classifier": _classifier_worker}[target](rank, args, results)


def _spawn(target: str, args) -> object:
    return run_on_ranks(_entry, args, target, threads=args.threads)


def main() -> None:
    p = argparse.ArgumentParser(description="whale split vs DTensor tensor parallel; split classifier vs data parallel")
    p.add_argument("--part", choices=("block", "classifier", "all"), default="all")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--embd", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--classes", type=int, default=100_000)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--d-in", type=int, default=64)
    p.add_argument("--rows", type=int, default=64, help="global batch of the classifier")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = p.parse_args()
    if args.part in ("block", "all"):
        ratios, w_s, d_s = _spawn("block", args)
        tok = args.batch * args.seq
        print(f"transformer block d={args.embd} heads={args.heads}, batch {args.batch}x{args.seq}, 2 gloo ranks, "
              f"{args.rounds} rounds x {args.steps} steps (forward+backward+AdamW)")
        print(f"{'round':>5}  {'whale tok/s':>12}  {'DTensor tok/s':>13}  {'ratio':>6}")
        for i, (w, d, r) in enumerate(zip(w_s, d_s, ratios)):
            print(f"{i:>5}  {tok / w:>12,.0f}  {tok / d:>13,.0f}  {r:>6.3f}")
        print(f"throughput ratio whale/DTensor: min {min(ratios):.3f}  median {statistics.median(ratios):.3f}  "
              f"max {max(ratios):.3f}")
    if args.part in ("classifier", "all"):
        print(f"\nclassifier {args.d_in}->{args.width}->{args.classes:,} classes, global batch {args.rows}, 2 gloo ranks")
        print(f"{'mode':>24}  {'step ms':>8}  {'peak RSS MB':>11}  {'RSS growth MB':>13}  {'param+grad+Adam MB':>18}")
        rows = {}
        for mode in ("dp", "split", "dp", "split"):  # alternate; report the median step time
            args.mode = mode
            rows.setdefault(mode, []).append(_spawn("classifier", args))
        for mode, label in (("dp", "data parallel (replicate)"), ("split", "split classifier")):
            runs = rows[mode]
            step = statistics.median(r[0] for r in runs)
            print(f"{label:>24}  {step * 1e3:>8.1f}  {max(r[2] for r in runs):>11.0f}  {max(r[1] for r in runs):>13.0f}  "
                  f"{runs[0][3]:>18.0f}")
        dp, sp = statistics.median(r[0] for r in rows["dp"]), statistics.median(r[0] for r in rows["split"])
        print(f"step time split/dp: {sp / dp:.3f}   peak RSS split/dp: "
              f"{max(r[2] for r in rows['split']) / max(r[2] for r in rows['dp']):.3f}")


if __name__ == "__main__":
    main()
