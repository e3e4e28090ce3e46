"""Predicted against measured step times: the cost model, calibrated by ``whale profile``, on this host.

On 2 gloo ranks (1 torch thread each) this profiles the host as ``whale profile --quick`` does
(every rank at once, as in training: matmul efficiency by size, cost per operation, memory
bandwidth over buffers larger than the last-level cache, optimizer steps, the all-reduce link),
then trains small GPTs under several plans. For each plan the prediction is the one
``parallelize`` attaches (``program.predicted_step_time``: the cost model on a cluster of the
measured profile; later rounds re-profile the host, whose load drifts, and predict again; the
printed prediction is the median), the measurement the median wall time of a whole step
(``step``, AdamW ``step``, ``zero_grad``) over rounds interleaved across plans, after warm-up.

Plans: data parallel, a 2-stage pipeline (1F1B), tensor parallel (the blocks ``split``), data
parallel with 4 micro-batches (gradient accumulation), a GPipe pipeline of 4 micro-batches, and
data parallel with rank 1 emulated at half speed (``WHALE_EMULATE_SLOWDOWN=1:2``; its cluster
gives rank 1 the host profile at half the rates) where the runtime supports the variable.

Run (spawns its own 2 processes; about 2 minutes)::

    python benchmarks/bench_predict.py
    python benchmarks/bench_predict.py --rounds 5 --steps 6 --case data --case pipeline
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _launch import run_on_ranks

import whale as wh
from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss
from whale.capture import capture
from whale.ir.cluster_spec import parse_cluster
from whale.planner.cost.model_profile import profile_model
from whale.planner.cost.plan_cost import predict_plan
from whale.planner.measure import measure_device, measure_links

_SLOWDOWN = "WHALE_EMULATE_SLOWDOWN"
CASES = ("data", "pipeline", "tensor", "data-accum", "pipeline-gpipe", "emulated-slow")


def slowed(profile, factor: float, name: str):
    """``profile`` running ``factor`` times slower: rates over ``factor``, costs times ``factor``."""
    steps = profile.optimizer_step and tuple(
        (n, a * factor, b * factor) for n, a, b in profile.optimizer_step
    )
    return dataclasses.replace(
        profile, name=name, aliases=(), peak_flops={d: r / factor for d, r in profile.peak_flops},
        memory_bandwidth=profile.memory_bandwidth / factor, op_overhead=profile.overhead() * factor,
        optimizer_step=steps, source=f"measured, then slowed {factor}x: {profile.source}",
    )  # fmt: skip


def emulation_supported() -> bool:
    """The runtime applies ``WHALE_EMULATE_SLOWDOWN`` (whale.runtime.emulate exists)."""
    return importlib.util.find_spec("whale.runtime.emulate") is not None


def _case(name: str, args, host, link: str, world: int):
    """(model, config) of one plan; the config's cluster is the measured host."""
    cfg = GPTConfig(
        n_layer=args.layers, n_embd=args.embd, n_head=args.heads, block_size=args.block
    )
    torch.manual_seed(0)
    model = GPT(cfg)
    cluster = parse_cluster(f"node0={world}x{host.name}({link})", profiles=[host])
    half = args.layers // 2
    if name == "data":
        return model, wh.Config(cluster=cluster)
    if name == "data-accum":
        return model, wh.Config(cluster=cluster, num_micro_batch=4)
    if name == "pipeline":
        return model, wh.Config(
            cluster=cluster, stage_boundaries=[f"blocks.{half}"], num_micro_batch=4
        )
    if name == "pipeline-gpipe":
        return model, wh.Config(
            cluster=cluster,
            stage_boundaries=[f"blocks.{half}"],
            num_micro_batch=4,
            schedule="gpipe",
        )
    if name == "tensor":
        wh.annotate(model, {f"blocks.{k}": wh.split() for k in range(args.layers)})
        return model, wh.Config(cluster=cluster)
    if name == "emulated-slow":
        slow = slowed(host, 2.0, "CPU-half")
        mixed = parse_cluster(
            f"node0=1x{host.name}+1x{slow.name}({link})", profiles=[host, slow]
        )
        return model, wh.Config(cluster=mixed)
    raise ValueError(f"unknown case {name!r}; use one of {list(CASES)}")


def _profile(world: int):
    """This host's profile, measured by every rank at once (as they share the host in training)."""
    host = measure_device(quick=True)
    gathered = [None] * world
    dist.all_gather_object(gathered, host)
    return gathered[0]  # one profile for the cluster: rank 0's (the ranks are alike)


def _predict(program, name: str, args, host, link: str, world: int, x) -> float:
    """The cost model's step time of the plan ``program`` runs, on a cluster of ``host``."""
    model, config = _case(name, args, host, link, world)
    captured = capture(model, (x,))
    profile = profile_model(
        captured, args.batch, boundaries=program.plan.stage_boundaries
    )
    return predict_plan(
        program.plan, profile, config.cluster, args.batch
    ).prediction.step_time


def _worker(rank: int, world: int, args, results) -> None:
    ring = measure_links()["all_reduce"]
    link = f"intra={ring.bandwidth / 1e9:.4g}GB/s,intra_lat={ring.latency * 1e6:.4g}us"
    host = _profile(world)
    cfg = GPTConfig(
        n_layer=args.layers, n_embd=args.embd, n_head=args.heads, block_size=args.block
    )
    corpus = SyntheticCorpus(cfg.vocab_size)
    x, y = corpus.batch(args.batch, cfg.block_size, 0)
    runs, hosts = {}, [host]
    for name in args.case or CASES:
        if name == "emulated-slow" and not emulation_supported():
            continue
        model, config = _case(name, args, host, link, world)
        if name == "emulated-slow":
            os.environ[_SLOWDOWN] = "1:2"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = wh.parallelize(
                    model, loss_fn=lm_loss, example_inputs=(x,), config=config
                )
        finally:
            os.environ.pop(_SLOWDOWN, None)
        opt = torch.optim.AdamW(program.parameters(), lr=1e-3)
        runs[name] = (program, opt, [], [program.predicted_step_time])
    for round_ in range(args.rounds):
        if round_:  # the host's load drifts: each round predicts from a fresh profile
            host = _profile(world)
            hosts.append(host)
            for name, (program, _, _, predicted) in runs.items():
                if rank == 0 and predicted[0] is not None:
                    predicted.append(
                        _predict(program, name, args, host, link, world, x)
                    )
        for program, opt, times, _ in runs.values():
            dist.barrier()
            for step in range(args.warmup + args.steps):
                start = time.perf_counter()
                program.step(x, y)
                opt.step()
                opt.zero_grad()
                if step >= args.warmup:
                    times.append(time.perf_counter() - start)
    if rank == 0:
        rows = [
            (
                n,
                None if p[0] is None else statistics.median(p),
                statistics.median(t),
                len(t),
            )
            for n, (_, _, t, p) in runs.items()
        ]
        plans = {n: p.plan.to_json() for n, (p, _, _, _) in runs.items()}
        results.put((hosts, ring, rows, plans))


def main() -> None:
    p = argparse.ArgumentParser(
        description="predicted vs measured step times on this host, 2 gloo ranks"
    )
    p.add_argument(
        "--case", choices=CASES, action="append", help="plans to run (default: all)"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument(
        "--record", help="write the profile, plans and measured times to this JSON file"
    )
    args = p.parse_args()
    start = time.perf_counter()
    hosts, ring, rows, plans = run_on_ranks(_worker, args, world=2, threads=1)
    host = hosts[-1]
    print(
        f"predicted vs measured step time, 2 gloo ranks x 1 thread, torch {torch.__version__}"
    )
    print(f"GPT {args.layers} layers x {args.embd} wide, {args.heads} heads, {args.block} tokens, "
          f"global batch {args.batch}; median of {args.rounds} rounds x {args.steps} steps")  # fmt: skip
    print(f"host profile: {host.peak('fp32') / 1e9:.0f} GFLOP/s fp32, {host.memory_bandwidth / 1e9:.1f} GB/s, "
          f"{host.overhead() * 1e6:.1f} us per op; all-reduce link {ring.describe()}")  # fmt: skip
    print(f"{'plan':16} {'predicted ms':>12} {'measured ms':>12} {'error':>8}")
    errors = []
    for name, predicted, measured, _ in rows:
        if predicted is None:
            print(f"{name:16} {'-':>12} {measured * 1e3:12.1f} {'-':>8}")
            continue
        error = predicted / measured - 1
        errors.append(abs(error))
        print(f"{name:16} {predicted * 1e3:12.1f} {measured * 1e3:12.1f} {error:+8.1%}")
    if not emulation_supported():
        print(f"emulated-slow: skipped, the runtime does not apply {_SLOWDOWN} yet")
    if errors:
        print(
            f"median |error| {statistics.median(errors):.1%} over {len(errors)} plans (goal <= 15%)"
        )
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.record:
        record = {
            "command": "python benchmarks/bench_predict.py " + " ".join(sys.argv[1:]),
            "model": {"n_layer": args.layers, "n_embd": args.embd, "n_head": args.heads, "block_size": args.block},
            "batch": args.batch, "profiles": [h.to_dict() for h in hosts], "link": [ring.bandwidth, ring.latency],
            "cases": {n: {"plan": json.loads(plans[n]), "measured": m, "predicted": pr} for n, pr, m, _ in rows},
        }  # fmt: skip
        with open(args.record, "w", encoding="utf-8") as file:
            json.dump(record, file, indent=1)
            file.write("\n")


if __name__ == "__main__":
    main()
