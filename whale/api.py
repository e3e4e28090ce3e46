"""The top-level API: the only place that wires capture, planner, rewrite and runtime together."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .capture import (
    CapturedModel,
    CaptureError,
    capture,
    module_annotation_map,
    split_example_inputs,
)
from .capture.graph_io import rows_of
from .config import Config
from .ir.device_catalog import load_profiles
from .ir.plan import Plan
from .ir.rows import split_rows
from .ir.topology import Cluster
from .planner.annotated.cluster_rows import rows_on_cluster
from .planner.annotated.replicas import plan_data_parallel
from .planner.annotated.stages import count_stages, plan_pipeline
from .planner.cost.model_profile import profile_model
from .planner.cost.plan_cost import predict_plan
from .planner.cost.predict import cost_options
from .planner.saved_plan import check_saved_plan, load_plan
from .planner.search.auto import auto_plan, local_cluster
from .planner.search.memory_options import checkpoint_to_fit
from .planner.search.speed_shards import needs_speed_sizes, with_speed_sizes
from .planner.self_profile import cluster_from_reports, rank_report
from .rewrite.build import ProgramRewrite, tensor_parallel_check
from .rewrite.recompute import check_checkpoint_paths
from .runtime.adaptive import check_adaptive_plan
from .runtime.data_parallel import DataParallelProgram
from .runtime.offload import check_offload_dir
from .runtime.pipeline import PipelineProgram
from .runtime.process_group import init

__all__ = ["init", "parallelize"]


def parallelize(
    model: nn.Module,
    *,
    loss_fn: Callable[..., torch.Tensor],
    example_inputs: Any = None,
    config: Config | Mapping[str, Any] | None = None,
) -> DataParallelProgram | PipelineProgram:
    """Turn an annotated single-device model into this rank's part of a distributed program.

    Everything the user wrote is validated here, before any step and without touching the
    process group: annotations, device counts against the world, the example batch against
    the row split. ``wh.init()`` may come before or after; ``step`` needs it. Two options
    talk to the other ranks here, so they need ``wh.init()`` first: ``Config(cluster="auto")``
    (every rank measures its device, the ranks exchange what they found and all plan for that
    cluster) and ``Config(plan=...)`` (each rank's device is checked against the saved plan's).
    Rank 0 prints the plan it runs under those options and ``auto_parallel`` (``Config(quiet=True)``
    does not); ``program.plan`` is it.

    Args:
        model: the local model, annotated inside, by name (``wh.annotate``) or not at all.
        loss_fn: ``loss_fn(output, target) -> scalar``; a mean over rows unless
            ``Config(loss_reduction="sum")``.
        example_inputs: a global batch of model inputs used to capture the graph and check
            the plan: a tensor, a tuple of forward's positional inputs, or a dict of its keyword
            inputs (``{"input_ids": x, "attention_mask": m}``; ``None`` for an optional input
            left out). Without it, only module-level annotations are seen.
        config: a :class:`Config` or a mapping of its fields.

    Returns:
        The program: ``step``, ``parameters``, ``full_state_dict``, ``load_full_state_dict``.

    Raises:
        ValueError: example inputs that do not fit forward (naming the keyword and forward's
            parameters), checked first; annotations or a Config the world cannot run.

    Example::

        wh.init()
        program = wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=(x,))
        loss = program.step(x, y)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"parallelize(model=...) takes an nn.Module, got {type(model).__name__}")
    if example_inputs is not None:
        split_example_inputs(model, example_inputs, "parallelize(example_inputs=...)")
    if not callable(loss_fn):
        raise TypeError(f"parallelize(loss_fn=...) must be callable, got {loss_fn!r}")
    if config is None:
        config = Config()
    elif isinstance(config, Mapping):
        config = Config.from_dict(config)
    elif not isinstance(config, Config):
        raise TypeError(f"parallelize(config=...) takes wh.Config or a dict, got {type(config).__name__}")
    if not isinstance(config.activation_checkpointing, str):
        check_checkpoint_paths(model, config.activation_checkpointing)  # before any process group
    world_size, ranks_per_node = _world()
    if config.offload != "none":
        check_offload_dir(config.offload_dir)  # before any process group: every rank alike
    saved = load_plan(config.plan) if config.plan is not None else None
    if saved is not None:  # before the capture: another model or world fails at once
        plan = check_saved_plan(saved, model, world_size, _hardware(world_size))
    scopes, captured, capture_error, example_rows = _capture(model, example_inputs, config)
    measured = None
    if saved is not None and captured is None and (plan.num_stages > 1 or plan.tensor_parallel > 1):
        raise ValueError(
            f"the saved plan from {saved.source} has {plan.num_stages} stages and tensor parallel "
            f"{plan.tensor_parallel}, which are cut from the captured graph: pass example_inputs= "
            "(one global batch)" + (f"; capture failed:\n{capture_error}" if capture_error else "")
        )
    if saved is None:
        if config.cluster == "auto":
            measured = _measure_cluster(config, world_size)
            config = dataclasses.replace(config, cluster=measured, profiles=None)
        plan = _plan(model, scopes, captured, capture_error, example_rows, world_size, ranks_per_node, config)
        if measured is not None and not config.auto_parallel and config.row_weights is None:
            plan = _rows_on(plan, measured, captured, example_rows, config)
    _check_fixed_rows(plan, captured, example_rows)
    check_adaptive_plan(plan, config, captured.fixed_rows if captured is not None else None)
    plan, config = _memory_options(plan, config)
    if config.activation_checkpointing == "auto" and not config.auto_parallel and saved is None:
        plan = _checkpoint_to_fit(plan, model, captured, example_rows, config, world_size, ranks_per_node)
    rewrite = ProgramRewrite(model, captured, plan, loss_fn, sync_batch_norm=config.sync_batch_norm, example_rows=example_rows)
    if saved is None:  # a saved plan runs as written, its shard sizes too
        plan = with_speed_sizes(plan, config.cluster, rewrite.regions())
    built = rewrite.build(plan, _rank())
    program = PipelineProgram(built, config) if plan.num_stages > 1 else DataParallelProgram(built, config)
    program.predicted_step_time, program.predicted_timeline = _predict(
        plan, captured, example_rows, config, world_size, ranks_per_node
    )
    if not config.quiet and _rank() == 0 and (saved is not None or measured is not None or config.auto_parallel):
        print(_plan_summary(program.plan, example_rows, measured, saved), flush=True)
    return program


def _memory_options(plan: Plan, config: Config) -> tuple[Plan, Config]:
    """The plan and Config agreeing on the memory options: the checkpointed modules ``config``
    names (a list replaces the plan's own; ``"none"`` and ``"auto"`` keep what the plan, saved or
    planned, chose); ZeRO and offload as the Config sets them, else as the plan chose them (a
    saved plan that only fits with ZeRO runs with it), carried to the runtime in the Config."""
    for name, off in (("zero_stage", 0), ("offload", "none")):
        wanted, planned = getattr(config, name, off), getattr(plan, name)
        if wanted != off:
            plan = dataclasses.replace(plan, **{name: wanted})
        elif planned != off:
            if not hasattr(config, name):  # never run a plan without the memory option it needs
                raise ValueError(
                    f"the plan needs {name}={planned!r} (it does not fit without), which this whale's "
                    "runtime does not run; re-plan on a cluster with more memory"
                )
            config = dataclasses.replace(config, **{name: planned})
    if not isinstance(config.activation_checkpointing, str):
        plan = dataclasses.replace(plan, activation_checkpointing=tuple(config.activation_checkpointing))
    return plan, config


def _checkpoint_to_fit(plan, model, captured, example_rows, config, world_size, ranks_per_node) -> Plan:
    """``Config(activation_checkpointing="auto")`` on a plan the annotations fixed: the fewest
    layers that make it fit the cluster's memory (the search chooses them under auto_parallel)."""
    if captured is None or example_rows is None:
        warnings.warn("Config(activation_checkpointing='auto') needs the captured graph to size "
                      "activations; nothing is checkpointed", stacklevel=3)
        return plan
    try:
        cluster = config.cluster or local_cluster(world_size, ranks_per_node)
        profile = profile_model(captured, example_rows, boundaries=plan.stage_boundaries)
        paths = checkpoint_to_fit(plan, profile, cluster, example_rows, cost_options(config),
                                  {n for n, _ in model.named_modules()})
    except ValueError as err:
        warnings.warn(f"Config(activation_checkpointing='auto'): no memory prediction for this plan ({err}); "
                      "nothing is checkpointed", stacklevel=3)
        return plan
    return dataclasses.replace(plan, activation_checkpointing=paths)


def _measure_cluster(config: Config, world_size: int) -> Cluster:
    """``Config(cluster="auto")``: every rank measures itself (or reads ``config.profiles``) at
    once, the reports are exchanged over the default process group, and every rank builds the
    same cluster from them. A rank that cannot report fails every rank, after the exchange."""
    if config.profiles is not None:
        load_profiles(config.profiles)  # an unreadable file fails here, on every rank, before any exchange
    initialized = dist.is_available() and dist.is_initialized()
    if world_size > 1 and not initialized:
        raise ValueError(
            "Config(cluster='auto') measures the ranks and exchanges what they found when "
            "parallelize runs: call wh.init() before wh.parallelize"
        )
    if not initialized or world_size == 1:
        return cluster_from_reports([rank_report(0, profiles=config.profiles)])
    dist.barrier()  # every rank measures at once: ranks that share cores measure their share
    report = rank_report(dist.get_rank(), profiles=config.profiles)
    reports: list = [None] * world_size
    dist.all_gather_object(reports, report)
    return cluster_from_reports(reports)


def _rows_on(plan: Plan, cluster: Cluster, captured, example_rows, config: Config) -> Plan:
    """An annotated plan's rows for the measured cluster: by the cost model's step time where
    the graph tells it (under memory), else by speed."""
    profile = None
    if captured is not None and example_rows is not None and plan.num_stages == 1:
        profile = profile_model(captured, example_rows)
    elif captured is not None and example_rows is not None:
        try:
            profile = profile_model(captured, example_rows, boundaries=plan.stage_boundaries)
        except ValueError as err:
            warnings.warn(f"rows per replica follow measured speed alone: no cost model of the stages ({err})", stacklevel=3)
    return rows_on_cluster(plan, cluster, example_rows=example_rows, profile=profile, options=cost_options(config))


def _hardware(world_size: int) -> list[str | None]:
    """Each rank's device name (``"CPU"``, the CUDA device's), gathered where the process group
    is up; else this rank's only (None for the others)."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == world_size > 1:
        names: list = [None] * world_size
        dist.all_gather_object(names, name)
        return names
    names = [None] * world_size
    if 0 <= _rank() < world_size:
        names[_rank()] = name
    return names


def _plan_summary(plan: Plan, example_rows: int | None, measured: Cluster | None, saved) -> str:
    """What rank 0 prints of the plan it runs: where it came from, then its table."""
    if saved is not None:
        origin = f"the saved plan from {saved.source}" + (f" (made for {saved.cluster})" if saved.cluster else "")
    elif measured is not None:
        origin = f"the plan for the measured cluster {measured}"
    else:
        origin = "the searched plan (auto_parallel)"
    lines = plan.table(example_rows).splitlines()
    if plan.world_size > 16:  # concise on a large world: the first and last ranks
        ranks = lines[2 : 2 + plan.world_size]
        lines[2 : 2 + plan.world_size] = [*ranks[:8], f"  ... {plan.world_size - 12} ranks more ...", *ranks[-4:]]
    return "\n".join([f"whale: running {origin}", *lines])


def _predict(plan, captured, example_rows, config, world_size, ranks_per_node):
    """The cost model's time of ``program.step`` (seconds: forward, backward, gradient sync) and
    simulated timeline of ``plan`` on the cluster of ``config`` (else this host's device type),
    or ``(None, None)`` without a graph or a device profile. The timeline ends with the
    optimizer step the user runs after ``step`` (AdamW's, ``"optimizer"`` intervals); its
    ``step_time`` is the whole training step."""
    if captured is None or example_rows is None:
        return None, None
    try:
        cluster = config.cluster or local_cluster(world_size, ranks_per_node)
        profile = profile_model(captured, example_rows, boundaries=plan.stage_boundaries)
        estimate = predict_plan(plan, profile, cluster, example_rows, cost_options(config))
    except ValueError as err:  # the plan runs all the same; say why it has no prediction
        warnings.warn(f"whale has no step-time prediction for this plan: {err}", stacklevel=3)
        return None, None
    timeline = estimate.timeline
    stepped = [e for e in timeline.events if e.category != "optimizer"]
    step = max(e.end for e in stepped) - min(e.start for e in stepped) if stepped else 0.0
    return step, timeline


def _capture(model: nn.Module, example_inputs: Any, config: Config):
    """The annotations by where they were written, the captured graph (or why capture failed)
    and the example batch's rows."""
    scopes: dict[str, tuple] = dict(module_annotation_map(model))
    if example_inputs is None:
        return scopes, None, None, None
    args, kwargs = split_example_inputs(model, example_inputs, "parallelize(example_inputs=...)")
    example_rows = _rows_of(args, kwargs, config.batch_dim)
    try:
        captured = capture(model, args, example_kwargs=kwargs, batch_dim=config.batch_dim)
    except CaptureError as err:
        return scopes, None, err, example_rows
    for node in captured.nodes:
        # Annotations written inside forward() show on nodes beyond their module's own.
        if len(node.annotations) > len(scopes.get(node.module_path, ())):
            scopes[f"{node.module_path}:{node.name}"] = node.annotations
    return scopes, captured, None, example_rows


def _plan(model, scopes, captured, capture_error, example_rows, world_size, ranks_per_node, config) -> Plan:
    """The plan: searched (``auto_parallel``), or from the annotations and the Config."""
    def needs_graph(what: str) -> ValueError:
        return ValueError(
            f"{what}: pass example_inputs= (one global batch)"
            + (f"; capture failed:\n{capture_error}" if capture_error else "")
        )

    if config.auto_parallel:
        if captured is None:
            raise needs_graph("Config(auto_parallel=True) plans from the captured graph")
        plan, _ = auto_plan(
            captured, scopes, world_size, config, cluster=config.cluster, options=cost_options(config),
            global_batch=example_rows, ranks_per_node=ranks_per_node,
            tensor_parallel_check=tensor_parallel_check(model, captured),
            module_paths={n for n, _ in model.named_modules()},  # Config(activation_checkpointing="auto")
        )
        return plan
    if count_stages(scopes, config):
        plan = plan_pipeline(scopes, world_size, config, example_rows=example_rows)
        if captured is None:
            raise needs_graph("pipeline stages are cut from the captured graph")
        _check_stages_compute(scopes, captured)
        return plan
    if capture_error is not None:
        # Data parallel needs no graph: module-level annotations still hold, but any
        # annotation written inside forward cannot be seen, and the user is told so.
        warnings.warn(
            f"whale could not capture {type(model).__name__} as a graph, so annotations "
            f"inside forward() are not seen; module-level annotations still apply.\n{capture_error}",
            stacklevel=3,
        )
    plan = plan_data_parallel(scopes, world_size, config, example_rows=example_rows, ranks_per_node=ranks_per_node)
    if plan.tensor_parallel > 1 and captured is None:
        raise needs_graph("split() shards the captured graph")
    return plan


def speed_sizes(plan: Plan, cluster: Cluster, model: nn.Module, captured: CapturedModel) -> Plan:
    """``plan`` with shard sizes in proportion to device speed where its tensor groups mix types
    (what ``parallelize`` runs; ``whale plan`` shows the sizes this gives).

    Example::

        plan = speed_sizes(plan, parse_cluster("node0=1xA100-80GB+1xT4"), model, captured)
    """
    if not needs_speed_sizes(plan, cluster):
        return plan
    return with_speed_sizes(plan, cluster, ProgramRewrite(model, captured, plan, loss_fn=None).regions())


def _check_stages_compute(scopes: Mapping[str, tuple], captured) -> None:
    """A stage() on a module that forward() never calls would be an empty stage."""
    used = {id(a) for a in captured.annotations_used()}
    for where, stack in scopes.items():
        for a in stack:
            if a.kind == "stage" and id(a) not in used:
                raise ValueError(
                    f"{a!r} at {where!r} owns no computation: forward() never runs that module; "
                    "remove the annotation or annotate a module that forward() calls"
                )


def _check_fixed_rows(plan: Plan, captured: CapturedModel | None, example_rows: int | None) -> None:
    """A graph export could not make batch-dynamic runs only on its example's rows: the
    micro-batches a pipeline or tensor-parallel program feeds it must have exactly those."""
    if captured is None or captured.fixed_rows is None or example_rows is None:
        return
    if plan.num_stages == 1 and plan.tensor_parallel == 1:
        return  # plain data parallel runs the model itself, on any rows
    micro = sorted({
        r for replica in plan.rows(example_rows) if replica
        for r in split_rows(replica, [1.0] * plan.num_micro_batch, what="micro-batches")
    })
    if micro != [captured.fixed_rows]:
        raise ValueError(
            f"the captured graph of the model runs only on batches of {captured.fixed_rows} rows "
            f"(torch.export fixed the batch size; the capture warning says where), but this plan "
            f"feeds it micro-batches of {micro} rows ({example_rows} example rows over "
            f"{len(plan.rows(example_rows))} replicas x {plan.num_micro_batch} micro-batches); "
            f"make the batch size traceable, or choose rows so that every micro-batch has "
            f"{captured.fixed_rows}"
        )


def _rank() -> int:
    """This process's rank: the group's once ``wh.init()`` ran, else torchrun's ``RANK``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _world() -> tuple[int, int | None]:
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return world, int(local) if local else None


def _rows_of(args: tuple, kwargs: Mapping[str, Any], dim: int) -> int:
    """Rows of the example batch (:func:`~whale.capture.graph_io.rows_of`), or an error."""
    rows = rows_of(args, kwargs, dim)
    if rows is not None:
        return rows
    given = [type(a).__name__ for a in args] + [f"{k}={type(v).__name__}" for k, v in kwargs.items()]
    raise ValueError(
        f"parallelize(example_inputs=...): no tensor with a batch dimension {dim} among {given}"
    )
