"""Shape propagation memoised by node signature: identical blocks are measured once.

A deep model runs the same ops on the same input metadata in every block (GPT-3's 96 layers),
and on fake tensors what a node produces (output shapes, strides, dtypes, which outputs alias
which inputs) and the FLOPs it counts are a function of that metadata alone. :class:`NodeMemo`
keys a node by

- what it calls: the aten op or torch function object, the tensor method's name, or for a
  ``call_module`` the module's class, every attribute of it (``in_features``, ``p``, ``eps``,
  ``training``, ...) and the metadata of its parameters and buffers;
- its arguments' structure with every non-tensor value (type and value) and every tensor's
  metadata (type, shape, stride, storage offset, dtype, device, layout, ``requires_grad``) and
  which arguments are the same tensor or share storage;
- grad mode and the default dtype;

and on a hit rebuilds the outputs from what the first run recorded: a fresh tensor of the same
metadata (``empty_strided``), a view of the same input (``as_strided``), or the input itself.

Only what provably depends on nothing else is memoised; everything else runs as before:

- targets: aten ops, functions of ``torch``/``operator``, ``getattr``, methods of a tensor, and
  leaf modules of ``torch.nn`` with no submodules and no hooks whose every attribute is a plain
  value (a user's subclass, a module holding a tensor or a function attribute run for real);
- values: every input leaf a tensor or a plain value (int, float, bool, str, None, dtype,
  device, slice, ...), at least one tensor, every output leaf a tensor, no symbolic size
  anywhere (data-dependent shapes, dynamic batch dimensions), strided layout, no fake constant;
- effects: a node that changed an input (version counter or metadata: ``add_``,
  ``requires_grad_``) or whose output aliases something other than its inputs is recorded as
  "run for real" for its signature; autocast or inference mode on disables the memo, and so
  does a forward that differentiates (``torch.autograd.grad``): rebuilt results hang off no
  autograd graph. Where the graph changes anything in place, rebuilt results that require grad
  are no leaves and views that require grad run for real, so autograd refuses what it refused.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    FakeTensor,
    FakeTensorMode,
    in_kernel_invocation_manager,
)
from torch.fx import Node

from ..primitives.annotations import Annotation

__all__ = ["NodeMemo"]

# Non-tensor argument values whose type and value say all a torch op can read from them.
_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format,
          torch.layout, type(Ellipsis))  # fmt: skip
# Modules whose functions are pure functions of their arguments' metadata on fake tensors.
_TORCH_FUNCTION_MODULES = ("torch", "torch.nn.functional", "torch.functional", "torch._C._nn",
                           "torch._C._VariableFunctions", "torch._C._special", "torch._C._linalg",
                           "torch._C._fft", "_operator", "operator")  # fmt: skip
_OPERATOR_IN_PLACE = frozenset(("iadd", "iand", "iconcat", "ifloordiv", "ilshift", "imatmul", "imod",
                                 "imul", "ior", "ipow", "irshift", "isub", "itruediv", "ixor",
                                 "setitem", "delitem"))  # fmt: skip
_BARE_MODULE_ATTRS = frozenset(vars(nn.Module()))
_RUN = object()  # memo value of a signature that must always run for real


class _NotMemoisable(Exception):
    """A value or target the memo cannot key safely."""


@dataclasses.dataclass(frozen=True)
class _Recorded:
    """What a node produced on its first run: output structure and the FLOPs counted."""

    outputs: object  # nested tuples: ("fresh", meta) / ("view", input, meta) / ("input", i) / ...
    flops: int


class NodeMemo:
    """Memo of node results by signature, for one graph in one fake mode.

    ``lookup`` gives ``(key, outputs, flops)``: outputs are rebuilt fake tensors on a hit,
    ``None`` on a miss (then call ``record`` with what the real run produced); a key of
    ``None`` means the node is not memoisable at all.
    """

    def __init__(
        self, fake_mode: FakeTensorMode, fetch_module: Callable[[str], nn.Module], graph: torch.fx.Graph
    ) -> None:
        self._fake_mode = fake_mode
        self._fetch_module = fetch_module
        # A rebuilt view is no autograd view; where the graph changes anything in place, views
        # that require grad run for real so autograd refuses exactly what it refused before
        # (in-place on a view of a leaf, or on one of several views a split returns).
        self._real_views = any(_in_place(n, fetch_module) for n in graph.nodes)
        # Rebuilt results hang off no autograd graph: a forward that differentiates (a gradient
        # penalty calling torch.autograd.grad) runs every node for real.
        self._off = any(_differentiates(n) for n in graph.nodes)
        self._seed: torch.Tensor | None = None
        self._memo: dict[tuple, object] = {}
        self._module_keys: dict[str, tuple | None] = {}
        self.hits = 0
        self.misses = 0

    def lookup(self, node: Node, args: tuple, kwargs: dict) -> tuple[tuple | None, object, int]:
        if self._off:
            return None, None, 0
        try:
            key, tensors = self._key(node, args, kwargs)
        except _NotMemoisable:
            return None, None, 0
        entry = self._memo.get(key)
        if entry is None or entry is _RUN:
            return (None if entry is _RUN else key), None, 0
        try:
            out = _rebuild(entry.outputs, tensors, [], self._make)
        except (_NotMemoisable, RuntimeError):  # torch refuses the rebuild (storage bounds): run it
            return None, None, 0
        self.hits += 1
        return key, out, entry.flops

    def record(self, key: tuple, args: tuple, kwargs: dict, out: object, flops: int, changed: bool) -> None:
        """Store what the node's real run produced; ``changed``: the run changed an input
        (:func:`input_state` differs), which a replay would not do."""
        self.misses += 1
        if changed:
            self._memo[key] = _RUN
            return
        try:
            self._memo[key] = _Recorded(_describe(out, _tensor_leaves((args, kwargs)), []), int(flops))
        except _NotMemoisable:
            self._memo[key] = _RUN

    def _make(self, meta: tuple, base: torch.Tensor | None) -> torch.Tensor:
        if base is not None and meta[-1] and self._real_views:
            raise _NotMemoisable
        if meta[-1] and not self._real_views:
            # Nothing in the graph changes a tensor in place or sets requires_grad, the only
            # places where a result that requires grad behaves otherwise as a leaf.
            out = _build(self._fake_mode, meta, base)
            return out.requires_grad_()
        if meta[-1] and self._seed is None:
            self._seed = _build(self._fake_mode, (None, (), (), 0, torch.float32, torch.device("cpu"), False), None)
            self._seed.requires_grad_()
        return _make(self._fake_mode, self._seed, meta, base)

    def _key(self, node: Node, args: tuple, kwargs: dict) -> tuple[tuple, list[torch.Tensor]]:
        if torch._C._is_any_autocast_enabled() or torch.is_inference_mode_enabled():
            raise _NotMemoisable  # results would differ from a rebuilt one (dtype, inference tensor)
        tensors: list[torch.Tensor] = []
        structure = (_value_key(args, tensors), _value_key(kwargs, tensors))
        if not tensors:
            raise _NotMemoisable
        metas = tuple(_tensor_key(t) for t in tensors)
        sharing = tuple(_first_sharing(tensors, i) for i in range(len(tensors)))
        context = (torch.is_grad_enabled(), torch.get_default_dtype())
        return (node.op, self._target_key(node, tensors), structure, metas, sharing, context), tensors

    def _target_key(self, node: Node, tensors: list[torch.Tensor]) -> object:
        target = node.target
        if node.op == "call_function":
            if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
                return target
            if target is getattr or getattr(target, "__module__", None) in _TORCH_FUNCTION_MODULES:
                return target
            if target in vars(operator).values():
                return target
            raise _NotMemoisable
        if node.op == "call_method":
            if not isinstance(node.args[0], Node) or not tensors:
                raise _NotMemoisable
            return target  # the method's name; the receiver's type is in the tensor metadata
        if node.op == "call_module":
            if target not in self._module_keys:
                self._module_keys[target] = _module_key(self._fetch_module(target))
            key = self._module_keys[target]
            if key is None:
                raise _NotMemoisable
            return key
        raise _NotMemoisable


def _in_place(node: Node, fetch_module: Callable[[str], nn.Module]) -> bool:
    """Whether a node may change a tensor in place (``add_``, ``+=``, ``inplace=True``, ``out=``)."""
    if node.kwargs.get("inplace") is True or "out" in node.kwargs:
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            return node.target._schema.is_mutable
        name = getattr(node.target, "__name__", "")
        return (name.endswith("_") and not name.startswith("_")) or (
            getattr(node.target, "__module__", None) in ("_operator", "operator")
            and name in _OPERATOR_IN_PLACE
        )
    if node.op == "call_module":
        return getattr(fetch_module(node.target), "inplace", False) is True
    return False


def _differentiates(node: Node) -> bool:
    if node.op == "call_method":
        return node.target in ("backward", "grad", "retain_grad", "register_hook")
    module = getattr(node.target, "__module__", None) or ""
    return node.op == "call_function" and module.startswith(("torch.autograd", "torch._functorch", "torch.func"))


def input_state(tensors: list[torch.Tensor]) -> list:
    """Version and metadata of each input, to see whether a run changed any of them."""
    return [(t._version, _tensor_key(t)) for t in tensors]


def _tensor_leaves(value: object) -> list[torch.Tensor]:
    tensors: list[torch.Tensor] = []
    _value_key(value, tensors)
    return tensors


def _value_key(value: object, tensors: list[torch.Tensor]) -> object:
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return ("T", len(tensors) - 1)
    if type(value) in _PLAIN:
        return (type(value), value)
    if type(value) in (tuple, list, torch.fx.immutable_collections.immutable_list, torch.Size):
        return (type(value), *(_value_key(v, tensors) for v in value))
    if type(value) in (dict, torch.fx.immutable_collections.immutable_dict):
        return ("dict", *((k, _value_key(v, tensors)) for k, v in value.items()))
    if type(value) is slice:
        return ("slice", *(_value_key(v, tensors) for v in (value.start, value.stop, value.step)))
    raise _NotMemoisable  # a SymInt, a module, a generator, a user object: run for real


def _tensor_key(t: torch.Tensor) -> tuple:
    if t.layout != torch.strided or getattr(t, "constant", None) is not None:
        raise _NotMemoisable
    shape, stride = tuple(t.shape), t.stride()
    if not all(type(d) is int for d in (*shape, *stride)) or type(t.storage_offset()) is not int:
        raise _NotMemoisable  # symbolic sizes: a dynamic batch or a data-dependent shape
    return (type(t), shape, stride, t.storage_offset(), t.dtype, t.device, t.requires_grad)


def _first_sharing(tensors: list[torch.Tensor], i: int) -> int:
    """The first input that is or shares storage with input ``i`` (itself when none)."""
    t = tensors[i]
    for j in range(i):
        if tensors[j] is t:
            return -1 - j
        if torch._C._is_alias_of(t, tensors[j]):
            return j
    return i


def _module_key(module: nn.Module) -> tuple | None:
    """A torch.nn leaf module's class, attributes and state metadata; None if not plain."""
    cls = type(module)
    if not cls.__module__.startswith("torch.nn.modules.") or module._modules:
        return None
    if any(vars(module)[k] for k in _BARE_MODULE_ATTRS if "hook" in k and k in vars(module)):
        return None
    if _global_module_hooks():
        return None
    attrs = []
    for name, value in sorted(vars(module).items()):
        if name in _BARE_MODULE_ATTRS and name != "training":
            continue
        if isinstance(value, tuple) and value and all(isinstance(a, Annotation) for a in value):
            continue  # whale annotations say how to parallelise, not what the module computes
        held: list[torch.Tensor] = []
        try:
            attrs.append((name, _value_key(value, held)))
        except _NotMemoisable:
            return None
        if held:  # a tensor kept as a plain attribute: its values may be read
            return None
    try:
        state = tuple(
            (name, None if t is None else _tensor_key(t))
            for name, t in (*module._parameters.items(), *module._buffers.items())
        )
    except _NotMemoisable:
        return None
    return (cls, tuple(attrs), state)


def _global_module_hooks() -> bool:
    hooks = torch.nn.modules.module
    return any(
        getattr(hooks, name, None)
        for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                     "_global_backward_pre_hooks", "_global_forward_hooks_always_called")
    )  # fmt: skip


def _describe(out: object, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> object:
    """How to rebuild ``out`` from the inputs: each tensor fresh, an input, or a view of one."""
    if isinstance(out, torch.Tensor):
        meta = _tensor_key(out)
        described = None
        for i, t in enumerate(inputs):
            if out is t:
                described = ("input", i)
                break
        if described is None:
            for j, t in enumerate(outputs):
                if out is t:
                    described = ("output", j)
                    break
        if described is None:
            for i, t in enumerate(inputs):
                if torch._C._is_alias_of(out, t):
                    described = ("view", i, meta)
                    break
        if described is None:
            for j, t in enumerate(outputs):
                if torch._C._is_alias_of(out, t):
                    described = ("view_of_output", j, meta)
                    break
        if described is None:
            described = ("fresh", meta)
        outputs.append(out)
        return described
    if type(out) in (tuple, list):
        return (type(out), tuple(_describe(v, inputs, outputs) for v in out))
    raise _NotMemoisable  # None, a size, a structseq, a Python object: run for real


def _rebuild(described: tuple, inputs: list[torch.Tensor], outputs: list[torch.Tensor], make: Callable) -> object:
    """The outputs ``described`` records; ``make(meta, base)`` builds one tensor."""
    kind = described[0]
    if kind in (tuple, list):
        return kind(_rebuild(d, inputs, outputs, make) for d in described[1])
    if kind == "input":
        out = inputs[described[1]]
    elif kind == "output":
        out = outputs[described[1]]
    elif kind == "fresh":
        out = make(described[1], None)
    else:
        base = inputs[described[1]] if kind == "view" else outputs[described[1]]
        out = make(described[2], base)
    outputs.append(out)
    return out


class _Produce(torch.autograd.Function):
    """Wraps a tensor built outside autograd as the result of an op on ``seed``: it requires
    grad and is no leaf, as the original result was (in-place ops on a leaf that requires
    grad are refused, on an op's result they are legal)."""

    @staticmethod
    def forward(ctx, seed: torch.Tensor, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        return build()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None]:
        return None, None


def _build(fake_mode: FakeTensorMode, meta: tuple, base: torch.Tensor | None) -> torch.Tensor:
    """A fake tensor of ``meta``: fresh storage, or ``base``'s storage at ``meta``'s offset.

    Built as FakeTensorMode builds the results it caches (an empty meta tensor, set onto the
    base's storage for a view, wrapped in a FakeTensor), without dispatching an op.
    """
    _, shape, stride, offset, dtype, device, _ = meta
    if base is None and offset:
        raise _NotMemoisable
    if base is not None and not isinstance(base, FakeTensor):
        raise _NotMemoisable
    with in_kernel_invocation_manager(fake_mode):
        empty = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        if base is not None:
            empty.set_(base.untyped_storage(), offset, shape, stride)
    return FakeTensor(fake_mode, empty, device)


def _make(fake_mode: FakeTensorMode, seed: torch.Tensor, meta: tuple, base: torch.Tensor | None) -> torch.Tensor:
    if not meta[-1]:
        return _build(fake_mode, meta, base)
    return _Produce.apply(seed, lambda: _build(fake_mode, meta, base))
