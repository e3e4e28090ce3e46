"""Granular offload: resident memory and step time of ``Config(offload="optimizer")`` and
``offload="params"`` against ``offload="none"`` on the same model, batches and ranks.

A GPT (examples/gpt.py) trained data parallel on 2 gloo ranks with AdamW. Each run is a fresh
launch (so its resident memory is its own) that trains ``--steps`` steps and reports, on rank 0:
the resident set after the last step (``VmRSS``: what the ranks hold between steps), its peak
over the run (``VmHWM``), and the median time of ``program.step`` + ``optimizer.step``. Rounds
alternate the modes (none, optimizer, params, none, ...); every ratio is a mode's over the
``none`` run of its round, the printed value the median over rounds. On a CPU host the tier is a
memory-mapped file in ``--dir`` (default: the system's temporary directory).

Run (spawns its own gloo ranks)::

    python benchmarks/bench_offload.py
    python benchmarks/bench_offload.py --rounds 5 --layers 8 --dim 512 --world 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import whale as wh
from benchmarks._launch import run_on_ranks
from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss
from whale.runtime.offload import resident_bytes

MODES = ("none", "optimizer", "params")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _worker(rank: int, world: int, args, results, mode: str) -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=args.seq, n_layer=args.layers, n_head=8, n_embd=args.dim)
    corpus = SyntheticCorpus(cfg.vocab_size, length=1 << 16)
    batches = [corpus.batch(args.batch, cfg.block_size, s) for s in range(args.steps)]
    model = GPT(cfg)
    config = wh.Config(offload=mode, offload_dir=args.dir)
    program = wh.parallelize(model, loss_fn=lm_loss, example_inputs=(batches[0][0],), config=config)
    del model
    opt = torch.optim.AdamW(program.parameters(), lr=1e-3)
    times = []
    for x, y in batches:
        start = time.perf_counter()
        program.step(x, y)
        opt.step()
        opt.zero_grad(set_to_none=False)
        times.append(time.perf_counter() - start)
    rss = resident_bytes()
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if v.dim())
    params = sum(p.numel() * p.element_size() for p in program.parameters())
    if rank == 0:
        results.put({
            "rss": rss.get("rss", 0), "anon": rss.get("anon", 0), "file": rss.get("file", 0), "peak": _peak_rss(),
            "step": statistics.median(times[1:]), "state": state, "params": params,
        })


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This benchmark's model and run options."""
    parser.add_argument("--steps", type=int, default=6, help="steps per run (the first is not timed)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dir", default=None, help="offload directory (default: the system's temporary one)")


def default_args(**overrides) -> argparse.Namespace:
    """The options of :func:`add_arguments` at their defaults, then ``overrides`` (another script's run)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    for name, value in overrides.items():
        if not hasattr(args, name):
            raise ValueError(f"bench_offload has no option {name!r}")
        setattr(args, name, value)
    return args


def measure(args, rounds: int, world: int, log=print) -> dict[str, list[dict]]:
    """``rounds`` rounds of one fresh launch per mode (none, optimizer, params), alternating."""
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(rounds):
        for mode in MODES:
            runs[mode].append(run_on_ranks(_worker, args, mode, world=world))
        log(f"offload round {r + 1}/{rounds}: " + ", ".join(
            f"{m} rss {runs[m][-1]['rss'] / 2**20:.0f} MiB step {runs[m][-1]['step'] * 1e3:.0f} ms" for m in MODES))
    return runs


def report(runs: dict[str, list[dict]], args, world: int) -> None:
    """Per mode: RSS after a step, its ratio and MiB saved against ``none`` in the same round,
    the peak RSS ratio and the step-time ratio (medians over rounds)."""
    base = runs["none"]
    mib = 2**20
    print(f"GPT {args.layers} layers x {args.dim}, {base[0]['params'] / mib:.0f} MiB parameters and "
          f"{base[0]['state'] / mib:.0f} MiB AdamW state per rank, {world} gloo rank(s), {len(base)} rounds")
    print(f"{'mode':<10} {'rss after step':>15} {'rss ratio':>10} {'saved MiB':>10} {'peak ratio':>11} {'step ratio':>11}")
    for mode in MODES:
        rss = statistics.median(run["rss"] for run in runs[mode])
        rss_ratio = statistics.median(run["rss"] / b["rss"] for run, b in zip(runs[mode], base))
        saved = statistics.median((b["rss"] - run["rss"]) / mib for run, b in zip(runs[mode], base))
        peak = statistics.median(run["peak"] / b["peak"] for run, b in zip(runs[mode], base))
        step = statistics.median(run["step"] / b["step"] for run, b in zip(runs[mode], base))
        print(f"{mode:<10} {rss / mib:>11.0f} MiB {rss_ratio:>10.2f} {saved:>10.0f} {peak:>11.2f} {step:>11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--world", type=int, default=2, help="gloo ranks (1 or 2)")
    add_arguments(parser)
    args = parser.parse_args()
    runs = measure(args, args.rounds, args.world)
    print()
    report(runs, args, args.world)


if __name__ == "__main__":
    main()
