"""Shard widths of ``split`` parts on tensor-parallel groups of mixed devices.

A group inside a mixed node (``ws=1xA100-80GB+1xT4``) holds devices of different speed. The
cost model gives each member a share of the sharded work in proportion to its speed
(:meth:`~.predict.CostModel.shard_shares`); :func:`speed_shard_sizes` turns those shares into
whole atoms (heads, columns, classes, experts) per rank for each sharded region, so the
runtime computes what the plan predicted. Groups of one device type keep even shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from .balance import shard_sizes_by_speed
from ...ir.cluster_spec import Cluster
from ...ir.plan import Plan
from ..cost.formulas import training_memory
from ..cost.predict import CostOptions, achievable_peak

__all__ = ["needs_speed_sizes", "speed_shard_sizes", "with_speed_sizes"]


def speed_shard_sizes(
    cluster: Cluster,
    groups: Sequence[Sequence[int]],
    regions: Mapping[str, tuple[int, int]],
    options: CostOptions | None = None,
) -> dict[str, tuple[int, ...]]:
    """Atoms per rank of every sharded region, in proportion to device speed, within memory.

    Each member's speed is :func:`~.predict.achievable_peak`, the cost model's measure. Memory:
    a member may spend on a region's weights, gradients and optimizer states the part of its
    usable memory that the region holds of all sharded parameters, so the sizes of all
    regions together never put more sharded state on a device than it holds.

    Args:
        cluster: the devices; ranks are the cluster's ranks.
        groups: the tensor-parallel groups that shard these regions (ranks by tensor index).
        regions: region name -> (atoms, parameters per atom).
        options: the dtype (speed), optimizer, precision and memory fraction of the plan
            (None: the defaults ``auto_plan`` plans with).

    Returns:
        Region name -> atoms per tensor index; empty when every group is of one device type
        (even shards are then the proportional ones).

    Raises:
        ValueError: groups of different device types by tensor index (the runtime takes one
            size list for all of them), or a region that fits on no split of the group.

    Example::

        speed_shard_sizes(parse_cluster("1xA100-80GB+1xT4"), [(0, 1)], {"attn": (16, 4096)})
        # {'attn': (11, 5)}: fp32 peaks of 19.5 and 8.1 TFLOP/s
    """
    options = options or CostOptions()
    devices = [d.profile for d in cluster.devices()]
    patterns = {tuple(devices[r] for r in g) for g in groups}
    if all(len(set(p)) == 1 for p in patterns):
        return {}
    if len(patterns) > 1:
        names = sorted(" + ".join(d.name for d in p) for p in patterns)
        raise ValueError(
            f"tensor-parallel groups {[tuple(g) for g in groups]} mix device types differently "
            f"({names}), so each would need its own shard sizes; the runtime takes one list per "
            "region: give every group the same device types by tensor index, or pass "
            "Config(shard_sizes=...)"
        )
    (pattern,) = patterns
    speeds = [achievable_peak(d, options) for d in pattern]
    usable = [d.memory_bytes * options.memory_fraction for d in pattern]
    per_param = training_memory(1, optimizer=options.optimizer, precision=options.precision).total
    total = sum(n * p for n, p in regions.values())
    out = {}
    for name, (num_atoms, params_per_atom) in regions.items():
        caps = None
        if params_per_atom > 0:
            budget = [u * (num_atoms * params_per_atom / total) for u in usable]
            caps = [int(b // (params_per_atom * per_param)) for b in budget]
        try:
            out[name] = shard_sizes_by_speed(num_atoms, speeds, caps)
        except ValueError as error:
            raise ValueError(
                f"cannot shard {name or '<root>'!r} ({num_atoms} atoms) over "
                f"{' + '.join(d.name for d in pattern)} by speed within memory: {error}"
            ) from None
    return out


def needs_speed_sizes(plan: Plan, cluster: Cluster | None) -> bool:
    """True when a tensor group of ``plan`` mixes device types of ``cluster`` and the user gave
    no sizes."""
    if plan.tensor_parallel == 1 or plan.shard_sizes or cluster is None:
        return False
    if cluster.world_size != plan.world_size:
        raise ValueError(
            f"Config(cluster={str(cluster)!r}) has {cluster.world_size} devices but the job has "
            f"{plan.world_size} ranks; describe one device per rank"
        )
    names = [d.profile.name for d in cluster.devices()]
    t = plan.tensor_parallel
    return any(len({names[r] for r in pipe[k : k + t]}) > 1 for pipe in plan.pipelines for k in range(0, len(pipe), t))


def with_speed_sizes(
    plan: Plan, cluster: Cluster | None, regions: Mapping[int, Mapping[str, tuple[int, float]]]
) -> Plan:
    """``plan`` with shard sizes in proportion to device speed where its tensor groups mix
    types, else ``plan`` itself.

    Args:
        plan: the plan (its ``shard_sizes`` hold what the user pinned).
        cluster: the devices, one per rank.
        regions: per split stage (0 without stages), each region's atoms and parameters per
            atom by name, as the rewrite found them.

    Example::

        plan = with_speed_sizes(plan, parse_cluster("node0=1xA100-80GB+1xT4"), rewrite.regions())
    """
    if not needs_speed_sizes(plan, cluster):
        return plan
    t, sizes = plan.tensor_parallel, {}
    for stage, by_name in regions.items():
        pos = stage % plan.pipeline_degree
        groups = [pipe[pos * t : (pos + 1) * t] for pipe in plan.pipelines]
        sizes.update(speed_shard_sizes(cluster, groups, by_name))
    if not sizes:
        return plan
    return dataclasses.replace(plan, shard_sizes=tuple(sorted(sizes.items())))
