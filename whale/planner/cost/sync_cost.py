"""Gradient synchronisation per pipeline position: the data-parallel all-reduce of its
gradients, in buckets, and the all-reduce of weights tied across positions.

:class:`SyncCost` is the part of :class:`~.predict.CostModel` that prices what a position sends
after its backward (:meth:`~SyncCost.sync_time`), as the runtime sends it: gradient buckets
from the last layers back, each leaving when its gradients are ready (the last one only after
the backward), then the sums of tied weights (GPT's embedding and head on the first and last
stage; ``rewrite.stage_split``) over the positions holding them.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from .candidate import RankLayout
from .formulas import SyncTimes, all_reduce_time, host_sum_time

__all__ = ["SyncCost"]


class SyncCost:
    """Gradient sync times of layouts (mixed into :class:`~.predict.CostModel`, which holds the
    model, the cluster and the memos these read: ``_sync``, ``_tied``)."""

    def sync_time(self, layout: RankLayout, num_stages: int, cuts: Sequence[int]) -> SyncTimes:
        """Gradient sync time per pipeline position (:meth:`bucket_sync_time`), and in ``.tail``
        what of it only starts when the backward has ended: the last bucket, then the all-reduce
        of weights tied across positions (:meth:`tied_sync_time`), which waits for every bucket."""
        buckets = self.bucket_sync_time(layout, num_stages, cuts)
        tied = self.tied_sync_time(layout, num_stages, cuts)
        if not any(tied):
            return buckets
        return SyncTimes([b + t for b, t in zip(buckets, tied)], [b + t for b, t in zip(buckets.tail, tied)], tied)

    def tied_sync_time(self, layout: RankLayout, num_stages: int, cuts: Sequence[int]) -> tuple[float, ...]:
        """Per position, the all-reduces of the parameters it shares with other positions of its
        replica (GPT's embedding and head, tied, on the first and last stage), summed over the
        positions holding each one; the slowest replica's links. Zero where no tied weight spans
        positions (``ModelProfile.shared_params``)."""
        p = layout.pipeline_degree
        out = [0.0] * p
        if p == 1 or not self.profile.shared_params:
            return tuple(out)
        for _, size, users in self.profile.shared_params:
            positions = tuple(sorted({(bisect.bisect_right(cuts, u)) % p for u in users}))
            if len(positions) < 2:
                continue
            key = (id(layout), positions, size)
            found = self._tied.get(key)
            if found is None:  # the entry holds ``layout``, so its id stays its own
                grad = size * self.grad_bytes_per_param
                found = self._tied[key] = (layout, max(
                    all_reduce_time(grad, len(positions), self.group_link([pipeline[k][0] for k in positions]))
                    for pipeline in layout.pipelines))  # fmt: skip
            for k in positions:
                out[k] += found[1]
        return tuple(out)

    def bucket_sync_time(self, layout: RankLayout, num_stages: int, cuts: Sequence[int]) -> SyncTimes:
        """Gradient all-reduce time per pipeline position (ring over the position's replicas;
        on CPU ranks of one host, their sum in shared memory where ``host_sums``), and in
        ``.tail`` that of its last bucket, which only starts when backward has ended."""
        p, dp = layout.pipeline_degree, layout.dp_degree
        if dp == 1:
            return SyncTimes((0.0,) * p)
        bounds = (0, *cuts, self.num_layers)
        out, tail = [], []
        first, cap = self.options.first_bucket_bytes, self.options.bucket_bytes
        for pos in range(p):
            # Memoised per position on its blocks (their starts and ends: no pairs built to look
            # up); the entry holds ``layout``, so its id stays its own.
            key = (id(layout), pos, bounds[pos::p], bounds[pos + 1 :: p], self.host_sums)
            found = self._sync.get(key)
            if found is None:
                blocks = tuple((bounds[s], bounds[s + 1]) for s in range(pos, num_stages, p))
                groups = [layout.pipelines[d][pos] for d in range(dp)]
                shares = self.shard_shares(groups[0])
                sharded = sum(self.block_param_bytes(a, b) - (self.repl_params[b] - self.repl_params[a]) for a, b in blocks)
                repl = sum(self.repl_params[b] - self.repl_params[a] for a, b in blocks)
                grad = (sharded * max(shares) + repl) * self.grad_bytes_per_param
                link = self.group_link([g[0] for g in groups])
                # Buckets fill from the last layers (a small first one, then ``cap`` each); the last
                # holds the first layers' gradients, ready only at the end of the backward.
                last = grad if grad <= first else (grad - first) % cap or cap
                if self.host_sums and link.kind == "shm":  # CPU ranks, one host (runtime.host_reduce)
                    memory = min(self.device_of[r].memory_bandwidth for g in groups for r in g)
                    times = tuple(host_sum_time(size, dp, memory, link) for size in (grad, last))
                else:
                    times = tuple(all_reduce_time(size, dp, link) for size in (grad, last))
                self._sync = {} if len(self._sync) > 200_000 else self._sync
                found = self._sync[key] = (layout, *times)
            out.append(found[1])
            tail.append(found[2])
        return SyncTimes(out, tail)
