"""Pictures of a fixed plan and of fixed timelines: files written whole, the right things drawn.

Every case builds its plan, report and timelines by hand (no capture, no search), so a picture
is checked against known numbers: device boxes, stages and nodes are counted on the figure's
artists (their gids) and, for SVG, in the written file itself.
"""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("matplotlib")

from matplotlib.colors import to_hex

from whale.ir.cluster_spec import parse_cluster
from whale.ir.plan import Plan
from whale.ir.trace import CATEGORIES, Timeline, TraceEvent
from whale.planner.schedules.generate import make_schedule
from whale.planner.search.report import DeviceRow, PlanReport
from whale.plot import PictureInfo, draw_plan, draw_timelines
from whale.plot.canvas import MISSING_MATPLOTLIB
from whale.plot.plan_picture import plan_figure
from whale.plot.timeline_picture import COLORS, timeline_figure

_GiB = 2**30
CLUSTER = parse_cluster("node0=2xA100-80GB,node1=2xT4")


def pipelined_plan(num_stages: int = 2, schedule: str = "1f1b") -> Plan:
    """Two replicas, each a pipeline A100 (rank 0 or 1) > T4 (rank 2 or 3)."""
    virtual = num_stages // 2 if schedule == "interleaved_1f1b" else None
    return Plan(
        world_size=4,
        pipelines=((0, 2), (1, 3)),
        row_weights=(1.0, 1.0),
        replica_groups=((0, 1),),
        num_micro_batch=4,
        num_stages=num_stages,
        schedule=make_schedule(schedule, num_stages, 4, 2 if virtual else None),
        stage_boundaries=tuple(f"blocks.{k}" for k in range(1, num_stages)),
    )


def report_of(plan: Plan) -> PlanReport:
    """A report with known rows and memory: the A100s at 30 of 72 GiB, the T4s at 13 of 14.4."""
    rows = []
    for rank in range(4):
        a100 = rank < 2
        rows.append(DeviceRow(
            ranks=(rank,), device="A100-80GB" if a100 else "T4", replicas=(rank % 2,),
            stages=(0,) if a100 else (1,), layers="wte..blocks.0" if a100 else "blocks.1..lm_head",
            num_layers=3, rows=16, shard="-", memory_bytes=(30 if a100 else 13) * _GiB,
            capacity_bytes=int((72 if a100 else 14.4) * _GiB), busy_seconds=0.04,
        ))  # fmt: skip
    return PlanReport(
        plan=plan, cluster=str(CLUSTER), description="dp 2 x pp 2 x tp 1, 1f1b, 4 micro-batches",
        global_batch=32, step_time=0.0731, bubble=0.15, sync_seconds=(0.01, 0.01),
        devices=tuple(rows), stage_lines=(), reasons=(), alternatives=(), search_summary="",
        executable=True,
    )  # fmt: skip


def _by_gid(figure, prefix: str) -> list:
    ax = figure.axes[0]
    return [p for p in ax.patches if (p.get_gid() or "").startswith(prefix)]


def _texts(figure) -> str:
    return "\n".join(t.get_text() for ax in figure.axes for t in ax.texts)


def test_draw_plan_writes_a_png_of_every_device_and_stage(tmp_path):
    plan = pipelined_plan()
    path = tmp_path / "plan.png"
    info = draw_plan(path, plan, CLUSTER, report_of(plan))
    assert info == PictureInfo(path, num_nodes=2, num_devices=4, num_stages=2)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert os.listdir(tmp_path) == ["plan.png"]  # no temporary file left beside it
    # The same picture, counted on the figure: 4 boxes, 2 node bands, one strip per device in
    # its stage's colour, and 2 colours for the 2 stages.
    figure, _ = plan_figure(plan, CLUSTER, report_of(plan))
    assert sorted(p.get_gid() for p in _by_gid(figure, "device:")) == [
        f"device:{r}" for r in range(4)
    ]
    assert len(_by_gid(figure, "node:")) == 2
    strips = {p.get_gid(): to_hex(p.get_facecolor()) for p in _by_gid(figure, "stage:")}
    assert sorted(strips) == ["stage:0:0", "stage:0:1", "stage:1:2", "stage:1:3"]
    assert (
        strips["stage:0:0"]
        == strips["stage:0:1"]
        != strips["stage:1:2"]
        == strips["stage:1:3"]
    )
    text = _texts(figure)
    assert "rank 3  T4" in text and "stage 1: blocks.1..lm_head (3 layers)" in text
    assert "13.0 GiB of 14.4 GiB usable (90%)" in text
    assert "replica 1: 16 rows in 4 micro-batches" in text
    assert "pipeline of ranks 1 > 3" in text
    assert "predicted step 73.1 ms for 32 rows, bubble 15.0%" in text
    # The memory bars are as long as the use: 13 / 14.4 of the bar on a T4.
    bars = [p for p in figure.axes[0].patches if p.get_gid() == "memory"]
    assert len(bars) == 4 and max(b.get_width() for b in bars) == pytest.approx(
        2.6 * 13 / 14.4
    )


def test_an_svg_holds_every_device_box_and_interleaved_stages(tmp_path):
    # Interleaved 1F1B: 4 stages on 2 positions, so each device runs two stages (two strips).
    plan = pipelined_plan(num_stages=4, schedule="interleaved_1f1b")
    info = draw_plan(tmp_path / "plan.svg", plan, CLUSTER)
    assert (info.num_devices, info.num_stages, info.num_nodes) == (4, 4, 2)
    svg = (tmp_path / "plan.svg").read_text()
    assert (
        sum(f'id="device:{r}"' in svg for r in range(4)) == 4
        and svg.count('id="device:') == 4
    )
    assert svg.count('id="stage:') == 8
    for stage, ranks in ((0, (0, 1)), (2, (0, 1)), (1, (2, 3)), (3, (2, 3))):
        assert all(f'id="stage:{stage}:{r}"' in svg for r in ranks)
    figure, _ = plan_figure(plan, CLUSTER)
    colors = {to_hex(p.get_facecolor()) for p in _by_gid(figure, "stage:")}
    assert len(colors) == 4
    text = _texts(figure)  # no report: stage starts, row shares, capacity only
    assert "stages 1,3 from blocks.1, blocks.3" in text and "50% of the rows" in text
    assert (
        "memory 14.4 GiB (use not predicted)" not in text
        and "memory 16.0 GiB (use not predicted)" in text
    )


def test_a_plan_for_another_cluster_is_refused(tmp_path):
    with pytest.raises(
        ValueError, match=r"plan is for 4 ranks but the cluster .* has 2"
    ):
        draw_plan(tmp_path / "p.png", pipelined_plan(), parse_cluster("2xT4"))
    assert not os.listdir(tmp_path)


def step_timelines() -> tuple[Timeline, Timeline]:
    """GPipe over 2 stages and 2 micro-batches: forward 1 ms, backward 2 ms, transfers 0.1 ms;
    the "measured" one runs 10% slower."""

    def events(scale: float) -> list[TraceEvent]:
        f, b, t = 1e-3 * scale, 2e-3 * scale, 1e-4 * scale
        out = [
            TraceEvent(0, "F0.0", "forward", 0, f, 0, 0),
            TraceEvent(0, "F0.1", "forward", f, 2 * f, 0, 1),
            TraceEvent(0, "SA0.0", "send", f, f + t, 0, 0),
            TraceEvent(1, "RA1.0", "recv", 0, f + t, 1, 0),
            TraceEvent(1, "F1.0", "forward", f + t, 2 * f + t, 1, 0),
            TraceEvent(1, "F1.1", "forward", 2 * f + t, 3 * f + t, 1, 1),
            TraceEvent(1, "B1.0", "backward", 3 * f + t, 3 * f + t + b, 1, 0),
            TraceEvent(1, "B1.1", "backward", 3 * f + t + b, 3 * f + t + 2 * b, 1, 1),
            TraceEvent(
                0, "B0.0", "backward", 3 * f + 2 * t + b, 3 * f + 2 * t + 2 * b, 0, 0
            ),
            TraceEvent(
                0,
                "B0.1",
                "backward",
                3 * f + 2 * t + 2 * b,
                3 * f + 2 * t + 3 * b,
                0,
                1,
            ),
        ]
        return out

    return Timeline("simulated", events(1.0)), Timeline("measured", events(1.1))


def test_draw_timelines_stacks_one_gantt_chart_per_timeline(tmp_path):
    simulated, measured = step_timelines()
    path = tmp_path / "step.png"
    info = draw_timelines(path, simulated, measured)
    assert path.read_bytes().startswith(b"\x89PNG") and os.listdir(tmp_path) == [
        "step.png"
    ]
    assert info.panels == (("simulated", (0, 1), 10), ("measured", (0, 1), 10))
    figure, _ = timeline_figure(simulated, measured)
    panels = [ax for ax in figure.axes if ax.get_title(loc="left")]
    assert len(panels) == 2
    titles = [ax.get_title(loc="left") for ax in panels]
    assert (
        titles[0]
        == f"simulated: step 9.20 ms, bubble {simulated.bubble_fraction:.1%} (2 ranks)"
    )
    assert titles[1].startswith("measured: step 10.1 ms")
    # One collection per rank and category, holding one bar per interval.
    bars = {c.get_gid(): len(c.get_paths()) for ax in panels for c in ax.collections}
    assert bars["simulated:0:forward"] == 2 and bars["simulated:1:backward"] == 2
    assert (
        bars["measured:1:recv"] == 1
        and bars["measured:0:send"] == 1
        and len(bars) == 12
    )
    assert panels[0].get_shared_x_axes().joined(panels[0], panels[1])
    assert panels[0].get_xlim()[1] >= 9.2  # milliseconds
    assert set(COLORS) == set(CATEGORIES)  # every kind of interval has its colour


def test_a_timeline_without_intervals_is_refused(tmp_path):
    with pytest.raises(
        ValueError, match="'measured' timeline has no intervals; run a step"
    ):
        draw_timelines(tmp_path / "step.png", Timeline("measured", ()))
    with pytest.raises(ValueError, match="at least one Timeline"):
        draw_timelines(tmp_path / "step.png")
    crowd = Timeline(
        "simulated", [TraceEvent(r, "F0.0", "forward", 0, 1) for r in range(257)]
    )
    with pytest.raises(
        ValueError,
        match="up to 256 rank rows, these timelines have 257; .* Chrome trace",
    ):
        draw_timelines(tmp_path / "step.png", crowd)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing/plan.png", r"the folder '.*missing' does not exist; create it first"),
        (".", r"it is a folder; name a file in it"),
        ("plan.txt", r"end the name with \.png or \.svg or \.pdf"),
    ],
)
def test_an_unwritable_path_is_named_before_drawing(tmp_path, name, message):
    path = tmp_path / name if name != "." else tmp_path
    with pytest.raises(
        ValueError, match=f"cannot write the picture to '{path}': {message}"
    ):
        draw_plan(path, pipelined_plan(), CLUSTER)
    with pytest.raises(ValueError, match="cannot write the picture to"):
        draw_timelines(path, *step_timelines())
    assert not os.listdir(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits")
def test_a_folder_without_write_permission_is_named(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ValueError, match="no permission to write there"):
        draw_plan(locked / "plan.png", pipelined_plan(), CLUSTER)


def test_a_failed_write_leaves_no_file_behind(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def fail_half_way(self, fname, **kwargs):
        with open(fname, "wb") as file:
            file.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", fail_half_way)
    target = tmp_path / "plan.png"
    target.write_bytes(b"the previous picture")
    with pytest.raises(
        ValueError, match=r"cannot write the picture to .*plan.png': No space left"
    ):
        draw_plan(target, pipelined_plan(), CLUSTER)
    assert (
        os.listdir(tmp_path) == ["plan.png"]
        and target.read_bytes() == b"the previous picture"
    )


def test_without_matplotlib_the_message_says_how_to_install_it(tmp_path, monkeypatch):
    for name in [
        m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")
    ]:
        monkeypatch.setitem(
            sys.modules, name, None
        )  # `import matplotlib...` now raises
    with pytest.raises(
        ImportError, match="pictures need matplotlib: pip install 'whale\\[plot\\]'"
    ):
        draw_plan(tmp_path / "plan.png", pipelined_plan(), CLUSTER)
    with pytest.raises(ImportError) as err:
        draw_timelines(tmp_path / "step.png", *step_timelines())
    assert str(err.value) == MISSING_MATPLOTLIB and not os.listdir(tmp_path)


def test_every_stage_has_its_own_colour():
    from whale.plot.plan_picture import _stage_colors

    for n in (1, 10, 12, 20, 24, 64):
        assert len({to_hex(c) for c in _stage_colors(n)}) == n
