"""ZeRO stages 1 and 2: the optimizer steps this rank's shards; the full parameters follow.

Both keep full parameters on every rank (the model runs as it is) and give the optimizer, for
each parameter, a shard: a contiguous slice of its flattened elements (a view of the
parameter's storage; see :mod:`.shard_layout`), so AdamW's state is 1/dp of the model's and its
update lands in the parameter itself. After the optimizer's step, :meth:`gather_parameters`
all-gathers every rank's updated slices, bucket by bucket, before the next forward.

* Stage 1 keeps the data-parallel all-reduce of :class:`~..grad_sync.GradientReducer` (with its
  shared-memory path on one host): full gradients stay, each shard's ``.grad`` is a view of
  its slice of them.
* Stage 2 reduce-scatters instead: as a bucket's gradients become final in backward they are
  packed into the padded-shard layout and reduce-scattered (in flight while backward goes on, as the all-reduce
  buckets are), the full gradients are dropped, and only this rank's summed region is kept.
  The loss does not ride on these buckets (a reduce-scatter leaves each rank a part).

Why not FSDP2 (``fully_shard``) here: it shards each parameter on dim 0 as a DTensor and owns
the module's forward; whale's programs need the parameters the user built (tensor-parallel
shards, pipeline stages, tied weights left out), uneven element counts, gradients weighted by
uneven rows, and the buckets' launch order, so the layout is whale's own. Both use the same
collectives (``reduce_scatter_tensor`` / ``all_gather_into_tensor``, which gloo has).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..grad_sync import GradientReducer, bucket_parts, drop_unused_gradients
from ..process_group import all_gather_flat, reduce_scatter_flat
from .shard_layout import PaddedShardLayout

__all__ = ["ShardedReducer"]


class ShardedReducer:
    """Gradients of ``params`` summed over ``group`` and sharded (ZeRO ``stage`` 1 or 2).

    It is driven as :class:`GradientReducer` is (:meth:`begin` before the synchronizing
    backward, :meth:`finish` after); then ``shards[id(p)].grad`` holds this rank's part of the
    summed gradient of ``p``. Call :meth:`gather_parameters` after the optimizer stepped the
    shards and before the next forward (collective).

    Args:
        params: the parameters to shard, in registration order.
        group: the data-parallel group (None: the default group).
        stage: 1 or 2.
        bucket_cap_bytes, first_bucket_cap_bytes, comm_dtype: as :class:`GradientReducer`'s.
        extra_numel, host: stage 1 only, passed to its :class:`GradientReducer`.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        group: dist.ProcessGroup | None,
        stage: int,
        *,
        bucket_cap_bytes: int,
        first_bucket_cap_bytes: int,
        comm_dtype: torch.dtype | None = None,
        extra_numel: int = 0,
        host=None,
    ) -> None:
        assert stage in (1, 2), stage
        self.group, self.stage = group, stage
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self._comm_dtype = comm_dtype
        self._inner: GradientReducer | None = None
        if stage == 1:
            self._inner = GradientReducer(
                params, group, bucket_cap_bytes=bucket_cap_bytes, first_bucket_cap_bytes=first_bucket_cap_bytes,
                comm_dtype=comm_dtype, extra_numel=extra_numel, host=host,
            )
            parts = [b.params for b in self._inner.buckets]
        else:
            assert extra_numel == 0, "the loss cannot ride on a reduce-scatter"
            parts = bucket_parts(params, bucket_cap_bytes, first_bucket_cap_bytes)
        self.parts = parts
        self.layouts = [PaddedShardLayout([p.numel() for p in part], self.size, self.rank) for part in parts]
        self.shards: dict[int, nn.Parameter] = {}
        for part, layout in zip(parts, self.layouts):
            for p, (lo, hi) in zip(part, layout.ranges):
                if not p.is_contiguous():
                    raise ValueError(
                        f"zero_stage needs contiguous parameters; a parameter of shape {tuple(p.shape)} "
                        "is not (make it with .contiguous() before parallelize)"
                    )
                self.shards[id(p)] = nn.Parameter(p.data.view(-1)[lo:hi], requires_grad=True)
        # Stage 2: this rank's summed region of each bucket; the shards' gradients are its views.
        self._regions = [
            torch.zeros(layout.region, dtype=part[0].dtype, device=part[0].device) for part, layout in zip(parts, self.layouts)
        ] if stage == 2 else []
        self._where: dict[int, tuple[int, int]] = {}
        self._handles = []
        self._active = False
        self._next = 0
        self._ready: list[set[int]] = [set() for _ in parts]
        self._works: list[tuple[int, torch.Tensor, torch.Tensor, dist.Work]] = []
        self.pace: Callable[[], None] | None = None
        # Stage 2: a used flag per parameter after each finish(); with flags_ride the owner sums them.
        self.flags_ride, self.used_flags, self._unused = False, None, []
        self._first = [0]  # each part's first flag
        for part in parts:
            self._first.append(self._first[-1] + len(part))
        self._flag_shards = [self.shards[id(p)] for part in parts for p in part]  # in flag order
        if stage == 2:
            for b, part in enumerate(parts):
                for i, p in enumerate(part):
                    self._where[id(p)] = (b, i)
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))

    # ---- the GradientReducer surface ---------------------------------------------------------

    @property
    def extra(self) -> torch.Tensor:
        assert self._inner is not None, "stage 2 reserves no extra elements"
        return self._inner.extra

    def begin(self) -> None:
        if self._inner is not None:
            self._inner.pace = self.pace
            self._inner.begin()
            return
        assert not self._active, "begin() twice without finish()"
        for ready in self._ready:
            ready.clear()
        self._next = 0
        self._works.clear()
        self._active = True

    def finish(self) -> None:
        """Wait for the reduction; every shard's ``.grad`` is then its part of the sum."""
        if self._inner is not None:
            self._inner.finish()
            for part, layout in zip(self.parts, self.layouts):
                for p, (lo, hi) in zip(part, layout.ranges):
                    # None where no rank used p (the inner reducer left it none)
                    self.shards[id(p)].grad = None if p.grad is None else p.grad.view(-1)[lo:hi]
            return
        assert self._active, "finish() without begin()"
        unused = []
        for b in range(self._next, len(self.parts)):
            unused += [(b, i) for i, p in enumerate(self.parts[b]) if i not in self._ready[b] and p.grad is None]
            self._ready[b].update(range(len(self.parts[b])))  # unused parameters send zeros
        self._launch_ready()
        # Which parameters no rank used (they keep no gradient, as on the local model): a
        # reduce-scatter leaves each rank a part, so the flags take a small all-reduce of their
        # own, or ride on the owner's (flags_ride: it sums used_flags and calls drop_unused).
        self._unused = [self._first[b] + i for b, i in unused]
        used = torch.ones(self._first[-1], dtype=torch.float32, device=self.parts[0][0].device)
        used[self._unused] = 0
        self.used_flags = used
        flags = None if self.flags_ride else dist.all_reduce(used, group=self.group, async_op=True)
        for b, _, out, work in self._works:
            work.wait()
            if out is not self._regions[b]:
                self._regions[b].copy_(out)
        self._works.clear()
        self._active = False
        for part, layout, region in zip(self.parts, self.layouts, self._regions):
            for p, view in zip(part, layout.region_views(region)):
                self.shards[id(p)].grad = view
        if flags is not None:
            flags.wait()
            self.drop_unused(used)

    def drop_unused(self, summed: torch.Tensor) -> None:
        """``summed``: :attr:`used_flags` summed over the group."""
        drop_unused_gradients(self._flag_shards, self._unused, summed)

    def remove_hooks(self) -> None:
        if self._inner is not None:
            self._inner.remove_hooks()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ---- after the optimizer's step ----------------------------------------------------------

    def gather_parameters(self) -> None:
        """All-gather every rank's updated shards into the full parameters (collective over the
        group; two buckets in flight). Stage 1 drops the step's full gradients here: the
        optimizer consumed their shards, and the next backward starts from none, as after
        ``zero_grad()`` without ZeRO."""
        if self._inner is not None:
            for part in self.parts:
                for p in part:
                    p.grad = None
            host = self._inner._host
            if host is not None:
                # On one host the buckets' shared-memory segments carry it, on the thread
                # that orders that group's barriers.
                host._link.worker.submit(self._gather_through_host, host).result()
                return
        pending: list[tuple[int, torch.Tensor, dist.Work]] = []
        for b, (part, layout) in enumerate(zip(self.parts, self.layouts)):
            mine = torch.empty(layout.region, dtype=part[0].dtype, device=part[0].device)
            for p, view, (lo, hi) in zip(part, layout.region_views(mine), layout.ranges):
                view.copy_(p.data.view(-1)[lo:hi])
            whole = torch.empty(layout.numel, dtype=mine.dtype, device=mine.device)
            pending.append((b, whole, all_gather_flat(whole, mine, group=self.group, async_op=True)))
            if len(pending) > 1:
                self._unpack(*pending.pop(0))
        for item in pending:
            self._unpack(*item)

    def _gather_through_host(self, host) -> None:
        """The all-gather through the stage-1 buckets' segments, which every rank maps (their
        gradients are spent): each rank writes its slot into its own segment, then copies
        every other rank's slot out of theirs, then unpacks. Two barriers for all buckets."""
        link = host._link
        assert link.rank == self.rank, "the host group lists the data group's ranks in order"
        for b, (part, layout) in enumerate(zip(self.parts, self.layouts)):
            mine = host._segments[b][link.rank]
            for p, start, (lo, hi) in zip(part, layout.starts, layout.ranges):
                mine[start + lo : start + hi].copy_(p.data.view(-1)[lo:hi])
        link.barrier()  # every slot is written
        for b, layout in enumerate(self.layouts):
            segments = host._segments[b]
            for q, seg in enumerate(segments):
                if q != link.rank:
                    at, n = q * layout.region, layout.shard_sizes[q]
                    segments[link.rank][at : at + n].copy_(seg[at : at + n])
        link.barrier()  # every rank has read every slot: segments may take gradients again
        for b, (part, layout) in enumerate(zip(self.parts, self.layouts)):
            flat = host._segments[b][link.rank][: layout.total]
            torch._foreach_copy_([p.data.view(-1) for p in part], list(torch.split(flat, list(layout.numels))))

    def _unpack(self, b: int, whole: torch.Tensor, work: dist.Work) -> None:
        work.wait()
        self.layouts[b].unpack(whole, [p.data for p in self.parts[b]])

    # ---- stage 2: reduce-scatter as buckets become final -------------------------------------

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if not self._active:
            return
        b, i = self._where[id(param)]
        self._ready[b].add(i)
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.parts) and len(self._ready[self._next]) == len(self.parts[self._next]):
            self._launch(self._next)
            self._next += 1

    def _launch(self, b: int) -> None:
        if self.pace is not None:
            self.pace()
        part, layout, region = self.parts[b], self.layouts[b], self._regions[b]
        dtype = self._comm_dtype or region.dtype
        whole = torch.empty(layout.numel, dtype=dtype, device=region.device)
        layout.pack([p.grad for p in part], whole, dtype=part[0].dtype)  # a part has one dtype
        for p in part:
            p.grad = None  # the full gradient goes: only this rank's region stays
        out = region if dtype == region.dtype else torch.empty(layout.region, dtype=dtype, device=region.device)
        work = reduce_scatter_flat(out, whole, group=self.group, async_op=True)
        self._works.append((b, whole, out, work))
