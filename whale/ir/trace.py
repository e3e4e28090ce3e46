"""A pipeline step's timeline, simulated or measured, and its Chrome trace form.

The planner's simulator and the runtime's executor both describe a step as intervals per rank:
what each rank ran (a stage's forward or backward of a micro-batch, a send, a receive, the
optimizer step) from when to when, in seconds from the step's start. :class:`Timeline` holds
them; :func:`chrome_trace` writes one or more timelines as one Chrome trace (the JSON object
format of the Trace Event Format), which Perfetto (ui.perfetto.dev) and chrome://tracing open:
each timeline is a process ("simulated", "measured"), each rank a thread, so the two sit side by
side on one time axis.

Example::

    sim = Timeline("simulated", events)
    save_chrome_trace("step.json", sim, program.timeline())
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

__all__ = [
    "CATEGORIES",
    "Timeline",
    "TraceEvent",
    "chrome_trace",
    "events_of",
    "save_chrome_trace",
]

CATEGORIES = ("forward", "backward", "send", "recv", "optimizer", "sync", "other")
"""What an interval is: compute (forward, backward, optimizer) or waiting and moving data."""

_COMPUTE = frozenset({"forward", "backward", "optimizer"})


@dataclasses.dataclass(frozen=True)
class TraceEvent:
    """One interval on one rank, in seconds from the step's start."""

    rank: int
    name: str
    """Short label, e.g. ``"F1.3"`` (stage 1's forward of micro-batch 3)."""
    category: str
    """One of :data:`CATEGORIES`."""
    start: float
    end: float
    stage: int | None = None
    micro_batch: int | None = None

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(
                f"TraceEvent.category {self.category!r}: expected one of {CATEGORIES}"
            )
        if (
            not (math.isfinite(self.start) and math.isfinite(self.end))
            or self.end < self.start
        ):
            raise ValueError(
                f"TraceEvent {self.name!r}: interval [{self.start}, {self.end}] is not finite and ordered"
            )
        if self.rank < 0:
            raise ValueError(f"TraceEvent {self.name!r}: rank {self.rank} is negative")

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def is_compute(self) -> bool:
        return self.category in _COMPUTE


@dataclasses.dataclass(frozen=True)
class Timeline:
    """A step's intervals on every rank it covers; ``source`` names where they come from."""

    source: str
    """``"simulated"`` (the planner's prediction) or ``"measured"`` (a run), or another label."""
    events: tuple[TraceEvent, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "events", tuple(self.events))
        if not self.source:
            raise ValueError("Timeline.source must name where the intervals come from")

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({e.rank for e in self.events}))

    @property
    def step_time(self) -> float:
        """From the first interval's start to the last one's end, over all ranks."""
        if not self.events:
            return 0.0
        return max(e.end for e in self.events) - min(e.start for e in self.events)

    def busy(self, rank: int) -> float:
        """Seconds ``rank`` computes (forward, backward, optimizer)."""
        return sum(e.duration for e in self.events if e.rank == rank and e.is_compute)

    @property
    def bubble_fraction(self) -> float:
        """Idle share of compute capacity: ``1 - sum(busy) / (ranks * step_time)``."""
        ranks, span = self.ranks, self.step_time
        if not ranks or span <= 0:
            return 0.0
        return 1.0 - sum(self.busy(r) for r in ranks) / (len(ranks) * span)


def chrome_trace(*timelines: Timeline) -> dict:
    """The timelines as one Chrome trace object: a process per timeline, a thread per rank.

    Times are microseconds from each timeline's own start, so a simulated and a measured step
    line up at zero.
    """
    if not timelines:
        raise ValueError("chrome_trace needs at least one Timeline")
    out: list[dict] = []
    for pid, timeline in enumerate(timelines):
        out.append(
            {
                "name": "process_name",
                "ph": "M",
                "pid": pid,
                "tid": 0,
                "args": {"name": timeline.source},
            }
        )
        origin = min((e.start for e in timeline.events), default=0.0)
        for rank in timeline.ranks:
            out.append(
                {
                    "name": "thread_name",
                    "ph": "M",
                    "pid": pid,
                    "tid": rank,
                    "args": {"name": f"rank {rank}"},
                }
            )
        for e in timeline.events:
            args = {
                k: v
                for k, v in (("stage", e.stage), ("micro_batch", e.micro_batch))
                if v is not None
            }
            out.append(
                {
                    "name": e.name, "cat": e.category, "ph": "X", "pid": pid, "tid": e.rank,
                    "ts": (e.start - origin) * 1e6, "dur": e.duration * 1e6, "args": args,
                }
            )  # fmt: skip
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def save_chrome_trace(path: str | os.PathLike, *timelines: Timeline) -> None:
    """Write :func:`chrome_trace` of the timelines to ``path`` (atomically: a temporary file,
    then a rename, so a failed write leaves no half-written trace).

    Raises:
        ValueError: no timeline, or ``path`` cannot be written (the message names it).
    """
    data = chrome_trace(*timelines)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as file:
            json.dump(data, file)
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise ValueError(
            f"cannot write the Chrome trace to {os.fspath(path)!r}: {err.strerror or err}"
        ) from err


def events_of(timeline: Timeline, rank: int) -> Sequence[TraceEvent]:
    """``rank``'s intervals in start order."""
    return sorted((e for e in timeline.events if e.rank == rank), key=lambda e: e.start)
