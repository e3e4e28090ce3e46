"""How a model's inputs reach a captured graph, and how the graph's outputs become the model's.

A user calls ``model(*args, **kwargs)`` and gets an output object (a tensor, a dict, a
transformers ``CausalLMOutputWithPast``). A captured graph has flat placeholders and, at the
output node, a pytree of values. :class:`GraphIO` records both sides at capture time so that a
pass which cuts the graph (a pipeline's first and last stage) can feed the flat graph from the
user's inputs and hand the user the object the model returns:

- ``flatten_inputs(args, kwargs)``: the value of every placeholder, in graph order;
- ``unflatten_output(flat)``: the model's output object from the output node's leaves.

The helpers bind example inputs to ``forward``'s signature (keyword inputs, ``None``
for optional ones) and say what export needs: keyword inputs capture sets on the user's behalf
(``use_cache=False``) and the dynamic batch dimension of each tensor input.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_map, tree_unflatten

__all__ = [
    "GraphIO",
    "batch_dynamic_shapes",
    "call_layout",
    "check_inputs",
    "export_graph_io",
    "forward_signature",
    "input_mismatch",
    "fx_graph_io",
    "positional_names",
    "rows_of",
    "split_example_inputs",
    "training_defaults",
]

# Keyword inputs whose default serves inference, not training: capture sets them when forward
# has the parameter and the user left it out. transformers' use_cache=True returns a
# DynamicCache, which torch.export cannot return and training never reads.
_TRAINING_DEFAULTS: Mapping[str, object] = {"use_cache": False}


def forward_signature(model: nn.Module) -> inspect.Signature | None:
    """``inspect.signature(model.forward)``, or None for a forward Python cannot inspect."""
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def split_example_inputs(
    model: nn.Module, example_inputs: object, where: str, extra_kwargs: Mapping[str, object] | None = None
) -> tuple[tuple, dict]:
    """``example_inputs`` as ``(args, kwargs)``, checked against ``forward``'s signature.

    A tensor is one positional input, a tuple or list the positional inputs, a dict the keyword
    inputs (``None`` values stand for optional inputs left out); ``extra_kwargs`` adds keyword
    inputs before the check.

    Raises:
        TypeError: ``example_inputs`` is none of these.
        ValueError: the inputs do not fit ``forward`` (naming the bad keyword and forward's
            parameters).

    Example::

        args, kwargs = split_example_inputs(model, {"input_ids": x, "attention_mask": m}, "capture")
    """
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, Mapping):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{where}: keyword inputs are named by strings, got keys {bad!r}")
        args, kwargs = (), dict(example_inputs)
    else:
        raise TypeError(
            f"{where}: example_inputs is a tensor, a tuple of forward's positional inputs or a "
            f"dict of its keyword inputs, got {type(example_inputs).__name__}"
        )
    kwargs = {**kwargs, **(extra_kwargs or {})}
    check_inputs(model, args, kwargs, where)
    return args, kwargs


def check_inputs(model: nn.Module, args: tuple, kwargs: Mapping[str, object], where: str) -> None:
    """Raise a ValueError naming the culprit when ``(args, kwargs)`` do not fit ``forward``."""
    sig = forward_signature(model)
    if sig is None:  # a builtin forward: let the tracers judge
        return
    reason = input_mismatch(sig, type(model).__name__, args, kwargs, what="example inputs")
    if reason is not None:
        raise ValueError(f"{where}: {reason}")


def input_mismatch(
    sig: inspect.Signature, model_name: str, args: tuple, kwargs: Mapping[str, object], *, what: str = "inputs"
) -> str | None:
    """Why ``(args, kwargs)`` do not fit ``forward``'s ``sig`` (None when they do): a keyword it
    does not take, named with forward's parameters (a ``**kwargs: Unpack[SomeTypedDict]``, as
    transformers writes, takes only that dict's keys), or a call that does not bind."""
    params = sig.parameters
    shown = f"{model_name}.forward{_short_signature(sig)}"
    named = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY)}
    var_kw = next((p for p in params.values() if p.kind == p.VAR_KEYWORD), None)
    allowed_extra = _typed_kwargs(var_kw)
    for key in kwargs:
        if key in named:
            continue
        if var_kw is not None and (allowed_extra is None or key in allowed_extra):
            continue
        extra = f" (its **{var_kw.name} takes {sorted(allowed_extra)})" if var_kw is not None else ""
        return f"keyword input {key!r} is not a parameter of {shown}{extra}; name the inputs as forward does"
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        return f"{what} do not fit {shown}: {exc}"
    return None


def training_defaults(model: nn.Module, args: tuple, kwargs: Mapping[str, object]) -> dict[str, object]:
    """Keyword inputs capture sets because forward has them and the user left them out.

    Today only ``use_cache=False``: transformers models default to returning a cache, which
    training does not need and ``torch.export`` cannot return.
    """
    sig = forward_signature(model)
    if sig is None:
        return {}
    try:
        given = sig.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return {}
    return {
        name: value
        for name, value in _TRAINING_DEFAULTS.items()
        if name in sig.parameters
        and sig.parameters[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and name not in given
    }


def positional_names(sig: inspect.Signature | None, args: tuple) -> tuple[str, ...]:
    """forward's parameters that ``args`` fill, in order (``*args`` by its name)."""
    if sig is None:
        return ()
    return tuple(sig.bind_partial(*args).arguments)


def call_layout(
    sig: inspect.Signature | None, positional: tuple[str, ...], args: tuple, kwargs: Mapping[str, object]
) -> tuple[tuple, dict]:
    """``(args, kwargs)`` rearranged so that the parameters in ``positional`` are passed by
    position and every other input by keyword, as the example was.

    ``model(x)`` and ``model(input_ids=x)`` are one call; an exported graph's input spec
    records only the spelling of the example, so each call is brought to it.
    """
    if sig is None:
        return tuple(args), dict(kwargs)
    bound = sig.bind(*args, **kwargs).arguments
    out_args: list = []
    for name in positional:
        param = sig.parameters[name]
        if param.kind == param.VAR_POSITIONAL:
            out_args.extend(bound.get(name, ()))
        elif name in bound:
            out_args.append(bound[name])
        elif param.default is not param.empty:
            out_args.append(param.default)
        else:  # the example passed it, this call did not: the spec check names the difference
            break
    out_kwargs: dict = {}
    for name, value in bound.items():
        if name in positional:
            continue
        if sig.parameters[name].kind == inspect.Parameter.VAR_KEYWORD:
            out_kwargs.update(value)
        else:
            out_kwargs[name] = value
    return tuple(out_args), out_kwargs


def batch_dynamic_shapes(
    sig: inspect.Signature | None,
    args: tuple,
    kwargs: Mapping[str, object],
    batch_dim: int,
    rows: int,
    dim: object = None,
) -> tuple[object, tuple[str, ...]]:
    """``dynamic_shapes`` for ``torch.export.export``: ``dim`` (default ``Dim.AUTO``) on
    ``batch_dim`` of every tensor input with ``rows`` rows there, and the names of those inputs.

    The spec mirrors how export binds inputs: by forward's parameter names, ``**kwargs``
    contents nested under its name, ``*args`` as a tuple.
    """
    marked: list[str] = []

    def spec(path: str):
        def leaf(v):
            if isinstance(v, torch.Tensor) and v.dim() > batch_dim and v.shape[batch_dim] == rows:
                marked.append(path)
                return {batch_dim: torch.export.Dim.AUTO if dim is None else dim}
            return None

        return leaf

    if sig is None:
        return tuple(tree_map(spec(f"args[{i}]"), a) for i, a in enumerate(args)), tuple(marked)
    bound = sig.bind(*args, **kwargs).arguments
    shapes: dict[str, object] = {}
    for name, value in bound.items():
        kind = sig.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: tree_map(spec(k), v) for k, v in value.items()}
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(tree_map(spec(f"{name}[{i}]"), v) for i, v in enumerate(value))
        else:
            shapes[name] = tree_map(spec(name), value)
    return shapes, tuple(marked)


@dataclasses.dataclass(frozen=True)
class GraphIO:
    """The model's inputs and output on one side, the captured graph's on the other.

    Attributes:
        frontend: ``"fx"`` or ``"export"``.
        signature: ``forward``'s signature (None when Python cannot inspect it).
        defaults: keyword inputs capture set because the user left them out (``use_cache=False``);
            every later call gets them too.
        in_spec: export: the pytree of ``(args, kwargs)`` the graph was exported with.
        placeholders: fx: the forward parameter behind each placeholder, in graph order.
        specialised: fx: non-tensor inputs fixed at capture (``None`` masks, flags) by name.
        constants: export: (position among the flat inputs, value) of each non-tensor input;
            the graph was specialised to these values.
        positional: export: the parameters the example passed by position; other inputs go
            by keyword, however a later call spells them.
        out_spec: the pytree of the graph's output node; its leaves are the flat outputs.
    """

    frontend: str
    signature: inspect.Signature | None
    defaults: Mapping[str, object]
    out_spec: TreeSpec
    in_spec: TreeSpec | None = None
    placeholders: tuple[str, ...] = ()
    specialised: Mapping[str, object] = dataclasses.field(default_factory=dict)
    constants: tuple[tuple[int, object], ...] = ()
    positional: tuple[str, ...] = ()

    def flatten_inputs(self, args: tuple, kwargs: Mapping[str, object]) -> tuple:
        """The value of each placeholder of the graph, in order, for ``model(*args, **kwargs)``.

        Raises:
            ValueError: the inputs do not fit ``forward``, or differ in layout from the
                example the graph was captured with (an input added, missing, or a non-tensor
                input the graph fixed given another value).
        """
        kwargs = {**self.defaults, **kwargs}
        if self.frontend == "export":
            return self._flatten_exported(tuple(args), kwargs)
        return self._flatten_traced(tuple(args), kwargs)

    def unflatten_output(self, flat: Sequence[Any]) -> Any:
        """The model's output object from the graph's flat outputs (``tree_leaves`` of what the
        output node returns; for an exported graph, its output tuple)."""
        flat = list(flat)
        if len(flat) != self.out_spec.num_leaves:
            raise ValueError(
                f"unflatten_output: the graph returns {self.out_spec.num_leaves} values, got {len(flat)}"
            )
        return tree_unflatten(flat, self.out_spec)

    def _flatten_exported(self, args: tuple, kwargs: dict) -> tuple:
        try:
            args, kwargs = call_layout(self.signature, self.positional, args, kwargs)
        except TypeError as exc:
            raise ValueError(f"flatten_inputs: inputs do not fit forward{self.signature}: {exc}") from None
        keys = list(self.in_spec.child(1).context)
        # An optional input left at its default is the same call whether spelled out or not.
        params = self.signature.parameters if self.signature is not None else {}
        for k in keys:
            if k not in kwargs and k in params and params[k].default is not inspect.Parameter.empty:
                kwargs[k] = params[k].default
        dropped = {k: v for k, v in kwargs.items() if k not in keys and self._is_default(k, v)}
        kwargs = {k: kwargs[k] for k in keys if k in kwargs} | {
            k: v for k, v in kwargs.items() if k not in keys and k not in dropped
        }
        flat, spec = tree_flatten((args, kwargs))
        if spec != self.in_spec:
            raise ValueError(
                f"flatten_inputs: the graph was captured from {_layout(self.in_spec)}, got "
                f"{_layout(spec)}; call with the inputs the example had (a None where the example "
                "had a tensor, or the reverse, changes the graph's inputs too)"
            )
        names = _leaf_names(spec)
        for i, fixed in self.constants:
            if not _same_constant(flat[i], fixed):
                raise ValueError(
                    f"flatten_inputs: the graph was exported with {names[i]}={fixed!r} (export "
                    f"fixes non-tensor inputs); got {names[i]}={flat[i]!r}"
                )
        return tuple(flat)

    def _flatten_traced(self, args: tuple, kwargs: dict) -> tuple:
        if self.signature is None:
            return (*args, *kwargs.values())
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise ValueError(f"flatten_inputs: inputs do not fit forward{self.signature}: {exc}") from None
        bound.apply_defaults()
        values = bound.arguments
        for name, fixed in self.specialised.items():
            if not _same_constant(values.get(name), fixed):
                raise ValueError(
                    f"flatten_inputs: the graph was captured with {name}={fixed!r} (fx fixes "
                    f"non-tensor inputs at capture); got {name}={values.get(name)!r}"
                )
        return tuple(values[name] for name in self.placeholders)

    def _is_default(self, name: str, value: object) -> bool:
        if value is None:
            return True
        param = self.signature.parameters.get(name) if self.signature is not None else None
        return param is not None and not isinstance(value, torch.Tensor) and _same_constant(value, param.default)


def fx_graph_io(
    gm: torch.fx.GraphModule,
    sig: inspect.Signature | None,
    bound: Mapping[str, object] | None,
    specialised: Mapping[str, object],
    defaults: Mapping[str, object],
) -> GraphIO:
    """The GraphIO of an fx-traced graph: one placeholder per forward parameter, in order."""
    names = tuple(p for p in sig.parameters) if sig is not None and bound is not None else ()
    count = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if len(names) != count:
        names = ()  # forward takes *args/**kwargs: fed positionally
    out = gm.graph.output_node().args[0]
    _, out_spec = tree_flatten(out)
    return GraphIO("fx", sig if names else None, dict(defaults), out_spec, None, names, dict(specialised))


def export_graph_io(
    gm: torch.fx.GraphModule,
    sig: inspect.Signature | None,
    defaults: Mapping[str, object],
    example: tuple[tuple, dict],
) -> GraphIO:
    """The GraphIO of ``ExportedProgram.module()`` (its codegen holds the input and output
    specs), exported from ``example`` = ``(args, kwargs)``."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    placeholders = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if info is None or info.in_spec is None or info.out_spec is None or placeholders != info.in_spec.num_leaves:
        raise RuntimeError(
            "whale could not read the input/output pytree of torch.export's module; this is a "
            f"whale bug, please report it with your torch version ({torch.__version__})"
        )
    flat = tree_leaves(example)
    constants = tuple((i, v) for i, v in enumerate(flat) if not isinstance(v, torch.Tensor))
    positional = positional_names(sig, example[0])
    return GraphIO("export", sig, dict(defaults), info.out_spec, info.in_spec, constants=constants, positional=positional)


def rows_of(args: tuple, kwargs: Mapping[str, object], dim: int) -> int | None:
    """Rows on ``dim`` of the first tensor input with that dimension (positional first)."""
    for v in tree_leaves((tuple(args), dict(kwargs))):
        if isinstance(v, torch.Tensor) and v.dim() > dim:
            return int(v.shape[dim])
    return None


def _same_constant(a: object, b: object) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # an object whose == does not give a bool
        return False


def _leaf_names(spec: TreeSpec) -> list[str]:
    """A readable name per leaf of an ``(args, kwargs)`` spec: ``args[0]``, ``use_cache``, ``mask[1]``."""
    dummy = tree_unflatten(list(range(spec.num_leaves)), spec)
    names = [""] * spec.num_leaves
    for i, v in enumerate(dummy[0]):
        for j in tree_leaves(v):
            names[j] = f"args[{i}]"
    for k, v in dummy[1].items():
        for j in tree_leaves(v):
            names[j] = k
    return names


def _layout(spec: TreeSpec) -> str:
    return f"{spec.child(0).num_children} positional inputs and keyword inputs {list(spec.child(1).context)}"


def _typed_kwargs(var_kw: inspect.Parameter | None) -> frozenset[str] | None:
    """The keys a ``**kwargs: Unpack[SomeTypedDict]`` takes; None when any key goes."""
    if var_kw is None:
        return None
    ann = var_kw.annotation
    if typing.get_origin(ann) is not typing.Unpack:
        return None
    (td,) = typing.get_args(ann)
    if not typing.is_typeddict(td):
        return None
    return frozenset(td.__required_keys__ | td.__optional_keys__)


def _short_signature(sig: inspect.Signature) -> str:
    """``(input_ids, attention_mask=None, ..., **kwargs)``: names and defaults, no annotations."""
    parts = []
    for p in sig.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
        elif p.kind == p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        elif p.default is inspect.Parameter.empty:
            parts.append(p.name)
        else:
            parts.append(f"{p.name}={p.default!r}")
    return f"({', '.join(parts)})"
