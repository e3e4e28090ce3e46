"""A pipelined GPT step, simulated against measured: a Chrome trace and a picture.

Run from the repository root on 2 CPU processes (the picture needs ``pip install 'whale[plot]'``)::

    torchrun --nproc_per_node=2 examples/pipeline_timeline.py --out step
    torchrun --nproc_per_node=2 examples/pipeline_timeline.py --out docs/timeline \\
        --profile tests/data/predict_host.json

The GPT of ``examples/gpt.py`` (4 blocks, d_model 128, 64 positions) in 2 stages (``blocks.2``),
1F1B over 4 micro-batches, global batch 16, one torch thread per rank; after 5 steps the 6th
step's timeline. ``STEP.json`` holds the cost model's simulated step (``model.predicted_timeline``)
and the measured one (``model.timeline()``) as one Chrome trace (open it in ui.perfetto.dev or
chrome://tracing); ``STEP.png`` draws them on one time axis.

Without ``--profile`` the prediction uses this host's datasheet profile. With a profile file
(``whale profile --out FILE``, or the one ``benchmarks/bench_predict.py --record`` writes) the
cluster is that device at the share of a core each rank gets now (other jobs may share the host;
``measure.cpu_share``), as ``bench_predict`` predicts each run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import whale as wh
from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss
from whale.ir.cluster_spec import parse_cluster
from whale.ir.devices import DeviceProfile
from whale.ir.trace import save_chrome_trace
from whale.planner.measure import cpu_share, slowed


def _cluster(path: str, world: int):
    """The profile in ``path`` at the core share the ranks get now, ``world`` of it on one node."""
    with open(path, encoding="utf-8") as file:
        record = json.load(file)
    host = DeviceProfile.from_dict(record.get("profile", record), where=path)
    shares = [None] * world
    dist.all_gather_object(shares, cpu_share())
    host = slowed(host, world / sum(shares))
    link = ""
    if "link" in record:
        bandwidth, latency = record["link"]
        link = f"(intra={bandwidth / 1e9:.4g}GB/s,intra_lat={latency * 1e6:.4g}us)"
    return parse_cluster(f"node0={world}x{host.name}{link}", profiles=[host])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="step", help="writes OUT.json (Chrome trace) and OUT.png")
    parser.add_argument("--profile", default=None, help="a device profile file to predict with")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = wh.init()
    torch.manual_seed(0)
    cluster = _cluster(args.profile, info.world_size) if args.profile else None
    cfg = GPTConfig()
    corpus = SyntheticCorpus(cfg.vocab_size)
    x, y = corpus.batch(16, cfg.block_size, step=0)
    config = wh.Config(num_micro_batch=4, stage_boundaries=["blocks.2"], schedule="1f1b", cluster=cluster)
    model = wh.parallelize(GPT(cfg), loss_fn=lm_loss, example_inputs=(x,), config=config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(args.steps):
        x, y = corpus.batch(16, cfg.block_size, step)
        model.step(x, y)
        opt.step()
        opt.zero_grad()
    measured = model.timeline()  # a collective: every rank calls it
    report = model.timing_report()
    if info.rank == 0:
        timelines = [t for t in (model.predicted_timeline, measured) if t is not None]
        save_chrome_trace(f"{args.out}.json", *timelines)
        print(f"{args.out}.json: {', '.join(t.source for t in timelines)} step as a Chrome trace")
        try:
            from whale.plot import draw_timelines

            print(draw_timelines(f"{args.out}.png", *timelines))
        except ImportError as err:
            print(f"no picture: {err}")
        print(report)


if __name__ == "__main__":
    main()
