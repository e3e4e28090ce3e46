"""Activation checkpointing (``Config(activation_checkpointing=[paths])``): the named modules'
activations are recomputed in backward instead of kept from forward.

Requires: rank programs from :class:`whale.rewrite.build.ProgramRewrite` and module paths of
the local model (checked by :func:`check_checkpoint_paths`, with close names for a typo).

Call, at the module-call level, with ``torch.utils.checkpoint.checkpoint`` (non-reentrant,
``preserve_rng_state=True`` so dropout draws the same mask when recomputed):

* a program that runs the model itself (data parallel) gets a shallow copy of each module on
  the path to a checkpointed one (parameters, buffers and every other module shared, as
  ``sync_batch_norms`` does); the checkpointed module's copy runs its forward under
  ``checkpoint``. The user's model is not modified.
* a pipeline stage (an fx ``GraphModule`` cut from the captured graph, fx or ``torch.export``)
  gets each checkpointed module's nodes (those whose ``module_path`` lies under the path, with
  whatever lies between them) outlined into a region called under ``checkpoint``; the region
  takes parameters as inputs, so the stage's parameters and state dict keep their names.

Ensures: the program's parameters, state-dict keys and results are unchanged (the backward
recomputes the same forward); a region that writes a buffer (BatchNorm running statistics,
counters) is refused, since recomputing it would update the buffer twice.

Example::

    check_checkpoint_paths(model, ["transformer.h.0"])
    stages = checkpoint_pass(stages, ("transformer.h.0",))
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import heapq
import operator
import types
import warnings
from collections.abc import Sequence

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from ..capture.graph import NODE_INFO_KEY
from .module_copies import PathCopies
from .program import ProgramStage
from .stage_split import _written_state

__all__ = ["check_checkpoint_paths", "checkpoint_module", "checkpoint_pass"]

_PREFIX = "_whale_recompute_"


def check_checkpoint_paths(model: nn.Module, paths: Sequence[str]) -> None:
    """Raise ``ValueError`` for a path that names no submodule of ``model`` (with the closest
    module paths), the root (``""``), or a module whose forward updates running statistics.

    Example::

        check_checkpoint_paths(gpt2, ["transformer.h.0"])
    """
    names = [n for n, _ in model.named_modules() if n]
    known = set(names)
    for path in paths:
        if path not in known:
            close = difflib.get_close_matches(path, names, n=5, cutoff=0.6)
            hint = f"close names: {close}" if close else f"some module paths: {names[:8]}"
            raise ValueError(
                f"Config(activation_checkpointing=...): {type(model).__name__} has no module {path!r}; {hint}"
            )
        module = model.get_submodule(path)
        for sub_path, sub in module.named_modules(prefix=path):
            if _tracks_statistics(sub):
                free = _without_batch_norm(module, path)
                raise ValueError(
                    f"Config(activation_checkpointing=...): {path!r} holds the BatchNorm {sub_path!r}, whose "
                    "running statistics a recomputed forward would update twice; checkpoint modules without "
                    "BatchNorm instead"
                    + (f", e.g. its parts {free}" if free else " (none of its parts holding parameters is free of one)")
                )


def _tracks_statistics(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm) and module.track_running_stats


def _without_batch_norm(module: nn.Module, path: str, most: int = 4) -> list[str]:
    """The largest submodules of ``module`` (at ``path``) that hold parameters and no BatchNorm
    keeping running statistics, by parameter count: what may be checkpointed in its place."""
    found: list[tuple[int, str]] = []

    def visit(sub: nn.Module, sub_path: str) -> None:
        if not any(_tracks_statistics(m) for m in sub.modules()):
            size = sum(p.numel() for p in sub.parameters())
            if size:
                found.append((size, sub_path))
            return
        for name, child in sub.named_children():
            visit(child, f"{sub_path}.{name}")

    visit(module, path)
    return [p for _, p in sorted(found, key=lambda t: -t[0])[:most]]


class _CheckpointedForward:
    """A module copy's ``forward``: its class's forward under ``checkpoint``.

    An argument that is a Python object, not a tensor, number or module (transformers'
    ``EncoderDecoderCache``, which XLM makes every forward and each attention layer appends its
    keys and values to), may be changed by forward; backward's recompute would then run on the
    changed object (the keys twice: a shape error, or other gradients without one). The
    recompute runs on a copy of each such object as forward first saw it, its tensors shared,
    not copied (a write into one of them in place is not undone)."""

    def __init__(self, module: nn.Module) -> None:
        self.forward = type(module).forward.__get__(module)

    def __call__(self, *args, **kwargs):
        objects = {id(v): v for v in _objects((args, kwargs))}
        before = {key: self._snapshot(v) for key, v in objects.items()}
        before = {key: v for key, v in before.items() if v is not None}
        if not before:
            return checkpoint(self.forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
        calls = []

        def run(*a, **k):
            calls.append(None)
            if len(calls) > 1:  # the recompute in backward
                fresh = {key: _copy_sharing_tensors(v) for key, v in before.items()}
                a, k = _replaced((a, k), fresh)
            return self.forward(*a, **k)

        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

    def _snapshot(self, value):
        try:
            return _copy_sharing_tensors(value)
        except Exception as err:  # noqa: BLE001 - any failure to copy leaves the object as it is
            if type(value) not in _UNCOPYABLE:  # said once per type, not once per layer
                _UNCOPYABLE.add(type(value))
                warnings.warn(
                    f"activation checkpointing: {type(value).__name__} passed to "
                    f"{type(self.forward.__self__).__name__}.forward cannot be copied "
                    f"({type(err).__name__}: {err}); if forward changes it, backward recomputes "
                    "with the changed object. Pass tensors, or make the object copyable",
                    stacklevel=3,
                )
            return None


_UNCOPYABLE: set[type] = set()
_PLAIN = (torch.Tensor, nn.Module, int, float, bool, complex, str, bytes, type(None), torch.dtype,
          torch.device, torch.layout, torch.memory_format, torch.Size, enum.Enum, type, slice,
          types.FunctionType, types.MethodType, types.BuiltinFunctionType, type(Ellipsis))


def _objects(value):
    """The Python objects among ``value``'s tuples, lists and dicts (not their items' insides)."""
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        for item in value:
            yield from _objects(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _objects(item)
    elif not isinstance(value, _PLAIN):
        yield value


def _replaced(value, fresh: dict):
    """``value`` with each object ``fresh`` names (by ``id``) replaced: the containers holding
    one rebuilt, every other value itself."""
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        items = [_replaced(item, fresh) for item in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        items = {key: _replaced(item, fresh) for key, item in value.items()}
        if all(items[key] is item for key, item in value.items()):
            return value
        return type(value)(items)
    return fresh.get(id(value), value)


def _copy_sharing_tensors(value):
    """``copy.deepcopy(value)`` with every tensor and module it reaches shared, not copied."""
    memo: dict[int, object] = {}
    seen: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, (torch.Tensor, nn.Module)):
            memo[id(item)] = item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif not isinstance(item, type):
            stack.extend(getattr(item, "__dict__", {}).values())
            slots = (name for cls in type(item).__mro__ for name in getattr(cls, "__slots__", ()))
            stack.extend(getattr(item, name) for name in slots if isinstance(name, str) and hasattr(item, name))
    return copy.deepcopy(value, memo)


def checkpoint_module(model: nn.Module, paths: Sequence[str]) -> nn.Module:
    """``model`` whose modules ``paths`` run under ``checkpoint``; ``model`` is not modified
    (the modules on the way are shallow copies sharing every parameter, buffer and other module).

    Example::

        program_model = checkpoint_module(model, ["blocks.0", "blocks.1"])
    """
    if not paths:
        return model
    copies = PathCopies(model)
    for path in paths:
        module = copies(path)
        module.__dict__["forward"] = _CheckpointedForward(module)
    return copies.root


class _Region(nn.Module):
    """A stage's outlined nodes, run under ``checkpoint``. It holds no parameters (they come in
    as inputs) and keeps the outlined graph out of the module tree, so the stage's state dict
    and parameter names stay as they were."""

    def __init__(self, graph_module: fx.GraphModule, path: str) -> None:
        super().__init__()
        object.__setattr__(self, "region", graph_module)
        self.path = path

    def forward(self, *inputs):
        return checkpoint(self.region, *inputs, use_reentrant=False, preserve_rng_state=True)

    def extra_repr(self) -> str:
        return f"path={self.path!r}"


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent + ".")


def _region_nodes(graph: fx.Graph, path: str) -> list[fx.Node]:
    """The nodes of module ``path`` and every node between two of them, in graph order."""
    nodes = list(graph.nodes)
    own = {
        n for n in nodes
        if n.op in ("call_function", "call_method", "call_module") and NODE_INFO_KEY in n.meta
        and _under(n.meta[NODE_INFO_KEY].module_path, path)
    }  # fmt: skip
    if not own:
        return []
    after: set[fx.Node] = set()  # reached from the module's nodes
    for n in nodes:
        if n in own or any(a in own or a in after for a in n.all_input_nodes):
            after.add(n)
    before: set[fx.Node] = set()  # reaching the module's nodes
    for n in reversed(nodes):
        if n in own or any(u in own or u in before for u in n.users):
            before.add(n)
    return [n for n in nodes if n in own or (n in after and n in before and n.op != "output")]


def _outline(gm: fx.GraphModule, path: str, name: str) -> bool:
    """Outline module ``path``'s nodes of ``gm`` into a :class:`_Region` called ``name``; False
    where ``gm`` runs none of them."""
    region = _region_nodes(gm.graph, path)
    if not region:
        return False
    inside = set(region)
    for n in region:
        if _written_state(n) is not None:
            raise ValueError(
                f"Config(activation_checkpointing=...): {path!r} updates the buffer "
                f"{_written_state(n).target!r} in forward, which a recomputed forward would update "
                "twice; checkpoint the modules around it instead"
            )
    inputs = list(dict.fromkeys(a for n in region for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, a in enumerate(inputs):
        env[a] = sub.placeholder(f"in_{i}")
        env[a].meta = dict(a.meta)
    for n in region:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[o] for o in outputs))
    gm.add_submodule(name, _Region(fx.GraphModule(gm, sub, class_name="Recomputed"), path))
    # Order the outer graph with the region as one node: a stable topological sort.
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    key = min(index[n] for n in region)

    def unit(n: fx.Node) -> int:
        return key if n in inside else index[n]

    deps: dict[int, set[int]] = {}
    for n in nodes:
        deps.setdefault(unit(n), set()).update(unit(a) for a in n.all_input_nodes if unit(a) != unit(n))
    users: dict[int, list[int]] = {}
    for u, ds in deps.items():
        for d in ds:
            users.setdefault(d, []).append(u)
    waiting = {u: len(ds) for u, ds in deps.items()}
    ready = [u for u, c in waiting.items() if c == 0]
    heapq.heapify(ready)
    new = fx.Graph()
    out_env: dict[fx.Node, fx.Node] = {}
    emitted = 0
    while ready:
        u = heapq.heappop(ready)
        emitted += 1
        if u == key:
            call = new.call_module(name, tuple(out_env[a] for a in inputs))
            for k, o in enumerate(outputs):
                out_env[o] = new.call_function(operator.getitem, (call, k))
                if "val" in o.meta:  # no module path: a second pass over it finds nothing to outline
                    out_env[o].meta["val"] = o.meta["val"]
        else:
            n = nodes[u]
            out_env[n] = new.node_copy(n, lambda a: out_env[a])
        for v in users.get(u, ()):
            waiting[v] -= 1
            if waiting[v] == 0:
                heapq.heappush(ready, v)
    assert emitted == len(deps), "the outlined region left a cycle"  # convex by construction
    new.lint()
    gm.graph = new
    gm.recompile()
    return True


def checkpoint_graph(gm: fx.GraphModule, paths: Sequence[str]) -> int:
    """Outline each path's nodes of the stage ``gm`` into a checkpointed region, in place (outer
    paths first: a path inside one already outlined is recomputed with it). Returns the number
    of regions made."""
    made = 0
    for path in sorted(paths, key=lambda p: p.count(".")):
        name = _PREFIX + path.replace(".", "_")
        if hasattr(gm, name):
            continue  # outlined by an earlier build of the same stage
        made += _outline(gm, path, name)
    return made


def checkpoint_pass(stages: tuple[ProgramStage, ...], paths: Sequence[str]) -> tuple[ProgramStage, ...]:
    """The rewrite's checkpointing step on a rank's stages: each local stage module recomputes
    the modules ``paths`` (checked beforehand by :func:`check_checkpoint_paths`) in backward."""
    if not paths:
        return stages
    out = []
    for stage in stages:
        module = stage.module
        if module is None:
            out.append(stage)
        elif isinstance(module, fx.GraphModule) and any(NODE_INFO_KEY in n.meta for n in module.graph.nodes):
            checkpoint_graph(module, paths)
            out.append(stage)
        else:
            mine = [p for p in paths if _has_module(module, p)]
            missing = sorted(set(paths) - set(mine))
            if missing:
                raise ValueError(
                    f"Config(activation_checkpointing=...): this program's model has no module {missing}; "
                    "name modules of the model as parallelize runs it"
                )
            out.append(dataclasses.replace(stage, module=checkpoint_module(module, mine)))
    return tuple(out)


def _has_module(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True

