"""Hardware-aware rows for an annotated plan (Whale, Jia et al. ATC'22, section 4.2): each
data-parallel replica takes rows in proportion to its devices' speed, under their memory.

An annotated plan (``replicate``, ``split``, ``stage``) fixes the structure; on a measured
cluster (``Config(cluster="auto")``) only the rows per replica are left to choose. A replica's
speed is its slowest pipeline position's; a position's, its tensor-parallel group's: the sum of
its devices' speeds where the shards follow device speed (a group of mixed devices), else the
group size times its slowest device. Without stages, a replica's rows are also capped by its
memory: the parameters, gradients and AdamW states it holds, and one micro-batch's activations
per row (the cost model's :func:`~whale.planner.cost.formulas.training_memory`, fp32).
"""

from __future__ import annotations

import dataclasses

from ...ir.plan import Plan
from ...ir.topology import Cluster
from ..cost.formulas import training_memory
from ..cost.layers import ModelProfile
from ..search.balance import rows_by_speed

__all__ = ["MEMORY_FRACTION", "replica_speeds", "rows_on_cluster"]

MEMORY_FRACTION = 0.9
"""Share of a device's memory the rows may fill (as the search's default headroom)."""


def replica_speeds(plan: Plan, cluster: Cluster) -> tuple[float, ...]:
    """Each replica's speed (fp32 FLOP/s of its devices, as described above).

    Example::

        replica_speeds(plan, parse_cluster("node0=1xA100-80GB+1xT4"))   # (1.95e13, 8.1e12)
    """
    if cluster.world_size != plan.world_size:
        raise ValueError(f"the cluster has {cluster.world_size} devices but the plan {plan.world_size} ranks")
    devices = cluster.devices()
    tp = plan.tensor_parallel
    speeds = []
    for ranks in plan.pipelines:
        positions = []
        for p in range(plan.pipeline_degree):
            group = [devices[r].profile for r in ranks[p * tp : (p + 1) * tp]]
            mixed = len({d.name for d in group}) > 1 and not plan.shard_sizes
            rates = [d.peak("fp32") for d in group]
            positions.append(sum(rates) if mixed else tp * min(rates))
        speeds.append(min(positions))
    return tuple(speeds)


def rows_on_cluster(plan: Plan, cluster: Cluster, *, example_rows: int | None = None,
                    profile: ModelProfile | None = None) -> Plan:  # fmt: skip
    """``plan`` with rows per replica by speed on ``cluster``, under memory where it can tell.

    Args:
        plan: an annotated plan (its rows are replaced; pinned rows are kept).
        cluster: one device per rank of the plan.
        example_rows: rows of one global batch: the rows are cut exactly for it (and in
            proportion for other batch sizes); None gives the weights only.
        profile: the model's layers (:func:`~whale.planner.cost.model_profile.profile_model`),
            for the memory cap of a plan without stages; None: no cap.

    Raises:
        ValueError: the batch does not fit in the replicas' memory, or gives some replica fewer
            rows than micro-batches (the message says how many fit).

    Example::

        plan = rows_on_cluster(plan, cluster, example_rows=48, profile=profile)
        plan.rows(48)   # (32, 16) when rank 0 is twice as fast
    """
    if plan.pinned_rows is not None or plan.dp_degree == 1:
        return plan
    speeds = replica_speeds(plan, cluster)
    if example_rows is None:
        top = max(speeds)
        return dataclasses.replace(plan, row_weights=tuple(s / top for s in speeds))
    capacity = None
    if profile is not None and plan.num_stages == 1:
        capacity = _row_capacity(plan, cluster, profile)
    try:
        rows = rows_by_speed(example_rows, speeds, capacity, minimum=plan.num_micro_batch)
    except ValueError as err:
        raise ValueError(f"rows per replica on the measured cluster {cluster}: {err}") from None
    return dataclasses.replace(plan, row_weights=tuple(float(r) for r in rows))


def _row_capacity(plan: Plan, cluster: Cluster, profile: ModelProfile) -> list[int]:
    """Most rows each replica holds: what its tightest device has left after the model's
    parameters, gradients and optimizer states, over the activations one row leaves (one
    micro-batch's rows are in flight at a time)."""
    devices = cluster.devices()
    tp = plan.tensor_parallel
    params = sum(layer.param_bytes for layer in profile.layers)
    act = sum(layer.act_bytes for layer in profile.layers)
    replicated_params = sum(layer.replicated_param_bytes for layer in profile.layers)
    replicated_act = sum(layer.replicated_act_bytes for layer in profile.layers)
    held = replicated_params + (params - replicated_params) // tp
    held -= held % 4  # whole fp32 parameters
    per_row = replicated_act + (act - replicated_act) / tp
    static = training_memory(param_bytes=held, precision="fp32", optimizer="adamw").total
    capacity = []
    for ranks in plan.pipelines:
        room = min(devices[r].profile.memory_bytes for r in ranks) * MEMORY_FRACTION - static
        per_micro = int(room // per_row) if per_row > 0 else 1 << 40
        capacity.append(max(0, per_micro) * plan.num_micro_batch)
    return capacity
