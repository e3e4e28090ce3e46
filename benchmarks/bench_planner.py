"""Planning time and plan quality of whale's auto-parallel search, on GPT shapes and mixed clusters.

Run::

    python benchmarks/bench_planner.py            # all cases (GPT-2 XL on 16, GPT-3 on 16 and
                                                  # 1,024, 13B on 128 and 512 GPUs), 3 runs each
    python benchmarks/bench_planner.py --runs 1 --case gpt3-1024
    python benchmarks/bench_planner.py --scaling --runs 3   # 16 to 4,096 GPUs, whole process too
    python benchmarks/bench_planner.py --oracle 200 --deep   # plan quality against brute force

Each case captures the model on the meta device (no weights are allocated; a 175B model needs
~0.3 GB of host memory), groups its graph into layers, and searches data, tensor and pipeline
degrees, layouts, stages, micro-batches, schedules and rows for the cluster. The same targets
work with the CLI::

    whale plan benchmarks/bench_planner.py:gpt3_175b --global-batch 1536 --dtype bf16 \\
        --cluster "$(python benchmarks/bench_planner.py --print-cluster gpt3-1024)" --explain

The reference point: AMP (Li et al., NeurIPS 2022) reports 200-500 s of planning on a CPU for
16 GPUs; Alpa's and Metis' searches take minutes to hours on larger clusters.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.gpt import GPT, GPTConfig
from whale.capture import capture
from whale.ir.cluster_spec import parse_cluster
from whale.planner.cost.model_profile import profile_model
from whale.planner.cost.predict import CostOptions
from whale.planner.search.auto import search
from whale.planner.search.explore import Explorer, NoPlanError, SearchSettings, describe
from whale.planner.search.pins import Pins


def _gpt_on_meta(layers: int, hidden: int, heads: int, seq: int, vocab: int = 50257):
    cfg = GPTConfig(vocab_size=vocab, block_size=seq, n_layer=layers, n_head=heads, n_embd=hidden)
    with torch.device("meta"):
        model = GPT(cfg)
    return model, (torch.zeros(1, seq, dtype=torch.long, device="meta"),)


def gpt3_175b():
    """GPT-3 175B (Brown et al. 2020, Table 2.1): 96 layers, d_model 12288, 96 heads, 2048 tokens."""
    return _gpt_on_meta(96, 12288, 96, 2048)


def gpt2_xl():
    """GPT-2 XL, 1.5B (Radford et al. 2019): 48 layers, d_model 1600, 25 heads, 1024 tokens."""
    return _gpt_on_meta(48, 1600, 25, 1024)


def gpt_13b():
    """A 13B GPT shape (GPT-3 13B, Brown et al. 2020, Table 2.1): 40 layers, d_model 5120, 40 heads, 2048 tokens."""
    return _gpt_on_meta(40, 5120, 40, 2048)


def _nodes(prefix: str, count: int, device: str, per_node: int = 8) -> list[str]:
    return [f"{prefix}{k}={per_node}x{device}" for k in range(count // per_node)]


def three_types(devices: int) -> str:
    """``devices`` GPUs of three types: half A100-80GB, a quarter V100-32GB, a quarter A10 (24 GB,
    PCIe), in nodes of 8 (smaller when a type has fewer)."""
    parts = []
    for prefix, count, device in (("a", devices // 2, "A100-80GB"), ("v", devices // 4, "V100-32GB"),
                                  ("g", devices // 4, "A10")):  # fmt: skip
        parts += _nodes(prefix, count, device, min(8, count))
    return ",".join(parts)


SCALING = (16, 64, 256, 1024, 4096)
CLUSTERS = {
    # 1,024 GPUs of three types: 512 A100-80GB, 256 V100-32GB, 256 A10 (24 GB, PCIe).
    "gpt3-1024": three_types(1024),
    "16": "a0=8xA100-80GB,v0=8xV100-32GB",
    **{f"mixed-{n}": three_types(n) for n in (*SCALING, 128, 512)},
}
CASES = {
    "gpt3-1024": (gpt3_175b, "gpt3-1024", 1536),
    "gpt3-16": (gpt3_175b, "16", 1536),
    "gpt2xl-16": (gpt2_xl, "16", 512),
    "13b-128": (gpt_13b, "mixed-128", 1024),
    "13b-512": (gpt_13b, "mixed-512", 1024),
    **{f"gpt3-mixed-{n}": (gpt3_175b, f"mixed-{n}", 1536) for n in SCALING},
}


def scaling(runs: int, sizes=SCALING) -> None:
    """How planning time grows with the cluster: GPT-3 175B, batch 1536, three GPU types.

    Per size: the whole ``whale plan`` process (median of ``runs``, wall and CPU seconds (user +
    system), the CPU time being what a loaded host does not inflate; Python and torch start-up,
    building the model on meta, capture, layer grouping, search and report; tensor parallelism
    only as a pinned what-if, as the CLI does for a model without ``split()``), and in this
    process the search alone with tensor parallelism allowed (the model captured once): its
    time, the structures enumerated, those the memory floor dropped and those screened.
    """
    import subprocess

    options = CostOptions(dtype="bf16", precision="mixed", optimizer="adamw")
    model, inputs = gpt3_175b()
    profile = profile_model(capture(model, inputs), 1)
    del model
    target = f"{os.path.abspath(__file__)}:gpt3_175b"
    print(f"planner scaling on {os.cpu_count()} CPUs, torch {torch.__version__}: GPT-3 175B, batch 1536, "
          f"half A100-80GB, a quarter V100-32GB, a quarter A10; median of {runs} run(s)")  # fmt: skip
    print(f"{'GPUs':>5} {'whale plan s':>12} {'cpu s':>6}  {'answer (CLI, no TP)':<34} {'search s':>8} {'cpu s':>6} {'structs':>7} "
          f"{'dropped':>7} {'screened':>8}  answer (search, TP allowed)")  # fmt: skip
    for n in sizes:
        spec = three_types(n)
        walls, cpus_cli, said = [], [], ""
        for _ in range(runs):
            start, child = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            done = subprocess.run(
                [sys.executable, "-m", "whale.cli", "plan", target, "--global-batch", "1536", "--dtype", "bf16",
                 "--cluster", spec], capture_output=True, text=True, check=False,
            )  # fmt: skip
            walls.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus_cli.append(after.ru_utime + after.ru_stime - child.ru_utime - child.ru_stime)
            said = "does not fit" if "fits on no plan" in done.stderr else "a plan" if done.returncode == 0 else (
                f"error {done.returncode}: {done.stderr.strip().splitlines()[-1][:60] if done.stderr.strip() else ''}")
        cluster = parse_cluster(spec)
        times, cpus, result, error = [], [], None, None
        for _ in range(runs):
            start, cpu = time.perf_counter(), time.process_time()
            explorer = Explorer(profile, cluster, 1536, options, Pins(), SearchSettings())
            try:
                result = explorer.run()
            except NoPlanError as err:
                result, error = None, str(err)
            times.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
        dropped = len(explorer.pruned)
        if result is not None:
            answer = f"{describe(result.best.candidate, cluster)} -> {result.best.prediction.step_time:.3g} s"
            counts = f"{result.num_structures + dropped:>7} {dropped:>7} {result.num_screened:>8}"
        else:
            answer = "does not fit: " + error.split("which has")[0].split("the closest (")[-1][:90]
            counts = f"{dropped:>7} {dropped:>7} {'0':>8}"
        print(f"{n:>5} {statistics.median(walls):>12.2f} {statistics.median(cpus_cli):>6.2f}  {said:<34} {statistics.median(times):>8.2f} "
              f"{statistics.median(cpus):>6.2f} {counts}  {answer}")  # fmt: skip


def run_case(name: str, runs: int) -> dict:
    target, cluster_name, batch = CASES[name]
    cluster = parse_cluster(CLUSTERS[cluster_name])
    options = CostOptions(dtype="bf16", precision="mixed", optimizer="adamw")
    times, result, error = [], None, None
    for _ in range(runs):
        start = time.perf_counter()
        model, inputs = target()
        captured = capture(model, inputs)
        captured_at = time.perf_counter()
        profile = profile_model(captured, 1)
        profiled_at = time.perf_counter()
        cpu = time.process_time()
        try:
            result = search(profile, cluster, batch, options=options)
        except NoPlanError as err:
            error = str(err)
        done, cpu = time.perf_counter(), time.process_time() - cpu
        times.append((done - start, captured_at - start, profiled_at - captured_at, done - profiled_at, cpu))
        del model, captured  # one model at a time: a 175B graph is ~0.3 GB of host memory
    total, cap, prof, srch, cpu = (statistics.median(t[i] for t in times) for i in range(5))
    return {
        "case": name, "devices": cluster.world_size, "batch": batch, "layers": profile.num_layers,
        "total": total, "capture": cap, "profile": prof, "search": srch, "search_cpu": cpu,
        "result": result, "error": error, "cluster": cluster,
    }  # fmt: skip


def _draw_instance(rnd, layers: tuple[int, int], max_devices: int, max_batch: int):
    """(cluster spec, batch, per-layer values) as ``tests/test_search.py``'s strategy draws them."""
    from tests.test_search import DEVICES

    a_type, b_type = rnd.sample(DEVICES, 2)
    a = rnd.randint(1, max_devices - 1)
    b = rnd.randint(1, max_devices - a)
    values = [
        (rnd.uniform(1e9, 2e12), rnd.randint(1, 6) * 2**30 // rnd.choice([2, 8, 32]),
         rnd.uniform(1e6, 4e9), rnd.uniform(0, 1e9), rnd.uniform(1e5, 1e8))
        for _ in range(rnd.randint(*layers))
    ]  # fmt: skip
    return f"{a}x{a_type},{b}x{b_type}", rnd.randint(1, max_batch), values


def oracle(count: int, seed: int, layers=(2, 5), max_devices: int = 8, max_batch: int = 10) -> None:
    """Plan quality against brute force on random instances (the tests' oracle and space).

    Instances: 2 device types, 2 to ``max_devices`` devices, ``layers`` layers (a range), batch
    1 to ``max_batch``, drawn as the hypothesis strategy of ``tests/test_search.py`` draws them
    (the defaults); ``--deep`` draws 8-12 layers on up to 4 devices with batches up to 16, the
    depths where the search cuts layers by balancing instead of trying every cut. Instances
    more than 2% off print in the form ``tests/test_search_deep.py`` lists them.
    """
    import math
    import random

    from tests.plan_oracle import brute_force
    from tests.test_search import _instance

    rnd = random.Random(seed)
    ratios, oracle_s, search_s, infeasible = [], 0.0, 0.0, 0
    for k in range(count):
        spec, batch, values = _draw_instance(rnd, layers, max_devices, max_batch)
        cluster, profile, batch = _instance(spec, batch, values)
        start = time.perf_counter()
        best, _ = brute_force(profile, cluster, batch)
        mid = time.perf_counter()
        try:
            found = search(profile, cluster, batch).best.prediction.step_time
        except ValueError:
            found = math.inf
        oracle_s += mid - start
        search_s += time.perf_counter() - mid
        if best == math.inf:
            infeasible += 1
            assert found == math.inf
        else:
            ratios.append(found / best)
            if found > best * 1.02:
                print(f"  #{k} above 2%: {found:.4g} s vs {best:.4g} s: _instance({spec!r}, {batch}, {values})")
    within = sum(r <= 1.02 for r in ratios)
    print(f"oracle: {count} random instances (seed {seed}, {layers[0]}-{layers[1]} layers, up to {max_devices} "
          f"devices, batch up to {max_batch}), {len(ratios)} with a plan that fits, {infeasible} where nothing "
          "fits (the search agreed on all of those)")  # fmt: skip
    print(f"planner / brute-force optimum: worst {max(ratios):.4f}, mean {statistics.mean(ratios):.5f}, "
          f"exact on {sum(r <= 1 + 1e-9 for r in ratios)}, within 2% on {within} of {len(ratios)}")  # fmt: skip
    print(f"time: brute force {oracle_s:.1f} s, planner {search_s:.1f} s in all")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--print-cluster", choices=sorted(CLUSTERS))
    parser.add_argument("--oracle", type=int, default=0, metavar="N", help="N random instances vs brute force")
    parser.add_argument("--scaling", action="store_true", help="planning time of GPT-3 175B on 16 to 4,096 GPUs")
    parser.add_argument("--sizes", default=None, help="--scaling: GPU counts, e.g. 16,64 (default 16,64,256,1024,4096)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deep", action="store_true", help="oracle instances of 8-12 layers, <= 4 devices, batch <= 16")
    parser.add_argument("--layers", default=None, metavar="LO-HI", help="oracle: layers per instance (default 2-5)")
    parser.add_argument("--max-devices", type=int, default=None, help="oracle: most devices (default 8)")
    parser.add_argument("--max-batch", type=int, default=None, help="oracle: largest batch (default 10)")
    args = parser.parse_args(argv)
    if args.print_cluster:
        print(CLUSTERS[args.print_cluster])
        return
    if args.oracle:
        layers = args.layers or ("8-12" if args.deep else "2-5")
        lo, _, hi = layers.partition("-")
        if not (lo.isdigit() and (hi or lo).isdigit() and 2 <= int(lo) <= int(hi or lo)):
            parser.error(f"--layers {layers!r}: give a range of at least 2 layers, e.g. 8-12")
        devices = args.max_devices or (4 if args.deep else 8)
        if devices < 2:
            parser.error(f"--max-devices {devices}: instances have two device types, so at least 2")
        oracle(args.oracle, args.seed, (int(lo), int(hi or lo)), devices, args.max_batch or (16 if args.deep else 10))
        return
    torch.set_num_threads(1)
    if args.scaling:
        sizes = tuple(int(x) for x in args.sizes.split(",")) if args.sizes else SCALING
        if any(x < 8 or x % 8 for x in sizes):
            parser.error(f"--sizes {args.sizes!r}: give multiples of 8 GPUs (a quarter of them are A10)")
        scaling(args.runs, sizes)
        return
    print(f"planner benchmark on {os.cpu_count()} CPUs, torch {torch.__version__}, median of {args.runs} run(s)")
    print(f"{'case':<10} {'devices':>7} {'layers':>6} {'total s':>8} {'capture':>8} {'layers s':>8} "
          f"{'search':>7} {'cpu s':>7} {'structs':>8} {'screened':>8}  plan -> predicted step")  # fmt: skip
    for name in args.case or ["gpt2xl-16", "gpt3-16", "gpt3-1024", "13b-128", "13b-512"]:
        r = run_case(name, args.runs)
        res = r["result"]
        if res is not None:
            pred = res.best.prediction
            plan = f"{describe(res.best.candidate, r['cluster'])} -> {pred.step_time:.3g} s, bubble {pred.bubble:.1%}"
            counts = f"{res.num_structures:>8} {res.num_screened:>8}"
        else:
            plan, counts = f"no plan fits: {r['error'][:160]}...", f"{'-':>8} {'-':>8}"
        print(f"{name:<10} {r['devices']:>7} {r['layers']:>6} {r['total']:>8.2f} {r['capture']:>8.2f} "
              f"{r['profile']:>8.2f} {r['search']:>7.2f} {r['search_cpu']:>7.2f} {counts}  {plan}")  # fmt: skip
        if res is not None:
            for alt in res.alternatives[:3]:
                print(f"{'':<10} runner-up: {describe(alt.candidate, r['cluster'])} -> {alt.prediction.step_time:.3g} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak host memory {peak:.0f} MiB")


if __name__ == "__main__":
    main()
