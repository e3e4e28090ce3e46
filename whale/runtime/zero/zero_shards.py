"""What a program holds for ``Config(zero_stage=...)``: its reducers' shards, by parameter.

A program hands the optimizer ``shard(p)`` for each of its parameters ``p``; calls
:meth:`ZeroShards.sync` before running the model (stage 1/2: the updated shards are
all-gathered into the full parameters once after each synchronized step); gathers shards
into whole tensors with :meth:`gather_full`. An optimizer stepping the full parameters is
caught at its first step (``torch.optim.optimizer.register_optimizer_step_pre_hook``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .sharded_params import ShardedParameters
from .sharded_reducer import ShardedReducer

__all__ = ["ZeroShards"]


class ZeroShards:
    """The ZeRO state of one program: ``stage`` and the sharding objects it made.

    Args:
        stage: ``Config.zero_stage`` (1, 2 or 3).
        names: each full parameter's local-model name, by id (for error messages).
    """

    def __init__(self, stage: int, names: Mapping[int, str]) -> None:
        self.stage = stage
        self.parts: list[ShardedReducer | ShardedParameters] = []
        self._names = dict(names)
        self._full: dict[int, nn.Parameter] = {}
        self._dirty = False
        self._checked: weakref.WeakSet = weakref.WeakSet()
        ref = weakref.ref(self)

        def check(optimizer, args, kwargs) -> None:
            zero = ref()
            if zero is not None:
                zero._check_optimizer(optimizer)

        # torch's hook is global: it goes when this program does.
        self._hook = register_optimizer_step_pre_hook(check)
        weakref.finalize(self, self._hook.remove)

    def add(self, part: ShardedReducer | ShardedParameters, params) -> ShardedReducer | ShardedParameters:
        """Take ``part``'s shards of ``params`` (the full parameters it covers)."""
        self.parts.append(part)
        for p in params:
            if id(p) in part.shards:
                self._full[id(p)] = p
        return part

    def shard(self, param: nn.Parameter) -> nn.Parameter:
        """What the optimizer steps for ``param``: its shard, or itself where unsharded."""
        for part in self.parts:
            shard = part.shards.get(id(param))
            if shard is not None:
                return shard
        return param

    def mark_synchronized(self) -> None:
        """Gradients were synchronized: an optimizer may step the shards before the next run."""
        self._dirty = True

    def sync(self) -> None:
        """Stage 1/2: all-gather updated shards into the full parameters, once after each
        synchronized step (collective over each data-parallel group, on every rank alike)."""
        if not self._dirty:
            return
        self._dirty = False
        for part in self.parts:
            if isinstance(part, ShardedReducer):
                part.gather_parameters()

    @contextlib.contextmanager
    def full(self, refresh: bool = False) -> Iterator[None]:
        """Full parameters inside (collective): updated shards gathered (stage 1/2); stage 3
        gathers every unit and frees them after, first taking the shards from them where
        ``refresh`` (they were loaded)."""
        self.sync()
        sharded = [part for part in self.parts if isinstance(part, ShardedParameters)]
        for part in sharded:
            part.gather_all()
        try:
            yield
        finally:
            for part in sharded:
                part.free_all(refresh=refresh)

    def gather_full(self, tensors: Mapping[str, torch.Tensor | None], params: Mapping[str, nn.Parameter]
                    ) -> dict[str, torch.Tensor | None]:
        """Whole tensors from this rank's shard-shaped ones (a shard's gradient, the shard
        itself), by name (collective over each data-parallel group: every rank passes the same
        names; a shard may hold all of a small parameter, or none of it)."""
        out: dict[str, torch.Tensor | None] = {}
        for name, t in tensors.items():
            p = params.get(name)
            located = self._locate(p) if p is not None else None
            if t is None or located is None:
                out[name] = t
                continue
            part, layout, i = located
            # Every rank's part in place, zeros elsewhere: the sum is the whole tensor.
            lo, hi = layout.ranges[i]
            whole = torch.zeros(p.numel(), dtype=t.dtype, device=t.device)
            whole[lo:hi] = t.reshape(-1)
            dist.all_reduce(whole, group=part.group)
            out[name] = whole.view(p.shape)
        return out

    def flat_range(self, param: nn.Parameter) -> tuple[int, int] | None:
        """``(lo, hi)``: the elements of ``param`` flattened that this rank's shard of it holds
        (``lo == hi``: none), or None where ``param`` is not sharded (left whole)."""
        ranges = self.__dict__.get("_ranges")
        if ranges is None:
            ranges = {}
            for part in self.parts:
                if isinstance(part, ShardedReducer):
                    for bucket, layout in zip(part.parts, part.layouts):
                        ranges.update((id(q), r) for q, r in zip(bucket, layout.ranges))
                else:
                    for unit in part.units:
                        ranges.update((id(q), r) for q, r in zip(unit.params, unit.layout.ranges))
            self._ranges = ranges
        found = ranges.get(id(param))
        if found is None or id(param) not in self._full or self._full[id(param)] is not param:
            return None
        return found

    def _locate(self, p: nn.Parameter):
        for part in self.parts:
            if id(p) not in part.shards:
                continue
            if isinstance(part, ShardedReducer):
                for b, bucket in enumerate(part.parts):
                    for i, q in enumerate(bucket):
                        if q is p:
                            return part, part.layouts[b], i
            else:
                unit = part._owner[id(p)]
                return part, unit.layout, next(i for i, q in enumerate(unit.params) if q is p)
        return None

    def shard_state_numel(self) -> int:
        """Elements of every shard this rank's optimizer steps (its state is a multiple)."""
        return sum(s.numel() for part in self.parts for s in part.shards.values())

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if optimizer in self._checked:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in self._full and self._full[id(p)] is p:
                    name = self._names.get(id(p), f"of shape {tuple(p.shape)}")
                    raise ValueError(
                        f"Config(zero_stage={self.stage}): the optimizer holds the full parameter "
                        f"{name!r}, not this rank's shard of it; build the optimizer on "
                        "program.parameters() (e.g. torch.optim.AdamW(program.parameters())), "
                        "not on the model's parameters"
                    )
        self._checked.add(optimizer)

    def close(self) -> None:
        self._hook.remove()
        for part in self.parts:
            part.remove_hooks()
