"""Memory for giant models: what each rank holds under ``Config(zero_stage=0..3)``, activation
checkpointing and offload, what each costs in step time, and ``zero_stage=3`` against FSDP2
(``torch.distributed.fsdp.fully_shard``).

On 2 gloo ranks, the same GPT and batches:

1. **Bytes per rank** after an optimizer step (gradients still held): parameters, gradients
   and AdamW state, each counted once per storage (a ZeRO-1/2 shard is a view of its
   parameter; freed stage-3 parameters hold 0 bytes; gradient buckets and shard regions
   count as gradients). For each stage the categories it shards are compared with their 1/dp
   share of the zero_stage=0 bytes (goal: within 10%, ratio <= 1.10).
2. **Activation memory** of one training step with and without
   ``Config(activation_checkpointing=[every block])``: the bytes autograd keeps for backward
   (``saved_tensors_hooks``; parameters left out; tests/memory_cases.py's helper).
3. **Step time** of each stage and of checkpointing against zero_stage=0 (alternating
   rounds), and of whale ``zero_stage=3`` against FSDP2 ``fully_shard`` (each block, then the
   root; same model, same rows per rank), in alternating rounds; the printed ratio is FSDP2's
   seconds per step over whale's (goal >= 1.0).
4. **Offload**: resident memory (RSS) and step time of ``Config(offload="optimizer")`` and
   ``offload="params"`` against ``"none"``, one fresh 2-rank launch per mode and round
   (benchmarks/bench_offload.py's runs and table, its GPT 8x384; ``--offload-rounds 0`` skips).

Run (spawns its own 2 processes)::

    python benchmarks/bench_memory.py
    python benchmarks/bench_memory.py --layers 8 --embd 512 --rounds 5 --steps 10
    python benchmarks/bench_memory.py --offload-rounds 0    # ZeRO and checkpointing only
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_offload
from _launch import run_on_ranks, seconds_per_step

import whale as wh
from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss
from tests.memory_cases import saved_tensor_bytes
from whale.runtime.grad_sync import GradientReducer
from whale.runtime.zero import ShardedParameters, ShardedReducer

# What each option shards, for the 1/dp goal.
OPTIONS = [
    ("zero 0", {"zero_stage": 0}, ()),
    ("zero 1", {"zero_stage": 1}, ("optimizer",)),
    ("zero 2", {"zero_stage": 2}, ("optimizer", "gradients")),
    ("zero 3", {"zero_stage": 3}, ("optimizer", "gradients", "parameters")),
]
CATEGORIES = ("parameters", "gradients", "optimizer")
CHECKPOINTING = "checkpointing"  # zero 0 with every block recomputed in backward


def _bytes(tensors, seen: set[int]) -> int:
    """Bytes of the storages of ``tensors`` not counted yet (by storage address)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if storage.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _held(program, opt) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state, each storage once."""
    seen: set[int] = set()
    full = list(program.module.parameters())
    shards = list(program.parameters())
    params = _bytes(full + shards, seen)
    grads = [p.grad for p in full + shards]
    reducer = program._reducer
    if isinstance(reducer, GradientReducer):
        grads += [b.buffer for b in reducer.buckets]
    elif isinstance(reducer, ShardedReducer):
        grads += [b.buffer for b in reducer._inner.buckets] if reducer._inner is not None else reducer._regions
    elif isinstance(reducer, ShardedParameters):
        grads += [u.grad_region for u in reducer.units]
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim()]
    return {"parameters": params, "gradients": _bytes(grads, seen), "optimizer": _bytes(state, seen)}


def _batches(args, cfg):
    corpus = SyntheticCorpus(cfg.vocab_size)
    return [corpus.batch(args.batch, cfg.block_size, s) for s in range(args.warmup + args.steps)]



def _worker(rank: int, world: int, args: argparse.Namespace, results) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    cfg = GPTConfig(n_layer=args.layers, n_embd=args.embd, n_head=args.heads, block_size=args.block)
    batches = _batches(args, cfg)
    held, programs = {}, {}
    for name, options, _ in OPTIONS:
        torch.manual_seed(0)
        program = wh.parallelize(GPT(cfg), loss_fn=lm_loss, example_inputs=(batches[0][0],),
                                 config=wh.Config(**options))
        opt = torch.optim.AdamW(program.parameters(), lr=1e-3)
        for x, y in batches[:2]:
            opt.zero_grad()
            program.step(x, y)
            opt.step()
        held[name] = _held(program, opt)
        opt.zero_grad()
        programs[name] = (program, opt)
    torch.manual_seed(0)
    blocks = [f"blocks.{i}" for i in range(cfg.n_layer)]
    program = wh.parallelize(GPT(cfg), loss_fn=lm_loss, example_inputs=(batches[0][0],),
                             config=wh.Config(activation_checkpointing=blocks))
    programs[CHECKPOINTING] = (program, torch.optim.AdamW(program.parameters(), lr=1e-3))
    # Activation memory: what autograd keeps from one step's forward, without and with.
    saved = {}
    for name in ("zero 0", CHECKPOINTING):
        program, opt = programs[name]
        params = list(program.module.parameters()) + list(program.parameters())
        _, saved[name] = saved_tensor_bytes(functools.partial(program.step, *batches[0]), params)
        opt.zero_grad()
    # Step time of each option against none, alternating rounds.
    option_s: dict[str, list[float]] = {name: [] for name in programs}
    for _ in range(args.rounds):
        for name, (program, opt) in programs.items():
            option_s[name].append(seconds_per_step(program.step, opt, batches, args.warmup))
    del programs
    # Step time: whale zero 3 against FSDP2, alternating rounds.
    torch.manual_seed(0)
    whale = wh.parallelize(GPT(cfg), loss_fn=lm_loss, example_inputs=(batches[0][0],),
                           config=wh.Config(zero_stage=3))
    whale_opt = torch.optim.AdamW(whale.parameters(), lr=1e-3)
    torch.manual_seed(0)
    model = GPT(cfg)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    fsdp_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rows = args.batch // world

    def fsdp_step(x, y):
        mine = slice(rank * rows, (rank + 1) * rows)
        lm_loss(model(x[mine]), y[mine]).backward()

    whale_s, fsdp_s = [], []
    for _ in range(args.rounds):
        whale_s.append(seconds_per_step(whale.step, whale_opt, batches, args.warmup))
        fsdp_s.append(seconds_per_step(fsdp_step, fsdp_opt, batches, args.warmup))
    if rank == 0:
        results.put((held, saved, option_s, whale_s, fsdp_s))


def main() -> None:
    p = argparse.ArgumentParser(description="per-rank memory under ZeRO 0-3 and zero 3 vs FSDP2, 2 gloo ranks")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--offload-rounds", type=int, default=3,
                   help="rounds of bench_offload.py's launches (none, optimizer, params); 0 skips")
    args = p.parse_args()
    world = 2
    held, saved, option_s, whale_s, fsdp_s = run_on_ranks(_worker, args, world=world, threads=args.threads)
    mib = 2**20
    print(f"GPT {args.layers}x{args.embd}, global batch {args.batch}x{args.block}, {world} gloo ranks (rank 0)")
    print(f"{'option':<8} {'params MiB':>11} {'grads MiB':>10} {'optim MiB':>10} {'total MiB':>10}  "
          "sharded: bytes / (zero-0 bytes / dp)")
    base = held["zero 0"]
    for name, _, sharded in OPTIONS:
        h = held[name]
        ratios = "  ".join(f"{c} {h[c] / (base[c] / world):.3f}" for c in sharded) or "-"
        print(f"{name:<8} {h['parameters'] / mib:>11.2f} {h['gradients'] / mib:>10.2f} "
              f"{h['optimizer'] / mib:>10.2f} {sum(h.values()) / mib:>10.2f}  {ratios}")
    print(f"\nactivation memory of one step (saved for backward, rank 0): none {saved['zero 0'] / mib:.2f} MiB, "
          f"every block checkpointed {saved[CHECKPOINTING] / mib:.2f} MiB "
          f"({saved[CHECKPOINTING] / saved['zero 0']:.3f}x)")
    base_s = option_s["zero 0"]
    print(f"\n{'option':<13} {'median ms':>10}  step time / zero 0's in the same round: min median max")
    for name, times in option_s.items():
        r = [t / b for t, b in zip(times, base_s)]
        print(f"{name:<13} {statistics.median(times) * 1e3:>10.1f}  {min(r):.3f} {statistics.median(r):.3f} {max(r):.3f}")
    ratios = [f / w for w, f in zip(whale_s, fsdp_s)]
    print(f"\n{'round':>5}  {'whale zero3 ms':>14}  {'FSDP2 ms':>9}  {'ratio':>6}")
    for i, (w, f, r) in enumerate(zip(whale_s, fsdp_s, ratios)):
        print(f"{i:>5}  {w * 1e3:>14.1f}  {f * 1e3:>9.1f}  {r:>6.3f}")
    print(f"step-time ratio FSDP2/whale zero3: min {min(ratios):.3f}  median {statistics.median(ratios):.3f}  "
          f"max {max(ratios):.3f}")
    if args.offload_rounds > 0:
        print("\noffload (benchmarks/bench_offload.py's runs: a fresh launch per mode and round)")
        offload_args = bench_offload.default_args()
        runs = bench_offload.measure(offload_args, args.offload_rounds, world)
        bench_offload.report(runs, offload_args, world)


if __name__ == "__main__":
    main()
