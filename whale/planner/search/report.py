"""What a plan does and why it won: the per-device table and the explanation, as frozen data.

:class:`PlanReport` is built once from a search result; ``table()`` prints, per device (ranks
that do the same thing are folded into one line on large clusters), what it runs: its replica,
stages and layers, rows, tensor-parallel shard, memory and predicted busy time. ``explain()``
adds why the plan won: its balance, what limits it, and the best rejected alternatives with
their predicted step times (or, for shapes that do not fit, the memory they lack and where).
``timeline`` is the plan's simulated step on every rank, where asked for (``build_report(timeline=True)``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from ...ir.cluster_spec import Cluster
from ...ir.plan import Plan
from ...ir.trace import Timeline
from ..cost.layers import ModelProfile
from ..cost.predict import CostModel, CostOptions
from .explore import Scored, SearchResult, describe

__all__ = [
    "Alternative",
    "DeviceRow",
    "PlanReport",
    "build_report",
    "format_bytes",
    "format_rate",
    "format_seconds",
]

_GiB = 2**30


def format_bytes(num_bytes: float) -> str:
    """Bytes in the unit a person reads: ``"512 KiB"``, ``"46 MiB"``, ``"14.4 GiB"``, ``"1.2 TiB"``.

    Example::

        >>> format_bytes(46 * 2**20), format_bytes(14.4 * 2**30), format_bytes(0)
        ('46 MiB', '14.4 GiB', '0 B')
    """
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= scale:
            value = num_bytes / scale
            return f"{value:.1f} {unit}" if value < 100 and unit in ("GiB", "TiB") else f"{value:.0f} {unit}"
    return f"{num_bytes:.0f} B"


def format_seconds(seconds: float) -> str:
    """A duration as a person reads it: three significant digits in us, ms or s, then minutes.

    Example::

        >>> [format_seconds(t) for t in (0.00085, 0.073, 6.6, 123.4, 0.0)]
        ['850 us', '73.0 ms', '6.60 s', '2 min 3 s', '0 s']
    """
    if not math.isfinite(seconds):
        return f"{seconds} s"
    if seconds < 0:
        return "-" + format_seconds(-seconds)
    if seconds == 0:
        return "0 s"
    if seconds >= 59.5:
        whole = round(seconds)
        if whole < 3600:
            return f"{whole // 60} min {whole % 60} s"
        return f"{whole // 3600} h {whole % 3600 // 60} min"
    for scale, unit in ((1e-9, "ns"), (1e-6, "us"), (1e-3, "ms"), (1.0, "s")):
        value = seconds / scale
        text = _three_digits(value)
        if float(text) < 1000 or unit == "s":
            return f"{text} {unit}"
    raise AssertionError("unreachable")


def _spread(slowest: float, fastest: float) -> str:
    """How far apart stage times are: a percentage up to twice, a factor beyond (a stage of
    one small layer, the model's final norm, can be thousands of times shorter).

    Example::

        >>> _spread(8.4, 7.3), _spread(17.5, 7.3), _spread(1.49, 0.000518)
        ('spread 15.1%', 'the slowest 2.4x the fastest', 'the slowest 2,876x the fastest')
    """
    if fastest <= 0:
        return "the fastest takes no time"
    ratio = slowest / fastest
    if ratio >= 2:
        return f"the slowest {ratio:,.{1 if ratio < 10 else 0}f}x the fastest"
    return f"spread {ratio - 1:.1%}"


def _three_digits(value: float) -> str:
    """``value`` to three significant digits, trailing zeros kept (``73.0``, ``6.60``, ``850``)."""
    if value <= 0:
        return "0"
    decimals = max(0, 2 - math.floor(math.log10(value)))
    text = f"{value:.{decimals}f}"
    if decimals and float(text) >= 10 ** (
        3 - decimals
    ):  # 9.996 -> "10.00": one digit too many
        text = f"{value:.{decimals - 1}f}"
    return text


def format_rate(per_second: float, what: str) -> str:
    """A throughput: ``58,640 rows/s``, ``312 rows/s``, ``0.52 rows/s``."""
    if per_second >= 100:
        return f"{per_second:,.0f} {what}/s"
    return f"{_three_digits(per_second)} {what}/s"


def _count(n: int, noun: str) -> str:
    """``1 micro-batch``, ``12 micro-batches``."""
    return (
        f"{n} {noun}"
        if n == 1
        else f"{n} {noun}es"
        if noun.endswith(("ch", "sh", "s", "x"))
        else f"{n} {noun}s"
    )


@dataclasses.dataclass(frozen=True)
class DeviceRow:
    """What one rank (or several identical ones) does under the plan."""

    ranks: tuple[int, ...]
    device: str
    replicas: tuple[int, ...]
    stages: tuple[int, ...]
    layers: str
    num_layers: int
    rows: int
    shard: str
    memory_bytes: int
    capacity_bytes: int
    busy_seconds: float


@dataclasses.dataclass(frozen=True)
class Alternative:
    """A rejected plan: its shape, predicted step time (None if it does not fit), and why."""

    description: str
    step_time: float | None
    note: str


@dataclasses.dataclass(frozen=True)
class PlanReport:
    """A plan with its predictions and the reasons it was chosen.

    Example::

        plan, report = auto_plan(captured, scopes, 16, Config(auto_parallel=True),
                                 cluster=parse_cluster("8xA100-80GB,8xV100-32GB"), global_batch=512)
        print(report.table())
        print(report.explain())
    """

    plan: Plan
    cluster: str
    description: str
    global_batch: int
    step_time: float
    bubble: float
    sync_seconds: tuple[float, ...]
    devices: tuple[DeviceRow, ...]
    stage_lines: tuple[str, ...]
    reasons: tuple[str, ...]
    alternatives: tuple[Alternative, ...]
    search_summary: str
    executable: bool
    timeline: Timeline | None = None
    """The plan's simulated step on every rank (:meth:`~.predict.CostModel.timeline`) where
    :func:`build_report` was asked for it; None otherwise, or when the report was built without
    the search's cost options (it would not be this plan's)."""
    memory_lines: tuple[str, ...] = ()
    """The memory options turned on to make the plan fit and their cost in step time
    (:func:`~.memory_options.option_costs`); empty where the plain plan fits."""

    def table(self) -> str:
        """Per device: replica, stages, layers, rows, shard, memory, predicted busy time."""
        head = (
            "ranks",
            "device",
            "replica",
            "stages",
            "layers",
            "rows",
            "shard",
            "memory",
            "busy",
        )
        lines = [head]
        for d in self.devices:
            lines.append((
                _ranges(d.ranks), d.device, _ranges(d.replicas), ",".join(map(str, d.stages)),
                f"{d.num_layers}: {d.layers}", str(d.rows), d.shard,
                f"{format_bytes(d.memory_bytes)} of {format_bytes(d.capacity_bytes)}", format_seconds(d.busy_seconds),
            ))  # fmt: skip
        widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
        text = [
            f"{self.description}",
            (
                f"predicted step {format_seconds(self.step_time)} for {self.global_batch} rows "
                f"({format_rate(self.global_batch / self.step_time, 'rows')}), bubble {self.bubble:.1%}"
            ),
        ]
        text += [
            "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines
        ]
        for name, sizes in self.plan.shard_sizes:
            text.append(
                f"shard sizes of {name or '<root>'!r} by tensor index: {list(sizes)}"
            )
        if self.plan.memory_options() != "none":
            text.append(f"memory options (the plain plan does not fit): {self.plan.memory_options()}")
        if not self.executable:
            text.append(
                f"note: tensor parallel {self.plan.tensor_parallel} shards only split() parts at run "
                "time; annotate the layers the plan shards (e.g. the blocks) with wh.split()"
            )
        return "\n".join(text)

    def explain(self) -> str:
        """Why the plan won, its stage balance, and the best rejected alternatives."""
        lines = [f"plan: {self.description}", f"cluster: {self.cluster}", "why:"]
        lines += [f"  - {r}" for r in self.reasons]
        if self.stage_lines:
            lines.append("stages (forward + backward of one micro-batch):")
            lines += [f"  {s}" for s in self.stage_lines]
        if self.alternatives:
            lines.append("best rejected alternatives:")
            for k, a in enumerate(self.alternatives, 1):
                if a.step_time is None:
                    lines.append(f"  {k}. {a.description}: {a.note}")
                else:
                    slower = a.step_time / self.step_time - 1
                    note = f"; {a.note}" if a.note else ""
                    lines.append(
                        f"  {k}. {a.description}: {format_seconds(a.step_time)} ({slower:+.1%}){note}"
                    )
        if self.memory_lines:
            lines.append("memory options turned on (no plan fits without them):")
            lines += [f"  - {m}" for m in self.memory_lines]
        lines.append(f"search: {self.search_summary}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (the plan as its own JSON object)."""
        out = dataclasses.asdict(dataclasses.replace(self, timeline=None))
        out["plan"] = _plan_dict(self.plan)
        del out[
            "timeline"
        ]  # thousands of intervals: the Chrome trace (--trace) holds them
        return out


def _plan_dict(plan: Plan) -> dict:
    import json

    return json.loads(plan.to_json())


def _ranges(values: Sequence[int]) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2,5"``."""
    out, start, prev = [], None, None
    for v in list(values) + [None]:
        if start is not None and v is not None and v == prev + 1:
            prev = v
            continue
        if start is not None:
            out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = v
    return ",".join(out)


def build_report(
    result: SearchResult,
    profile: ModelProfile,
    cluster: Cluster,
    plan: Plan,
    options: CostOptions | None = None,
    *,
    timeline: bool = False,
) -> PlanReport:
    """Assemble the report of ``plan``, made from ``result.best``.

    Args:
        options: the cost options the search used (None: the defaults).
        timeline: simulate every rank's step into ``PlanReport.timeline`` too (an event per
            compute of every rank: a million on 1,024 GPUs, seconds of work, so only on request;
            ``whale plan --trace`` predicts it from the plan instead).

    Example::

        report = build_report(result, profile, cluster, plan_of(result.best, profile, cluster))
    """
    best = result.best
    c, pred = best.candidate, best.prediction
    costs = CostModel(profile, cluster, options or CostOptions())
    timeline = costs.timeline(c) if timeline else None
    if timeline is not None and not math.isclose(
        timeline.step_time, pred.step_time, rel_tol=1e-9, abs_tol=1e-15
    ):
        timeline = None  # other options than the search's: not the predicted step
    layout = c.layout
    bounds = (0, *c.cuts, profile.num_layers)
    names = [layer.name or "<root>" for layer in profile.layers]
    devices = cluster.devices()
    per_rank = []
    for d, pipe in enumerate(layout.pipelines):
        for pos, group in enumerate(pipe):
            stages = tuple(range(pos, c.num_stages, layout.pipeline_degree))
            spans = [(bounds[s], bounds[s + 1]) for s in stages]
            text = ", ".join(
                names[a] if b - a == 1 else f"{names[a]}..{names[b - 1]}"
                for a, b in spans
            )
            count = sum(b - a for a, b in spans)
            shares = costs.shard_shares(group)
            for k, rank in enumerate(group):
                shard = f"{shares[k]:.3g} of tp {len(group)}" if len(group) > 1 else "-"
                per_rank.append(DeviceRow((rank,), devices[rank].profile.name, (d,), stages, text, count,
                                          c.rows[d], shard, pred.rank_memory[rank], pred.rank_capacity[rank],
                                          pred.rank_busy[rank]))  # fmt: skip
    per_rank.sort(key=lambda row: row.ranks)
    rows = per_rank if len(per_rank) <= 32 else _fold(per_rank)
    return PlanReport(
        plan=plan,
        cluster=str(cluster),
        description=describe(c, cluster),
        global_batch=result.global_batch,
        step_time=pred.step_time,
        bubble=pred.bubble,
        sync_seconds=pred.sync_time,
        devices=tuple(rows),
        stage_lines=_stage_lines(best, names, bounds, devices),
        reasons=_reasons(result, cluster),
        alternatives=_alternatives(result, cluster),
        search_summary=(
            f"{result.num_structures} structures (degrees x layouts x schedules x micro-batches), "
            f"{result.num_screened} screened before the bound cut the rest, "
            f"best ones re-scored exactly; {format_seconds(result.seconds)}"
        ),
        executable=plan.tensor_parallel == 1 or profile.split_only,
        timeline=timeline,
    )


def _fold(rows: list[DeviceRow]) -> list[DeviceRow]:
    """Merge ranks doing the same thing on the same device type (large clusters)."""
    groups: dict[tuple, list[DeviceRow]] = {}
    for r in rows:
        key = (
            r.device,
            r.stages,
            r.layers,
            r.rows,
            r.shard,
            r.memory_bytes,
            round(r.busy_seconds, 9),
        )
        groups.setdefault(key, []).append(r)
    out = []
    for members in groups.values():
        first = members[0]
        out.append(dataclasses.replace(
            first,
            ranks=tuple(r for m in members for r in m.ranks),
            replicas=tuple(sorted({d for m in members for d in m.replicas})),
        ))  # fmt: skip
    return sorted(out, key=lambda r: r.ranks[0])


def _stage_lines(best: Scored, names, bounds, devices) -> tuple[str, ...]:
    c, pred = best.candidate, best.prediction
    if c.num_stages == 1:
        return ()
    pipe, p = c.layout.pipelines[0], c.layout.pipeline_degree
    lines = []
    for s in range(c.num_stages):
        a, b = bounds[s], bounds[s + 1]
        device = devices[pipe[s % p][0]].profile.name
        lines.append(
            f"stage {s} on {device} (replica 0 rank {pipe[s % p][0]}): layers {names[a]}..{names[b - 1]} "
            f"({b - a}), {format_seconds(pred.stage_times[0][s])}"
        )
    return tuple(lines)


def _reasons(result: SearchResult, cluster: Cluster) -> tuple[str, ...]:
    c, pred = result.best.candidate, result.best.prediction
    out = [
        (
            f"fastest predicted step among the plans that fit: {format_seconds(pred.step_time)}, "
            f"{format_rate(result.global_batch / pred.step_time, 'rows')}"
        )
    ]
    devices = cluster.devices()
    kinds: dict[str, list[int]] = {}
    for d, pipe in enumerate(c.layout.pipelines):
        key = " > ".join(devices[g[0]].profile.name for g in pipe)
        kinds.setdefault(key, []).append(c.rows[d])
    if len(kinds) > 1:
        shares = []
        for k, v in kinds.items():
            rows = str(v[0]) if min(v) == max(v) else f"{min(v)}-{max(v)}"
            each = " each" if len(v) > 1 else ""
            shares.append(f"{_count(len(v), 'replica')} of {k}: {rows} rows{each}")
        out.append("rows follow replica speed: " + "; ".join(shares))
    if c.num_stages > 1:
        times = pred.stage_times[0]
        out.append(
            f"{c.num_stages} stages cut so the slowest is as fast as possible: stage times "
            f"{format_seconds(min(times))} to {format_seconds(max(times))} per micro-batch "
            f"({_spread(max(times), min(times))}); {_count(c.num_micro_batch, 'micro-batch')} "
            f"keep{'s' if c.num_micro_batch == 1 else ''} the bubble at {pred.bubble:.1%}"
        )
    top = max(
        range(len(pred.rank_memory)),
        key=lambda r: pred.rank_memory[r] / pred.rank_capacity[r],
    )
    out.append(
        f"fullest device: rank {top} ({devices[top].profile.name}) uses "
        f"{format_bytes(pred.rank_memory[top])} of {format_bytes(pred.rank_capacity[top])} usable"
    )
    if max(pred.sync_time) > 0:
        tail = max(getattr(pred.sync_time, "tail", ()), default=0.0)
        tied = any(getattr(pred.sync_time, "tied", ()))
        after = (f"; up to {format_seconds(tail)} of it after: the last bucket"
                 + (" and the weights tied across stages" if tied else "")) if tail > 0 else ""  # fmt: skip
        out.append(
            f"gradient sync per position up to {format_seconds(max(pred.sync_time))} "
            f"(overlaps the last backward{after})"
        )
    if pred.straggler_wait > 0:
        spread = max(d.profile.jitter or 0.0 for d in devices)
        out.append(
            f"waiting for the slowest of {len(pred.replica_times)} replicas: {format_seconds(pred.straggler_wait)} "
            f"a step, expected (device times vary up to {spread:.0%} from step to step)"
        )
    for alt in _overflows(result):
        missing, rank = alt.prediction.shortfall
        out.append(
            f"{describe(alt.candidate, cluster)} does not fit: it needs "
            f"{alt.prediction.rank_memory[rank] / _GiB:.1f} GiB on rank {rank} ({devices[rank].profile.name}), "
            f"{missing / _GiB:.1f} GiB more than it has"
        )
    return tuple(out)


def _overflows(result: SearchResult) -> list[Scored]:
    """The shapes the search found no fitting plan of whose closest candidate overflows memory.

    The search screens a shape with estimates; the candidate it reports as closest is scored
    exactly, and may fit after all (a shortfall <= 0): that one is no overflow, and
    :func:`_alternatives` lists it with its predicted time instead.
    """
    return [alt for alt in result.overflows if alt.prediction.shortfall[0] > 0]


def _alternatives(result: SearchResult, cluster: Cluster) -> tuple[Alternative, ...]:
    devices = cluster.devices()
    out = [
        Alternative(describe(a.candidate, cluster), a.prediction.step_time, "")
        for a in result.alternatives
    ]
    for alt in result.overflows:
        if alt.prediction.shortfall[0] <= 0 and math.isfinite(alt.prediction.step_time):
            out.append(Alternative(
                describe(alt.candidate, cluster), alt.prediction.step_time,
                "fits with this many micro-batches, scored after the search had passed it over",
            ))  # fmt: skip
    for alt in _overflows(result):
        missing, rank = alt.prediction.shortfall
        out.append(Alternative(
            describe(alt.candidate, cluster), None,
            f"does not fit: needs {missing / _GiB:.1f} GiB more on rank {rank} ({devices[rank].profile.name})",
        ))  # fmt: skip
    return tuple(out)
