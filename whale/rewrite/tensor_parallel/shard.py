"""The tensor-parallel rewrite pass, and ``shard_model``: a captured model -> this rank's sharded model.

:class:`~.tp_analysis.TensorParallelAnalysis` decides, for all ranks at once, what is sharded
and where values are communicated; :class:`TensorParallelRewrite` applies that plan for one rank
and one set of shard sizes: it copies the graph, puts sharded layers in place of the local
ones, inserts the collectives as ``call_module`` nodes under ``_whale_tp`` (so the printed graph
shows them), and rewrites shape arguments (``view(B, T, n_head, hd)``, ``split(n_embd)``) to
this rank's widths.

Example::

    captured = capture(model, (x,))
    sharded = shard_model(model, captured, group=tp_group)
    loss = (sharded.loss_fn or F.cross_entropy)(sharded.module(x), y)
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.fx import Graph, GraphModule, Node

from ...capture.graph import NODE_INFO_KEY, CapturedModel
from ...ir.rows import row_offsets
from ..collectives import group_rank, group_size
from .moe import ExpertParallelMoE
from .parallel_loss import VocabParallelCrossEntropy, parallel_loss
from .shard_sizes import validate_sizes
from .sharded_model import ShardedModel
from .analysis import TensorParallelAnalysis, TensorParallelPlan
from .exported import carry_buffers
from .layout import ShardLayout, local_width
from .modules import (
    ColumnParallelLinear,
    CopyToGroup,
    GatherFromGroup,
    ReduceFromGroup,
    RowParallelLinear,
    ScatterToGroup,
    ShardedMultiheadAttention,
    ShardSpec,
    VocabParallelEmbedding,
    global_numel,
    global_size,
)

__all__ = ["ShardedModel", "TensorParallelRewrite", "resolve_sizes", "shard_model"]

_COMM = {"copy": CopyToGroup, "gather": GatherFromGroup, "scatter": ScatterToGroup, "reduce": ReduceFromGroup}


def shard_model(
    model: nn.Module,
    captured: CapturedModel,
    *,
    group: dist.ProcessGroup | None = None,
    rank_in_group: int | None = None,
    shard_sizes: Mapping[str, Sequence[int]] | None = None,
    loss_fn: Callable | None = None,
    gather_output: bool = False,
    analysis: TensorParallelPlan | None = None,
) -> ShardedModel:
    """This rank's tensor-parallel model: the ``split`` parts of ``model`` sharded over ``group``.

    Args:
        model: the local model (parameters real or on the meta device).
        captured: ``capture(model, example_inputs)`` (fx or torch.export).
        group: the tensor-parallel process group (None: the default group).
        rank_in_group: this rank's index in ``group`` (None: asked from the group).
        shard_sizes: per region, the heads / columns / classes / experts each rank holds, keyed
            by the region's module path (``plan.regions[i].name``) or any module in it; None or a
            missing region: an even split.
        loss_fn: the training loss. When the model ends in a split classifier and this is
            cross-entropy (``F.cross_entropy``, ``nn.CrossEntropyLoss``, or a function reaching
            ``F.cross_entropy`` through reshapes; None counts as cross-entropy over the last dim),
            the logits stay sharded and ``ShardedModel.loss_fn`` computes it; otherwise they are
            gathered and ``loss_fn`` applies unchanged.
        gather_output: always return whole outputs (a pipeline stage that is not the last one
            hands them to the next stage), whatever the loss.
        analysis: ``TensorParallelAnalysis(group size, keep_sharded_output=not gather_output)``
            of ``captured``, when the caller has made it already (it is the same on every rank).

    Returns:
        A :class:`~.sharded_model.ShardedModel`.

    Raises:
        ValueError: a split around something whale cannot shard, more shards than heads /
            experts / columns, shard sizes that do not add up, a split inside a split.
    """
    ranks = group_size(group)
    rank = group_rank(group) if rank_in_group is None else rank_in_group
    if not 0 <= rank < ranks:
        raise ValueError(f"shard_model(rank_in_group={rank}): the group has {ranks} ranks")
    plan = analysis or TensorParallelAnalysis(ranks, keep_sharded_output=not gather_output)(model, captured)
    sizes = resolve_sizes(plan, shard_sizes)
    sharded_loss = None
    if plan.output_layout is not None:
        region = plan.region(plan.output_layout.region)
        counts = sizes[region.id]
        ce = VocabParallelCrossEntropy(row_offsets(counts)[rank], region.num_atoms, group)
        logits = plan.graph_module.graph.output_node().args[0]
        field = None
        if plan.output_index is not None:
            logits, field = logits[plan.output_index], _output_field(plan.graph_module, plan.output_index)
        sharded_loss = parallel_loss(loss_fn, ce, counts[rank], len(logits.meta[NODE_INFO_KEY].shapes[0]), field)
        if sharded_loss is None:
            # Not recognizably cross-entropy: gather the logits and let the user's loss run.
            plan = TensorParallelAnalysis(ranks, keep_sharded_output=False)(model, captured)
            sizes = resolve_sizes(plan, shard_sizes)
    module, param_shards, full_specs = TensorParallelRewrite(plan, sizes, rank, group)(model)
    tied = _tied_names(model, param_shards, full_specs)
    full_keys = tuple(model.state_dict().keys())
    own = set(module.state_dict().keys())
    unused = {k: v for k, v in model.state_dict().items() if k not in own and k not in full_specs}
    return ShardedModel(
        module=module,
        loss_fn=sharded_loss,
        param_shards=param_shards,
        full_specs=full_specs,
        full_keys=full_keys,
        plan=plan,
        sizes={plan.region(r).name: s for r, s in sizes.items()},
        rank=rank,
        group=group,
        unused_state=unused,
        tied=tied,
    )


def _tied_names(model: nn.Module, param_shards: dict, full_specs: dict) -> dict[str, tuple[str, ...]]:
    """Every name of each tied weight of ``model``; a sharded one gets its spec under each name (in place)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    tied = {}
    for names in (g for g in groups.values() if len(g) > 1):
        known = next((n for n in names if n in full_specs), None)
        for n in names:
            tied[n] = tuple(names)
            if known is not None and n not in full_specs:
                full_specs[n] = _renamed(full_specs[known], n)
                if known in param_shards:
                    param_shards[n] = full_specs[n]
    return tied


def resolve_sizes(plan: TensorParallelPlan, shard_sizes: Mapping[str, Sequence[int]] | None) -> dict[int, tuple[int, ...]]:
    """Per region id, validated per-rank atom counts (even where ``shard_sizes`` says nothing)."""
    given = dict(shard_sizes or {})
    out: dict[int, tuple[int, ...]] = {}
    for region in plan.regions:
        keys = [k for k in given if k == region.name or k in region.modules]
        if len(keys) > 1:
            raise ValueError(f"shard_sizes names region {region.name!r} twice: {keys}")
        sizes = given.pop(keys[0]) if keys else None
        out[region.id] = validate_sizes(region.name or "<root>", region.kind, region.num_atoms, sizes, plan.group_size)
    if given:
        raise ValueError(
            f"shard_sizes has entries for {sorted(given)}, which are not sharded regions; the regions "
            f"are {[r.name for r in plan.regions]}"
        )
    return out


class TensorParallelRewrite:
    """Apply a :class:`TensorParallelPlan` for one rank: ``requires`` / ``call`` / ``ensures``.

    Args:
        plan: the analysis result (the same on every rank).
        sizes: per region id, atoms per rank (see :func:`resolve_sizes`).
        rank: this rank's index in the group.
        group: the process group the inserted collectives use (may be None when not run).

    Calling it returns ``(module, param_shards, full_specs)``.
    """

    def __init__(self, plan: TensorParallelPlan, sizes: Mapping[int, tuple[int, ...]], rank: int, group: Any = None) -> None:
        self.plan, self.sizes, self.rank, self.group = plan, dict(sizes), rank, group
        self.atoms = {r.id: r.num_atoms for r in plan.regions}

    def __call__(self, model: nn.Module):
        self.requires(model)
        result = self.call(model)
        self.ensures(result[0])
        return result

    def requires(self, model: nn.Module) -> None:
        missing = [r.name for r in self.plan.regions if r.id not in self.sizes]
        assert not missing, f"no shard sizes for regions {missing}"
        for r in self.plan.regions:
            sizes = self.sizes[r.id]
            assert len(sizes) == self.plan.group_size and sum(sizes) == r.num_atoms, (r, sizes)
        _check_untied(self.plan)

    def ensures(self, module: GraphModule) -> None:
        module.graph.lint()
        for d in self.plan.modules.values():
            assert not isinstance(module.get_submodule(d.path), (nn.Linear, nn.Embedding, nn.MultiheadAttention)), d

    # ---- per-rank arithmetic ----------------------------------------------------------------

    def _elems(self, layout: ShardLayout) -> tuple[int, ...]:
        """Per-rank elements of one block along the sharded dim."""
        per_atom = layout.per_block // self.atoms[layout.region]
        return tuple(c * per_atom for c in self.sizes[layout.region])

    def _local(self, layout: ShardLayout) -> int:
        return local_width(layout, self.atoms[layout.region], self.sizes[layout.region][self.rank])

    def _spec(self, name: str, full: torch.Tensor, dim: int, layout: ShardLayout) -> ShardSpec:
        lengths = self._elems(layout)
        return ShardSpec(name, dim, row_offsets(lengths)[self.rank], lengths[self.rank], tuple(full.shape), layout.blocks, lengths)

    # ---- the rewrite ------------------------------------------------------------------------

    def call(self, model: nn.Module):
        plan, source = self.plan, self.plan.graph_module
        graph, env, root = Graph(), {}, {}
        # export: the output pytree (its specs are frozen, so shared: a deep copy rebuilds every
        # leaf spec, and torch warns each time that LeafSpec is deprecated)
        graph._codegen = copy.copy(source.graph._codegen)
        self._graph, self._root, self._cache, self._count, self._tied = graph, root, {}, 0, {}
        param_shards: dict[str, ShardSpec] = {}
        full_specs: dict[str, ShardSpec] = {}
        sharded = {id(p) for d in plan.modules.values() for p in source.get_submodule(d.path).parameters()}
        for node in source.graph.nodes:
            if node.op == "get_attr" and not node.users and id(_fetch(source, node.target)) in sharded:
                continue  # an unused read of a sharded weight (export keeps one per tied name)
            args = torch.fx.node.map_arg(node.args, lambda a, n=node: self._input(n, a, env))
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda a, n=node: self._input(n, a, env))
            fix = plan.fixes.get(node.name)
            if fix is not None and fix[0] in ("size", "numel"):
                env[node.name] = self._global_size(fix, node, args)
                continue
            target = node.target
            if fix is not None:
                args = self._localize(fix, node, args)
                if fix[0] == "split" and node.target is torch.ops.aten.split.Tensor and not isinstance(args[1], int):
                    target = torch.ops.aten.split_with_sizes.default  # uneven pieces
            if node.op == "output":
                graph.output(args[0])
                continue
            decision = plan.modules.get(node.name)
            if decision is not None and decision.kind == "mha" and not decision.need_weights:
                # Unused attention weights would cost an all-reduce: do not compute them.
                if len(args) > 4:
                    args = (*args[:4], False, *args[5:])
                else:
                    kwargs = {**kwargs, "need_weights": False}
            new = graph.create_node(node.op, target, args, kwargs, node.name)
            new.meta = dict(node.meta)
            env[node.name] = new
            if node.op == "call_module":
                old = source.get_submodule(node.target)
                root[node.target] = carry_buffers(old, self._module(node, old, param_shards, full_specs))
            elif node.op == "get_attr":
                root[node.target] = _fetch(source, node.target)
            if node.name in plan.reduce_after:
                env[node.name] = self._comm("reduce", None, new)
        module = GraphModule(root, graph, f"{type(model).__name__}TensorParallel")
        return module, param_shards, full_specs

    def _input(self, consumer: Node, arg: Node, env: dict) -> Node:
        steps = self.plan.edges.get((consumer.name, arg.name))
        value = env[arg.name]
        if not steps:
            return value
        key = (arg.name, steps)
        if key not in self._cache:
            layout = self.plan.layouts[arg.name]
            for step in steps:
                value = self._comm(step[0], step[1] if len(step) > 1 else layout, value)
            self._cache[key] = value
        return self._cache[key]

    def _comm(self, kind: str, layout: ShardLayout | None, value: Node) -> Node:
        if kind in ("gather", "scatter"):
            module = _COMM[kind](layout.dim, self._elems(layout), layout.blocks, self.group)
        else:
            module = _COMM[kind](self.group)
        name = f"_whale_tp.{kind}_{self._count}"
        self._count += 1
        self._root[name] = module
        return self._graph.call_module(name, (value,))

    def _global_size(self, fix: tuple, node: Node, args: tuple) -> Node:
        kind, layout, _ = fix
        full = layout.blocks * layout.per_block
        if kind == "numel":
            return self._graph.call_function(global_numel, (args[0], layout.dim, full))
        positional = node.op == "call_method" or isinstance(node.target, torch._ops.OpOverload)  # not getattr(x, "shape")
        index = args[1] if positional and len(args) > 1 else node.kwargs.get("dim")
        return self._graph.call_function(global_size, (args[0], layout.dim, full, index))

    def _localize(self, fix: tuple, node: Node, args: tuple) -> tuple:
        kind, layout, extra = fix
        args = list(args)
        if kind == "view":
            pos = layout.dim
            if len(args) == 2 and isinstance(args[1], (tuple, list)):
                shape = list(args[1])
                if shape[pos] != -1:
                    shape[pos] = self._local(layout)
                return (args[0], type(args[1])(shape))
            if len(args) == 2 and isinstance(args[1], Node):  # x.view(some_size)
                ndim = len(node.meta["val"].shape)
                shape = [self._graph.call_function(operator.getitem, (args[1], i)) for i in range(ndim)]
                shape[pos] = self._local(layout)
                return (args[0], *shape)
            if args[1 + pos] != -1:
                args[1 + pos] = self._local(layout)
            return tuple(args)
        if kind == "expand":
            sizes = list(args[1])
            if sizes[layout.dim] != -1:
                sizes[layout.dim] = self._local(layout)
            return (args[0], sizes, *args[2:])
        if kind == "unflatten":
            dim = args[1] % (len(node.meta["val"].shape) - len(args[2]) + 1)
            sizes = list(args[2])
            if sizes[layout.dim - dim] != -1:
                sizes[layout.dim - dim] = self._local(layout)
            args[2] = tuple(sizes)
            return tuple(args)
        if kind == "slice":  # whole blocks [first, last) of the sharded dim: this rank's part of each
            per_block = self._local(layout) // layout.blocks
            args[2:4] = [extra[0] * per_block, extra[1] * per_block]
            return tuple(args)
        if kind == "split" and _is_split(node):
            per_block = self._local(layout) // layout.blocks
            pieces = [b * per_block for b in extra]
            if len(args) > 1:
                args[1] = pieces
                if isinstance(node.target, torch._ops.OpOverload) and len(set(pieces)) == 1:
                    args[1] = pieces[0]  # aten.split.Tensor takes one size
            return tuple(args)
        return tuple(args)

    def _module(self, node: Node, module: nn.Module, param_shards: dict, full_specs: dict) -> nn.Module:
        decision = self.plan.modules.get(node.name)
        if decision is None:
            return module
        path, kind = decision.path, decision.kind
        if kind in ("column", "row"):
            dim = (0 if kind == "column" else 1) ^ getattr(module, "transposed", False)
            w = self._spec(f"{path}.weight", module.weight, dim, decision.layout)
            specs = {"weight": w}
            if kind == "column":
                b = None if module.bias is None else self._spec(f"{path}.bias", module.bias, 0, decision.layout)
                if b is not None:
                    specs["bias"] = b
                new = ColumnParallelLinear(module, w, b)
            else:
                new = RowParallelLinear(module, w, self.group)
        elif kind == "vocab":
            layout = ShardLayout(0, 1, module.num_embeddings, decision.region, node.name)
            specs = {"weight": self._spec(f"{path}.weight", module.weight, 0, layout)}
            new = VocabParallelEmbedding(module, specs["weight"], self.group)
        elif kind == "mha":
            heads = self.sizes[decision.region]
            new = ShardedMultiheadAttention(module, row_offsets(heads)[self.rank], heads[self.rank], heads, self.group)
            specs = dict(new.specs)
        else:
            experts = self.sizes[decision.region]
            spec = self.plan.moe[path]
            new = ExpertParallelMoE(module, spec, experts, self.rank, self.group)
            owners = [r for r, n in enumerate(experts) for _ in range(n)]
            for e, expert in enumerate(getattr(module, spec.experts_attr)):
                for pname, p in expert.named_parameters():
                    name = f"{path}.{spec.experts_attr}.{e}.{pname}"
                    full_specs[name] = ShardSpec(name, None, 0, p.shape[0] if p.dim() else 1, tuple(p.shape), owner=owners[e])
                    if owners[e] == self.rank:
                        param_shards[name] = full_specs[name]
            return new
        for pname, spec in specs.items():
            full = spec.full_name if spec.full_name.startswith(path + ".") else f"{path}.{spec.full_name}"
            spec = _renamed(spec, full)
            param_shards[full] = full_specs[full] = spec
            if "." not in pname:
                self._share_tied(new, pname, _fetch(module, pname), spec)
        return new

    def _share_tied(self, new: nn.Module, pname: str, full: torch.Tensor, spec: ShardSpec) -> None:
        """Layers tied to one weight hold one sharded Parameter (its gradient sums their uses)."""
        where = (spec.dim, spec.offset, spec.length, spec.num_blocks, spec.rank_lengths)
        first = self._tied.setdefault(id(full), (where, getattr(new, pname), spec.full_name))
        if first[0] != where:
            raise ValueError(
                f"{first[2]} and {spec.full_name} are one tied weight sharded two ways ({first[0][:2]} "
                f"vs {where[:2]} as (dim, offset)); whale slices a tied weight once. Give both layers "
                "the same split (an embedding and its LM head: vocabulary rows), or untie them"
            )
        setattr(new, pname, first[1])


def _output_field(gm: GraphModule, index: int) -> str | int | tuple[str, str]:
    """How a loss reaches flat output ``index`` of an exported model: a field name or a position."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    spec = info.out_spec if info is not None else None
    if spec is None or spec.num_leaves != spec.num_children or not all(c.is_leaf() for c in spec.children()):
        return -1  # nested or unknown: no field reaches it
    if isinstance(spec.context, (list, tuple)) and all(isinstance(k, str) for k in spec.context):
        if spec.type is dict:
            return ("item", spec.context[index])  # out["logits"] only: a traced out.logits is a dict's attribute
        return spec.context[index]  # a ModelOutput: out.logits / out["logits"]
    return index  # a tuple or list


def _renamed(spec: ShardSpec, name: str) -> ShardSpec:
    return dataclasses.replace(spec, full_name=name)


def _is_split(node: Node) -> bool:
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._opname in ("split", "split_with_sizes")
    return getattr(node.target, "__name__", node.target) in ("split", "split_with_sizes")


def _fetch(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _readers(node: Node) -> str:
    """The operations that read ``node`` (a ``get_attr``) and the modules they run in:
    ``'roberta.embeddings.word_embeddings' (aten.embedding)``."""
    found = []
    for user in node.users:
        info = user.meta.get(NODE_INFO_KEY)
        path = (info.module_path if info is not None else "") or "<root>"
        op = info.target if info is not None else str(user.target)
        found.append(f"{path!r} ({op})")
    return ", ".join(dict.fromkeys(found))


def _check_untied(plan: TensorParallelPlan) -> None:
    """A weight shared between a sharded layer and anything else cannot be sliced for one of them."""
    gm = plan.graph_module
    sharded = {d.path for d in plan.modules.values()}
    owner: dict[int, str] = {}
    for path in sharded:
        for name, p in gm.get_submodule(path).named_parameters():
            owner[id(p)] = f"{path}.{name}"
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in sharded:
            tensors, user = list(gm.get_submodule(node.target).named_parameters()), repr(node.target)
        elif node.op == "get_attr" and node.users:
            # An exported graph reads the weight by its canonical name, which is the sharded
            # layer's own: name the operations that read it, where they live.
            tensors, user = [("", _fetch(gm, node.target))], _readers(node)
        else:
            continue
        for _, t in tensors:
            if id(t) in owner:
                raise ValueError(
                    f"{owner[id(t)]} is sharded by split() but also used by {user} (a tied "
                    "weight); whale cannot slice a weight for one user only. Untie them, or put both "
                    "users in the same split"
                )
    # A weight tied between sharded layers is sliced once (TensorParallelRewrite._share_tied).
