"""Propagation rules: how each traced op carries a sharded layout from its inputs to its output.

A rule gets the node and a context (:class:`RuleContext`, implemented by the analysis pass) and
returns the output's layout: a :class:`ShardLayout`, ``None`` (replicated) or a tuple of those for ops
with several outputs. It may ask the context to transform an input (``copy`` a replicated value
into sharded compute, ``scatter`` it to the shard layout), to localize shape arguments
(``fix``), to bound the region's atom count (``bound``), or it raises

* :class:`Fallback`: this op cannot run sharded; the pass all-gathers its sharded inputs and runs
  it replicated (always correct, costs one all-gather);
* :class:`NeedBlocks`: the sharded dim must be cut into more equal blocks at its origin (a fused
  qkv output split into q, k, v) and the analysis restarts.

Ops without a rule fall back. Rules never see names of the user's modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch.fx import Node

from .layout import ShardLayout, broadcast_dim, index_move, view_move

__all__ = ["Fallback", "NeedBlocks", "RuleContext", "op_name", "propagate_op"]


class Fallback(Exception):
    """The op cannot run on shards; its sharded inputs are gathered."""


class NeedBlocks(Exception):
    """The layout's origin must split its sharded dim into ``factor`` times more blocks."""

    def __init__(self, anchor: str, factor: int) -> None:
        super().__init__(f"{anchor}: x{factor} blocks")
        self.anchor, self.factor = anchor, factor


class RuleContext(Protocol):
    def val(self, arg: Any) -> Any: ...
    def shape(self, node: Node) -> tuple[int, ...]: ...
    def shape_list(self, node: Node) -> tuple[tuple[int, ...], ...]: ...
    def is_tensor(self, arg: Any) -> bool: ...
    def const(self, arg: Any) -> Any: ...
    def copy(self, node: Node, arg: Node) -> None: ...
    def scatter(self, node: Node, arg: Node, layout: ShardLayout) -> None: ...
    def fix(self, node: Node, kind: str, layout: ShardLayout, extra: Any = None) -> None: ...
    def bound(self, layout: ShardLayout, per_block: int, heads: bool = False) -> None: ...
    def merge(self, a: ShardLayout, b: ShardLayout) -> None: ...
    def reduce_after(self, node: Node) -> None: ...


_ALIASES = {"truediv": "div", "iadd": "add_", "imul": "mul_", "isub": "sub_", "itruediv": "div_",
            "swapaxes": "transpose", "swapdims": "transpose", "reshape": "view", "divide": "div",
            "multiply": "mul", "subtract": "sub", "split_with_sizes": "split", "concat": "cat",
            "concatenate": "cat", "bmm": "matmul", "special_erf": "erf", "__getitem__": "getitem",
            # aten spellings (graphs captured with torch.export)
            "mm": "matmul", "_softmax": "softmax", "_log_softmax": "log_softmax", "_unsafe_view": "view",
            "_to_copy": "to", "alias": "contiguous", "sym_size": "size", "sym_numel": "numel"}


def op_name(node: Node) -> str:
    """A normalized op name: ``x.transpose``, ``torch.transpose`` and ``operator``'s forms agree."""
    if node.op == "call_method":
        name = node.target
    elif isinstance(node.target, torch._ops.OpOverload):  # aten.view.default -> "view"
        name = node.target._opname
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
    else:
        return node.op
    name = name.strip("_") if name.startswith("__") else name
    return _ALIASES.get(name, name)


# Ops applied to their first tensor argument only, elementwise: the layout passes through.
_UNARY = frozenset(["abs", "clone", "contiguous", "cos", "detach", "double", "dropout", "elu", "erf", "exp", "float", "gelu", "half", "bfloat16", "hardtanh", "leaky_relu", "log", "log1p", "mish", "nan_to_num", "neg", "pos", "relu", "relu6", "rsqrt", "selu", "sigmoid", "silu", "sin", "softplus", "sqrt", "square", "tanh", "to", "type", "type_as", "reciprocal", "sign", "gelu_", "relu_", "silu_", "dropout_", "clamp", "clamp_min", "clamp_max", "hardswish", "hardsigmoid", "logsigmoid"])
# Elementwise ops over several tensors that broadcast.
_BROADCAST = frozenset(["add", "sub", "mul", "div", "floordiv", "pow", "maximum", "minimum", "masked_fill", "where", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "xor", "add_", "sub_", "mul_", "div_", "masked_fill_", "lerp", "addcmul"])
_REDUCTIONS = frozenset(["sum", "mean", "amax", "amin", "max", "min", "logsumexp", "std", "var", "norm", "prod"])


def _dim_arg(node: Node, pos: int, name: str, default: Any = None) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _norm(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def _sharded_first(ctx: RuleContext, node: Node) -> tuple[Node, ShardLayout]:
    x = node.args[0]
    layout = ctx.val(x)
    if not isinstance(layout, ShardLayout):
        raise Fallback(f"{op_name(node)} on a sharded value that is not its first argument")
    return x, layout


# Ops whose later tensor operand lends only its dtype and device (``x.type_as(y)``, ``x.to(y)``):
# the result is laid out as the first operand, whatever the second's layout.
_TYPE_ONLY = frozenset(["type_as", "to"])


def _unary(ctx, node):
    if op_name(node) in _TYPE_ONLY and not isinstance(ctx.val(node.args[0]), ShardLayout):
        return None  # a replicated value cast to a sharded one's dtype stays replicated
    _, layout = _sharded_first(ctx, node)
    if op_name(node) in _TYPE_ONLY:
        return layout
    for a in [*node.args[1:], *node.kwargs.values()]:
        if isinstance(ctx.val(a), ShardLayout):
            raise Fallback(f"{op_name(node)} with a second sharded operand")
    return layout


def _broadcast(ctx, node):
    out_shape = ctx.shape(node)
    operands = [a for a in [*node.args, *node.kwargs.values()] if ctx.is_tensor(a)]
    ref = None
    for a in operands:
        la = ctx.val(a)
        if isinstance(la, ShardLayout):
            od = broadcast_dim(len(ctx.shape(a)), len(out_shape), la.dim)
            cand = la.moved(od)
            if ref is None:
                ref = cand
            elif not ref.same_structure(cand):
                raise Fallback("operands sharded differently")
            else:
                ctx.merge(ref, cand)
    if op_name(node).endswith("_") and not isinstance(ctx.val(node.args[0]), ShardLayout):
        raise Fallback("in-place update of a replicated tensor by a sharded one")
    for a in operands:
        if isinstance(ctx.val(a), ShardLayout):
            continue
        shape = ctx.shape(a)
        ad = ref.dim - (len(out_shape) - len(shape))
        if ad < 0 or shape[ad] == 1:
            ctx.copy(node, a)
        elif shape[ad] == out_shape[ref.dim]:
            ctx.scatter(node, a, ref.moved(ad))
        else:
            raise Fallback("operand does not broadcast along the sharded dim")
    return ref


def _softmax(ctx, node):
    x, layout = _sharded_first(ctx, node)
    d = _dim_arg(node, 1, "dim")
    if d is None or _norm(d, len(ctx.shape(x))) == layout.dim:
        raise Fallback("softmax over the sharded dim")
    return layout


def _layer_norm(ctx, node):
    x, layout = _sharded_first(ctx, node)
    nd = len(ctx.shape(x))
    normalized = _dim_arg(node, 1, "normalized_shape")
    count = len(normalized) if isinstance(normalized, (tuple, list)) else 1
    if layout.dim >= nd - count:
        raise Fallback("normalization over the sharded dim")
    for a in [*node.args[2:], *node.kwargs.values()]:
        if ctx.is_tensor(a):
            ctx.copy(node, a)
    return layout


def _normalize(ctx, node):
    x, layout = _sharded_first(ctx, node)
    if _norm(_dim_arg(node, 2, "dim", 1), len(ctx.shape(x))) == layout.dim:
        raise Fallback("normalize over the sharded dim")
    return layout


def _reduction(ctx, node):
    x, layout = _sharded_first(ctx, node)
    nd = len(ctx.shape(x))
    dims = _dim_arg(node, 1, "dim")
    if dims is None or isinstance(dims, Node):  # a full reduction, or max/min of two tensors
        raise Fallback("reduction over every dim")
    dims = [_norm(d, nd) for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
    if layout.dim in dims:
        raise Fallback("reduction over the sharded dim")
    keepdim = _dim_arg(node, 2, "keepdim", False)
    out = layout if keepdim else layout.moved(layout.dim - sum(d < layout.dim for d in dims))
    pieces = ctx.shape_list(node)
    return tuple(out for _ in pieces) if len(pieces) > 1 else out  # max/min: (values, indices)


def _transpose(ctx, node):
    x, layout = _sharded_first(ctx, node)
    nd = len(ctx.shape(x))
    if op_name(node) == "t":
        a, b = 0, 1
    else:
        a, b = _norm(_dim_arg(node, 1, "dim0"), nd), _norm(_dim_arg(node, 2, "dim1"), nd)
    d = layout.dim
    return layout.moved(b if d == a else a if d == b else d)


def _permute(ctx, node):
    x, layout = _sharded_first(ctx, node)
    nd = len(ctx.shape(x))
    dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
    dims = dims or node.kwargs.get("dims")
    dims = [_norm(ctx.const(d), nd) for d in dims]
    return layout.moved(dims.index(layout.dim))


def _unsqueeze(ctx, node):
    x, layout = _sharded_first(ctx, node)
    d = _norm(_dim_arg(node, 1, "dim"), len(ctx.shape(x)) + 1)
    return layout.moved(layout.dim + (d <= layout.dim))


def _squeeze(ctx, node):
    x, layout = _sharded_first(ctx, node)
    dims = _dim_arg(node, 1, "dim")
    if dims is None:
        raise Fallback("squeeze() of every size-1 dim: a shard may have size 1 where the whole does not")
    nd = len(ctx.shape(x))
    dims = [_norm(d, nd) for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
    if layout.dim in dims:
        raise Fallback("squeeze of the sharded dim")
    shape = ctx.shape(x)
    return layout.moved(layout.dim - sum(d < layout.dim and shape[d] == 1 for d in dims))


def _view(ctx, node):
    x, layout = _sharded_first(ctx, node)
    move = view_move(layout, ctx.shape(x), ctx.shape(node))
    if move is None:
        raise Fallback("the view mixes sharded and unsharded elements in one dim")
    sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
    if op_name(node) == "view" and move.dim < len(sizes) and _from_batch(sizes[move.dim]):
        # BLOOM's reshape(batch * heads, q, d): the shard's blocks would follow the batch
        raise Fallback("the view's sharded dim has a size computed from the batch (batch times heads)")
    out = layout.moved(move.dim, move.blocks, move.per_block)
    ctx.bound(out, move.per_block, heads=move.splits_dim)
    if op_name(node) in ("view", "unflatten"):
        ctx.fix(node, op_name(node), out)
    return out


def _reshape_as(ctx, node):
    """``x.reshape_as(other)`` / ``x.view_as(other)`` (RoFormer's rotary ``stack(...).reshape_as(q)``):
    where ``other`` is sharded as the reshape would shard ``x``, each rank's reshape to its
    own ``other`` is that shard."""
    x, layout = _sharded_first(ctx, node)
    other = ctx.val(node.args[1])
    move = view_move(layout, ctx.shape(x), ctx.shape(node))
    if move is None:
        raise Fallback("the view mixes sharded and unsharded elements in one dim")
    out = layout.moved(move.dim, move.blocks, move.per_block)
    if not isinstance(other, ShardLayout) or not other.same_structure(out):
        raise Fallback(f"{op_name(node)} to a tensor not sharded as the result would be")
    ctx.merge(other, out)
    return other


def _from_batch(size: Any) -> bool:
    """``size`` is computed in forward from some tensor's dim 0 (the rows of the batch):
    ``x.size(0)``, ``aten.sym_size(x, 0)`` or ``x.size()[0]``, through arithmetic."""
    todo, seen = ([size] if isinstance(size, Node) else []), set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        name = op_name(n)
        if name == "size":
            if (len(n.args) > 1 and n.args[1] == 0) or n.kwargs.get("dim") == 0:
                return True
            continue  # another dim, or the whole size read through getitem below
        whole = n.args[0] if name == "getitem" else None
        if isinstance(whole, Node) and op_name(whole) == "size" and len(whole.args) == 1 and not whole.kwargs:
            if n.args[1] == 0:
                return True
            continue
        todo.extend(n.all_input_nodes)
    return False


def _expand(ctx, node):
    """``expand(x, sizes)``: new leading dims move the sharded dim; its size is localized."""
    x, layout = _sharded_first(ctx, node)
    in_shape, out_shape = ctx.shape(x), ctx.shape(node)
    out = layout.moved(layout.dim + len(out_shape) - len(in_shape))
    if in_shape[layout.dim] != out_shape[out.dim]:
        raise Fallback("expand of the sharded dim")
    ctx.fix(node, "expand", out)
    return out


def _slice(ctx, node):
    """``aten.slice(x, dim, start, end, step)``: a slice of another dim (or all of it) keeps the
    layout; a slice of the sharded dim made of whole blocks (Phi-3's q, k, v of one fused
    ``qkv_proj``) holds those blocks, each rank its part of each."""
    x, layout = _sharded_first(ctx, node)
    shape = ctx.shape(x)
    d = _norm(_dim_arg(node, 1, "dim", 0), len(shape))
    if d != layout.dim or ctx.shape(node) == shape:
        return layout
    width = shape[d]
    start, end, step = (ctx.const(a) for a in (*node.args[2:5], None, None, None)[:3])
    start, end = (start or 0), (width if end is None else end)
    if not isinstance(start, int) or not isinstance(end, int):
        raise Fallback("slice of the sharded dim at a computed position")
    start, end = (min(max(v + width if v < 0 else v, 0), width) for v in (start, end))
    if step not in (None, 1) or end <= start:
        raise Fallback("slice of the sharded dim with a step")
    if any(v % layout.per_block for v in (start, end)):
        unit = math.gcd(start, end, width)
        _need_blocks(layout, layout.per_block // math.gcd(layout.per_block, unit))
        raise Fallback("slice of the sharded dim not on whole blocks")
    first, last = start // layout.per_block, end // layout.per_block
    ctx.fix(node, "slice", layout, (first, last))
    return layout.moved(d, last - first)


def _split(ctx, node):
    """split / chunk / tensor_split / unbind: along another dim each piece keeps the layout."""
    x, layout = _sharded_first(ctx, node)
    shape = ctx.shape(x)
    name = op_name(node)
    d = _norm(_dim_arg(node, 2 if name != "unbind" else 1, "dim", 0), len(shape))
    pieces = ctx.shape_list(node)
    if d != layout.dim:
        if name == "unbind":
            return tuple(layout.moved(layout.dim - (d < layout.dim)) for _ in pieces)
        return tuple(layout for _ in pieces)
    if name == "unbind":
        _need_blocks(layout, shape[d])
        raise Fallback("unbind along the sharded dim")
    widths = [p[d] for p in pieces]
    if any(w % layout.per_block for w in widths):
        unit = math.gcd(*widths)
        _need_blocks(layout, layout.per_block // math.gcd(layout.per_block, unit))
        raise Fallback("split into pieces that are not whole blocks")
    blocks = [w // layout.per_block for w in widths]
    ctx.fix(node, "split", layout, tuple(blocks))
    return tuple(layout.moved(d, b) for b in blocks)


def _select(ctx, node):
    """``aten.select(x, dim, index)`` (``x[..., 0, :]``: BLOOM's q of a per-head fused qkv): one
    index of another dim drops that dim and keeps the layout; one of the sharded dim does not."""
    x, layout = _sharded_first(ctx, node)
    shape = ctx.shape(x)
    d = _norm(_dim_arg(node, 1, "dim"), len(shape))
    if d == layout.dim:
        _need_blocks(layout, shape[d])
        raise Fallback("select of one index of the sharded dim")
    return layout.moved(layout.dim - (d < layout.dim))


def _need_blocks(layout: ShardLayout, parts: int) -> None:
    factor = parts // math.gcd(layout.blocks, parts)
    if factor > 1:
        raise NeedBlocks(layout.anchor, factor)


def _getitem(ctx, node):
    x, index = node.args
    layout = ctx.val(x)
    if isinstance(layout, tuple):
        return layout[index]
    if not isinstance(layout, ShardLayout):
        return None
    shape = ctx.shape(x)
    kind, out_dim = index_move(index, len(shape), layout.dim, shape)
    if kind == "keep":
        return layout.moved(out_dim)
    if kind == "int":
        _need_blocks(layout, shape[layout.dim])
    raise Fallback("indexing into the sharded dim")


def _size(ctx, node):
    x = node.args[0]
    layout = ctx.val(x)
    if isinstance(layout, ShardLayout):
        ctx.fix(node, op_name(node), layout)


def _getattr(ctx, node):
    x, attr = node.args
    layout = ctx.val(x)
    if not isinstance(layout, ShardLayout):
        return
    if attr == "shape":
        ctx.fix(node, "size", layout)
        return
    if attr in ("dtype", "device", "ndim", "is_cuda", "requires_grad"):
        return
    raise Fallback(f"attribute {attr!r} of a sharded tensor")


def _matmul(ctx, node):
    a, b = node.args[:2]
    la, lb = ctx.val(a), ctx.val(b)
    sa, sb, so = ctx.shape(a), ctx.shape(b), ctx.shape(node)
    if len(sa) < 2 or len(sb) < 2:
        raise Fallback("matmul with a 1-D operand")
    batch_a = lambda d: d < len(sa) - 2
    batch_b = lambda d: d < len(sb) - 2
    if isinstance(la, ShardLayout) and isinstance(lb, ShardLayout):
        if la.dim == len(sa) - 1 and lb.dim == len(sb) - 2 and la.blocks == lb.blocks and la.per_block == lb.per_block:
            ctx.merge(la, lb)
            ctx.reduce_after(node)
            return None  # partial sums over the contraction, all-reduced right after
        if batch_a(la.dim) and batch_b(lb.dim):
            oa, ob = broadcast_dim(len(sa), len(so), la.dim), broadcast_dim(len(sb), len(so), lb.dim)
            if oa == ob and la.blocks == lb.blocks and la.per_block == lb.per_block:
                ctx.merge(la, lb)
                return la.moved(oa)
        raise Fallback("matmul of operands sharded on different dims")
    if isinstance(la, ShardLayout):
        return _matmul_one_sharded(ctx, node, la, sa, len(sa) - 1, b, sb, so)
    return _matmul_one_sharded(ctx, node, lb, sb, len(sb) - 2, a, sa, so)


def _matmul_one_sharded(ctx, node, layout, shape, contracted, other, other_shape, out_shape):
    """A matmul whose operand of ``shape`` is sharded by ``layout`` and whose ``other`` operand
    is replicated; ``contracted`` is the sharded operand's contracted dim."""
    if layout.dim == contracted:
        raise Fallback("matmul contracting a sharded dim with a replicated operand")
    od = broadcast_dim(len(shape), len(out_shape), layout.dim)
    other_dim = od - (len(out_shape) - len(other_shape))
    if layout.dim < len(shape) - 2 and other_dim >= 0 and other_shape[other_dim] != 1:
        ctx.scatter(node, other, layout.moved(other_dim))  # a batch dim the other one has too
    else:
        ctx.copy(node, other)
    return layout.moved(od)


def _sdpa(ctx, node):
    q, k, v = (node.args[i] if len(node.args) > i else node.kwargs[n] for i, n in enumerate("qkv"))
    layouts = [ctx.val(t) for t in (q, k, v)]
    nd = len(ctx.shape(q))
    if not all(isinstance(la, ShardLayout) for la in layouts):
        raise Fallback("attention with some of q, k, v replicated")
    first, key = layouts[0], layouts[1]
    # enable_gqa: k and v have fewer heads; each kv head serves a run of consecutive q heads, so
    # an atom is a kv head with its q heads and q, k, v shard alike in atoms.
    gqa = node.kwargs.get("enable_gqa", False) and first.per_block != key.per_block
    same = (lambda a, b: (a.dim, a.blocks) == (b.dim, b.blocks) and a.per_block % b.per_block == 0) if gqa else (
        lambda a, b: a.same_structure(b))
    if first.dim >= nd - 2 or not same(first, key) or not key.same_structure(layouts[2]):
        raise Fallback("attention sharded other than by heads")
    for la in layouts[1:]:
        ctx.merge(first, la)
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if ctx.is_tensor(mask):
        ms = ctx.shape(mask)
        md = first.dim - (nd - len(ms))
        if md >= 0 and ms[md] != 1:
            ctx.scatter(node, mask, first.moved(md))
        else:
            ctx.copy(node, mask)
    return first


def _cat(ctx, node):
    tensors = node.args[0]
    out_nd = len(ctx.shape(node))
    stack = op_name(node) == "stack"
    d = _norm(_dim_arg(node, 1, "dim", 0), out_nd)
    layouts = [ctx.val(t) for t in tensors]
    if not all(isinstance(la, ShardLayout) for la in layouts):
        raise Fallback("cat of sharded and replicated tensors")
    first = layouts[0]
    if any(not first.same_structure(la) for la in layouts[1:]) or (first.dim == d and not stack):
        raise Fallback("cat along the sharded dim")
    for la in layouts[1:]:
        ctx.merge(first, la)
    return first.moved(first.dim + (stack and d <= first.dim))


_RULES: dict[str, Callable[[Any, Node], Any]] = {
    **{n: _unary for n in _UNARY},
    **{n: _broadcast for n in _BROADCAST},
    **{n: _reduction for n in _REDUCTIONS},
    "softmax": _softmax, "log_softmax": _softmax, "layer_norm": _layer_norm, "rms_norm": _layer_norm,
    "normalize": _normalize, "transpose": _transpose, "t": _transpose, "permute": _permute,
    "unsqueeze": _unsqueeze, "squeeze": _squeeze, "view": _view, "flatten": _view,
    "unflatten": _view, "reshape_as": _reshape_as, "view_as": _reshape_as,
    "split": _split, "chunk": _split, "tensor_split": _split, "unbind": _split,
    "getitem": _getitem, "size": _size, "numel": _size, "dim": lambda ctx, node: None,
    "getattr": _getattr, "matmul": _matmul, "scaled_dot_product_attention": _sdpa,
    "cat": _cat, "stack": _cat, "expand": _expand, "slice": _slice, "select": _select,
    "_assert_tensor_metadata": lambda ctx, node: None,  # checks dtype and device only
}


def propagate_op(ctx: RuleContext, node: Node) -> Any:
    """The output layout of a call_function / call_method node with a sharded input."""
    rule = _RULES.get(op_name(node))
    if rule is None:
        raise Fallback(f"no sharding rule for {op_name(node)!r}")
    return rule(ctx, node)
