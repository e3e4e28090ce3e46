"""Per-node shapes, FLOPs and bytes, measured on fake tensors (nothing real is allocated).

Every node of a captured graph is executed once on ``FakeTensor`` values inside a
``FlopCounterMode``: the fake values carry shapes, dtypes and aliasing, the counter counts the
FLOPs of matmuls, convolutions and attention from those shapes. A model whose parameters live on
``torch.device("meta")`` is measured the same way, so a model too large for the host can be
planned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from .flops import EXTRA_FLOP_FORMULAS, FlopCount, grouped_mm_flops
from .node_memo import NodeMemo, input_state
from .opaque import OPAQUE, opaque_flops, opaque_saved_bytes

__all__ = ["NodeCost", "StateIndex", "measure_costs"]

# Rebuild the outputs of a node whose signature was already measured (see node_memo); False
# runs every node, which gives the same costs and shapes, slower.
MEMOISE = True


def _flop_formulas(gm: GraphModule) -> dict:
    """The extra formulas, with one for each grouped matmul in ``gm`` (``aten._grouped_mm``, or
    transformers' ``grouped_mm_fallback`` for mixture-of-experts layers on CPU), which torch's
    counter does not know: without it a Mixtral's experts cost nothing to the planner."""
    formulas = dict(EXTRA_FLOP_FORMULAS)
    for n in gm.graph.nodes:
        if n.target is OPAQUE:
            formulas[OPAQUE._overloadpacket] = opaque_flops
        packet = getattr(n.target, "_overloadpacket", None)
        if packet is not None and "grouped_mm" in getattr(packet, "__name__", "") and packet not in flop_registry:
            formulas[packet] = grouped_mm_flops
    return formulas


@dataclasses.dataclass(frozen=True)
class NodeCost:
    """What one node computes and touches, for one forward pass.

    ``output_bytes`` counts only fresh memory: outputs that alias an input (views, ``getitem``,
    in-place results) or a parameter (``get_attr``) add nothing to the activation footprint.
    """

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    flops: int
    bytes_accessed: int
    param_bytes: int
    buffer_bytes: int
    output_bytes: int
    param_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class StateIndex:
    """The model's parameters and buffers by canonical name (tied tensors share one name)."""

    canonical: Mapping[int, str]  # id(tensor) -> first name named_parameters/named_buffers gives
    by_name: Mapping[str, torch.Tensor]  # every name, duplicates included
    param_ids: frozenset[int]

    @classmethod
    def of(cls, model: nn.Module) -> StateIndex:
        canonical: dict[int, str] = {}
        by_name: dict[str, torch.Tensor] = {}
        params = list(model.named_parameters(remove_duplicate=False))
        buffers = list(model.named_buffers(remove_duplicate=False))
        for name, tensor in params + buffers:
            canonical.setdefault(id(tensor), name)
            by_name[name] = tensor
        return cls(canonical, by_name, frozenset(id(p) for _, p in params))

    def split(self, tensors: Iterable[torch.Tensor]) -> tuple[tuple[str, ...], int, int]:
        """(canonical parameter names, parameter bytes, buffer bytes) of distinct model tensors."""
        seen: dict[int, torch.Tensor] = {}
        for t in tensors:
            if id(t) in self.canonical:
                seen.setdefault(id(t), t)
        names = tuple(self.canonical[i] for i in seen if i in self.param_ids)
        param_bytes = sum(_nbytes(t) for i, t in seen.items() if i in self.param_ids)
        buffer_bytes = sum(_nbytes(t) for i, t in seen.items() if i not in self.param_ids)
        return names, param_bytes, buffer_bytes


def measure_costs(
    gm: GraphModule,
    index: StateIndex,
    fake_mode: FakeTensorMode,
    placeholder_values: Mapping[str, object] | None,
    model_modules: frozenset[str],
) -> dict[str, NodeCost]:
    """Run ``gm`` once on fake values and return each node's cost by node name.

    Args:
        gm: the captured graph module; its get_attr and call_module targets are model names.
        index: the model's parameters and buffers.
        fake_mode: the mode all values live in (export's own mode for exported graphs).
        placeholder_values: value of each placeholder by node name; ``None`` takes every
            placeholder's value from ``node.meta["val"]`` (torch.export already recorded them).
        model_modules: names of the user's modules; a call_module outside them (export's
            ``_guards_fn`` input check) is not part of the model's compute and costs nothing.

    Side effect: ``node.meta["val"]`` is set to the fake output of every node, as
    ``FakeTensorProp`` would, so later passes see shapes on both front ends.
    """
    interp = _CostInterpreter(gm, index, fake_mode, placeholder_values, model_modules)
    # Grad mode stays as the caller has it: no backward is run, so nothing is counted twice.
    # An fx graph runs plain aten ops: count them with torch's formulas and nothing else (about
    # a fifth of a GPT's capture is FlopCounterMode's per-module bookkeeping). An exported graph
    # may hold higher-order ops, which FlopCounterMode knows how to enter.
    if placeholder_values is not None:
        counter_mode = FlopCount(_flop_formulas(gm))
    else:
        counter_mode = FlopCounterMode(display=False, custom_mapping=_flop_formulas(gm))
    with fake_mode, counter_mode as counter:
        interp.counter = counter
        try:
            interp.run()
        except Exception as exc:
            exc.whale_node = interp._node  # the node whose cost could not be measured (see frontends)
            raise
    return interp.costs


class _CostInterpreter(torch.fx.Interpreter):
    def __init__(self, gm, index, fake_mode, placeholder_values, model_modules):
        super().__init__(gm, garbage_collect_values=False)
        self.index = index
        self.fake_mode = fake_mode
        self.placeholder_values = placeholder_values
        self.model_modules = model_modules
        self.counter: FlopCounterMode | FlopCount | None = None
        self.costs: dict[str, NodeCost] = {}
        self._node: Node | None = None
        self.memo = NodeMemo(fake_mode, self.fetch_attr, gm.graph) if MEMOISE else None

    def _fake(self, value: object) -> object:
        def convert(v: object) -> object:
            if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor):
                return self.fake_mode.from_tensor(v, static_shapes=True)
            return v

        return tree_map(convert, value)

    def run_node(self, n: Node) -> object:
        self._node = n
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        inputs = _distinct_tensors(tree_leaves((args, kwargs)))
        versions = [t._version for t in inputs]
        key, out, flops = self.memo.lookup(n, args, kwargs) if self.memo else (None, None, 0)
        if out is None:
            state = input_state(inputs) if key is not None else None
            before = self.counter.get_total_flops()
            out = super().run_node(n)
            flops = self.counter.get_total_flops() - before
            if key is not None:
                self.memo.record(key, args, kwargs, out, flops, input_state(inputs) != state)
        mutated = [t for t, v in zip(inputs, versions) if t._version != v]
        self.costs[n.name] = self._cost(n, inputs, mutated, out, flops)
        if out is not None:
            n.meta["val"] = out
        return out

    def placeholder(self, target, args, kwargs):
        node = self._node
        if self.placeholder_values is None:
            return node.meta.get("val")
        if node.name in self.placeholder_values:
            return self._fake(self.placeholder_values[node.name])
        return args[0] if args else None  # a parameter of forward left at its default

    def get_attr(self, target, args, kwargs):
        node = self._node
        if self.placeholder_values is None and "val" in node.meta:
            return node.meta["val"]
        return self._fake(super().get_attr(target, args, kwargs))

    def call_module(self, target, args, kwargs):
        if target not in self.model_modules:
            return self._node.meta.get("val")
        module = self.fetch_attr(target)
        state = {
            name: self._fake(t)
            for name, t in [
                *module.named_parameters(remove_duplicate=False),
                *module.named_buffers(remove_duplicate=False),
            ]
        }
        return torch.func.functional_call(module, state, args, kwargs)

    def _cost(self, n, inputs, mutated, out, flops) -> NodeCost:
        leaves = [v for v in tree_leaves(out) if isinstance(v, torch.Tensor)]
        shapes = tuple(tuple(_as_int(d) for d in t.shape) for t in leaves)
        dtypes = tuple(str(t.dtype).removeprefix("torch.") for t in leaves)
        outs = _distinct_tensors(leaves)  # a tensor returned twice is written once
        names, param_bytes, buffer_bytes = (), 0, 0
        if n.op == "get_attr":
            # A reference to model state: its consumers count the read, nothing new is written.
            names, param_bytes, buffer_bytes = self.index.split(
                [self.index.by_name[n.target]] if n.target in self.index.by_name else []
            )
            return NodeCost(shapes, dtypes, 0, 0, param_bytes, buffer_bytes, 0, names)
        if n.op == "placeholder":
            return NodeCost(shapes, dtypes, 0, 0, 0, 0, sum(map(_nbytes, outs)), ())
        if n.op == "output":
            return NodeCost(shapes, dtypes, 0, 0, 0, 0, 0, ())
        if n.op == "call_module" and n.target in self.model_modules:
            module = self.fetch_attr(n.target)
            names, param_bytes, buffer_bytes = self.index.split(
                [*module.parameters(), *module.buffers()]
            )
        fresh = [t for t in outs if not any(_aliases(t, i) for i in inputs)]
        pure_view = not fresh and not mutated and flops == 0
        # Views and getitem move no data; everything else reads its inputs and writes results.
        read = 0 if pure_view else sum(map(_nbytes, inputs)) + param_bytes + buffer_bytes
        written = sum(map(_nbytes, fresh)) + sum(map(_nbytes, mutated))
        output_bytes = sum(map(_nbytes, fresh))
        if n.target is OPAQUE:  # what it keeps for backward inside, recorded on the example
            output_bytes = max(output_bytes, opaque_saved_bytes(n.args[0], inputs))
        return NodeCost(
            shapes, dtypes, int(flops), read + written, param_bytes, buffer_bytes, output_bytes, names
        )


def _distinct_tensors(values: Iterable[object]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for v in values:
        if isinstance(v, torch.Tensor):
            seen.setdefault(id(v), v)
    return list(seen.values())


def _aliases(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or torch._C._is_alias_of(a, b)


def _as_int(value: object) -> int:
    """A concrete size; -1 for a data-dependent one (e.g. after ``nonzero``) with no hint."""
    try:
        return int(value)
    except Exception:  # an unbacked SymInt cannot be made concrete
        return -1


def _nbytes(t: torch.Tensor) -> int:
    return max(_as_int(t.numel()), 0) * t.element_size()
