"""ZeRO stage 3: parameters sharded too, gathered one layer ahead of use and freed after.

The model is cut into units: every child of an ``nn.ModuleList`` or ``nn.Sequential`` (a
transformer's blocks) that no other unit holds, and the root, which keeps what no unit claims
(embeddings, final norm, head). Each unit's parameters live, between uses, only as this rank's region of the
padded-shard layout (:mod:`.shard_layout`); the optimizer's shards are views of that region.

* forward: a unit's pre-hook all-gathers it (or waits for the prefetch) and starts gathering
  the unit that ran after it last time; its post-hook frees the full parameters (their
  storage is resized to 0, so tensors autograd saved keep their identity) and hooks its
  outputs' gradients;
* backward: the first gradient of a unit's output gathers it again and prefetches the unit
  before it, and reduces the units after it in forward order, whose backward is over: their
  gradients are packed, reduce-scattered (in flight while backward goes on) and the full
  parameters freed. Every rank reduces the same units in the same order, whichever of their
  parameters got a gradient on it (a rank whose rows no expert of a layer took sends zeros
  for that expert), so the collectives pair up;
* at the end of each backward the reductions are waited for and added into this rank's
  gradient region (micro-batches accumulate there), so full gradients never outlive a unit.

An ``fx.GraphModule`` (a pipeline stage, a tensor-parallel rewrite) runs its layers inline,
not through their modules' hooks: it is one unit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from ..grad_sync import drop_unused_gradients
from ..process_group import all_gather_flat, reduce_scatter_flat
from .shard_layout import PaddedShardLayout

__all__ = ["ShardedParameters", "unit_modules"]


def unit_modules(module: nn.Module, always_run: frozenset[str] = frozenset()) -> list[tuple[str, nn.Module]]:
    """The modules stage 3 gathers as one: the root, then every child of a container that no
    other unit holds, or of a container in ``always_run`` (one whose every child the captured
    graph runs: a Swin stage's blocks). Any other container inside a unit stays in it: its
    children may run on some ranks only (a mixture-of-experts layer calls the experts its rows
    were routed to), and each rank must gather the same units in the same order."""
    units = [("", module)]
    if isinstance(module, fx.GraphModule):
        return units
    for path, sub in module.named_modules():
        inside = path not in always_run and any(path == unit or path.startswith(f"{unit}.") for unit, _ in units[1:])
        if isinstance(sub, (nn.ModuleList, nn.Sequential)) and not inside:
            for name, child in sub.named_children():
                if next(child.parameters(), None) is not None:
                    units.append((f"{path}.{name}" if path else name, child))
    return units


class _Unit:
    __slots__ = ("fresh", "full", "grad_dtype", "grad_region", "layout", "module", "name", "params",
                 "pending", "reduced", "region", "shards", "trainable")

    def __init__(self, name: str, module: nn.Module, params: list[nn.Parameter], size: int, rank: int) -> None:
        self.name, self.module, self.params = name, module, params
        self.layout = PaddedShardLayout([p.numel() for p in params], size, rank)
        dtype, device = params[0].dtype, params[0].device
        # The gradients' one dtype, where the parameters share one (packs skip their check).
        self.grad_dtype = dtype if all(p.dtype == dtype for p in params) else None
        self.region = torch.zeros(self.layout.region, dtype=dtype, device=device)
        for p, view, (lo, hi) in zip(params, self.layout.region_views(self.region), self.layout.ranges):
            view.copy_(p.data.reshape(-1)[lo:hi])
            p.data = p.data.clone(memory_format=torch.contiguous_format)  # its own storage, to free
        self.shards = [nn.Parameter(v, requires_grad=p.requires_grad)
                       for p, v in zip(params, self.layout.region_views(self.region))]
        self.grad_region = torch.zeros_like(self.region)
        self.trainable = {id(p) for p in params if p.requires_grad}
        self.reduced = False  # in this backward
        self.full = True
        self.pending: tuple[torch.Tensor, dist.Work] | None = None
        self.fresh = True


class ShardedParameters:
    """The parameters of ``module`` sharded over ``group`` (ZeRO stage 3).

    Driven as :class:`~..grad_sync.GradientReducer` is (:meth:`begin`, :meth:`finish`), though
    it reduces every backward (each micro-batch's, accumulated). ``shards[id(p)]`` is this
    rank's shard of ``p`` (what the optimizer steps); after :meth:`finish` its ``.grad`` holds
    this rank's part of the summed gradient.

    Args:
        module: the model (its parameters already equal on every rank of ``group``).
        group: the data-parallel group (None: the default group).
        comm_dtype: dtype gradients travel in (None: the parameters').
        exclude: ids of parameters to leave whole (synchronized elsewhere).
        always_run: containers inside a unit whose children become units too (see
            :func:`unit_modules`).
    """

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None, *,
                 comm_dtype: torch.dtype | None = None, exclude: frozenset[int] = frozenset(),
                 always_run: frozenset[str] = frozenset()) -> None:  # fmt: skip
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self._comm_dtype = comm_dtype
        self.pace: Callable[[], None] | None = None
        claimed = set(exclude)
        units: list[_Unit] = []
        # Inner units claim their parameters first; the root keeps the rest.
        for name, sub in reversed(unit_modules(module, always_run)):
            mine = [p for p in sub.parameters() if id(p) not in claimed]
            claimed.update(id(p) for p in mine)
            if mine:
                units.append(_Unit(name, sub, mine, self.size, self.rank))
        self.units = units[::-1]
        self.shards: dict[int, nn.Parameter] = {}
        self._owner: dict[int, _Unit] = {}
        self._handles = []
        for unit in self.units:
            for p, shard in zip(unit.params, unit.shards):
                self.shards[id(p)] = shard
                self._owner[id(p)] = unit
            self._handles.append(unit.module.register_forward_pre_hook(self._pre_forward(unit)))
            self._handles.append(unit.module.register_forward_hook(self._post_forward(unit)))
        # A module inside a unit that runs while the unit is freed (called directly, not through
        # the unit's forward: Reformer's reversible layers recompute layer.attention and
        # layer.feed_forward in their autograd Function's backward) gathers its unit first; the
        # unit is freed again at the end of backward.
        unit_ids = {id(unit.module) for unit in self.units}
        for unit in self.units:
            for sub in unit.module.modules():
                if id(sub) not in unit_ids and any(self._owner.get(id(p)) is unit for p in sub.parameters(recurse=False)):
                    self._handles.append(sub.register_forward_pre_hook(self._on_demand(unit)))
        self._order: list[_Unit] = []  # forward order of the last forward, for prefetching
        self._at: dict[int, int] = {}  # id(unit) -> its last place in _order
        self._first: dict[int, int] = {}  # id(unit) -> its first place in _order
        self._recording: list[_Unit] = []
        self._in_backward = False
        self._works: list[tuple[_Unit, torch.Tensor, torch.Tensor, dist.Work]] = []
        self._used: set[int] = set()  # parameters with a gradient in this step's backwards
        # A used flag per trainable parameter after each finish(); with flags_ride the owner
        # sums them (on its own all-reduce) and calls drop_unused.
        self.flags_ride, self.used_flags, self._unused = False, None, []
        self._trainable = [p for unit in self.units for p in unit.params if p.requires_grad]  # in flag order
        self._flag_shards = [self.shards[id(p)] for p in self._trainable]
        for unit in self.units:
            self._free(unit)

    # ---- the reducer surface -----------------------------------------------------------------

    def begin(self) -> None:
        """Nothing to open: every backward reduces (see :meth:`finish`)."""

    def finish(self) -> None:
        """Point every shard's ``.grad`` at this rank's summed gradient of the step; a parameter
        no rank used in the step keeps none, as on the local model (one small all-reduce of
        a used flag per parameter)."""
        self._end_backward()
        self._unused = [k for k, p in enumerate(self._trainable) if id(p) not in self._used]
        self._used.clear()
        used = torch.ones(len(self._trainable), device=self.units[0].region.device if self.units else None)
        used[self._unused] = 0
        self.used_flags = used
        flags = None if self.flags_ride or not self._trainable else dist.all_reduce(used, group=self.group, async_op=True)
        for unit in self.units:
            if unit.fresh:
                unit.grad_region.zero_()  # no gradient reached this unit in the step
            unit.fresh = True
            for p, shard, view in zip(unit.params, unit.shards, unit.layout.region_views(unit.grad_region)):
                if p.requires_grad:
                    shard.grad = view
        if flags is not None:
            flags.wait()
            self.drop_unused(used)

    def drop_unused(self, summed: torch.Tensor) -> None:
        """``summed``: :attr:`used_flags` summed over the group."""
        drop_unused_gradients(self._flag_shards, self._unused, summed)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def gather_all(self) -> None:
        """Gather every unit (collective): the full parameters, e.g. for a state dict."""
        for unit in self.units:
            self._gather(unit)

    def free_all(self, refresh: bool = False) -> None:
        """Free every unit; ``refresh`` first takes the shards from the full parameters (after
        they were loaded)."""
        for unit in self.units:
            if refresh and unit.full:
                with torch.no_grad():
                    for p, view, (lo, hi) in zip(unit.params, unit.layout.region_views(unit.region), unit.layout.ranges):
                        view.copy_(p.data.view(-1)[lo:hi])
            self._free(unit)

    def resident_numel(self) -> int:
        """Elements of full parameters this rank holds now (0 between steps)."""
        return sum(p.numel() for u in self.units if u.full for p in u.params)

    # ---- gathering and freeing ---------------------------------------------------------------

    def _start(self, unit: _Unit) -> None:
        if unit.full or unit.pending is not None:
            return
        whole = torch.empty(unit.layout.numel, dtype=unit.region.dtype, device=unit.region.device)
        unit.pending = (whole, all_gather_flat(whole, unit.region, group=self.group, async_op=True))

    def _gather(self, unit: _Unit) -> None:
        if unit.full:
            return
        self._start(unit)
        whole, work = unit.pending
        work.wait()
        unit.pending = None
        for p in unit.params:
            p.data.untyped_storage().resize_(p.numel() * p.element_size())
        unit.layout.unpack(whole, [p.data for p in unit.params])
        unit.full = True

    def _free(self, unit: _Unit) -> None:
        if unit.pending is not None:  # a prefetch nobody used: finish it, drop the data
            unit.pending[1].wait()
            unit.pending = None
        if unit.full:
            for p in unit.params:
                p.data.untyped_storage().resize_(0)
            unit.full = False

    def _prefetch(self, unit: _Unit, step: int) -> None:
        at = self._at.get(id(unit))
        if at is not None and 0 <= at + step < len(self._order):
            self._start(self._order[at + step])

    # ---- hooks -------------------------------------------------------------------------------

    def _pre_forward(self, unit: _Unit):
        def hook(module, args):
            if unit is self.units[0]:
                self._recording = []
            self._recording.append(unit)
            self._gather(unit)
            self._prefetch(unit, 1)
        return hook

    def _on_demand(self, unit: _Unit):
        def hook(module, args):
            self._gather(unit)  # nothing to do where the unit's own forward gathered it
        return hook

    def _post_forward(self, unit: _Unit):
        def hook(module, args, output):
            if unit is self.units[0]:
                self._order = self._recording
                self._at = {id(u): i for i, u in enumerate(self._order)}
                self._first = {}
                for i, u in enumerate(self._order):
                    self._first.setdefault(id(u), i)
            if torch.is_grad_enabled():
                for t in tree_flatten(output)[0]:
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        t.register_hook(self._pre_backward(unit))
            self._free(unit)
        return hook

    def _pre_backward(self, unit: _Unit):
        def hook(grad):
            if not self._in_backward:
                self._in_backward = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
            # Backward enters this unit: the units whose every use came after its last one
            # (AccumulateGrad runs as soon as a gradient is ready) are done. The root holds
            # the whole forward: its output's gradient comes first and says nothing.
            if unit is not self.units[0]:
                self._reduce_after(self._at.get(id(unit), len(self._order)))
            self._gather(unit)
            self._prefetch(unit, -1)
        return hook

    def _reduce_after(self, place: int) -> None:
        """Reduce the trainable units not reduced in this backward whose first use in the last
        forward came after ``place``, the latest first: an order every rank shares."""
        done = [u for u in self.units
                if u.trainable and not u.reduced and id(u) in self._first and self._first[id(u)] > place]  # fmt: skip
        for unit in sorted(done, key=lambda u: -self._first[id(u)]):
            self._reduce(unit)

    def _reduce(self, unit: _Unit) -> None:
        if self.pace is not None:
            self.pace()
        dtype = self._comm_dtype or unit.region.dtype
        whole = torch.empty(unit.layout.numel, dtype=dtype, device=unit.region.device)
        self._used.update(id(p) for p in unit.params if p.grad is not None)
        unit.layout.pack([p.grad for p in unit.params], whole, dtype=unit.grad_dtype)
        for p in unit.params:
            p.grad = None
        unit.reduced = True
        self._free(unit)
        out = torch.empty(unit.layout.region, dtype=dtype, device=whole.device)
        self._works.append((unit, whole, out, reduce_scatter_flat(out, whole, group=self.group, async_op=True)))

    def _end_backward(self) -> None:
        """Reduce the units backward has not (the first ones, those forward did not run:
        every trainable unit once, on every rank), wait for every reduction, accumulate it, free
        what is still gathered."""
        # Once per backward: finish() calls this again after the engine's callback did.
        if self._in_backward or any(p.grad is not None for unit in self.units for p in unit.params):
            self._reduce_after(-1)  # the units forward ran, the latest first
            for unit in self.units:  # then any it did not run, in unit order
                if unit.trainable and not unit.reduced:
                    self._reduce(unit)
        for unit, _, out, work in self._works:
            work.wait()
            if unit.fresh:
                unit.grad_region.copy_(out)
                unit.fresh = False
            else:
                unit.grad_region.add_(out)
        self._works.clear()
        for unit in self.units:
            self._free(unit)
            unit.reduced = False
        self._in_backward = False
