"""A candidate's whole step, from its replicas' costs: the prediction and the simulated timeline.

:class:`StepView` is the part of :class:`~.predict.CostModel` that assembles what every rank
does in a step of a candidate: each replica scored as :meth:`~.predict.CostModel.replica_cost`
scores it, the step as long as the slowest replica, plus the expected wait for the slowest
where the devices' times vary from step to step (:mod:`.stragglers`; none on steady devices,
the datasheet's among them), per rank its busy time and memory (:meth:`StepView.predict`), and
the simulated intervals of every rank (:meth:`StepView.timeline`).
"""

from __future__ import annotations

import math
from collections import Counter

from ...ir.trace import Timeline, TraceEvent
from ..schedules.generate import make_schedule
from ..schedules.simulator import sim_timeline, simulate
from .candidate import Candidate, Prediction, RankLayout
from .formulas import exposed_sync
from .stragglers import straggler_wait

__all__ = ["StepView"]


class StepView:
    """Per-step views of candidates (mixed into :class:`~.predict.CostModel`, which holds the
    cluster and prices the replicas, their syncs and optimizer steps these read)."""

    def _jittery(self, layout: RankLayout) -> bool:
        """Several replicas run and some device of the cluster varies from step to step."""
        return self.varies and len(layout.pipelines) > 1

    def timeline(self, candidate: Candidate, prediction: Prediction | None = None) -> Timeline:
        """The simulated step of ``candidate`` on every rank (source ``"simulated"``).

        Each replica's schedule is simulated with the times :meth:`predict` uses
        (:func:`~.simulator.simulate`, :func:`~.simulator.sim_timeline`); every member of a
        tensor-parallel group shows its group's intervals. After the computes each position
        synchronises gradients (``"sync"``, from its last backward's start, as :meth:`predict`
        counts it), waits the expected time for the slowest replica where devices vary from step
        to step (``"sync"`` too), and steps the optimizer (``"optimizer"``). Its ``step_time``
        equals ``predict(candidate).step_time``; ``prediction``, that prediction where the caller
        has it already (the wait is read from it, not predicted again).

        Example::

            save_chrome_trace("plan.json", costs.timeline(result.best.candidate))
        """
        layout, m, s = candidate.layout, candidate.num_micro_batch, candidate.num_stages
        sync = self.sync_time(layout, s, candidate.cuts)
        wait = (prediction or self.predict(candidate)).straggler_wait if self._jittery(layout) else 0.0
        events: list[TraceEvent] = []
        for d, pipeline in enumerate(layout.pipelines):
            p = len(pipeline)
            forward, backward, p2p = self.stage_lists(pipeline, s, m, candidate.cuts, candidate.rows[d])
            schedule = make_schedule(candidate.schedule, s, m, p if candidate.schedule == "interleaved_1f1b" else None)
            result = simulate(schedule, forward, backward, p2p)
            opt = self.optimizer_times(pipeline, s, candidate.cuts)
            for member in range(max(len(g) for g in pipeline)):
                ranks = [g[min(member, len(g) - 1)] for g in pipeline]
                events += sim_timeline(result, ranks).events
                for pos, rank in enumerate(ranks):
                    computes = [t for t in result.timeline[pos] if t.action.is_compute]
                    finish = computes[-1].end if computes else 0.0
                    begin = computes[-1].start if computes else 0.0
                    end = finish
                    if sync[pos] > 0:
                        end = finish + exposed_sync(sync, pos, finish - begin)
                        events.append(TraceEvent(rank, "sync", "sync", begin, end))
                    if wait > 0:
                        events.append(TraceEvent(rank, "wait for the slowest replica", "sync", end, end + wait))
                        end += wait
                    if opt[pos] > 0:
                        events.append(TraceEvent(rank, "optimizer", "optimizer", end, end + opt[pos]))
        return Timeline("simulated", events)

    def predict(self, candidate: Candidate) -> Prediction:
        """Score every replica exactly and assemble the per-rank view.

        Example::

            prediction = costs.predict(candidate)
            prediction.step_time, prediction.fits, prediction.shortfall
        """
        layout = candidate.layout
        sync = self.sync_time(layout, candidate.num_stages, candidate.cuts)
        world = self.cluster.world_size
        busy, memory = [0.0] * world, [0] * world
        times, stage_times, opt = [], [], [0.0] * layout.pipeline_degree
        jittery = self._jittery(layout)
        spreads: list[float] = []
        alike: dict = {}  # replicas on the same devices and links with the same rows cost the same
        stepped = set()  # replicas on the same devices step their optimizers alike
        for d, pipeline in enumerate(layout.pipelines):
            kind, devices = self._replica_kind(pipeline)
            key = (kind, candidate.rows[d])
            if key not in alike:
                alike[key] = self.replica_cost(pipeline, candidate.num_stages, candidate.schedule,
                                               candidate.num_micro_batch, candidate.cuts, candidate.rows[d], sync)  # fmt: skip
            cost = alike[key]
            if devices not in stepped:
                stepped.add(devices)
                opt = [max(a, b) for a, b in zip(opt, self.optimizer_times(pipeline, candidate.num_stages, candidate.cuts))]
            times.append(cost.time)
            if jittery:  # the time varies by the spread of its most varying device, on its busiest position
                spreads.append(max(self.device_of[r].jitter or 0.0 for g in pipeline for r in g) * max(cost.busy))
            stage_times.append(cost.stage_times)
            for pos, group in enumerate(pipeline):
                for rank, need in zip(group, cost.memory[pos]):
                    busy[rank], memory[rank] = cost.busy[pos], need
        finite = [t for t in times if math.isfinite(t)]
        step = max(times) if len(finite) == len(times) else math.inf
        wait = 0.0
        if jittery and math.isfinite(step) and len(times) > 1:
            wait = straggler_wait((t, spread, n) for (t, spread), n in Counter(zip(times, spreads)).items())
        return Prediction(
            step_time=step + wait,
            replica_times=tuple(times),
            rank_busy=tuple(busy),
            rank_memory=tuple(memory),
            rank_capacity=self.capacities(),
            stage_times=tuple(stage_times),
            sync_time=sync,
            optimizer_time=tuple(opt),
            straggler_wait=wait,
        )
