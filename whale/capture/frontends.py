"""The two ways whale turns a forward into a graph: ``torch.fx`` symbolic tracing and ``torch.export``.

Each front end returns a :class:`Trace`: the graph module, and for every node the module path
that owns it and the whale scopes entered in ``forward`` around it, plus its measured costs.
Nothing here merges annotations or decides between front ends; ``graph.capture`` does.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Mapping

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node

from ..primitives.annotations import EXPORT_META_KEY, Annotation, current_scope
from .costs import NodeCost, StateIndex, measure_costs

__all__ = ["Trace", "normalize_module_path", "trace_export", "trace_fx"]

# node.meta key under which the fx tracer records the whale scope active at node creation.
_FX_SCOPE_KEY = "whale_forward_scope"


@dataclasses.dataclass(frozen=True)
class Trace:
    """One front end's result, before annotations are merged."""

    graph_module: GraphModule
    frontend: str
    module_paths: Mapping[str, str]  # node name -> innermost owning module ("" = root)
    forward_scopes: Mapping[str, tuple[Annotation, ...]]  # node name -> scopes entered in forward
    costs: Mapping[str, NodeCost]


class _WhaleTracer(torch.fx.Tracer):
    """fx tracer that records, on every node, the whale scope it was created in.

    torch.nn modules (Linear, Conv, Embedding, LayerNorm, MultiheadAttention, ...) stay leaf
    ``call_module`` nodes, fx's default, so the rewrite can shard them as whole layers.
    """

    # Buffers become get_attr nodes (fx's default bakes them in as real tensors, so slicing a
    # causal mask by a traced length fails).
    proxy_buffer_attributes = True

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta[_FX_SCOPE_KEY] = current_scope()
        return node


def trace_fx(
    model: nn.Module,
    args: tuple,
    kwargs: Mapping[str, object],
) -> Trace:
    """Trace with ``torch.fx`` symbolic tracing, then measure on fake tensors.

    Inputs that are not tensors (flags, ``None`` for an optional mask) are passed to fx as
    ``concrete_args``, so ``if mask is not None`` takes the branch the example takes instead of
    the branch a Proxy would take.
    """
    bound = _bind(model, args, kwargs)
    concrete = None
    if bound is not None:
        concrete = {k: v for k, v in bound.items() if not _holds_tensor(v) and _is_leaf_value(v)}
    tracer = _WhaleTracer()
    graph = tracer.trace(model, concrete_args=concrete or None)
    gm = GraphModule(tracer.root, graph, type(model).__name__)

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
    return Trace(gm, "fx", paths, scopes, costs)


def trace_export(
    model: nn.Module,
    args: tuple,
    kwargs: Mapping[str, object],
) -> Trace:
    """Export with ``torch.export.export(strict=False)``; costs use export's own fake values.

    ``preserve_node_meta`` is entered around export because non-strict export only copies
    ``torch.fx.traceback.annotate`` metadata (whale's forward scopes) onto nodes inside it.
    """
    if _on_meta(model):
        args, kwargs = _to_meta(args), _to_meta(dict(kwargs))
    with torch.fx.traceback.preserve_node_meta():
        exported = torch.export.export(model, args, dict(kwargs), strict=False)
    gm = exported.module()
    known = frozenset(name for name, _ in model.named_modules(remove_duplicate=False))
    vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    fake_mode = detect_fake_mode(vals) or FakeTensorMode(allow_non_fake_inputs=True)
    costs = measure_costs(gm, StateIndex.of(model), fake_mode, None, known)

    paths, scopes = {}, {}
    for node in gm.graph.nodes:
        paths[node.name] = _export_module_path(node, known)
        custom = node.meta.get("custom") or {}
        scopes[node.name] = tuple(custom.get(EXPORT_META_KEY, ()))
    return Trace(gm, "export", paths, scopes, costs)


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


def _bind(model: nn.Module, args: tuple, kwargs: Mapping[str, object]) -> dict | None:
    """forward's arguments by name, defaults applied; None when forward takes *args/**kwargs."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
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
