"""Memory options the search turns on when the plain plan does not fit: activation
checkpointing, ZeRO stages 1-3 and offloading optimizer state to host memory.

The cost model of a choice (:class:`OptionCostModel`) is the plain one with
* checkpointing of layers ``C``: each keeps only its input (``hidden_bytes`` per row) instead of
  its activations (``act_bytes``), one micro-batch of the largest checkpointed layer of a stage
  is rebuilt at a time (its activations, transient), and its backward runs its forward once more
  (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost");
* ZeRO stage ``z`` over a data-parallel degree ``d`` (Rajbhandari et al. 2020): optimizer
  state / d (z >= 1), gradients / d (z >= 2), weights / d plus the gathered weights of the
  largest layer in use (z = 3). Reduce-scatter + all-gather move the bytes of one all-reduce
  (z = 1, 2); stage 3 gathers the weights once more in backward (half an all-reduce more);
* offload of the optimizer state (Ren et al. 2021, ZeRO-Offload; Pseudo-to-Real's granular
  offload): the state leaves device memory; it crosses the host link twice per step (fetched
  and written back, one layer ahead of its update), overlapped with the last micro-batch's
  backward, after which each layer's gradient is final.

:func:`search_with_memory` runs the plain search and, where nothing fits, the allowed choices
(single options first, then pairs, then all): the fastest plan that fits wins; checkpointing is
then cut to the fewest layers that keep it fitting.

Example::

    result, choice = search_with_memory(profile, cluster, 1536, err, options=options, pins=Pins(),
                                        settings=SearchSettings(), allowed=ALL_OPTIONS)
    choice.describe(profile)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Collection

import numpy as np

from ...ir.devices import INTRA_LINKS
from ...ir.plan import Plan
from ...ir.topology import Cluster
from ..cost.formulas import SyncTimes, training_memory
from ..cost.layers import ModelProfile
from ..cost.predict import CostModel, CostOptions, ReplicaCost
from ..forked import both
from .explore import Explorer, NoPlanError, Scored, SearchResult, SearchSettings
from .pins import Pins
from .report import format_seconds
from .time_floor import terms_of_lists

__all__ = ["ALL_OPTIONS", "MemoryChoice", "OptionCostModel", "checkpoint_to_fit", "search_with_memory"]

ALL_OPTIONS = ("checkpoint", "zero", "offload")
# Host link per device link kind: PCIe Gen3 x16 for V100-era NVLink2 boards, Gen4 for A100, Gen5
# for H100 (datasheets; INTRA_LINKS' pcie entries, 16/32/64 GB/s per direction).
_HOST_LINK = {"nvlink1": "pcie3", "nvlink2": "pcie3", "nvlink3": "pcie4", "nvlink4": "pcie5"}


@dataclasses.dataclass(frozen=True)
class MemoryChoice:
    """Which memory options a plan runs: checkpointed layer indices, ZeRO stage, offload."""

    checkpointed: frozenset[int] = frozenset()
    zero_stage: int = 0
    offload: str = "none"

    @property
    def is_plain(self) -> bool:
        return not self.checkpointed and not self.zero_stage and self.offload == "none"

    def names(self, profile: ModelProfile) -> tuple[str, ...]:
        """The checkpointed layers' module paths, in model order."""
        return tuple(profile.layers[k].name for k in sorted(self.checkpointed))


def host_bandwidth(cluster: Cluster, rank: int) -> float:
    """Bytes/s between ``rank``'s device and host memory (one direction)."""
    return _host_bandwidth(cluster.devices()[rank].profile)


def _host_bandwidth(device) -> float:
    kind = device.intra_link if device.intra_link.startswith("pcie") else _HOST_LINK.get(device.intra_link, "pcie3")
    return INTRA_LINKS[kind].bandwidth


class OptionCostModel(CostModel):
    """:class:`CostModel` under a :class:`MemoryChoice` (see the module docstring).

    ``unlimited``: every rank's capacity is unbounded (the time of a plan that would not fit,
    to say what an option costs)."""

    def __init__(self, profile: ModelProfile, cluster: Cluster, options: CostOptions, choice: MemoryChoice,
                 *, unlimited: bool = False) -> None:
        super().__init__(profile, cluster, options)
        self.choice, self.unlimited = choice, unlimited
        # ZeRO 2 and 3 reduce-scatter and gather over the process group, even on one host.
        self.host_sums = self.host_sums and choice.zero_stage < 2
        self._host_links: dict = {}  # group -> its slowest member's host link, bytes/s
        self._extra: dict = {}  # (a position's blocks, rows per micro-batch, dp) -> bytes beyond the plain count
        self._ckpt_lists: dict = {}  # stage_lists' key -> its lists with the recomputation
        per = training_memory(1, optimizer=options.optimizer, precision=options.precision)
        b = profile.param_dtype_bytes
        self._parts = (per.parameters / b, per.gradients / b, per.optimizer_states / b)
        self._world = cluster.world_size
        self._dp = 1
        # The memory floor reads state_bytes_per_param: the least over any data-parallel degree.
        self.state_bytes_per_param = self._per_param(self._world)
        layers = profile.layers
        ckpt = choice.checkpointed
        full = np.array([x.act_bytes for x in layers], dtype=float) * self.act_scale
        kept = np.array([min(x.hidden_bytes, x.act_bytes) if k in ckpt else x.act_bytes
                         for k, x in enumerate(layers)], dtype=float) * self.act_scale  # fmt: skip
        ratio = np.divide(kept, full, out=np.ones_like(full), where=full > 0)
        repl = np.array([x.replicated_act_bytes for x in layers], dtype=float) * self.act_scale * ratio
        self.act = np.concatenate([[0.0], np.cumsum(kept)])
        self.repl_act = np.concatenate([[0.0], np.cumsum(repl)])
        self._ckpt_act = np.where([k in ckpt for k in range(len(layers))], full, 0.0)
        flops = np.array([x.total_flops for x in layers], dtype=float)
        self._ckpt_flops = np.concatenate([[0.0], np.cumsum(np.where(self._ckpt_act > 0, flops, 0.0))])
        self._all_flops = np.concatenate([[0.0], np.cumsum(flops)])
        self._layer_params = np.array([x.param_bytes for x in layers], dtype=float)

    def _per_param(self, dp: int) -> float:
        weights, grads, optim = self._parts
        if self.choice.offload != "none":
            optim = 0.0
        z = self.choice.zero_stage
        return weights / (dp if z >= 3 else 1) + grads / (dp if z >= 2 else 1) + optim / (dp if z >= 1 else 1)

    def capacity(self, rank: int) -> int:
        return 1 << 62 if self.unlimited else super().capacity(rank)

    def state_bytes(self, member_share: float, blocks) -> int:
        plain = super().state_bytes(member_share, blocks)
        return int(plain / self.state_bytes_per_param * self._per_param(self._dp))

    def replica_memory(self, pipeline, num_stages, schedule, num_micro_batch, cuts, rows, *, exact=True):
        self._dp = max(1, self._world // sum(len(g) for g in pipeline))
        memory, fits, limit = super().replica_memory(pipeline, num_stages, schedule, num_micro_batch, cuts, rows, exact=exact)
        p, q = len(pipeline), -(-rows // num_micro_batch)
        bounds = (0, *cuts, self.num_layers)
        extra = []
        for pos in range(p):
            key = (bounds[pos::p], bounds[pos + 1 :: p], q, self._dp)  # the position's blocks
            found = self._extra.get(key)
            if found is None:
                spans = [(bounds[s], bounds[s + 1]) for s in range(pos, num_stages, p)]
                rebuilt = max((float(self._ckpt_act[a:b].max(initial=0.0)) for a, b in spans), default=0.0) * q
                gathered = 0.0
                if self.choice.zero_stage >= 3 and self._dp > 1:  # the largest layer's weights, whole
                    largest = max((float(self._layer_params[a:b].max(initial=0.0)) for a, b in spans), default=0.0)
                    gathered = largest * self._parts[0] * (1 - 1 / self._dp)
                self._extra = {} if len(self._extra) > 200_000 else self._extra
                found = self._extra[key] = int(rebuilt + gathered)
            extra.append(found)
        if any(extra):
            memory = tuple(tuple(x + extra[pos] for x in row) for pos, row in enumerate(memory))
            fits = all(x <= self.capacity(g[k]) for row, g in zip(memory, pipeline) for k, x in enumerate(row))
        return memory, fits, limit

    def stage_lists(self, pipeline, num_stages, num_micro_batch, cuts, rows):
        if not self.choice.checkpointed:
            return super().stage_lists(pipeline, num_stages, num_micro_batch, cuts, rows)
        pipeline = pipeline if type(pipeline) is tuple else tuple(map(tuple, pipeline))
        key = (pipeline, num_stages, num_micro_batch, tuple(cuts), rows)
        found = self._ckpt_lists.get(key)
        if found is None:
            forward, backward, p2p = super().stage_lists(pipeline, num_stages, num_micro_batch, cuts, rows)
            bounds = (0, *cuts, self.num_layers)
            for s in range(num_stages):
                a, b = bounds[s], bounds[s + 1]
                total = self._all_flops[b] - self._all_flops[a]
                if total > 0:  # the recomputed forward, by its share of the stage's FLOPs
                    backward[s] += forward[s] * float(self._ckpt_flops[b] - self._ckpt_flops[a]) / float(total)
            self._ckpt_lists = {} if len(self._ckpt_lists) > 200_000 else self._ckpt_lists
            found = self._ckpt_lists[key] = (forward, backward, p2p)
        return list(found[0]), list(found[1]), list(found[2])

    def floor_terms(self, pipeline, num_stages, num_micro_batch, cuts, rows):
        if not self.choice.checkpointed:
            return super().floor_terms(pipeline, num_stages, num_micro_batch, cuts, rows)
        # The recomputed forwards are in the backward of stage_lists (above), not of the memos.
        forward, backward, p2p = self.stage_lists(pipeline, num_stages, num_micro_batch, cuts, rows)
        terms = terms_of_lists(forward, backward, p2p, len(pipeline))
        return (*terms, self.optimizer_times(pipeline, num_stages, cuts))

    def bucket_sync_time(self, layout, num_stages, cuts):
        plain = super().bucket_sync_time(layout, num_stages, cuts)
        if self.choice.zero_stage < 3:
            return plain  # reduce-scatter + all-gather: the bytes of one all-reduce
        # And one more all-gather of the weights in backward; the last bucket still ends it.
        return SyncTimes([1.5 * t for t in plain], getattr(plain, "tail", None))

    def replica_cost(self, pipeline, num_stages, schedule, num_micro_batch, cuts, rows, sync, *, exact=True) -> ReplicaCost:
        cost = super().replica_cost(pipeline, num_stages, schedule, num_micro_batch, cuts, rows, sync, exact=exact)
        if self.choice.offload == "none" or not math.isfinite(cost.time):
            return cost
        p = len(pipeline)
        bounds = (0, *cuts, self.num_layers)
        late = 0.0
        for pos, group in enumerate(pipeline):
            params = sum(self.block_param_bytes(bounds[s], bounds[s + 1]) for s in range(pos, num_stages, p))
            state = params * self._parts[2] / (self._dp if self.choice.zero_stage >= 1 else 1)
            link = self._host_links.get(group)
            if link is None:
                devices = self.cluster.devices()
                link = self._host_links[group] = min(_host_bandwidth(devices[r].profile) for r in group)
            moved = 2 * state / link
            # A layer's update waits for its last gradient: the traffic overlaps the last
            # micro-batch's backward (about 2/3 of its forward + backward), not the whole step.
            window = sum(cost.stage_times[s] for s in range(pos, num_stages, p)) * 2 / 3
            late = max(late, moved - window)
        return dataclasses.replace(cost, time=cost.time + max(0.0, late))


def _option_sets(allowed: Collection[str], checkpointable: frozenset[int]) -> list[MemoryChoice]:
    """The choices worth a search: those no other allowed choice dominates.

    A choice dominates another when every plan takes no longer and needs no more memory under
    it. ZeRO stages 1 and 2 cost no time here (reduce-scatter + all-gather move the bytes of one
    all-reduce) and stage 2 shards more than stage 1 or none: stage 2 dominates both, with or
    without the other options. Stage 3 costs time, checkpointing and offload cost time and save
    memory: none of those dominates another. The winner's options are cut back afterwards to the
    lightest that keep its plan fitting (:func:`_lightest`), so a plan that fits under ZeRO 1
    still says ZeRO 1.
    """
    zero = (2, 3) if "zero" in allowed else (0,)
    ckpt = (frozenset(), checkpointable) if "checkpoint" in allowed and checkpointable else (frozenset(),)
    off = ("none", "optimizer") if "offload" in allowed else ("none",)
    out = [MemoryChoice(checkpointed=c, zero_stage=z, offload=o) for c in ckpt for z in zero for o in off]
    return [c for c in out if not c.is_plain]


def checkpointable_layers(profile: ModelProfile, module_paths: Collection[str] | None) -> frozenset[int]:
    """Layers whose checkpointing saves memory (more activations than input) and that name a
    module (``module_paths``: the model's; None: any named layer)."""
    return frozenset(
        k for k, x in enumerate(profile.layers)
        if x.name and x.act_bytes > x.hidden_bytes and (module_paths is None or x.name in module_paths)
    )  # fmt: skip


def search_with_memory(
    profile: ModelProfile, cluster: Cluster, global_batch: int, plain_error: NoPlanError, *,
    options: CostOptions, pins: Pins, settings: SearchSettings, allowed: Collection[str] = (),
    module_paths: Collection[str] | None = None, zero3: str = "last", base: Explorer | None = None,
) -> tuple[SearchResult, MemoryChoice]:
    """Where the plain search found nothing that fits (``plain_error``), the fastest plan under
    the allowed memory options (``pins`` as the plain search took them).

    The choices no other dominates (:func:`_option_sets`) share one enumeration of the
    structures; each keeps those its memory floor lets through, bounded from below with the
    recomputation checkpointing adds (:meth:`~.space.SearchSpace.bound`). Choices are searched
    cheapest in time first (:func:`_time_cost`), two at a time (the second in a forked process
    where a core is free: :func:`~..forked.both`), each pair for plans faster than the best
    found before it (the ``cutoff`` of :meth:`~.explore.Explorer.run`); a choice whose least
    bound reaches that is not searched. The winner's options are then cut back to the lightest
    that keep its plan fitting, as fast or faster (:func:`_lightest`).

    ``zero3``: ``"last"`` searches ZeRO stage 3 only where no choice without it fits (as
    DeepSpeed advises: its per-layer gathers in forward and backward cost more than the one
    extra all-gather priced here, and its searches are the dearest: most structures pass its
    memory floor); ``"any"`` lets it compete on predicted time with the others.

    ``base``: the plain search (the same model, cluster, batch, options, pins and settings),
    whose structures, bounds and memos of times the choices' searches reuse.

    Raises:
        NoPlanError: no choice fits either (the plain search's message, with what was tried).
    """
    if not allowed:
        raise plain_error
    if zero3 not in ("last", "any"):
        raise ValueError(f"search_with_memory(zero3={zero3!r}): use 'last' or 'any'")
    if pins.cuts is None and profile.pinned_cuts is not None:  # as auto.search pins them
        pins = dataclasses.replace(pins, cuts=profile.pinned_cuts, num_stages=len(profile.pinned_cuts) + 1)
    if base is None:
        base = Explorer(profile, cluster, global_batch, options, pins, settings)
    elif base.profile is not profile or base.cluster is not cluster or (
            base.batch, base.costs.options, base.pins, base.settings) != (global_batch, options, pins, settings):  # fmt: skip
        raise ValueError("search_with_memory: base searches another model, cluster, batch, options, pins or settings")
    checkpointable = checkpointable_layers(profile, module_paths)
    flops = np.array([float(x.total_flops) for x in profile.layers])
    choices = _option_sets(allowed, checkpointable)
    rounds = [choices] if zero3 == "any" else [[c for c in choices if c.zero_stage < 3], [c for c in choices if c.zero_stage >= 3]]
    best: tuple[SearchResult, MemoryChoice] | None = None
    for round_ in rounds:
        if best is not None:
            break
        queued = []
        for choice in round_:
            explorer = _explorer(base, choice, flops)
            structures = explorer.structures()
            if structures:  # else the memory floor rules every structure out: nothing to search
                queued.append((_time_cost(choice), structures[0].bound, choice, explorer))
        queued.sort(key=lambda x: x[:2])
        while queued:
            # Two choices at a time, both for plans faster than the best before them: on two
            # cores the pair takes the longer search's time, not the sum (forked.both), and the
            # winner is the same on one core. Then the better of the two, the earlier on a tie.
            cutoff = math.inf if best is None else best[0].best.prediction.step_time
            queued = [q for q in queued if q[1] < cutoff]  # else no plan of it beats the best
            if not queued:
                break
            pair, queued = queued[:2], queued[2:]
            results = _search_pair([q[3] for q in pair], cutoff, [e[0] for e in base.enumerate()])
            for (_, _, choice, _), result in zip(pair, results):
                if result is not None and (best is None or result.best.prediction.step_time < best[0].best.prediction.step_time):
                    best = (result, choice)
    if best is None:
        raise NoPlanError(f"{plain_error} (also with {', '.join(allowed)} turned on)") from None
    result, choice = best
    choice, scored = _lightest(profile, cluster, options, choice, result.best, shared=base.costs)
    return dataclasses.replace(result, best=scored), choice


def _explorer(base: Explorer, choice: MemoryChoice, flops: np.ndarray) -> Explorer:
    """A search under ``choice`` that shares ``base``'s structure enumeration."""
    costs = _costs(base.profile, base.cluster, base.costs.options, choice, base.costs)
    explorer = Explorer(base.profile, base.cluster, base.batch, base.costs.options, base.pins, base.settings, costs=costs)
    explorer.share_structures(base)
    if choice.checkpointed:
        explorer.recomputed = np.where([k in choice.checkpointed for k in range(len(flops))], flops, 0.0)
    return explorer


def _search_pair(explorers: list[Explorer], cutoff: float, layouts: list) -> list[SearchResult | None]:
    """Each explorer's search for plans faster than ``cutoff`` (None: nothing fits or beats it),
    the second beside the first in a forked process (``layouts``: the shared structures' rank
    layouts, which its answer names)."""
    searches = [functools.partial(_run_or_none, explorer, cutoff) for explorer in explorers]
    if len(searches) == 1:
        return [searches[0]()]
    return list(both(*searches, shared=layouts))


def _run_or_none(explorer: Explorer, cutoff: float = math.inf) -> SearchResult | None:
    try:
        return explorer.run(cutoff)
    except NoPlanError:
        return None


def _time_cost(choice: MemoryChoice) -> tuple[bool, bool, bool]:
    """The order choices are searched in, cheapest in time first: recomputing the forward (a
    third more compute) costs most, ZeRO 3's second gather of the weights next, then the
    optimizer state's host traffic (hidden behind the last backward where it can be). An
    early fast plan is the cutoff that spares the later searches most of their work."""
    return bool(choice.checkpointed), choice.zero_stage >= 3, choice.offload != "none"


def _weight(choice: MemoryChoice) -> int:
    """How many options a choice turns on (ties of bound: the lighter first)."""
    return int(bool(choice.checkpointed)) + int(choice.zero_stage > 0) + int(choice.offload != "none")


def _lightest(profile, cluster, options, choice: MemoryChoice, scored: Scored, shared=None) -> tuple[MemoryChoice, Scored]:
    """The lightest options under which ``scored``'s plan fits, at its time or faster: a lower
    ZeRO stage (stages 0-2 cost the same time, stage 3 more), no offload, the fewest checkpointed
    layers (:func:`_fewest_checkpointed`). The fastest of these wins, then the fewest options.
    ``shared``: a cost model of the same model, cluster and options whose memos of times to use."""
    c = scored.candidate
    picks = []
    for z in range(choice.zero_stage + 1):
        for off in dict.fromkeys(("none", choice.offload)):
            trial = dataclasses.replace(choice, zero_stage=z, offload=off)
            pred = scored.prediction if trial == choice else _costs(profile, cluster, options, trial, shared).predict(c)
            if not pred.fits:
                continue
            found = (trial, Scored(c, pred))
            if trial.checkpointed:
                found = _fewest_checkpointed(profile, cluster, options, trial, found[1], shared)
            picks.append(found)
    return min(picks, key=lambda x: (x[1].prediction.step_time, _weight(x[0]), x[0].zero_stage, len(x[0].checkpointed)))


def _fewest_checkpointed(profile, cluster, options, choice: MemoryChoice, scored: Scored, shared=None) -> tuple[MemoryChoice, Scored]:
    """Cut the checkpointed layers of ``scored``'s plan to the fewest that keep it fitting: per
    rank over memory, its stages' layers with the largest saving first."""
    c = scored.candidate
    bounds = (0, *c.cuts, profile.num_layers)
    saving = {k: profile.layers[k].act_bytes - profile.layers[k].hidden_bytes for k in choice.checkpointed}
    p = c.layout.pipeline_degree
    order = {
        pos: sorted((k for s in range(pos, c.num_stages, p) for k in range(bounds[s], bounds[s + 1]) if k in saving),
                    key=lambda k: (-saving[k], k))
        for pos in range(p)
    }  # fmt: skip
    rank_pos = {r: pos for pipe in c.layout.pipelines for pos, g in enumerate(pipe) for r in g}
    taken: set[int] = set()
    while True:
        trial = dataclasses.replace(choice, checkpointed=frozenset(taken))
        pred = _costs(profile, cluster, options, trial, shared).predict(c)
        if pred.fits:
            return trial, Scored(c, pred)
        over = {rank_pos[r] for r, (m, cap) in enumerate(zip(pred.rank_memory, pred.rank_capacity)) if m > cap}
        added = False
        for pos in over:
            rest = [k for k in order[pos] if k not in taken]
            if rest:
                taken.add(rest[0])
                added = True
        if not added:
            return choice, scored  # as searched (every layer): nothing fewer fits


def _costs(profile, cluster, options, choice: MemoryChoice, shared=None) -> OptionCostModel:
    """The cost model of ``choice``, with ``shared``'s memos of times where given."""
    costs = OptionCostModel(profile, cluster, options, choice)
    if shared is not None:
        costs.share_times(shared)
    return costs


def option_costs(profile, cluster, options, choice: MemoryChoice, scored: Scored) -> list[str]:
    """Lines for ``--explain``: each option turned on and what it costs in step time (the plan
    predicted with that option alone against none, memory unbounded)."""
    if choice.is_plain:
        return []
    c = scored.candidate

    def time(ch: MemoryChoice) -> float:
        return OptionCostModel(profile, cluster, options, ch, unlimited=True).predict(c).step_time

    base = time(MemoryChoice())
    lines = []
    parts = []
    if choice.checkpointed:
        n = len(choice.checkpointed)
        parts.append((f"activation checkpointing of {n} layer(s) ({', '.join(choice.names(profile)[:4])}"
                      + (f" and {n - 4} more" if n > 4 else "") + "): their activations recomputed in backward",
                      MemoryChoice(checkpointed=choice.checkpointed)))  # fmt: skip
    if choice.zero_stage:
        what = {1: "optimizer state", 2: "optimizer state and gradients", 3: "optimizer state, gradients and weights"}
        parts.append((f"ZeRO stage {choice.zero_stage}: {what[choice.zero_stage]} sharded over each data-parallel group",
                      MemoryChoice(zero_stage=choice.zero_stage)))
    if choice.offload != "none":
        parts.append(("offload: optimizer state in host memory, moved over the host link each step",
                      MemoryChoice(offload=choice.offload)))
    for text, alone in parts:
        extra = time(alone) - base
        lines.append(f"{text}; costs {'+' if extra >= 0 else ''}{format_seconds(extra)} per step ({extra / base:+.1%})")
    return lines


def with_choice(plan: Plan, choice: MemoryChoice, profile: ModelProfile) -> Plan:
    """``plan`` carrying the memory options of ``choice``."""
    return dataclasses.replace(
        plan, activation_checkpointing=choice.names(profile), zero_stage=choice.zero_stage, offload=choice.offload
    )


def checkpoint_to_fit(
    plan: Plan, profile: ModelProfile, cluster: Cluster, global_batch: int, options: CostOptions,
    module_paths: Collection[str] | None = None,
) -> tuple[str, ...]:
    """``Config(activation_checkpointing="auto")`` for a plan the user's annotations fixed: the
    fewest layers whose checkpointing makes ``plan`` fit (``()`` where it fits already; every
    checkpointable layer where nothing fewer does).

    Example::

        checkpoint_to_fit(plan, profile, parse_cluster("node0=8xV100-32GB"), 64, CostOptions())
    """
    from ..cost.plan_cost import candidate_of

    candidate = candidate_of(plan, profile, global_batch)
    if CostModel(profile, cluster, options).predict(candidate).fits:
        return ()
    every = MemoryChoice(checkpointed=checkpointable_layers(profile, module_paths))
    pred = OptionCostModel(profile, cluster, options, every).predict(candidate)
    choice, _ = _fewest_checkpointed(profile, cluster, options, every, Scored(candidate, pred))
    return choice.names(profile)
