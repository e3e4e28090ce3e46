"""The tensor-parallel analysis pass: which modules are sharded how, and what communication goes where.

It walks the captured graph once per attempt, in order, giving every value inside a ``split``
scope a layout (replicated, or sharded as a :class:`~.tp_layout.ShardLayout`). A graph captured
with ``torch.export`` is aten-level: its ``aten.linear`` / ``aten.addmm`` (Conv1D) /
``aten.embedding`` on parameters first become modules (:mod:`.exported`), and the rules know
the aten spellings of the ops between them, so the same decisions follow:

* an ``nn.Linear`` whose input is replicated becomes **column-parallel** (its output is sharded
  on the last dim); one whose input is sharded on its last dim becomes **row-parallel** (its
  partial sums are all-reduced). So Linear -> elementwise -> Linear is column then row with one
  all-reduce forward and one backward (Megatron-LM), and attention written out by hand is
  sharded by whole heads: the views, splits and transposes between the projections carry the
  layout (:mod:`.tp_rules`), and a view that splits the sharded dim into heads x head_dim bounds
  the atom count by the number of heads. No module or attribute name is consulted.
* ``nn.Embedding`` is vocabulary-parallel, ``nn.MultiheadAttention`` split by heads, a
  mixture-of-experts module (:mod:`.moe`) expert-parallel.
* a sharded value that reaches an op with no sharding rule, leaves the scopes, or is the
  model's output is all-gathered, except the logits of a final split classifier when the loss
  can be computed on shards (vocabulary-parallel cross-entropy).

Each region (modules sharded together) gets its atom count ``A``: the gcd of every bound met.
The result is a frozen :class:`TensorParallelPlan`; no process group is touched.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ...capture.graph import NODE_INFO_KEY, CapturedModel, NodeInfo
from ...primitives.annotations import Split
from .exported import ExportedEmbedding, ExportedLinear, lower_parameter_ops, refusal_message, unlowered_parameter_use
from .moe import MoESpec, collapse_moe, find_moe
from .layout import ShardLayout
from .decisions import ModuleDecision, Region, TensorParallelPlan
from .rules import Fallback, NeedBlocks, op_name, propagate_op

__all__ = ["SHARDABLE_KINDS", "ModuleDecision", "Region", "TensorParallelAnalysis", "TensorParallelPlan"]

SHARDABLE_KINDS = (
    "nn.Linear (column- and row-parallel; attention written from Linears is split by heads)",
    "nn.Embedding (vocabulary-parallel)",
    "nn.MultiheadAttention (by heads)",
    "a mixture-of-experts module: an nn.ModuleList of experts and an nn.Linear router (by experts)",
)
# Modules that may sit in a split scope and simply run replicated.
_REPLICATED_OK = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.LocalResponseNorm)
_RMS_NORM = getattr(nn, "RMSNorm", ())
# Parameterless torch.nn modules that act elementwise, so a sharded value passes through.
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity, nn.LeakyReLU, nn.ELU,
    nn.Mish, nn.Softplus, nn.Hardswish, nn.ReLU6, nn.SELU,
)
_MAX_ATTEMPTS = 12


def _info(node: Node) -> NodeInfo:
    return node.meta[NODE_INFO_KEY]


def _splits(info: NodeInfo) -> list[Split]:
    return [a for a in info.annotations if isinstance(a, Split)]


class TensorParallelAnalysis:
    """The pass: ``requires`` (valid scopes), ``call`` (propagate), ``ensures`` (a complete plan).

    Args:
        group_size: ranks in the tensor-parallel group.
        keep_sharded_output: leave a final split classifier's logits sharded (its loss is the
            vocabulary-parallel cross-entropy) instead of gathering them.

    Example::

        plan = TensorParallelAnalysis(2)(model, capture(model, (x,)))
        print(plan.summary())
    """

    def __init__(self, group_size: int, *, keep_sharded_output: bool = True) -> None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"tensor-parallel group size must be an int >= 1, got {group_size!r}")
        self.group_size = group_size
        self.keep_sharded_output = keep_sharded_output

    def __call__(self, model: nn.Module, captured: CapturedModel) -> TensorParallelPlan:
        self.requires(model, captured)
        plan = self.call(model, captured)
        self.ensures(plan)
        return plan

    def requires(self, model: nn.Module, captured: CapturedModel) -> None:
        for node in captured.graph_module.graph.nodes:
            info = _info(node)
            found = _splits(info)
            if len(found) > 1:
                raise ValueError(
                    f"{found[1]!r} is nested inside {found[0]!r} at {info.module_path or '<root>'!r}: "
                    "a split cannot contain another split; put them side by side instead"
                )
            if found and found[0].device_count not in (None, self.group_size):
                raise ValueError(
                    f"{found[0]!r} at {info.module_path or '<root>'!r} asks for "
                    f"{found[0].device_count} devices but the tensor-parallel group has "
                    f"{self.group_size} ranks; use split({self.group_size}) or split()"
                )

    def call(self, model: nn.Module, captured: CapturedModel) -> TensorParallelPlan:
        source = captured.graph_module
        graph = torch.fx.Graph()
        out = graph.graph_copy(source.graph, {})
        graph.output(out).meta = dict(next(iter(reversed(source.graph.nodes))).meta)
        # export: the output pytree (its specs are frozen, so shared: a deep copy rebuilds every
        # leaf spec, and torch warns each time that LeafSpec is deprecated)
        graph._codegen = copy.copy(source.graph._codegen)
        gm = GraphModule(source, graph, type(model).__name__)
        if captured.frontend == "export":
            moe: dict[str, MoESpec] = {}
            self._lower_exported(gm, model)
        else:
            moe = self._find_moe(model, gm)
            collapse_moe(gm, model, moe)
            self._check_module_kinds(model, gm, moe)
        blocks: dict[str, int] = {}
        for _ in range(_MAX_ATTEMPTS):
            try:
                state = _Propagation(gm, model, moe, blocks, self.keep_sharded_output)
                state.run()
                break
            except NeedBlocks as need:
                blocks[need.anchor] = blocks.get(need.anchor, 1) * need.factor
        else:
            raise ValueError(f"whale could not find a consistent head layout for {sorted(blocks)}")
        return state.plan(self.group_size)

    def ensures(self, plan: TensorParallelPlan) -> None:
        for r in plan.regions:
            if r.num_atoms < plan.group_size:
                raise ValueError(
                    f"split({plan.group_size}) at {r.name or '<root>'!r}: {plan.group_size} shards "
                    f"but only {r.num_atoms} {r.kind}; every rank needs at least one. Use "
                    f"split({r.num_atoms}) or fewer devices for this part"
                )
        for d in plan.modules.values():
            assert d.region in {r.id for r in plan.regions}, d

    def _lower_exported(self, gm: GraphModule, model: nn.Module) -> None:
        in_split = lambda n: bool(_splits(_info(n)))
        names: dict[int, set[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), set()).add(name)
        lower_parameter_ops(gm, in_split, lambda p: names.get(id(p), set()))
        bad = unlowered_parameter_use(gm, in_split)
        if bad:
            raise ValueError(refusal_message(gm, bad, lambda n: _info(n).module_path, in_split))
        by_scope: dict[int, list[Node]] = {}
        for n in gm.graph.nodes:
            if in_split(n):
                by_scope.setdefault(id(_splits(_info(n))[0]), []).append(n)
        for nodes in by_scope.values():
            if not any(n.op == "call_module" for n in nodes):
                where = _common_path([_info(n).module_path for n in nodes])
                raise ValueError(
                    f"{_splits(_info(nodes[0]))[0]!r} at {where or '<root>'!r} holds nothing whale can "
                    "shard (no aten.linear, aten.addmm or aten.embedding on a parameter)"
                )

    def _find_moe(self, model: nn.Module, gm: GraphModule) -> dict[str, MoESpec]:
        scoped = {_info(n).module_path for n in gm.graph.nodes if _splits(_info(n))}
        candidates = sorted({p for path in scoped for p in _prefixes(path)}, key=lambda p: p.count("."))
        shapes = {}
        for n in gm.graph.nodes:
            path = _info(n).module_path
            for a in n.all_input_nodes:
                outside = _info(a).module_path
                for p in _prefixes(path):
                    if p in candidates and not (outside == p or outside.startswith(p + ".")) and _info(a).shapes:
                        shapes.setdefault(p, _info(a).shapes[0])
        return find_moe(model, [p for p in candidates if p], shapes)

    def _check_module_kinds(self, model: nn.Module, gm: GraphModule, moe: Mapping[str, MoESpec]) -> None:
        by_scope: dict[int, list[Node]] = {}
        for n in gm.graph.nodes:
            found = _splits(_info(n))
            if found:
                by_scope.setdefault(id(found[0]), []).append(n)
        for nodes in by_scope.values():
            where = _common_path([_info(n).module_path for n in nodes])
            shardable = False
            for n in nodes:
                if n.op != "call_module":
                    continue
                module = model.get_submodule(n.target)
                if isinstance(module, (nn.Linear, nn.Embedding, nn.MultiheadAttention)) or n.target in moe:
                    shardable = True
                elif not (isinstance(module, _REPLICATED_OK) or (_RMS_NORM and isinstance(module, _RMS_NORM))
                          or not any(True for _ in module.parameters())):
                    raise ValueError(_cannot_shard(n.target, module))
            if not shardable:
                kinds = sorted({type(model.get_submodule(n.target)).__name__ for n in nodes if n.op == "call_module"})
                raise ValueError(
                    f"{_splits(_info(nodes[0]))[0]!r} at {where or '<root>'!r} holds nothing whale can "
                    f"shard (found {kinds or 'no modules'}); whale shards {'; '.join(SHARDABLE_KINDS)}"
                )


def _cannot_shard(path: str, module: nn.Module) -> str:
    return (
        f"split() at {path!r}: whale cannot shard {type(module).__name__}; it shards "
        f"{'; '.join(SHARDABLE_KINDS)}. Norms and parameterless layers may sit in a split and run "
        "replicated. Move split() to the parts it can shard, or use replicate() here"
    )


def _prefixes(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts) + 1)]


def _common_path(paths: list[str]) -> str:
    split = [p.split(".") if p else [] for p in paths]
    common: list[str] = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


class _Propagation:
    """One attempt: layouts for every node; implements the rules' context."""

    def __init__(self, gm, model, moe, blocks, keep_sharded_output) -> None:
        self.gm, self.model, self.moe, self.blocks = gm, model, moe, blocks
        self.keep_sharded_output = keep_sharded_output
        self.vals: dict[str, Any] = {}
        self.edges: dict[tuple[str, str], tuple] = {}
        self.fixes: dict[str, tuple] = {}
        self.reduce: set[str] = set()
        self.parent: dict[int, int] = {}
        self.bounds: dict[int, list[int]] = {}
        self.heads: set[int] = set()
        self.kinds: dict[int, str] = {}
        self.members: dict[int, list[str]] = {}
        self.modules: dict[str, ModuleDecision] = {}
        self.fallbacks: list[str] = []
        self.output_layout: ShardLayout | None = None
        self.output_index: int | None = None
        self.weight_regions: dict[int, int] = {}
        self.first_call: dict[str, ModuleDecision] = {}
        self._staged: dict[str, list] = {}

    # ---- the rules' context ------------------------------------------------------------------

    def val(self, arg: Any) -> Any:
        return self.vals.get(arg.name) if isinstance(arg, Node) else None

    def shape(self, node: Node) -> tuple[int, ...]:
        return _info(node).shapes[0]

    def shape_list(self, node: Node) -> tuple[tuple[int, ...], ...]:
        return _info(node).shapes

    def is_tensor(self, arg: Any) -> bool:
        return isinstance(arg, Node) and isinstance(arg.meta.get("val"), torch.Tensor)

    def const(self, arg: Any) -> Any:
        return arg.meta.get("val") if isinstance(arg, Node) else arg

    def copy(self, node: Node, arg: Node) -> None:
        if arg.meta["val"].dtype.is_floating_point:  # masks and ids never carry a gradient
            self._staged["edges"].append(((node.name, arg.name), (("copy",),)))

    def scatter(self, node: Node, arg: Node, layout: ShardLayout) -> None:
        self._staged["edges"].append(((node.name, arg.name), (("scatter", layout),)))

    def fix(self, node: Node, kind: str, layout: ShardLayout, extra: Any = None) -> None:
        self._staged["fixes"].append((node.name, (kind, layout, extra)))

    def bound(self, layout: ShardLayout, per_block: int, heads: bool = False) -> None:
        self._staged["bounds"].append((layout.region, per_block, heads))

    def merge(self, a: ShardLayout, b: ShardLayout) -> None:
        self._staged["merges"].append((a.region, b.region))

    def reduce_after(self, node: Node) -> None:
        self._staged["reduce"].append(node.name)

    # ---- regions ----------------------------------------------------------------------------

    def _find(self, r: int) -> int:
        while self.parent[r] != r:
            r = self.parent[r]
        return r

    def _new_region(self, kind: str, path: str, atoms: int) -> int:
        r = len(self.parent)
        self.parent[r] = r
        self.kinds[r], self.members[r], self.bounds[r] = kind, [path], [atoms]
        return r

    def _commit(self) -> None:
        for key, steps in self._staged["edges"]:
            self.edges[key] = steps
        for name, fix in self._staged["fixes"]:
            self.fixes[name] = fix
        for region, per_block, heads in self._staged["bounds"]:
            self.bounds[self._find(region)].append(per_block)
            if heads:
                self.heads.add(region)
        for a, b in self._staged["merges"]:
            ra, rb = self._find(a), self._find(b)
            if ra != rb:
                self.parent[rb] = ra
        self.reduce.update(self._staged["reduce"])

    def _stage(self) -> None:
        self._staged = {"edges": [], "fixes": [], "bounds": [], "merges": [], "reduce": []}

    def _gather(self, consumer: Node, producer: Node, then_copy: bool = False) -> None:
        steps = (("gather",), ("copy",)) if then_copy else (("gather",),)
        self.edges[(consumer.name, producer.name)] = steps

    def _gather_sharded_inputs(self, node: Node, reason: str) -> None:
        gathered = False
        for a in node.all_input_nodes:
            v = self.vals.get(a.name)
            if isinstance(v, ShardLayout):
                self._gather(node, a)
                gathered = True
            elif isinstance(v, tuple) and any(isinstance(x, ShardLayout) for x in v):
                raise ValueError(
                    f"node {node.name} ({_info(node).module_path or '<root>'}) uses several sharded "
                    f"values at once ({reason}); whale cannot gather a tuple"
                )
        if gathered:
            self.fallbacks.append(f"{node.name} ({_info(node).module_path or '<root>'}): {reason}")

    # ---- the walk ---------------------------------------------------------------------------

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.vals[node.name] = self._visit(node)

    def _visit(self, node: Node) -> Any:
        info = _info(node)
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            return self._output(node)
        sharded_in = any(self.vals.get(a.name) is not None for a in node.all_input_nodes)
        if not _splits(info):
            if sharded_in:
                self._gather_sharded_inputs(node, "leaves the split scope")
            return None
        if node.op == "call_module":
            return self._module(node)
        if not sharded_in:
            return None
        self._stage()
        try:
            result = propagate_op(self, node)
        except Fallback as why:
            self._gather_sharded_inputs(node, str(why))
            return None
        self._commit()
        return result

    def _module(self, node: Node) -> Any:
        module = self.gm.get_submodule(node.target)
        x = node.args[0] if node.args else None
        layout = self.val(x)
        path = node.target
        if isinstance(module, (nn.Linear, ExportedLinear)):
            nd = len(_info(x).shapes[0])
            # A weight tied to a layer already sliced by output rows (OPT's LM head after its
            # project_out, tied to the vocabulary-parallel embedding) is sliced the same way.
            tied_rows = id(module.weight) in self.weight_regions
            if isinstance(layout, ShardLayout) and layout.dim == nd - 1 and not tied_rows:
                region = self._find(layout.region)
                self.bounds[region].append(layout.per_block)
                self.members[region].append(path)
                self.modules[node.name] = ModuleDecision(node.name, path, "row", layout.region, layout)
                self._called_again(self.modules[node.name])
                return None
            if isinstance(layout, ShardLayout):
                self._gather(node, x, then_copy=True)
                if not tied_rows:
                    self.fallbacks.append(f"{node.name} ({path}): Linear input sharded on a non-feature dim")
            else:
                self.edges[(node.name, x.name)] = (("copy",),)
            blocks = self.blocks.get(node.name, 1)
            if module.out_features % blocks:
                raise ValueError(f"{path}: {module.out_features} output features cannot form {blocks} equal blocks")
            per_block = module.out_features // blocks
            region = self._tied(module, self._new_region("columns", path, per_block))
            out = ShardLayout(len(_info(node).shapes[0]) - 1, blocks, per_block, region, node.name)
            self.modules[node.name] = ModuleDecision(node.name, path, "column", region, out)
            self._called_again(self.modules[node.name])
            return out
        if isinstance(module, _ELEMENTWISE_MODULES):
            return layout
        is_mha = isinstance(module, nn.MultiheadAttention)
        qkv = [a for a in [*node.args[:3], *(node.kwargs.get(k) for k in ("query", "key", "value"))] if isinstance(a, Node)]
        for a in node.all_input_nodes:
            sharded = isinstance(self.val(a), ShardLayout)
            if sharded:
                self.fallbacks.append(f"{node.name} ({path}): {type(module).__name__} on a sharded value")
            # A replicated input entering a head-sharded attention gets partial gradients per rank.
            copy = is_mha and a in qkv
            if sharded or copy:
                self.edges[(node.name, a.name)] = ((("gather",),) if sharded else ()) + ((("copy",),) if copy else ())
        if isinstance(module, (nn.Embedding, ExportedEmbedding)):
            region = self._tied(module, self._new_region("vocabulary entries", path, module.num_embeddings))
            self.modules[node.name] = ModuleDecision(node.name, path, "vocab", region)
            self._called_again(self.modules[node.name])
        elif isinstance(module, nn.MultiheadAttention):
            region = self._new_region("heads", path, module.num_heads)
            weights_used = node.kwargs.get("need_weights", node.args[4] if len(node.args) > 4 else True) is not False and any(
                op_name(u) == "getitem" and u.args[1] == 1 and u.users for u in node.users
            )
            self.modules[node.name] = ModuleDecision(node.name, path, "mha", region, need_weights=weights_used)
            return (None, None)
        elif path in self.moe:
            region = self._new_region("experts", path, self.moe[path].num_experts)
            self.modules[node.name] = ModuleDecision(node.name, path, "moe", region)
        return None

    def _called_again(self, decision: ModuleDecision) -> None:
        """A module called more than once (ALBERT runs one layer at every depth) holds one
        slice of its weight: every call must shard it alike, and their regions are one."""
        first = self.first_call.setdefault(decision.path, decision)
        if first is decision:
            return
        alike = first.kind == decision.kind and (
            first.layout is None or (first.layout.blocks, first.layout.per_block) == (decision.layout.blocks, decision.layout.per_block)
        )
        if not alike:
            raise ValueError(
                f"split() at {decision.path!r}: the module is called more than once and its calls "
                f"shard it differently ({first.node}: {first.kind}, {decision.node}: {decision.kind}); "
                "whale slices a module's weight one way (one call's input arrives sharded, another's "
                "whole). Split only what runs at every depth, so that each call's input arrives "
                "whole, or keep the module out of the split"
            )
        ra, rb = self._find(first.region), self._find(decision.region)
        if ra != rb:
            self.parent[rb] = ra

    def _tied(self, module: nn.Module, region: int) -> int:
        """A weight tied between layers (an embedding and its LM head) is sliced once: one region."""
        first = self.weight_regions.setdefault(id(module.weight), region)
        if first != region:
            self.parent[self._find(region)] = self._find(first)
        return region

    def _output(self, node: Node) -> None:
        result, index = node.args[0], None
        if isinstance(result, (tuple, list)):  # export: the flat outputs of the output pytree
            sharded = [i for i, r in enumerate(result) if isinstance(self.val(r), ShardLayout)]
            if len(sharded) == 1:
                index = sharded[0]
                result = result[index]
        layout = self.val(result)
        if (
            self.keep_sharded_output
            and isinstance(layout, ShardLayout)
            and layout.dim == len(_info(result).shapes[0]) - 1
            and layout.blocks == 1
        ):
            self.output_layout, self.output_index = layout, index
            self.kinds[self._find(layout.region)] = "classes"
            return
        self._gather_sharded_inputs(node, "model output")
        return

    # ---- the result -------------------------------------------------------------------------

    def plan(self, group_size: int) -> TensorParallelPlan:
        roots = sorted({self._find(r) for r in self.parent})
        atoms, regions = {}, []
        for root in roots:
            members = [r for r in self.parent if self._find(r) == root]
            bound = math.gcd(*[b for r in members for b in self.bounds[r]])
            atoms[root] = bound
            kinds = {self.kinds[r] for r in members}
            kind = "classes" if "classes" in kinds else "heads" if any(r in self.heads for r in members) else kinds.pop()
            modules = tuple(dict.fromkeys(p for r in members for p in self.members[r]))
            name = _common_path(list(modules))
            regions.append(Region(root, name if name or len(modules) == 1 else "+".join(modules), kind, modules, bound))

        def canon(v: Any) -> Any:
            if isinstance(v, ShardLayout):
                return dataclasses.replace(v, region=self._find(v.region))
            if isinstance(v, tuple):
                return tuple(canon(x) for x in v)
            return v

        edges = {k: tuple((s[0], canon(s[1])) if len(s) > 1 else s for s in steps) for k, steps in self.edges.items()}
        fixes = {k: (kind, canon(layout), extra) for k, (kind, layout, extra) in self.fixes.items()}
        modules = {k: dataclasses.replace(d, region=self._find(d.region), layout=canon(d.layout)) for k, d in self.modules.items()}
        return TensorParallelPlan(
            graph_module=self.gm,
            group_size=group_size,
            regions=tuple(regions),
            layouts={k: canon(v) for k, v in self.vals.items()},
            modules=modules,
            edges=edges,
            fixes=fixes,
            reduce_after=frozenset(self.reduce),
            output_layout=canon(self.output_layout),
            output_index=self.output_index,
            fallbacks=tuple(self.fallbacks),
            moe=dict(self.moe),
        )
