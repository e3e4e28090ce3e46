"""The five primitives of Whale and the scope stack they live on.

An annotation is a small immutable spec (``Replicate(device_count=2)``) that is also a context
manager. Entering it pushes it on a ``ContextVar`` stack; that stack is read in two places:

* when a submodule is registered on a parent (``self.blocks = ...`` inside ``__init__``), a
  registration hook tags the submodule with the stack (see :func:`module_annotations`);
* while the model is captured, every graph node created inside a ``with`` block in ``forward``
  carries the stack (see ``whale.capture``).

In eager mode nothing else happens: an annotated model is its own single-device reference.
Annotations compare by identity: two ``with wh.stage():`` blocks are two different stages.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "Annotation",
    "Pipeline",
    "Replicate",
    "Split",
    "Stage",
    "VirtualDevices",
    "cluster",
    "current_scope",
    "merge_stacks",
    "module_annotations",
    "pipeline",
    "replicate",
    "split",
    "stage",
    "validate_stack",
]

_SCOPE: contextvars.ContextVar[tuple[Annotation, ...]] = contextvars.ContextVar(
    "whale_scope", default=()
)
# Attribute under which a module keeps the annotations it was registered (or named) under.
_MODULE_ATTR = "_whale_annotations"
# Key under which torch.export keeps our stack in node.meta["custom"].
EXPORT_META_KEY = "whale_scope"
# Kinds that cannot nest inside themselves: a shard of a shard, a stage in a stage.
_NO_SELF_NESTING = ("split", "stage", "pipeline")


def current_scope() -> tuple[Annotation, ...]:
    """The annotations entered on this thread/task, outermost first."""
    return _SCOPE.get()


def _check_count(primitive: str, name: str, value: Any, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{primitive}({name}=...) takes a positive int{' or None' if allow_none else ''}, "
            f"got {type(value).__name__} {value!r}"
        )
    if value < 1:
        raise ValueError(f"{primitive}({name}={value}) must be >= 1")


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Annotation:
    """Base of the primitives: an immutable spec that is also a ``with`` scope."""

    kind: ClassVar[str] = ""
    _entered: list = dataclasses.field(default_factory=list, init=False, compare=False)

    def args(self) -> dict[str, Any]:
        """The user-visible arguments, for printing and for plans."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if not f.name.startswith("_")
        }

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.args().items() if v is not None)
        return f"{self.kind}({inner})"

    # Annotations are specs shared by identity; copying a module must not fork them.
    def __copy__(self) -> Annotation:
        return self

    def __deepcopy__(self, memo: dict) -> Annotation:
        return self

    def __enter__(self) -> Annotation:
        stack = _SCOPE.get()
        if any(a is self for a in stack):
            raise ValueError(f"{self!r} is already entered; create a new one for a nested scope")
        validate_stack(stack + (self,))
        _install_registration_hook()
        export_scope = _export_annotate(stack + (self,))
        if export_scope is not None:
            export_scope.__enter__()
        self._entered.append((_SCOPE.set(stack + (self,)), export_scope))
        return self

    def __exit__(self, *exc: object) -> None:
        token, export_scope = self._entered.pop()
        if export_scope is not None:
            export_scope.__exit__(*exc)
        _SCOPE.reset(token)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Replicate(Annotation):
    """Data parallel: each replica sees a slice of the batch; gradients are averaged by rows.

    ``device_count`` devices hold one copy each; when the world is larger, the remaining factor
    forms an outer data-parallel degree (Whale's nested replication).
    """

    kind: ClassVar[str] = "replicate"
    device_count: int | None = None

    def __post_init__(self) -> None:
        _check_count("replicate", "device_count", self.device_count)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Split(Annotation):
    """Tensor (operator) parallel: the annotated modules are sharded over ``device_count``."""

    kind: ClassVar[str] = "split"
    device_count: int | None = None

    def __post_init__(self) -> None:
        _check_count("split", "device_count", self.device_count)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Stage(Annotation):
    """One pipeline stage: the annotated part runs on its own virtual device."""

    kind: ClassVar[str] = "stage"


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Pipeline(Annotation):
    """The stages inside run as a pipeline over ``num_micro_batch`` micro-batches."""

    kind: ClassVar[str] = "pipeline"
    num_micro_batch: int | None = None

    def __post_init__(self) -> None:
        _check_count("pipeline", "num_micro_batch", self.num_micro_batch)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class VirtualDevices(Annotation):
    """How physical devices group into virtual devices for the parts inside (made by ``cluster()``).

    Not :class:`whale.ir.topology.Cluster`, which describes the physical machines.

    ``layout`` is ``"auto"`` (the planner decides), ``"node"`` (virtual devices never span
    nodes), or an explicit list of rank groups, e.g. ``[[0, 1], [2, 3]]``.
    """

    kind: ClassVar[str] = "cluster"
    layout: str | tuple[tuple[int, ...], ...] = "auto"

    def __post_init__(self) -> None:
        layout = self.layout
        if isinstance(layout, str):
            if layout not in ("auto", "node"):
                raise ValueError(
                    f"cluster(layout={layout!r}): use 'auto', 'node' or a list of rank groups "
                    "such as [[0, 1], [2, 3]]"
                )
            return
        if not isinstance(layout, Sequence) or not layout:
            raise TypeError(f"cluster(layout=...) takes 'auto', 'node' or rank groups, got {layout!r}")
        groups = []
        for group in layout:
            if (
                not isinstance(group, Sequence)
                or not group
                or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in group)
            ):
                raise TypeError(
                    f"cluster(layout=...): each group is a non-empty list of ranks >= 0, got {group!r}"
                )
            groups.append(tuple(group))
        flat = [r for g in groups for r in g]
        if len(flat) != len(set(flat)):
            raise ValueError(f"cluster(layout={layout!r}): a rank appears in two groups")
        object.__setattr__(self, "layout", tuple(groups))


def _factory(cls: type[Annotation], positional: tuple[str, ...]):
    fields = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]

    def make(*args: Any, **kwargs: Any) -> Annotation:
        if len(args) > len(positional):
            raise TypeError(
                f"{cls.kind}() takes at most {len(positional)} positional argument(s) "
                f"({', '.join(positional) or 'none'}), got {len(args)}"
            )
        unknown = sorted(set(kwargs) - set(fields))
        if unknown:
            raise TypeError(
                f"{cls.kind}() got unknown argument(s) {unknown}; it accepts {fields or 'none'}"
            )
        kwargs.update(zip(positional, args))
        return cls(**kwargs)

    make.__name__ = cls.kind
    make.__qualname__ = cls.kind
    make.__doc__ = cls.__doc__
    return make


replicate = _factory(Replicate, ("device_count",))
split = _factory(Split, ("device_count",))
stage = _factory(Stage, ())
pipeline = _factory(Pipeline, ("num_micro_batch",))
cluster = _factory(VirtualDevices, ("layout",))


def validate_stack(stack: Sequence[Annotation], where: str = "") -> None:
    """Reject nestings that have no meaning (a split in a split, a stage in a stage)."""
    at = f" at {where!r}" if where else ""
    for kind in _NO_SELF_NESTING:
        found = [a for a in stack if a.kind == kind]
        if len(found) > 1:
            why = "a module cannot be in two stages" if kind == "stage" else f"a {kind} cannot contain another {kind}"
            raise ValueError(
                f"{found[1]!r} is nested inside {found[0]!r}{at}: {why}; put them side by side instead"
            )
    kinds = [a.kind for a in stack]
    if "stage" in kinds and "pipeline" in kinds and kinds.index("pipeline") > kinds.index("stage"):
        raise ValueError(
            f"pipeline is nested inside stage{at}: stages go inside a pipeline, not the reverse"
        )


def merge_stacks(*stacks: Sequence[Annotation]) -> tuple[Annotation, ...]:
    """Concatenate stacks outer to inner, keeping the first occurrence of each annotation."""
    merged: list[Annotation] = []
    for stack in stacks:
        for a in stack:
            if not any(a is b for b in merged):
                merged.append(a)
    return tuple(merged)


def module_annotations(module: nn.Module) -> tuple[Annotation, ...]:
    """The annotations a module itself carries (registration scope, then names), outer first."""
    return module.__dict__.get(_MODULE_ATTR, ())


def add_module_annotations(module: nn.Module, annotations: Sequence[Annotation]) -> None:
    merged = merge_stacks(module_annotations(module), annotations)
    object.__setattr__(module, _MODULE_ATTR, merged)


def _on_module_registered(parent: nn.Module, name: str, submodule: nn.Module | None):
    stack = _SCOPE.get()
    if stack and submodule is not None:
        add_module_annotations(submodule, stack)


_hook_handle: list = []


def _install_registration_hook() -> None:
    # One process-wide hook; it does nothing unless a scope is entered on the calling context.
    if not _hook_handle:
        _hook_handle.append(
            torch.nn.modules.module.register_module_module_registration_hook(_on_module_registered)
        )


def _export_annotate(stack: tuple[Annotation, ...]):
    """Carry the stack into torch.export's node metadata (PT2 tracers ignore ContextVars)."""
    annotate = getattr(torch.fx.traceback, "annotate", None)
    if annotate is None:
        return None
    return annotate({EXPORT_META_KEY: stack})
