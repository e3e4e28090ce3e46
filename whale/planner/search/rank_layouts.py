"""Rank layouts: which devices form tensor-parallel groups, pipelines, and pipeline positions.

Given a tensor-parallel degree ``t`` and a pipeline degree ``p``, the ranks of a cluster are cut
into groups of ``t`` (inside one node, where the links are fast) and the groups are arranged as
``dp = groups / p`` pipelines of ``p`` positions. On a mixed cluster the arrangement matters:

* **position-major** (Megatron-LM's order, pipeline outermost): sorted groups fill position 0 of
  every replica, then position 1, ... With device types in blocks this gives every replica the
  same mix, each stage on one device type: Whale's heterogeneous virtual devices. Which type
  comes first is a choice: early stages hold more micro-batches under 1F1B, so the type with
  the most memory often belongs there; every order of the types is tried.
* **replica-major**: each replica's pipeline is consecutive groups, so most pipelines are of
  one type and rows balance the speed difference (Whale's data-parallel balancing).
* **exhaustive**: on small clusters, every distinct arrangement up to the order of replicas and
  the identity of devices within one node (they are interchangeable).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from ...ir.cluster_spec import Cluster
from ..cost.predict import RankLayout

__all__ = ["count_arrangements", "layouts", "tensor_groups"]


def tensor_groups(cluster: Cluster, degree: int) -> tuple[tuple[int, ...], ...] | None:
    """Consecutive ranks of each node in groups of ``degree``; None if a node does not divide.

    A group on a mixed node can hold several device types; its members then hold shards in
    proportion to their speed. The runtime takes one list of shard sizes for every group, so
    when some group is mixed all groups must have the same device types by tensor index
    (None otherwise: ``1xA100+1xT4,2xA100`` at degree 2 would need two size lists).

    Example::

        tensor_groups(parse_cluster("2xT4,2xA10"), 2)   # ((0, 1), (2, 3))
        tensor_groups(parse_cluster("1xA100-80GB+1xT4"), 2)   # ((0, 1),), A100 then T4
    """
    groups, start = [], 0
    for node in cluster.nodes:
        if node.num_devices % degree:
            return None
        groups += [tuple(range(start + k, start + k + degree)) for k in range(0, node.num_devices, degree)]
        start += node.num_devices
    names = [d.profile.name for d in cluster.devices()]
    patterns = {tuple(names[r] for r in g) for g in groups}
    if len(patterns) > 1 and any(len(set(p)) > 1 for p in patterns):
        return None
    return tuple(groups)


def _node_index(cluster: Cluster) -> list[int]:
    """The node number of every rank."""
    return [k for k, node in enumerate(cluster.nodes) for _ in range(node.num_devices)]


def _type_orders(cluster: Cluster, limit: int = 6) -> list[tuple[str, ...]]:
    types = list(cluster.device_types)
    if len(types) <= 3:
        return [tuple(order) for order in itertools.permutations(types)]
    by = {d.name: d for n in cluster.nodes for d in n.devices}
    keys = [lambda d: -d.peak("fp32"), lambda d: d.peak("fp32"), lambda d: -d.memory_bytes, lambda d: d.memory_bytes]
    orders = [tuple(types)] + [tuple(sorted(types, key=lambda name: key(by[name]))) for key in keys]
    return list(dict.fromkeys(orders))[:limit]


def count_arrangements(label_counts: tuple[int, ...], p: int, dp: int, cap: int) -> int:
    """Distinct arrangements of labelled groups into ``dp`` pipelines of ``p`` (stops at ``cap``)."""
    count = 0
    for _ in _arrangements(list(label_counts), p, dp, None):
        count += 1
        if count >= cap:
            break
    return count


def _arrangements(left: list[int], p: int, dp: int, previous: tuple[int, ...] | None) -> Iterator[tuple]:
    """Multisets of ``dp`` label sequences of length ``p`` using exactly ``left`` labels.

    Each multiset once, its sequences in nonincreasing order, multisets in increasing order of
    their first sequence. Sequences are built label by label, so a prefix that no label count
    or the order allows is dropped at once (not after enumerating every completion of it).
    """
    if dp == 0:
        yield ()
        return
    for seq in _sequences(left, p, previous):
        rest = list(left)
        for label in seq:
            rest[label] -= 1
        # Every later sequence begins with a label no larger than this one's first.
        if sum(rest[: seq[0] + 1]) < dp - 1:
            continue
        for tail in _arrangements(rest, p, dp - 1, seq):
            yield (seq, *tail)


def _sequences(left: list[int], p: int, upper: tuple[int, ...] | None) -> Iterator[tuple[int, ...]]:
    """Label sequences of length ``p`` within the counts ``left``, lexicographically at most
    ``upper`` (None: any), in increasing order."""
    counts = list(left)
    prefix: list[int] = []

    def extend(tight: bool) -> Iterator[tuple[int, ...]]:
        if len(prefix) == p:
            yield tuple(prefix)
            return
        top = upper[len(prefix)] if tight else len(counts) - 1
        for label in range(top + 1):
            if counts[label] == 0:
                continue
            counts[label] -= 1
            prefix.append(label)
            yield from extend(tight and label == top)
            prefix.pop()
            counts[label] += 1

    yield from extend(upper is not None)


def layouts(
    cluster: Cluster, degree: int, p: int, *, exhaustive_limit: int = 48
) -> list[RankLayout]:
    """Candidate layouts of ``degree``-rank groups into pipelines of ``p`` positions.

    Every layout of the families in the module docstring, each once (layouts that differ only
    in which interchangeable devices they use are the same). Exhaustive when the cluster has at
    most ``exhaustive_limit`` distinct arrangements.

    Example::

        for layout in layouts(parse_cluster("4xA100-80GB,4xV100-32GB"), 1, 2):
            print(layout.pipelines)
    """
    groups = tensor_groups(cluster, degree)
    if groups is None or len(groups) % p:
        return []
    dp = len(groups) // p
    node_of = _node_index(cluster)
    device_of = [d.profile.name for d in cluster.devices()]
    by_node: dict[int, list[tuple[int, ...]]] = {}
    for g in groups:
        by_node.setdefault(node_of[g[0]], []).append(g)
    found: dict[tuple, RankLayout] = {}

    def add(pipelines: list[list[tuple[int, ...]]]) -> None:
        key = tuple(sorted(tuple(node_of[g[0]] for g in pipe) for pipe in pipelines))
        if key not in found:
            found[key] = RankLayout(degree, tuple(tuple(pipe) for pipe in pipelines))

    nodes = sorted(by_node)
    counts = tuple(len(by_node[n]) for n in nodes)
    small = len(groups) <= 16 and len(nodes) ** p <= 4096
    if p > 1 and small and count_arrangements(counts, p, dp, exhaustive_limit + 1) <= exhaustive_limit:
        for arrangement in _arrangements(list(counts), p, dp, None):
            pools = {n: list(by_node[n]) for n in nodes}
            add([[pools[nodes[label]].pop(0) for label in seq] for seq in arrangement])
    type_rank = {name: k for k, name in enumerate(cluster.device_types)}
    for order in _type_orders(cluster):
        rank_of = {name: order.index(name) for name in type_rank}
        ordered = sorted(groups, key=lambda g: (rank_of[device_of[g[0]]], g[0]))
        add([[ordered[s * dp + d] for s in range(p)] for d in range(dp)])
        add([[ordered[d * p + s] for s in range(p)] for d in range(dp)])
    return list(found.values())
