"""``Plan``: the frozen, serializable answer of the planner, executed as-is by the runtime."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from .rows import split_rows
from .schedule import Schedule, format_schedule, parse_schedule
from .schedule_check import validate

__all__ = ["OFFLOAD_KINDS", "PartPlan", "Plan"]

OFFLOAD_KINDS = ("none", "optimizer", "params")

_FORMAT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class PartPlan:
    """How one annotated part of the model runs.

    Attributes:
        name: readable id, e.g. ``"replicate#0"`` (annotations numbered by first appearance).
        strategy: ``"replicate"`` for now.
        modules: module paths whose computation belongs to this part (outermost only).
        inner_degree: devices that hold one copy each inside a group (``replicate(device_count)``).
        outer_degree: groups of ``inner_degree`` devices that replicate the part again.
    """

    name: str
    strategy: str
    modules: tuple[str, ...]
    inner_degree: int
    outer_degree: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where every part runs, for a world of ``world_size`` ranks.

    Ranks form ``dp_degree`` data-parallel replicas; each replica is a pipeline of
    ``pipeline_degree`` positions (one when there are no stages), and each position is a
    tensor-parallel group of ``tensor_parallel`` ranks. Stage ``s`` runs on position
    ``s % pipeline_degree`` of every pipeline (interleaved schedules put several stages on one
    position).

    Attributes:
        world_size: ranks in the job.
        pipelines: per replica, its ranks by pipeline position and, within a position, by
            tensor-parallel index; ``((0,), (1,))`` is plain data parallel on two ranks,
            ``((0, 2), (1, 3))`` two pipelines of two stages, ``((0, 1), (2, 3))`` with
            ``tensor_parallel=2`` two replicas of a model sharded over two ranks.
        row_weights: each replica's share of batch rows (device speed for uneven devices).
        replica_groups: the ``replicate(device_count)`` groups, as replica indices.
        num_micro_batch: micro-batches per step.
        parts: one entry per annotated part, and one for the default strategy.
        pinned_rows: rows per replica fixed by the user, or None to follow ``row_weights``.
        num_stages: pipeline stages (1: no pipeline).
        schedule: the pipeline schedule the runtime executes, one action list per pipeline
            position (see :mod:`whale.ir.schedule`); None without stages.
        stage_boundaries: module paths at which stages 1.. begin; empty when the stages come
            from ``stage()`` annotations.
        tensor_parallel: ranks that shard each ``split`` part (1: no tensor parallelism).
        shard_sizes: per split region (module path), the heads/columns/classes/experts each
            rank of a tensor-parallel group holds; empty for even shards.
        activation_checkpointing: module paths whose activations are recomputed in backward
            (``Config(activation_checkpointing=...)``, or the planner's choice under ``"auto"``).
        zero_stage: ZeRO stage over each data-parallel group (0: none; 1 optimizer state,
            2 also gradients, 3 also parameters sharded), ``Config(zero_stage=...)``.
        offload: ``"none"``, ``"optimizer"`` (optimizer state in host memory) or ``"params"``
            (the sharded parameters too), ``Config(offload=...)``.
    """

    world_size: int
    pipelines: tuple[tuple[int, ...], ...]
    row_weights: tuple[float, ...]
    replica_groups: tuple[tuple[int, ...], ...]
    num_micro_batch: int = 1
    parts: tuple[PartPlan, ...] = ()
    pinned_rows: tuple[int, ...] | None = None
    num_stages: int = 1
    schedule: Schedule | None = None
    stage_boundaries: tuple[str, ...] = ()
    tensor_parallel: int = 1
    shard_sizes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    activation_checkpointing: tuple[str, ...] = ()
    zero_stage: int = 0
    offload: str = "none"

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"Plan({field}=...): {why}")

        self._check_memory_options(bad)

        if not self.pipelines or len({len(p) for p in self.pipelines}) != 1:
            raise bad(
                "pipelines",
                f"{self.pipelines!r} must be one or more pipelines of one length",
            )
        if sorted(r for p in self.pipelines for r in p) != list(range(self.world_size)):
            raise bad(
                "pipelines",
                f"{self.pipelines!r} must hold every rank 0..{self.world_size - 1} once",
            )
        if len(self.row_weights) != len(self.pipelines):
            raise bad(
                "row_weights",
                f"{len(self.row_weights)} weights for {len(self.pipelines)} replicas",
            )
        if self.tensor_parallel < 1 or len(self.pipelines[0]) % self.tensor_parallel:
            raise bad(
                "tensor_parallel",
                f"{self.tensor_parallel} does not divide a pipeline of {len(self.pipelines[0])} ranks",
            )
        if sorted(i for g in self.replica_groups for i in g) != list(
            range(len(self.pipelines))
        ):
            raise bad(
                "replica_groups",
                f"{self.replica_groups!r} must hold every replica index once",
            )
        if self.num_stages < 1 or self.num_stages % self.pipeline_degree:
            raise bad(
                "num_stages",
                f"{self.num_stages} is not a multiple of the pipeline degree {self.pipeline_degree}",
            )
        if self.num_stages == 1:
            if self.schedule is not None:
                raise bad("schedule", "a plan without stages has no schedule")
            return
        if not isinstance(self.schedule, Schedule):
            raise bad(
                "schedule",
                f"a plan of {self.num_stages} stages needs its Schedule, got {self.schedule!r}",
            )
        sched = self.schedule
        if (sched.num_stages, sched.num_micro_batch, sched.num_ranks) != (
            self.num_stages,
            self.num_micro_batch,
            self.pipeline_degree,
        ):
            raise bad(
                "schedule",
                f"{sched.name} is for {sched.num_stages} stages, {sched.num_micro_batch} micro-batches "
                f"on {sched.num_ranks} ranks; the plan has {self.num_stages}, {self.num_micro_batch} "
                f"and {self.pipeline_degree}",
            )
        if tuple(sched.stage_to_rank) != tuple(
            s % self.pipeline_degree for s in range(self.num_stages)
        ):
            raise bad(
                "schedule",
                f"places stages on ranks {list(sched.stage_to_rank)}; stage s runs at position s % {self.pipeline_degree}",
            )

    def _check_memory_options(self, bad) -> None:
        if isinstance(self.activation_checkpointing, str) or not all(
            isinstance(p, str) and p for p in self.activation_checkpointing
        ):
            raise bad("activation_checkpointing", f"{self.activation_checkpointing!r} must be module paths")
        if isinstance(self.zero_stage, bool) or self.zero_stage not in (0, 1, 2, 3):
            raise bad("zero_stage", f"{self.zero_stage!r} must be 0, 1, 2 or 3")
        if self.offload not in OFFLOAD_KINDS:
            raise bad("offload", f"{self.offload!r}: choose one of {list(OFFLOAD_KINDS)}")

    def memory_options(self) -> str:
        """The memory-saving options this plan runs, readable (``"none"`` without any)."""
        parts = []
        if self.activation_checkpointing:
            shown = ", ".join(self.activation_checkpointing[:4])
            more = len(self.activation_checkpointing) - 4
            parts.append(
                f"activation checkpointing of {len(self.activation_checkpointing)} module(s) ({shown}"
                + (f" and {more} more" if more > 0 else "") + ")"
            )
        if self.zero_stage:
            parts.append(f"ZeRO stage {self.zero_stage}")
        if self.offload != "none":
            parts.append(f"offload {self.offload} to host memory")
        return "; ".join(parts) or "none"

    @property
    def dp_degree(self) -> int:
        return len(self.pipelines)

    @property
    def pipeline_degree(self) -> int:
        return len(self.pipelines[0]) // self.tensor_parallel

    def replica_of(self, rank: int) -> int:
        """The data-parallel replica ``rank`` belongs to."""
        return next(d for d, ranks in enumerate(self.pipelines) if rank in ranks)

    def position_of(self, rank: int) -> int:
        """``rank``'s position in its pipeline."""
        return self.pipelines[self.replica_of(rank)].index(rank) // self.tensor_parallel

    def tensor_group_of(self, rank: int) -> tuple[int, ...]:
        """The ranks that shard the same part as ``rank`` (``rank`` alone without tensor parallelism)."""
        ranks = self.pipelines[self.replica_of(rank)]
        start = ranks.index(rank) // self.tensor_parallel * self.tensor_parallel
        return ranks[start : start + self.tensor_parallel]

    def data_group_of(self, rank: int) -> tuple[int, ...]:
        """The ranks holding the same parameters (shards) as ``rank``, one per replica."""
        index = self.pipelines[self.replica_of(rank)].index(rank)
        return tuple(p[index] for p in self.pipelines)

    def stages_at(self, position: int) -> tuple[int, ...]:
        """The stages run by the ranks at ``position`` of every pipeline."""
        return tuple(range(position, self.num_stages, self.pipeline_degree))

    def position_ranks(self, position: int) -> tuple[int, ...]:
        """The ranks at ``position`` across replicas: they hold the same stages."""
        k = self.tensor_parallel
        return tuple(
            r for p in self.pipelines for r in p[position * k : (position + 1) * k]
        )

    def rows(self, total: int) -> tuple[int, ...]:
        """Rows each replica takes from a global batch of ``total`` rows."""
        if self.pinned_rows is not None:
            if sum(self.pinned_rows) != total:
                raise ValueError(
                    f"the plan pins rows {list(self.pinned_rows)} (sum {sum(self.pinned_rows)}) "
                    f"per replica, but the batch has {total} rows; pass batches of "
                    f"{sum(self.pinned_rows)} rows or re-plan"
                )
            return self.pinned_rows
        return split_rows(total, self.row_weights)

    def to_json(self) -> str:
        """The plan as JSON; :meth:`from_json` reads it back equal, schedule included."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["parts"] = [dataclasses.asdict(part) for part in self.parts]
        data["schedule"] = (
            None
            if self.schedule is None
            else format_schedule(self.schedule).splitlines()
        )
        return json.dumps({"version": _FORMAT_VERSION, **data}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Read :meth:`to_json`'s form; a missing, unknown or malformed field is a ValueError
        naming it."""
        try:
            data: Any = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"a plan is JSON; this text is not: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"a plan is a JSON object, got {type(data).__name__}")
        if data.pop("version", None) != _FORMAT_VERSION:
            raise ValueError(
                f"plan format version must be {_FORMAT_VERSION}; re-plan with this whale"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(
                f"plan field(s) {unknown} are unknown; known fields: {sorted(fields)}"
            )
        missing = sorted(
            n
            for n, f in fields.items()
            if n not in data and f.default is dataclasses.MISSING
        )
        if missing:
            raise ValueError(f"plan field(s) {missing} are missing")
        values: dict[str, Any] = {}
        for name, value in data.items():
            try:
                values[name] = _READERS.get(name, _deep_tuple)(value)
            except (TypeError, ValueError, KeyError) as err:
                raise ValueError(f"plan field {name!r} is malformed: {err}") from None
        return cls(**values)

    def table(self, global_batch: int | None = None) -> str:
        """A readable summary: one line per rank, then one per part."""
        rows = self.rows(global_batch) if global_batch is not None else None
        lines = [
            f"world_size={self.world_size}  data-parallel degree={self.dp_degree}  "
            f"pipeline degree={self.pipeline_degree}  tensor parallel={self.tensor_parallel}  "
            f"stages={self.num_stages}  "
            f"micro-batches={self.num_micro_batch}"
            + (f"  schedule={self.schedule.name}" if self.schedule is not None else "")
        ]
        lines.append(
            f"{'rank':>4}  {'replica':>7}  {'stages':>8}  {'weight':>7}  {'rows':>6}"
        )
        for rank in range(self.world_size):
            d = self.replica_of(rank)
            stages = ",".join(map(str, self.stages_at(self.position_of(rank))))
            shown = "-" if rows is None else str(rows[d])
            lines.append(
                f"{rank:>4}  {d:>7}  {stages:>8}  {self.row_weights[d]:>7.3g}  {shown:>6}"
            )
        for part in self.parts:
            copies = part.inner_degree * part.outer_degree
            groups = f"{part.outer_degree} group{'s' * (part.outer_degree != 1)}"
            devices = f"{part.inner_degree} device{'s' * (part.inner_degree != 1)}"
            lines.append(
                f"{part.name}: {part.strategy} over {', '.join(m or '<root>' for m in part.modules)}: "
                f"{copies} cop{'ies' if copies != 1 else 'y'} ({groups} of {devices}, one copy per device)"
            )
        if self.memory_options() != "none":
            lines.append(f"memory options: {self.memory_options()}")
        return "\n".join(lines)


def _deep_tuple(value: Any) -> Any:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(_deep_tuple(v) for v in value)
    return value


def _read_schedule(lines: Any) -> Schedule | None:
    if lines is None:
        return None
    if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
        raise TypeError("the schedule is a list of lines of its text form")
    schedule = parse_schedule("\n".join(lines))
    validate(schedule)
    return schedule


def _read_parts(parts: Any) -> tuple[PartPlan, ...]:
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        raise TypeError("parts is a list of objects")
    return tuple(PartPlan(**{k: _deep_tuple(v) for k, v in p.items()}) for p in parts)


def _read_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not an int")
    return value


_READERS = {
    "schedule": _read_schedule,
    "parts": _read_parts,
    "world_size": _read_int,
    "num_micro_batch": _read_int,
    "num_stages": _read_int,
    "tensor_parallel": _read_int,
    "zero_stage": _read_int,
}
