"""The search space: every structure the search may choose, its lower bound, and its arrays.

A *structure* fixes the tensor-parallel degree ``t``, the pipeline degree ``p``, the virtual
stages per rank ``v``, a rank layout (:mod:`~.layouts`), the schedule and the micro-batch count
``m``; the search then chooses cuts and rows for it. :class:`SearchSpace` enumerates structures
(keeping the user's pins), bounds each from below, groups replicas into kinds, and builds the
per-stage time and memory prefix sums that :func:`~.balance.partition_layers` cuts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np

from ...ir.cluster_spec import Cluster
from ..cost.formulas import tensor_parallel_time
from ..cost.predict import Candidate, CostModel, RankLayout
from ..schedules.flow_shop import peak_held_bound
from .balance import partition_layers
from .memory_floor import MemoryFloor
from .pins import Pins
from .rank_layouts import layouts, tensor_groups

__all__ = ["SearchSettings", "SearchSpace", "Structure", "describe"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchSettings:
    """Bounds of the search space and of its effort.

    Example::

        SearchSettings(allow_tensor_parallel=False)   # only plans the runtime executes today
    """

    allow_tensor_parallel: bool = True
    max_tensor_parallel: int = 8
    tensor_parallel_degrees: tuple[int, ...] | None = None
    """The degrees above 1 the rewrite can shard the model's split() parts into (None: any)."""
    max_interleave: int = 2
    """Most virtual stages per rank for ``interleaved_1f1b``."""
    finalists: int = 6
    """Structures re-scored exactly at least, best screening estimates first."""
    max_finalists: int = 32
    refine_margin: float = 0.25
    """Keep re-scoring while an estimate is within this share of the best exact time."""
    alternatives: int = 5
    climb_stages: int = 8
    """Screening moves cuts one layer at a time for pipelines of at most this many stages."""
    exhaustive_cuts: int = 64
    """Refinement tries every way to cut when there are at most this many."""
    screen_cuts: int = 16
    """Screening tries every way to cut when there are at most this many (else balanced cuts)."""
    simulate_below: int = 256
    """Screening runs the schedule (not the closed form) when stages x micro-batches is below."""



@dataclasses.dataclass(frozen=True)
class Structure:
    """What the search fixes before choosing cuts and rows, with a lower bound on its step."""

    bound: float
    layout: RankLayout
    num_stages: int
    schedule: str
    num_micro_batch: int


def describe(candidate: Candidate, cluster: Cluster) -> str:
    """One line naming a candidate's shape, e.g. ``dp 4 x pp 2 x tp 1, 1f1b, 8 micro-batches``."""
    layout = candidate.layout
    p, s = layout.pipeline_degree, candidate.num_stages
    stages = f"pp {p}" + (f" ({s // p} stages each)" if s > p else "")
    names = [d.profile.name for d in cluster.devices()]
    kinds = {tuple(names[g[0]] for g in pipe) for pipe in layout.pipelines}
    if len(kinds) == 1 and p > 1:
        where = "every pipeline " + " > ".join(_runs(next(iter(kinds))))
    elif p > 1:
        where = f"{len(kinds)} kinds of pipeline"
    else:
        where = ", ".join(f"{sum(n == k for n in names)}x{k}" for k in dict.fromkeys(names))
    return (
        f"dp {layout.dp_degree} x {stages} x tp {layout.tensor_parallel}, "
        f"{candidate.schedule if s > 1 else 'no pipeline'}, {candidate.num_micro_batch} "
        f"micro-batch{'es' if candidate.num_micro_batch != 1 else ''}; {where}"
    )


def _runs(seq: Sequence[str]) -> list[str]:
    out: list[list] = []
    for name in seq:
        if out and out[-1][0] == name:
            out[-1][1] += 1
        else:
            out.append([name, 1])
    return [f"{n}x{c}" if c > 1 else n for n, c in out]


def _micro_batches(max_m: int, p: int, v: int) -> list[int]:
    """Micro-batch counts to try: all of them when few, else a ladder (powers of 2, multiples of p)."""
    if max_m <= 32:
        choices = set(range(1, max_m + 1))
    elif p == 1:
        choices = {2**k for k in range(12)} | {max_m}  # accumulation only saves memory
    else:
        choices = {k * p for k in range(1, 9)} | {2**k for k in range(12)} | {max_m}
        choices |= {round(max_m / k) for k in range(1, 5)}
    if v > 1:
        choices = {m for m in choices if m % p == 0}
    return sorted(m for m in choices if 1 <= m <= max_m)


def _bound_weights(totals: np.ndarray, m: int, one_stage_each: bool) -> list[np.ndarray]:
    """Weights ``mu_r`` of the rank times in :meth:`SearchSpace.bound`, given whole-model times.

    One stage per rank: the dual of the linear program over work shares, solved backwards
    (``mu_r = m lambda_r + sum_{j>r} lambda_j``, each ``lambda_r`` the least that keeps
    ``mu_r >= 1 / totals_r``, then scaled to add up to one). Interleaved: the work constraints
    weighted by speed, and the path alone.
    """
    speeds = 1 / totals
    if not one_stage_each:
        return [m * speeds / speeds.sum(), np.ones_like(speeds)]
    lam, later = np.zeros_like(speeds), 0.0
    for r in reversed(range(len(speeds))):
        lam[r] = max(0.0, (speeds[r] - later) / m)
        later += lam[r]
    mu = m * lam + (later - np.cumsum(lam))
    return [mu / later]


class SearchSpace:
    """Structures of one model on one cluster, their bounds, replica kinds and stage arrays."""

    def __init__(self, profile, cluster, batch, options, pins, settings, *, costs: CostModel | None = None):
        self.profile, self.cluster, self.batch = profile, cluster, batch
        self.pins, self.settings = pins, settings
        self.costs = costs or CostModel(profile, cluster, options)
        self.n = profile.num_layers
        self.cuttable = [layer.cuttable for layer in profile.layers]
        self.device_of = self.costs.device_of
        self._speeds: dict = {}  # bound's memo, shared by share_structures (its keys name the recomputation)
        self._recomputed_key: tuple = (None, None)  # (recomputed, its bytes)
        self._group_keys: dict = {}  # group -> its devices by name and its link (_group_key)
        self._bound_rows: dict = {}  # (group kind, rows, recomputation) -> bound's time per layer
        self._unfit: dict = {}  # (layout, stages, schedule) -> its least-memory structure does not fit
        self._screens: dict = {}  # id(structure) -> (structure, Explorer.screen's answer)
        self._best_exact = math.inf
        self._prefixes: dict = {}
        self._partitions: dict = {}
        self._replica_memo: dict = {}  # (pipeline, stages, schedule, m, cuts, rows, sync, exact) -> ReplicaCost
        self._floor_memo: dict = {}  # (pipeline, stages, m, cuts, rows, sync) -> a floor under its exact time
        self._memory_memo: dict = {}  # (pipeline, stages, schedule, m, cuts, rows) -> replica memory
        self._sync_memo: dict = {}  # (layout, stages, cuts) -> the gradient all-reduce per position
        self._arrays: dict = {}
        self._classes: dict = {}
        self.floor = MemoryFloor(self.costs, self.cuttable)
        self.pruned: list[Structure] = []
        """Structures the memory floor dropped: no plan of theirs fits (bound order)."""
        self.recomputed: np.ndarray | None = None
        """Per layer, the FLOPs its backward runs again (activation checkpointing); :meth:`bound`
        counts them (:mod:`~.memory_options` sets it)."""
        self._enumerated: list | None = None  # (layout, classes, key, stages, schedules, micro-batches)
        self._structures: list[Structure] | None = None

    # --- structures ---------------------------------------------------------------------------

    def structures(self) -> list[Structure]:
        """Every structure that may fit, by lower bound; those that cannot go to ``pruned`` (memoised)."""
        if self._structures is not None:
            return self._structures
        out, pruned = [], []
        for layout, classes, key, s, scheds, ms in self.enumerate():
            for sched in scheds:
                for m in ms:
                    st = Structure(self.bound(layout, s, m), layout, s, sched, m)
                    # No cuts and rows fit: drop it before screening (kept to explain).
                    fits = self.floor.may_fit(classes, s, sched, m, self.batch, cuts=self.pins.cuts, key=key)
                    (out if fits else pruned).append(st)
        self.pruned = sorted(pruned, key=lambda x: x.bound)
        self._structures = sorted(out, key=lambda x: x.bound)
        return self._structures

    def share_structures(self, other: SearchSpace) -> None:
        """Enumerate ``other``'s structures (the same model, cluster, pins and settings under
        other memory options): its layouts, replica kinds and their keys are reused, not rebuilt."""
        self._enumerated = other.enumerate()
        self._classes = other._classes
        # Bounds read layer times and the recomputation only, never memory: shared too.
        self._speeds = other._speeds

    def enumerate(self) -> list[tuple]:
        """Per rank layout and stage count: ``(layout, classes, key, stages, schedules,
        micro-batch counts)`` the pins and settings allow (memoised; no bounds, no memory)."""
        if self._enumerated is not None:
            return self._enumerated
        pins, out = self.pins, []
        degrees = [pins.tensor_parallel] if pins.tensor_parallel else [
            t for t in (1, 2, 4, 8, 16) if t <= self.settings.max_tensor_parallel
        ]
        if not self.settings.allow_tensor_parallel and not pins.tensor_parallel:
            degrees = [1]
        if self.settings.tensor_parallel_degrees is not None:
            degrees = [t for t in degrees if t == 1 or t in self.settings.tensor_parallel_degrees]
        if pins.needs_tensor_parallel:
            degrees = [t for t in degrees if t >= 2]
        if pins.replica_groups is not None:
            degrees = [1]
        for t in degrees:
            groups = tensor_groups(self.cluster, t)
            if groups is None:
                continue
            units = len(groups)
            for p in range(1, units + 1):
                if units % p or (pins.pipeline_degree and p != pins.pipeline_degree):
                    continue
                dp = units // p
                if dp > self.batch or (pins.replica_group and dp % pins.replica_group):
                    continue
                if pins.row_weights is not None and len(pins.row_weights) != dp:
                    continue
                if pins.replica_groups is not None and p != 1:
                    continue
                for v in range(1, self.settings.max_interleave + 1 if p > 1 else 2):
                    s = p * v
                    if s > self.n or (pins.num_stages and s != pins.num_stages):
                        continue
                    if pins.num_stages is None and pins.cuts is None and sum(self.cuttable[1:]) < s - 1:
                        continue  # more stages than places to begin one
                    scheds = ["1f1b"] if s == 1 else ["gpipe", "1f1b"] if v == 1 else ["interleaved_1f1b"]
                    if pins.schedule:
                        scheds = [x for x in scheds if x == pins.schedule] if s > 1 else []
                    if not scheds:
                        continue
                    ms = _micro_batches(self.batch // dp, p, v)
                    if pins.num_micro_batch:
                        ms = [m for m in ms if m == pins.num_micro_batch]
                        if pins.num_micro_batch <= self.batch // dp and not ms and (v == 1 or pins.num_micro_batch % p == 0):
                            ms = [pins.num_micro_batch]
                    if not ms:
                        continue
                    for layout in layouts(self.cluster, t, p):
                        classes = self.classes(layout)
                        key = (tuple((self._class_key(pipe), count) for pipe, count in classes), layout.dp_degree)
                        out.append((layout, classes, key, s, tuple(scheds), tuple(ms)))
        self._enumerated = out
        return out

    def bound(self, layout: RankLayout, s: int, m: int) -> float:
        """A lower bound on the step time of any plan of this structure.

        Rank ``r`` of a pipeline cannot start before micro-batch 0 has come through the stages
        before it, does ``m`` micro-batches of its own work ``c_r``, and cannot finish before
        the last gradient has gone back through them: ``T >= sum_{j<r} c_j + m c_r`` (all three
        schedules). With interleaving only ``T >= m c_r`` and micro-batch 0's path
        ``T >= sum_r c_r`` hold. Any weights ``lambda >= 0`` adding up to one combine these
        into ``T >= sum_r mu_r c_r``, and since each layer runs on some rank,
        ``T >= sum_i min_r mu_r t_ir`` (layer ``i`` takes ``t_ir`` on rank ``r``): a bound for
        every cut, even when one device is relatively faster on some layers than another (a
        bound from whole-model speeds alone is not). The weights are those that make it exact
        when layer times are proportional across ranks (:func:`_bound_weights`). Rows then go
        where they cost least: ``T >= B / sum_d capacity_d``.
        """
        # Per-row times shrink as micro-batches grow (fixed reads amortise): rate every replica
        # at the largest micro-batch any replica could get, so that the bound stays below.
        q = (self.batch - (layout.dp_degree - 1) * m) / m
        recomputed = self.recomputed
        if recomputed is not None and self._recomputed_key[0] is not recomputed:
            self._recomputed_key = (recomputed, recomputed.tobytes())
        key = (id(layout), round(q, 9), m, s, None if recomputed is None else self._recomputed_key[1])
        if key not in self._speeds:
            total = 0.0
            for pipe, count in self.classes(layout):
                times = np.array([self._bound_row(g, q, key[-1]) for g in pipe])
                floor = max(float(np.min(mu[:, None] * times, axis=0).sum())
                            for mu in _bound_weights(times.sum(axis=1), m, s == layout.pipeline_degree))  # fmt: skip
                total += count * m * q / floor
            self._speeds[key] = self.batch / total
        return self._speeds[key]

    def _bound_row(self, group: tuple[int, ...], q: float, recomputed_key) -> np.ndarray:
        """Per layer, the time :meth:`bound` rates ``group`` at (memoised on what
        :meth:`_group_arrays` reads of the group, as that is: ranks of one kind share it)."""
        key = (self._group_key(group), round(q, 9), recomputed_key)
        found = self._bound_rows.get(key)
        if found is None:
            # Forward and backward: three times the compute, the all-reduces twice (once each way).
            forward, *_, comm = self._group_arrays(group, q)
            found = self._bound_rows[key] = 3 * forward - comm + self._recompute_floor(group, q)
        return found

    def _recompute_floor(self, group: tuple[int, ...], q: float) -> np.ndarray | float:
        """Per layer, at least the time its backward spends running its forward again.

        A checkpointed stage's backward runs its forward once more by the checkpointed layers'
        share of its FLOPs (:meth:`~.memory_options.OptionCostModel.stage_lists`): at least those
        FLOPs at the group's least forward time per FLOP over the layers that have FLOPs.
        """
        if self.recomputed is None:
            return 0.0
        forward = self._group_arrays(group, q)[0]
        flops = self._layer_flops
        has = flops > 0
        if not has.any():
            return 0.0
        return self.recomputed * float(np.min(forward[has] / flops[has]))

    @functools.cached_property
    def _layer_flops(self) -> np.ndarray:
        return np.array([float(x.total_flops) for x in self.profile.layers])

    def classes(self, layout: RankLayout) -> list[tuple[tuple, int]]:
        """Replicas grouped by what their time depends on: (representative, count)."""
        if id(layout) in self._classes:
            return self._classes[id(layout)][0]
        found: dict[tuple, list] = {}
        class_of = []
        for pipe in layout.pipelines:
            key = self._class_key(pipe)
            entry = found.setdefault(key, [pipe, 0, len(found)])
            entry[1] += 1
            class_of.append(entry[2])
        order = sorted(found.values(), key=lambda x: -x[1])
        renumber = {entry[2]: k for k, entry in enumerate(order)}
        result = [(pipe, count) for pipe, count, _ in order]
        self._classes[id(layout)] = (result, [renumber[c] for c in class_of], layout)
        return result

    def stage_prefixes(self, pipes: Sequence[tuple[tuple, int]], s: int, schedule: str, m: int, q: float):
        """Per stage: time prefix (f + b), memory prefix, capacity and cut cost (memoised).

        Cuts hardly move with the micro-batch size, so ``q`` is rounded up to a quarter octave
        (memory stays on the safe side) and structures that differ only there share a partition.
        """
        q = 2 ** (math.ceil(math.log2(q) * 4) / 4)
        held = peak_held_bound(schedule, len(pipes[0][0]), m, [1.0] * s)
        key = (tuple((self._class_key(pipe), count) for pipe, count in pipes), s, schedule, held, q)
        if key not in self._prefixes:
            self._prefixes[key] = self._stage_prefixes(pipes, s, schedule, m, q)
        return self._prefixes[key]

    def _stage_prefixes(self, pipes: Sequence[tuple[tuple, int]], s: int, schedule: str, m: int, q: float):
        """Per stage: time prefix (f + b), memory prefix, capacity and cut cost, pooled over ``pipes``.

        The cut cost of a stage ending before layer ``b`` is sending what crosses ``b`` forward
        and its gradient back: latency the schedule cannot always hide. Stages on the same kind
        of device groups share their arrays.
        """
        p = len(pipes[0][0])
        held = peak_held_bound(schedule, p, m, [1.0] * s)
        v = s // p
        times, mems, caps, ends = [], [], [], []
        sizes = self.costs.cut_bytes * q
        zero = np.zeros(self.n + 1)
        made: dict = {}
        for j in range(s):
            pos, nxt = j % p, (j + 1) % p
            groups = tuple((self._class_key((pipe[pos],)), count) for pipe, count in pipes)
            if (groups, held[pos]) not in made:
                speed, mem, cap = 0.0, None, math.inf
                for pipe, count in pipes:
                    layer_time, state, act, group_cap, comm = self._group_arrays(pipe[pos], q)
                    speed = speed + count / (3.0 * layer_time - comm)  # f + b: the all-reduces twice
                    # A rank's v stages share its capacity and its held micro-batches.
                    stage_mem = state + act * (math.ceil(q) * held[pos] / v)
                    mem = stage_mem if mem is None else np.maximum(mem, stage_mem)
                    cap = min(cap, group_cap / v)
                made[groups, held[pos]] = (np.concatenate([[0.0], np.cumsum(1.0 / speed)]), mem, cap)
            time_prefix, mem, cap = made[groups, held[pos]]
            end = zero
            if j < s - 1:
                links = tuple({self.costs.link(pipe[pos][0], pipe[nxt][0]) for pipe, _ in pipes if pipe[pos][0] != pipe[nxt][0]})
                if links and links not in made:
                    made[links] = end = zero.copy()
                    for link in links:
                        end[:-1] = np.maximum(end[:-1], 2 * (link.latency + sizes / link.bandwidth))
                end = made[links] if links else zero
            times.append(time_prefix)
            mems.append(mem)
            caps.append(cap)
            ends.append(end)
        return times, mems, caps, ends

    def _group_key(self, group: tuple[int, ...]) -> tuple:
        """What :meth:`_group_arrays` reads of a group: its devices by name and its link
        (memoised; the groups of one kind share it)."""
        found = self._group_keys.get(group)
        if found is None:
            found = self._group_keys[group] = (tuple(self.device_of[r].name for r in group), self.costs.group_link(group))
        return found

    def _group_arrays(self, group: tuple[int, ...], q: float):
        """Per layer forward time of a group (comm included), state and activation prefixes,
        the capacity they are scaled to, and per layer the forward's tensor-parallel all-reduces
        (0.0 for one rank)."""
        costs = self.costs
        key = (self._group_key(group), round(q, 9))
        if key not in self._arrays:
            shares = costs.shard_shares(group)
            kinds = dict.fromkeys((self.device_of[r], w, costs.capacity(r)) for r, w in zip(group, shares))
            cap = min(c for _, _, c in kinds)
            # A mixed group runs at its slowest member; each member's memory is scaled to the
            # smallest capacity, so the largest of them fitting ``cap`` means every member fits.
            prefixes = [np.asarray(costs._prefix_time(d, q, w)) for d, w, _ in kinds]
            if len(prefixes) > 1:
                prefixes = [np.concatenate([[0.0], np.cumsum(np.max([np.diff(x) for x in prefixes], axis=0))])]
            prefix = prefixes[0]
            state = np.max([((costs.params - costs.repl_params) * w + costs.repl_params) * (cap / c) for _, w, c in kinds], axis=0)
            act = np.max([((costs.act - costs.repl_act) * w + costs.repl_act) * (cap / c) for _, w, c in kinds], axis=0)
            state = state * costs.state_bytes_per_param
            t = len(group)
            comm = 0.0
            if t > 1:
                link = costs.group_link(group)
                comm = np.diff(tensor_parallel_time(costs.tp_count, q * costs.tp_bytes, t, link))
            self._arrays[key] = (np.maximum(np.diff(prefix) + comm, 1e-30), state, act, cap, comm)
        return self._arrays[key]

    def _class_key(self, pipe) -> tuple:
        return self.costs.replica_key(pipe)

    # --- finals ----------------------------------------------------------------------------------

    def least_overflow_cuts(self, layout: RankLayout, s: int, schedule: str, m: int) -> tuple[int, ...]:
        if s == 1:
            return ()
        if self.pins.cuts is not None:
            return self.pins.cuts
        classes = self.classes(layout)
        q = self.batch / (layout.dp_degree * m)
        _, mems, caps, _ = self.stage_prefixes(classes, s, schedule, m, q)
        zeros = [np.zeros(self.n + 1)] * s
        lo, hi = -max(caps), max(float(x[-1]) for x in mems)
        cuts = None
        for _ in range(50):
            mid = (lo + hi) / 2
            found = partition_layers(zeros, mems, [c + mid for c in caps], self.cuttable)
            if found is None:
                lo = mid
            else:
                hi, cuts = mid, found
        if cuts is None:
            cuts = partition_layers(zeros, None, None, self.cuttable)
        return tuple(cuts)

def no_structure_error(pins: Pins, cluster: Cluster, batch: int, num_layers: int) -> ValueError:
    pinned = pins.pinned()
    world = cluster.world_size
    if pinned:
        return ValueError(
            f"the pinned choices {', '.join(pinned)} admit no plan for {world} devices "
            f"({cluster}), a global batch of {batch} rows and {num_layers} layers: check that "
            "pipeline and tensor degrees divide the devices (tensor groups inside one node, "
            "with the same device types by tensor index when a node mixes types), "
            "that the batch gives every replica a row per micro-batch, and that there are as "
            "many layers as stages; or unpin some of them"
        )
    return ValueError(
        f"no plan exists for {world} devices with a global batch of {batch} rows: every replica "
        f"needs at least one row; use a global batch of at least {world} rows or fewer devices"
    )
