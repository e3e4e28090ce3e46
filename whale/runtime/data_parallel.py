"""The data-parallel program: runs a ``Plan`` whose parts are all replicated."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config
from ..planner.plan import Plan
from ..planner.rows import split_rows
from .batch import broadcast_tensors, narrow, to_device
from .grad_sync import GradientReducer
from .process_group import require_initialized, world_info
from .program import ProgramBase, ReplicaBatch

__all__ = ["DataParallelProgram"]


class DataParallelProgram(ProgramBase):
    """What :func:`whale.parallelize` returns for a data-parallel plan.

    ``step`` takes the global batch on every rank, keeps this replica's rows (as the plan
    splits them, possibly unevenly), runs forward and backward over the micro-batches and
    leaves every parameter's ``.grad`` equal to the local model's gradient on the global batch.
    To load only this rank's rows, use :meth:`local_slice` and ``step(..., batch="local")``.

    Example::

        program = wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=(x,))
        opt = torch.optim.AdamW(program.parameters(), lr=1e-3)
        loss = program.step(x, y)
        opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        module: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        plan: Plan,
        config: Config,
    ) -> None:
        self.module = module
        self.loss_fn = loss_fn
        self.plan = plan
        self.config = config
        self._reducer: GradientReducer | None = None
        if dist.is_available() and dist.is_initialized():
            self._bind()

    # ---- the optimizer-facing surface -------------------------------------------------------

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters (every parameter: each replica holds a full copy)."""
        return self.module.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters under the local model's names."""
        return self.module.named_parameters()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The local model's state dict (replicas are identical, so nothing is gathered)."""
        return {k: v.detach() for k, v in self.module.state_dict().items()}

    def load_full_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a local model's state dict on every rank (strict: names must match)."""
        missing, unexpected = self.module.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"load_full_state_dict(): missing keys {list(missing)}, unexpected keys "
                f"{list(unexpected)}; pass a state dict of the local model "
                f"{type(self.module).__name__}"
            )

    def train(self, mode: bool = True) -> DataParallelProgram:
        self.module.train(mode)
        return self

    def eval(self) -> DataParallelProgram:
        return self.train(False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the local model on the given inputs (inference; no communication)."""
        return self.module(*args, **kwargs)

    # ---- training ----------------------------------------------------------------------------

    def step(self, inputs: Any, target: Any = None, *, batch: str = "global") -> torch.Tensor:
        """Forward and backward over the micro-batches, gradients synchronized.

        Args:
            inputs: a tensor or a tuple of positional arguments of the model; tensors are cut
                along ``Config.batch_dim``.
            target: passed to ``loss_fn(output, target)``; cut like the inputs. None calls
                ``loss_fn(output)``.
            batch: ``"global"`` (every rank passes the whole batch) or ``"local"`` (each rank
                passes only its rows, see :meth:`local_slice`).

        Returns:
            The loss of the global batch, the same value on every rank.
        """
        if self._reducer is None:
            require_initialized("step()")
            self._bind()
        cut = self._replica_batch(inputs, target, batch, self._device)
        if self.config.broadcast_buffers:
            self._broadcast_buffers()
        return self._forward_backward(cut)

    def _forward_backward(self, cut: ReplicaBatch) -> torch.Tensor:
        args, target, my_rows = cut.args, cut.target, cut.rows
        m = self.config.num_micro_batch
        mb_rows = split_rows(my_rows, [1.0] * m, what="micro-batches")
        mean = self.config.loss_reduction == "mean"
        device = self._device
        weighted = torch.zeros((), dtype=torch.float64, device=device)
        total = None
        at = 0
        for i, n in enumerate(mb_rows):
            mb_args, mb_target = narrow((args, target), self.config.batch_dim, at, n)
            at += n
            mb_args, mb_target = to_device((mb_args, mb_target), device)
            out = self.module(*mb_args)
            loss = self.loss_fn(out) if mb_target is None else self.loss_fn(out, mb_target)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise TypeError(
                    f"loss_fn must return a scalar tensor, got "
                    f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
                )
            if total is None:
                # The agreement check ran behind the first forward; it must pass before any
                # backward starts exchanging gradients.
                total = self._global_rows(cut)
            weight = n / total if mean else 1.0
            weighted = weighted + loss.detach().double() * weight
            last = i == m - 1
            if last:
                # The global loss is summed while backward runs.
                work = dist.all_reduce(weighted, async_op=True)
                self._reducer.begin()
            try:
                (loss * weight).backward()
            finally:
                if last:
                    self._reducer.finish()
        work.wait()
        return weighted.to(loss.dtype)

    # ---- setup -------------------------------------------------------------------------------

    def _bind(self) -> None:
        """Join the process group: move to the device, make replicas equal, hook gradients."""
        info = world_info()
        if info.world_size != self.plan.world_size:
            raise ValueError(
                f"the plan was made for {self.plan.world_size} ranks but the world has "
                f"{info.world_size}; call wh.parallelize after wh.init() in the launched job"
            )
        self._device = info.device
        if any(p.is_meta for p in self.module.parameters()):
            raise ValueError(
                "the model has parameters on the meta device; materialize it (e.g. "
                "model.to_empty(device=...) and initialize) before training"
            )
        self.module.to(self._device)
        # Rank 0's weights win, so replicas start equal whatever each rank's seed was.
        broadcast_tensors([t.data for t in self.module.parameters()] + list(self.module.buffers()))
        self._reducer = self._make_reducer(list(self.module.parameters()), None)

    def _broadcast_buffers(self) -> None:
        buffers = [b for b in self.module.buffers() if b.is_floating_point() or b.dtype == torch.long]
        if buffers and dist.get_world_size() > 1:
            broadcast_tensors(buffers)
