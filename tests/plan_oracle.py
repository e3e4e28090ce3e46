"""The planner's oracle: the best plan of an instance over the whole plan space.

The space is enumerated independently of the planner: every tensor-parallel degree, pipeline
degree and interleave, every arrangement of devices into pipelines (devices of one node are
interchangeable), every schedule, micro-batch count and cut, and the best rows per replica by a
dynamic program over replicas (replicas meet only in the gradient all-reduce, so the step is
the slowest replica's time). Every plan is scored with the planner's own cost model
(:meth:`CostModel.replica_cost`), so a comparison measures the search, not the model.

:func:`exhaustive` scores every (structure, cut, rows) triple; it is the definition, and slow
past a few layers (seconds at 8 layers, minutes at 12). :func:`brute_force` and
:func:`structure_optima` return the same optima by branch and bound: every cut of every
structure gets a lower bound from its stage times, and cuts are scored exactly in order of
that bound until the bound reaches the best time found. The bound, for a replica whose
pipeline position ``k`` runs stages ``S_k`` with ``c_j`` the forward + backward of one
micro-batch on stage ``j``, is ``max_k (sum_{j<k} c_j + m sum_{j in S_k} c_j)``: rank ``k``
computes ``m`` micro-batches of each of its stages one at a time, cannot start before
micro-batch 0 has come through stages ``0..k-1`` and cannot end before its last backward has
gone back through them (every schedule ends a rank on a backward); with interleaving also
``T >= sum_j c_j``, micro-batch 0's path. Rows are bounded by the same min-max over replicas
(a replica's time only grows with its rows). Each exact score checks the bound against it, so
a cost model that stops honouring the bound fails loudly instead of pruning the optimum.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from whale.planner.cost.predict import Candidate, CostModel, CostOptions, RankLayout
from whale.planner.search.rank_layouts import tensor_groups

__all__ = ["brute_force", "exhaustive", "structure_key", "structure_optima"]


def _arrangements(groups, node_of, p):
    """Every assignment of groups to (replica, position), up to replica order and node twins."""
    by_node = {}
    for g in groups:
        by_node.setdefault(node_of[g[0]], []).append(g)

    def sequences(left):  # every distinct ordering of the multiset of node labels
        if not any(left.values()):
            yield ()
            return
        for label in sorted(k for k, c in left.items() if c):
            left[label] -= 1
            for rest in sequences(left):
                yield (label, *rest)
            left[label] += 1

    seen = set()
    for seq in sequences({k: len(v) for k, v in by_node.items()}):
        replicas = tuple(sorted(seq[d * p : (d + 1) * p] for d in range(len(seq) // p)))
        if replicas in seen:
            continue
        seen.add(replicas)
        pools = {k: list(v) for k, v in by_node.items()}
        yield RankLayout(
            len(groups[0]),
            tuple(tuple(pools[label].pop() for label in r) for r in replicas),
        )


def _structures(profile, cluster, batch, max_interleave):
    """Every (layout, stages, schedule, micro-batches) of the plan space, with its key."""
    n = profile.num_layers
    node_of = [
        k for k, node in enumerate(cluster.nodes) for _ in range(node.num_devices)
    ]
    for t in (1, 2, 4, 8):
        groups = tensor_groups(cluster, t)
        if groups is None:
            continue
        for p in (p for p in range(1, len(groups) + 1) if len(groups) % p == 0):
            dp = len(groups) // p
            if dp > batch:
                continue
            for layout in _arrangements(groups, node_of, p):
                for v in range(1, (max_interleave if p > 1 else 1) + 1):
                    s = p * v
                    if s > n:
                        continue
                    schedules = (
                        ["1f1b"]
                        if s == 1
                        else ["gpipe", "1f1b"]
                        if v == 1
                        else ["interleaved_1f1b"]
                    )
                    for schedule, m in itertools.product(
                        schedules, range(1, batch // dp + 1)
                    ):
                        if v == 1 or m % p == 0:
                            yield (
                                structure_key(layout, node_of, s, schedule, m),
                                (layout, s, schedule, m),
                            )


def structure_key(layout, node_of, num_stages, schedule, num_micro_batch):
    """A structure up to replica order and devices of one node (interchangeable)."""
    pipelines = tuple(
        sorted(tuple(node_of[g[0]] for g in pipe) for pipe in layout.pipelines)
    )
    return (layout.tensor_parallel, pipelines, num_stages, schedule, num_micro_batch)


def _all_cuts(profile, s):
    cuttable = [k for k in range(1, profile.num_layers) if profile.layers[k].cuttable]
    return list(itertools.combinations(cuttable, s - 1))


# --- the definition ------------------------------------------------------------------------------


def exhaustive(profile, cluster, batch, options=None, max_interleave=2):
    """Per structure, the best (time, candidate) over every cut and rows: no pruning at all."""
    costs = CostModel(profile, cluster, options or CostOptions())
    optima = {}
    for key, (layout, s, schedule, m) in _structures(
        profile, cluster, batch, max_interleave
    ):
        best = (math.inf, None)
        for cuts in _all_cuts(profile, s):
            sync = costs.sync_time(layout, s, cuts)
            top = batch - m * (layout.dp_degree - 1)
            times = [[costs.replica_cost(pipe, s, schedule, m, cuts, r, sync).time for r in range(m, top + 1)]
                     for pipe in layout.pipelines]  # fmt: skip
            found = _min_max_rows(times, m, batch)
            if found[0] < best[0]:
                best = (found[0], Candidate(layout, s, schedule, m, cuts, found[1]))
        optima[key] = best
    return optima


def _min_max_rows(times, m, batch):
    """Rows per replica minimising the slowest: a DP over replicas (``times[d][r - m]``)."""
    table = {0: (0.0, ())}
    for per_rows in times:
        nxt = {}
        for used, (worst, rows) in table.items():
            for k, t in enumerate(per_rows):
                r = m + k
                if used + r <= batch:
                    cand = (max(worst, t), rows + (r,))
                    if used + r not in nxt or cand[0] < nxt[used + r][0]:
                        nxt[used + r] = cand
        table = nxt
    return table.get(batch, (math.inf, ()))


# --- the same optima by branch and bound ---------------------------------------------------------


class _Oracle:
    """Bounds and exact scores of cuts for one instance."""

    def __init__(self, profile, cluster, batch, options):
        self.costs = CostModel(profile, cluster, options)
        self.profile, self.batch, self.n = profile, batch, profile.num_layers
        self._blocks: dict = {}
        self._memory: dict = {}

    def block_times(self, group, q):
        """``[a, b]``: forward + backward of layers ``a..b-1`` on ``group``, micro-batch of ``q`` rows."""
        costs = self.costs
        key = (
            tuple(costs.device_of[r].name for r in group),
            costs.group_link(group),
            q,
        )
        if key not in self._blocks:
            shares = costs.shard_shares(group)
            out = np.zeros((self.n + 1, self.n + 1))
            for a in range(self.n):
                for b in range(a + 1, self.n + 1):
                    out[a, b] = sum(costs.group_times(group, shares, q, a, b))
            self._blocks[key] = out
        return self._blocks[key]

    def block_memory(self, group, member):
        """``(states, acts, capacity)`` of one member of ``group``: ``[a, b]`` state bytes and
        activation bytes per row of layers ``a..b-1``."""
        costs = self.costs
        share = costs.shard_shares(group)[member]
        key = (costs.device_of[group[member]].name, share)
        if key not in self._memory:
            states, acts = (
                np.zeros((self.n + 1, self.n + 1)),
                np.zeros((self.n + 1, self.n + 1)),
            )
            for a in range(self.n):
                for b in range(a + 1, self.n + 1):
                    states[a, b] = costs.state_bytes(share, [(a, b)])
                    acts[a, b] = costs.member_act(share, a, b)
            self._memory[key] = (states, acts, costs.capacity(group[member]))
        return self._memory[key]

    def kind(self, pipe):
        """What a replica's time depends on besides rows: devices, links inside groups and between."""
        costs = self.costs
        return (
            tuple(tuple(costs.device_of[r].name for r in g) for g in pipe),
            tuple(costs.group_link(g) for g in pipe),
            tuple(
                costs.link(pipe[k][0], pipe[(k + 1) % len(pipe)][0])
                for k in range(len(pipe))
            ),
        )

    def bounds(self, layout, s, schedule, m, cuts):
        """Per kind of replica: ``(K, R)`` lower bounds of its time with ``m..top`` rows (``inf``
        where its memory cannot hold them)."""
        p, top = layout.pipeline_degree, self.batch - m * (layout.dp_degree - 1)
        edges = np.array([(0, *c, self.n) for c in cuts])
        kinds: dict = {}
        for pipe in layout.pipelines:
            kinds.setdefault(self.kind(pipe), [pipe, 0])[1] += 1
        out = []
        for pipe, count in kinds.values():
            # Memory: a rank keeps its stages' states and, at its peak, at least one micro-batch
            # of each of its stages' activations (the largest bounds it).
            states, acts = [], []
            for k in range(p):
                for member in range(len(pipe[k])):
                    state, act, cap = self.block_memory(pipe[k], member)
                    mine = range(k, s, p)
                    states.append(
                        sum(state[edges[:, j], edges[:, j + 1]] for j in mine)
                        - cap * (1 + 1e-9)
                        - 1
                    )
                    acts.append(
                        np.max(
                            [act[edges[:, j], edges[:, j + 1]] for j in mine], axis=0
                        )
                    )
            states, acts = np.array(states), np.array(acts)
            per_rows = []
            for r in range(m, top + 1):
                c = np.stack(
                    [
                        self.block_times(pipe[j % p], r / m)[
                            edges[:, j], edges[:, j + 1]
                        ]
                        for j in range(s)
                    ],
                    axis=1,
                )
                before = np.concatenate(
                    [np.zeros((len(cuts), 1)), np.cumsum(c, axis=1)], axis=1
                )
                lb = np.max(
                    [before[:, k] + m * c[:, k::p].sum(axis=1) for k in range(p)],
                    axis=0,
                )
                if s > p:
                    lb = np.maximum(lb, before[:, -1])
                over = np.any(states + acts * -(-r // m) > 0, axis=0)
                per_rows.append(np.where(over, math.inf, lb))
            out.append((pipe, count, np.stack(per_rows, axis=1)))
        return out

    def rows_bound(self, kinds, m):
        """Per cut, the least over rows of the slowest replica's bound: the least bound value
        ``T`` at which the rows each replica does within ``T`` add up to the batch (bounds grow
        with rows, so a replica does rows ``m..`` up to its last within ``T``)."""
        limits = np.concatenate([b for _, _, b in kinds], axis=1)
        rows = 0
        for _, count, b in kinds:
            fit = (b[:, None, :] <= limits[:, :, None]).sum(axis=2)
            rows = rows + count * np.where(fit > 0, m - 1 + fit, -math.inf)
        return np.min(
            np.where((rows >= self.batch) & np.isfinite(limits), limits, math.inf),
            axis=1,
        )

    def exact(self, layout, s, schedule, m, cuts, kinds, k, limit):
        """Best (time, rows) of one cut, or (inf, None) if none below ``limit``."""
        costs, top = self.costs, self.batch - m * (layout.dp_degree - 1)
        sync = costs.sync_time(layout, s, cuts)
        per_kind = {}
        for pipe, _, b in kinds:
            times = []
            for r in range(m, top + 1):
                if b[k, r - m] >= limit:
                    break
                t = costs.replica_cost(pipe, s, schedule, m, cuts, r, sync).time
                assert b[k, r - m] <= t * (1 + 1e-9), (
                    "the oracle's bound exceeds the cost model",
                    b[k, r - m],
                    t,
                )
                assert not times or t >= times[-1] * (1 - 1e-9), (
                    "a replica's time fell as its rows grew",
                    times[-1],
                    t,
                )
                times.append(t)
                if t >= limit:
                    break
            per_kind[self.kind(pipe)] = times
        times = [per_kind[self.kind(pipe)] for pipe in layout.pipelines]
        return _min_max_rows(times, m, self.batch)


def structure_optima(
    profile, cluster, batch, options=None, max_interleave=2, *, per_structure=True
):
    """Per structure (:func:`structure_key`), the best ``(time, candidate)`` over its cuts and rows
    (``(inf, None)`` where none fits); equal to :func:`exhaustive`.

    With ``per_structure=False`` only the best structure's entry is exact: others stop at the
    best time of all (the fast path of :func:`brute_force`).
    """
    oracle = _Oracle(profile, cluster, batch, options or CostOptions())
    structs, queue = [], []
    for key, (layout, s, schedule, m) in _structures(
        profile, cluster, batch, max_interleave
    ):
        cuts = _all_cuts(profile, s)
        kinds = oracle.bounds(layout, s, schedule, m, cuts)
        lb = oracle.rows_bound(kinds, m)
        idx = len(structs)
        structs.append((key, layout, s, schedule, m, cuts, kinds))
        queue.append(
            np.stack([lb, np.full(len(cuts), idx), np.arange(len(cuts))], axis=1)
        )
    order = np.concatenate(queue) if queue else np.zeros((0, 3))
    order = order[np.argsort(order[:, 0], kind="stable")]
    optima = {st[0]: (math.inf, None) for st in structs}
    best = math.inf
    for lb, idx, k in order:
        key, layout, s, schedule, m, cuts, kinds = structs[int(idx)]
        limit = optima[key][0] if per_structure else min(best, optima[key][0])
        if lb * (1 - 1e-9) >= limit:
            if not per_structure and lb * (1 - 1e-9) >= best:
                break
            continue
        time, rows = oracle.exact(
            layout, s, schedule, m, cuts[int(k)], kinds, int(k), limit
        )
        if time < optima[key][0]:
            optima[key] = (time, Candidate(layout, s, schedule, m, cuts[int(k)], rows))
            best = min(best, time)
    return optima


def brute_force(profile, cluster, batch, options=None, max_interleave=2):
    """The best step time over the whole plan space, and the candidate reaching it."""
    optima = structure_optima(
        profile, cluster, batch, options, max_interleave, per_structure=False
    )
    return min(optima.values(), key=lambda found: found[0], default=(math.inf, None))
