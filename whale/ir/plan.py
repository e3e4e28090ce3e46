"""``Plan``: the frozen, serializable answer of the planner, executed as-is by the runtime."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from .rows import split_rows

__all__ = ["PartPlan", "Plan"]

_FORMAT_VERSION = 1


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
        schedule: the pipeline schedule's name (see ``whale.ir.schedule``).
        stage_boundaries: module paths at which stages 1.. begin; empty when the stages come
            from ``stage()`` annotations.
        tensor_parallel: ranks that shard each ``split`` part (1: no tensor parallelism).
        shard_sizes: per split region (module path), the heads/columns/classes/experts each
            rank of a tensor-parallel group holds; empty for even shards.
    """

    world_size: int
    pipelines: tuple[tuple[int, ...], ...]
    row_weights: tuple[float, ...]
    replica_groups: tuple[tuple[int, ...], ...]
    num_micro_batch: int = 1
    parts: tuple[PartPlan, ...] = ()
    pinned_rows: tuple[int, ...] | None = None
    num_stages: int = 1
    schedule: str = "1f1b"
    stage_boundaries: tuple[str, ...] = ()
    tensor_parallel: int = 1
    shard_sizes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __post_init__(self) -> None:
        assert len(self.row_weights) == len(self.pipelines), "one weight per replica"
        assert sorted(r for p in self.pipelines for r in p) == list(range(self.world_size))
        assert len({len(p) for p in self.pipelines}) == 1, "pipelines of one length"
        assert len(self.pipelines[0]) % self.tensor_parallel == 0
        assert sorted(i for g in self.replica_groups for i in g) == list(range(len(self.pipelines)))
        assert self.num_stages % self.pipeline_degree == 0

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
        return tuple(r for p in self.pipelines for r in p[position * k : (position + 1) * k])

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
        return json.dumps({"version": _FORMAT_VERSION, **dataclasses.asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data: dict[str, Any] = json.loads(text)
        if data.pop("version", None) != _FORMAT_VERSION:
            raise ValueError(f"plan format version must be {_FORMAT_VERSION}")
        tup = _deep_tuple
        parts = tuple(PartPlan(**{k: tup(v) for k, v in p.items()}) for p in data.pop("parts"))
        return cls(parts=parts, **{k: tup(v) for k, v in data.items()})

    def table(self, global_batch: int | None = None) -> str:
        """A readable summary: one line per rank, then one per part."""
        rows = self.rows(global_batch) if global_batch is not None else None
        lines = [
            f"world_size={self.world_size}  data-parallel degree={self.dp_degree}  "
            f"pipeline degree={self.pipeline_degree}  tensor parallel={self.tensor_parallel}  "
            f"stages={self.num_stages}  "
            f"micro-batches={self.num_micro_batch}"
            + (f"  schedule={self.schedule}" if self.num_stages > 1 else "")
        ]
        lines.append(f"{'rank':>4}  {'replica':>7}  {'stages':>8}  {'weight':>7}  {'rows':>6}")
        for rank in range(self.world_size):
            d = self.replica_of(rank)
            stages = ",".join(map(str, self.stages_at(self.position_of(rank))))
            shown = "-" if rows is None else str(rows[d])
            lines.append(f"{rank:>4}  {d:>7}  {stages:>8}  {self.row_weights[d]:>7.3g}  {shown:>6}")
        for part in self.parts:
            lines.append(
                f"{part.name}: {part.strategy} {part.inner_degree} x {part.outer_degree} "
                f"over {', '.join(m or '<root>' for m in part.modules)}"
            )
        return "\n".join(lines)


def _deep_tuple(value: Any) -> Any:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(_deep_tuple(v) for v in value)
    return value
