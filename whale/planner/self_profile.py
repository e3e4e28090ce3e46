"""``Config(cluster="auto")``: every rank measures its device in a short profile, and the ranks'
reports become one :class:`~whale.ir.topology.Cluster` to plan for.

Two steps, joined by one exchange over the default process group (``whale.api`` does it):

1. :func:`rank_report` on every rank: which host it is on (its name), what its device is, how
   much memory it can use, and how fast it runs. Fast: one matrix multiply of a transformer's
   linear-layer shape (``F.linear`` of ``4n x n`` by an ``(4n, n)`` weight, ``32 n^3`` FLOPs),
   timed :data:`REPEATS` times while every rank measures at once, the faster half's mean taken
   (samples slowed by other processes do not count; where a host has several ranks, each
   takes its samples on the host's cores in turn, so a slow core is not read as a slow rank),
   and the spread of all the samples (the rank's ``jitter``: how its time varies);
   then the shape of the efficiency curve
   up to that size (the same multiply at an eighth of ``n`` up to ``n``, each size's rate
   over the best); then what does not shrink with a replica's rows: the cost of one operation
   (a chain of a transformer block's small ones, forward and backward) and of an AdamW step per
   tensor and per parameter, which the cost model prices a step's fixed part by. About 0.15 s
   on a CPU core (twice that where some rank is emulated 2x slower). The rate, over the
   datasheet's efficiency at that size, gives the device's speed against its datasheet, and
   the datasheet profile is scaled to it, with the measured curve (its rates moved so that the
   probed size runs at the measured rate) and the measured per-operation and optimizer costs.
   The curve matters: a datasheet curve that still rises past the probed size (a CPU's, for a
   socket's many cores) prices a replica's larger matmuls too fast against its smaller ones,
   which reads as a fixed part of every step that is not there, and moves rows between
   unequal ranks. On a single-threaded CPU rank the samples are timed in CPU time (the
   core's speed while the rank runs) and the rank also reports the share of wall time it ran:
   ranks that share cores get what the host's median share gives them. A rank that
   ``WHALE_EMULATE_SLOWDOWN`` slows counts ``FACTOR`` times each sample, and every rank idles
   after each sample as the slowest emulated rank's steps will (``FACTOR - 1`` times the
   sample), so the profile sees the emulated speed as it would see a real slow device and all
   ranks measure in one rhythm (none measures alone while another sleeps). Or, given a
   ``whale profile`` file (``Config(profiles=...)``), the rank takes its device's profile from
   the file (emulated slowdowns applied) and measures nothing.
2. :func:`cluster_from_reports` on every rank, on the same list: a pure function, so every rank
   plans for the same cluster. Ranks on one host (same host name, consecutive ranks) form a
   node; CPU ranks of a host share its RAM. Measured speeds within :data:`SAME_CLASS` of each
   other are one device class with their median speed (noise of a loaded host does not make
   every rank a device type of its own); slower classes are named ``CPU-slow2`` (2x slower than
   the fastest of that device).

Example::

    reports = [None] * world; dist.all_gather_object(reports, rank_report(rank))
    cluster = cluster_from_reports(reports)
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..ir.device_catalog import get_profile, load_profiles
from ..ir.devices import CPU_PROFILE, DeviceProfile
from ..ir.emulation import slowdown_factor, slowdown_from_env
from ..ir.profile_fields import jitter_of
from ..ir.topology import Cluster, Node
from .cost.formulas import efficiency_at
from .measure import emulated, matmul_curve, slowed

__all__ = ["REPEATS", "SAME_CLASS", "RankReport", "cluster_from_reports", "rank_report"]

REPEATS = 31
"""Timed samples of the multiply per rank; the mean of the faster half is the rank's time. A
shared host's cores change pace every ~0.1 s by up to a third: with two ranks, one emulated 2x
slower, 15 samples read their ratio with a spread (standard deviation) of 0.16-0.20, 31 with
0.08-0.13, and each spare row the spread moves costs the planned split about 2%."""

SAME_CLASS = 1.2
"""Ranks of one device whose measured speeds are within this factor of the class's fastest are
one device class (a loaded host varies a single rank's rate by up to ~20%)."""

# n of the 4n x n x 4n multiply: ~67 MFLOP on a CPU (a few ms), ~275 GFLOP on a GPU (ms).
_CPU_N, _GPU_N = 128, 2048
# Each timed sample runs the multiply this many times: samples of ~5 ms on a CPU core (~30
# ms on a GPU), well above the timer's granularity; 9 of them take ~0.05 s.
_CPU_INNER, _GPU_INNER = 5, 4


@dataclasses.dataclass(frozen=True)
class RankReport:
    """What one rank tells the others about itself (picklable, small).

    Attributes:
        rank: the rank.
        host: the host name: ranks of one host share a node (and, on CPUs, its RAM).
        hardware: the device, as :func:`~whale.ir.device_catalog.get_profile` finds it (``"CPU"``,
            ``"NVIDIA A100-SXM4-80GB"``).
        profile: the device's profile as this rank measured it (or read it from a file), as
            :meth:`DeviceProfile.to_dict` writes it; its memory is the device's or the host's.
        speed: measured peak over the datasheet profile's (1.0: as the datasheet says); 1.0
            for a profile read from a file (no measurement; the file's rates hold).
        cpu: the device is the host's CPU, whose RAM the host's ranks share.
        measured: the speed was measured (not read from a file): ranks of one device are
            grouped into classes by it.
        seconds: how long the measurement took on this rank.
        error: why this rank could not report (raised on every rank after the exchange).
        share: on a CPU, the share of wall time the rank ran while it measured (CPU time over
            wall time: 0.5 when two busy ranks share a core); 1.0 on a GPU or from a file.
    """

    rank: int
    host: str
    hardware: str
    profile: Mapping[str, Any] | None
    speed: float = 1.0
    cpu: bool = True
    measured: bool = False
    seconds: float = 0.0
    error: str | None = None
    share: float = 1.0


def rank_report(rank: int, *, profiles: str | os.PathLike | None = None, environ=None) -> RankReport:
    """Measure this rank's device (or read it from ``profiles``) into a :class:`RankReport`.

    Never raises for a problem with the device or the file: the report carries the error, so
    that every rank learns it after the exchange and none waits for a rank that gave up.

    Args:
        rank: this process's rank (its ``WHALE_EMULATE_SLOWDOWN`` factor at step 0 applies).
        profiles: a ``whale profile`` file; None measures.
        environ: the environment to read ``WHALE_EMULATE_SLOWDOWN`` from (default: os.environ).

    Example::

        report = rank_report(dist.get_rank())
        report.speed, report.seconds      # e.g. 0.013, 0.09
    """
    import torch

    began = time.perf_counter()
    host = socket.gethostname() or "localhost"
    cuda = torch.cuda.is_available()
    hardware = torch.cuda.get_device_name() if cuda else "CPU"
    try:
        factor = slowdown_factor(slowdown_from_env(environ), rank, 0)
        memory = _usable_memory(cuda)
        if profiles is not None:
            profile, speed, share = _from_file(profiles, hardware, rank, environ), 1.0, 1.0
        else:
            base = _datasheet(hardware)
            pace = max([f for phases in slowdown_from_env(environ).values() for f, step in phases if step == 0] + [1.0])
            found = _measure(base, cuda, factor, pace, _rotation(rank, environ))
            speed, share = found.peak / base.peak("fp32"), found.share
            profile = slowed(base, 1.0 / speed, base.name)  # classes name it (cluster_from_reports)
            # The measured curve, and the costs that do not shrink with rows, as measured (not
            # the datasheet's scaled).
            profile = dataclasses.replace(
                profile, peak_flops={d: r * found.anchor for d, r in profile.peak_flops},
                efficiency=found.curve, op_overhead=found.overhead, optimizer_step=(("adamw", *found.optimizer),),
                jitter=found.jitter,
                source=f"{base.name} measured by whale (cluster='auto') on {host}: {speed:.3g}x its "
                f"datasheet rates, {found.overhead * 1e6:.3g} us per operation ({base.source})",
            )  # fmt: skip
        profile = dataclasses.replace(profile, memory_bytes=memory)
    except (ValueError, OSError) as err:
        return RankReport(rank, host, hardware, None, cpu=not cuda, error=str(err))
    return RankReport(rank, host, hardware, profile.to_dict(), speed, not cuda, profiles is None,
                      time.perf_counter() - began, share=share)  # fmt: skip


def _datasheet(hardware: str) -> DeviceProfile:
    try:
        return get_profile(hardware)
    except ValueError:
        raise ValueError(
            f"the device {hardware!r} has no datasheet profile to scale by its measured speed; "
            "measure it with `whale profile --out FILE` and pass Config(cluster='auto', profiles=FILE)"
        ) from None


def _from_file(path: str | os.PathLike, hardware: str, rank: int, environ) -> DeviceProfile:
    """This device's profile from a ``whale profile`` file, as the emulation makes it run."""
    table = load_profiles(path)
    try:
        found = get_profile(hardware, profiles=list(table.values()))
    except ValueError:
        found = None
    if found is None or found.name not in table:
        raise ValueError(
            f"the profile file {os.fspath(path)} describes {sorted(table)} but rank {rank} runs on "
            f"{hardware!r}; measure this device with `whale profile --out {os.fspath(path)}` on "
            "it, or leave Config(profiles=...) out to measure at start"
        )
    return emulated(found, rank, environ)


def _usable_memory(cuda: bool) -> int:
    """Bytes this process can use: on a GPU, what is free plus what torch already holds; on a
    CPU, the host's RAM (shared by the host's ranks in :func:`cluster_from_reports`)."""
    import torch

    if cuda:
        free, _ = torch.cuda.mem_get_info()
        return int(free + torch.cuda.memory_reserved())
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return CPU_PROFILE.memory_bytes


@dataclasses.dataclass(frozen=True)
class _Measured:
    """What :func:`_measure` found on this rank (seconds at the rank's emulated speed)."""

    peak: float  # fp32 FLOP/s at full size, as the datasheet's curve reaches it (its speed)
    share: float  # share of wall time the rank ran while it measured
    overhead: float  # seconds per forward operation (the cost model's op_overhead)
    optimizer: tuple[float, float]  # AdamW: seconds per parameter tensor, per fp32 parameter
    curve: tuple[tuple[float, float], ...]  # measured efficiency: (FLOPs, rate over the best)
    anchor: float  # times ``peak``: the rate of the curve's best share (the probed size's)
    jitter: float  # the samples' relative spread (profile_fields.jitter_of): how the rank's time varies


def _rotation(rank: int, environ=None) -> list[int]:
    """The cores this rank measures on in turn: as many of the host's cores as it has ranks
    (``LOCAL_WORLD_SIZE``, else the world size), starting at the rank's own place
    (``LOCAL_RANK``), so that at any moment the host's ranks measure on different cores and
    each rank meets every core another rank meets. Empty where there is nothing to rotate: one
    rank, one core, or no way to pin a thread (not Linux)."""
    import torch.distributed as dist

    env = os.environ if environ is None else environ
    if not hasattr(os, "sched_getaffinity"):
        return []
    cores = sorted(os.sched_getaffinity(0))
    try:
        local = int(env.get("LOCAL_RANK", rank))
        world = int(env.get("LOCAL_WORLD_SIZE", dist.get_world_size() if dist.is_initialized() else 1))
    except ValueError:
        return []
    turns = min(len(cores), world)
    return [] if turns < 2 else [cores[(local + j) % len(cores)] for j in range(turns)]


def _pin(cores: set[int]) -> None:
    """Run this thread on ``cores`` where the system lets it choose (a container may not: the
    samples are then taken where the scheduler puts them, as without rotation)."""
    try:
        os.sched_setaffinity(0, cores)
    except OSError:
        pass


def _measure(base: DeviceProfile, cuda: bool, factor: float, pace: float, cores: Sequence[int] = ()) -> _Measured:
    """This rank's device: the peak fp32 FLOP/s from a linear layer's multiply (the
    faster half's mean over :data:`REPEATS` samples, over the device's efficiency at that
    size), the cost of one operation (a chain of small ones, forward and backward) and of an
    AdamW step per tensor and per parameter (the costs that do not shrink with a replica's
    rows), and the share of wall time the rank ran while it measured (1.0 on a GPU or a
    multi-threaded CPU rank, timed by the wall clock).

    On a single-threaded CPU rank every sample is timed by this thread's CPU time: what the
    core does while this rank runs, whatever other processes take from it (their share of the
    core is the ``share``, taken host-wide in :func:`cluster_from_reports`, where one rank's
    scheduling luck averages out). An emulated slow rank counts ``factor`` times each sample.
    Every rank idles after each sample for ``pace - 1`` times what it took (``pace``: the
    largest factor any rank emulates), so that all ranks measure in the same rhythm: the slow
    rank idles as its training steps will, and no rank measures alone on the host while
    another sleeps (which would read their speeds through different contention).

    ``cores`` (:func:`_rotation`; single-threaded CPU ranks only): each measurement runs in
    turns, this thread pinned to each core for an equal share of the samples (after a warm-up
    run on it), and the turns' faster-half means are averaged: the cores of a shared host run
    the same multiply up to 1.75x apart for seconds at a time (steal by other guests, another
    process's caches), and a rank is not bound to the core it measured on, so a core's speed
    must not be read as the rank's. The thread's cores are restored afterwards."""
    import torch

    n, inner = (_GPU_N, _GPU_INNER) if cuda else (_CPU_N, _CPU_INNER)
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # This thread's CPU time on a single-threaded CPU rank (torchrun's default: the multiply
    # runs on this thread; the process's other threads, gloo's, are not the device); a
    # multi-threaded rank's CPU time counts its threads' spinning, so it is timed, and shared,
    # by the wall clock.
    shared = not cuda and torch.get_num_threads() == 1
    clock = time.thread_time if shared else time.perf_counter
    ran, walls = [0.0], [0.0]
    turns: list[int | None] = list(cores) if shared and cores else [None]
    home = os.sched_getaffinity(0) if turns != [None] else None

    def samples(run, count: int, keep: list | None = None) -> float:
        means = []
        for core in turns:
            if core is not None:
                _pin({core})
            run()  # warm-up: allocation, kernel selection, caches (of this core)
            sync()
            out = []
            for _ in range(max(2, -(-count // len(turns)))):
                wall, start = time.perf_counter(), clock()
                run()
                sync()
                took, wall = clock() - start, time.perf_counter() - wall
                ran[0], walls[0] = ran[0] + took, walls[0] + wall
                if pace > 1:  # idle as the slowest emulated rank does, freeing the core for the others
                    time.sleep((pace - 1) * took)
                out.append(factor * took)
            if keep is not None:
                keep += out
            # The faster half's mean: on a CPU, another process on the core (its caches, memory
            # bandwidth) only ever lengthens a sample's CPU time, so the faster samples are the device's.
            means.append(statistics.fmean(sorted(out)[: max(1, len(out) // 2)]))
        return statistics.fmean(means)

    gen = torch.Generator(device=device).manual_seed(0)  # no draw from the user's random stream
    a = torch.randn(4 * n, n, device=device, generator=gen)
    w = torch.randn(4 * n, n, device=device, generator=gen)

    def multiply() -> None:
        with torch.no_grad():
            for _ in range(inner):
                torch.nn.functional.linear(a, w)

    try:
        raw: list[float] = []  # every sample: how the rank's time varies (its jitter)
        matmul = samples(multiply, REPEATS, raw)
        overhead = samples(_op_chain(device, gen), _SMALL_REPEATS) / _CHAIN_OPS
        optimizer = _adamw_costs(device, gen, lambda run: samples(run, _SMALL_REPEATS))
        # The curve's shape only (rates relative to each other: the emulation and the core's
        # share scale every size alike), so a few medians do.
        _, curve = matmul_curve(tuple(n >> k for k in _CURVE_HALVINGS), torch.float32, device, sync, _CURVE_REPEATS, clock)
    finally:
        if home is not None:
            _pin(home)
    flops = 32.0 * n**3
    rate = inner * flops / max(matmul, 1e-9)
    share = min(1.0, max(0.01, ran[0] / max(walls[0], 1e-9))) if shared else 1.0
    # The datasheet's speed scales its rates (and bandwidth) to the device; the measured curve,
    # whose last point (the probed size) is its best (shares rise), then runs the probed size at
    # the measured rate: the rates times the datasheet's efficiency there.
    datasheet = float(efficiency_at(base, flops))
    return _Measured(rate / datasheet, share, overhead, optimizer, curve, datasheet, jitter_of(raw))


# The efficiency curve's sizes: the probed n halved 3, 2, 1 and 0 times (4n x n x 4n: 1/512 of
# its FLOPs up to it), each the median of a few runs: ~5 ms on a CPU core. Flat past the probed
# size, where the matmul rate of a CPU core (~70 MFLOP) and of a GPU (~270 GFLOP) no longer
# rises; a datasheet curve that does (a CPU socket's, to 1 GFLOP) prices larger matmuls too
# fast against smaller ones.
_CURVE_HALVINGS, _CURVE_REPEATS = (3, 2, 1, 0), 3


# A chain of a transformer block's small operations (linear, gelu, layer norm, residual add)
# on 8-wide rows: their time is the per-operation cost. Forward and backward count 3 forward
# operations each (the cost model charges a node its overhead forward and twice that backward).
_CHAIN_BLOCKS, _CHAIN_WIDTH = 8, 8
_CHAIN_OPS = 3 * 4 * _CHAIN_BLOCKS
_SMALL_REPEATS = 7


def _op_chain(device: str, gen):
    import torch
    import torch.nn.functional as F

    x = torch.ones(1, _CHAIN_WIDTH, device=device, requires_grad=True)
    w = torch.randn(_CHAIN_WIDTH, _CHAIN_WIDTH, device=device, generator=gen).requires_grad_()
    b = torch.zeros(_CHAIN_WIDTH, device=device, requires_grad=True)
    g = torch.ones(_CHAIN_WIDTH, device=device, requires_grad=True)

    def chain() -> None:
        y = x
        for _ in range(_CHAIN_BLOCKS):
            y = y + F.layer_norm(F.gelu(F.linear(y, w, b)), (_CHAIN_WIDTH,), g, b)
        y.sum().backward()

    return chain


def _adamw_costs(device: str, gen, timed) -> tuple[float, float]:
    """``(seconds per tensor, seconds per parameter)`` of an AdamW step with torch's kernels
    for the device (``torch.optim.adamw.adamw``: a loop over tensors on a CPU, multi-tensor
    kernels on CUDA), from one large tensor and many small ones: ``t = a k + b n``. The
    functional form, not ``torch.optim.AdamW.step``: that one imports ``torch._dynamo`` on its
    first call (seconds, once per process); it adds ~0.2 ms per step and ~10 us per tensor on a
    CPU core (its bookkeeping), which this leaves out."""
    import torch
    from torch.optim.adamw import adamw

    sets = ((1, 1 << 16), (32, 1 << 8))
    times = []
    for tensors, numel in sets:
        params, grads, avg, avg_sq = ([torch.zeros(numel, device=device) for _ in range(tensors)] for _ in range(4))
        for g in grads:
            g.fill_(1e-3)
        steps = [torch.zeros((), device=device) for _ in range(tensors)]

        def step(params=params, grads=grads, avg=avg, avg_sq=avg_sq, steps=steps) -> None:
            adamw(params, grads, avg, avg_sq, [], steps, foreach=device == "cuda", capturable=False,
                  differentiable=False, fused=None, grad_scale=None, found_inf=None, has_complex=False,
                  amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-3, weight_decay=1e-2, eps=1e-8, maximize=False)  # fmt: skip

        times.append(timed(step))
    (k1, n1), (k2, n2) = ((k, k * numel) for k, numel in sets)
    # Two equations, two unknowns; noise can push one below zero: keep the other term then.
    det = k1 * n2 - k2 * n1
    per_tensor = (times[0] * n2 - times[1] * n1) / det
    per_param = (k1 * times[1] - k2 * times[0]) / det
    if per_tensor < 0:
        return 0.0, max(times[0] / n1, times[1] / n2)
    if per_param < 0:
        return max(times[0] / k1, times[1] / k2), 0.0
    return per_tensor, per_param


def cluster_from_reports(reports: Sequence[RankReport]) -> Cluster:
    """The cluster of the ranks' reports, in rank order (the same on every rank).

    Consecutive ranks of one host form a node named after the host (a host whose ranks are not
    consecutive gets one node per run, ``host``, ``host-2``: the cluster numbers ranks node by
    node). CPU ranks of a host share its RAM evenly. Measured devices of one kind whose speeds
    are within :data:`SAME_CLASS` of their class's fastest take the class's median speed.

    Raises:
        ValueError: a rank reported an error (naming the rank and the error), or the reports
            are not ranks 0..n-1.

    Example::

        cluster = cluster_from_reports(reports)
        [d.profile.name for d in cluster.devices()]   # ['CPU', 'CPU-slow2']
    """
    if [r.rank for r in reports] != list(range(len(reports))):
        raise ValueError(f"cluster_from_reports: reports of ranks {[r.rank for r in reports]}, expected 0..{len(reports) - 1}")
    failed = [r for r in reports if r.error is not None]
    if failed:
        raise ValueError(
            "Config(cluster='auto'): "
            + "; ".join(f"rank {r.rank} ({r.host}, {r.hardware}): {r.error}" for r in failed)
        )
    per_host: dict[str, int] = {}
    for r in reports:
        per_host[r.host] = per_host.get(r.host, 0) + 1
    profiles = []
    for r in reports:
        profile = DeviceProfile.from_dict(r.profile, where=f"rank {r.rank}'s profile")
        if r.cpu:
            profile = dataclasses.replace(profile, memory_bytes=max(1, profile.memory_bytes // per_host[r.host]))
        profiles.append(profile)
    profiles = _speed_classes(reports, profiles)
    nodes: list[tuple[str, list[DeviceProfile]]] = []
    for r, profile in zip(reports, profiles, strict=True):
        if nodes and nodes[-1][0] == r.host:
            nodes[-1][1].append(profile)
        else:
            nodes.append((r.host, [profile]))
    names = _node_names([host for host, _ in nodes])
    return Cluster(nodes=tuple(Node(name=name, devices=tuple(devs)) for name, (_, devs) in zip(names, nodes, strict=True)))


def _speed_classes(reports: Sequence[RankReport], profiles: list[DeviceProfile]) -> list[DeviceProfile]:
    """Measured ranks of one device and memory grouped by speed (fastest first, a class takes
    every rank within :data:`SAME_CLASS` of its fastest); each class gets one profile at its
    median speed, named for its slowdown against the fastest class. A CPU rank's speed is its
    core's times its host's median share (the ranks of a host share its cores alike)."""
    out = list(profiles)
    shares: dict[str, list[float]] = {}
    for r in reports:
        if r.measured and r.cpu:
            shares.setdefault(r.host, []).append(r.share)
    speed = {
        r.rank: r.speed * (statistics.median(shares[r.host]) if r.measured and r.cpu else 1.0)
        for r in reports
    }  # fmt: skip
    kinds: dict[tuple[str, int], list[int]] = {}
    for r, p in zip(reports, profiles, strict=True):
        if r.measured:
            kinds.setdefault((p.name, p.memory_bytes), []).append(r.rank)
    for (base, _), ranks in kinds.items():
        left = sorted(ranks, key=lambda k: (-speed[k], k))
        fastest = None
        while left:
            members = [k for k in left if speed[k] * SAME_CLASS >= speed[left[0]]]
            left = [k for k in left if k not in members]
            median = statistics.median(speed[k] for k in members)
            fastest = fastest or median
            name = base if median == fastest else f"{base}-slow{fastest / median:.2g}"
            # From the first member's profile (at its core's speed) to the class's speed, with
            # the members' median spread from step to step.
            scale = reports[members[0]].speed / median
            jitter = statistics.median(profiles[k].jitter or 0.0 for k in members)
            for k in members:
                out[k] = dataclasses.replace(slowed(profiles[members[0]], scale, name), jitter=jitter)
    return _unique_names(out)


def _unique_names(profiles: list[DeviceProfile]) -> list[DeviceProfile]:
    """Distinct profiles get distinct names (the planner groups devices by name)."""
    seen: dict[str, list[DeviceProfile]] = {}
    out = []
    for p in profiles:
        variants = seen.setdefault(p.name, [])
        if p not in variants:
            variants.append(p)
        index = variants.index(p)
        out.append(p if index == 0 else dataclasses.replace(p, name=f"{p.name}-{index + 1}", aliases=()))
    return out


def _node_names(hosts: Sequence[str]) -> list[str]:
    names, used = [], set()
    for host in hosts:
        name = re.sub(r"[^A-Za-z0-9_.\-]", "-", host)
        name = name if re.match(r"[A-Za-z_]", name) else f"host-{name}"
        candidate, k = name, 2
        while candidate in used:
            candidate, k = f"{name}-{k}", k + 1
        used.add(candidate)
        names.append(candidate)
    return names
