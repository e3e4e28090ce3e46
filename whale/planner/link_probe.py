"""The links of a multi-rank job for ``whale profile``: all-reduce and point-to-point times over a
range of message sizes, fitted to the alpha-beta model the cost model uses (``t = a + b n``; a
ring all-reduce over ``p`` ranks is ``a = 2 (p - 1) alpha``, ``b = 2 (p - 1) / (p bandwidth)``,
Thakur et al. 2005), and :func:`profile_here`, which joins them with the device's profile
(:func:`~.measure.measure_device`) into the job's cluster.

Example::

    device, cluster, links = profile_here(quick=True)   # under torchrun, every rank
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence

from ..ir.cluster_spec import Cluster, Link, Node
from ..ir.devices import DeviceProfile
from .measure import _timed, measure_device

__all__ = ["LinkFit", "fit_alpha_beta", "measure_links", "profile_here"]


@dataclasses.dataclass(frozen=True)
class LinkFit:
    """A measured link: latency (alpha, seconds) and bandwidth (bytes/s), with the samples."""

    latency: float
    bandwidth: float
    samples: tuple[tuple[int, float], ...]

    def describe(self) -> str:
        # Rounded for a reader: the exact forms of a measured value are long raw numbers.
        return f"{self.bandwidth / 1e9:.3g} GB/s, {self.latency * 1e6:.3g} us"


def fit_alpha_beta(samples: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``t = a + b n`` over ``(bytes, seconds)`` samples, with ``a, b >= 0``, in
    relative error (each sample weighted by ``1 / t``): sizes span five orders of magnitude, and
    an absolute fit is decided by the largest ones, whose scatter alone can set ``a`` to 0
    where the small messages took a millisecond.

    Example::

        >>> a, b = fit_alpha_beta([(0, 1e-5), (1e9, 0.1 + 1e-5)])
        >>> round(a, 9), round(1 / b)    # 10 us, 10 GB/s
        (1e-05, 10000000000)
    """
    import numpy as np

    n = len(samples)
    if n < 2:
        raise ValueError(f"fit_alpha_beta needs at least 2 samples, got {n}")
    x = np.array([s for s, _ in samples], dtype=float)
    y = np.array([t for _, t in samples], dtype=float)
    w = 1 / np.maximum(y, 1e-12)
    scale = max(float(x.max()), 1.0)
    (a, b), *_ = np.linalg.lstsq(np.stack([w, w * x / scale], axis=1), w * y, rcond=None)
    b /= scale
    if a < 0:  # through the origin: the best bandwidth alone
        a, b = 0.0, float((w * x) @ (w * y) / ((w * x) @ (w * x))) if x.any() else 0.0
    if b <= 0:  # flat: the latency alone, and a bandwidth that keeps it finite
        a, b = float(w @ (w * y) / (w @ w)), 0.0
    return float(max(a, 0.0)), float(max(b, 1e-15))


def measure_links(*, quick: bool = False) -> dict[str, LinkFit]:
    """All-reduce and point-to-point fits over the initialized process group (all ranks call).

    Returns ``{"all_reduce": ..., "p2p": ...}`` with the per-link alpha and bandwidth: the
    all-reduce fit is turned into the link of the ring (``alpha = a / (2 (p - 1))``,
    ``bandwidth = 2 (p - 1) / (p b)``); ``p2p`` is a ping-pong between ranks 0 and 1 (half of
    the round trip per message). Empty when the group has one rank.

    Each timed collective follows about a millisecond of matrix multiplies on every rank, as a
    collective in training follows a layer's compute: a collective timed back to back with the
    previous one finds its communication threads awake and the ranks in step, and on CPU ranks
    that share cores it ran 3-4 times faster than the same all-reduce between computations (a
    512 KiB gloo all-reduce on 2 ranks of a 2-core host: 0.6 ms back to back, 1.7-2.4 ms after
    compute). The time a rank waits for a peer that computed longer is part of what it sees.

    Each size's time is the mean of its runs, not the median: a step pays its collectives in
    sum, and their times are skewed (on that host, 1 KiB all-reduces after compute took a
    median 0.4 ms and a mean 1.0 ms, a few of them 3-5 ms: a peer's communication thread
    waking late), so the median priced a step's collectives at half what they took.

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
    repeat = 20 if quick else 24
    work = _compute_burst(device, sync, 1e-3)

    def in_step() -> None:  # ranks 0 and 1 start their compute together; the others wait
        dist.barrier()
        work()

    reduce_samples, p2p_samples = [], []
    for size in sizes:
        buf = torch.zeros(size // 4, device=device)
        reduce_samples.append((size, _timed(lambda buf=buf: dist.all_reduce(buf), sync, repeat, before=work, mean=True)))
        p2p_samples.append((size, _timed(lambda buf=buf: _ping_pong(buf, rank), sync, repeat, before=in_step, mean=True) / 2))
    a, b = fit_alpha_beta(reduce_samples)
    ring = LinkFit(a / (2 * (p - 1)), 2 * (p - 1) / (p * b), tuple(reduce_samples))
    a, b = fit_alpha_beta(p2p_samples)
    return {"all_reduce": ring, "p2p": LinkFit(a, 1 / b, tuple(p2p_samples))}


def _compute_burst(device, sync: Callable[[], None], seconds: float) -> Callable[[], None]:
    """A function that runs about ``seconds`` of 256 x 256 matrix multiplies on ``device``
    (their count set once, from a timed run on this rank)."""
    import torch

    a = torch.randn(256, 256, device=device)
    b = torch.empty_like(a)

    def run(count: int) -> None:
        for _ in range(count):
            torch.mm(a, a, out=b)
        sync()

    run(4)
    start = time.perf_counter()
    run(16)
    count = max(1, round(seconds / max((time.perf_counter() - start) / 16, 1e-9)))
    return lambda: run(count)


def _ping_pong(buf, rank: int) -> None:
    """Rank 0 sends to rank 1 and back; other ranks do nothing."""
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
