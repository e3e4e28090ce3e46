"""Choices the user fixed: the search keeps them and chooses only the rest.

Alpa lets a user fix any planning choice (Auto / Manual / Uniform stage options); whale reads
the same from what the user already wrote:

=========================  ============================================================
pin                        from
=========================  ============================================================
``tensor_parallel``        ``split(device_count=k)``; ``split()`` leaves the degree open
``pipeline_degree``        ``Config(pipeline_degree)``
``num_stages``, ``cuts``   ``stage()`` annotations or ``Config(stage_boundaries)``
``num_micro_batch``        ``pipeline(num_micro_batch)`` or ``Config(num_micro_batch != 1)``
``schedule``               ``Config(schedule != "1f1b")``
``row_weights``            ``Config(row_weights)``: also fixes the data-parallel degree
``replica_group``          ``replicate(device_count=k)``: replicas come in groups of ``k``
``replica_groups``         ``cluster(layout=[[...], ...])`` or ``cluster(layout="node")``
=========================  ============================================================

A ``Config`` field at its default pins nothing (the search may pick that value anyway). Pins
that contradict each other are reported together, with where each came from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from ...config import Config
from ...primitives import Annotation, Pipeline, Replicate, Split, VirtualDevices
from ..annotated.replicas import distinct_annotations
from ...ir.schedule import SCHEDULE_NAMES

__all__ = ["Pins", "pins_from"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pins:
    """What the search must keep; None leaves a choice open.

    Example::

        Pins(pipeline_degree=2, num_micro_batch=8, sources={"pipeline_degree": "--pipeline-degree"})
    """

    tensor_parallel: int | None = None
    needs_tensor_parallel: bool = False
    """A ``split()`` without a count: the degree is open but must be at least 2."""
    pipeline_degree: int | None = None
    num_stages: int | None = None
    cuts: tuple[int, ...] | None = None
    """First layer of pinned stages 1.. (set by the caller once layers are known)."""
    num_micro_batch: int | None = None
    schedule: str | None = None
    row_weights: tuple[float, ...] | None = None
    replica_group: int | None = None
    replica_groups: tuple[tuple[int, ...], ...] | str | None = None
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Where each pin came from, for messages (``"Config(pipeline_degree=2)"``)."""

    def __post_init__(self) -> None:
        if self.schedule is not None and self.schedule not in SCHEDULE_NAMES:
            raise ValueError(f"unknown pipeline schedule {self.schedule!r}; use one of {list(SCHEDULE_NAMES)}")
        for name in ("tensor_parallel", "pipeline_degree", "num_stages", "num_micro_batch", "replica_group"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{self.where(name)}: {name} must be an int >= 1, got {value!r}")
        self.check()

    def where(self, name: str) -> str:
        """How the user wrote pin ``name``."""
        return self.sources.get(name, f"{name}={getattr(self, name)!r}")

    def pinned(self) -> list[str]:
        """The pins that are set, as the user wrote them."""
        names = [f.name for f in dataclasses.fields(self) if f.name not in ("sources", "needs_tensor_parallel")]
        return [self.where(n) for n in names if getattr(self, n) is not None]

    def check(self) -> None:
        """Reject pins that contradict each other, whatever the cluster."""
        s, p = self.num_stages, self.pipeline_degree
        interleaved = self.schedule == "interleaved_1f1b"
        if s is not None and p is not None:
            if s % p:
                raise ValueError(
                    f"{self.where('num_stages')} and {self.where('pipeline_degree')} contradict: "
                    f"{s} stages cannot be spread evenly over {p} ranks per pipeline; pin a "
                    f"pipeline degree that divides {s}, or leave it to the planner"
                )
            if s != p and self.schedule is not None and not interleaved:
                raise ValueError(
                    f"{self.where('num_stages')} on {self.where('pipeline_degree')} puts "
                    f"{s // p} stages on each rank, which only interleaved_1f1b runs, but "
                    f"{self.where('schedule')}; drop one of the three"
                )
        if interleaved and s is not None and s == 1:
            raise ValueError(f"{self.where('schedule')} needs at least 2 stages but {self.where('num_stages')}")
        if self.tensor_parallel is not None and self.needs_tensor_parallel and self.tensor_parallel < 2:
            raise ValueError(f"{self.where('tensor_parallel')}: split() needs at least 2 devices")
        if self.replica_groups is not None and (self.pipeline_degree or 1) > 1:
            raise ValueError(
                f"{self.where('replica_groups')} groups data-parallel ranks, which is only defined "
                f"without a pipeline, but {self.where('pipeline_degree')}; drop one"
            )
        if self.row_weights is not None and self.replica_group is not None and len(self.row_weights) % self.replica_group:
            raise ValueError(
                f"{self.where('row_weights')} gives {len(self.row_weights)} replicas, which "
                f"{self.where('replica_group')} cannot group; give a multiple of {self.replica_group} weights"
            )


def pins_from(scopes: Mapping[str, Sequence[Annotation]], config: Config) -> Pins:
    """The pins in a model's annotations and its ``Config``.

    Args:
        scopes: where -> annotation stack, as :func:`whale.parallelize` collects them.
        config: the user's options.

    Raises:
        ValueError: annotations that disagree (two micro-batch counts, two device counts).

    Example::

        pins = pins_from(module_annotation_map(model), Config(num_micro_batch=8))
    """
    found: dict[str, object] = {}
    sources: dict[str, str] = {}

    def pin(name: str, value: object, source: str) -> None:
        if name in found and found[name] != value:
            raise ValueError(
                f"{sources[name]} and {source} pin {name} to {found[name]!r} and {value!r}; "
                "set it in one place"
            )
        found[name], sources[name] = value, source

    annotations = distinct_annotations(scopes)
    first_at = {}
    for where, stack in scopes.items():
        for a in stack:
            first_at.setdefault(id(a), where)
    splits = [a for a in annotations if isinstance(a, Split)]
    for a in splits:
        if a.device_count is not None:
            pin("tensor_parallel", a.device_count, f"{a!r} at {first_at[id(a)]!r}")
    for a in annotations:
        if isinstance(a, Replicate) and a.device_count is not None:
            pin("replica_group", a.device_count, f"{a!r} at {first_at[id(a)]!r}")
        if isinstance(a, Pipeline) and a.num_micro_batch is not None:
            pin("num_micro_batch", a.num_micro_batch, f"{a!r} at {first_at[id(a)]!r}")
        if isinstance(a, VirtualDevices) and a.layout != "auto":
            pin("replica_groups", a.layout, f"{a!r} at {first_at[id(a)]!r}")
    stages = [a for a in annotations if a.kind == "stage"]
    if stages and config.stage_boundaries:
        raise ValueError(
            f"the model has {len(stages)} stage() annotations and Config(stage_boundaries="
            f"{list(config.stage_boundaries)}); give the stages one way, not both"
        )
    if stages:
        pin("num_stages", len(stages), f"{len(stages)} stage() annotations")
    if config.stage_boundaries:
        pin("num_stages", len(config.stage_boundaries) + 1, f"Config(stage_boundaries={list(config.stage_boundaries)})")
    if config.num_micro_batch != 1:
        pin("num_micro_batch", config.num_micro_batch, f"Config(num_micro_batch={config.num_micro_batch})")
    if config.schedule != "1f1b":
        pin("schedule", config.schedule, f"Config(schedule={config.schedule!r})")
    if config.pipeline_degree is not None:
        pin("pipeline_degree", config.pipeline_degree, f"Config(pipeline_degree={config.pipeline_degree})")
    if config.row_weights is not None:
        pin("row_weights", tuple(config.row_weights), f"Config(row_weights={list(config.row_weights)})")
    return Pins(**found, needs_tensor_parallel=bool(splits), sources=sources)
