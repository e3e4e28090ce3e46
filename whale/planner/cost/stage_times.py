"""Per-stage times of a replica for the search: stage lists, optimizer steps and a floor's terms.

:class:`StageTimes` is the part of :class:`~.predict.CostModel` that turns a replica (its
groups by position), its cuts and its rows into one micro-batch's time per stage
(:meth:`~StageTimes.stage_lists`), the optimizer step per position
(:meth:`~StageTimes.optimizer_times`), and what the search's time floor reads of them
(:meth:`~StageTimes.floor_terms`). All are memoised on cheap keys: the search asks for
hundreds of thousands of cut moves, and a move changes the layers of one or two positions.
"""

from __future__ import annotations

from collections.abc import Sequence

from .formulas import optimizer_step_time, point_to_point_time

__all__ = ["StageTimes"]


class StageTimes:
    """Stage and position times of replicas (mixed into :class:`~.predict.CostModel`, which
    holds the model, the cluster and the memos these read)."""

    # The memos of times (and of what they read: links, shares, parameter bytes), never of memory
    # (the parameter bytes a member holds are, before the options scale them to its state bytes).
    _TIME_MEMOS = ("_times", "_class_weights", "_optimizer", "_rank_optimizer", "_p2p", "_stage_lists",
                   "_stage_forward", "_sync", "_floor_terms", "_block_params", "_rank_shares", "_shares",
                   "_links", "_group_links", "_group_kinds", "_replica_keys", "_state_params", "_tied",
                   "_forward_times", "_class_shares")  # fmt: skip

    def share_times(self, other) -> None:
        """Read and fill ``other``'s memos of times from now on: a cost model of the same model,
        cluster and options under other memory options (:mod:`~..search.memory_options`) times
        every stage alike, and its searches ask for the same stages again.

        Raises:
            ValueError: ``other`` prices another model, cluster or options.
        """
        if other.profile is not self.profile or other.cluster is not self.cluster or other.options != self.options:
            raise ValueError("share_times: the cost models price different models, clusters or options")
        for name in self._TIME_MEMOS:
            setattr(self, name, getattr(other, name))

    def stage_lists(
        self, pipeline: Sequence[Sequence[int]], num_stages: int, num_micro_batch: int, cuts: Sequence[int], rows: int
    ) -> tuple[list[float], list[float], list[float]]:
        """One micro-batch's forward and backward time per stage, and the transfer time per
        boundary, of a replica (``pipeline``: its groups by position) with ``rows`` rows. Memoised
        per replica and per stage on (group, rows per micro-batch, layers): a moved cut recomputes
        the one or two stages it changes."""
        pipeline = pipeline if type(pipeline) is tuple else tuple(map(tuple, pipeline))
        key = (pipeline, num_stages, num_micro_batch, tuple(cuts), rows)
        found = self._stage_lists.get(key)
        if found is None:
            p, q = len(pipeline), rows / num_micro_batch
            bounds = (0, *cuts, self.num_layers)
            forward, backward, p2p = [], [], []
            for s in range(num_stages):
                group, a, b = pipeline[s % p], bounds[s], bounds[s + 1]
                both = self._stage_pair(group, q, a, b)
                forward.append(both[0])
                backward.append(both[1])
                if s < num_stages - 1:
                    p2p.append(self._transfer(group[0], pipeline[(s + 1) % p][0], b, q))
            if len(self._stage_lists) > 200_000:
                self._stage_lists, self._stage_forward = {}, {}
            found = self._stage_lists[key] = (forward, backward, p2p)
        return list(found[0]), list(found[1]), list(found[2])

    def _stage_pair(self, group: tuple[int, ...], q: float, a: int, b: int) -> tuple[float, float]:
        """Forward and backward of layers ``a..b-1`` on ``group`` for ``q`` rows, memoised."""
        found = self._stage_forward.get((group, q, a, b))
        if found is None:
            found = self._stage_forward[(group, q, a, b)] = self.group_times(group, self.shard_shares(group), q, a, b)
        return found

    def optimizer_times(self, pipeline: Sequence[Sequence[int]], num_stages: int, cuts: Sequence[int]) -> tuple[float, ...]:
        """The optimizer step per position of a replica: its slowest member over its shard of
        the position's stages (``formulas.optimizer_step_time``), memoised per position on its
        group and layer ranges (a moved cut changes one or two positions)."""
        p = len(pipeline)
        by_ranks = (pipeline if type(pipeline) is tuple else tuple(map(tuple, pipeline)), num_stages, tuple(cuts))
        cached = self._rank_optimizer.get(by_ranks)
        if cached is not None:
            return cached
        bounds, out = (0, *cuts, self.num_layers), []
        for pos, group in enumerate(by_ranks[0]):
            out.append(self._position_optimizer(group, tuple((bounds[s], bounds[s + 1]) for s in range(pos, num_stages, p))))
        self._rank_optimizer = {} if len(self._rank_optimizer) > 200_000 else self._rank_optimizer
        cached = self._rank_optimizer[by_ranks] = tuple(out)
        return cached

    def _position_optimizer(self, group: tuple[int, ...], blocks: tuple[tuple[int, int], ...]) -> float:
        """:meth:`optimizer_times` of one position: ``group`` holding layer ranges ``blocks``
        (memoised on its members' devices: the groups of every replica share it)."""
        key = (self.group_kind(group), blocks)
        found = self._optimizer.get(key)
        if found is None:
            tensors = int(sum(self.param_tensors[b] - self.param_tensors[a] for a, b in blocks))
            repl = sum(self.repl_params[b] - self.repl_params[a] for a, b in blocks)
            sharded = sum(self.block_param_bytes(a, b) for a, b in blocks) - repl
            kinds = set(zip((self.device_of[r] for r in group), self.shard_shares(group)))
            found = self._optimizer[key] = max(
                optimizer_step_time((sharded * share + repl) / self.profile.param_dtype_bytes, tensors, device,
                                    optimizer=self.options.optimizer, precision=self.options.precision)
                for device, share in kinds
            )  # fmt: skip
        return found

    def _transfer(self, x: int, y: int, boundary: int, q: float) -> float:
        """The activations after layer ``boundary`` for ``q`` rows, sent from rank ``x`` to ``y``."""
        cached = self._p2p.get((x, y, boundary, q))
        if cached is None:
            size = self.cut_bytes[boundary] * q
            cached = self._p2p[(x, y, boundary, q)] = 0.0 if x == y else point_to_point_time(size, self.link(x, y))
        return cached

    def floor_terms(
        self, pipeline: Sequence[Sequence[int]], num_stages: int, num_micro_batch: int, cuts: Sequence[int], rows: int
    ) -> tuple[tuple[float, ...], ...]:
        """What :func:`~.time_floor.floor_of_terms` reads of a replica: per position its stages'
        forward plus backward (summed in stage order), its first stage's forward and backward,
        and its optimizer step; and the transfer after each position's first stage (the first
        ``min(p, stages - 1)``). The same floats as :meth:`stage_lists` and
        :meth:`optimizer_times`, memoised per position on (group, rows per micro-batch, its
        stages' layers), so a moved cut recomputes one or two positions and copies no lists."""
        p, q = len(pipeline), rows / num_micro_batch
        bounds = (0, *cuts, self.num_layers)
        work, first_f, first_b, opt, p2p = [], [], [], [], []
        for pos in range(p):
            group = pipeline[pos] if type(pipeline[pos]) is tuple else tuple(pipeline[pos])
            key = (group, q, bounds[pos::p], bounds[pos + 1 :: p])
            found = self._floor_terms.get(key)
            if found is None:
                blocks = tuple((bounds[s], bounds[s + 1]) for s in range(pos, num_stages, p))
                both = [self._stage_pair(group, q, a, b) for a, b in blocks]
                self._floor_terms = {} if len(self._floor_terms) > 200_000 else self._floor_terms
                found = self._floor_terms[key] = (
                    sum([f + b for f, b in both]), both[0][0], both[0][1], self._position_optimizer(group, blocks)
                )  # fmt: skip
            work.append(found[0])
            first_f.append(found[1])
            first_b.append(found[2])
            opt.append(found[3])
            if pos < num_stages - 1:
                x, y, b = group[0], pipeline[(pos + 1) % p][0], bounds[pos + 1]
                sent = self._p2p.get((x, y, b, q))  # _transfer's memo, looked up without the call
                p2p.append(sent if sent is not None else self._transfer(x, y, b, q))
        return tuple(work), tuple(first_f), tuple(first_b), tuple(p2p), tuple(opt)
