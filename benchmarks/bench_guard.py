"""The cost of the per-step batch check (issue 16, item 4): the value checksum every rank
computes over the global batch, against a training step of the local model on that batch,
measured side by side in one run (alternating rounds, medians).

    python benchmarks/bench_guard.py            # CPU, 1 thread per process as the gloo tests
    python benchmarks/bench_guard.py --threads 4
    python benchmarks/bench_guard.py --device cuda

Prints, per batch: its size, the checksum's median time, the step's, and checksum / step.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.gpt import GPT, GPTConfig
from whale.runtime.guard.batch_check import BatchCheck, labelled


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _cases(device: torch.device, small: bool):
    """(name, model, inputs, target, loss) of typical steps: a GPT-2-small-like block stack on
    a batch of tokens, and a ResNet-like CNN on a batch of ImageNet-sized images."""
    scale = 4 if small else 1
    cfg = GPTConfig(vocab_size=8192, block_size=1024 // scale, n_layer=4, n_head=8, n_embd=512)
    gpt = GPT(cfg).to(device)
    tokens = torch.randint(0, cfg.vocab_size, (8, cfg.block_size), device=device)

    def lm(out, y):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    yield f"GPT tokens int64 {tuple(tokens.shape)}", gpt, tokens, tokens, lm
    cnn = _resnet_like().to(device)
    images = torch.randn(64 // scale, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (images.shape[0],), device=device)
    yield f"images float32 {tuple(images.shape)}", cnn, images, labels, F.cross_entropy
    if device.type == "cuda":
        half = images.bfloat16()
        yield f"images bfloat16 {tuple(half.shape)}", cnn.bfloat16(), half, labels, F.cross_entropy


def _resnet_like() -> nn.Module:
    """A ResNet-18-shaped stack (stem, four stages of two 3x3 convs, pooled classifier), without
    the skip connections: the step's cost, not its accuracy, is what is compared."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, stride=2, padding=3), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    width = 64
    for out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [nn.Conv2d(width, out, 3, stride=stride, padding=1), nn.BatchNorm2d(out), nn.ReLU(),
                   nn.Conv2d(out, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]  # fmt: skip
        width = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 1000))


def _time(fn, device, rounds) -> float:
    times = []
    for _ in range(rounds):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _check(x, y, device) -> None:
    c = BatchCheck(labelled((x,), {}, y), 0, local=False, values=True, device=device)
    c.world_digest.item()  # as the all-reduce would: the digest is computed


def _step(model, x, y, loss_fn) -> None:
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="quarter-size batches (a quick look)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, {args.threads} thread(s), median of {args.rounds} alternating rounds")
    print(f"{'batch':<40} {'MiB':>7} {'checksum':>10} {'step':>10} {'ratio':>8}")
    for name, model, x, y, loss_fn in _cases(device, args.small):
        check = functools.partial(_check, x, y, device)
        step = functools.partial(_step, model, x, y, loss_fn)
        check(), step()  # warm-up (the checksum's buffers, the allocator)
        sums, steps = [], []
        for _ in range(args.rounds):  # alternating, so load on a shared host hits both alike
            sums.append(_time(check, device, 1))
            steps.append(_time(step, device, 1))
        mib = sum(t.numel() * t.element_size() for t in (x, y)) / 2**20
        c, s = statistics.median(sums), statistics.median(steps)
        print(f"{name:<40} {mib:7.1f} {c * 1e3:8.2f}ms {s * 1e3:8.1f}ms {c / s:8.2%}")


if __name__ == "__main__":
    main()
