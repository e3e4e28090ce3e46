"""The machines a job runs on: nodes, their devices, ranks, and the links between ranks.

Ranks are numbered node by node, in the order the nodes are given. Between two ranks the link is
the device itself (``loopback``), the node's intra-node link (NVLink, PCIe, host memory), or the
network; between two nodes the network runs at the slower interface's bandwidth and the larger
latency. A link is an alpha-beta model: ``n`` bytes take ``latency + n / bandwidth`` seconds;
its values read and print as text with units (``"100Gbps"``, ``"5us"``).

Clusters are usually written as text or read from a file: see :mod:`whale.ir.cluster_spec`,
which re-exports everything here.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import re
from collections.abc import Iterable
from decimal import Decimal
from typing import NamedTuple

from .devices import INTRA_LINKS, DeviceProfile

__all__ = [
    "DEFAULT_NETWORK",
    "LOOPBACK",
    "Cluster",
    "Link",
    "Node",
    "RankDevice",
    "format_bandwidth",
    "format_cluster",
    "format_duration",
    "parse_bandwidth",
    "parse_duration",
]

_LINK_KINDS = ("loopback", "network", *INTRA_LINKS)
_NODE_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Link:
    """An alpha-beta link: moving ``n`` bytes takes ``latency + n / bandwidth`` seconds.

    Example::

        Link(kind="network", bandwidth=12.5e9, latency=5e-6)   # 100 Gbps
    """

    kind: str
    """``"loopback"``, ``"network"``, or an intra-node kind such as ``"nvlink3"``."""
    bandwidth: float
    """Bytes/s in one direction (infinite only for ``loopback``)."""
    latency: float
    """Seconds per message (the alpha of the alpha-beta model)."""

    def __post_init__(self) -> None:
        if self.kind not in _LINK_KINDS:
            raise ValueError(f"Link(kind={self.kind!r}) is unknown; use one of {list(_LINK_KINDS)}")
        bw = self.bandwidth
        if isinstance(bw, bool) or not isinstance(bw, (int, float)) or math.isnan(bw) or bw <= 0:
            raise ValueError(
                f"Link({self.kind}): bandwidth must be a number > 0 bytes/s, got {bw!r}"
            )
        if math.isinf(bw) and self.kind != "loopback":
            raise ValueError(f"Link({self.kind}): only a loopback has infinite bandwidth")
        lat = self.latency
        if isinstance(lat, bool) or not isinstance(lat, (int, float)) or not 0 <= lat < math.inf:
            raise ValueError(
                f"Link({self.kind}): latency must be a finite number >= 0 s, got {lat!r}"
            )
        object.__setattr__(self, "bandwidth", float(bw))
        object.__setattr__(self, "latency", float(lat) + 0.0)  # + 0.0 turns -0.0 into 0.0


LOOPBACK = Link(kind="loopback", bandwidth=math.inf, latency=0.0)
# 100 Gb/s: one EDR InfiniBand / 100GbE NIC; 9.6 us: NCCL tuning.cc hwLat NET, Ring/Simple.
DEFAULT_NETWORK = Link(kind="network", bandwidth=100e9 / 8, latency=9.6e-6)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Node:
    """One machine: ``num_devices`` devices of one type, or ``devices`` of mixed types.

    A node of one type takes ``device`` and ``num_devices``; a mixed node (a workstation with
    two different GPUs) takes ``devices``, one profile per device in rank order, and has
    ``device=None``. Either way ``devices`` and ``num_devices`` are filled in, so planner code
    reads a node's devices one by one.

    Example::

        Node(name="node0", device=get_profile("A100-80GB"), num_devices=8)
        Node(name="ws", devices=(get_profile("A100-80GB"), get_profile("T4")))
    """

    name: str
    device: DeviceProfile | None = None
    """The device type of every device; None on a mixed node."""
    num_devices: int | None = None
    """Number of devices (from ``devices`` when not given)."""
    intra_link: Link | None = None
    """Link between this node's devices; None takes the slowest device profile's link."""
    network: Link | None = None
    """This node's network interface; None takes the cluster's network."""
    devices: tuple[DeviceProfile, ...] = ()
    """Each device's profile in rank order (filled from ``device`` x ``num_devices``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NODE_NAME_RE.fullmatch(self.name):
            raise ValueError(
                f"Node(name={self.name!r}) must start with a letter or '_' and hold only "
                "letters, digits, '_', '.' and '-'"
            )
        devices = tuple(self.devices)
        for device in (self.device, *devices) if self.device is not None else devices:
            if not isinstance(device, DeviceProfile):
                raise TypeError(f"Node {self.name}: a device must be a DeviceProfile, got {device!r}")
        n = self.num_devices
        if devices:
            if n is not None and n != len(devices):
                raise ValueError(
                    f"Node {self.name}: num_devices={n!r} but devices lists {len(devices)} devices; "
                    "give one of them"
                )
            if self.device is not None and set(devices) != {self.device}:
                raise ValueError(
                    f"Node {self.name}: device={self.device.name} but devices holds "
                    f"{sorted({d.name for d in devices})}; give device for one type, devices for a mix"
                )
            n = len(devices)
        elif self.device is None:
            raise ValueError(f"Node {self.name}: give device and num_devices, or devices")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Node {self.name}: num_devices must be an int >= 1, got {n!r}")
        if not devices:
            devices = (self.device,) * n
        object.__setattr__(self, "devices", devices)
        object.__setattr__(self, "num_devices", n)
        object.__setattr__(self, "device", devices[0] if len(set(devices)) == 1 else None)
        if self.intra_link is not None and self.intra_link.kind not in INTRA_LINKS:
            raise ValueError(
                f"Node {self.name}: intra_link kind {self.intra_link.kind!r} is not an intra-node "
                f"link; use one of {list(INTRA_LINKS)}"
            )
        if self.network is not None and self.network.kind != "network":
            raise ValueError(f"Node {self.name}: network must be a Link of kind 'network'")

    @property
    def is_mixed(self) -> bool:
        """True when the node holds more than one device type."""
        return self.device is None

    @property
    def blocks(self) -> tuple[tuple[DeviceProfile, int], ...]:
        """Runs of one device type in rank order, e.g. ``((A100, 1), (T4, 1))``."""
        out: list[tuple[DeviceProfile, int]] = []
        for device in self.devices:
            if out and out[-1][0] == device:
                out[-1] = (device, out[-1][1] + 1)
            else:
                out.append((device, 1))
        return tuple(out)

    @property
    def link_profile(self) -> DeviceProfile:
        """The profile whose intra-node link the devices share: the slowest one's on a mix."""
        return min(dict.fromkeys(self.devices), key=lambda d: d.intra_link_bandwidth)

    @property
    def device_link(self) -> Link:
        """The link between two devices of this node."""
        if self.intra_link is not None:
            return self.intra_link
        profile = self.link_profile
        kind = profile.intra_link
        return Link(kind=kind, bandwidth=profile.intra_link_bandwidth, latency=INTRA_LINKS[kind].latency)


class RankDevice(NamedTuple):
    """One rank of a cluster: its number, its node and its device profile."""

    rank: int
    node: Node
    profile: DeviceProfile


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cluster:
    """The machines a job runs on; ranks are numbered node by node.

    Example::

        cluster = parse_cluster("node0=8xA100-80GB,node1=8xV100-32GB;net=100Gbps")
        cluster.world_size            # 16
        cluster.link(0, 9).kind       # 'network'
    """

    nodes: tuple[Node, ...]
    network: Link = DEFAULT_NETWORK
    """The network between nodes, for nodes without their own ``network``."""

    def __post_init__(self) -> None:
        nodes = tuple(self.nodes)
        object.__setattr__(self, "nodes", nodes)
        if not nodes:
            raise ValueError("Cluster(nodes=()) needs at least one node")
        for node in nodes:
            if not isinstance(node, Node):
                raise TypeError(f"Cluster: nodes must be Node objects, got {node!r}")
        names = [n.name for n in nodes]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"Cluster: node names must be unique; repeated: {repeated}")
        if not isinstance(self.network, Link) or self.network.kind != "network":
            raise ValueError(
                f"Cluster: network must be a Link of kind 'network', got {self.network!r}"
            )

    @functools.cached_property
    def _starts(self) -> tuple[int, ...]:
        starts, at = [], 0
        for node in self.nodes:
            starts.append(at)
            at += node.num_devices
        return tuple(starts)

    @functools.cached_property
    def world_size(self) -> int:
        """Number of ranks (devices) in the cluster."""
        return sum(node.num_devices for node in self.nodes)

    @functools.cached_property
    def _devices(self) -> tuple[RankDevice, ...]:
        return tuple(
            RankDevice(start + i, node, device)
            for start, node in zip(self._starts, self.nodes, strict=True)
            for i, device in enumerate(node.devices)
        )

    def devices(self) -> tuple[RankDevice, ...]:
        """Every rank in order, with its node and device profile (built once: the search asks
        for them in its inner loops)."""
        return self._devices

    def node_of(self, rank: int) -> Node:
        """The node that holds ``rank``."""
        self._check_rank(rank)
        return self.nodes[bisect.bisect_right(self._starts, rank) - 1]

    def _check_rank(self, rank: object) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(
                f"rank {rank!r} is not in the cluster, whose ranks are 0..{self.world_size - 1}"
            )

    def _network(self, node: Node) -> Link:
        return node.network if node.network is not None else self.network

    def link(self, rank_a: int, rank_b: int) -> Link:
        """The alpha-beta link between two ranks: loopback, intra-node, or the network."""
        node_a, node_b = self.node_of(rank_a), self.node_of(rank_b)
        if rank_a == rank_b:
            return LOOPBACK
        if node_a is node_b:
            return node_a.device_link
        net_a, net_b = self._network(node_a), self._network(node_b)
        return Link(
            kind="network",
            bandwidth=min(net_a.bandwidth, net_b.bandwidth),
            latency=max(net_a.latency, net_b.latency),
        )

    def group_link(self, ranks: Iterable[int]) -> Link:
        """The slowest link inside a group: the lowest bandwidth and the largest latency.

        A ring collective moves at the pace of its slowest hop, so the group's collective cost
        uses this link. A group of one rank gets the loopback.
        """
        ranks = sorted(set(ranks))
        for rank in ranks:
            self._check_rank(rank)
        if len(ranks) < 2:
            return LOOPBACK
        by_node: dict[str, list[int]] = {}
        for rank in ranks:
            by_node.setdefault(self.node_of(rank).name, []).append(rank)
        firsts = [members[0] for members in by_node.values()]
        links = [self.link(m[0], m[1]) for m in by_node.values() if len(m) > 1]
        links += [self.link(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1 :]]
        slowest = min(links, key=lambda link: link.bandwidth)
        return Link(
            kind=slowest.kind,
            bandwidth=slowest.bandwidth,
            latency=max(link.latency for link in links),
        )

    @property
    def device_types(self) -> tuple[str, ...]:
        """Distinct device profile names, in rank order."""
        return tuple(dict.fromkeys(d.name for node in self.nodes for d in node.devices))

    @property
    def is_homogeneous(self) -> bool:
        """True when every rank has the same device profile."""
        return len({d for node in self.nodes for d in node.devices}) == 1

    def ranks_by_device(self) -> dict[str, tuple[int, ...]]:
        """Ranks grouped by device profile name, e.g. ``{"A100-80GB": (0, ..., 7), ...}``."""
        groups: dict[str, list[int]] = {}
        for rank, _, profile in self.devices():
            groups.setdefault(profile.name, []).append(rank)
        return {name: tuple(ranks) for name, ranks in groups.items()}

    def __str__(self) -> str:
        return format_cluster(self)


# --- link values as text -------------------------------------------------------------------

_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_PREFIX = {"": 0, "K": 3, "k": 3, "M": 6, "G": 9, "T": 12}  # powers of ten
_BANDWIDTH_RE = re.compile(rf"({_NUMBER})\s*([KkMGT]?)(bps|b/s|bit/s|B/s|Bps)")
_DURATION_RE = re.compile(rf"({_NUMBER})\s*(s|ms|us|µs|ns)")
_SECONDS = {"s": 0, "ms": -3, "us": -6, "µs": -6, "ns": -9}  # powers of ten


def parse_bandwidth(text: str) -> float:
    """Bytes/s from ``"100Gbps"``, ``"25 Gb/s"``, ``"300GB/s"`` (b = bits, B = bytes; SI prefixes).

    Example::

        >>> parse_bandwidth("100Gbps")
        12500000000.0
    """
    match = _BANDWIDTH_RE.fullmatch(str(text).strip())
    if match is None:
        raise ValueError(
            f"cannot read bandwidth {text!r}: write a number and a unit, e.g. '100Gbps' "
            "(bits: bps, Kbps, Mbps, Gbps, Tbps) or '300GB/s' (bytes: B/s, KB/s, MB/s, GB/s, TB/s)"
        )
    number, prefix, unit = match.groups()
    value = Decimal(number).scaleb(_PREFIX[prefix])  # exact: "5us" is 5e-06, not 5 * 1e-06
    return float(value / 8 if unit in ("bps", "b/s", "bit/s") else value)


def parse_duration(text: str) -> float:
    """Seconds from ``"5us"``, ``"1.5ms"``, ``"0s"``.

    Example::

        >>> parse_duration("5us")
        5e-06
    """
    match = _DURATION_RE.fullmatch(str(text).strip())
    if match is None:
        raise ValueError(
            f"cannot read time {text!r}: write a number and s, ms, us or ns, e.g. '5us'"
        )
    return float(Decimal(match.group(1)).scaleb(_SECONDS[match.group(2)]))


def _shortest(value: float, units: Iterable[tuple[str, int, bool]]) -> str:
    """The shortest exact text for ``value``; units are (name, power of ten, counts bits)."""
    exact = Decimal(repr(value))  # repr is the shortest decimal that reads back as ``value``
    texts = []
    for unit, power, bits in units:
        number = (exact * 8 if bits else exact).scaleb(-power).normalize()
        texts += [f"{number:f}".removesuffix(".0") + unit, str(number) + unit]
    return min(texts, key=len)


def format_bandwidth(value: float) -> str:
    """The shortest exact text for ``value`` bytes/s, e.g. ``"100Gbps"``."""
    text = _shortest(
        value,
        (
            ("Gbps", 9, True),
            ("Mbps", 6, True),
            ("GB/s", 9, False),
            ("TB/s", 12, False),
            ("MB/s", 6, False),
            ("B/s", 0, False),
        ),
    )
    assert parse_bandwidth(text) == value, (value, text)
    return text


def format_duration(value: float) -> str:
    """The shortest exact text for ``value`` seconds, e.g. ``"5us"``."""
    text = _shortest(
        value, (("us", -6, False), ("ms", -3, False), ("ns", -9, False), ("s", 0, False))
    )
    assert parse_duration(text) == value, (value, text)
    return text


def format_cluster(cluster: Cluster) -> str:
    """The cluster string of ``cluster``; ``cluster_spec.parse_cluster`` reads it back equal.

    Example::

        >>> format_cluster(parse_cluster("2xT4; net = 25 Gbps"))
        'node0=2xT4;net=25Gbps,lat=9.6us'
    """
    parts = []
    for node in cluster.nodes:
        options = []
        if node.network is not None:
            options += [
                f"net={format_bandwidth(node.network.bandwidth)}",
                f"lat={format_duration(node.network.latency)}",
            ]
        if node.intra_link is not None:
            options += [
                f"link={node.intra_link.kind}",
                f"intra={format_bandwidth(node.intra_link.bandwidth)}",
                f"intra_lat={format_duration(node.intra_link.latency)}",
            ]
        suffix = f"({','.join(options)})" if options else ""
        devices = "+".join(f"{count}x{profile.name}" for profile, count in node.blocks)
        parts.append(f"{node.name}={devices}{suffix}")
    text = ",".join(parts)
    if cluster.network != DEFAULT_NETWORK:
        text += (
            f";net={format_bandwidth(cluster.network.bandwidth)},"
            f"lat={format_duration(cluster.network.latency)}"
        )
    return text
