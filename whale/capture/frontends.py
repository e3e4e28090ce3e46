"""The two ways whale turns a forward into a graph: ``torch.fx`` symbolic tracing and ``torch.export``.

Each front end returns a :class:`Trace`: the graph module, and for every node the module path
that owns it and the whale scopes entered in ``forward`` around it, plus its measured costs.
Nothing here merges annotations or decides between front ends; ``graph.capture`` does.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import dis
import inspect
import io
import logging
import re
import sys
import types
import warnings
from collections.abc import Mapping

import torch
from torch import nn
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from ..primitives.annotations import EXPORT_META_KEY, Annotation, current_scope
from .costs import NodeCost, StateIndex, measure_costs
from .draws import graph_signature, trace_checked
from .errors import describe_failure, exception_chain
from .graph_io import (
    GraphIO,
    batch_dynamic_shapes,
    export_graph_io,
    forward_signature,
    fx_graph_io,
    rows_of,
)
from .model_state import preserved_state
from .opaque import CustomFunctionCall, OpaqueModules, backward_is_forwards, custom_functions_stop

__all__ = ["Trace", "normalize_module_path", "trace_export", "trace_fx"]

# node.meta key under which the fx tracer records the whale scope active at node creation.
_FX_SCOPE_KEY = "whale_forward_scope"
# torch/_export/passes/_node_metadata_hook.py: the nn_module_stack of nodes created outside a module.
_NO_MODULE_KEY = "_empty_nn_module_stack_from_metadata_hook"


@dataclasses.dataclass(frozen=True)
class Trace:
    """One front end's result, before annotations are merged."""

    graph_module: GraphModule
    frontend: str
    module_paths: Mapping[str, str]  # node name -> innermost owning module ("" = root)
    forward_scopes: Mapping[str, tuple[Annotation, ...]]  # node name -> scopes entered in forward
    costs: Mapping[str, NodeCost]
    io: GraphIO
    fixed_rows: int | None = None  # the graph runs only on this many rows; None: any number


class StateAssignmentError(RuntimeError):
    """forward reassigns module state (``self.count += 1`` on a buffer), which fx cannot record."""


class _WhaleTracer(torch.fx.Tracer):
    """fx tracer that records, on every node, the whale scope it was created in.

    torch.nn modules (Linear, Conv, Embedding, LayerNorm, MultiheadAttention, ...) stay leaf
    ``call_module`` nodes, fx's default, so the rewrite can shard them as whole layers.
    """

    # Buffers become get_attr nodes (fx's default bakes them in as real tensors, so slicing a
    # causal mask by a traced length fails).
    proxy_buffer_attributes = True

    def __init__(self) -> None:
        super().__init__()
        self.instructions: dict[types.CodeType, tuple[list[int], list[dis.Instruction]]] = {}

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta[_FX_SCOPE_KEY] = current_scope()
        return node

    def proxy(self, node: Node) -> torch.fx.Proxy:
        return _WhaleProxy(node, self)


class _WhaleProxy(torch.fx.Proxy):
    """fx's Proxy, reading the bytecode of each calling function once per trace.

    ``q, k, v = x.split(n, 2)`` iterates a proxy; fx's ``__iter__`` disassembles the whole
    calling function each time to see how many values are unpacked (a 96-block GPT: 192
    disassemblies of the same forward). This does the same lookup on a per-trace cache.
    """

    def __iter__(self):
        calling_frame = inspect.currentframe().f_back
        code = calling_frame.f_code
        cache = self.tracer.instructions
        if code not in cache:
            insts = list(dis.get_instructions(code))
            cache[code] = ([i.offset for i in insts], insts)
        offsets, insts = cache[code]
        if sys.version_info >= (3, 11):
            inst = insts[bisect.bisect_left(offsets, calling_frame.f_lasti)]
        else:
            inst = insts[calling_frame.f_lasti // 2]
        if inst.opname == "UNPACK_SEQUENCE":
            return (self[i] for i in range(inst.argval))
        return self.tracer.iter(self)


def trace_fx(
    model: nn.Module,
    args: tuple,
    kwargs: Mapping[str, object],
    defaults: Mapping[str, object] = {},  # noqa: B006 - read only
    batch_dim: int | None = 0,
) -> Trace:
    """Trace with ``torch.fx`` symbolic tracing, then measure on fake tensors.

    Inputs that are not tensors (flags, ``None`` for an optional mask) are passed to fx as
    ``concrete_args``, so ``if mask is not None`` takes the branch the example takes instead of
    the branch a Proxy would take. ``defaults`` are keyword inputs capture set for the user
    (already in ``kwargs``). fx graphs take any number of rows, so ``batch_dim`` needs nothing.

    Raises:
        StateAssignmentError: forward reassigns a buffer or attribute; fx would drop the update
            (the model is restored; torch.export records such updates).
    """
    bound = _bind(model, args, kwargs)
    concrete = None
    if bound is not None:
        concrete = {k: v for k, v in bound.items() if not _holds_tensor(v) and _is_leaf_value(v)}
    tracer = _WhaleTracer()
    with preserved_state(model) as state, custom_functions_stop():
        graph = trace_checked(lambda: tracer.trace(model, concrete_args=concrete or None), graph_signature, torch_factories=True)
        assigned = state.assigned()
    if assigned:
        raise StateAssignmentError(
            f"forward assigns module state {assigned} (e.g. `self.count += 1` on a buffer); fx "
            "cannot record an assignment, torch.export records it as a buffer update"
        )
    gm = _graph_module(tracer.root, graph, type(model).__name__)

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    on_meta = _on_meta(model)
    values = {}
    positional = list(args)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        name = node.target.lstrip("*")
        if bound is not None and name in bound and name not in (concrete or {}):
            value = bound[name]
        elif bound is None and positional:
            value = positional.pop(0)
        else:
            continue  # specialised by concrete_args or left at its default
        values[node.name] = _to_meta(value) if on_meta else value
    index = StateIndex.of(model)
    modules = frozenset(name for name, _ in model.named_modules(remove_duplicate=False))
    costs = measure_costs(gm, index, fake_mode, values, modules)

    paths, scopes = {}, {}
    for node in gm.graph.nodes:
        paths[node.name] = _fx_module_path(node, modules)
        scopes[node.name] = node.meta.get(_FX_SCOPE_KEY, ())
    io = fx_graph_io(gm, forward_signature(model), bound, concrete or {}, defaults)
    return Trace(gm, "fx", paths, scopes, costs, io)


def trace_export(
    model: nn.Module,
    args: tuple,
    kwargs: Mapping[str, object],
    defaults: Mapping[str, object] = {},  # noqa: B006 - read only
    batch_dim: int | None = 0,
) -> Trace:
    """Export with ``torch.export.export(strict=False)``; costs use export's own fake values.

    The batch dimension ``batch_dim`` of every tensor input with the example's rows is
    exported dynamic (``Dim.AUTO``), so the graph runs on any number of rows (micro-batches of
    any size). Where the model forces one size, the graph keeps the example's rows
    (``Trace.fixed_rows``) and a warning says why. ``defaults`` are keyword inputs capture set
    for the user (already in ``kwargs``).

    ``preserve_node_meta`` is entered around export because non-strict export only copies
    ``torch.fx.traceback.annotate`` metadata (whale's forward scopes) onto nodes inside it.
    """
    if _on_meta(model):
        args, kwargs = _to_meta(args), _to_meta(dict(kwargs))
    sig = forward_signature(model)
    args, kwargs = tuple(args), dict(kwargs)
    known = frozenset(name for name, _ in model.named_modules(remove_duplicate=False))
    # A module export cannot trace (or whose sizes are only known at run time, which no cost can
    # be measured for) becomes an opaque call, and the export runs again (see .opaque).
    opaque = OpaqueModules(model)
    checked: dict[type, bool] = {}  # custom autograd Functions: whether the trace may go through
    while True:
        try:
            with opaque.patched(), custom_functions_stop([f for f, through in checked.items() if through]):
                exported, fixed_rows = trace_checked(
                    lambda: _export_batch_dynamic(model, sig, args, kwargs, batch_dim, opaque.restart),
                    lambda result: graph_signature(result[0].graph),
                )
            gm = exported.module()
            vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
            fake_mode = detect_fake_mode(vals) or FakeTensorMode(allow_non_fake_inputs=True)
            costs = measure_costs(gm, StateIndex.of(model), fake_mode, None, known)
            break
        except Exception as exc:
            call = _custom_function_call(exc)
            if call is not None and call.function not in checked:
                # A meta-device model is only planned (shapes and costs): no gradient runs.
                with preserved_state(model):
                    checked[call.function] = _on_meta(model) or backward_is_forwards(call.function, model, args, kwargs)
                if checked[call.function]:
                    continue
            node = getattr(exc, "whale_node", None)  # set where a node's cost could not be measured
            path = _export_module_path(node, known) if node is not None else None
            if not _make_opaque(opaque, exc, model, args, kwargs, path, batch_dim):
                raise
    if opaque:
        _warn_opaque(model, opaque)

    paths, scopes = {}, {}
    for node in gm.graph.nodes:
        paths[node.name] = _export_module_path(node, known)
        custom = node.meta.get("custom") or {}
        scopes[node.name] = tuple(custom.get(EXPORT_META_KEY, ()))
    io = export_graph_io(gm, sig, defaults, (args, kwargs))
    return Trace(gm, "export", paths, scopes, costs, io, fixed_rows)


def _custom_function_call(exc: BaseException) -> CustomFunctionCall | None:
    return next((e for e in exception_chain(exc) if isinstance(e, CustomFunctionCall)), None)


# How many module classes export may leave opaque before capture gives up.
_MAX_OPAQUE = 4


def _make_opaque(opaque: OpaqueModules, exc: Exception, model: nn.Module, args: tuple, kwargs: dict,
                 path: str | None = None, batch_dim: int | None = 0) -> bool:  # fmt: skip
    """Make the module whose forward stopped export (or owns the node ``path`` names, whose
    cost could not be measured) an opaque call, or its nearest ancestor whose class is not
    yet, and record it on the example; False where that cannot help (the root's own code, a
    meta model, which cannot run the module, or too many classes)."""
    if path is None:
        failure = describe_failure("export", exc, model)
        path = failure.module_path
        reason = f"{failure.error} {failure.where()}"
    else:
        reason = f"measuring node {exc.whale_node.name}: {_first_line(exc)} (in module {path!r})"
    if _on_meta(model) or not path or len(opaque.classes) >= _MAX_OPAQUE:
        return False
    while path and not opaque.add(path, reason):
        path = path.rpartition(".")[0]
    if not path:
        return False
    try:
        with preserved_state(model):
            opaque.record(args, kwargs, _fewer_rows(args, kwargs, batch_dim))
    except Exception:  # the model does not run eagerly on the example either: the export's error says more
        return False
    return True


def _fewer_rows(args: tuple, kwargs: dict, batch_dim: int | None) -> tuple[tuple, dict] | None:
    """The example with half its rows (every tensor input whose ``batch_dim`` has the example's
    rows), or None where there is no batch dimension to halve."""
    rows = None if batch_dim is None else rows_of(args, kwargs, batch_dim)
    if rows is None or rows < 2:
        return None

    def fewer(v):
        if isinstance(v, torch.Tensor) and v.dim() > batch_dim and v.shape[batch_dim] == rows:
            return v.narrow(batch_dim, 0, rows // 2)
        return v

    return torch.utils._pytree.tree_map(fewer, (tuple(args), dict(kwargs)))


def _warn_opaque(model: nn.Module, opaque: OpaqueModules) -> None:
    lines = [f"{cls}: {reason}" for cls, reason in opaque.reasons.items()]
    paths = [path for path, _ in opaque.targets()]
    shown = ", ".join(repr(p) for p in paths[:4]) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")
    warnings.warn(
        f"torch.export could not trace every module of {type(model).__name__}:\n  " + "\n  ".join(lines)
        + f"\nwhale captured each call of {shown} as one opaque node that runs the module's own "
        "forward (gradients as the local model's). Pipelines cut around it; split() cannot shard "
        "inside it, nor a stage boundary fall inside it.",
        stacklevel=4,
    )


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes=None, before=None) -> torch.export.ExportedProgram:
    """``torch.export.export`` (non-strict). What it writes to stderr is passed on where it
    succeeds, and dropped where it fails: on a data-dependent guard torch prints the whole
    partial graph, once per attempt, where whale says where export stopped (or recovers with an
    opaque call)."""
    if before is not None:
        before()
    with _held_stderr() as written, torch.fx.traceback.preserve_node_meta():
        exported = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    sys.stderr.write(written.getvalue())
    return exported


@contextlib.contextmanager
def _held_stderr():
    """What the block writes to stderr, held in a buffer: ``sys.stderr`` and torch's log handlers
    (which keep the stream they were made with: symbolic shapes' "Unable to find user code"
    on a data-dependent guard an opaque call then recovers from)."""
    written = io.StringIO()
    streams = (sys.stderr, sys.__stderr__)
    handlers = {
        id(h): h for name, logger in list(logging.Logger.manager.loggerDict.items())
        if name.split(".")[0] == "torch" and isinstance(logger, logging.Logger)
        for h in logger.handlers if type(h) is logging.StreamHandler and h.stream in streams
    }
    previous = [(h, h.setStream(written)) for h in handlers.values()]
    try:
        with contextlib.redirect_stderr(written):
            yield written
    finally:
        for handler, stream in previous:
            handler.setStream(stream)


def _export_batch_dynamic(model, sig, args, kwargs, batch_dim, before=None) -> tuple[torch.export.ExportedProgram, int | None]:
    """Export with a dynamic batch dimension; else the example's rows, saying why. ``before``
    runs before each export."""
    rows = None if batch_dim is None else rows_of(args, kwargs, batch_dim)
    if rows is None:
        return _export(model, args, kwargs, before=before), None
    shapes, marked = batch_dynamic_shapes(sig, args, kwargs, batch_dim, rows)
    try:
        exported = _export(model, args, kwargs, shapes, before)
    except Exception as exc:  # dynamic export failed where a static one may not
        exported = _export(model, args, kwargs, before=before)
        _warn_fixed_rows(model, marked, batch_dim, rows, _first_line(exc))
        return exported, rows
    inputs = [n for n in exported.graph.nodes if n.op == "placeholder"]
    user = set(exported.graph_signature.user_inputs)
    fixed = [
        n.name for n in inputs
        if n.name in user and isinstance(n.meta.get("val"), torch.Tensor)
        and n.meta["val"].dim() > batch_dim and is_concrete_int(n.meta["val"].shape[batch_dim])
        and int(n.meta["val"].shape[batch_dim]) == rows
    ]
    if not fixed:
        return exported, None
    if rows == 1:
        reason = "export fixes a size of 1; give an example batch of 2 or more rows"
    else:
        reason = _why_specialised(model, sig, args, kwargs, batch_dim, rows, before)
    _warn_fixed_rows(model, fixed, batch_dim, rows, reason)
    return exported, rows


def _why_specialised(model, sig, args, kwargs, batch_dim, rows, before=None) -> str:
    # A named Dim makes export explain the specialisation that Dim.AUTO made silently.
    shapes, _ = batch_dynamic_shapes(sig, args, kwargs, batch_dim, rows, torch.export.Dim("batch"))
    try:
        _export(model, args, kwargs, shapes, before)
    except Exception as exc:
        return _first_line(exc, lines=2).split(" If you're using", 1)[0]
    return "export specialised it without a reason"


def _warn_fixed_rows(model, inputs, batch_dim, rows, reason) -> None:
    warnings.warn(
        f"torch.export could not keep dimension {batch_dim} of {type(model).__name__}'s inputs "
        f"{list(inputs)} dynamic: {reason}\nThe captured graph runs only on batches of {rows} "
        f"rows, so each pipeline micro-batch must have {rows} rows; make the batch size traceable "
        "(no size fixed in forward) to lift this. Data parallel, which needs no graph, is not "
        "affected.",
        stacklevel=4,
    )


def _first_line(exc: BaseException, lines: int = 1) -> str:
    text = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: " + " ".join(text[:lines])[:400]


def normalize_module_path(raw: str, known: frozenset[str] | set[str] = frozenset()) -> str:
    """Turn a path as torch's tracers write it into a ``named_modules()`` name.

    Handles ``"transformer.h.0"``, ``"L['self'].transformer.h[0]"``,
    ``"L['self']._modules['transformer']"``, ``"getattr(L['self'].h, '0')"`` and, when
    ``known`` is given, the flattened ``"L__self___transformer_h_0"`` form.

    Example::

        >>> normalize_module_path("L['self'].transformer.h[0].attn")
        'transformer.h.0.attn'
    """
    path = raw.strip()
    if path in known:
        return path
    # getattr(A, 'x') -> A.x, innermost first so nested getattrs unwind.
    getattr_form = re.compile(r"getattr\(([^()]*?),\s*['\"]([^'\"]+)['\"]\)")
    while (new := getattr_form.sub(r"\1.\2", path)) != path:
        path = new
    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", path)
    for prefix in ("L.self.", "self.", "L__self___", "L__self__."):
        if path.startswith(prefix):
            path = path[len(prefix) :]
            break
    else:
        if path in ("L.self", "self", "L__self__"):
            return ""
    if known and path not in known:
        # Older dynamo flattened the path into an identifier: L__self___transformer_h_0.
        flat = {name.replace(".", "_"): name for name in sorted(known)}
        path = flat.get(path, path)
    return path


def _fx_module_path(node: Node, modules: frozenset[str]) -> str:
    if node.op == "call_module":
        return node.target
    if node.op == "get_attr":
        return _owner(node.target, modules)
    if node.op in ("placeholder", "output"):
        return ""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _export_module_path(node: Node, known: frozenset[str]) -> str:
    if node.op == "get_attr":
        return _owner(node.target, known)
    if node.op in ("placeholder", "output", "call_module"):
        # Export's only call_module is its _guards_fn input check, not part of the model.
        return ""
    stack = node.meta.get("nn_module_stack") or {}
    # Nodes export adds after tracing (sym_size of a dynamic input) carry a "no module" marker.
    stack = {k: v for k, v in stack.items() if k != _NO_MODULE_KEY}
    if not stack:
        return ""
    raw = next(reversed(stack.values()))[0]
    path = normalize_module_path(raw, known)
    if path not in known:
        raise RuntimeError(
            f"whale could not map torch.export's module path {raw!r} (node {node.name}) to a "
            "submodule of the model; this is a whale bug, please report it with your torch version"
        )
    return path


def _owner(attr: str, modules: frozenset[str]) -> str:
    owner = attr.rpartition(".")[0]
    while owner and owner not in modules:
        owner = owner.rpartition(".")[0]
    return owner


def _graph_module(root: nn.Module, graph: torch.fx.Graph, name: str) -> GraphModule:
    """A GraphModule whose Python code is generated when it is first run or read, not now:
    capture only interprets the graph, and a plan of a 175B model never runs it (the code of its
    2,795 nodes took 0.13 s to write and compile). torch's own lazy class where it has one."""
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:  # an older torch: generated at once
        return GraphModule(root, graph, name)
    return _LazyGraphModule(root, graph, name)


def _bind(model: nn.Module, args: tuple, kwargs: Mapping[str, object]) -> dict | None:
    """forward's arguments by name, defaults applied; None when forward takes *args/**kwargs."""
    sig = forward_signature(model)
    if sig is None:
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        return None
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _holds_tensor(value: object) -> bool:
    return any(isinstance(v, torch.Tensor) for v in torch.utils._pytree.tree_leaves(value))


def _is_leaf_value(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _on_meta(model: nn.Module) -> bool:
    for t in [*model.parameters(), *model.buffers()]:
        return t.device.type == "meta"
    return False


def _to_meta(value):
    # A model on meta takes meta inputs: only shapes matter and devices must agree.
    return torch.utils._pytree.tree_map(
        lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v, value
    )
