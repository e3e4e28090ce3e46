"""Graphs captured with ``torch.export``: their parameterized aten ops become modules the analysis shards.

An exported graph holds no ``nn.Linear``: a layer is ``aten.linear(x, W, b)`` (or
``aten.addmm(b, x2d, W)`` for transformers' ``Conv1D``, whose weight is stored transposed; or
``aten.matmul(x, W.T)`` with an optional ``+ b``, as Falcon's ``FalconLinear`` computes it) or
``aten.embedding(W, ids)``, with ``W`` and ``b`` read by ``get_attr`` nodes. Inside a ``split``
scope, :func:`lower_parameter_ops` turns each such op into a ``call_module`` node of a small
module holding the same parameters under the owner's path (``model.layers.0.mlp.up_proj``), so
the analysis decides column / row / vocabulary-parallel exactly as for fx graphs, and parameter
names stay the local model's. The decision comes from the op and its operands, never from a
class name. Any other op reading a matrix parameter inside a split is refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from ...capture.graph import NODE_INFO_KEY
from ...capture.opaque import is_opaque

NamesOf = Callable[[nn.Parameter], set[str]]

__all__ = ["ExportedEmbedding", "ExportedLinear", "carry_buffers", "lower_parameter_ops", "refusal_message", "unlowered_parameter_use"]

_aten = torch.ops.aten


class ExportedLinear(nn.Module):
    """``aten.linear(x, weight, bias)``; with ``transposed``, ``aten.addmm(bias, x, weight)`` (a (in, out) weight)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, transposed: bool) -> None:
        super().__init__()
        self.weight, self.bias, self.transposed = weight, bias, transposed
        self.in_features, self.out_features = weight.shape[::-1] if not transposed else weight.shape

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, transposed={self.transposed}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        return x @ self.weight if self.bias is None else torch.addmm(self.bias, x, self.weight)


class ExportedEmbedding(nn.Module):
    """``aten.embedding(weight, ids, padding_idx)`` as a module with ``nn.Embedding``'s attributes."""

    max_norm = None
    sparse = False

    def __init__(self, weight: nn.Parameter, padding_idx: int | None) -> None:
        super().__init__()
        self.weight, self.padding_idx = weight, padding_idx
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)


def _param(gm: GraphModule, node: object, ndim: int) -> nn.Parameter | None:
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    value = gm.get_parameter(node.target) if _is_param(gm, node.target) else None
    return value if value is not None and value.dim() == ndim else None


def _is_param(gm: GraphModule, target: str) -> bool:
    owner, _, name = target.rpartition(".")
    try:
        return name in gm.get_submodule(owner)._parameters
    except AttributeError:
        return False


# ``W.T`` of a 2-D weight as export records it (``numpy_T`` for ``.T``, ``t`` for ``.t()``).
_TRANSPOSES = {_aten.numpy_T.default, _aten.t.default, _aten.transpose.int, _aten.permute.default}


def _transposed_weight(gm: GraphModule, node: object) -> Node | None:
    """The weight's ``get_attr`` when ``node`` is ``W.T`` of a 2-D parameter read only there, else None."""
    if not isinstance(node, Node) or node.op != "call_function" or node.target not in _TRANSPOSES:
        return None
    w, *rest = node.args
    if node.target is _aten.transpose.int and sorted(d % 2 for d in rest) != [0, 1]:
        return None
    if node.target is _aten.permute.default and [d % 2 for d in rest[0]] != [1, 0]:
        return None
    return w if _param(gm, w, 2) is not None and len(node.users) == 1 else None


def _matmul_bias(gm: GraphModule, node: Node) -> tuple[Node | None, Node | None]:
    """For ``x @ W.T``: (the ``+ b`` node, ``b``'s read) where its only user adds a 1-D parameter."""
    if len(node.users) != 1:
        return None, None
    (user,) = node.users
    if user.op == "call_function" and user.target is _aten.add.Tensor and not user.kwargs and len(user.args) == 2:
        other = user.args[1] if user.args[0] is node else user.args[0]
        if _param(gm, other, 1) is not None:
            return user, other
    return None, None


def _match(gm: GraphModule, node: Node, names: NamesOf) -> tuple[Node, nn.Module, str, Node] | None:
    """(input, module, owner path, the node it replaces) for a lowerable node, else None."""
    if node.op != "call_function":
        return None
    args = list(node.args)
    replaced = node
    if node.target is _aten.matmul.default and len(args) == 2 and _transposed_weight(gm, args[1]) is not None:
        added, b = _matmul_bias(gm, node)
        x, w = args[0], _transposed_weight(gm, args[1])
        replaced, transposed = added or node, False
    elif node.target is _aten.linear.default:
        x, w, b = (args + [None])[:3]
        transposed = False
    elif node.target is _aten.addmm.default and not node.kwargs:
        b, x, w = args
        transposed = True
    elif node.target is _aten.embedding.default and not any(args[3:]):  # no scale_grad_by_freq, sparse
        weight = _param(gm, args[0], 2)
        if weight is None:
            return None
        pad = args[2] if len(args) > 2 else -1
        module = ExportedEmbedding(weight, None if pad < 0 else pad)
        return args[1], module, _owner(node, args[0], weight, None, None, names), node
    else:
        return None
    weight = _param(gm, w, 2)
    bias = _param(gm, b, 1) if b is not None else None
    if weight is None or (b is not None and bias is None):
        return None
    owner = _owner(node, w, weight, b, bias, names)
    return (x, ExportedLinear(weight, bias, transposed), owner, replaced) if owner else None


def _owner(node: Node, w: Node, weight: nn.Parameter, b: Node | None, bias: nn.Parameter | None, names: NamesOf) -> str:
    """The module path the parameters are named under: the node's own module where the model
    names them so (a tied weight is read through one of its names only), else the read's."""
    path = node.meta[NODE_INFO_KEY].module_path
    if path and f"{path}.weight" in names(weight) and (bias is None or f"{path}.bias" in names(bias)):
        return path
    owner = w.target.rpartition(".")[0]
    return owner if b is None or b.target == f"{owner}.bias" else ""


def _holds_only_weights(gm: GraphModule, owner: str) -> bool:
    """The module at ``owner`` holds a weight, a bias and buffers (Gemma's scaled embedding
    keeps its ``embed_scale``), nothing else: its lowered replacement takes the buffers along."""
    try:
        m = gm.get_submodule(owner)
    except AttributeError:
        return True  # not in the graph module yet: the node reads a tied weight by another name
    return set(m._parameters) | set(m._modules) <= {"weight", "bias"}


def carry_buffers(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` with ``old``'s buffers that it lacks registered under their names (persistent or
    not, as in ``old``): a module that replaces another at its path keeps what the graph reads
    there (a ``get_attr`` of ``<path>.embed_scale``)."""
    for name, buf in old._buffers.items():
        if buf is not None and name not in new._buffers and not hasattr(new, name):
            new.register_buffer(name, buf, persistent=name not in old._non_persistent_buffers_set)
    return new


def lower_parameter_ops(gm: GraphModule, in_split: Callable[[Node], bool], names: NamesOf = lambda p: set()) -> dict[str, str]:
    """Replace, in place, every linear / addmm / embedding on parameters inside a split by a ``call_module``.

    ``names(parameter)``: every name the local model gives it (a tied weight has several).
    Returns the new nodes' names -> the names of the nodes they replaced.
    """
    renamed: dict[str, str] = {}
    lowered: dict[str, nn.Module] = {}
    for node in list(gm.graph.nodes):
        found = _match(gm, node, names) if in_split(node) else None
        if found is None or not _holds_only_weights(gm, found[2]):
            continue
        x, module, owner, replaced = found
        if owner in lowered:
            first = lowered[owner]
            if type(first) is not type(module) or first.weight is not module.weight or (
                getattr(first, "bias", None) is not getattr(module, "bias", None)
            ):
                raise ValueError(
                    f"split() at {owner!r}: node {node.name} reads the weight of {owner!r} a second "
                    "time in another way (with another bias, or as another kind of layer); whale "
                    "shards a weight one way. Keep its users out of the split, or untie the weight"
                )
            module = first  # a layer called again (ALBERT's one layer at every depth): one module
        lowered[owner] = module
        # The replaced nodes, last first (``x @ W.T + b``: the add, the matmul, the transpose).
        chain = [replaced] + ([node] if replaced is not node else [])
        if node.target is _aten.matmul.default:
            chain.append(node.args[1])
        reads = [a for n in chain for a in n.all_input_nodes if a.op == "get_attr"]
        if _exists(gm, owner):
            parent, _, leaf = owner.rpartition(".")
            setattr(gm.get_submodule(parent), leaf, carry_buffers(gm.get_submodule(owner), module))
        else:
            gm.add_submodule(owner, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(owner, (x,))
        new.meta = dict(node.meta)
        replaced.replace_all_uses_with(new)
        for n in chain:
            gm.graph.erase_node(n)
        renamed[new.name] = replaced.name
        for a in reads:
            if not a.users:
                gm.graph.erase_node(a)
    return renamed


def _exists(gm: GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False


# Ops that read a tensor's dtype and device only (``.to(float32)`` records one before the cast):
# not a use to refuse, nor one to name in the refusal.
_METADATA_CHECKS = {_aten._assert_tensor_metadata.default}


def unlowered_parameter_use(gm: GraphModule, in_split: Callable[[Node], bool]) -> list[tuple[Node, Node]]:
    """(user, parameter read) for every op inside a split that reads a matrix parameter but was not lowered."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not _is_param(gm, node.target) or gm.get_parameter(node.target).dim() < 2:
            continue
        found += [(user, node) for user in node.users
                  if in_split(user) and user.op == "call_function" and user.target not in _METADATA_CHECKS]
    return found


# Ops that only re-view or re-type a parameter on its way to the op that computes with it.
_PASS_THROUGH = _TRANSPOSES | {_aten.view.default, _aten.reshape.default, _aten.expand.default,
                               _aten.unsqueeze.default, _aten.squeeze.dim, _aten.squeeze.dims,
                               _aten.to.dtype, _aten.contiguous.default}


def _computing_user(node: Node) -> Node:
    """The op a parameter read flows into past views and casts (``transpose`` -> ``grouped_mm``)."""
    while node.op == "call_function" and node.target in _PASS_THROUGH and len(node.users) == 1:
        node = next(iter(node.users))
    return node


def _why_not_lowered(gm: GraphModule, op: Node, param: Node) -> str | None:
    """Why a linear or embedding whale shards was left whole, where it was: its weight reaches
    it through a cast (DeepSeek-V2's router: ``F.linear(x.float(), W.float())``), or its module
    holds more than a weight and a bias (ERNIE's router holds ``moe_statics``)."""
    if op.target not in (_aten.linear.default, _aten.addmm.default, _aten.matmul.default, _aten.embedding.default):
        return None
    if param not in op.all_input_nodes:
        return (
            "which reaches it through a cast or view, not as it is: whale replaces a linear or "
            "embedding by a sharded layer only where it reads its own parameters directly; keep "
            "this module out of the split"
        )
    found = _match(gm, op, lambda p: set())
    if found is not None and not _holds_only_weights(gm, found[2]):
        owner = gm.get_submodule(found[2])
        extra = sorted((set(owner._parameters) | set(owner._modules)) - {"weight", "bias"})
        return (
            f"whose module {found[2]!r} holds more than a weight and a bias ({', '.join(extra)}), so "
            "whale cannot replace it by a sharded layer; keep this module out of the split"
        )
    return None


def _fed_pairs(gm: GraphModule, widest: dict[str, str], hops: int = 4) -> list[set[str]]:
    """Pairs of the modules in ``widest`` (layer path -> the module suggested for it) where one's
    layer feeds another's through at most ``hops`` pointwise ops that read no parameter: an
    MLP's activation between its column and row layers, a gate's product. A view, a norm or an
    op reading a parameter ends the path (an attention's heads, a router's softmax)."""
    def pointwise(node: Node) -> bool:
        return (node.op == "call_function" and torch.Tag.pointwise in getattr(node.target, "tags", ())
                and not any(a.op == "get_attr" for a in node.all_input_nodes))

    pairs: list[set[str]] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in widest:
            continue
        frontier, seen = list(node.users), set()
        for _ in range(hops):
            following = []
            for user in frontier:
                if user in seen:
                    continue
                seen.add(user)
                if user.op == "call_module" and user.target in widest:
                    pair = {widest[node.target], widest[user.target]}
                    if len(pair) == 2 and pair not in pairs:
                        pairs.append(pair)
                elif pointwise(user):
                    following.extend(user.users)
            frontier = following
    return pairs


def _parametrized(path: str) -> str:
    """The module a parametrization belongs to (``conv.parametrizations.weight.0`` -> ``conv``,
    as ``weight_norm`` makes it): the path a user can annotate."""
    return re.sub(r"\.parametrizations\.\w+\.\d+$", "", path)


def refusal_message(gm: GraphModule, uses: list[tuple[Node, Node]], path_of: Callable[[Node], str],
                    in_split: Callable[[Node], bool]) -> str:
    """Why ``split()`` cannot cover the modules of ``uses``, and where it could go instead."""
    # The first use that computes (a view whose result nothing reads names nothing).
    user, param = next(((u, p) for u, p in uses if _computing_user(u).target not in _PASS_THROUGH), uses[0])
    op = _computing_user(user)
    shape = tuple(gm.get_parameter(param.target).shape)
    where = _parametrized(path_of(user)) or "<root>"
    head = f"split() cannot shard node {op.name} ({op.target}) at {where!r}: it reads the parameter {param.target!r} of shape {shape}"
    why = _why_not_lowered(gm, op, param)
    lines = [f"{head}, {why}" if why else (
        f"{head}, and whale shards matrix parameters only through aten.linear, aten.addmm (Conv1D), "
        "x @ W.T and aten.embedding"
    )]
    if is_opaque(op.target):
        lines.append(
            f"torch.export could not trace {where!r}, so whale runs each of its calls as one opaque "
            "node (the capture warning says why): nothing inside it can be sharded"
        )
    elif "conv" in str(op.target):
        lines.append(f"whale does not shard convolutions: keep {where!r} replicated")
    elif len(shape) == 3 and min(shape) > 1:  # (experts, in, out); a depthwise conv's is (c, 1, k)
        lines.append(
            f"{param.target!r} stacks {shape[0]} matrices (fused mixture-of-experts weights are held this "
            "way): whale splits experts when each is its own module (an nn.ModuleList of experts and an "
            "nn.Linear router, in a model fx traces), not a stacked tensor"
        )
    bad = {_parametrized(path_of(u)) for u, _ in uses}
    layers = {n.target for n in gm.graph.nodes if n.op == "call_module" and in_split(n)
              and isinstance(gm.get_submodule(n.target), (ExportedLinear, ExportedEmbedding))}
    # A layer whose weight an op also reads directly (MobileBERT's head concatenates the tied
    # embedding with a dense weight) cannot be sliced for the layer alone: leave it out too.
    raw = {id(gm.get_parameter(n.target)) for n in gm.graph.nodes
           if n.op == "get_attr" and n.users and _is_param(gm, n.target)}
    read_raw = {layer for layer in layers if any(id(w) in raw for w in gm.get_submodule(layer).parameters())}
    layers -= read_raw
    bad |= read_raw
    counts: dict[str, int] = {}
    widest: dict[str, str] = {}
    for layer in layers:  # the widest module holding shardable layers and none of the refused ones
        parts = layer.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if not any(b == prefix or b.startswith(prefix + ".") for b in bad):
                counts[prefix] = counts.get(prefix, 0) + 1
                widest[layer] = prefix
                break
    # A column/row pair (an attention, an MLP), in one module or in two that one feeds (BERT's
    # and Swin's ``intermediate`` and ``output``), before a lone layer (a router); then the
    # modules whose layers share a weight with a suggested one (a tied LM head's embedding):
    # whale slices a tied weight only when every user of it is in the split.
    pairs = _fed_pairs(gm, widest)
    elsewhere = {p for p, n in counts.items() if n > 1} | {p for pair in pairs for p in pair} or set(counts)
    holders: dict[int, set[str]] = {}
    for layer, prefix in widest.items():
        for weight in gm.get_submodule(layer).parameters():
            holders.setdefault(id(weight), set()).add(prefix)
    partners = [*holders.values(), *pairs]
    grown = True
    while grown:  # a partner's own partners too
        grown = False
        for prefixes in partners:
            if prefixes & elsewhere and not prefixes <= elsewhere:
                elsewhere |= prefixes
                grown = True
    if not elsewhere:  # a ResNet stage: convolutions only
        lines.append(f"Nothing under this split() holds a layer whale can shard: remove the split(), leaving "
                     f"{sorted(bad)[:4]} replicated, or use replicate() or a pipeline stage for them")
        return ". ".join(lines)
    # The first few, with their tied and fed partners (following a shortened list must not split
    # a weight without its other user, nor a column layer without the row layer it feeds).
    shown = set(sorted(elsewhere)[:4])
    for _ in range(len(elsewhere)):
        more = {p for prefixes in partners if prefixes & shown for p in prefixes & elsewhere}
        if more <= shown:
            break
        shown |= more
    hint = f" (e.g. {', '.join(repr(p) for p in sorted(shown))})"
    lines.append(f"Move split() to the modules it can shard{hint}, leaving {sorted(bad)[:4]} replicated, or "
                 "use replicate() or a pipeline stage for them")
    return ". ".join(lines)
