"""``whale profile``: measure the devices at hand into a profile the planner uses instead of datasheets.

On every rank: the dense matrix-multiply rate per dtype (``32 n^3`` FLOPs per ``4n x n`` by
``n x 4n`` product, a transformer's linear layer) over a range of sizes, which gives the efficiency curve by operation size; the cost of one graph
operation (dispatch, launch); the memory bandwidth (a copy of a buffer several times the
last-level cache reads and writes every byte); one optimizer step per tensor and per parameter;
how each class of graph node (linear, attention, elementwise, view) runs in a transformer block
against that base (:mod:`.class_probe`). Under ``torchrun`` with more
than one rank, also the all-reduce and point-to-point links (:mod:`.link_probe`). Rank 0 writes:

* a profile file (:func:`~whale.ir.device_catalog.load_profiles` format); its ``source`` starts with
  ``measured``, and the cost model uses its curve, overhead and optimizer costs;
* with ``--cluster-out``, a cluster file (:func:`~.cluster.load_cluster`) with the measured
  intra-node link and network, for ``whale plan --cluster @cluster.json``.

Example::

    torchrun --nproc_per_node=8 -m whale.cli profile --out a100.json --cluster-out here.json
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import os
import socket
import statistics
import time
from collections.abc import Callable, Sequence

from ..ir.device_catalog import get_profile
from ..ir.devices import DeviceProfile
from ..ir.emulation import slowdown_factor, slowdown_from_env
from ..ir.profile_fields import jitter_of
from .class_probe import block_shape, block_times, class_factors

__all__ = [
    "cpu_share", "emulated", "matmul_curve", "measure_device", "run_queue_clock", "run_queue_share", "slowed",
]  # fmt: skip

_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _timed(
    fn: Callable[[], object],
    sync: Callable[[], None],
    repeat: int,
    clock: Callable[[], float] = time.perf_counter,
    before: Callable[[], None] | None = None,
    mean: bool = False,
) -> float:
    """Median time of ``repeat`` runs after one warm-up, by ``clock`` (wall time, or this
    thread's CPU time where other processes share the cores; see :func:`measure_device`), each
    run (the warm-up too) right after an untimed ``before()`` where given. The median, not the
    least: ranks profile at once, as they train, and the fastest runs would be those the other
    ranks happened to leave the shared caches and sibling cores alone. ``mean``: the mean
    instead, for what a step repeats many times and pays in sum (collectives, whose times
    are skewed by rare waits several times the median)."""
    times = []
    for k in range(repeat + 1):
        if before is not None:
            before()
        start = clock()
        fn()
        sync()
        if k:
            times.append(clock() - start)
    return statistics.fmean(times) if mean else statistics.median(times)


def _cache_bytes() -> int:
    """The largest CPU cache (the last level) from sysfs; 0 where it cannot be read."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path, encoding="ascii") as file:
                text = file.read().strip().upper()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=0)


def _copy_bytes(cuda: bool, quick: bool, cache: int) -> int:
    """Bytes of the buffer the bandwidth copy moves: well over the last-level cache, so the rate
    is the memory's (a copy inside the cache measures the cache)."""
    floor = (256 if quick else 1024) << 20 if cuda else (128 if quick else 256) << 20
    return max(floor, (2 if quick else 4) * cache)


def _bandwidth(numel: int, device, sync, repeat: int, clock) -> float:
    """Bytes/s of a copy of ``numel`` fp32 values: it reads and writes each byte once."""
    import torch

    src = torch.ones(numel, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * numel * 4 / _timed(lambda: dst.copy_(src), sync, repeat, clock)


def matmul_curve(sizes, dtype, device, sync, repeat, clock) -> tuple[float, tuple[tuple[float, float], ...]]:
    """Peak FLOP/s and efficiency by size from matmuls as a transformer's linear layers run them
    (``F.linear`` of ``4n`` tokens of width ``n`` by a ``(4n, n)`` weight: ``32 n^3`` FLOPs; the
    transposed weight and the narrow inner dimension run below a square ``a @ b`` of the same
    FLOPs, on CPUs by half): each size's rate with the fixed cost of the call taken out, over
    the best of them; shares made non-decreasing.

    The fixed cost is the same call on 1 x 1 operands (dispatch, launch), measured here: the
    per-operation overhead of a graph node (:func:`_op_overhead`, several times larger: it
    holds autograd's recording and the backward's share) taken out of a plain call leaves
    the small sizes nearly free and set a peak up to twice the rate any size reached."""
    import torch

    one = torch.ones(1, 1, device=device, dtype=dtype)
    fixed = _timed(lambda: torch.nn.functional.linear(one, one), sync, max(repeat, 10), clock)
    # Sizes in turn, ``repeat`` rounds after a warm-up one, so that a change of the host's pace
    # (a shared host's cores change it every ~0.1 s by up to a third) falls on every size alike
    # and bends no part of the curve. On a CPU a small size calls the multiply several times a
    # sample, for an eighth of the largest size's FLOPs (one call of a few microseconds is
    # mostly noise); a GPU's calls stay one per sample, each synchronised as ``fixed``'s are
    # (back to back, launches would overlap the kernels, and the fixed cost no longer apply).
    cuda = str(device).startswith("cuda")
    operands = [(torch.randn(4 * n, n, device=device, dtype=dtype),  # tokens x width
                 torch.randn(4 * n, n, device=device, dtype=dtype),  # nn.Linear's (out, in) layout
                 1 if cuda else max(1, (max(sizes) // n) ** 3 // 8)) for n in sizes]  # fmt: skip
    times: list[list[float]] = [[] for _ in sizes]
    for round_ in range(repeat + 1):
        for k, (a, w, calls) in enumerate(operands):
            start = clock()
            for _ in range(calls):
                torch.nn.functional.linear(a, w)
            sync()
            if round_:
                times[k].append((clock() - start) / calls)
    rates = []
    for n, taken in zip(sizes, times, strict=True):
        seconds = statistics.median(taken)
        rates.append((32.0 * n**3, 32.0 * n**3 / max(seconds - fixed, seconds / 2)))
    peak = max(rate for _, rate in rates)
    curve, best = [], 0.0
    for flops, rate in rates:
        best = max(best, rate / peak)  # noise must not make a larger matmul look slower
        curve.append((flops, round(best, 4)))
    return peak, tuple(curve)


def _op_overhead(device, sync, repeat: int, clock) -> float:
    """Seconds per operation of a forward and its backward on tiny tensors, per forward-op
    third: the cost model charges a node ``overhead`` forward and twice that backward. The ops
    are a transformer block's mix (linear, gelu, layer norm, residual add)."""
    import torch
    import torch.nn.functional as F

    width, blocks = 8, 16
    x = torch.ones(1, width, device=device, requires_grad=True)
    w = torch.randn(width, width, device=device, requires_grad=True)
    b = torch.zeros(width, device=device, requires_grad=True)
    g = torch.ones(width, device=device, requires_grad=True)

    def chain() -> None:
        y = x
        for _ in range(blocks):
            h = F.layer_norm(F.gelu(F.linear(y, w, b)), (width,), g, b)
            y = y + h
        y.sum().backward()

    return _timed(chain, sync, repeat, clock) / (3 * 4 * blocks)


def _optimizer_steps(device, sync, quick: bool, repeat: int, clock, cuda: bool) -> dict[str, tuple[float, float]]:
    """Per optimizer: seconds per parameter tensor and per parameter of one ``torch.optim`` step
    on fp32 parameters (defaults: what a user gets, e.g. AdamW's foreach kernels on CUDA and its
    per-tensor loop on a CPU), fitted over three sets of tensors: one large tensor, a few
    medium ones and many small ones, sized like a model's on the device (a CPU model's states
    mostly stay in the caches, a GPU model's are streamed from memory)."""
    import torch

    big = 1 << ((22 if quick else 24) if cuda else (20 if quick else 21))
    sets = ((1, big), (8, big // 8), (64 if quick else 256, 1 << 12))
    makers = {
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-3),
        "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
    }
    out = {}
    for name, make in makers.items():
        samples = []
        for tensors, numel in sets:
            params = [torch.nn.Parameter(torch.zeros(numel, device=device)) for _ in range(tensors)]
            for p in params:
                p.grad = torch.full_like(p, 1e-3)
            opt = make(params)
            samples.append((tensors, tensors * numel, _timed(opt.step, sync, repeat, clock)))
            del opt, params
        out[name] = _fit_per_tensor_and_param(samples)
    return out


def _fit_per_tensor_and_param(samples: Sequence[tuple[int, int, float]]) -> tuple[float, float]:
    """Least squares ``t = a * tensors + b * params`` (no intercept), with ``a, b >= 0``.

    Example::

        >>> a, b = _fit_per_tensor_and_param([(1, 1000, 2e-5 + 1e-6), (10, 1000, 2e-4 + 1e-6)])
        >>> round(a * 1e6, 6), round(b * 1e9, 6)   # 20 us per tensor, 1 ns per parameter
        (20.0, 1.0)
    """
    import numpy as np

    rows = np.array([[k, n] for k, n, _ in samples], dtype=float)
    times = np.array([t for _, _, t in samples], dtype=float)
    scale = rows.max(axis=0)  # tensors and parameters differ by orders of magnitude
    coef, *_ = np.linalg.lstsq(rows / scale, times, rcond=None)
    a, b = coef / scale
    if a < 0 or b < 0:  # noise: keep the one term the samples support
        a, b = (0.0, max(0.0, float(times @ rows[:, 1] / (rows[:, 1] @ rows[:, 1])))) if a < 0 else \
            (max(0.0, float(times @ rows[:, 0] / (rows[:, 0] @ rows[:, 0]))), 0.0)  # fmt: skip
    return float(a), float(b)


def _classes(device, sync, clock, cuda, quick, repeat, overhead, rates, curve, bandwidth) -> dict[str, tuple[float, float]]:
    """The operation classes of a transformer block against the base the cost model computes
    from the rates, curve and bandwidth just measured (:func:`.class_probe.class_factors`)."""
    import math

    import numpy as np
    import torch

    name = "bf16" if cuda and "bf16" in rates else "fp32"
    dtype = getattr(torch, _TORCH_DTYPES[name])
    sizes, shares = np.log([x for x, _ in curve]), np.array([e for _, e in curve])

    def base(flops: float, moved: float) -> float:
        share = float(np.interp(math.log(max(flops, 1.0)), sizes, shares))
        return max(flops / (rates[name] * share), moved / bandwidth)

    return class_factors(device, sync, clock, shape=block_shape(cuda, quick), dtype=dtype,
                         repeat=max(15, 2 * repeat), overhead=overhead, base=base)  # fmt: skip


def slowed(profile: DeviceProfile, factor: float, name: str | None = None) -> DeviceProfile:
    """``profile`` as a device ``factor`` times slower: rates and bandwidth divided by ``factor``,
    per-operation and optimizer costs multiplied (an emulated slow rank, or a shared core).

    Example::

        half = slowed(get_profile("cpu"), 2.0, name="CPU-half")
    """
    if not factor > 0:
        raise ValueError(f"slowed(factor={factor!r}) must be > 0")
    steps = profile.optimizer_step and tuple((n, a * factor, b * factor) for n, a, b in profile.optimizer_step)
    return dataclasses.replace(
        profile, name=name or profile.name, aliases=() if name else profile.aliases,
        peak_flops={d: r / factor for d, r in profile.peak_flops},
        memory_bandwidth=profile.memory_bandwidth / factor, op_overhead=profile.overhead() * factor,
        optimizer_step=steps, source=profile.source if factor == 1 else f"{profile.source}; slowed {factor:.3g}x",
    )  # fmt: skip


def cpu_share(seconds: float = 1.0) -> float:
    """The share of one core this process gets now: CPU time over wall time of ``seconds`` of
    single-threaded work (small matmuls), after a quarter of that to settle (a process that
    just woke up is first given more than its share). 1.0 on an idle core.

    Example::

        profile = measure_device(quick=True, share=1.0)   # the core's own rates
        loaded = slowed(profile, 1 / cpu_share())         # as the job sees them now
    """
    import torch

    a = torch.randn(128, 128)
    settle = time.perf_counter() + seconds / 4
    while time.perf_counter() < settle:
        a = torch.tanh(a @ a)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds:
        for _ in range(20):
            a = torch.tanh(a @ a)
    return min(1.0, max(0.05, (time.process_time() - cpu0) / (time.perf_counter() - wall0)))


def run_queue_clock() -> tuple[float, float] | None:
    """``(seconds on a CPU, seconds waiting for one)`` of this thread so far, from the kernel's
    scheduler statistics (``/proc/thread-self/schedstat``); None where the system has none.

    Over an interval, ``on / (on + waiting)`` is the share of a core the thread got while it
    could run: unlike CPU time over wall time, it does not count the time the thread slept or
    waited for a message (a pipeline's bubble), only the time other jobs held the core.

    Example::

        before = run_queue_clock()
        train_some_steps()
        share = run_queue_share(before, run_queue_clock())
    """
    try:
        with open("/proc/thread-self/schedstat", encoding="ascii") as file:
            on, waiting, _ = file.read().split()
    except (OSError, ValueError):
        return None
    return int(on) / 1e9, int(waiting) / 1e9


def run_queue_share(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    """The share of a core between two :func:`run_queue_clock` readings (None if either is)."""
    if before is None or after is None:
        return None
    on, waiting = after[0] - before[0], after[1] - before[1]
    return min(1.0, max(0.05, on / (on + waiting))) if on > 0 else None


def measure_device(*, quick: bool = False, device: str | None = None, share: float | None = None) -> DeviceProfile:
    """Measure this process's device into a profile.

    * matmul FLOP/s per dtype (the best rate over a range of sizes) and, in the widest
      compute dtype, the efficiency curve: each size's rate over the best;
    * the cost of one operation (forward and backward of tiny tensors, per forward op);
    * memory bandwidth: a copy of a buffer several times the last-level cache;
    * one optimizer step (AdamW, SGD, SGD with momentum) per tensor and per parameter;
    * per class of graph node, its time in a transformer block, forward and backward, over the
      base the cost model computes from the above (:func:`.class_probe.class_factors`);
    * the spread of a transformer block's time at the start, middle and end (``jitter``).

    The run uses this process's torch threads: measure under the same settings (``torchrun``
    ranks on one host share its cores) as the training job.

    Args:
        quick: small sizes (seconds on a CPU), for tests and a first look.
        device: ``"cuda"`` or ``"cpu"``; None: CUDA if available.
        share: on a single-threaded CPU process, the share of a core to scale the CPU-time rates
            by (1.0: the core alone); None: the share measured over the measurement.

    Example::

        profile = measure_device(quick=True)
        profile.peak("fp32"), profile.memory_bandwidth, profile.overhead()
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    repeat = 3 if quick else 10
    # A CPU shared with other processes: time this thread's CPU (what the device does while it
    # runs), then scale by the share of wall time the process got over the whole measurement.
    shared = not cuda and torch.get_num_threads() == 1
    clock = time.thread_time if shared else time.perf_counter
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if cuda:
        sizes = (128, 256, 512, 1024) if quick else (128, 256, 512, 1024, 2048, 4096)
    else:
        sizes = (16, 32, 64, 128, 256) if quick else (16, 32, 64, 128, 256, 512, 768)
    # The same block at the start, the middle and the end: how its time varies (``jitter``).
    blocks = lambda: block_times(device, clock, shape=block_shape(cuda, True), dtype=torch.float32, repeat=5, sync=sync)
    runs = blocks()
    overhead = _op_overhead(device, sync, repeat * 3, clock)
    rates, curve = {}, ()
    for name, dtype_name in _TORCH_DTYPES.items():
        if not cuda and name != "fp32":
            continue  # CPU half matmuls are emulated; the planner falls back to fp32 there
        dtype = getattr(torch, dtype_name)
        rates[name], points = matmul_curve(sizes, dtype, device, sync, repeat, clock)
        if name == "fp32" or (cuda and name == "bf16"):
            curve = points  # the curve of the dtype large models train in
    if cuda and hasattr(torch.backends.cuda.matmul, "allow_tf32"):
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        rates["tf32"], _ = matmul_curve(sizes[-1:], torch.float32, device, sync, repeat, clock)
        torch.backends.cuda.matmul.allow_tf32 = previous
    cache = 0 if cuda else _cache_bytes()
    if cuda:
        cache = int(getattr(torch.cuda.get_device_properties(torch.device(device)), "L2_cache_size", 0))
    numel = _copy_bytes(cuda, quick, cache) // 4
    runs += blocks()
    bandwidth = _bandwidth(numel, device, sync, 3 if quick else 5, clock)
    steps = _optimizer_steps(device, sync, quick, repeat, clock, cuda)
    classes = _classes(device, sync, clock, cuda, quick, repeat, overhead, rates, curve, bandwidth)
    runs += blocks()
    if not shared:
        share = 1.0
    elif share is None:
        share = min(1.0, max(0.05, (time.process_time() - cpu0) / (time.perf_counter() - wall0)))
    if shared:
        rates = {k: r * share for k, r in rates.items()}
        bandwidth, overhead = bandwidth * share, overhead / share
        steps = {k: (a / share, b / share) for k, (a, b) in steps.items()}
    if cuda:
        props = torch.cuda.get_device_properties(torch.device(device))
        hardware, memory = props.name, int(props.total_memory)
    else:
        hardware, memory = "CPU", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        known = get_profile(hardware)
        name, link, aliases = known.name, known.intra_link, known.aliases
    except ValueError:
        name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in hardware).strip("-") or "device"
        link, aliases = ("pcie4" if cuda else "shm"), ()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    threads = "" if cuda else f", {torch.get_num_threads()} thread(s), {share:.0%} of a core"
    measured = DeviceProfile(
        name=name,
        memory_bytes=memory,
        peak_flops=rates,
        memory_bandwidth=bandwidth,
        intra_link=link,
        source=f"measured by whale profile on {socket.gethostname()} ({hardware}{threads}, {stamp}); "
        f"matmul 4n x n x 4n, n = {sizes[0]}..{sizes[-1]}, copy of {numel * 4 >> 20} MiB (last cache {cache >> 20} MiB)",
        aliases=aliases,
        efficiency=curve,
        op_overhead=overhead,
        optimizer_step=steps,
        op_classes=classes,
        jitter=jitter_of(runs),
    )
    return emulated(measured)


def emulated(profile: DeviceProfile, rank: int | None = None, environ=None) -> DeviceProfile:
    """``profile`` as this rank runs under ``WHALE_EMULATE_SLOWDOWN`` at its first step: the
    measured device :func:`slowed` by the rank's factor and named for it (``CPU-slow2``), so
    the planner sees an emulated slow rank as it would see a slower device. Unchanged where the
    variable names no factor for the rank.

    Raises:
        ValueError: the variable does not parse (the message shows its grammar).
    """
    if rank is None:
        import torch.distributed as dist

        initialized = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if initialized else int(os.environ.get("RANK", "0"))
    factor = slowdown_factor(slowdown_from_env(environ), rank, 0)
    return profile if factor == 1 else slowed(profile, factor, f"{profile.name}-slow{factor:g}")
