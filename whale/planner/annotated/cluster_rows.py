"""Hardware-aware rows for an annotated plan (Whale, Jia et al. ATC'22, section 4.2): each
data-parallel replica takes the rows that make the replicas finish their steps together, under
their memory.

An annotated plan (``replicate``, ``split``, ``stage``) fixes the structure; on a measured
cluster (``Config(cluster="auto")``) only the rows per replica are left to choose. With the
model's layers (a captured graph), the rows minimise the cost model's step time
(:class:`~whale.planner.cost.predict.CostModel`): a replica's time is its schedule's compute
for its rows plus what does not shrink with rows (each operation's fixed cost, the exposed
gradient sync, the optimizer step), all at its devices' measured speeds, and the step waits
for the slowest replica (a min-max, :func:`~whale.planner.search.balance.balance_rows`). Rows
in proportion to speed alone would leave a slow replica its share of the fixed costs on top.

Without the layers, rows follow speed: a replica's speed is its slowest pipeline position's; a
position's, its tensor-parallel group's: the sum of its devices' speeds where the shards follow
device speed (a group of mixed devices), else the group size times its slowest device. Without
stages, a replica's rows are also capped by its memory: the parameters, gradients and AdamW
states it holds, and one micro-batch's activations per row (the cost model's
:func:`~whale.planner.cost.formulas.training_memory`, fp32); the cost model also refuses rows
whose activations its schedule cannot hold.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

from ...ir.plan import Plan
from ...ir.topology import Cluster
from ..cost.formulas import training_memory
from ..cost.layers import ModelProfile
from ..cost.plan_cost import candidate_of
from ..cost.predict import CostModel, CostOptions
from ..search.balance import balance_rows, rows_by_speed

__all__ = ["MEMORY_FRACTION", "replica_speeds", "rows_by_cost", "rows_on_cluster"]

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
                    profile: ModelProfile | None = None, options: CostOptions | None = None) -> Plan:  # fmt: skip
    """``plan`` with rows per replica for ``cluster``: by the cost model's step time where it
    has the model's layers, else by speed; under memory where it can tell.

    Args:
        plan: an annotated plan (its rows are replaced; pinned rows are kept).
        cluster: one device per rank of the plan.
        example_rows: rows of one global batch: the rows are cut exactly for it (and in
            proportion for other batch sizes); None gives the weights by speed only.
        profile: the model's layers (:func:`~whale.planner.cost.model_profile.profile_model`,
            with the plan's stage boundaries), for :func:`rows_by_cost` and the memory cap of
            a plan without stages; None: rows by speed, no cap.
        options: the cost model's options (:func:`~whale.planner.cost.predict.cost_options` of
            the job's Config); None: the defaults.

    Raises:
        ValueError: the batch does not fit in the replicas' memory, or gives some replica fewer
            rows than micro-batches (the message says how many fit).

    Example::

        plan = rows_on_cluster(plan, cluster, example_rows=48, profile=profile)
        plan.rows(48)   # more than (32, 16) when rank 0 is twice as fast and steps have fixed costs
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
    if profile is not None:
        try:
            rows = rows_by_cost(plan, cluster, profile, example_rows, capacity=capacity, guess=rows, options=options)
        except ValueError as err:
            warnings.warn(f"rows per replica on the measured cluster {cluster} follow speed alone {rows}: the "
                          f"cost model has no step time for them ({err})", stacklevel=2)  # fmt: skip
    return dataclasses.replace(plan, row_weights=tuple(float(r) for r in rows))


def rows_by_cost(plan: Plan, cluster: Cluster, profile: ModelProfile, example_rows: int, *,
                 capacity: list[int] | None = None, guess: tuple[int, ...] | None = None,
                 options: CostOptions | None = None) -> tuple[int, ...]:  # fmt: skip
    """Rows per replica that minimise the cost model's step time of ``plan`` on ``cluster``.

    Each replica's time is :meth:`~whale.planner.cost.predict.CostModel.replica_cost`: its
    schedule over its rows, the gradient sync it does not hide and its optimizer step, at its
    devices' speeds; the step is the slowest replica's. Replicas on the same devices cost the
    same, so :func:`~whale.planner.search.balance.balance_rows` solves the min-max over classes
    of them exactly (the times only grow with rows).

    Args:
        plan, cluster, profile, example_rows: as :func:`rows_on_cluster`.
        capacity: most rows per replica (memory), or None.
        guess: rows per replica near the answer (the speed split), to start the search.
        options: the cost model's options (default: fp32, AdamW).

    Raises:
        ValueError: no rows fit (the cost model's memory, ``capacity``), or the profile does
            not know the plan's stage cuts.

    Example::

        rows_by_cost(plan, cluster, profile_model(captured, 24), 24)   # (18, 6): bench_hetero's GPT, rank 1 2x slower
    """
    costs = CostModel(profile, cluster, options or CostOptions())
    candidate = candidate_of(plan, profile, example_rows)
    layout, s, m = candidate.layout, candidate.num_stages, candidate.num_micro_batch
    sync = costs.sync_time(layout, s, candidate.cuts)
    classes: dict[tuple, list[int]] = {}
    for d, pipeline in enumerate(layout.pipelines):
        key = (
            tuple(tuple(costs.device_of[r].name for r in group) for group in pipeline),
            tuple(costs.link(pipeline[k][0], pipeline[(k + 1) % len(pipeline)][0]) for k in range(len(pipeline))),
            capacity[d] if capacity is not None else None,
        )
        classes.setdefault(key, []).append(d)
    members = list(classes.values())

    def time_of(c: int, rows: int) -> float:
        first = members[c][0]
        if capacity is not None and rows > capacity[first]:
            return math.inf
        return costs.replica_cost(layout.pipelines[first], s, candidate.schedule, m, candidate.cuts, rows, sync).time

    start = None if guess is None else [max(guess[d] for d in replicas) for replicas in members]
    per_class = balance_rows(example_rows, [len(r) for r in members], time_of, minimum=m, guess=start)
    if per_class is None:
        raise ValueError(f"no {example_rows} rows fit the replicas' memory under the cost model")
    rows = [0] * len(layout.pipelines)
    for replicas, counts in zip(members, per_class, strict=True):
        for d, r in zip(replicas, sorted(counts, reverse=True), strict=True):
            rows[d] = r
    return tuple(rows)


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
