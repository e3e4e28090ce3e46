"""Auto-parallel planning: the public entry points of the search.

* :func:`search` finds the fastest plan under the cost model for a model's layers on a cluster,
  keeping the user's pins (engine: :mod:`~.explore`).
* :func:`auto_plan` does it for a captured, possibly partly annotated model and returns an
  executable :class:`~.plan.Plan` with its :class:`~.report.PlanReport`; this is what
  ``whale.parallelize`` calls under ``Config(auto_parallel=True)`` and what ``whale plan`` prints.
* :func:`plan_of` turns a scored candidate into a ``Plan``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence

from ...config import Config
from ...primitives import Annotation
from ...ir.cluster_spec import Cluster, parse_cluster
from ..annotated.replicas import check_annotations, name_annotations, parts_of
from ..schedules.generate import make_schedule
from .explore import Explorer, NoPlanError, Scored, SearchResult, SearchSettings
from .memory_options import option_costs, search_with_memory, with_choice
from ..cost.model_profile import profile_model
from ..cost.layers import ModelProfile
from .pins import Pins, pins_from
from ...ir.plan import Plan
from ..cost.predict import CostOptions, RankLayout
from .report import PlanReport, build_report

__all__ = [
    "NoPlanError",
    "SearchResult",
    "SearchSettings",
    "auto_plan",
    "local_cluster",
    "plan_of",
    "search",
]


def search(
    profile: ModelProfile,
    cluster: Cluster,
    global_batch: int,
    *,
    options: CostOptions = CostOptions(),
    pins: Pins = Pins(),
    settings: SearchSettings = SearchSettings(),
) -> SearchResult:
    """The fastest plan under the cost model that fits in memory and keeps every pin.

    Args:
        profile: the model's layers (:func:`~.layers.profile_model`).
        cluster: the devices (:func:`~.cluster.parse_cluster`).
        global_batch: rows per step.
        options: precision, optimizer and memory headroom.
        pins: choices fixed by the user; ``pins.cuts`` defaults to ``profile.pinned_cuts``.
        settings: search space bounds.

    Raises:
        NoPlanError: nothing fits in memory (the message names the smallest shortfall).
        ValueError: pins that admit no plan, or a batch smaller than the cluster.

    Example::

        result = search(profile, parse_cluster("8xA100-80GB,8xV100-32GB"), 256)
        result.best.prediction.step_time
    """
    return _explorer_of(profile, cluster, global_batch, options=options, pins=pins, settings=settings).run()


def _explorer_of(profile, cluster, global_batch, *, options: CostOptions, pins: Pins, settings: SearchSettings) -> Explorer:
    """:func:`search`'s checks, and the search it runs (not run yet)."""
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"global_batch={global_batch!r} must be an int >= 1 (rows per step)")
    if pins.cuts is None and profile.pinned_cuts is not None:
        stages = len(profile.pinned_cuts) + 1
        if pins.num_stages is not None and pins.num_stages != stages:
            raise ValueError(f"{pins.where('num_stages')} but the model's stage annotations make {stages} stages")
        pins = dataclasses.replace(pins, cuts=profile.pinned_cuts, num_stages=stages)
    if pins.cuts is not None and pins.num_stages is not None and len(pins.cuts) + 1 != pins.num_stages:
        raise ValueError(f"{pins.where('num_stages')} but the pinned cuts make {len(pins.cuts) + 1} stages")
    return Explorer(profile, cluster, global_batch, options, pins, settings)


def plan_of(
    scored: Scored,
    profile: ModelProfile,
    cluster: Cluster,
    *,
    parts=(),
    replica_groups: Sequence[Sequence[int]] | None = None,
    stage_boundaries: Sequence[str] | None = None,
    shard_sizes: Mapping[str, Sequence[int]] | None = None,
) -> Plan:
    """The :class:`Plan` of a scored candidate.

    Rows become ``row_weights`` (``Plan.rows(global_batch)`` gives them back exactly, and other
    batch sizes proportionally). Stage boundaries are the names of the layers at the cuts,
    unless given (``()`` when ``stage()`` annotations define the stages). A pipeline lists its
    ranks position by position, each position's tensor-parallel group in order. The search
    forms tensor-parallel groups inside a node; ``shard_sizes`` holds only what the user
    pinned, and ``parallelize`` fills in speed-proportional sizes where a group mixes device
    types (:func:`~.shards.speed_shard_sizes` on the rewrite's regions).
    """
    c = scored.candidate
    layout: RankLayout = c.layout
    if stage_boundaries is None:
        stage_boundaries = tuple(profile.layers[k].name for k in c.cuts)
    dp = layout.dp_degree
    return Plan(
        world_size=cluster.world_size,
        pipelines=tuple(tuple(r for g in pipe for r in g) for pipe in layout.pipelines),
        row_weights=tuple(float(r) for r in c.rows),
        replica_groups=tuple(tuple(g) for g in replica_groups) if replica_groups else (tuple(range(dp)),),
        num_micro_batch=c.num_micro_batch,
        parts=tuple(parts),
        num_stages=c.num_stages,
        schedule=None if c.num_stages == 1 else make_schedule(
            c.schedule, c.num_stages, c.num_micro_batch,
            layout.pipeline_degree if c.schedule == "interleaved_1f1b" else None,
        ),
        stage_boundaries=tuple(stage_boundaries),
        tensor_parallel=layout.tensor_parallel,
        shard_sizes=tuple(sorted((shard_sizes or {}).items())),
    )


def local_cluster(world_size: int, ranks_per_node: int | None = None) -> Cluster:
    """The cluster a job runs on when none is described: this host's devices and their memory.

    Every rank gets this host's device type (its datasheet profile) with the memory
    it really has: under CUDA the GPU's own memory; on CPU the host's RAM, shared evenly by the
    ranks of a node (gloo ranks on one host are processes sharing its memory).

    Example::

        local_cluster(4)   # 4xCPU on a CPU host (RAM / 4 each), 4x<this GPU> under CUDA
    """
    import os

    import torch

    from ...ir.device_catalog import get_profile

    per_node = ranks_per_node or world_size
    if world_size % per_node:
        raise ValueError(f"{world_size} ranks are not whole nodes of {per_node} ranks")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        where = f"{name}'s memory"
    else:
        name = "CPU"
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // per_node
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows): the nominal figure
            memory = None
        where = f"this host's RAM / {per_node} ranks"
    try:
        profile = get_profile(name)
        if memory:
            profile = dataclasses.replace(profile, memory_bytes=memory, source=f"{profile.source}; memory: {where}")
        # The canonical name: CUDA's ("NVIDIA A100-SXM4-80GB") holds spaces a cluster string splits at.
        spec = ",".join(f"{per_node}x{profile.name}" for _ in range(world_size // per_node))
        return parse_cluster(spec, profiles=[profile])
    except ValueError as error:
        raise ValueError(
            f"the local device {name!r} has no profile: describe the cluster (Config(cluster=...) "
            f"or whale plan --cluster) or measure it with `whale profile`\n{error}"
        ) from None


def auto_plan(
    captured,
    scopes: Mapping[str, Sequence[Annotation]],
    world_size: int,
    config: Config,
    *,
    cluster: Cluster | None = None,
    global_batch: int,
    example_rows: int | None = None,
    options: CostOptions = CostOptions(),
    settings: SearchSettings | None = None,
    ranks_per_node: int | None = None,
    extra_pins: Pins | None = None,
    tensor_parallel_check: Callable[[int], str | None] | None = None,
    memory_options: Collection[str] | None = None,
    module_paths: Collection[str] | None = None,
) -> tuple[Plan, PlanReport]:
    """Plan a captured model automatically, keeping everything its annotations and Config pin.

    Args:
        captured: :func:`whale.capture.capture` of the model on one global batch.
        scopes: module path (or ``path:node``) -> annotation stack, as ``parallelize`` builds.
        world_size: ranks in the job; must equal the cluster's devices.
        config: the user's options (pins: see :mod:`~.pins`).
        cluster: the devices; None: :func:`local_cluster`.
        global_batch: rows per step the plan is balanced for.
        example_rows: rows of the batch ``captured`` was traced with; None reads them from
            the first input's dimension ``config.batch_dim``.
        options: precision, optimizer, memory headroom.
        settings: search bounds; None allows tensor parallelism exactly when the model has
            ``split()`` annotations (the runtime shards only split parts).
        ranks_per_node: for ``cluster(layout="node")`` and the local cluster.
        extra_pins: pins from elsewhere (the CLI), merged with those of the annotations.
        tensor_parallel_check: ``check(degree)`` is None where the rewrite can shard the
            model's ``split()`` parts over ``degree`` ranks, else why not (the heads or kv-head
            groups do not divide, say); the search proposes only degrees it accepts. None: any.
        memory_options: what the search may turn on where the plain plan does not fit
            (``"checkpoint"``, ``"zero"``, ``"offload"``; :mod:`~.memory_options`); None:
            checkpointing where ``config.activation_checkpointing == "auto"``.
        module_paths: the model's module paths (the layers checkpointing may name); None: any.

    Returns:
        ``(plan, report)``: the plan executes as-is on the data-parallel runtime
        (``plan.num_stages == 1``) or the pipeline runtime.

    Raises:
        ValueError: bad annotations or contradicting pins, a world that is not the cluster.
        NoPlanError: nothing fits in memory (a ``ValueError`` naming the smallest shortfall).

    Example::

        plan, report = auto_plan(captured, scopes, 16, config,
                                 cluster=parse_cluster("8xA100-80GB,8xV100-32GB"), global_batch=512)
    """
    check_annotations(scopes, world_size)
    cluster = cluster or local_cluster(world_size, ranks_per_node)
    if cluster.world_size != world_size:
        raise ValueError(
            f"the cluster has {cluster.world_size} devices ({cluster}) but the job has {world_size} "
            "ranks; describe one device per rank"
        )
    pins = pins_from(scopes, config)
    if extra_pins is not None:
        pins = _merge(pins, extra_pins)
    if settings is None:
        settings = SearchSettings(allow_tensor_parallel=pins.needs_tensor_parallel)
    if tensor_parallel_check is not None and (settings.allow_tensor_parallel or pins.tensor_parallel):
        settings = _shardable_degrees(settings, pins, world_size, tensor_parallel_check)
    if getattr(captured, "fixed_rows", None) is not None and _unpinned_structure(pins, config):
        # Export fixed the batch size: stages and shards run the graph on micro-batches of
        # other sizes, which it refuses; data parallel runs the model itself.
        pins = dataclasses.replace(pins, num_stages=1, sources={**pins.sources, "num_stages": (
            f"the captured graph runs only on {captured.fixed_rows} rows (data parallel only)")})
        settings = dataclasses.replace(settings, allow_tensor_parallel=False)
    if example_rows is None:
        example_rows = _example_rows(captured, config.batch_dim)
    profile = profile_model(captured, example_rows, boundaries=tuple(config.stage_boundaries or ()))
    if pins.replica_groups == "node":
        per_node = ranks_per_node or cluster.nodes[0].num_devices
        pins = dataclasses.replace(pins, replica_groups=tuple(
            tuple(range(s, s + per_node)) for s in range(0, world_size, per_node)))  # fmt: skip
    if memory_options is None:
        memory_options = ("checkpoint",) if config.activation_checkpointing == "auto" else ()
    plain = _explorer_of(profile, cluster, global_batch, options=options, pins=pins, settings=settings)
    try:
        result, memory = plain.run(), None
    except NoPlanError as err:  # memory options, where allowed (memory_options.py)
        result, memory = search_with_memory(profile, cluster, global_batch, err, options=options, pins=pins,
                                            settings=settings, allowed=memory_options, module_paths=module_paths,
                                            base=plain)  # fmt: skip
    dp = result.best.candidate.layout.dp_degree
    group = pins.replica_group or dp
    replica_groups = pins.replica_groups if isinstance(pins.replica_groups, tuple) else None
    replica_groups = replica_groups or tuple(tuple(range(s, s + group)) for s in range(0, dp, group))
    annotated_stages = profile.pinned_cuts is not None and not config.stage_boundaries
    plan = plan_of(
        result.best, profile, cluster,
        parts=parts_of(scopes, name_annotations(scopes), group, dp, result.best.candidate.layout.tensor_parallel),
        replica_groups=replica_groups,
        stage_boundaries=() if annotated_stages else None,
        shard_sizes=config.shard_sizes,
    )  # fmt: skip
    if memory is None:
        return plan, build_report(result, profile, cluster, plan, options=options)
    plan = with_choice(plan, memory, profile)
    report = build_report(result, profile, cluster, plan, options=options)
    return plan, dataclasses.replace(report, memory_lines=tuple(option_costs(profile, cluster, options, memory, result.best)))


def _unpinned_structure(pins: Pins, config: Config) -> bool:
    """Neither stages nor tensor parallelism are asked for by the user."""
    return (pins.num_stages is None and pins.pipeline_degree is None and pins.tensor_parallel is None
            and not pins.needs_tensor_parallel and not config.stage_boundaries)  # fmt: skip


def _shardable_degrees(settings: SearchSettings, pins: Pins, world_size: int, check) -> SearchSettings:
    """``settings`` limited to the tensor-parallel degrees the rewrite accepts; a pinned or
    required degree it refuses is an error naming its reason."""
    wanted = [pins.tensor_parallel] if pins.tensor_parallel else [
        t for t in (2, 4, 8, 16) if t <= settings.max_tensor_parallel and world_size % t == 0
    ]  # fmt: skip
    reasons = {t: check(t) for t in wanted if t > 1}
    allowed = tuple(t for t, why in reasons.items() if why is None)
    if pins.tensor_parallel and pins.tensor_parallel > 1 and not allowed:
        raise ValueError(
            f"{pins.where('tensor_parallel')}: the model's split() parts cannot be sharded over "
            f"{pins.tensor_parallel} ranks: {reasons[pins.tensor_parallel]}"
        )
    if pins.needs_tensor_parallel and not allowed:
        why = "; ".join(f"{t} ranks: {r}" for t, r in reasons.items()) or f"no degree divides {world_size} ranks"
        raise ValueError(f"the model's split() parts cannot be sharded over any tensor-parallel degree ({why})")
    return dataclasses.replace(settings, tensor_parallel_degrees=allowed)


def _merge(pins: Pins, extra: Pins) -> Pins:
    fields = {}
    for f in dataclasses.fields(Pins):
        if f.name in ("sources", "needs_tensor_parallel"):
            continue
        mine, theirs = getattr(pins, f.name), getattr(extra, f.name)
        if mine is not None and theirs is not None and mine != theirs:
            raise ValueError(
                f"{pins.where(f.name)} and {extra.where(f.name)} pin {f.name} to {mine!r} and "
                f"{theirs!r}; set it in one place"
            )
        fields[f.name] = mine if mine is not None else theirs
    return Pins(**fields, needs_tensor_parallel=pins.needs_tensor_parallel or extra.needs_tensor_parallel,
                sources={**extra.sources, **pins.sources})  # fmt: skip


def _example_rows(captured, dim: int) -> int:
    for node in captured.nodes:
        if node.op == "placeholder" and node.shapes and len(node.shapes[0]) > dim:
            return int(node.shapes[0][dim])
    raise ValueError(
        f"cannot tell the example batch's rows: no model input has a dimension {dim}; pass "
        "example_rows= to auto_plan"
    )
