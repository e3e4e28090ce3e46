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

    Attributes:
        world_size: ranks in the job.
        replica_ranks: the ranks of the data-parallel replicas, in row order.
        row_weights: each replica's share of batch rows (device speed for uneven devices).
        replica_groups: the ``replicate(device_count)`` groups: inner groups of ranks.
        num_micro_batch: micro-batches per step (gradient accumulation).
        parts: one entry per annotated part, and one for the default strategy.
        pinned_rows: rows per replica fixed by the user, or None to follow ``row_weights``.
    """

    world_size: int
    replica_ranks: tuple[int, ...]
    row_weights: tuple[float, ...]
    replica_groups: tuple[tuple[int, ...], ...]
    num_micro_batch: int = 1
    parts: tuple[PartPlan, ...] = ()
    pinned_rows: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        assert len(self.row_weights) == len(self.replica_ranks), "one weight per replica"
        assert sorted(r for g in self.replica_groups for r in g) == sorted(self.replica_ranks)

    @property
    def dp_degree(self) -> int:
        return len(self.replica_ranks)

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
        lines = [f"world_size={self.world_size}  data-parallel degree={self.dp_degree}  "
                 f"micro-batches={self.num_micro_batch}"]
        lines.append(f"{'rank':>4}  {'group':>5}  {'weight':>7}  {'rows':>6}")
        for i, rank in enumerate(self.replica_ranks):
            group = next(g for g, ranks in enumerate(self.replica_groups) if rank in ranks)
            shown = "-" if rows is None else str(rows[i])
            lines.append(f"{rank:>4}  {group:>5}  {self.row_weights[i]:>7.3g}  {shown:>6}")
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
