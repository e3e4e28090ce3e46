"""How the classes of graph nodes run inside a transformer block, for ``whale profile``.

A matmul timed alone in a loop runs with its operands in the caches and nothing between its
calls; inside a model it runs between layer norms, activations and views, on the outputs of
other operations, and its backward is not twice its forward. This module times a pre-norm
transformer block (layer norm, QKV linear, the head split views, causal
``scaled_dot_product_attention``, output projection, residual add, layer norm, MLP with GELU,
residual add) operation by operation, forward and backward, and states per class of node
(:data:`~whale.ir.profile_fields.OP_CLASSES`) the time measured against the base the cost model
computes: the roofline at the measured matmul efficiency (linear, attention), bytes over the
measured bandwidth (elementwise), half an operation's overhead (views). FLOPs and bytes of each
operation are counted as capture counts them (:mod:`whale.capture.costs`: every input read,
every fresh output written; views move nothing).

The backward of each operation is timed by gradient hooks on its outputs: the time from the
hook of an operation's output to the next hook is its backward. The pieces miss what lies
between them (starting the backward, the loss, the code between operations: on a CPU the block
run whole takes 2-13% longer than its pieces add up to), so every class's time is scaled by the
same ratio, measured in the same run: the classes keep their shares, and the block costs what
it takes when a model runs it.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable

from ..ir.profile_fields import OP_CLASSES

__all__ = ["block_seconds", "block_shape", "block_times", "class_factors"]


def block_shape(cuda: bool, quick: bool) -> tuple[int, int, int, int]:
    """``(batch, tokens, width, heads)`` of the probed block: a small model on a CPU, a
    GPT-2-medium-like block on a GPU (sizes where its kernels are not launch bound)."""
    if cuda:
        return (4, 512, 1024, 16) if quick else (8, 1024, 2048, 16)
    return (4, 128, 128, 4) if quick else (4, 256, 256, 8)


def _steps(b: int, t: int, w: int, h: int, size: int, device, dtype):
    """The block as ``(class, flops, bytes, fn(env) -> value, name)`` steps on ``env``."""
    import torch
    import torch.nn.functional as F

    def param(*shape):
        return torch.nn.Parameter(torch.randn(*shape, device=device, dtype=dtype) * 0.02)

    g1, b1, g2, b2 = param(w), param(w), param(w), param(w)
    wqkv, bqkv, wo, bo = param(3 * w, w), param(3 * w), param(w, w), param(w)
    wfc, bfc, wpr, bpr = param(4 * w, w), param(4 * w), param(w, 4 * w), param(w)
    act, d = b * t * w * size, w // h

    def linear(src, weight, bias, n_in, n_out):
        return ("linear", 2 * b * t * n_in * n_out, size * (b * t * (n_in + n_out) + n_out * (n_in + 1)),
                lambda e: F.linear(e[src], weight, bias))  # fmt: skip

    steps = [
        ("ln1", ("elementwise", 0, 2 * act + 2 * w * size, lambda e: F.layer_norm(e["x"], (w,), g1, b1))),
        ("qkv", linear("ln1", wqkv, bqkv, w, 3 * w)),
        ("split", ("view", 0, 0, lambda e: e["qkv"].split(w, dim=2))),
    ]
    for k, name in enumerate("qkv"):
        steps += [
            (f"{name}0", ("view", 0, 0, lambda e, k=k: e["split"][k])),
            (f"{name}1", ("view", 0, 0, lambda e, n=name: e[f"{n}0"].view(b, t, h, d))),
            (f"{name}2", ("view", 0, 0, lambda e, n=name: e[f"{n}1"].transpose(1, 2))),
        ]
    steps += [
        ("att", ("attention", 4 * b * t * t * w, 4 * act,
                 lambda e: F.scaled_dot_product_attention(e["q2"], e["k2"], e["v2"], is_causal=True))),
        ("att_t", ("view", 0, 0, lambda e: e["att"].transpose(1, 2))),
        ("att_r", ("elementwise", 0, 2 * act, lambda e: e["att_t"].reshape(b, t, w))),
        ("proj", linear("att_r", wo, bo, w, w)),
        ("x1", ("elementwise", 0, 3 * act, lambda e: e["x"] + e["proj"])),
        ("ln2", ("elementwise", 0, 2 * act + 2 * w * size, lambda e: F.layer_norm(e["x1"], (w,), g2, b2))),
        ("fc", linear("ln2", wfc, bfc, w, 4 * w)),
        ("gelu", ("elementwise", 0, 8 * act, lambda e: F.gelu(e["fc"]))),
        ("mlp", linear("gelu", wpr, bpr, 4 * w, w)),
        ("x2", ("elementwise", 0, 3 * act, lambda e: e["x1"] + e["mlp"])),
    ]  # fmt: skip
    return steps


def _run(steps, x, sync: Callable[[], None], clock) -> tuple[dict[str, float], dict[str, float]]:
    """One forward (each step timed alone) and backward (hook to hook) of the block, by class."""
    forward = dict.fromkeys(OP_CLASSES, 0.0)
    backward = dict.fromkeys(OP_CLASSES, 0.0)
    stamps: list[tuple[float, str]] = []

    def stamp(kind: str):
        def hook(grad):
            sync()
            stamps.append((clock(), kind))

        return hook

    env = {"x": x}
    for name, (kind, _, _, fn) in steps:
        sync()
        start = clock()
        out = fn(env)
        sync()
        forward[kind] += clock() - start
        env[name] = out
        if getattr(out, "requires_grad", False):
            out.register_hook(stamp(kind))
    loss = env[steps[-1][0]].sum()
    sync()
    loss.backward()
    sync()
    end = clock()
    stamps.append((end, ""))
    for (at, kind), (after, _) in itertools.pairwise(stamps):
        backward[kind] += after - at
    return forward, backward


def class_factors(
    device,
    sync: Callable[[], None],
    clock,
    *,
    shape: tuple[int, int, int, int],
    dtype,
    repeat: int,
    overhead: float,
    base: Callable[[float, float], float],
) -> dict[str, tuple[float, float]]:
    """``{class: (factor, backward / forward)}`` from ``repeat`` runs of the block.

    Args:
        shape: ``(batch, tokens, width, heads)`` (:func:`block_shape`).
        overhead: the measured seconds per operation (forward; the backward pays twice that).
        base: the cost model's time of one node from its ``(flops, bytes)`` (the roofline at the
            measured efficiency curve, peak rate and bandwidth), without the overhead.
    """
    import torch

    b, t, w, h = shape
    size = torch.tensor([], dtype=dtype).element_size()
    steps = _steps(b, t, w, h, size, device, dtype)
    x = torch.randn(b, t, w, device=device, dtype=dtype, requires_grad=True)
    _run(steps, x, sync, clock)  # warm-up
    _whole(steps, x, sync, clock)
    runs, whole = [], []
    for _ in range(repeat):  # interleaved: a drift of the device's pace weighs on both alike
        runs.append(_run(steps, x, sync, clock))
        whole.append(_whole(steps, x, sync, clock))
    # The pieces add up to less than the block run whole (module docstring): scale them to it.
    pieces = statistics.median(sum(f.values()) + sum(g.values()) for f, g in runs)
    scale = statistics.median(whole) / pieces if pieces > 0 else 1.0
    out = {}
    for kind in OP_CLASSES:
        members = [s for _, s in steps if s[0] == kind]
        weight = len(members) * (0.5 if kind == "view" else 1.0)  # ops; a view is half an op
        roof = sum(base(flops, moved) for _, flops, moved, _ in members)
        fwd = scale * statistics.median(f[kind] for f, _ in runs)  # as measure._timed
        bwd = scale * statistics.median(g[kind] for _, g in runs)
        if kind == "view":
            factor = (fwd + bwd) / (3 * overhead * weight) if overhead > 0 else 1.0
        else:
            factor = (fwd + bwd - 3 * overhead * weight) / (3 * roof) if roof > 0 else 1.0
        out[kind] = (_clamp(factor), _clamp(bwd / fwd if fwd > 0 else 2.0))
    return out


def _clamp(value: float) -> float:
    """Within what a profile file accepts (timer noise can make a tiny class look free)."""
    return float(min(1000.0, max(0.05, value)))


def block_seconds(device, clock, *, shape: tuple[int, int, int, int], dtype, repeat: int = 3) -> float:
    """Median ``clock`` seconds of one forward and backward of the probed block, run as a model
    runs it (no timing between operations): a reference workload whose time, measured again
    later, tells how fast the device runs the same work now (on a CPU shared with other jobs,
    its thread CPU time grows with what the other jobs do to its caches and cores).

    Example::

        before = block_seconds("cpu", time.thread_time, shape=block_shape(False, True), dtype=torch.float32)
    """
    return statistics.median(block_times(device, clock, shape=shape, dtype=dtype, repeat=repeat))


def block_times(device, clock, *, shape: tuple[int, int, int, int], dtype, repeat: int, sync=lambda: None) -> list[float]:
    """``clock`` seconds of each of ``repeat`` forwards and backwards of the probed block, run as
    a model runs it, after one untimed (``sync``: the device's, so a GPU's kernels are timed).

    Example::

        times = block_times("cpu", time.thread_time, shape=block_shape(False, True), dtype=torch.float32, repeat=5)
    """
    import torch

    b, t, w, h = shape
    size = torch.tensor([], dtype=dtype).element_size()
    steps = _steps(b, t, w, h, size, device, dtype)
    x = torch.randn(b, t, w, device=device, dtype=dtype, requires_grad=True)

    _whole(steps, x, sync, clock)
    return [_whole(steps, x, sync, clock) for _ in range(repeat)]


def _whole(steps, x, sync: Callable[[], None], clock) -> float:
    """``clock`` seconds of one forward and backward of the block as a model runs it: nothing
    timed or hooked between its operations."""
    start = clock()
    env = {"x": x}
    for name, (_, _, _, fn) in steps:
        env[name] = fn(env)
    env[steps[-1][0]].sum().backward()
    sync()
    return clock() - start
