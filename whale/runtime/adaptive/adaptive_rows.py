"""``Config(adaptive_rows=True)``: a data-parallel program moves batch rows toward faster replicas.

Each rank notes, per step, the seconds its forward and backward took (the compute of its rows,
not the wait for the gradients of the others) and its rows. Every ``Config.adaptive_every``
steps the ranks exchange those notes in one small all-reduce (each rank writes only its own
slots, so every rank reads back the very same bits), feed them to a
:class:`~.row_balancer.RowBalancer`, and take the split it proposes: every rank computes the
same split from the same numbers, with no further collective. The program then runs a plan whose
``row_weights`` are the new rows (``program.plan.rows(total)`` gives them back exactly, other
batch sizes in proportion).

The result does not change: each replica's gradient is weighted by its share of rows (with
``loss_reduction="mean"``), so every step equals the local model's on the global batch whatever
the split. The first step is not timed (it warms up, and waits for the ranks' batch check).

Pipelines are refused (:func:`check_adaptive_plan`): a pipeline's replicas would be timed
through their stages' waits for each other, and its layers, not its rows, are what a slow stage
needs moved (plan ``stage_boundaries`` for the devices instead).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ...config import Config
from ...ir.plan import Plan
from .row_balancer import RowBalancer

__all__ = ["AdaptiveRows", "check_adaptive_plan", "compute_seconds"]


def check_adaptive_plan(plan: Plan, config: Config, fixed_rows: int | None = None) -> None:
    """Raise ValueError, before any process group is used, where ``Config(adaptive_rows=True)``
    cannot run ``plan``: pipeline stages, or a tensor-parallel graph exported for fixed rows."""
    if not config.adaptive_rows:
        return
    if plan.num_stages > 1:
        raise ValueError(
            f"Config(adaptive_rows=True) moves rows between data-parallel replicas of a plan "
            f"without pipeline stages, but this plan has {plan.num_stages} stages; a slow stage "
            "needs layers moved, not rows: drop adaptive_rows and cut the stages for the devices "
            "(Config(stage_boundaries=...) from the planner's balance)"
        )
    if fixed_rows is not None and plan.tensor_parallel > 1:
        raise ValueError(
            f"Config(adaptive_rows=True) changes each replica's rows, but the captured graph of "
            f"this tensor-parallel model runs only on micro-batches of {fixed_rows} rows "
            "(torch.export fixed the batch size); make the batch size traceable or drop adaptive_rows"
        )


def compute_seconds(timeline) -> float:
    """Seconds of a step's forward and backward intervals (``"0F3"``, ``"0B3"``) in
    ``timeline`` (``(code, begin, end)`` entries), leaving out the ``"sync"`` wait."""
    return sum(end - begin for code, begin, end in timeline if code != "sync")


class AdaptiveRows:
    """One data-parallel program's row rebalancing (see the module docstring).

    Args:
        plan: the program's plan (its replicas, micro-batches).
        config: ``adaptive_every``, ``adaptive_window`` and ``adaptive_threshold``.

    Attributes:
        balancer: the :class:`RowBalancer` (its ``moves``, ``speeds()``).

    Example::

        rebalancer = AdaptiveRows(plan, config)
        rebalancer.record(compute_seconds(timeline), my_rows)     # every step, every rank
        plan = rebalancer.after_step(plan, device)                # collective every k steps
    """

    def __init__(self, plan: Plan, config: Config) -> None:
        self.every = config.adaptive_every
        self.balancer = RowBalancer(
            plan.dp_degree,
            window=config.adaptive_window,
            threshold=config.adaptive_threshold,
            minimum=plan.num_micro_batch,
        )
        self._samples: list[tuple[float, int]] = []
        self._steps = 0

    @property
    def moves(self) -> list[tuple[int, tuple[int, ...], tuple[int, ...], float]]:
        """Every change of rows: ``(step, old_rows, new_rows, predicted_gain)``; the new rows
        hold from step ``step + 1`` (steps counted from 0)."""
        return self.balancer.moves

    def record(self, seconds: float, rows: int) -> None:
        """This rank's compute seconds and rows of the step that just ran."""
        self._steps += 1
        if self._steps > 1:  # the first step warms up and waits for the batch check
            self._samples.append((seconds, rows))

    def after_step(self, plan: Plan, device: torch.device) -> Plan:
        """Every ``every`` timed steps, exchange the notes (collective: every rank calls this
        after every step) and return the plan to run next: ``plan`` or one with new rows."""
        if len(self._samples) < self.every:
            return plan
        world, rank = dist.get_world_size(), dist.get_rank()
        notes = torch.zeros((world, self.every, 2), dtype=torch.float64, device=device)
        notes[rank] = torch.tensor(self._samples, dtype=torch.float64)
        self._samples.clear()
        # Zeros elsewhere: the sum is exact, the same bits on every rank.
        dist.all_reduce(notes)
        notes = notes.tolist()
        total = 0
        for j in range(self.every):
            # A replica of several ranks (tensor parallel) is as slow as its slowest rank.
            seconds = [max(notes[r][j][0] for r in ranks) for ranks in plan.pipelines]
            rows = [int(notes[ranks[0]][j][1]) for ranks in plan.pipelines]
            self.balancer.observe(seconds, rows)
            total = sum(rows)
        new = self.balancer.propose(plan.rows(total))
        if new is None:
            return plan
        return dataclasses.replace(plan, row_weights=tuple(float(r) for r in new), pinned_rows=None)
