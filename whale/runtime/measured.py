"""A run's measured steps as the shared timeline form (:mod:`whale.ir.trace`), and the line
that sets the measured step time against the predicted one."""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence

from ..ir.profile_fields import spread
from ..ir.trace import Timeline, TraceEvent

__all__ = ["measured_timeline", "timing_report"]

_ACTION = re.compile(r"(\d+)(F|B|SA|RA|SG|RG)(\d+)")
_CATEGORY = {
    "F": "forward",
    "B": "backward",
    "SA": "send",
    "SG": "send",
    "RA": "recv",
    "RG": "recv",
}


def measured_timeline(parts: Sequence[tuple]) -> Timeline:
    """Every rank's ``(rank, entry, intervals, extra)`` of one step as one Timeline.

    ``intervals`` and ``extra`` hold ``(code, begin, end)`` in seconds from the rank's ``entry``
    (``time.time()``); a code is an action (``"1F3"``: named ``"F1.3"`` as the simulated
    timeline names it) or a category (``"sync"``, ``"optimizer"``). Times become seconds from
    the earliest entry.

    Example::

        >>> measured_timeline([(0, 10.0, (("0F0", 0.0, 0.5),), ())]).events[0].name
        'F0.0'
    """
    origin = min(entry for _, entry, _, _ in parts)
    events = []
    for rank, entry, intervals, extra in parts:
        shift = entry - origin
        for code, begin, end in (*intervals, *extra):
            match = _ACTION.fullmatch(code)
            if match is None:
                events.append(TraceEvent(rank, code, code, shift + begin, shift + end))
                continue
            stage, kind, mb = int(match.group(1)), match.group(2), int(match.group(3))
            events.append(
                TraceEvent(
                    rank,
                    f"{kind}{stage}.{mb}",
                    _CATEGORY[kind],
                    shift + begin,
                    shift + end,
                    stage,
                    mb,
                )
            )
    return Timeline("measured", events)


def timing_report(predicted: float | None, step_times: Sequence[float]) -> str:
    """``"step time: predicted 73.0 ms, measured 128.4 ms (median of 20 steps, varying 8% step to
    step), prediction error -43%"``; says so where there is no prediction or no measured step.
    From 3 steps on it also says how much they vary (:func:`~whale.ir.profile_fields.spread`):
    a device profile's ``jitter``, which the cost model prices the wait for the slowest replica
    by, can take it.

    Example::

        >>> timing_report(0.073, [0.1284])
        'step time: predicted 73.0 ms, measured 128.4 ms (median of 1 step), prediction error -43%'
    """
    parts = []
    if predicted is not None:
        parts.append(f"predicted {predicted * 1e3:.1f} ms")
    if step_times:
        n = len(step_times)
        measured = statistics.median(step_times)
        varies = f", varying {spread(step_times):.0%} step to step" if n >= 3 else ""
        parts.append(
            f"measured {measured * 1e3:.1f} ms (median of {n} step{'s' if n != 1 else ''}{varies})"
        )
        if predicted is not None and predicted > 0:
            # As benchmarks/bench_predict.py: predicted over measured, minus one.
            parts.append(f"prediction error {(predicted / measured - 1) * 100:+.0f}%")
    else:
        parts.append("not measured yet (run program.step first)")
    if predicted is None:
        parts.append("no prediction (the planner made none for this program)")
    return "step time: " + ", ".join(parts)
