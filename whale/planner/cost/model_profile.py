"""Grouping a captured graph into layers: the units the planner places on pipeline stages.

A 175B-parameter GPT captures to ~3,000 graph nodes; the planner works on ~100 layers. A layer is
a contiguous run of graph nodes that begins at a module (its ``name``), so a stage boundary at a
layer is a module path the stage-split pass accepts (``Config(stage_boundaries=...)``).

Layers are found from the module tree, not from any model family. A *block* is an element of a
module list or sequence (its path ends in an index: ``model.layers.3``, ``transformer.h.1``,
``encoder.block.0``). When the model has blocks, a module is opened into its children only if
blocks lie below it (``model``, ``encoder``, ``bert.encoder``): blocks and the modules beside
them (embeddings, final norm, head) are layers whole, so a stage never begins between the
gate, up and down projections of an MLP or inside an attention. A model without blocks opens,
from the root's children, every module holding more than ``1 / granularity`` of the model's
cost (FLOPs, bytes or parameters), until every layer is small or a leaf. Pinned stage
boundaries open the modules they lie in.

Nodes outside every layer (the root's ``x + pos``) join the layer before them, as the stage-split
pass puts them in the current stage, and so do nodes computed from the model's inputs alone
(masks, positions: every stage recomputes them). Modules with parameters whose nodes interleave
(a block called twice) are merged into one layer, so each layer is one contiguous range; a
parameterless module called twice (T5's stack dropout) leaves its later calls where they fall.
A layer is ``cuttable`` where the stage split accepts a boundary: it begins with its module's
first node, and only tensors cross into it.

All sizes are per batch row, from the example batch the model was captured with: FLOPs, memory
traffic and saved activations grow with rows; parameter reads do not.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from .layers import Layer, ModelProfile

if TYPE_CHECKING:  # the planner needs no torch; capture hands it a CapturedModel
    from ...capture.graph import CapturedModel, NodeInfo

__all__ = ["profile_model"]

_COMPUTE_OPS = ("call_function", "call_method", "call_module")
_ELEMENT_BYTES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}  # fmt: skip


def profile_model(
    captured: CapturedModel,
    example_rows: int,
    *,
    granularity: int = 32,
    boundaries: Sequence[str] = (),
    split_only: bool | None = None,
) -> ModelProfile:
    """Group a captured model's nodes into layers with per-row costs.

    Args:
        captured: the model from :func:`whale.capture.capture`.
        example_rows: batch rows of the example inputs it was captured with.
        granularity: a module holding more than ``1 / granularity`` of the model's cost is
            split into its children (when it has two or more).
        split_only: tensor parallelism shards only nodes inside ``split()`` scopes (what the
            runtime executes); False assumes every layer could be split (for what-if plans).
            None: True when the model has a ``split()`` annotation.
        boundaries: module paths where pinned stages begin (``Config(stage_boundaries)``); they
            become layer starts. Stages from ``stage()`` annotations are found on the nodes.

    Raises:
        ValueError: ``example_rows`` < 1, a boundary that names no computing module, or
            stage annotations that go backwards in graph order.
    """
    if isinstance(example_rows, bool) or not isinstance(example_rows, int) or example_rows < 1:
        raise ValueError(f"profile_model(example_rows={example_rows!r}) must be an int >= 1")
    nodes = captured.nodes
    graph_nodes = list(captured.graph_module.graph.nodes)
    index = {n.name: i for i, n in enumerate(nodes)}
    users = {gn.name: [index[u.name] for u in gn.users if u.name in index] for gn in graph_nodes}
    inputs = {gn.name: [index[p.name] for p in gn.all_input_nodes if p.name in index] for gn in graph_nodes}
    compute = [i for i, n in enumerate(nodes) if n.op in _COMPUTE_OPS]
    if not compute:
        raise ValueError("profile_model: the captured graph has no operation that computes")
    # get_attr nodes belong where they are first used (export hoists them to the top).
    owner_path = {}
    for i, n in enumerate(nodes):
        if n.op == "get_attr" and users.get(n.name):
            owner_path[i] = nodes[min(users[n.name])].module_path
        else:
            owner_path[i] = n.module_path
    stage_marks = _stage_marks(captured, compute)
    forced = set(boundaries)
    free = _inputs_only(nodes, inputs)
    stateful = {i for i in compute if any(nodes[p].op == "get_attr" for p in inputs[nodes[i].name])}
    placed = [i for i in compute if i not in free] or compute
    starts = _layer_starts(nodes, placed, owner_path, granularity, forced, stage_marks, stateful)
    if split_only is None:
        split_only = any(a.kind == "split" for a in captured.annotations_used())
    splittable = [not split_only or any(a.kind == "split" for a in n.annotations) for n in nodes]
    profile = _build(
        captured, nodes, starts, owner_path, users, inputs, example_rows, forced, stage_marks, splittable, free
    )
    return dataclasses.replace(profile, split_only=split_only)


def _cost_shares(nodes: Sequence[NodeInfo], compute: Sequence[int], owner: Mapping[int, str]) -> dict[str, float]:
    """Largest of FLOP, byte and parameter share for every module path prefix."""
    totals = [0.0, 0.0, 0.0]
    per_path: dict[str, list[float]] = {}
    for i in compute:
        n = nodes[i]
        amounts = (n.flops, n.bytes_accessed, n.param_bytes)
        path = owner[i]
        parts = path.split(".") if path else []
        for depth in range(len(parts) + 1):
            acc = per_path.setdefault(".".join(parts[:depth]), [0.0, 0.0, 0.0])
            for k in range(3):
                acc[k] += amounts[k]
        for k in range(3):
            totals[k] += amounts[k]
    return {p: max(a[k] / totals[k] if totals[k] else 0.0 for k in range(3)) for p, a in per_path.items()}


def _under(path: str, parent: str) -> bool:
    return parent == "" or path == parent or path.startswith(parent + ".")


def _inputs_only(nodes: Sequence[NodeInfo], inputs: Mapping[str, list[int]]) -> set[int]:
    """Nodes computed from the model's inputs alone: recomputed in every stage, never sent."""
    free: set[int] = set()
    for i, n in enumerate(nodes):
        if n.op in ("call_function", "call_method") and all(
            nodes[p].op == "placeholder" or p in free for p in inputs[n.name]
        ):
            free.add(i)
    return free


def _is_block(path: str) -> bool:
    """An element of a module list or sequence (``model.layers.3``)."""
    return path.rpartition(".")[2].isdigit()


def _layer_starts(nodes, compute, owner, granularity, forced, stage_marks, stateful) -> list[tuple[int, str]]:
    """(first node index, name) of every layer, in graph order; ``compute`` holds the nodes that
    place layers (not the inputs-only ones), ``stateful`` those that read parameters or buffers."""
    shares = _cost_shares(nodes, compute, owner)
    children: dict[str, list[str]] = {}
    for i in compute:
        parts = owner[i].split(".") if owner[i] else []
        for depth in range(len(parts)):
            parent, child = ".".join(parts[:depth]), ".".join(parts[: depth + 1])
            kids = children.setdefault(parent, [])
            if child not in kids:
                kids.append(child)
    marks_by_path: dict[str, set[int]] = {}
    for i in compute:
        parts = owner[i].split(".") if owner[i] else []
        for depth in range(len(parts) + 1):
            marks_by_path.setdefault(".".join(parts[:depth]), set()).add(stage_marks[i])

    # Every proper ancestor of a block (the root "" included) has blocks below it.
    blocks_below = set()
    for q in shares:
        if q and _is_block(q):
            parts = q.split(".")
            blocks_below.update(".".join(parts[:depth]) for depth in range(len(parts)))

    def expand(path: str) -> bool:
        kids = children.get(path, [])
        if not kids:
            return False
        if any(f != path and _under(f, path) for f in forced) or len(marks_by_path.get(path, ())) > 1:
            return True
        if blocks_below:  # stacks open; blocks and the modules beside them stay whole
            return not _is_block(path) and path in blocks_below
        return len(kids) >= 2 and shares.get(path, 0.0) > 1.0 / granularity

    groups: list[str] = []
    work = list(children.get("", []))
    while work:
        path = work.pop(0)
        if expand(path):
            work = children[path] + work
        else:
            groups.append(path)
    group_of = {}
    listed = set(groups)
    for i in compute:
        # Groups are disjoint subtrees: the one a node is in is the one among its path's prefixes.
        parts = owner[i].split(".") if owner[i] else []
        for depth in range(len(parts), -1, -1):
            g = ".".join(parts[:depth])
            if g in listed:
                group_of[i] = g
                break
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, g in group_of.items():
        first.setdefault(g, i)
        if i in stateful or g not in last:
            last[g] = i  # a parameterless module's later calls need not stay in its layer
    ordered = sorted(first, key=first.get)
    # Merge modules whose nodes interleave, so that every layer is one contiguous range.
    merged: list[list] = []
    for g in ordered:
        if merged and first[g] <= merged[-1][2]:
            merged[-1][2] = max(merged[-1][2], last[g])
        else:
            merged.append([first[g], g, last[g]])
    starts = [(0 if k == 0 else begin, name) for k, (begin, name, _) in enumerate(merged)]
    if not starts:  # the root computes everything itself: one layer, no cut inside
        starts = [(0, "")]
    # A pinned stage may begin inside a leaf module's nodes: split there (unnamed start).
    cuts = {i for k, i in enumerate(compute[1:], 1) if stage_marks[i] != stage_marks[compute[k - 1]]}
    have = {s for s, _ in starts}
    for i in sorted(cuts - have):
        starts.append((i, f"{owner[i] or '<root>'}:{nodes[i].name}"))
    return sorted(starts)


def _stage_marks(captured: CapturedModel, compute: Sequence[int]) -> dict[int, int]:
    """Pinned stage of each compute node from ``stage()`` annotations (0 when there are none)."""
    stages = [a for a in captured.annotations_used() if a.kind == "stage"]
    order = {id(a): k for k, a in enumerate(stages)}
    marks, current = {}, 0
    for i in compute:
        own = [order[id(a)] for a in captured.nodes[i].annotations if id(a) in order]
        if own:
            if own[-1] < current:
                raise ValueError(
                    f"stage {own[-1]} ({captured.nodes[i].module_path or '<root>'!r}) runs after "
                    f"stage {current} in forward(); stages must follow the order forward() runs them"
                )
            current = own[-1]
        marks[i] = current
    return marks


def _is_tensor(value) -> bool:
    """A tensor (fake or real) as capture records it in ``meta["val"]``; not a SymInt or tuple."""
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, (tuple, list))


def _tensor_bytes(info: NodeInfo) -> int:
    return sum(
        max(0, math.prod(shape)) * _ELEMENT_BYTES.get(dtype, 4)
        for shape, dtype in zip(info.shapes, info.dtypes)
    )


def _build(captured, nodes, starts, owner, users, inputs, rows, forced, stage_marks, splittable, free) -> ModelProfile:
    n_layers = len(starts)
    begin = [s for s, _ in starts] + [len(nodes)]
    layer_of = [0] * len(nodes)
    for k in range(n_layers):
        for i in range(begin[k], begin[k + 1]):
            layer_of[i] = k
    for i, n in enumerate(nodes):
        if n.op == "get_attr" and users.get(n.name):
            layer_of[i] = layer_of[min(users[n.name])]
    state_bytes = {i: n.param_bytes + n.buffer_bytes for i, n in enumerate(nodes) if n.op == "get_attr"}
    # Values computed from the model's inputs alone are recomputed in every stage, not sent;
    # only tensors can be sent, so no stage may begin where another value (a SymInt) crosses.
    values = [gn.meta.get("val") for gn in captured.graph_module.graph.nodes]
    cut = [0.0] * (n_layers + 1)
    untensored = [0] * (n_layers + 1)
    for i, n in enumerate(nodes):
        if n.op not in _COMPUTE_OPS or i in free or not users[n.name]:
            continue
        last_use = max(n_layers - 1 if nodes[u].op == "output" else layer_of[u] for u in users[n.name])
        if last_use > layer_of[i]:
            size = _tensor_bytes(n) / rows
            cut[layer_of[i] + 1] += size
            cut[last_use + 1] -= size
            if not _is_tensor(values[i]):
                untensored[layer_of[i] + 1] += 1
                untensored[last_use + 1] -= 1
    crossed_by_other = [sum(untensored[: k + 1]) > 0 for k in range(n_layers)]
    cut_bytes, running = [], 0.0
    for k in range(n_layers):
        running += cut[k]
        cut_bytes.append(max(0.0, running))
    cut_bytes[0] = 0.0

    attrs_of: dict[int, list[int]] = {}
    # An unread get_attr of a tied parameter that other nodes read (BERT's prediction bias, tied
    # to its decoder's) belongs where those read it, not to the layer its position falls in.
    read = {p for n in nodes if n.op == "get_attr" and users.get(n.name) for p in n.param_names}
    for i, n in enumerate(nodes):
        if n.op == "get_attr" and (users.get(n.name) or not (n.param_names and set(n.param_names) <= read)):
            attrs_of.setdefault(layer_of[i], []).append(i)
    # The first computing node under every module path.
    first_under: dict[str, int] = {}
    for i, n in enumerate(nodes):
        if n.op in _COMPUTE_OPS and owner[i]:
            parts = owner[i].split(".")
            for depth in range(1, len(parts) + 1):
                first_under.setdefault(".".join(parts[:depth]), i)
    layers, name_layers = [], {}
    for k, (start, name) in enumerate(starts):
        members = [i for i in range(begin[k], begin[k + 1]) if nodes[i].op != "get_attr"]
        members += attrs_of.get(k, [])
        layer = _layer(nodes, members, name, rows, state_bytes, inputs, captured.param_bytes_by_name, splittable)
        first_of_name = first_under.get(name, start) if name else start
        cuttable = bool(name) and ":" not in name and first_of_name >= start and not crossed_by_other[k]
        layers.append(dataclasses.replace(layer, cuttable=cuttable))
    # A parameter read through one get_attr by several layers (torch.export gives a tied weight,
    # GPT-2's embedding and head, one placeholder) is held by each of them: a stage holding any of
    # them keeps a copy, and the copies' gradients are summed (rewrite.stage_split's tied groups).
    for i, n in enumerate(nodes):
        if n.op != "get_attr" or not n.param_names:
            continue
        for k in sorted({layer_of[u] for u in users.get(n.name, ()) if nodes[u].op != "output"} - {layer_of[i]}):
            missing = [p for p in n.param_names if p not in layers[k].param_names]
            if not missing:
                continue
            extra = sum(captured.param_bytes_by_name.get(p, 0) for p in missing)
            layers[k] = dataclasses.replace(
                layers[k], param_names=layers[k].param_names + tuple(missing), param_bytes=layers[k].param_bytes + extra,
                replicated_param_bytes=layers[k].replicated_param_bytes + (0 if splittable[i] else extra))  # fmt: skip
    for k, layer in enumerate(layers):
        for pname in layer.param_names:
            name_layers.setdefault(pname, []).append(k)
    shared = tuple(
        (p, captured.param_bytes_by_name.get(p, 0), tuple(ks))
        for p, ks in name_layers.items()
        if len(ks) > 1
    )
    pinned = _pinned_cuts(starts, stage_marks, forced, nodes, begin)
    floats = [d for n in nodes for d in n.dtypes if d.startswith(("float", "bfloat"))]
    act_size = _ELEMENT_BYTES.get(max(set(floats), key=floats.count), 4) if floats else 4
    params = list(captured.param_bytes_by_name.items())
    numel_bytes = 4
    if params:
        state = dict(captured.graph_module.named_parameters())
        sizes = [state[p].element_size() for p, _ in params if p in state]
        numel_bytes = max(set(sizes), key=sizes.count) if sizes else 4
    return ModelProfile(
        layers=tuple(layers),
        cut_bytes=tuple(cut_bytes),
        shared_params=shared,
        param_dtype_bytes=numel_bytes,
        act_dtype_bytes=act_size,
        pinned_cuts=pinned,
        total_param_bytes=captured.total_param_bytes,
    )


def _pinned_cuts(starts, stage_marks, forced, nodes, begin) -> tuple[int, ...] | None:
    names = [name for _, name in starts]
    if forced:
        # A boundary at a module that holds several layers (an encoder-decoder's 'model.decoder',
        # opened into its blocks) begins at the first of them.
        first = {b: next((k for k, n in enumerate(names) if b and _under(n, b)), None) for b in forced}
        missing = [b for b in forced if first[b] is None]
        if missing:
            raise ValueError(
                f"stage boundary {missing[0]!r} names no module that computes in the graph; use a "
                "module path of model.named_modules() that forward() calls"
            )
        return tuple(sorted(first[b] for b in forced))
    if len(set(stage_marks.values())) <= 1:
        return None
    cuts = []
    for k in range(1, len(starts)):
        before = [stage_marks[i] for i in range(begin[k - 1], begin[k]) if i in stage_marks]
        after = [stage_marks[i] for i in range(begin[k], begin[k + 1]) if i in stage_marks]
        if before and after and after[0] > before[-1]:
            cuts.append(k)
    return tuple(cuts)


def _layer(nodes, members: Iterable[int], name, rows, state_bytes, inputs, bytes_by_name, splittable) -> Layer:
    members = sorted(members)
    compute = [i for i in members if nodes[i].op in _COMPUTE_OPS]
    # The layer's output width: its last node that writes fresh memory.
    hidden = next((nodes[i].output_bytes for i in reversed(compute) if nodes[i].output_bytes), 0) / rows
    sharded, replicated = [], []
    param_names: dict[str, int] = {}
    repl_params = 0
    matmuls = embeddings = 0
    act = repl_act = 0.0
    for i in members:
        n = nodes[i]
        fixed = n.param_bytes + n.buffer_bytes if n.op == "call_module" else 0
        fixed += sum(state_bytes.get(p, 0) for p in inputs.get(n.name, ()))
        per_row = (n.flops / rows, max(0, n.bytes_accessed - fixed) / rows, float(fixed))
        owns = n.param_bytes if n.op in ("call_module", "get_attr") else 0
        out = n.output_bytes / rows
        if n.op == "placeholder":
            act += out  # the batch itself stays for the backward of the first stage
            continue
        # Under tensor parallelism matmuls and wide tensors are sharded; zero-FLOP work on
        # hidden-width tensors (norms, residual adds, dropout) is repeated on every shard.
        is_sharded = splittable[i] and (n.flops > 0 or out > hidden * (1 + 1e-9))
        if n.op in _COMPUTE_OPS:
            (sharded if is_sharded else replicated).append(per_row)
            act += out
            if not is_sharded:
                repl_act += out
        for pname in n.param_names:
            if pname not in param_names:
                param_names[pname] = 0
        if owns:
            # Embedding tables are larger than one row's output and are sharded (vocab parallel).
            if not splittable[i]:
                repl_params += owns
            elif n.flops > 0:
                matmuls += 1
            elif owns > n.output_bytes / rows:
                embeddings += 1
            elif n.op == "call_module":
                repl_params += owns
    param_bytes = sum(bytes_by_name.get(p, 0) for p in param_names)
    items = sharded + replicated
    if not items:
        items = [(0.0, 0.0, 0.0)]
    return Layer(
        name=name,
        flops=tuple(x[0] for x in items),
        row_bytes=tuple(x[1] for x in items),
        fixed_bytes=tuple(x[2] for x in items),
        num_sharded=len(sharded),
        param_bytes=param_bytes,
        replicated_param_bytes=min(repl_params, param_bytes),
        act_bytes=act,
        replicated_act_bytes=min(repl_act, act),
        hidden_bytes=hidden,
        tp_all_reduces=(matmuls + 1) // 2 + embeddings,
        param_names=tuple(param_names),
    )
