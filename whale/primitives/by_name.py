"""Annotating a model from outside, by module name, for models whose source you cannot edit."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

from torch import nn

from .annotations import Annotation, add_module_annotations, merge_stacks, module_annotations, validate_stack

__all__ = ["annotate"]


def annotate(
    model: nn.Module, annotations: Mapping[str, Annotation | Sequence[Annotation]]
) -> nn.Module:
    """Attach primitives to submodules of ``model`` by their names (as in ``named_modules()``).

    The annotation applies to the named module and everything inside it, exactly as if the
    module had been constructed inside ``with annotation:``. ``""`` names the model itself.
    Several annotations for one name are given outermost first.

    Example::

        model = transformers.GPT2LMHeadModel(cfg)
        wh.annotate(model, {"transformer": wh.replicate(), "lm_head": wh.split(2)})

    Returns:
        ``model`` itself, annotated in place.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"annotate() takes an nn.Module, got {type(model).__name__}")
    if not isinstance(annotations, Mapping):
        raise TypeError(
            "annotate(model, annotations) takes a mapping of module name -> annotation, "
            f"e.g. {{'encoder': wh.replicate()}}; got {type(annotations).__name__}"
        )
    modules = dict(model.named_modules())
    pending: dict[str, tuple[Annotation, ...]] = {}
    for name, value in annotations.items():
        if not isinstance(name, str):
            raise TypeError(f"annotate(): module names are strings, got {name!r}")
        if name not in modules:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(
                f"annotate(): {type(model).__name__} has no submodule named {name!r}{hint} "
                "(names are those of model.named_modules(); '' is the model itself)"
            )
        stack = (value,) if isinstance(value, Annotation) else tuple(value) if isinstance(value, Sequence) else None
        if not stack or not all(isinstance(a, Annotation) for a in stack):
            raise TypeError(
                f"annotate(): the value for {name!r} must be a primitive such as wh.replicate() "
                f"or a list of them, got {value!r}"
            )
        pending[name] = stack
    # Validate what each module ends up under, this call's other names included, before any
    # module is touched: nothing is half-applied on error.
    for name in modules:
        validate_stack(_enclosing(name, modules, pending), where=name)
    for name, stack in pending.items():
        add_module_annotations(modules[name], stack)
    return model


def _enclosing(
    name: str, modules: Mapping[str, nn.Module], pending: Mapping[str, tuple[Annotation, ...]]
) -> tuple[Annotation, ...]:
    """The annotations the module at ``name`` would sit under, outer first."""
    parts = name.split(".") if name else []
    stacks = []
    for i in range(len(parts) + 1):
        prefix = ".".join(parts[:i])
        stacks += [module_annotations(modules[prefix]), pending.get(prefix, ())]
    return merge_stacks(*stacks)
