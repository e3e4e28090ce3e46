"""``whale profile``: measure the devices at hand into a profile the planner uses instead of datasheets.

On every rank: the dense matrix-multiply rate per dtype (``2 n^3`` FLOPs per ``n x n`` product)
and the memory bandwidth (a large copy reads and writes every byte). Under ``torchrun`` with more
than one rank, also the all-reduce and point-to-point links: times over a range of message
sizes are fitted to the alpha-beta model the cost model uses (``t = a + b n``; a ring
all-reduce over ``p`` ranks is ``a = 2 (p - 1) alpha``, ``b = 2 (p - 1) / (p bandwidth)``,
Thakur et al. 2005). Rank 0 writes:

* a profile file (:func:`~.devices.load_profiles` format); its ``source`` starts with
  ``measured``, so the cost model takes the rates at face value (efficiency 1);
* with ``--cluster-out``, a cluster file (:func:`~.cluster.load_cluster`) with the measured
  intra-node link and network, for ``whale plan --cluster @cluster.json``.

Example::

    torchrun --nproc_per_node=8 -m whale.cli profile --out a100.json --cluster-out here.json
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import time
from collections.abc import Callable, Sequence

from ..ir.cluster_spec import Cluster, Link, Node, format_bandwidth, format_duration
from ..ir.devices import DeviceProfile, get_profile

__all__ = ["LinkFit", "fit_alpha_beta", "measure_device", "measure_links", "profile_here"]

_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class LinkFit:
    """A measured link: latency (alpha, seconds) and bandwidth (bytes/s), with the samples."""

    latency: float
    bandwidth: float
    samples: tuple[tuple[int, float], ...]

    def describe(self) -> str:
        return f"{format_bandwidth(self.bandwidth)}, {format_duration(self.latency)}"


def fit_alpha_beta(samples: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``t = a + b n`` over ``(bytes, seconds)`` samples, with ``a, b >= 0``.

    Example::

        >>> a, b = fit_alpha_beta([(0, 1e-5), (1e9, 0.1 + 1e-5)])
        >>> round(a, 9), round(1 / b)    # 10 us, 10 GB/s
        (1e-05, 10000000000)
    """
    n = len(samples)
    if n < 2:
        raise ValueError(f"fit_alpha_beta needs at least 2 samples, got {n}")
    mx = sum(x for x, _ in samples) / n
    my = sum(y for _, y in samples) / n
    sxx = sum((x - mx) ** 2 for x, _ in samples)
    b = sum((x - mx) * (y - my) for x, y in samples) / sxx if sxx else 0.0
    b = max(b, 1e-15)  # a flat fit would mean infinite bandwidth; keep it finite
    return max(0.0, my - b * mx), b


def _timed(fn: Callable[[], object], sync: Callable[[], None], repeat: int) -> float:
    """Best time of ``repeat`` runs after one warm-up (the device's rate, not its noise)."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure_device(*, quick: bool = False, device: str | None = None) -> DeviceProfile:
    """Measure this process's device: matmul FLOP/s per dtype, memory bandwidth, memory size.

    Args:
        quick: small sizes (seconds on a CPU), for tests and a first look.
        device: ``"cuda"`` or ``"cpu"``; None: CUDA if available.

    Example::

        profile = measure_device(quick=True)
        profile.peak("fp32"), profile.memory_bandwidth
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = (1024 if quick else 8192) if cuda else (256 if quick else 1536)
    rates = {}
    for name, dtype_name in _TORCH_DTYPES.items():
        dtype = getattr(torch, dtype_name)
        if not cuda and name != "fp32":
            continue  # CPU half matmuls are emulated; the planner falls back to fp32 there
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        rates[name] = 2 * n**3 / _timed(lambda a=a, b=b: a @ b, sync, 3 if quick else 10)
    if cuda and hasattr(torch.backends.cuda.matmul, "allow_tf32"):
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        a = torch.randn(n, n, device=device)
        rates["tf32"] = 2 * n**3 / _timed(lambda: a @ a, sync, 3 if quick else 10)
        torch.backends.cuda.matmul.allow_tf32 = previous
    numel = (1 << 22 if quick else 1 << 26) if cuda else (1 << 21 if quick else 1 << 24)
    src = torch.empty(numel, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / _timed(lambda: dst.copy_(src), sync, 3 if quick else 10)
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
    return DeviceProfile(
        name=name,
        memory_bytes=memory,
        peak_flops=rates,
        memory_bandwidth=bandwidth,
        intra_link=link,
        source=f"measured by whale profile on {socket.gethostname()} ({hardware}, {stamp}); "
        f"matmul {n}x{n}, copy of {numel * 4 >> 20} MiB",
        aliases=aliases,
    )


def measure_links(*, quick: bool = False) -> dict[str, LinkFit]:
    """All-reduce and point-to-point fits over the initialized process group (all ranks call).

    Returns ``{"all_reduce": ..., "p2p": ...}`` with the per-link alpha and bandwidth: the
    all-reduce fit is turned into the link of the ring (``alpha = a / (2 (p - 1))``,
    ``bandwidth = 2 (p - 1) / (p b)``); ``p2p`` is a ping-pong between ranks 0 and 1 (half of
    the round trip per message). Empty when the group has one rank.

    Example::

        links = measure_links(quick=True)   # under torchrun, every rank
    """
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return {}
    p, rank = dist.get_world_size(), dist.get_rank()
    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sizes = [1 << k for k in (range(10, 21, 2) if quick else range(10, 27, 2))]
    reduce_samples, p2p_samples = [], []
    for size in sizes:
        buf = torch.zeros(size // 4, device=device)

        reduce_samples.append((size, _timed(_then_barrier(lambda buf=buf: dist.all_reduce(buf)), sync, 3 if quick else 8)))
        p2p_samples.append((size, _timed(_then_barrier(lambda buf=buf: _ping_pong(buf, rank)), sync, 3 if quick else 8) / 2))
    a, b = fit_alpha_beta(reduce_samples)
    ring = LinkFit(a / (2 * (p - 1)), 2 * (p - 1) / (p * b), tuple(reduce_samples))
    a, b = fit_alpha_beta(p2p_samples)
    return {"all_reduce": ring, "p2p": LinkFit(a, 1 / b, tuple(p2p_samples))}


def _then_barrier(fn: Callable[[], object]) -> Callable[[], None]:
    import torch.distributed as dist

    def run() -> None:
        fn()
        dist.barrier()

    return run


def _ping_pong(buf, rank: int) -> None:
    """Rank 0 sends to rank 1 and back; other ranks wait at the barrier."""
    import torch.distributed as dist

    if rank == 0:
        dist.send(buf, 1)
        dist.recv(buf, 1)
    elif rank == 1:
        dist.recv(buf, 0)
        dist.send(buf, 0)


def profile_here(*, quick: bool = False) -> tuple[DeviceProfile, Cluster | None, dict[str, LinkFit]]:
    """Measure the device and, in a multi-rank job, the links; build the job's cluster.

    The cluster has one node per ``WORLD_SIZE / LOCAL_WORLD_SIZE`` (torchrun's layout); its
    intra-node link is the measured ring when the job is one node, and its network the
    measured ring when there are several (the slowest hop sets a ring's pace).
    """
    import torch.distributed as dist

    device = measure_device(quick=quick)
    links = measure_links(quick=quick)
    if not dist.is_available() or not dist.is_initialized():
        return device, None, links
    world = dist.get_world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    num_nodes = max(1, world // per_node)
    ring = links.get("all_reduce")
    intra = net = None
    if ring is not None and num_nodes == 1:
        intra = Link(kind=device.intra_link, bandwidth=ring.bandwidth, latency=ring.latency)
    elif ring is not None:
        net = Link(kind="network", bandwidth=ring.bandwidth, latency=ring.latency)
    nodes = tuple(
        Node(name=f"node{k}", device=device, num_devices=per_node, intra_link=intra, network=net)
        for k in range(num_nodes)
    )
    return device, Cluster(nodes=nodes), links
