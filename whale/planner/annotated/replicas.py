"""Planning the data-parallel (``replicate``) strategy, and checking what the user annotated."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ...config import Config
from ...primitives import Annotation, Pipeline, Replicate, Split, VirtualDevices, validate_stack
from ...ir.plan import PartPlan, Plan
from ...ir.rows import split_rows

__all__ = [
    "check_annotations",
    "distinct_annotations",
    "name_annotations",
    "parts_of",
    "plan_data_parallel",
    "split_degree",
]


def name_annotations(scopes: Mapping[str, Sequence[Annotation]]) -> dict[int, str]:
    """Readable ids (``replicate#0``), numbered per kind in order of first appearance."""
    names: dict[int, str] = {}
    counts: dict[str, int] = {}
    for stack in scopes.values():
        for a in stack:
            if id(a) not in names:
                names[id(a)] = f"{a.kind}#{counts.get(a.kind, 0)}"
                counts[a.kind] = counts.get(a.kind, 0) + 1
    return names


def check_annotations(scopes: Mapping[str, Sequence[Annotation]], world_size: int) -> None:
    """Validate every annotation stack against the world, before any process group is used.

    Args:
        scopes: where -> annotation stack (outer first); ``where`` is a module path or a node.
        world_size: ranks in the job.
    """
    for where, stack in scopes.items():
        validate_stack(stack, where=where)
    first_place: dict[int, tuple[str, Annotation]] = {}
    for where, stack in scopes.items():
        for a in stack:
            first_place.setdefault(id(a), (where, a))
    for where, a in first_place.values():
        count = getattr(a, "device_count", None)
        if count is None:
            continue
        if count > world_size:
            raise ValueError(
                f"{a!r} at {where!r} asks for {count} devices but the world has {world_size} "
                f"ranks; use device_count <= {world_size} or launch more processes"
            )
        if a.kind == "replicate" and world_size % count:
            divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
            raise ValueError(
                f"{a!r} at {where!r}: {count} devices per replica group does not divide the "
                f"world of {world_size} ranks, so the outer data-parallel degree "
                f"{world_size}/{count} is not whole; use one of {divisors}"
            )
    for where, a in first_place.values():
        if isinstance(a, Pipeline) and not any(_stage_inside(a, s) for s in scopes.values()):
            raise ValueError(
                f"{a!r} at {where!r} has no stage() inside it: a pipeline needs its stages "
                "annotated with wh.stage() within its scope"
            )
        if isinstance(a, VirtualDevices) and not isinstance(a.layout, str):
            ranks = sorted(r for g in a.layout for r in g)
            if ranks != list(range(world_size)):
                raise ValueError(
                    f"{a!r} at {where!r}: the layout's groups hold ranks {ranks}, but they must "
                    f"hold each rank 0..{world_size - 1} exactly once"
                )


def _stage_inside(pipe: Annotation, stack: Sequence[Annotation]) -> bool:
    ids = [id(a) for a in stack]
    return id(pipe) in ids and any(a.kind == "stage" for a in stack[ids.index(id(pipe)) + 1 :])


def plan_data_parallel(
    scopes: Mapping[str, Sequence[Annotation]],
    world_size: int,
    config: Config,
    *,
    example_rows: int | None = None,
    ranks_per_node: int | None = None,
) -> Plan:
    """Plan a model whose parts are all data parallel (annotated ``replicate`` or unannotated).

    Args:
        scopes: module path (or graph node) -> its annotation stack, outer first. Paths with an
            empty stack fall to ``config.default_strategy``.
        world_size: ranks in the job.
        config: the user's options (row weights, micro-batches).
        example_rows: rows of the example batch, checked against the plan when given.
        ranks_per_node: ranks per node, for ``cluster(layout="node")``.

    Raises:
        ValueError: bad device counts, row weights, layouts or example batch.
        NotImplementedError: annotations whose execution whale does not provide yet.
    """
    check_annotations(scopes, world_size)
    names = name_annotations(scopes)
    tp = split_degree(scopes, world_size)
    dp = world_size // tp
    replicas = [a for a in distinct_annotations(scopes) if isinstance(a, Replicate)]
    counts = {a.device_count for a in replicas if a.device_count is not None}
    if len(counts) > 1:
        raise ValueError(
            f"replicate scopes ask for different device counts {sorted(counts)}; with no stages "
            "between them every part spans the same devices, so give them one device_count"
        )
    inner = counts.pop() if counts else dp
    if dp % inner:
        raise ValueError(
            f"replicate(device_count={inner}) does not divide the {dp} data-parallel replicas "
            f"({world_size} ranks / split over {tp}); use a device_count that divides {dp}"
        )
    if tp == 1:
        groups = _replica_groups(scopes, world_size, inner, ranks_per_node)
    else:
        if any(isinstance(a, VirtualDevices) and a.layout != "auto" for a in distinct_annotations(scopes)):
            raise NotImplementedError(
                "cluster(layout=...) together with split() is not supported yet; drop the layout "
                "(tensor-parallel groups are consecutive ranks, one node under torchrun)"
            )
        groups = tuple(tuple(range(s, s + inner)) for s in range(0, dp, inner))

    weights = (1.0,) * dp if config.row_weights is None else config.row_weights
    if len(weights) != dp:
        raise ValueError(
            f"Config(row_weights=...) has {len(weights)} entries but there are {dp} "
            "data-parallel replicas; give one weight per replica"
        )
    plan = Plan(
        world_size=world_size,
        # Tensor-parallel groups are consecutive ranks: one node under torchrun, fast links.
        pipelines=tuple(tuple(range(d * tp, (d + 1) * tp)) for d in range(dp)),
        row_weights=tuple(float(w) for w in weights),
        replica_groups=groups,
        num_micro_batch=config.num_micro_batch,
        parts=parts_of(scopes, names, inner, dp, tp),
        tensor_parallel=tp,
        shard_sizes=tuple(sorted((config.shard_sizes or {}).items())),
    )
    if example_rows is not None:
        rows = plan.rows(example_rows)
        if min(rows) < config.num_micro_batch:
            raise ValueError(
                f"the example batch of {example_rows} rows gives replicas {list(rows)} rows, "
                f"fewer than num_micro_batch={config.num_micro_batch} on some replica; use a "
                f"global batch of at least {config.num_micro_batch * world_size} rows or fewer "
                "micro-batches"
            )
        split_rows(rows[0], [1.0] * config.num_micro_batch, what="micro-batches")
    return plan


def split_degree(scopes: Mapping[str, Sequence[Annotation]], world_size: int) -> int:
    """Ranks per tensor-parallel group: the split() device count (all of ``world_size`` if unset)."""
    splits = [a for a in distinct_annotations(scopes) if isinstance(a, Split)]
    counts = {a.device_count for a in splits if a.device_count is not None}
    if len(counts) > 1:
        raise ValueError(
            f"split scopes ask for different device counts {sorted(counts)}; one tensor-parallel "
            "group shards every split part, so give them one device_count"
        )
    if not splits:
        return 1
    tp = counts.pop() if counts else world_size
    if world_size % tp:
        raise ValueError(
            f"split(device_count={tp}) does not divide the world of {world_size} ranks into "
            f"tensor-parallel groups; use a device_count that divides {world_size}"
        )
    return tp


def distinct_annotations(scopes: Mapping[str, Sequence[Annotation]]) -> list[Annotation]:
    """Each annotation once, in order of first appearance."""
    seen: dict[int, Annotation] = {}
    for stack in scopes.values():
        for a in stack:
            seen.setdefault(id(a), a)
    return list(seen.values())


def _replica_groups(
    scopes: Mapping[str, Sequence[Annotation]],
    world_size: int,
    inner: int,
    ranks_per_node: int | None,
) -> tuple[tuple[int, ...], ...]:
    layouts = [a for a in distinct_annotations(scopes) if isinstance(a, VirtualDevices) and a.layout != "auto"]
    if len(layouts) > 1:
        raise ValueError(f"two cluster layouts {layouts} cover one data-parallel model; keep one")
    if layouts and layouts[0].layout == "node":
        if ranks_per_node is None or world_size % ranks_per_node:
            raise ValueError(
                f"cluster(layout='node') needs the ranks per node (got {ranks_per_node}) to "
                f"divide the world of {world_size}; launch with torchrun --nproc_per_node"
            )
        if ranks_per_node % inner and inner % ranks_per_node:
            raise ValueError(
                f"cluster(layout='node'): replica groups of {inner} ranks cannot align with "
                f"nodes of {ranks_per_node} ranks"
            )
    if layouts and not isinstance(layouts[0].layout, str):
        groups = layouts[0].layout
        if any(len(g) != inner for g in groups):
            raise ValueError(
                f"{layouts[0]!r}: every group must hold replicate's device_count={inner} ranks, "
                f"got group sizes {[len(g) for g in groups]}"
            )
        return groups
    # torchrun numbers ranks node by node, so consecutive ranks share a node.
    return tuple(tuple(range(s, s + inner)) for s in range(0, world_size, inner))


def parts_of(
    scopes: Mapping[str, Sequence[Annotation]],
    names: dict[int, str],
    inner: int,
    replicas: int,
    tensor_parallel: int = 1,
) -> tuple[PartPlan, ...]:
    """One entry per annotated part (its innermost replicate or split) and one for the rest."""
    owners: dict[str, tuple[str, list[str]]] = {}
    for where, stack in scopes.items():
        marks = [a for a in stack if isinstance(a, (Replicate, Split))]
        key = names[id(marks[-1])] if marks else "default"
        kind = marks[-1].kind if marks else "replicate"
        owners.setdefault(key, (kind, []))[1].append(where)
    parts = []
    for key, (kind, paths) in owners.items():
        # Keep only outermost paths: "blocks" covers "blocks.0.mlp".
        outer = tuple(sorted(p for p in paths if not any(p != q and _inside(p, q) for q in paths)))
        if kind == "split":
            parts.append(PartPlan(key, "split", outer, tensor_parallel, replicas))
        else:
            parts.append(PartPlan(key, "replicate", outer, inner, replicas // inner))
    return tuple(sorted(parts, key=lambda p: p.name))


def _inside(path: str, parent: str) -> bool:
    return parent == "" or path.startswith(parent + ".")
