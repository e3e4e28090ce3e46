"""The data-parallel program: runs a ``Plan`` of replicas, each optionally tensor parallel.

With ``plan.tensor_parallel > 1`` every replica is a group of ranks holding the model sharded
by the ``split`` rewrite (``whale.rewrite.tensor_parallel.shard``); gradients of the shards are then
summed over the ranks holding the same shard in the other replicas.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config
from ..rewrite.program import DistributedProgram
from .adaptive import AdaptiveRows, compute_seconds
from .batch import broadcast_tensors
from .emulate import Stretch
from .grad_sync import GradientReducer
from .guard.batch_check import describe_mismatch, digest_digits, digits_agree
from .guard.step_state import every_rank
from .offload import attach_offload
from .process_group import require_initialized
from .program_base import ProgramBase, ReplicaBatch, materialize, shard_from_source

__all__ = ["DataParallelProgram"]


class DataParallelProgram(ProgramBase):
    """What :func:`whale.parallelize` returns for a data-parallel plan.

    ``step`` takes the global batch on every rank, keeps this replica's rows (as the plan
    splits them, possibly unevenly), runs forward and backward over the micro-batches and
    leaves every parameter's ``.grad`` equal to the local model's gradient on the global batch.

    Buffers that forward updates (a step counter, running statistics) are the local model's
    after it ran forward on the first replica's micro-batches in order: each replica updates
    its own, and with ``Config.broadcast_buffers`` the first replica's are sent to the others
    at the end of every step (DDP sends rank 0's at each forward), so every rank holds the same.
    A counter thus equals the local model's with one micro-batch; statistics of the batch
    equal the local model's on the whole batch only with ``Config(sync_batch_norm=True)``.
    To load only this rank's rows, use :meth:`local_slice` and ``step(..., batch="local")``.
    With ``Config(adaptive_rows=True)`` the rows follow the replicas' measured speeds:
    ``plan`` is the plan of the next step and ``rebalancer`` (else None) its record.

    Example::

        program = wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=(x,))
        opt = torch.optim.AdamW(program.parameters(), lr=1e-3)
        loss = program.step(x, y)
        opt.step(); opt.zero_grad()
    """

    def __init__(self, program: DistributedProgram, config: Config) -> None:
        (stage,) = program.stages
        self.program = program
        self.module = stage.module
        self.loss_fn = program.loss_fn
        self.plan = program.plan
        self.config = config
        self._stage = stage
        self._sharded = stage.sharded
        self._reducer: GradientReducer | None = None
        self._bound = False
        self._agreed = False
        self._init_record()
        # The timeline's labels, one pair per micro-batch, made once.
        self._codes = [(f"0F{i}", f"0B{i}") for i in range(self.plan.num_micro_batch)]
        adaptive = config.adaptive_rows and self.plan.dp_degree > 1  # one replica: nothing to move
        self.rebalancer = AdaptiveRows(self.plan, config) if adaptive else None
        if dist.is_available() and dist.is_initialized():
            self._bind()

    # ---- the optimizer-facing surface -------------------------------------------------------

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters: a full copy, or its shards where the model is split."""
        self._require_bound()
        if self._zero is not None:
            return (self._zero.shard(p) for p in self.module.parameters())
        return self.module.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters (or shards) under the local model's names (a tied weight once,
        under the name the local model's ``named_parameters()`` gives it)."""
        self._require_bound()
        names = self._stage.param_names
        zero = self._zero.shard if self._zero is not None else (lambda p: p)
        return ((names.get(n, n), zero(p)) for n, p in self.module.named_parameters())

    def gather_full(self, tensors: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """Whole tensors under local-model names from this rank's ones, e.g. gradients of shards
        (collective over the tensor-parallel group; the identity without split)."""
        self._require_bound()
        if self._zero is not None:
            # ZeRO shards first (over the data group), then tensor-parallel ones.
            names = self._stage.param_names
            full = {names.get(n, n): p for n, p in self.module.named_parameters()}
            tensors = self._zero.gather_full(tensors, full)
        if self._sharded is None:
            return {k: v for k, v in tensors.items()}
        return self._sharded.gather_full(tensors)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The local model's state dict: shards gathered (collective), replicas being identical."""
        self._require_bound()
        with self._zero_full():
            if self._sharded is not None:
                return self._sharded.full_state_dict()
            stage3 = self._zero is not None and self._zero.stage == 3  # its storage is freed after
            return {k: v.detach().clone() if stage3 else v.detach() for k, v in self.module.state_dict().items()}

    def load_full_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a local model's state dict on every rank (strict: names must match)."""
        self._require_bound()
        with self._zero_full(refresh=True):
            self._load_full_state_dict(state_dict)

    def _load_full_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        if self._sharded is not None:
            self._sharded.load_full_state_dict(state_dict)
            return
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
        """Run the local model (this rank's shard of it) on the given inputs, as the local model
        takes them (inference; communication only inside a tensor-parallel group)."""
        args, kwargs = self.program.call.model_inputs(args, kwargs)
        if self._zero is not None:
            self._zero.sync()  # collective once after an optimizer step (ZeRO 1/2)
        return self.module(*args, **kwargs)

    # ---- training ----------------------------------------------------------------------------

    def step(self, inputs: Any, target: Any = None, *, batch: str | None = None, **kwargs: Any) -> torch.Tensor:
        """Forward and backward over the micro-batches, gradients synchronized.

        Args:
            inputs: a tensor, a tuple of positional inputs of the model, or a dict of its
                keyword inputs; tensors are cut along ``Config.batch_dim``, None and other
                values passed to every micro-batch as they are.
            target: passed to ``loss_fn(output, target)``; cut like the inputs. None calls
                ``loss_fn(output)``.
            batch: ``"global"`` (every rank passes the whole batch) or ``"local"`` (each rank
                passes only its rows, see :meth:`local_slice`); None takes ``Config.batch``.
            **kwargs: more keyword inputs of the model (``attention_mask=m``), cut like
                ``inputs``. Inputs that do not fit ``forward`` raise ``TypeError`` on every
                rank before any communication.

        Returns:
            The loss of the global batch, the same value on every rank.

        Example::

            loss = program.step({"input_ids": x, "attention_mask": m}, y)
            loss = program.step(x, y, attention_mask=m)  # the same
        """
        if not self._bound:
            require_initialized("step()")
            self._bind()
        if self._zero is not None:
            self._zero.sync()
        start, stretch = self._step_begin()
        # The first step checks before any backward that every rank passed the same batch;
        # later global-batch steps check after it, on the loss all-reduce they make anyway.
        cut = self._replica_batch(inputs, target, batch, self._device, agree=not self._agreed, kwargs=kwargs)
        timeline: list[tuple[str, float, float]] = []
        with self._communicating():
            loss = self._forward_backward(cut, start, stretch, timeline)
            self._agreed = True
            if self._zero is not None:
                self._zero.mark_synchronized()
            if self.rebalancer is not None:
                self.rebalancer.record(compute_seconds(timeline), cut.rows)
            if self.config.broadcast_buffers:
                # Buffers forward updated (counters, statistics) leave every step as the first
                # replica's, as DDP's broadcast_buffers: full_state_dict() is the same everywhere.
                with self._waiting("the first replica's buffers (a broadcast)", "every data-parallel rank"):
                    self._broadcast_buffers()
            if self.rebalancer is not None:  # collective every adaptive_every steps
                with self._waiting("the replicas' measured times (adaptive rows)", "every data-parallel rank"):
                    self.plan = self.rebalancer.after_step(self.plan, self._device)
        code, began, _ = timeline.pop()  # the sync, which lasts until the buffers are shared
        self._step_end(start, tuple(timeline), ((code, began, time.perf_counter() - start),))
        return loss

    def _forward_backward(self, cut: ReplicaBatch, start: float, stretch: Stretch, timeline: list) -> torch.Tensor:
        """Forward and backward of every micro-batch; each one's interval goes to ``timeline``
        (``"0F3"``, ``"0B3"``), then the wait for the gradients and the loss (``"sync"``)."""
        micro, mb_rows = self._micro_batches(((cut.args, cut.kwargs), cut.target), cut.rows)
        m = len(mb_rows)
        mean = self.config.loss_reduction == "mean"
        device = self._device
        weighted = torch.zeros((), dtype=torch.float64, device=device)
        total = None
        clock, record = time.perf_counter, timeline.append
        codes = self._codes
        if self._reducer is not None:
            self._reducer.pace = stretch.catch_up
        for i, (((mb_args, mb_kwargs), mb_target), n) in enumerate(zip(micro, mb_rows)):
            began = clock()
            stretch.begin()
            out = self.module(*mb_args, **mb_kwargs)
            loss = self.loss_fn(out) if mb_target is None else self.loss_fn(out, mb_target)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise TypeError(
                    f"loss_fn must return a scalar tensor, got "
                    f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
                )
            stretch.end()
            if total is None:
                # The agreement check ran behind the first forward; it must pass before any
                # backward starts exchanging gradients.
                total = self._global_rows(cut)
            weight = n / total if mean else 1.0
            weighted = weighted + loss.detach().double() * weight
            last = i == m - 1
            record((codes[i][0], began - start, clock() - start))
            if last:
                # The global loss is summed with the gradients, and with it the batch
                # digest's digits (shapes and values): every rank passed the same batch iff they agree.
                digits = digest_digits(cut.check.world_digest).to(device)
                started = self._start_summary(torch.cat([weighted.reshape(1), digits]))
            began = clock()
            stretch.begin()
            try:
                (loss * weight).backward()
                stretch.end()
                record((codes[i][1], began - start, clock() - start))
                began = clock()
            finally:
                if last and self._reducer is not None:
                    with self._waiting("the gradient all-reduce", "every data-parallel rank"):
                        self._reducer.finish()
        with self._waiting("the loss all-reduce"):
            summed = self._finish_summary(started)
        record(("sync", began - start, clock() - start))
        if not digits_agree(summed[1:], dist.get_world_size()):
            raise every_rank(ValueError(
                "the ranks' inputs differ in this step; its gradients are invalid: do not apply "
                "them. " + describe_mismatch(cut.check, self.plan.pipelines)
            ))  # fmt: skip
        # Each rank of a tensor-parallel group holds its replica's loss once.
        return torch.tensor(summed[0] / self.plan.tensor_parallel, dtype=loss.dtype, device=device)

    def _start_summary(self, summary: torch.Tensor) -> tuple[dist.Work | None, torch.Tensor] | None:
        """Start summing ``summary`` over all ranks and open the synchronizing backward: in the
        gradient reducer's reserved slots (no collective of its own), else with one all-reduce
        that runs behind backward; under ZeRO 2 and 3 after it, with the reducer's used flags
        (which parameters no rank used: they keep no gradient)."""
        if self._summary_rides:
            self._reducer.extra.copy_(summary)
            self._reducer.begin()
            return None
        flags = self._reducer is not None and getattr(self._reducer, "flags_ride", False)
        work = None if flags else dist.all_reduce(summary, async_op=True)
        if self._reducer is not None:
            self._reducer.begin()
        return work, summary

    def _finish_summary(self, started: tuple[dist.Work | None, torch.Tensor] | None) -> list[float]:
        """The summed summary, once backward and its gradient all-reduce have finished."""
        if started is None:
            return self._reducer.extra.tolist()
        work, summary = started
        if work is None:  # the reducer's used flags ride after it
            n = summary.numel()
            summary = torch.cat([summary, self._reducer.used_flags.to(summary)])
            dist.all_reduce(summary)
            self._reducer.drop_unused(summary[n:])
            return summary[:n].tolist()
        work.wait()
        return summary.tolist()

    # ---- setup -------------------------------------------------------------------------------

    def _require_bound(self) -> None:
        if not self._bound:
            if self.plan.tensor_parallel == 1 and not dist.is_initialized():
                return  # an unsplit model needs no group to show its parameters
            require_initialized("the parallelized program")
            self._bind()

    def _bind(self) -> None:
        """Join the process group: shard, move to the device, make replicas equal, hook gradients."""
        info = self._join_world()
        plan = self.plan
        on_meta = any(p.is_meta for p in self.module.parameters())
        if on_meta and plan.tensor_parallel == 1:
            raise ValueError(
                "the model has parameters on the meta device; materialize it (e.g. "
                "model.to_empty(device=...) and initialize) before training"
            )
        # Groups are made collectively: every rank creates every group, in one order.
        self._data_group = self._make_data_group(info.rank, info.device)
        if self._sharded is not None:
            self._bind_tensor_groups()
            if not on_meta:
                # Every group shards the same weights: rank 0's (then replicas start equal too).
                shard_from_source(self._stage, src=0, group=None)
            else:
                materialize(self.module, self._device, "the sharded model")
            self.module.to(self._device)
        else:
            self.module.to(self._device)
            # Rank 0's weights win, so replicas start equal whatever each rank's seed was.
            broadcast_tensors([t.data for t in self.module.parameters()] + list(self.module.buffers()))
        # The loss rides on the gradient all-reduce where that reaches every rank and its
        # dtype sums the batch digest's digits exactly (float32 up to ~17,000 ranks).
        params = list(self.module.parameters())
        trainable = [p for p in params if p.requires_grad]
        # (The last bucket, launched last, holds the first parameters.)
        dtype = trainable[0].dtype if trainable else None
        exact = {torch.float64} if info.world_size > 17_000 else {torch.float32, torch.float64}
        comm = self.config.grad_comm_dtype
        self._summary_rides = (
            plan.dp_degree > 1
            and self.config.zero_stage < 2  # a reduce-scatter leaves each rank a part
            and plan.tensor_parallel == 1
            and dtype in exact
            and (comm is None or comm == dtype)
        )
        if plan.dp_degree > 1:
            names = self._stage.param_names
            self._start_zero({id(p): names.get(n, n) for n, p in self.module.named_parameters()})
            extra = 1 + 8 if self._summary_rides else 0  # the loss and the digest's digits
            self._reducer = self._make_reducer(params, self._data_group, extra_numel=extra, module=self.module,
                                               always_run=self._stage.always_run)  # fmt: skip
            if self.config.zero_stage >= 2 and self._data_group is None:
                # ZeRO 2/3 over every rank: the used flags ride on the summary's all-reduce
                self._reducer.flags_ride = True
        self._bound = True
        self.offload = attach_offload(self, self.config, [self.module])  # Config(offload=...)

    def _broadcast_buffers(self) -> None:
        buffers = [b for b in self.module.buffers() if b.is_floating_point() or b.dtype == torch.long]
        if buffers and self.plan.dp_degree > 1:
            src = self.plan.data_group_of(dist.get_rank())[0]
            broadcast_tensors(buffers, src=src, group=self._data_group)
