"""Timelines: the shared form (whale.ir.trace), the Chrome trace, and a program's measured step.

The pure parts run in this process; program.timeline() runs on the shared 2-rank gloo pool.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from whale.ir.trace import (
    Timeline,
    TraceEvent,
    chrome_trace,
    events_of,
    save_chrome_trace,
)
from whale.runtime.measured import measured_timeline, timing_report


def _two_ranks() -> Timeline:
    return Timeline(
        "simulated",
        [
            TraceEvent(0, "F0.0", "forward", 1.0, 2.0, 0, 0),
            TraceEvent(0, "SA0.0", "send", 2.0, 2.5, 0, 0),
            TraceEvent(1, "F1.0", "forward", 2.5, 3.5, 1, 0),
            TraceEvent(1, "B1.0", "backward", 3.5, 5.5, 1, 0),
            TraceEvent(0, "B0.0", "backward", 6.0, 8.0, 0, 0),
            TraceEvent(1, "sync", "sync", 5.5, 6.0),
        ],
    )


def test_chrome_trace_is_a_process_per_timeline_and_a_thread_per_rank():
    sim = _two_ranks()
    measured = Timeline(
        "measured", [TraceEvent(3, "F0.0", "forward", 10.0, 10.25, 0, 0)]
    )
    trace = chrome_trace(sim, measured)
    assert trace["displayTimeUnit"] == "ms"
    events = trace["traceEvents"]
    processes = {
        e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"
    }
    assert processes == {0: "simulated", 1: "measured"}
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e["name"] == "thread_name"
    }
    assert threads == {(0, 0): "rank 0", (0, 1): "rank 1", (1, 3): "rank 3"}
    spans = [e for e in events if e["ph"] == "X"]
    assert len(spans) == len(sim.events) + 1
    first = next(e for e in spans if e["pid"] == 0 and e["name"] == "F0.0")
    # Microseconds from each timeline's own first interval: both start at zero.
    assert first == {
        "name": "F0.0", "cat": "forward", "ph": "X", "pid": 0, "tid": 0, "ts": 0.0, "dur": 1e6,
        "args": {"stage": 0, "micro_batch": 0},
    }  # fmt: skip
    other = next(e for e in spans if e["pid"] == 1)
    assert (
        other["ts"] == 0.0
        and other["dur"] == pytest.approx(0.25e6)
        and other["tid"] == 3
    )
    assert next(e for e in spans if e["name"] == "sync")["args"] == {}
    with pytest.raises(ValueError, match="at least one Timeline"):
        chrome_trace()


def test_save_chrome_trace_writes_whole_or_not_at_all(tmp_path):
    path = tmp_path / "step.json"
    save_chrome_trace(path, _two_ranks())
    assert json.loads(path.read_text()) == chrome_trace(_two_ranks())
    assert os.listdir(tmp_path) == ["step.json"]  # no temporary file left behind
    # A directory where the file should go: the rename fails, the message names the path, and
    # the temporary file is removed.
    target = tmp_path / "a_directory"
    target.mkdir()
    with pytest.raises(
        ValueError, match="cannot write the Chrome trace to .*a_directory"
    ):
        save_chrome_trace(target, _two_ranks())
    assert sorted(os.listdir(tmp_path)) == ["a_directory", "step.json"]
    with pytest.raises(ValueError, match="cannot write the Chrome trace to .*missing"):
        save_chrome_trace(tmp_path / "missing" / "step.json", _two_ranks())


def test_bubble_fraction_and_step_time():
    timeline = _two_ranks()
    assert timeline.ranks == (0, 1)
    assert timeline.step_time == pytest.approx(7.0)  # 1.0 .. 8.0
    assert timeline.busy(0) == pytest.approx(3.0) and timeline.busy(1) == pytest.approx(
        3.0
    )
    assert timeline.bubble_fraction == pytest.approx(1 - 6.0 / 14.0)
    assert Timeline("measured", ()).bubble_fraction == 0.0
    assert [e.name for e in events_of(timeline, 1)] == ["F1.0", "B1.0", "sync"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"category": "idle"}, "category 'idle'"),
        ({"start": 2.0, "end": 1.0}, "not finite and ordered"),
        ({"end": float("nan")}, "not finite and ordered"),
        ({"rank": -1}, "rank -1 is negative"),
    ],
)
def test_trace_event_rejects_bad_intervals(kwargs, match):
    fields = {
        "rank": 0,
        "name": "F0.0",
        "category": "forward",
        "start": 0.0,
        "end": 1.0,
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        TraceEvent(**fields)


def test_measured_timeline_names_actions_as_the_simulator_and_shares_one_clock():
    parts = [
        (0, 100.5, (("0F0", 0.0, 1.0), ("0SA0", 1.0, 1.25)), ()),
        (1, 100.0, (("1RA0", 0.5, 0.75), ("1F0", 1.5, 2.5)), (("sync", 2.5, 3.0),)),
    ]
    timeline = measured_timeline(parts)
    assert timeline.source == "measured"
    got = [
        (e.rank, e.name, e.category, e.start, e.end, e.stage, e.micro_batch)
        for e in timeline.events
    ]
    assert got == [
        (0, "F0.0", "forward", 0.5, 1.5, 0, 0),  # rank 0 entered 0.5 s after rank 1
        (0, "SA0.0", "send", 1.5, 1.75, 0, 0),
        (1, "RA1.0", "recv", 0.5, 0.75, 1, 0),
        (1, "F1.0", "forward", 1.5, 2.5, 1, 0),
        (1, "sync", "sync", 2.5, 3.0, None, None),
    ]


def test_timing_report():
    assert timing_report(0.073, [0.1, 0.1284, 0.2]) == (
        "step time: predicted 73.0 ms, measured 128.4 ms (median of 3 steps, varying 33% step to step), "
        "prediction error -43%"
    )
    assert timing_report(None, [0.05]) == (
        "step time: measured 50.0 ms (median of 1 step), no prediction (the planner made none "
        "for this program)"
    )
    assert timing_report(0.073, []) == (
        "step time: predicted 73.0 ms, not measured yet (run program.step first)"
    )


def test_pipeline_timeline_is_the_schedule_as_it_ran(world2, tmp_path):
    trace = tmp_path / "trace.json"
    outs = world2.run("tests.pp_cases:timeline_case", str(trace), str(tmp_path))
    for out in outs:
        # Asked before any step: a clear error on every rank, and no collective was started.
        assert "has not run a step; call program.step(...) first" in out["before"]
        assert "has not run a step" in out["trace_before"]
        assert (
            out["report_before"].startswith("step time:")
            and "not measured yet" in out["report_before"]
        )
        assert len(out["step_times"]) == 2 and all(t > 0 for t in out["step_times"])
        assert "(median of 2 steps)" in out["report"]
        # A directory is not a file: every rank raises alike, naming the path.
        assert "cannot write the Chrome trace to" in out["bad_path"]
    assert outs[0]["events"] == outs[1]["events"], "every rank gets the same timeline"
    events = outs[0]["events"]
    for rank, out in enumerate(outs):
        mine = sorted((e for e in events if e[0] == rank), key=lambda e: e[3])
        # The GPT's tied embedding is summed over both stages after the actions: one sync.
        assert mine[-1][1:3] == ("sync", "sync")
        mine = mine[:-1]
        # Each action of the rank's list once, in list order, named as the simulator names it.
        assert [e[1] for e in mine] == [_sim_name(code) for code in out["actions"]]
        assert {(e[1][0], e[2]) for e in mine if e[1][0] in "FB"} == {
            ("F", "forward"),
            ("B", "backward"),
        }
        assert {e[2] for e in mine if e[1][0] in "SR"} == {"send", "recv"}
        # The measured intervals are this rank's last_timeline, shifted to the common clock.
        durations = [e[4] - e[3] for e in mine]
        assert durations == pytest.approx(
            [end - begin for _, begin, end in out["last_timeline"]], abs=1e-9
        )
    assert min(e[3] for e in events) >= 0.0
    written = json.loads(trace.read_text())
    names = {
        e["args"]["name"] for e in written["traceEvents"] if e["name"] == "process_name"
    }
    assert "measured" in names and ("simulated" in names) == outs[0]["predicted"]


def _sim_name(code: str) -> str:
    """``"1RA3"`` -> ``"RA1.3"``."""
    stage = code[: len(code) - len(code.lstrip("0123456789"))]
    rest = code[len(stage) :]
    kind = rest.rstrip("0123456789")
    return f"{kind}{stage}.{rest[len(kind) :]}"


def test_data_parallel_timeline_shows_forward_backward_and_sync(world2):
    outs = world2.run("tests.dp_cases:timeline_case")
    assert outs[0]["names"] == outs[1]["names"]
    for rank in (0, 1):
        mine = [(n, c) for r, n, c in outs[0]["names"] if r == rank]
        assert mine == [
            ("F0.0", "forward"), ("B0.0", "backward"), ("F0.1", "forward"), ("B0.1", "backward"),
            ("sync", "sync"),
        ]  # fmt: skip
    assert re.search(r"\(median of 3 steps, varying \d+% step to step\)", outs[0]["report"]), outs[0]["report"]
