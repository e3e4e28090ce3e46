"""Opaque calls: a submodule whose forward export cannot trace, captured as one node.

A mixture-of-experts layer that loops over the experts some token was routed to
(``for expert in expert_hit:``), or an attention that branches on a tensor's value
(``if is_global_attn:``), stops ``torch.export`` with a data-dependent guard: the rest of the
model would trace, but the whole export fails. Capture then exports again with that module's
class made opaque. Each call of such a module becomes one ``whale_capture.opaque`` node whose
inputs are the call's tensors and the module's parameters and buffers, so every pass after
capture sees it as a node like any other:

* a pipeline cuts around it and its stage holds its parameters;
* it runs the module's own ``forward`` eagerly, on a storage-free copy of the module holding
  the tensors the graph passes in (a stage's own parameters), with autograd recording inside,
  so gradients are the local model's (the op's kernel sits at the ``Autograd`` dispatch key);
* under fake tensors (export, cost measurement) its output is built from an eager call of the
  module on the example (and on half its rows, to tell which dimensions follow the batch),
  recorded before the export: the same dtypes and shapes, each
  dimension that equals an input's taking that input's (symbolic) size, so the batch stays
  dynamic; its FLOPs and the activations it saves for backward (its memory) are the recorded
  call's, scaled by rows;
* ``split()`` cannot shard inside it (its parameters are read by an op whale has no rule for),
  and a stage boundary inside it cannot be cut: the message names the module.

A custom ``torch.autograd.Function`` whose backward is not its forward's gradient makes its
caller opaque too: export (and fx) record what its forward computes and drop its backward, so
the graph would give other gradients than the model (a straight-through estimator's identity
becomes round's zero; Reformer's reversible layers and a reentrant ``torch.utils.checkpoint``
run their forward under ``no_grad`` and would give none). :func:`custom_functions_stop` stops
the trace at such a call; :func:`backward_is_forwards` lets it go through one whose backward
is its forward's gradient (Bloom's GeLU), compared on the example.

The model is not changed: each opaque module's ``forward`` is replaced on the instance for
the export and restored after.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_unflatten

from .flops import EXTRA_FLOP_FORMULAS, FlopCount

__all__ = [
    "OPAQUE",
    "CustomFunctionCall",
    "OpaqueModules",
    "backward_is_forwards",
    "custom_functions_stop",
    "is_opaque",
    "opaque_flops",
    "opaque_module_of",
    "opaque_saved_bytes",
]

_LIB = torch.library.Library("whale_capture", "DEF")  # noqa: TOR901 - defined once per process
_LIB.define("opaque(str key, Tensor[] inputs, SymInt[] sizes) -> Tensor[]")
OPAQUE = torch.ops.whale_capture.opaque.default


class _Slot:
    """Where a call's tensor (``TENSOR``) or a size computed in the graph goes in its arguments."""

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind


TENSOR, SIZE, FLAG = _Slot("tensor"), _Slot("size"), _Slot("flag")  # flag: a bool, sent as 0/1


@dataclasses.dataclass(frozen=True)
class _TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclasses.dataclass
class _Recorded:
    """One eager call of an opaque module on the example: what its fake output is built from."""

    in_shapes: tuple[tuple[int, ...], ...]  # the call's tensor inputs, in flat order
    out_flat: tuple[object, ...]  # a _TensorMeta per output tensor, the value itself otherwise
    out_spec: TreeSpec
    flops: int
    saved_bytes: int  # activations autograd saved inside the call (parameters not counted)
    # The same call on a batch of fewer rows, where the model ran on one: its input and output
    # tensors' shapes. A dimension that changed with the rows follows the batch.
    fewer: tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]] | None = None


@dataclasses.dataclass
class _Call:
    """One opaque call site: the module (a copy without storage) and how to call it."""

    path: str
    module: nn.Module
    state_names: tuple[str, ...]  # parameters, then buffers: the op's inputs after the call's own
    in_flat: tuple[object, ...]  # the call's arguments flattened, a _Slot where the graph's value goes
    in_spec: TreeSpec
    recorded: _Recorded
    aliases: dict[str, tuple[str, ...]] = dataclasses.field(init=False)  # a state name -> every name of its tensor

    def __post_init__(self) -> None:
        names: dict[int, list[str]] = {}
        for name, t in itertools.chain(self.module.named_parameters(remove_duplicate=False),
                                       self.module.named_buffers(remove_duplicate=False)):  # fmt: skip
            names.setdefault(id(t), []).append(name)
        self.aliases = {group[0]: tuple(group) for group in names.values()}


_CALLS: dict[str, _Call] = {}
_KEYS = itertools.count()


class CustomFunctionCall(RuntimeError):
    """A custom ``torch.autograd.Function`` was applied while capture traced with gradients on."""

    def __init__(self, message: str, function: type) -> None:
        super().__init__(message)
        self.function = function


@contextmanager
def custom_functions_stop(traced: Collection[type] = ()) -> Iterator[None]:
    """Stop a trace where forward applies a custom ``torch.autograd.Function`` with gradients
    enabled: the trace would record its forward's ops, not its backward. Capture then checks
    the Function (:func:`backward_is_forwards`): one whose backward is its forward's own
    gradient is ``traced`` through; any other makes the module whose forward applied it an
    opaque call (the Function runs as itself, its backward included), or is reported where
    the model's own forward applies it.

    ``Function.apply`` is replaced on the class for the trace and restored after.
    """

    def apply(original, cls, *args, **kwargs):
        # torch's private Functions are kept by the trace: a torch.library custom op's
        # register_autograd (torch._library) is the op's own autograd, and the graph holds the op.
        if torch.is_grad_enabled() and cls not in traced and not cls.__module__.startswith("torch._"):
            raise CustomFunctionCall(
                f"forward applies the custom autograd.Function {cls.__module__}.{cls.__qualname__}: "
                "a traced graph keeps what its forward computes and loses its backward",
                cls,
            )
        return original(cls, *args, **kwargs)

    with _apply_replaced(apply):
        yield


@contextmanager
def _apply_replaced(apply: Callable[..., object]) -> Iterator[None]:
    """``torch.autograd.Function.apply`` replaced on the class by ``apply(original, cls, *args,
    **kwargs)`` for the block (``original`` the unbound apply), and restored after."""
    base = torch.autograd.function.Function
    original = base.__dict__["apply"]
    base.apply = classmethod(lambda cls, *args, **kwargs: apply(original.__func__, cls, *args, **kwargs))
    try:
        yield
    finally:
        base.apply = original


class _Compared(Exception):  # noqa: N818 - ends the model's forward once the Function is compared
    pass


class _Ctx:
    """What an old-style ``forward(ctx, ...)`` uses of its context, run as plain ops."""

    def __init__(self, args: tuple) -> None:
        self.needs_input_grad = tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        self.saved_tensors: tuple = ()

    def save_for_backward(self, *tensors) -> None:
        self.saved_tensors = tensors

    def save_for_forward(self, *tensors) -> None:
        pass

    def mark_non_differentiable(self, *tensors) -> None:
        pass

    def mark_dirty(self, *tensors) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


def backward_is_forwards(function: type, model: nn.Module, args: tuple, kwargs: Mapping[str, object]) -> bool:
    """Whether ``function``'s backward gives the gradients autograd gives through its forward's
    own ops, on its first call in an eager run of the model on the example (the gradients of
    its tensor inputs and of the model's parameters, for a random output gradient): then a
    graph of its forward trains as the model does (Bloom's GeLU, its derivative written out).
    A straight-through estimator, a forward under ``no_grad`` (Reformer's reversible layers,
    a reentrant checkpoint) or one the check cannot run is not. The caller restores buffers;
    parameters' ``.grad`` are restored here."""
    params = [p for p in model.parameters() if p.requires_grad]
    kept = [p.grad for p in params]
    verdict = [False]

    def apply(original, cls, *a, **k):
        if cls is not function:
            return original(cls, *a, **k)
        verdict[0] = _same_gradients(cls, original(cls, *a, **k), a, k, params)
        raise _Compared

    try:
        with _apply_replaced(apply), torch.enable_grad():
            model(*args, **kwargs)
    except _Compared:
        pass
    except Exception:  # noqa: BLE001 - the model does not run eagerly here: not shown to be the same
        return False
    finally:
        for p, grad in zip(params, kept):
            p.grad = grad
    return verdict[0]


def _same_gradients(cls: type, real: object, args: tuple, kwargs: dict, params: list[torch.Tensor]) -> bool:
    try:
        if cls.setup_context is torch.autograd.function._SingleLevelFunction.setup_context:
            plain = cls.forward(_Ctx(args), *args, **kwargs)
        else:
            plain = cls.forward(*args, **kwargs)
    except Exception:  # noqa: BLE001 - its forward needs the real context: not shown to be the same
        return False
    seen: set[int] = set()
    wrt = [t for t in [*tree_leaves((args, kwargs)), *params]
           if isinstance(t, torch.Tensor) and t.requires_grad and not (id(t) in seen or seen.add(id(t)))]  # fmt: skip
    outs = [[t for t in tree_leaves(v) if isinstance(t, torch.Tensor)] for v in (real, plain)]
    if not wrt or len(outs[0]) != len(outs[1]):
        return not wrt
    generator = torch.Generator().manual_seed(0)
    grad_out = [torch.randn(t.shape, generator=generator).to(t) if t.is_floating_point() else None for t in outs[0]]

    def grads(tensors: list[torch.Tensor]) -> list[torch.Tensor | None]:
        pairs = [(t, g) for t, g in zip(tensors, grad_out) if g is not None and t.requires_grad]
        if not pairs:
            return [None] * len(wrt)
        return list(torch.autograd.grad([t for t, _ in pairs], wrt, [g for _, g in pairs], retain_graph=True,
                                        allow_unused=True))  # fmt: skip

    for a, b in zip(grads(outs[0]), grads(outs[1])):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        if not torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6):
            return False
    return True


def is_opaque(target: object) -> bool:
    """Whether a graph node's target (or a ``NodeInfo``'s target name) is an opaque call."""
    return target is OPAQUE or target == str(OPAQUE)


def opaque_module_of(key: str) -> str:
    """The module path an opaque call's key stands for."""
    return _CALLS[key].path


def _state(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    seen: set[int] = set()
    out = []
    for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


def _storage_free_copy(module: nn.Module) -> nn.Module:
    """``module`` with every parameter and buffer on the meta device (its code and attributes;
    the tensors a call uses come from the graph)."""
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


# ---- the op's kernels -----------------------------------------------------------------------


def _under_fake(inputs: list[torch.Tensor]) -> bool:
    if any(isinstance(t, FakeTensor) for t in inputs):
        return True
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def _run(key: str, inputs: list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
    """The module's forward on real tensors, autograd recording inside (the Autograd kernel)."""
    if _under_fake(inputs):
        with torch._C._AutoDispatchBelowAutograd():
            return OPAQUE(key, inputs, sizes)
    call = _CALLS[key]
    own = len(inputs) - len(call.state_names)
    tensors, numbers = iter(inputs[:own]), iter(sizes)
    flat = [next(tensors) if v is TENSOR else int(next(numbers)) if v is SIZE else bool(next(numbers)) if v is FLAG
            else v for v in call.in_flat]  # fmt: skip
    args, kwargs = tree_unflatten(flat, call.in_spec)
    # The graph's tensors are put into the module and left there (not swapped in for the call
    # only, as functional_call would): a custom autograd.Function in it may run the module's
    # layers again in its backward (Reformer's reversible layers, a reentrant checkpoint).
    for name, t in zip(call.state_names, inputs[own:], strict=True):
        for alias in call.aliases.get(name, (name,)):
            owner, _, leaf = alias.rpartition(".")
            holder = call.module.get_submodule(owner)
            (holder._parameters if leaf in holder._parameters else holder._buffers)[leaf] = t
    out = call.module(*args, **kwargs)
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _fake(key: str, inputs: list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
    """Outputs shaped as the recorded call's: a dimension equal to one of the recorded inputs'
    takes that input's size now (symbolic under a dynamic batch), at the same position first."""
    rec = _CALLS[key].recorded
    own = inputs[: len(rec.in_shapes)]
    outs = []
    metas = [item for item in rec.out_flat if isinstance(item, _TensorMeta)]
    for i, item in enumerate(metas):
        if rec.fewer is not None and len(rec.fewer[1][i]) == len(item.shape):
            fewer_in, fewer_out = rec.fewer
            dims = [_size_by_rows(size, fewer_out[i][k], own, rec.in_shapes, fewer_in) for k, size in enumerate(item.shape)]
        else:
            dims = [_size_like(k, size, own, rec.in_shapes) for k, size in enumerate(item.shape)]
        outs.append(inputs[0].new_empty(dims, dtype=item.dtype))
    return outs


def _size_by_rows(size: int, fewer: int, inputs, shapes, fewer_shapes) -> object:
    """An output dimension recorded at two batch sizes: the same in both is fixed; one that
    changed is an input dimension that changed in the same proportion (that input's size now),
    or a whole multiple of one (tokens flattened from rows)."""
    if size == fewer:
        return size
    moved = [(t.shape[j], a, b) for t, s, f in zip(inputs, shapes, fewer_shapes) for j, (a, b) in enumerate(zip(s, f))
             if a != b]  # fmt: skip
    for now, a, b in moved:
        if a == size and b == fewer:
            return now
    for now, a, b in moved:
        if size % a == 0 and fewer == b * (size // a):
            return now * (size // a)
    for now, a, b in moved:
        if a % size == 0 and b == fewer * (a // size):
            return now // (a // size)
    return size


def _size_like(k: int, size: int, inputs, shapes) -> object:
    for t, s in zip(inputs, shapes):  # the same position of an input of that size
        if len(s) > k and s[k] == size:
            return t.shape[k]
    for t, s in zip(inputs, shapes):  # any position
        if size in s:
            return t.shape[s.index(size)]
    for t, s in zip(inputs, shapes):  # rows x a fixed factor (tokens flattened from rows)
        if s and s[0] and size % s[0] == 0 and size > s[0]:
            return t.shape[0] * (size // s[0])
    return size


_LIB.impl("opaque", _run, "Autograd")
torch.library.register_fake("whale_capture::opaque", _fake, lib=_LIB)


def _scaled(key: str, value: int, input_shapes) -> int:
    """``value`` of the recorded call, scaled by the rows of its first input now."""
    rec = _CALLS[key].recorded
    if not rec.in_shapes or not input_shapes or not rec.in_shapes[0] or not input_shapes[0]:
        return value
    was, now = rec.in_shapes[0][0], input_shapes[0][0]
    try:
        return int(value * int(now) / was) if was else value
    except Exception:  # a size known only at run time: the example's
        return value


def opaque_flops(key: str, input_shapes, sizes=(), out_shape=None, **kwargs) -> int:
    """The recorded call's forward FLOPs, scaled by the rows of its first input."""
    return _scaled(key, _CALLS[key].recorded.flops, input_shapes)


def opaque_saved_bytes(key: str, inputs) -> int:
    """Bytes of activations the call saves for backward, scaled as :func:`opaque_flops`."""
    return _scaled(key, _CALLS[key].recorded.saved_bytes, [tuple(t.shape) for t in inputs])


# ---- export with opaque modules -------------------------------------------------------------


def _check_same_call(path: str, module: nn.Module, rec: _Recorded, tensors: list[torch.Tensor]) -> None:
    """The traced call passes the tensors the eager call on the example did, as the opaque op
    runs the module on the traced ones: a caller that branches on being traced (transformers'
    ``is_torchdynamo_compiling()``: LongT5's default attention mask, built only eagerly) passes
    others, and the recording would not fit (a crash, or silently other numbers)."""
    shapes = [tuple(t.shape) for t in tensors]
    if len(shapes) == len(rec.in_shapes) and all(
        len(t) == len(r) and all(not isinstance(d, int) or d == e for d, e in zip(t, r)) for t, r in zip(shapes, rec.in_shapes)
    ):
        return
    raise OpaqueCallMismatch(
        f"the code calling {path!r} ({type(module).__name__}) takes another branch when traced (transformers' "
        "is_torchdynamo_compiling()), so the graph would not compute what the model does: it passes tensors "
        f"of shapes {[tuple(map(str, t)) for t in shapes]} traced, {list(rec.in_shapes)} eagerly"
    )


class OpaqueCallMismatch(RuntimeError):
    """An opaque module's traced call passes other tensors than its eager call on the example."""


class OpaqueModules:
    """Modules of ``model`` to export as opaque calls, by class.

    Example::

        opaque = OpaqueModules(model)
        opaque.add("transformer.blocks.0.ffn.experts")   # every DbrxExperts becomes opaque
        opaque.record(args, kwargs)
        with opaque.patched():
            exported = torch.export.export(model, args, kwargs, strict=False)
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.classes: list[type] = []
        self.reasons: dict[str, str] = {}  # class name -> why export could not trace it
        self._records: dict[str, list[_Recorded]] = {}
        self._calls: dict[str, int] = {}  # path -> calls so far in this export

    def restart(self) -> None:
        """Before each export: the next call of each module is its first again."""
        self._calls = {}

    def __bool__(self) -> bool:
        return bool(self.classes)

    def add(self, path: str, reason: str = "") -> bool:
        """Make the class of the module at ``path`` opaque; False where it cannot be: the root,
        a class already opaque, a torch module or one holding a BatchNorm (whale handles their
        semantics, e.g. BatchNorm statistics synchronised across replicas, which an opaque call
        would hide)."""
        if not path:
            return False
        module = self.model.get_submodule(path)
        cls = type(module)
        norms = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
        if cls in self.classes or cls.__module__.startswith("torch.") or norms:
            return False
        self.classes.append(cls)
        self.reasons[cls.__name__] = reason
        return True

    def targets(self) -> list[tuple[str, nn.Module]]:
        """The opaque modules, outermost only (one inside another runs inside its call)."""
        found: list[tuple[str, nn.Module]] = []
        for path, module in self.model.named_modules():
            inside = any(path.startswith(f"{outer}.") for outer, _ in found)
            if path and isinstance(module, tuple(self.classes)) and not inside:
                found.append((path, module))
        return found

    def record(self, args: tuple, kwargs: Mapping[str, object], fewer: tuple[tuple, Mapping] | None = None) -> None:
        """Run the model once on the example, eagerly, recording each opaque call's input and
        output shapes, its FLOPs and the activations it saves for backward (the caller restores
        buffers). ``fewer``: the example with fewer rows, run once more for the shapes only, so
        that an output's dimension that follows the batch is told from one that only equals
        it (8 rows of 8 tokens; tokens flattened from rows equal to the hidden width)."""
        self._records = {}
        self._record(args, kwargs)
        if fewer is None:
            return
        full, self._records = self._records, {}
        try:
            self._record(*fewer)
        except Exception:  # noqa: BLE001 - the model takes no other batch size: one recording
            self._records = full
            return
        for path, calls in full.items():
            other = self._records.get(path, [])
            if len(other) != len(calls):
                continue
            for call, small in zip(calls, other):
                if len(small.in_shapes) == len(call.in_shapes) and len(small.out_flat) == len(call.out_flat):
                    shapes = tuple(v.shape for v in small.out_flat if isinstance(v, _TensorMeta))
                    call.fewer = (small.in_shapes, shapes)
        self._records = full

    def _record(self, args: tuple, kwargs: Mapping[str, object]) -> None:
        handles = []
        counters: dict[str, tuple[FlopCount, ExitStack]] = {}  # the calls running now
        params = {id(p) for p in self.model.parameters()}
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in params:
                saved[0] += t.numel() * t.element_size()
            return t

        def before(path: str) -> Callable:
            def hook(module, args, kwargs):
                saved[0] = 0
                modes = ExitStack()
                counter = modes.enter_context(FlopCount(EXTRA_FLOP_FORMULAS))
                modes.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
                counters[path] = (counter, modes)

            return hook

        def after(path: str) -> Callable:
            def hook(module, args, kwargs, out):
                counter, modes = counters.pop(path)
                modes.close()
                flat_in = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                flat_out, spec = tree_flatten(out)
                self._records.setdefault(path, []).append(_Recorded(
                    tuple(tuple(t.shape) for t in flat_in),
                    tuple(_TensorMeta(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for v in flat_out),
                    spec, counter.get_total_flops(), saved[0]))  # fmt: skip

            return hook

        for path, module in self.targets():
            handles.append(module.register_forward_pre_hook(before(path), with_kwargs=True))
            handles.append(module.register_forward_hook(after(path), with_kwargs=True))
        try:
            with torch.enable_grad():
                self.model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            for _, modes in reversed(counters.values()):  # a call the model raised in: leave no mode on
                modes.close()

    @contextmanager
    def patched(self) -> Iterator[None]:
        """Each opaque module's ``forward`` replaced, on the instance, by the opaque op."""
        saved = []
        try:
            for path, module in self.targets():
                saved.append((module, module.__dict__.get("forward")))
                module.forward = self._opaque_forward(path, module)
            yield
        finally:
            for module, forward in saved:
                if forward is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = forward

    def _opaque_forward(self, path: str, module: nn.Module) -> Callable:
        records = self._records.get(path, [])
        template = _storage_free_copy(module)
        names = tuple(name for name, _ in _state(module))

        def forward(*args, **kwargs):
            k = self._calls[path] = self._calls.get(path, -1) + 1
            if k >= len(records):
                raise RuntimeError(
                    f"{path!r} ({type(module).__name__}) is called more often under export than it "
                    "was on the example; whale cannot record its output to make it an opaque call"
                )
            flat, spec = tree_flatten((args, kwargs))
            if any(isinstance(v, torch.SymFloat) for v in flat):
                raise RuntimeError(
                    f"{path!r} ({type(module).__name__}) takes a float computed in the graph as a "
                    "plain argument; whale cannot make it an opaque call"
                )
            tensors = [v for v in flat if isinstance(v, torch.Tensor)]
            _check_same_call(path, module, records[k], tensors)
            sizes = [v if isinstance(v, torch.SymInt) else torch.sym_ite(v, 1, 0)
                     for v in flat if isinstance(v, torch.SymInt | torch.SymBool)]  # fmt: skip
            slots = tuple(TENSOR if isinstance(v, torch.Tensor) else SIZE if isinstance(v, torch.SymInt)
                          else FLAG if isinstance(v, torch.SymBool) else v for v in flat)  # fmt: skip
            key = f"{next(_KEYS)}:{path}"
            _CALLS[key] = _Call(path, template, names, slots, spec, records[k])
            # The state as export sees it now (its fake parameters), so the graph reads them as
            # the model's parameters, not as constants.
            outs = iter(OPAQUE(key, tensors + [t for _, t in _state(module)], sizes))
            rec = records[k]
            out_flat = [next(outs) if isinstance(v, _TensorMeta) else v for v in rec.out_flat]
            return tree_unflatten(out_flat, rec.out_spec)

        return forward
