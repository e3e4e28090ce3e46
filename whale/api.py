"""The top-level API: the only place that wires capture, planner and runtime together."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .capture import CaptureError, capture, module_annotation_map
from .config import Config
from .ir.cluster_spec import Cluster
from .planner.annotated.replicas import plan_data_parallel
from .planner.annotated.stages import count_stages, plan_pipeline
from .ir.plan import Plan
from .planner.search.auto import auto_plan
from .planner.search.speed_shards import speed_shard_sizes
from .rewrite.stage_split import assign_stages, capture_split_stages, split_stages
from .rewrite.tensor_parallel.shard import TensorParallelAnalysis, resolve_sizes
from .runtime.data_parallel import DataParallelProgram
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
    the row split. ``wh.init()`` may come before or after; ``step`` needs it.

    Args:
        model: the local model, annotated inside, by name (``wh.annotate``) or not at all.
        loss_fn: ``loss_fn(output, target) -> scalar``; a mean over rows unless
            ``Config(loss_reduction="sum")``.
        example_inputs: a global batch of model inputs (tensor or tuple) used to capture the
            graph and check the plan. Without it, only module-level annotations are seen.
        config: a :class:`Config` or a mapping of its fields.

    Returns:
        The program: ``step``, ``parameters``, ``full_state_dict``, ``load_full_state_dict``.

    Example::

        wh.init()
        program = wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=(x,))
        loss = program.step(x, y)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"parallelize(model=...) takes an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"parallelize(loss_fn=...) must be callable, got {loss_fn!r}")
    if config is None:
        config = Config()
    elif isinstance(config, Mapping):
        config = Config.from_dict(config)
    elif not isinstance(config, Config):
        raise TypeError(f"parallelize(config=...) takes wh.Config or a dict, got {type(config).__name__}")
    world_size, ranks_per_node = _world()
    scopes: dict[str, tuple] = dict(module_annotation_map(model))
    example_rows = None
    captured = None
    capture_error = None
    if example_inputs is not None:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        example_rows = _rows_of(args, config.batch_dim)
        try:
            captured = capture(model, args)
        except CaptureError as err:
            capture_error = err
        else:
            for node in captured.nodes:
                # Annotations written inside forward() show on nodes beyond their module's own.
                if len(node.annotations) > len(scopes.get(node.module_path, ())):
                    scopes[f"{node.module_path}:{node.name}"] = node.annotations

    if config.auto_parallel:
        if captured is None:
            raise ValueError(
                "Config(auto_parallel=True) plans from the captured graph: pass example_inputs= "
                "(one global batch)" + (f"; capture failed:\n{capture_error}" if capture_error else "")
            )
        plan, _ = auto_plan(
            captured, scopes, world_size, config, cluster=config.cluster,
            global_batch=example_rows, ranks_per_node=ranks_per_node,
        )
        return _program(model, loss_fn, plan, config, captured)

    if count_stages(scopes, config):
        plan = plan_pipeline(scopes, world_size, config, example_rows=example_rows)
        if captured is None:
            raise ValueError(
                "pipeline stages are cut from the captured graph: pass example_inputs= (one "
                "global batch)" + (f"; capture failed:\n{capture_error}" if capture_error else "")
            )
        _check_stages_compute(scopes, captured)
        return _program(model, loss_fn, plan, config, captured)

    if capture_error is not None:
        # Data parallel needs no graph: module-level annotations still hold, but any
        # annotation written inside forward cannot be seen, and the user is told so.
        warnings.warn(
            f"whale could not capture {type(model).__name__} as a graph, so annotations "
            f"inside forward() are not seen; module-level annotations still apply.\n{capture_error}",
            stacklevel=2,
        )
    plan = plan_data_parallel(
        scopes, world_size, config, example_rows=example_rows, ranks_per_node=ranks_per_node
    )
    if plan.tensor_parallel > 1 and captured is None:
        raise ValueError(
            "split() shards the captured graph: pass example_inputs= (one global batch)"
            + (f"; capture failed:\n{capture_error}" if capture_error else "")
        )
    return _program(model, loss_fn, plan, config, captured)


def _program(model, loss_fn, plan, config, captured) -> DataParallelProgram | PipelineProgram:
    """The program that executes ``plan``, after checking every rewrite it needs.

    The rewrites are checked here, before any group exists: kinds the split pass cannot shard,
    more shards than heads or experts, shard sizes that do not add up.
    """
    if plan.num_stages > 1:
        stage_of, num_stages = assign_stages(captured, plan.stage_boundaries or None)
        assert num_stages == plan.num_stages
        stages = split_stages(captured, stage_of, num_stages)
        stage_graphs, sizes = {}, {}
        if plan.tensor_parallel > 1:
            stage_graphs = capture_split_stages(stages, captured)
            analyses = _split_analyses(plan, model, captured, stage_graphs)
            plan = _with_speed_sizes(plan, config.cluster, analyses)
            sizes = _stage_shard_sizes(plan, analyses)
        return PipelineProgram(captured.graph_module, loss_fn, plan, config, stages, stage_graphs, sizes)
    if plan.tensor_parallel > 1:
        analyses = _split_analyses(plan, model, captured, {})
        plan = _with_speed_sizes(plan, config.cluster, analyses)
        resolve_sizes(analyses[0][0], dict(plan.shard_sizes))
    return DataParallelProgram(model, loss_fn, plan, config, captured=captured)


def speed_sizes(plan: Plan, cluster: Cluster, model: nn.Module, captured) -> Plan:
    """``plan`` with shard sizes in proportion to device speed where its tensor groups mix types.

    The runtime shards every region the split rewrite finds; on a group of mixed devices each
    rank gets atoms (heads, columns, classes, experts) by :func:`speed_shard_sizes`. ``plan``
    is returned as it is without tensor parallelism, with sizes already set, or on groups of
    one device type. ``whale plan`` shows the sizes this gives.

    Example::

        plan = speed_sizes(plan, parse_cluster("node0=1xA100-80GB+1xT4"), model, captured)
    """
    if not _needs_speed_sizes(plan, cluster):
        return plan
    stage_graphs = {}
    if plan.num_stages > 1:
        stage_of, _ = assign_stages(captured, plan.stage_boundaries or None)
        stage_graphs = capture_split_stages(split_stages(captured, stage_of, plan.num_stages), captured)
    return _with_speed_sizes(plan, cluster, _split_analyses(plan, model, captured, stage_graphs))


def _split_analyses(plan: Plan, model: nn.Module, captured, stage_graphs) -> dict[int, tuple]:
    """The split rewrite's analysis and module of each stage holding a split part (stage 0: the
    whole model when there are no stages), made once for the sizes and their checks."""
    if not stage_graphs:
        return {0: (TensorParallelAnalysis(plan.tensor_parallel)(model, captured), model)}
    return {
        s: (TensorParallelAnalysis(plan.tensor_parallel)(g.graph_module, g), g.graph_module)
        for s, g in stage_graphs.items()
    }


def _needs_speed_sizes(plan: Plan, cluster: Cluster | None) -> bool:
    """True when a tensor group of ``plan`` mixes device types and the user gave no sizes."""
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


def _with_speed_sizes(plan: Plan, cluster: Cluster | None, analyses: Mapping[int, tuple]) -> Plan:
    """``plan`` with speed-proportional sizes where its tensor groups mix device types (see
    :func:`speed_sizes`); ``analyses`` from :func:`_split_analyses`."""
    if not _needs_speed_sizes(plan, cluster):
        return plan
    t, sizes = plan.tensor_parallel, {}
    for stage, (analysis, root) in analyses.items():
        pos = stage % plan.pipeline_degree
        groups = [pipe[pos * t : (pos + 1) * t] for pipe in plan.pipelines]
        regions = {r.name: (r.num_atoms, _region_params(root, r.modules) / r.num_atoms) for r in analysis.regions}
        sizes.update(speed_shard_sizes(cluster, groups, regions))
    if not sizes:
        return plan
    return dataclasses.replace(plan, shard_sizes=tuple(sorted(sizes.items())))


def _region_params(root: nn.Module, paths) -> int:
    """Parameters of the modules ``paths`` name (each once): the ones a region shards."""
    seen: dict[int, int] = {}
    for path in paths:
        try:
            module = root.get_submodule(path)
        except AttributeError:
            continue
        seen.update((id(p), p.numel()) for p in module.parameters())
    return sum(seen.values())


def _stage_shard_sizes(plan, analyses: Mapping[int, tuple]) -> dict[int, dict[str, tuple[int, ...]]]:
    """Config(shard_sizes) cut by stage: each entry names a region of one stage's rewrite and
    must fit it. The runtime shards each stage with its own entries, without a second analysis."""
    given = dict(plan.shard_sizes)
    per_stage = {}
    for s, (analysis, _) in analyses.items():
        mine = {k: v for k, v in given.items() if any(k == r.name or k in r.modules for r in analysis.regions)}
        resolve_sizes(analysis, mine)
        per_stage[s] = mine
        for k in mine:
            given.pop(k)
    if given:
        raise ValueError(
            f"Config(shard_sizes=...) names {sorted(given)}, which no stage splits; name a module "
            "inside a split() part"
        )
    return per_stage


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


def _world() -> tuple[int, int | None]:
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return world, int(local) if local else None


def _rows_of(args: tuple, dim: int) -> int:
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() > dim:
            return a.shape[dim]
    raise ValueError(
        f"parallelize(example_inputs=...): no tensor with a batch dimension {dim} among "
        f"{[type(a).__name__ for a in args]}"
    )
