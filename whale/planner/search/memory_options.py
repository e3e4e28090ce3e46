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
import itertools
import math
from collections.abc import Collection

import numpy as np

from ...ir.devices import INTRA_LINKS
from ...ir.plan import Plan
from ...ir.topology import Cluster
from ..cost.formulas import training_memory
from ..cost.layers import ModelProfile
from ..cost.predict import CostModel, CostOptions, ReplicaCost
from .explore import Explorer, NoPlanError, Scored, SearchResult, SearchSettings
from .memory_floor import MemoryFloor
from .pins import Pins

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
    device = cluster.devices()[rank].profile
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
            spans = [(bounds[s], bounds[s + 1]) for s in range(pos, num_stages, p)]
            rebuilt = max((float(self._ckpt_act[a:b].max(initial=0.0)) for a, b in spans), default=0.0) * q
            gathered = 0.0
            if self.choice.zero_stage >= 3 and self._dp > 1:  # the largest layer's weights, whole
                largest = max((float(self._layer_params[a:b].max(initial=0.0)) for a, b in spans), default=0.0)
                gathered = largest * self._parts[0] * (1 - 1 / self._dp)
            extra.append(int(rebuilt + gathered))
        if any(extra):
            memory = tuple(tuple(x + extra[pos] for x in row) for pos, row in enumerate(memory))
            fits = all(x <= self.capacity(g[k]) for row, g in zip(memory, pipeline) for k, x in enumerate(row))
        return memory, fits, limit

    def stage_lists(self, pipeline, num_stages, num_micro_batch, cuts, rows):
        forward, backward, p2p = super().stage_lists(pipeline, num_stages, num_micro_batch, cuts, rows)
        if self.choice.checkpointed:
            bounds = (0, *cuts, self.num_layers)
            backward = list(backward)
            for s in range(num_stages):
                a, b = bounds[s], bounds[s + 1]
                total = self._all_flops[b] - self._all_flops[a]
                if total > 0:  # the recomputed forward, by its share of the stage's FLOPs
                    backward[s] += forward[s] * float(self._ckpt_flops[b] - self._ckpt_flops[a]) / float(total)
        return forward, backward, p2p

    def sync_time(self, layout, num_stages, cuts):
        plain = super().sync_time(layout, num_stages, cuts)
        if self.choice.zero_stage < 3:
            return plain  # reduce-scatter + all-gather: the bytes of one all-reduce
        return tuple(1.5 * t for t in plain)  # and one more all-gather of the weights in backward

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
            moved = 2 * state / min(host_bandwidth(self.cluster, r) for r in group)
            # A layer's update waits for its last gradient: the traffic overlaps the last
            # micro-batch's backward (about 2/3 of its forward + backward), not the whole step.
            window = sum(cost.stage_times[s] for s in range(pos, num_stages, p)) * 2 / 3
            late = max(late, moved - window)
        return dataclasses.replace(cost, time=cost.time + max(0.0, late))


def _choices(allowed: Collection[str], checkpointable: frozenset[int]) -> list[list[MemoryChoice]]:
    """Choices by number of options turned on: singles, pairs, all."""
    kinds = []
    if "checkpoint" in allowed and checkpointable:
        kinds.append([MemoryChoice(checkpointed=checkpointable)])
    if "zero" in allowed:
        kinds.append([MemoryChoice(zero_stage=z) for z in (1, 2, 3)])
    if "offload" in allowed:
        kinds.append([MemoryChoice(offload="optimizer")])
    rounds = []
    for n in range(1, len(kinds) + 1):
        level = []
        for combo in itertools.combinations(kinds, n):
            for parts in itertools.product(*combo):
                level.append(MemoryChoice(
                    checkpointed=frozenset().union(*(c.checkpointed for c in parts)),
                    zero_stage=max(c.zero_stage for c in parts), offload=max(c.offload for c in parts),
                ))  # fmt: skip
        rounds.append(level)
    return rounds


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
    module_paths: Collection[str] | None = None,
) -> tuple[SearchResult, MemoryChoice]:
    """Where the plain search found nothing that fits (``plain_error``), the fastest plan under
    the allowed memory options (``pins`` as the plain search took them).

    Raises:
        NoPlanError: no choice fits either (the plain search's message, with what was tried).
    """
    if not allowed:
        raise plain_error
    if pins.cuts is None and profile.pinned_cuts is not None:  # as auto.search pins them
        pins = dataclasses.replace(pins, cuts=profile.pinned_cuts, num_stages=len(profile.pinned_cuts) + 1)
    best: tuple[SearchResult, MemoryChoice] | None = None
    for level in _choices(allowed, checkpointable_layers(profile, module_paths)):
        for choice in level:
            explorer = Explorer(profile, cluster, global_batch, options, pins, settings)
            explorer.costs = OptionCostModel(profile, cluster, options, choice)
            explorer.floor = MemoryFloor(explorer.costs, explorer.cuttable)
            try:
                result = explorer.run()
            except NoPlanError:
                continue
            if best is None or result.best.prediction.step_time < best[0].best.prediction.step_time:
                best = (result, choice)
        if best is not None:
            break
    if best is None:
        raise NoPlanError(f"{plain_error} (also with {', '.join(allowed)} turned on)") from None
    result, choice = best
    if choice.checkpointed:
        choice, scored = _fewest_checkpointed(profile, cluster, options, choice, result.best)
        result = dataclasses.replace(result, best=scored)
    return result, choice


def _fewest_checkpointed(profile, cluster, options, choice: MemoryChoice, scored: Scored) -> tuple[MemoryChoice, Scored]:
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
        pred = OptionCostModel(profile, cluster, options, trial).predict(c)
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
        lines.append(f"{text}; costs {extra * 1e3:+.4g} ms per step ({extra / base:+.1%})")
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
