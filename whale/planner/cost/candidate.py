"""What the search chooses and what the cost model answers: a candidate plan's layout and
choices (:class:`Candidate`, :class:`RankLayout`) and its predicted cost (:class:`ReplicaCost`,
:class:`Prediction`), frozen data scored by :class:`~.predict.CostModel`."""

from __future__ import annotations

import dataclasses
import math

__all__ = ["Candidate", "Prediction", "RankLayout", "ReplicaCost"]


@dataclasses.dataclass(frozen=True)
class RankLayout:
    """Which ranks form each tensor-parallel group, replica and pipeline position.

    ``pipelines[d][p]`` is the tensor-parallel group (its ranks) at position ``p`` of replica
    ``d``; with ``tensor_parallel == 1`` every group is one rank.
    """

    tensor_parallel: int
    pipelines: tuple[tuple[tuple[int, ...], ...], ...]

    @property
    def dp_degree(self) -> int:
        return len(self.pipelines)

    @property
    def pipeline_degree(self) -> int:
        return len(self.pipelines[0])


@dataclasses.dataclass(frozen=True)
class Candidate:
    """Every choice of a plan: layout, stages, cuts (first layer of stages 1..), schedule, rows."""

    layout: RankLayout
    num_stages: int
    schedule: str
    num_micro_batch: int
    cuts: tuple[int, ...]
    rows: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ReplicaCost:
    """One replica with ``rows`` rows: its time and, per position, busy time and bytes needed."""

    time: float
    busy: tuple[float, ...]
    memory: tuple[tuple[int, ...], ...]  # per position, per member of its tensor-parallel group
    stage_times: tuple[float, ...]  # forward + backward of one micro-batch per stage
    row_limit: float  # most rows whose micro-batches fit in every member's memory

    @property
    def fits(self) -> bool:
        return math.isfinite(self.time)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What a candidate costs: step time, and per rank its busy time, memory and capacity."""

    step_time: float
    replica_times: tuple[float, ...]
    rank_busy: tuple[float, ...]
    rank_memory: tuple[int, ...]
    rank_capacity: tuple[int, ...]
    stage_times: tuple[tuple[float, ...], ...]  # per replica, per stage (f + b of a micro-batch)
    sync_time: tuple[float, ...]  # gradient all-reduce per position
    optimizer_time: tuple[float, ...] = ()  # optimizer step per position (slowest replica's)
    straggler_wait: float = 0.0  # in step_time: the expected wait for the slowest replica (stragglers)

    @property
    def fits(self) -> bool:
        return all(m <= c for m, c in zip(self.rank_memory, self.rank_capacity))

    @property
    def shortfall(self) -> tuple[int, int]:
        """``(bytes missing, rank)`` on the rank that overflows most (<= 0 bytes: it fits)."""
        return max((m - c, r) for r, (m, c) in enumerate(zip(self.rank_memory, self.rank_capacity)))

    @property
    def bubble(self) -> float:
        busy = sum(self.rank_busy)
        return 1 - busy / (len(self.rank_busy) * self.step_time) if self.step_time > 0 else 0.0
