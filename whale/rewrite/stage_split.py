"""Stage split: cut a captured fx graph into one program per pipeline stage.

Requires: a graph from ``whale.capture`` (every node carries ``meta["whale_node_info"]`` and
``meta["val"]``) and a stage for every node that computes.

Call: each stage becomes a ``GraphModule`` ``forward(*model_inputs, *received) -> tuple(sent)``.
Values that later stages need cross every boundary in between (a skip connection from stage 0
to stage 2 is relayed by stage 1). Nodes that depend only on the model's inputs and on buffers
forward does not update, and hold no parameters (shape arithmetic, ``arange`` positions, masks,
rotary cos/sin) are recomputed in every stage that uses them instead of being sent, unless
something writes them in place (ViTMAE's mask: zeros written into a slice): those are made once,
with their writes, and sent. Parameters and buffers go to every stage that reads them, so a
weight tied across stages (GPT's embedding and head) lives on both and its gradients are summed
by the runtime. A buffer that forward updates (a counter, running statistics; export records the
write as an in-place op or a ``copy_`` into it) lives in one stage: its write runs in the stage
that computes the new value, and a buffer read or written by two stages is refused.

Ensures: every compute node lands in exactly one stage; every stage computes something; no
stage reads a value from a later one.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence

import torch
from torch import fx, nn

from ..capture import CapturedModel, NodeInfo
from ..capture.opaque import is_opaque
from ..primitives import Annotation

__all__ = ["StageProgram", "assign_stages", "attach_state", "capture_split_stages", "hold_unread_state",
           "split_stages", "stage_annotations"]

_INFO = "whale_node_info"


@dataclasses.dataclass(frozen=True)
class StageProgram:
    """One stage's program and its interface.

    Attributes:
        index: position of the stage in the pipeline.
        module: ``forward(*model_inputs, *received)``; returns a tuple of the values sent on
            (every stage but the last) or the model's output (the last stage).
        received: names of the values this stage receives from the previous one, in order.
        sent: names of the values it sends to the next one, in order (empty for the last).
        modules: module paths whose computation this stage runs (outermost first).
        updated_buffers: the buffers (attribute paths) this stage's forward writes.
    """

    index: int
    module: fx.GraphModule
    received: tuple[str, ...]
    sent: tuple[str, ...]
    modules: tuple[str, ...]
    updated_buffers: tuple[str, ...] = ()


def stage_annotations(captured: CapturedModel) -> tuple[Annotation, ...]:
    """The ``stage()`` annotations in the graph, in order of first use."""
    return tuple(a for a in captured.annotations_used() if a.kind == "stage")


def assign_stages(
    captured: CapturedModel, boundaries: Sequence[str] | None = None
) -> tuple[dict[str, int], int]:
    """Give each compute node a stage, from ``stage()`` annotations or from ``boundaries``.

    Args:
        captured: the captured model.
        boundaries: module paths at which a new stage begins (in graph order), instead of
            annotations; e.g. ``("blocks.2",)`` makes two stages.

    Returns:
        ``(stage of each compute node by name, number of stages)``. Inputs-only nodes
        (recomputed where used), placeholders, parameters and the output have no entry.

    Raises:
        ValueError: an unknown boundary module, a boundary out of graph order, a stage with
            no computation, or a stage that feeds an earlier one.
    """
    graph = captured.graph_module.graph
    free = _inputs_only(captured.graph_module)
    stage: dict[str, int] = {}
    if boundaries:
        num = _assign_by_boundaries(graph, free, tuple(boundaries), stage)
    else:
        num = _assign_by_annotations(captured, graph, free, stage)
    _place_state_writes(graph, stage)
    _check_every_stage_computes(captured, stage, num, boundaries)
    return stage, num


def _written_state(node: fx.Node) -> fx.Node | None:
    """The ``get_attr`` node whose tensor ``node`` writes in place (``add_``, ``copy_``,
    ``buf[i] = v``, also through in-place ops and views of it), or None."""
    root = _written_root(node)
    return root if root is not None and root.op == "get_attr" else None


def _written_root(node: fx.Node) -> fx.Node | None:
    """The node whose value ``node`` writes in place, through views of it (``mask[:, :k] = 0``,
    ``x.view(...).fill_(1)``), or None: the value's own node, a buffer's ``get_attr`` or an
    input's placeholder."""
    if not _aliases_first_arg(node, write=True):
        return None
    at = node.args[0]
    while isinstance(at, fx.Node) and _aliases_first_arg(at, write=False):
        at = at.args[0]
    return at if isinstance(at, fx.Node) else None


_INPLACE_OPERATORS = frozenset(
    {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
     operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
     operator.setitem}
)
# What returns a view of (or the same tensor as) its first argument in an fx graph; aten ops say
# so in their schemas. ``x[i]`` is a view unless the index is a tensor; counted as one, a write
# into a copy only keeps a value from being recomputed per stage.
_VIEW_METHODS = frozenset(
    {"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "expand", "expand_as", "narrow",
     "select", "squeeze", "unsqueeze", "flatten", "unflatten", "t", "as_strided", "diagonal", "movedim",
     "swapaxes", "swapdims", "split", "chunk", "unbind", "detach", "contiguous", "real", "imag"}
)
_VIEW_FUNCTIONS = frozenset(
    {operator.getitem, torch.reshape, torch.transpose, torch.permute, torch.narrow, torch.select, torch.squeeze,
     torch.unsqueeze, torch.flatten, torch.t, torch.as_strided, torch.diagonal, torch.movedim, torch.swapaxes,
     torch.split, torch.chunk, torch.unbind, torch.detach}
)


def _aliases_first_arg(node: fx.Node, *, write: bool) -> bool:
    """``node`` writes its first argument in place (``write``) or returns an alias of it: an
    aten op by its schema (export), an in-place Tensor method (``mul_``), operator or item
    assignment, or a view method or function (fx)."""
    target = node.target
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        in_place = target.endswith("_") and not target.startswith("__")
        return in_place or (not write and target in _VIEW_METHODS)
    if node.op != "call_function":
        return False
    if target in _INPLACE_OPERATORS:
        return write or target is not operator.setitem
    if not isinstance(target, torch._ops.OpOverload):
        return not write and target in _VIEW_FUNCTIONS
    schema = target._schema
    if write:
        info = schema.arguments[0].alias_info if schema.arguments else None
        return info is not None and info.is_write
    return bool(schema.returns) and schema.returns[0].alias_info is not None


def _place_state_writes(graph: fx.Graph, stage: dict[str, int]) -> None:
    """Run each write into a buffer in the stage that computes what it writes (export puts the
    ``copy_`` of an updated buffer at the end of the graph, in the last stage), and refuse a
    buffer that two stages use: each would update its own copy."""
    users: dict[str, set[int]] = {}
    written: set[str] = set()
    for node in graph.nodes:
        state = _written_state(node)
        if state is None:
            continue
        written.add(state.name)
        if not node.users and node.name in stage:
            producers = [stage[p.name] for p in node.all_input_nodes if p.name in stage]
            stage[node.name] = max(producers, default=stage[node.name])
    for node in graph.nodes:
        if node.op == "get_attr" and node.name in written:
            users[node.target] = {stage[u.name] for u in node.users if u.name in stage}
    for target, where in users.items():
        if len(where) > 1:
            raise ValueError(
                f"buffer {target!r} is updated in forward and used by stages {sorted(where)}: each "
                "stage would update its own copy; put the stage boundaries so that one stage "
                "reads and writes it"
            )


def _compute_nodes(graph: fx.Graph, free: set[str]):
    for node in graph.nodes:
        if node.op in ("call_function", "call_method", "call_module") and node.name not in free:
            if node.op == "call_module" and not node.users and not node.meta[_INFO].module_path:
                continue  # torch.export's _guards_fn input check: no part of any stage's work
            yield node


def _assign_by_boundaries(graph: fx.Graph, free: set[str], boundaries: tuple[str, ...], stage: dict) -> int:
    paths = {node.meta[_INFO].module_path for node in graph.nodes if _INFO in node.meta}
    for b in boundaries:
        if not any(p == b or p.startswith(b + ".") for p in paths):
            raise ValueError(
                f"stage boundary {b!r} names no module that computes in the graph; use a module "
                f"path of model.named_modules() that forward() calls"
            )
    current = 0
    for node in _compute_nodes(graph, free):
        path = node.meta[_INFO].module_path
        while current < len(boundaries) and _under(path, boundaries[current]):
            current += 1
        if any(_under(path, b) for b in boundaries[current:]):
            raise ValueError(
                f"stage boundaries {list(boundaries)} are not in graph order: {path!r} runs "
                f"before {boundaries[current]!r}; list them in the order forward() calls them"
            )
        stage[node.name] = current
    return len(boundaries) + 1


def _assign_by_annotations(captured: CapturedModel, graph: fx.Graph, free: set[str], stage: dict) -> int:
    stages = stage_annotations(captured)
    index = {id(a): i for i, a in enumerate(stages)}
    for node in _compute_nodes(graph, free):
        info = node.meta[_INFO]
        producers = [stage[p.name] for p in node.all_input_nodes if p.name in stage]
        floor = max(producers, default=0)
        marks = [index[id(a)] for a in info.annotations if id(a) in index]
        if not marks:
            stage[node.name] = floor
            continue
        if marks[-1] < floor:
            late = next(p for p in node.all_input_nodes if stage.get(p.name) == floor)
            raise ValueError(
                f"stage {marks[-1]} ({info.module_path or '<root>'!r}, node {node.name}) reads "
                f"{late.name} from stage {floor} ({late.meta[_INFO].module_path!r}): a later stage "
                "cannot feed an earlier one; reorder the stages or move the module"
            )
        stage[node.name] = marks[-1]
    return max(len(stages), 1)


def _check_every_stage_computes(captured, stage: dict, num: int, boundaries) -> None:
    used = set(stage.values())
    for s in range(num):
        if s not in used:
            if boundaries:
                what = (
                    f"the stage starting at {boundaries[s - 1]!r}" if s
                    else f"the first stage (before {boundaries[0]!r}, where forward() begins computing)"
                )
            else:
                what = repr(stage_annotations(captured)[s]) + f" (stage {s})"
            start = boundaries[s - 1] if boundaries and s else None
            inside = sorted({n.module_path for n in captured.nodes if is_opaque(n.target)
                             and _under(start, n.module_path) and start != n.module_path}) if start else []  # fmt: skip
            if inside:
                raise ValueError(
                    f"{what} owns no computation: it falls inside {inside[0]!r}, which whale runs as one "
                    "opaque call (torch.export could not trace it; the capture warning says why); put "
                    f"the boundary at {inside[0]!r} or at a module outside it"
                )
            raise ValueError(
                f"{what} owns no computation: no operation of forward() falls in it; remove it "
                "or annotate a module that forward() calls"
            )


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent + ".")


def _inputs_only(gm: fx.GraphModule) -> set[str]:
    """Nodes computed from the model's inputs, constants and buffers forward does not update
    alone, holding no parameters (positions, masks, Llama's rotary cos/sin from ``inv_freq``):
    each stage that uses one recomputes it rather than receiving it.

    A stage recomputes what the values it uses read, so a write in place into such a value is
    recomputed only where a later reader depends on it (Longformer's mask: ``index_put_`` into a
    view, then read through the write's result). Where a reader after the write reads the value
    itself (ViTMAE's ``mask[:, :keep] = 0`` then ``gather(mask, ...)``: no node reads the
    write's result), or the write is no such node, the value is made once, in its stage, with
    its writes, and sent."""
    graph = gm.graph
    written = {w.name for n in graph.nodes if (w := _written_state(n)) is not None}
    params = {id(p) for p in gm.parameters()}
    sources = {
        n.name for n in graph.nodes
        if n.op == "placeholder"
        or (n.op == "get_attr" and n.name not in written and _is_constant_tensor(gm, n.target, params))
    }

    def from_sources(sent: set[str]) -> set[str]:
        free: set[str] = set()
        for node in graph.nodes:
            if node.op in ("call_function", "call_method") and node.name not in sent and all(
                p.name in sources or p.name in free for p in node.all_input_nodes
            ):
                free.add(node.name)
        return free

    free = from_sources(set())
    sent = _writes_not_recomputed(graph, free)
    return from_sources(sent) if sent else free


def _writes_not_recomputed(graph: fx.Graph, free: set[str]) -> set[str]:
    """The ``free`` values written in place that a stage recomputing them could take without the
    write: the write is not free, or a node after it reads the value (or a view of it) without
    depending on the write."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    unsafe: set[str] = set()
    for write in graph.nodes:
        root = _written_root(write)
        if root is None or root.name not in free or root.name in unsafe:
            continue
        if write.name not in free:
            unsafe.add(root.name)
            continue
        family = {root}  # the value, its views and the in-place results aliasing it
        after = set()  # what depends on the write
        for node in graph.nodes:
            if node is not root and order[node] > order[root] and node.args and node.args[0] in family and (
                _aliases_first_arg(node, write=False) or _aliases_first_arg(node, write=True)
            ):
                family.add(node)
            if node is write or any(p in after for p in node.all_input_nodes):
                after.add(node)
        if any(
            order[node] > order[write] and node not in family and node not in after
            and any(p in family for p in node.all_input_nodes)
            for node in graph.nodes
        ):
            unsafe.add(root.name)
    return unsafe


def _is_constant_tensor(gm: fx.GraphModule, target: str, params: set[int]) -> bool:
    """``target`` names a tensor attribute of ``gm`` that is no parameter (a buffer, a constant)."""
    owner, _, attr = target.rpartition(".")
    try:
        value = getattr(gm.get_submodule(owner), attr)
    except AttributeError:
        return False
    return isinstance(value, torch.Tensor) and id(value) not in params


def split_stages(captured: CapturedModel, stage: Mapping[str, int], num_stages: int) -> tuple[StageProgram, ...]:
    """Build one :class:`StageProgram` per stage from a stage assignment (see :func:`assign_stages`)."""
    gm = captured.graph_module
    graph = gm.graph
    nodes = list(graph.nodes)
    by_name = {n.name: n for n in nodes}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    (output,) = [n for n in nodes if n.op == "output"]
    last_use: dict[str, int] = {}
    for node in nodes:
        user_stages = [stage[u.name] for u in node.users if u.name in stage]
        if node is not output and output in node.users:
            user_stages.append(num_stages - 1)
        if user_stages:
            last_use[node.name] = max(user_stages)
    # Values produced by stage < s and needed at stage >= s cross boundary s-1 -> s.
    crossing = [
        [n.name for n in nodes if n.name in stage and stage[n.name] < s <= last_use.get(n.name, -1)]
        for s in range(num_stages)
    ]
    for names in crossing:
        for name in names:
            meta = by_name[name].meta.get("val")
            if not isinstance(meta, torch.Tensor):
                raise ValueError(
                    f"node {name} ({type(meta).__name__}) crosses a pipeline stage boundary, but "
                    "only tensors can be sent between stages; compute it inside the stage that "
                    "uses it"
                )
    state_keys = set(gm.state_dict())
    programs = []
    for s in range(num_stages):
        received = tuple(crossing[s])
        sent = tuple(crossing[s + 1]) if s + 1 < num_stages else ()
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for ph in placeholders:
            env[ph] = g.placeholder(ph.name)
            env[ph].meta = dict(ph.meta)
        for name in received:
            env[by_name[name]] = g.placeholder(f"recv_{name}")
            env[by_name[name]].meta = dict(by_name[name].meta)
        needed = _needed_in_stage(nodes, stage, s, sent, output if s == num_stages - 1 else None)
        for node in nodes:
            if node.name in needed and node not in env:
                env[node] = g.node_copy(node, lambda n: env[n])
        if s == num_stages - 1:
            g.output(fx.graph.map_arg(output.args[0], lambda n: env[n]))
        else:
            g.output(tuple(env[by_name[name]] for name in sent))
        g.lint()
        module = fx.GraphModule(gm, g, class_name=f"Stage{s}")
        keep_state_dict_keys(module, state_keys)
        paths = sorted({by_name[n].meta[_INFO].module_path for n in stage if stage[n] == s and _INFO in by_name[n].meta})
        outer = tuple(p for p in paths if not any(q != p and q and _under(p, q) for q in paths))
        updated = sorted({w.target for n in g.nodes if (w := _written_state(n)) is not None})
        programs.append(StageProgram(s, module, received, sent, outer, tuple(updated)))
    return tuple(programs)


def hold_unread_state(stages: Sequence[StageProgram], model: nn.Module) -> list[tuple[str, int]]:
    """Give every entry of ``model.state_dict()`` that no stage's graph reads to a stage:
    parameters forward never touches (DINOv2's ``mask_token``, ESM's contact head, XLNet's
    segment biases when no ``token_type_ids`` are passed) would otherwise be held by no rank,
    and a checkpoint would lose them. Each goes to the stage holding the nearest entry before it
    in the state dict (after it, for the first ones), under its own name; it gets no gradient,
    so an optimizer leaves it as it was, as it does on the local model. Returns ``(name,
    stage)`` of each entry placed (none where every one is read)."""
    held: dict[int, int] = {}
    for st in stages:
        for t in st.module.state_dict(keep_vars=True).values():
            held.setdefault(id(t), st.index)
    state = list(model.state_dict(keep_vars=True).items())
    placed = []
    for k, (name, t) in enumerate(state):
        if id(t) in held:  # read by a stage, or a tied name of one placed already
            continue
        nearest = (held[id(u)] for _, u in [*reversed(state[:k]), *state[k + 1 :]] if id(u) in held)
        index = next(nearest, 0)
        attach_state(stages[index].module, name, t)
        held[id(t)] = index
        placed.append((name, index))
    return placed


def attach_state(module: nn.Module, name: str, t: torch.Tensor) -> None:
    """Register ``t`` in ``module`` under the dotted ``name`` (a parameter, or a persistent
    buffer), making the modules on the way where ``module`` has none."""
    owner, _, attr = name.rpartition(".")
    for part in owner.split(".") if owner else ():
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    if isinstance(t, nn.Parameter):
        module.register_parameter(attr, t)
    else:
        module.register_buffer(attr, t)


def keep_state_dict_keys(module: fx.GraphModule, state_keys: set[str]) -> None:
    """Make a stage's state dict a part of the whole graph's: the buffers the stage copied that
    the graph's state dict leaves out (non-persistent ones, such as Llama's rotary ``inv_freq``
    and BERT's ``position_ids``, and export's lifted constants) stay out of it."""
    for name, _ in module.named_buffers(remove_duplicate=False):
        if name not in state_keys:
            owner, _, attr = name.rpartition(".")
            module.get_submodule(owner)._non_persistent_buffers_set.add(attr)


def _needed_in_stage(nodes, stage: Mapping[str, int], s: int, sent, output) -> set[str]:
    """Names of nodes stage ``s`` must contain: its own compute, and what they read locally."""
    needed: set[str] = set()
    by_name = {n.name: n for n in nodes}
    stack = [n for n in nodes if stage.get(n.name) == s]
    stack += [by_name[name] for name in sent if stage.get(name, s) == s]
    if output is not None:
        stack += [n for n in output.all_input_nodes]
    while stack:
        node = stack.pop()
        if node.name in needed or node.op == "placeholder":
            continue
        if node.name in stage and stage[node.name] != s:
            continue  # produced elsewhere: received, not recomputed
        needed.add(node.name)
        stack.extend(node.all_input_nodes)
    return needed


def capture_split_stages(stages: Sequence[StageProgram], captured: CapturedModel) -> dict[int, CapturedModel]:
    """Each stage that holds a ``split`` part as a captured model of its own, for the
    tensor-parallel rewrite.

    No second trace: a stage's nodes are copies of the captured ones and keep their metadata
    (annotations, module paths, shapes), so a split written around modules or inside
    ``forward`` is seen in the stage exactly as in the whole model.
    """
    graphs = {}
    for stage in stages:
        infos = []
        for node in stage.module.graph.nodes:
            info = node.meta.get(_INFO)
            if info is None:  # the stage's own output node
                outs = [a.meta["val"] for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
                info = NodeInfo(
                    name=node.name, op="output", target="output", module_path="", annotations=(),
                    shapes=tuple(tuple(t.shape) for t in outs), dtypes=tuple(str(t.dtype) for t in outs),
                    flops=0, bytes_accessed=0, param_bytes=0, output_bytes=0,
                )
            else:
                # Received values become placeholders named recv_*: the info follows the node. A
                # received value arrives whole, so it is no part of the sender's split (a stage
                # would otherwise hold a split of nothing: BART's encoder output in the decoder's).
                received = node.op == "placeholder" and info.op != "placeholder"
                keep = tuple(a for a in info.annotations if not (received and a.kind == "split"))
                info = dataclasses.replace(info, name=node.name, op=node.op, annotations=keep)
            node.meta[_INFO] = info
            infos.append(info)
        if not any(a.kind == "split" for info in infos for a in info.annotations):
            continue
        names = {n for n, _ in stage.module.named_parameters()}
        param_bytes = {n: b for n, b in captured.param_bytes_by_name.items() if n in names}
        graphs[stage.index] = CapturedModel(stage.module, captured.frontend, tuple(infos), param_bytes)
    return graphs
