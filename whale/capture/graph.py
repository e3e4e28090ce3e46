"""capture(): an annotated model -> a frozen CapturedModel (graph, annotations and costs per node)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..primitives.annotations import (
    Annotation,
    current_scope,
    merge_stacks,
    module_annotations,
    validate_stack,
)
from .draws import kept_random_states
from .errors import CaptureError, describe_failure, is_whale_usage_error
from .frontends import Trace, trace_export, trace_fx
from .graph_io import GraphIO, split_example_inputs, training_defaults
from .model_state import config_without_cache, preserved_state

__all__ = ["CapturedModel", "NodeInfo", "capture", "module_annotation_map"]

_FRONTENDS = {"fx": trace_fx, "export": trace_export}
# Key under which each graph node keeps its NodeInfo, for passes that walk the graph.
NODE_INFO_KEY = "whale_node_info"


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """One graph node: where it lives, how it is annotated, what it costs (forward only).

    Backward FLOPs are conventionally 2x forward (one matmul for the input gradient, one for
    the weight gradient; Kaplan et al. 2020), so the planner multiplies, capture does not.
    """

    name: str
    op: str
    target: str  # aten op or qualified function name; module path for call_module
    module_path: str  # innermost owning module ("" = root)
    annotations: tuple[Annotation, ...]  # outer -> inner
    shapes: tuple[tuple[int, ...], ...]  # one per tensor output (tuple outputs flattened)
    dtypes: tuple[str, ...]
    flops: int
    bytes_accessed: int
    param_bytes: int  # parameters this node owns (call_module / get_attr), 0 otherwise
    output_bytes: int  # fresh activation memory; views and in-place results add none
    buffer_bytes: int = 0  # buffers this node owns (BatchNorm statistics, causal masks)
    param_names: tuple[str, ...] = ()  # canonical names of the parameters it owns


@dataclasses.dataclass(frozen=True)
class CapturedModel:
    """The traced program with a :class:`NodeInfo` per node, in graph order.

    ``param_bytes_by_name`` holds every parameter the graph owns once, by canonical name, so
    tied weights (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) count once.

    ``io`` says how the model's inputs map onto the graph's placeholders and the graph's
    outputs back onto the model's output object (:meth:`flatten_inputs`,
    :meth:`unflatten_output`). ``fixed_rows`` is None when the graph runs on any number of rows
    (fx graphs; exported graphs with a dynamic batch dimension), else the only row count it
    takes. ``input_defaults`` are keyword inputs capture set because forward has them and the
    user left them out (``use_cache=False``: training needs no cache); every call gets them.
    """

    graph_module: torch.fx.GraphModule
    frontend: str  # "fx" or "export"
    nodes: tuple[NodeInfo, ...]
    param_bytes_by_name: Mapping[str, int] = dataclasses.field(default_factory=dict)
    io: GraphIO | None = None
    fixed_rows: int | None = None

    @property
    def input_defaults(self) -> Mapping[str, object]:
        """Keyword inputs capture set for the user (``{"use_cache": False}``), else empty."""
        return dict(self.io.defaults) if self.io is not None else {}

    def flatten_inputs(self, args: tuple, kwargs: Mapping[str, object]) -> tuple:
        """The values of the graph's placeholders, in graph order, for ``model(*args, **kwargs)``.

        What the flat graph takes (``torch.fx.Interpreter(graph_module).run(*flat)``, or a
        pipeline's first stage): for an exported graph the pytree leaves of the inputs in the
        layout it was exported with, ``input_defaults`` added; for fx the bound forward argument
        of each placeholder, defaults applied. Positional and keyword spellings of one input are
        the same call.

        Raises:
            ValueError: the inputs do not fit forward or the example's layout (an input the
                example did not have, one it had missing, a fixed non-tensor input changed).

        Example::

            flat = captured.flatten_inputs((), {"input_ids": x, "attention_mask": m})
            out = captured.unflatten_output(torch.fx.Interpreter(captured.graph_module).run(*flat))
        """
        if self.io is None:  # a graph made by a pass, not by capture: fed positionally
            return (*args, *kwargs.values())
        return self.io.flatten_inputs(tuple(args), dict(kwargs))

    def unflatten_output(self, flat: Sequence[Any]) -> Any:
        """The model's output object (a tensor, a dict, ``CausalLMOutputWithPast`` with
        ``.logits``, ...) from the graph's flat outputs.

        ``flat`` is ``torch.utils._pytree.tree_leaves`` of what the graph's output node returns:
        an exported graph's output tuple as it is; for fx, whose output node already holds the
        model's structure, the leaves of it (a single tensor output is ``(tensor,)``).

        Raises:
            ValueError: ``flat`` has another number of values than the graph returns.
        """
        if self.io is None:
            return flat[0] if len(flat) == 1 else tuple(flat)
        return self.io.unflatten_output(flat)

    @property
    def total_flops(self) -> int:
        """Forward FLOPs of one call on the example inputs."""
        return sum(n.flops for n in self.nodes)

    @property
    def total_param_bytes(self) -> int:
        """Bytes of the distinct parameters the graph uses."""
        return sum(self.param_bytes_by_name.values())

    def node(self, name: str) -> NodeInfo:
        """The node called ``name`` (``KeyError`` naming close matches if absent)."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r}; nodes are e.g. {[n.name for n in self.nodes[:8]]}")

    def by_module(self, path: str) -> tuple[NodeInfo, ...]:
        """Nodes owned by the module at ``path`` or any module inside it (``""``: all)."""
        if not path:
            return self.nodes
        return tuple(
            n for n in self.nodes if n.module_path == path or n.module_path.startswith(path + ".")
        )

    def annotations_used(self) -> tuple[Annotation, ...]:
        """Distinct annotations on any node, in order of first appearance."""
        return merge_stacks(*(n.annotations for n in self.nodes))

    def summary(self, depth: int = 2) -> str:
        """A short table: nodes, forward FLOPs, parameter and activation bytes per module.

        Modules are grouped by the first ``depth`` parts of their path, in graph order.
        """
        groups: dict[str, list[NodeInfo]] = {}
        for n in self.nodes:
            key = ".".join(n.module_path.split(".")[:depth]) if n.module_path else "(root)"
            groups.setdefault(key, []).append(n)
        act_bytes = sum(n.output_bytes for n in self.nodes)
        flop_unit, flop_scale = _unit(self.total_flops, ("FLOP", "KFLOP", "MFLOP", "GFLOP", "TFLOP"), 1000)
        byte_unit, byte_scale = _unit(
            max(self.total_param_bytes, act_bytes), ("B", "KiB", "MiB", "GiB", "TiB"), 1024
        )
        head = (
            f"captured with {self.frontend}: {len(self.nodes)} nodes, "
            f"{self.total_flops / flop_scale:.2f} {flop_unit} forward, "
            f"{self.total_param_bytes / byte_scale:.2f} {byte_unit} parameters, "
            f"{act_bytes / byte_scale:.2f} {byte_unit} activations"
        )
        if self.input_defaults:
            set_ = ", ".join(f"{k}={v!r}" for k, v in self.input_defaults.items())
            head += f"; with {set_} (set by capture: training needs no cache)"
        if self.fixed_rows is not None:
            head += f"; batch fixed at {self.fixed_rows} rows"
        rows = [("module", "nodes", flop_unit, f"param {byte_unit}", f"act {byte_unit}", "annotations")]
        for key, group in groups.items():
            rows.append(
                (
                    key,
                    str(len(group)),
                    f"{sum(n.flops for n in group) / flop_scale:.2f}",
                    f"{sum(n.param_bytes for n in group) / byte_scale:.2f}",
                    f"{sum(n.output_bytes for n in group) / byte_scale:.2f}",
                    ", ".join(map(repr, merge_stacks(*(n.annotations for n in group)))) or "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [head]
        for r in rows:
            cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:5], widths[1:5])]
            lines.append("  ".join([*cells, r[5]]).rstrip())
        return "\n".join(lines)


def capture(
    model: nn.Module,
    example_inputs: object,
    *,
    frontend: str = "auto",
    example_kwargs: Mapping[str, object] | None = None,
    batch_dim: int | None = 0,
) -> CapturedModel:
    """Trace ``model`` into a graph whose nodes carry whale annotations, shapes and costs.

    Nothing real is allocated: values are fake tensors, so a model built on
    ``torch.device("meta")`` is captured from the shapes of its parameters alone.

    Args:
        model: the (possibly annotated) model.
        example_inputs: a tensor (the one positional input), a tuple of ``forward``'s
            positional inputs, or a dict of its keyword inputs (``None`` for an optional input
            left out).
        frontend: ``"fx"`` (symbolic tracing; torch.nn layers stay ``call_module``),
            ``"export"`` (``torch.export``, aten-level nodes), or ``"auto"``: fx, then export.
        example_kwargs: more keyword inputs of ``forward``.
        batch_dim: the batch dimension of the tensor inputs; export keeps it dynamic so the
            graph runs on any number of rows (None: export the example's shapes as they are).

    When forward has a ``use_cache`` parameter the example leaves out (transformers models),
    capture sets ``use_cache=False``: training needs no cache, and the cache object the default
    returns cannot be exported. ``CapturedModel.input_defaults`` records it and
    ``flatten_inputs`` adds it to every call. The model itself is never changed: a forward that
    updates buffers runs on a snapshot that is restored, and is captured by export, which
    records the updates in the graph.

    Returns:
        A frozen :class:`CapturedModel`.

    Raises:
        CaptureError: no front end could trace the forward; the message points at the line.
        ValueError: the example inputs do not fit forward (naming the keyword), an annotation
            nesting is illegal at some module (a split inside a split), or capture was called
            inside a whale scope.

    Example::

        captured = capture(model, (torch.randint(0, 64, (2, 16)),))
        print(captured.summary())
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture() takes an nn.Module, got {type(model).__name__}")
    if frontend not in ("auto", *_FRONTENDS):
        raise ValueError(f"capture(frontend={frontend!r}): use 'auto', 'fx' or 'export'")
    where = f"capture({type(model).__name__})"
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise TypeError(
            f"capture(example_kwargs=...) takes a dict of forward's keyword arguments, "
            f"got {type(example_kwargs).__name__}"
        )
    args, kwargs = split_example_inputs(model, example_inputs, where, example_kwargs)
    defaults = training_defaults(model, args, kwargs)
    kwargs = {**kwargs, **defaults}

    if current_scope():
        # Tracing registers modules; under an open scope that would tag the user's modules.
        raise ValueError(
            f"capture({type(model).__name__}) was called inside `with {current_scope()[-1]!r}:`; "
            "scopes go around module construction or inside forward. Call capture() (and "
            "wh.parallelize) outside any whale scope."
        )
    failures = []
    for name in ("fx", "export") if frontend == "auto" else (frontend,):
        try:
            with preserved_state(model), config_without_cache(model, kwargs), kept_random_states(_cuda_devices(model)):
                trace = _FRONTENDS[name](model, args, kwargs, defaults, batch_dim)
            break
        except Exception as exc:  # any tracer failure: try the next front end, then report all
            if is_whale_usage_error(exc):
                # The user's scopes are wrong whatever the tracer: say where, and stop.
                raise type(exc)(f"{exc}\n{describe_failure(name, exc, model).where()}") from exc
            failures.append((describe_failure(name, exc, model), exc))
    else:
        raise CaptureError.from_failures(model, tuple(f for f, _ in failures)) from failures[-1][1]
    return _assemble(model, trace)


def _cuda_devices(model: nn.Module) -> list[int]:
    """The CUDA devices holding the model's tensors, whose generators its eager runs draw from."""
    held = {t.device for t in [*model.parameters(), *model.buffers()] if t.device.type == "cuda"}
    return sorted({torch.cuda.current_device() if d.index is None else d.index for d in held})


def module_annotation_map(model: nn.Module) -> dict[str, tuple[Annotation, ...]]:
    """Every module name of ``named_modules()`` -> its merged annotations, root first.

    This is what data parallel needs, and it needs no graph.

    Example::

        module_annotation_map(model)["h.0.attn"]   # (replicate(),)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"module_annotation_map() takes an nn.Module, got {type(model).__name__}")
    stack_of = _StackOf(model)
    return {name: stack_of(name) for name, _ in model.named_modules()}


class _StackOf:
    """Merged module annotations along a path, memoised per prefix."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._cache: dict[str, tuple[Annotation, ...]] = {"": merge_stacks(module_annotations(model))}

    def __call__(self, path: str) -> tuple[Annotation, ...]:
        if path not in self._cache:
            parent = path.rpartition(".")[0]
            own = module_annotations(self._model.get_submodule(path))
            self._cache[path] = merge_stacks(self(parent), own)
        return self._cache[path]


def _assemble(model: nn.Module, trace: Trace) -> CapturedModel:
    stack_of = _StackOf(model)
    infos = []
    param_bytes_by_name: dict[str, int] = {}
    state = dict(model.named_parameters())
    for node in trace.graph_module.graph.nodes:
        path = trace.module_paths[node.name]
        stack = merge_stacks(stack_of(path), _forward_scope(node, trace.forward_scopes))
        validate_stack(stack, where=path or "<root>")
        cost = trace.costs[node.name]
        info = NodeInfo(
            name=node.name,
            op=node.op,
            target=_target_name(node.target),
            module_path=path,
            annotations=stack,
            shapes=cost.shapes,
            dtypes=cost.dtypes,
            flops=cost.flops,
            bytes_accessed=cost.bytes_accessed,
            param_bytes=cost.param_bytes,
            output_bytes=cost.output_bytes,
            buffer_bytes=cost.buffer_bytes,
            param_names=cost.param_names,
        )
        node.meta[NODE_INFO_KEY] = info
        infos.append(info)
        for pname in cost.param_names:
            param_bytes_by_name[pname] = state[pname].numel() * state[pname].element_size()
    return CapturedModel(
        trace.graph_module, trace.frontend, tuple(infos), param_bytes_by_name, trace.io, trace.fixed_rows
    )


def _forward_scope(
    node: torch.fx.Node, scopes: Mapping[str, tuple[Annotation, ...]]
) -> tuple[Annotation, ...]:
    """The forward scopes around a node; for state (get_attr), those shared by all its uses.

    fx creates a get_attr where a tensor is first touched and export hoists them to the top
    of the graph, so neither position means anything; the uses do, on both front ends.
    """
    if node.op != "get_attr" or not node.users:
        return scopes[node.name]
    common = list(scopes[next(iter(node.users)).name])
    for user in node.users:
        theirs = scopes[user.name]
        while common and (len(theirs) < len(common) or any(a is not b for a, b in zip(common, theirs))):
            common.pop()
    return tuple(common)


def _target_name(target: object) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)  # "aten.linear.default"
    try:
        return torch.fx.node._get_qualified_name(target)  # "torch.nn.functional.gelu"
    except Exception:  # a lambda or a callable object fx cannot name
        return str(target)


def _unit(value: float, names: tuple[str, ...], base: int) -> tuple[str, float]:
    """The largest unit in which ``value`` is at least 1, and its scale."""
    scale, i = 1.0, 0
    while i + 1 < len(names) and value >= scale * base:
        scale, i = scale * base, i + 1
    return names[i], scale
