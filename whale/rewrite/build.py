"""The rewrite as a whole: a captured model and a Plan -> one rank's :class:`DistributedProgram`.

:class:`ProgramRewrite` cuts the graph into the plan's stages and analyses every split part
once. The planner may read the split regions from it (:meth:`ProgramRewrite.regions`) to size
shards by device speed; :meth:`ProgramRewrite.build` then shards this rank's stages with the
plan's sizes. Everything a user can get wrong in a rewrite (what ``split`` cannot shard, more
shards than heads, sizes that do not add up) is raised here, before any process group exists.

Example::

    rewrite = ProgramRewrite(model, captured, plan, loss_fn)
    program = rewrite.build(plan, rank=0)
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..capture import CapturedModel
from ..capture.graph_io import forward_signature, training_defaults
from ..ir.plan import Plan
from .collectives import CommGroup
from .program import DistributedProgram, ModelCall, ProgramStage, TiedWeight
from .recompute import checkpoint_pass  # Config(activation_checkpointing)
from .stage_split import (
    assign_stages,
    attach_state,
    capture_split_stages,
    hold_unread_state,
    keep_state_dict_keys,
    split_stages,
)
from .sync_batch_norm import batch_norm_pass, single_value_batch_norms
from .tensor_parallel.analysis import TensorParallelAnalysis
from .tensor_parallel.decisions import TensorParallelPlan
from .tensor_parallel.shard import resolve_sizes, shard_model
from .tensor_parallel.sharded_model import ShardedModel
from .train_mode import follow_train_mode  # eval() in captured graphs

__all__ = ["ProgramRewrite", "tensor_parallel_check"]


class ProgramRewrite:
    """The stage split and split analyses of ``captured`` under ``plan``, made once.

    Args:
        model: the local model (its weights are the programs' starting weights).
        captured: ``capture(model, example_inputs)``.
        plan: the plan; :meth:`build` may be given the same plan with shard sizes filled in.
        loss_fn: the user's ``loss_fn(output, target)``.
    """

    def __init__(self, model: nn.Module, captured: CapturedModel | None, plan: Plan, loss_fn: Callable[..., torch.Tensor],
                 *, sync_batch_norm: bool = False, example_rows: int | None = None) -> None:
        self.model, self.captured, self.plan, self.loss_fn = model, captured, plan, loss_fn
        self.sync_batch_norm = sync_batch_norm  # Config(sync_batch_norm): see sync_batch_norm.py
        self.example_rows = example_rows  # the captured example's rows (sizes per row)
        self.stages = None
        self.unread: dict[int, list[str]] = {}  # stage -> state the stage's graph never reads
        graphs: dict[int, tuple[nn.Module, CapturedModel]] = {}
        if plan.num_stages > 1:
            stage_of, num_stages = assign_stages(captured, plan.stage_boundaries or None)
            assert num_stages == plan.num_stages, (num_stages, plan.num_stages)
            self.stages = split_stages(captured, stage_of, num_stages)
            # Parameters forward never reads: kept by a stage (a split stage's shards keep them whole).
            for name, s in hold_unread_state(self.stages, model):
                self.unread.setdefault(s, []).append(name)
            if plan.tensor_parallel > 1:
                split = capture_split_stages(self.stages, captured)
                graphs = {s: (g.graph_module, g) for s, g in split.items()}
        elif plan.tensor_parallel > 1:
            graphs = {0: (model, captured)}
        last = plan.num_stages - 1
        # A stage that hands its output on gathers it whole; the last may keep logits sharded.
        self.analyses: dict[int, tuple[TensorParallelPlan, nn.Module, CapturedModel]] = {
            s: (TensorParallelAnalysis(plan.tensor_parallel, keep_sharded_output=s == last)(root, g), root, g)
            for s, (root, g) in graphs.items()
        }
        for s, (analysis, _, _) in self.analyses.items():
            if analysis.fallbacks:  # correct, but the user asked for shards and gets whole values
                where = f" in stage {s}" if plan.num_stages > 1 else ""
                warnings.warn(
                    f"split() over {plan.tensor_parallel} ranks{where}: {len(analysis.fallbacks)} sharded "
                    "value(s) are gathered whole, and what follows each runs unsharded on every rank "
                    f"(equal to the local model, but not faster): {'; '.join(analysis.fallbacks[:3])}"
                    f"{'; ...' if len(analysis.fallbacks) > 3 else ''}. Leave those modules out of split() "
                    "to save the gathers",
                    stacklevel=2,
                )

    def regions(self) -> dict[int, dict[str, tuple[int, float]]]:
        """Per split stage, each region's atoms and parameters per atom, by region name: what
        the planner needs to size shards by device speed."""
        return {
            s: {r.name: (r.num_atoms, _region_params(root, r.modules) / r.num_atoms) for r in analysis.regions}
            for s, (analysis, root, _) in self.analyses.items()
        }

    def build(self, plan: Plan, rank: int) -> DistributedProgram:
        """Rank ``rank``'s program of ``plan`` (the plan given at construction, shard sizes
        possibly filled in).

        Raises:
            ValueError: shard sizes that do not fit a region, or name one no stage splits.
        """
        if not 0 <= rank < plan.world_size:
            raise ValueError(f"rank {rank} is outside the plan's world of {plan.world_size} ranks")
        sizes = self._stage_sizes(plan)
        k = plan.tensor_parallel
        tensor_groups = tuple(
            ranks[pos * k : (pos + 1) * k] for ranks in plan.pipelines for pos in range(plan.pipeline_degree)
        ) if k > 1 else ()
        group = CommGroup(plan.tensor_group_of(rank)) if k > 1 else None
        local = set(plan.stages_at(plan.position_of(rank)))
        loss_fn = self.loss_fn
        state_keys = tuple(self.model.state_dict())
        call = ModelCall(forward_signature(self.model), model_name=type(self.model).__name__)
        if self.stages is None:
            stages = (self._whole_model(rank, group, sizes.get(0, {})),)
            # The inputs capture set (use_cache=False) go to the sharded graph and to the model
            # run whole alike: a transformers model left at use_cache=True fills a cache every
            # step, which a checkpointed layer's recompute fills a second time (Mistral, Falcon).
            defaults = self.captured.input_defaults if self.captured is not None else training_defaults(self.model, (), {})
            call = dataclasses.replace(call, defaults=dict(defaults))
            if stages[0].sharded is not None and stages[0].sharded.loss_fn is not None:
                loss_fn = stages[0].sharded.loss_fn
            params = self.model.named_parameters()
            tied: tuple[TiedWeight, ...] = ()
        else:
            gm = self.captured.graph_module
            aliases = _state_aliases(self.model)
            names = {id(p): n for n, p in gm.named_parameters()}
            stages = []
            for st in self.stages:
                # Canonical names are the local model's (its named_parameters()), tied ones once.
                param_names = {
                    path: aliases[path][0] if path in aliases else names[id(p)]
                    for path, p in st.module.named_parameters(remove_duplicate=False)
                }
                # fx copies a non-persistent buffer (nanoGPT's causal mask) as a persistent one:
                # the stage's state dict keeps to the local model's keys.
                keep_state_dict_keys(st.module, set(aliases))
                state_names = {key: aliases[key] for key in st.module.state_dict()}
                stage = ProgramStage(st.index, st.received, st.sent, st.modules, param_names,
                                     is_split=st.index in self.analyses, state_names=state_names,
                                     updated_buffers=st.updated_buffers)
                if st.index in local and st.index in self.analyses:
                    stage = self._shard_stage(stage, st.module, rank, group, sizes.get(st.index, {}))
                    if stage.sharded.loss_fn is not None:
                        loss_fn = stage.sharded.loss_fn
                elif st.index in local:
                    stage = dataclasses.replace(stage, module=st.module)
                stages.append(stage)
            stages = tuple(stages)
            params = gm.named_parameters()
            tied = _tied_weights(plan, stages)
            flatten, restore = _input_output_maps(self.captured)
            call = dataclasses.replace(call, flatten=flatten, restore=restore)
        for st in stages:  # the graphs whale built (not the user's model, run whole)
            if isinstance(st.module, torch.fx.GraphModule) and st.module is not self.model:
                follow_train_mode(st.module)
        # BatchNorm over the global batch, or a warning that it is not (sync_batch_norm.py).
        stages, data_group = batch_norm_pass(stages, plan, rank, self.model, self.sync_batch_norm)
        stages = checkpoint_pass(stages, plan.activation_checkpointing)  # recompute.py
        return DistributedProgram(
            plan=plan,
            rank=rank,
            stages=stages,
            loss_fn=loss_fn,
            state_keys=state_keys,
            param_bytes={n: p.numel() * p.element_size() for n, p in params},
            shard_sizes={n: v for per_stage in sizes.values() for n, v in per_stage.items()},
            tensor_groups=tensor_groups,
            tensor_group=group,
            tied=tied,
            call=call,
            data_group=data_group,  # Config(sync_batch_norm)
            single_value_batch_norms=single_value_batch_norms(self.model, self.captured, self.example_rows),
        )

    def _whole_model(self, rank: int, group: CommGroup | None, sizes: Mapping[str, tuple[int, ...]]) -> ProgramStage:
        # Every path of a parameter -> the local model's name for it (a tied weight's first).
        aliases = _state_aliases(self.model)
        params = {n: aliases.get(n, (n,))[0] for n, _ in self.model.named_parameters(remove_duplicate=False)}
        stage = ProgramStage(0, (), (), ("",), params, module=self.model,
                             always_run=always_run_containers(self.model, self.captured))  # fmt: skip
        if group is None:
            return stage
        analysis = self.analyses[0][0]
        sharded = shard_model(
            self.model, self.captured, group=group, rank_in_group=group.ranks.index(rank),
            shard_sizes=sizes, loss_fn=self.loss_fn, analysis=analysis,
        )
        return dataclasses.replace(
            stage, module=sharded.module, sharded=_decisions_only(sharded), source=self.model, is_split=True
        )

    def _shard_stage(self, stage: ProgramStage, module: nn.Module, rank: int, group: CommGroup,
                     sizes: Mapping[str, tuple[int, ...]]) -> ProgramStage:
        last = stage.index == self.plan.num_stages - 1
        analysis, _, graph = self.analyses[stage.index]
        sharded = shard_model(
            module, graph, group=group, rank_in_group=group.ranks.index(rank),
            shard_sizes=sizes, loss_fn=self.loss_fn if last else None,
            gather_output=not last,  # the next stage receives whole activations
            analysis=analysis,
        )
        state = module.state_dict(keep_vars=True)
        for name in self.unread.get(stage.index, ()):  # not in the graph the shards were made from
            attach_state(sharded.module, name, state[name])
        return dataclasses.replace(stage, module=sharded.module, sharded=_decisions_only(sharded), source=module)

    def _stage_sizes(self, plan: Plan) -> dict[int, dict[str, tuple[int, ...]]]:
        """``plan.shard_sizes`` cut by stage, each entry checked against its stage's regions."""
        given = dict(plan.shard_sizes)
        per_stage = {}
        for s, (analysis, _, _) in self.analyses.items():
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


def _decisions_only(sharded: ShardedModel) -> ShardedModel:
    """``sharded`` without the graph its analysis read (the captured model: every weight of every
    stage, unsharded); the program keeps the decisions (regions, shard specs) only, so a bound
    rank holds its shards and nothing more."""
    empty = torch.fx.GraphModule(nn.Module(), torch.fx.Graph())
    return dataclasses.replace(sharded, plan=dataclasses.replace(sharded.plan, graph_module=empty))


def _tied_weights(plan: Plan, stages: tuple[ProgramStage, ...]) -> tuple[TiedWeight, ...]:
    """Weights used by stages at several pipeline positions (never sharded: whole everywhere)."""
    held: dict[str, set[int]] = {}
    for stage in stages:
        for name in stage.param_names.values():
            held.setdefault(name, set()).add(stage.index % plan.pipeline_degree)
    k = plan.tensor_parallel
    return tuple(
        TiedWeight(name, tuple(
            tuple(sorted(p[pos * k + t] for p in plan.pipelines for pos in held[name])) for t in range(k)
        ))
        for name in sorted(n for n, pos in held.items() if len(pos) > 1)
    )


def _state_aliases(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Each key of ``model.state_dict()`` -> every key naming the same tensor, in order."""
    state = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(id(t), []).append(name)
    return {name: tuple(groups[id(t)]) for name, t in state.items()}


def _input_output_maps(captured: CapturedModel) -> tuple[Callable[[tuple, dict], tuple], Callable[[Any], Any]]:
    """``CapturedModel.flatten_inputs`` and the last stage's outputs -> the model's output object
    (``unflatten_output`` takes the leaves of what the graph's output node returns), holding
    only the graph's input/output layout: not the captured graph, whose modules hold every
    stage's weights."""
    io = captured.io
    if io is None:  # a graph made by a pass: fed positionally, as CapturedModel does
        return _positional, _leaves_or_one
    return io.flatten_inputs, lambda out: io.unflatten_output(pytree.tree_leaves(out))


def _positional(args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    return (*args, *kwargs.values())


def _leaves_or_one(out: Any) -> Any:
    flat = pytree.tree_leaves(out)
    return flat[0] if len(flat) == 1 else tuple(flat)


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


def tensor_parallel_check(model: nn.Module, captured: CapturedModel | None) -> Callable[[int], str | None] | None:
    """For the planner: ``check(degree)`` is None where the rewrite shards the model's
    ``split()`` parts over ``degree`` ranks (even shards), else the rewrite's reason; None for
    a model without ``split()`` parts (or no graph).

    Example::

        check = tensor_parallel_check(model, captured)
        check(4)   # "split(4) at 'model.layers': 4 shards but only 2 heads ..."
    """
    if captured is None or not any(a.kind == "split" for a in captured.annotations_used()):
        return None

    def check(degree: int) -> str | None:
        try:
            resolve_sizes(TensorParallelAnalysis(degree)(model, captured), None)
        except ValueError as err:
            return str(err)
        return None

    return check


def always_run_containers(model: nn.Module, captured: CapturedModel | None) -> frozenset[str]:
    """The ``nn.ModuleList``/``nn.Sequential`` containers of ``model`` whose every child with
    parameters runs an operation of the captured graph: they run on every rank, whatever its
    rows (a Swin stage's blocks), where an opaque call's experts or a graph-less model's may
    not. None captured: none."""
    if captured is None:
        return frozenset()
    prefixes = set()
    for path in {n.module_path for n in captured.nodes if n.op in ("call_function", "call_module")}:
        parts = path.split(".")
        prefixes.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    out = set()
    for path, sub in model.named_modules():
        if path and isinstance(sub, (nn.ModuleList, nn.Sequential)):
            children = [f"{path}.{name}" for name, child in sub.named_children() if next(child.parameters(), None) is not None]
            if children and all(c in prefixes for c in children):
                out.add(path)
    return frozenset(out)
