"""The cluster as a picture: every device, what it runs under a plan, and how full its memory is.

One band per node; in it one box per device, labelled with its rank and type, the pipeline
stage(s) and layers it runs, its replica's rows, its tensor-parallel shard and a memory bar
(predicted use against usable memory, when a :class:`~whale.planner.search.report.PlanReport`
is given). A colour strip on top of each box shows its stages, one colour per stage.

Every device box carries the gid ``device:<rank>`` and every stage strip ``stage:<s>:<rank>``,
so a test (or an SVG reader) can count what was drawn.
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..ir.cluster_spec import Cluster
from ..ir.plan import Plan
from ..planner.search.report import DeviceRow, PlanReport, format_seconds
from .canvas import check_target, new_figure, save_figure

__all__ = ["PictureInfo", "draw_plan", "plan_figure"]

MAX_DEVICES = 256
"""Past this a picture is unreadable; the table (``whale plan``) lists every rank instead."""

_PER_ROW = 8  # device boxes per row of a node band; a larger node wraps
_BOX_W = 2.8  # inches, at the figure's scale of one data unit per inch
_LINE = 0.22  # height of a line of text in a box
_GAP = 0.2
_BAND_HEAD = 0.35  # room for the node's label above its boxes
_TEXT_CHARS = 50  # characters that fit on one line of a box at the font size used
_GiB = 2**30


@dataclasses.dataclass(frozen=True)
class PictureInfo:
    """What :func:`draw_plan` drew, for a caption or a test."""

    path: Path | None
    """The file written (None for :func:`plan_figure`, which writes nothing)."""
    num_nodes: int
    num_devices: int
    num_stages: int


def draw_plan(
    path: str | os.PathLike,
    plan: Plan,
    cluster: Cluster,
    report: PlanReport | None = None,
) -> PictureInfo:
    """Draw ``plan`` on ``cluster`` into ``path`` (``.png``, ``.svg`` or ``.pdf``).

    Args:
        path: the picture file; its folder must exist. Written whole or not at all.
        plan: the plan (``whale plan --json``, ``auto_plan``, ``model.plan``).
        cluster: the cluster the plan is for (same world size).
        report: the plan's report, for layer names, rows and predicted memory; without it the
            boxes show stage boundaries and row weights and no memory use.

    Returns:
        What was drawn: nodes, device boxes and stages.

    Raises:
        ImportError: matplotlib is missing (``pip install 'whale[plot]'``).
        ValueError: ``path`` cannot be written (checked before drawing), the plan is not for
            this cluster, or it has more than :data:`MAX_DEVICES` devices.

    Example::

        plan, report = auto_plan(captured, {}, 4, Config(auto_parallel=True), cluster=cluster,
                                 global_batch=32)
        draw_plan("plan.png", plan, cluster, report)
    """
    check_target(path)
    figure, info = plan_figure(plan, cluster, report)
    written = save_figure(figure, path)
    return dataclasses.replace(info, path=written)


def plan_figure(
    plan: Plan, cluster: Cluster, report: PlanReport | None = None
) -> tuple[Any, PictureInfo]:
    """The picture of :func:`draw_plan` as a matplotlib ``Figure``, not written anywhere."""
    if plan.world_size != cluster.world_size:
        raise ValueError(
            f"the plan is for {plan.world_size} ranks but the cluster {cluster} has "
            f"{cluster.world_size}; draw a plan with the cluster it was made for"
        )
    if plan.world_size > MAX_DEVICES:
        raise ValueError(
            f"draw_plan draws up to {MAX_DEVICES} devices, this plan has {plan.world_size}; "
            "`whale plan` prints every rank in its table"
        )
    rows_of = _report_rows(report)
    devices = cluster.devices()
    lines = [
        _box_lines(plan, d.rank, d.profile, rows_of.get(d.rank), report)
        for d in devices
    ]
    box_h = 0.16 + 0.12 + _LINE * max(map(len, lines)) + 0.42  # strip, text, memory bar
    bands = [_band_rows(node.num_devices) for node in cluster.nodes]
    width = (
        min(_PER_ROW, max(n.num_devices for n in cluster.nodes)) * (_BOX_W + _GAP)
        + _GAP
    )
    height = sum(rows * (box_h + _GAP) + _BAND_HEAD + _GAP for rows in bands)
    title_room, legend_room = 0.75, 0.25 + 0.22 * ((plan.num_stages + 1) // 2)
    figure = new_figure(max(width, 6.0), height + title_room + legend_room)
    total_h = height + title_room + legend_room
    ax = figure.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, max(width, 6.0))
    ax.set_ylim(total_h, 0)  # y grows downwards, as the nodes are listed
    ax.axis("off")
    colors = _stage_colors(plan.num_stages)
    title = _fit(
        _title(plan, report), int(max(width, 6.0) * 12)
    )  # ~12 bold characters an inch
    ax.text(0.15, 0.3, title, fontsize=10, weight="bold", va="center")
    ax.text(
        0.15,
        0.58,
        _fit(_subtitle(plan, cluster, report), int(max(width, 6.0) * 15)),
        fontsize=8,
        va="center",
        color="0.3",
    )
    y = title_room
    ranks = iter(devices)
    for node, rows in zip(cluster.nodes, bands):
        band_h = rows * (box_h + _GAP) + _BAND_HEAD
        _node_band(ax, node, y, band_h, width)
        for k in range(node.num_devices):
            rank, _, profile = next(ranks)
            x = _GAP + (k % _PER_ROW) * (_BOX_W + _GAP)
            top = y + _BAND_HEAD + (k // _PER_ROW) * (box_h + _GAP)
            box = (x, top, box_h)
            _device_box(ax, plan, rank, lines[rank], box, colors)
            _memory_bar(ax, profile, rows_of.get(rank), box)
        y += band_h + _GAP
    _legend(ax, plan, rows_of, colors, y)
    info = PictureInfo(None, len(cluster.nodes), cluster.world_size, plan.num_stages)
    return figure, info


def _band_rows(num_devices: int) -> int:
    return -(-num_devices // _PER_ROW)


def _report_rows(report: PlanReport | None) -> dict[int, DeviceRow]:
    """Rank -> its row of the report (rows fold identical ranks on large clusters)."""
    if report is None:
        return {}
    return {rank: row for row in report.devices for rank in row.ranks}


def _stage_colors(num_stages: int) -> list[tuple]:
    from matplotlib import colormaps

    if num_stages <= 20:  # qualitative maps: neighbours differ most
        cmap = colormaps["tab10" if num_stages <= 10 else "tab20"]
        return [cmap(s) for s in range(num_stages)]
    cmap = colormaps[
        "turbo"
    ]  # more stages: one distinct colour each along a smooth map
    return [cmap(s / (num_stages - 1)) for s in range(num_stages)]


def _title(plan: Plan, report: PlanReport | None) -> str:
    if report is not None:
        return report.description
    m = plan.num_micro_batch
    shape = (
        f"dp {plan.dp_degree} x pp {plan.pipeline_degree} x tp {plan.tensor_parallel}, "
        f"{plan.num_stages} stage{'s' if plan.num_stages != 1 else ''}, "
        f"{m} micro-batch{'es' if m != 1 else ''}"
    )
    return shape + (f", {plan.schedule.name}" if plan.schedule is not None else "")


def _subtitle(plan: Plan, cluster: Cluster, report: PlanReport | None) -> str:
    if report is None:
        return f"cluster {cluster}"
    return (
        f"cluster {cluster}; predicted step {format_seconds(report.step_time)} for "
        f"{report.global_batch} rows, bubble {report.bubble:.1%}"
    )


def _fit(text: str, chars: int = _TEXT_CHARS) -> str:
    return text if len(text) <= chars else text[: chars - 3] + "..."


def _node_band(ax: Any, node: Any, y: float, height: float, width: float) -> None:
    from matplotlib.patches import FancyBboxPatch

    band = FancyBboxPatch(
        (0.06, y), width - 0.12, height, boxstyle="round,pad=0,rounding_size=0.08",
        facecolor="0.96", edgecolor="0.55", linewidth=0.8,
    )  # fmt: skip
    band.set_gid(f"node:{node.name}")
    ax.add_patch(band)
    kinds = " + ".join(f"{count}x{device.name}" for device, count in node.blocks)
    link = node.device_link
    ax.text(
        0.2, y + _BAND_HEAD / 2, f"{node.name}: {kinds}, {link.kind} between devices",
        fontsize=8, weight="bold", va="center", color="0.25",
    )  # fmt: skip


def _box_lines(
    plan: Plan,
    rank: int,
    profile: Any,
    row: DeviceRow | None,
    report: PlanReport | None,
) -> list[str]:
    """What a device box says: rank and type, stages and layers (up to two lines), rows,
    pipeline, tensor shard."""
    stages = plan.stages_at(plan.position_of(rank))
    runs = textwrap.wrap(
        _runs(plan, stages, row), _TEXT_CHARS, subsequent_indent="  ", max_lines=2, placeholder="..."
    )  # fmt: skip
    lines = [f"rank {rank}  {profile.name}", *runs, _rows_line(plan, rank, row, report)]
    replica, k = plan.pipelines[plan.replica_of(rank)], plan.tensor_parallel
    if len(replica) > k:
        groups = [
            "+".join(map(str, replica[i : i + k])) for i in range(0, len(replica), k)
        ]
        lines.append(_fit(f"pipeline of ranks {' > '.join(groups)}"))
    group = plan.tensor_group_of(rank)
    if len(group) > 1:
        share = (
            row.shard.split(" of ")[0] if row is not None and row.shard != "-" else None
        )
        lines.append(
            f"tensor shard {group.index(rank) + 1} of {len(group)}"
            + (f", {share} of the width" if share else "")
        )
    return lines


def _device_box(
    ax: Any,
    plan: Plan,
    rank: int,
    lines: Sequence[str],
    box: tuple[float, float, float],
    colors: Sequence[tuple],
) -> None:
    from matplotlib.patches import Rectangle

    x, top, height = box
    frame = Rectangle(
        (x, top), _BOX_W, height, facecolor="white", edgecolor="0.3", linewidth=0.9
    )
    frame.set_gid(f"device:{rank}")
    ax.add_patch(frame)
    stages = plan.stages_at(plan.position_of(rank))
    strip_h, strip_w = 0.16, _BOX_W / len(stages)
    for k, s in enumerate(stages):
        strip = Rectangle(
            (x + k * strip_w, top), strip_w, strip_h, facecolor=colors[s], linewidth=0
        )
        strip.set_gid(f"stage:{s}:{rank}")
        ax.add_patch(strip)
    for k, line in enumerate(lines):
        ax.text(
            x + 0.1, top + strip_h + 0.12 + (k + 0.5) * _LINE, _fit(line),
            fontsize=7, weight="bold" if k == 0 else "normal", va="center",
        )  # fmt: skip


def _runs(plan: Plan, stages: Sequence[int], row: DeviceRow | None) -> str:
    """``stage 0: wte..blocks.2 (5 layers)``; without a report, where the stages begin."""
    what = f"stage{'s' if len(stages) > 1 else ''} {','.join(map(str, stages))}"
    if plan.num_stages == 1:
        what = "the whole model"
    if row is not None:
        return f"{what}: {row.layers} ({row.num_layers} layer{'s' if row.num_layers != 1 else ''})"
    starts = [
        plan.stage_boundaries[s - 1]
        for s in stages
        if 0 < s <= len(plan.stage_boundaries)
    ]
    return f"{what}" + (f" from {', '.join(starts)}" if starts else "")


def _rows_line(
    plan: Plan, rank: int, row: DeviceRow | None, report: PlanReport | None
) -> str:
    """``replica 0: 16 rows in 4 micro-batches`` (without a report, its share of the rows)."""
    replica = plan.replica_of(rank)
    m = plan.num_micro_batch
    batches = f"{m} micro-batch{'es' if m != 1 else ''}"
    if row is not None and report is not None:
        return f"replica {replica}: {row.rows} rows in {batches}"
    share = plan.row_weights[replica] / sum(plan.row_weights)
    return f"replica {replica}: {share:.0%} of the rows, {batches}"


def _memory_bar(
    ax: Any, profile: Any, row: DeviceRow | None, box: tuple[float, float, float]
) -> None:
    from matplotlib.patches import Rectangle

    x, top, box_h = box
    left, bottom, width, height = x + 0.1, top + box_h - 0.31, _BOX_W - 0.2, 0.2
    ax.add_patch(
        Rectangle(
            (left, bottom),
            width,
            height,
            facecolor="0.92",
            edgecolor="0.5",
            linewidth=0.6,
        )
    )
    if row is None:
        label = f"memory {_bytes(profile.memory_bytes)} (use not predicted)"
    else:
        used = row.memory_bytes / row.capacity_bytes if row.capacity_bytes else 0.0
        fill = Rectangle(
            (left, bottom), width * min(used, 1.0), height, linewidth=0,
            facecolor="#d62728" if used > 1 else "#e3a33b" if used > 0.85 else "#4c9f70",
        )  # fmt: skip
        fill.set_gid("memory")
        ax.add_patch(fill)
        label = f"{_bytes(row.memory_bytes)} of {_bytes(row.capacity_bytes)} usable ({used:.0%})"
    ax.text(
        left + width / 2,
        bottom + height / 2,
        label,
        fontsize=6.5,
        ha="center",
        va="center",
    )


def _bytes(n: int) -> str:
    """``72.0 GiB``, ``310 MiB``: a tiny model's use still reads as more than zero."""
    return f"{n / _GiB:.1f} GiB" if n >= _GiB / 10 else f"{n / 2**20:.0f} MiB"


def _legend(
    ax: Any,
    plan: Plan,
    rows_of: dict[int, DeviceRow],
    colors: Sequence[tuple],
    y: float,
) -> None:
    from matplotlib.patches import Rectangle

    ax.text(0.15, y + 0.12, "stages", fontsize=8, weight="bold", va="center")
    names = _stage_names(plan, rows_of)
    for s in range(plan.num_stages):
        col, line = s % 2, s // 2
        x0, y0 = 0.9 + col * 3.2, y + 0.02 + line * 0.22
        ax.add_patch(Rectangle((x0, y0), 0.25, 0.16, facecolor=colors[s], linewidth=0))
        ax.text(
            x0 + 0.33,
            y0 + 0.08,
            _fit(f"stage {s}: {names[s]}", 44),
            fontsize=7,
            va="center",
        )


def _stage_names(plan: Plan, rows_of: dict[int, DeviceRow]) -> list[str]:
    """Per stage, its layers as the report names them, or else where it begins."""
    if plan.num_stages == 1:
        return ["the whole model"]
    names = []
    starts = ["the input", *plan.stage_boundaries]
    for s in range(plan.num_stages):
        position = s % plan.pipeline_degree
        row = rows_of.get(plan.pipelines[0][position * plan.tensor_parallel])
        spans = row.layers.split(", ") if row is not None else []
        stages = plan.stages_at(position)
        if len(spans) == len(stages):
            names.append(spans[stages.index(s)])
        elif len(starts) == plan.num_stages:
            names.append(f"from {starts[s]}")
        else:  # stages from stage() annotations name no boundary
            names.append(f"position {position}")
    return names
