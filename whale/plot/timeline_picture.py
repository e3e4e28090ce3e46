"""Pipeline steps as Gantt charts: the simulated step and the measured one, on one time axis.

One panel per :class:`~whale.ir.trace.Timeline`, stacked, sharing the time axis (ms from each
step's start, as :func:`~whale.ir.trace.chrome_trace` aligns them). A panel has a row per rank:
forwards, backwards and the optimizer step as full-height bars, sends and receives (from when a
rank posted one to when the tensor was there) as a thin bar under them, the gradient all-reduce
as a thin bar over them. Each panel's title gives its step time and bubble.

Each rank's bars of one category form one collection with the gid
``<panel>:<rank>:<category>``, so a test (or an SVG reader) can count what was drawn.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from ..ir.trace import CATEGORIES, Timeline
from ..planner.search.report import format_seconds
from .canvas import check_target, new_figure, save_figure

__all__ = ["TimelinePicture", "draw_timelines", "timeline_figure"]

COLORS = {
    "forward": "#4c78a8",
    "backward": "#f58518",
    "optimizer": "#54a24b",
    "sync": "#b279a2",
    "send": "#9d755d",
    "recv": "#bab0ac",
    "other": "#c7c7c7",
}
"""Colour of each :data:`~whale.ir.trace.CATEGORIES` entry."""

# Intervals that overlap the computes get thin lanes: transfers under a rank's bars, the
# gradient all-reduce (which starts with the last backward) over them.
_LANES = {"send": (0.28, 0.14), "recv": (0.28, 0.14), "sync": (-0.52, 0.12)}
_BAR = (-0.38, 0.62)
_MAX_LABELS = 300  # event names written on their bars, per panel, at most

MAX_ROWS = 256
"""Rank rows over all panels past which a picture is unreadable (the Chrome trace is not)."""


@dataclasses.dataclass(frozen=True)
class TimelinePicture:
    """What :func:`draw_timelines` drew: per panel its source, ranks and number of intervals."""

    path: Path | None
    panels: tuple[tuple[str, tuple[int, ...], int], ...]


def draw_timelines(path: str | os.PathLike, *timelines: Timeline) -> TimelinePicture:
    """Draw ``timelines`` (simulated, measured, ...) as stacked Gantt charts into ``path``.

    Raises:
        ImportError: matplotlib is missing (``pip install 'whale[plot]'``).
        ValueError: no timeline, one without intervals, or ``path`` cannot be written
            (checked before drawing).

    Example::

        draw_timelines("step.png", simulated, program.timeline())
    """
    check_target(path)
    figure, info = timeline_figure(*timelines)
    written = save_figure(figure, path)
    return dataclasses.replace(info, path=written)


def timeline_figure(*timelines: Timeline) -> tuple[Any, TimelinePicture]:
    """The picture of :func:`draw_timelines` as a matplotlib ``Figure``, not written anywhere."""
    if not timelines:
        raise ValueError(
            "draw_timelines needs at least one Timeline (simulated, measured)"
        )
    for timeline in timelines:
        if not isinstance(timeline, Timeline):
            raise TypeError(
                f"draw_timelines takes Timeline objects, got {type(timeline).__name__}"
            )
        if not timeline.events:
            raise ValueError(
                f"the {timeline.source!r} timeline has no intervals; run a step (or simulate "
                "one) before drawing it"
            )
    rows = sum(len(t.ranks) for t in timelines)
    if rows > MAX_ROWS:
        raise ValueError(
            f"draw_timelines draws up to {MAX_ROWS} rank rows, these timelines have {rows}; "
            "write them as a Chrome trace (save_chrome_trace) and open it in ui.perfetto.dev"
        )
    heights = [0.9 + 0.32 * len(t.ranks) for t in timelines]
    legend = 0.35  # inches under the panels for the legend
    figure = new_figure(9.0, sum(heights) + legend)
    axes = figure.subplots(
        len(timelines),
        1,
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )[:, 0]
    panels = []
    for ax, timeline in zip(axes, timelines):
        _panel(ax, timeline)
        panels.append((timeline.source, timeline.ranks, len(timeline.events)))
    axes[-1].set_xlabel("time from the step's start (ms)", fontsize=8)
    axes[-1].set_xlim(left=0)
    used = {e.category for t in timelines for e in t.events}
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=COLORS[c], label=c) for c in CATEGORIES if c in used]
    figure.legend(
        handles=handles,
        loc="lower center",
        ncol=len(handles),
        fontsize=7,
        frameon=False,
    )
    figure.tight_layout(rect=(0, legend / (sum(heights) + legend), 1, 1))
    return figure, TimelinePicture(None, tuple(panels))


def _panel(ax: Any, timeline: Timeline) -> None:
    origin = min(e.start for e in timeline.events)
    ranks = timeline.ranks
    span_ms = max(timeline.step_time * 1e3, 1e-9)
    labels = 0
    for row, rank in enumerate(ranks):
        by_category: dict[str, list[tuple[float, float]]] = {}
        for e in timeline.events:
            if e.rank == rank:
                by_category.setdefault(e.category, []).append(
                    ((e.start - origin) * 1e3, e.duration * 1e3)
                )
        for category, bars in by_category.items():
            offset, h = _LANES.get(category, _BAR)
            y = row + offset
            collection = ax.broken_barh(
                bars,
                (y, h),
                facecolors=COLORS[category],
                edgecolor="white",
                linewidth=0.3,
            )
            collection.set_gid(f"{timeline.source}:{rank}:{category}")
        for e in timeline.events:
            if e.rank != rank or not e.is_compute or labels >= _MAX_LABELS:
                continue
            if e.duration * 1e3 >= span_ms * 0.035:
                mid = ((e.start + e.end) / 2 - origin) * 1e3
                ax.text(
                    mid,
                    row - 0.07,
                    e.name,
                    fontsize=5.5,
                    ha="center",
                    va="center",
                    color="white",
                )
                labels += 1
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks], fontsize=7)
    ax.set_ylim(len(ranks) - 0.5, -0.6)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", color="0.9", linewidth=0.5)
    ax.set_axisbelow(True)
    ax.set_title(
        f"{timeline.source}: step {format_seconds(timeline.step_time)}, "
        f"bubble {timeline.bubble_fraction:.1%} ({len(ranks)} rank{'s' if len(ranks) != 1 else ''})",
        fontsize=9, loc="left",
    )  # fmt: skip
