"""What every parallelized program shares: cutting the batch for a replica, reducers, and the
record of its steps (wall times, the last step's intervals, the measured timeline)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config
from ..ir.plan import Plan
from ..ir.rows import row_offsets, split_rows
from ..ir.trace import Timeline, save_chrome_trace
from ..rewrite.program import DistributedProgram, ProgramStage
from .batch import (
    batch_rows,
    broadcast_tensors,
    call_inputs,
    narrow,
    to_device,
)
from .emulate import (
    Stretch,
    from_env_checked,
    rank_slowdown,
    slows_down,
    stretch_optimizer_steps,
)
from .grad_sync import GradientReducer
from .guard.batch_check import BatchAgreement, BatchCheck, labelled
from .guard.setup_check import check_same_setup
from .guard.step_state import StepState, every_rank
from .guard.watchdog import waiting
from .host_reduce import HostLink, host_facts
from .measured import measured_timeline, timing_report
from .process_group import WorldInfo, new_group, require_initialized, world_info
from .state.clip import clip_grad_norm
from .zero import ShardedParameters, ShardedReducer, ZeroShards

__all__ = ["ProgramBase", "ReplicaBatch", "materialize", "shard_from_source"]


def _step_factor(program: ProgramBase) -> float:
    """The emulated slowdown of ``program``'s last step on this rank (its optimizer step's)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank_slowdown(program._slowdowns, rank, max(0, program._steps_begun - 1)).factor


@dataclasses.dataclass
class ReplicaBatch:
    """This replica's rows of a step, and the pending check that every rank agrees."""

    args: tuple  # positional inputs (a pipeline's: the stage programs' model inputs)
    target: Any
    rows: int
    agreement: BatchAgreement | None  # None: checked afterwards through ``check``'s digest
    mode: str  # "global" or "local"
    total: int | None = None  # the global batch's rows, when known without the check
    kwargs: dict = dataclasses.field(default_factory=dict)  # keyword inputs, cut like args
    check: BatchCheck | None = None  # the batch's digests (shapes and values)


_KEPT_STEP_TIMES = 1000


class ProgramBase:
    """Base of the data-parallel and pipeline programs: what every step records.

    ``step_times`` holds the measured wall seconds of the last (up to 1000) steps on this rank;
    ``last_timeline`` this rank's intervals of the last step, ``(code, begin, end)`` in seconds
    from its entry (``last_step_entry``, ``time.time()``), codes as the schedule writes actions
    (``"1F3"``); :meth:`timeline` gathers them from every rank. ``predicted_step_time`` (seconds)
    and ``predicted_timeline`` are the planner's prediction, where :func:`whale.parallelize` made
    one, else None.
    """

    program: DistributedProgram
    plan: Plan
    config: Config
    loss_fn: Callable[..., torch.Tensor]
    predicted_step_time: float | None = None
    predicted_timeline: Timeline | None = None
    last_timeline: tuple = ()
    last_step_entry: float | None = None
    _zero: ZeroShards | None = None  # Config(zero_stage >= 1) over a data-parallel group

    def _init_record(self) -> None:
        """Per-program step records; the emulated slowdown is read (and checked) here, so a
        bad ``WHALE_EMULATE_SLOWDOWN`` fails before any step."""
        self.step_times: list[float] = []
        self._last_extra: tuple = ()  # intervals after the action list ("sync")
        self._slowdowns = from_env_checked()
        self._steps_begun = 0
        self._step_state = StepState()
        self.offload = None  # Config(offload=...): made when the program binds (whale.runtime.offload)

    def _step_begin(self) -> tuple[float, Stretch]:
        """Note a step's entry: its start (``perf_counter``) and this rank's emulated stretch.
        Refused where an earlier step raised on this rank mid-step (:mod:`.guard.step_state`)."""
        self._step_state.check(self._steps_begun + 1)
        rank = dist.get_rank() if dist.is_initialized() else 0
        stretch = rank_slowdown(self._slowdowns, rank, self._steps_begun)
        if self._steps_begun == 0 and slows_down(self._slowdowns, rank):  # the user's optimizer steps too
            stretch_optimizer_steps(self, type(self).parameters, _step_factor)
        self._steps_begun += 1
        start = time.perf_counter()
        self.last_step_entry = time.time()
        return start, stretch

    def _step_end(self, start: float, timeline: tuple, extra: tuple = ()) -> None:
        self.step_times.append(time.perf_counter() - start)
        if len(self.step_times) > _KEPT_STEP_TIMES:
            del self.step_times[0]
        self.last_timeline = timeline
        self._last_extra = extra

    def timeline(self) -> Timeline:
        """The last step as it ran on every rank (source ``"measured"``), for
        :func:`~whale.ir.trace.save_chrome_trace` or :func:`whale.plot.draw_timelines`.

        Collective: call it on every rank; every rank gets the same timeline. Events carry
        global ranks and seconds from the first rank's entry into the step (hosts' clocks are
        assumed to agree, as they do on one host). A pipeline shows each action of the schedule
        as its rank ran it: forwards, backwards, and the posting of sends and receives (the
        transfers run behind; waiting for a receive's data is the gap before the compute that
        reads it), then ``sync`` where gradients are synchronized after the actions. A
        data-parallel program shows each micro-batch's forward and backward, then ``sync``.

        Raises:
            ValueError: on every rank, before any collective, if this program has not run a step.

        Example::

            program.step(x, y)
            measured = program.timeline()  # on every rank
            if rank == 0:
                save_chrome_trace("step.json", program.predicted_timeline, measured)
        """
        if not self.last_timeline:
            raise ValueError(
                f"{type(self).__name__}.timeline(): the program has not run a step; call "
                "program.step(...) first"
            )
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (dist.get_rank(), self.last_step_entry, self.last_timeline, self._last_extra))
        return measured_timeline(parts)

    def timing_report(self) -> str:
        """One line: the predicted step time against the median measured one on this rank.

        Example::

            >>> print(program.timing_report())
            step time: predicted 73.0 ms, measured 128.4 ms (median of 20 steps), prediction error -43%
        """
        return timing_report(self.predicted_step_time, self.step_times)

    def save_trace(self, path: str) -> None:
        """Write the predicted (where there is one) and the measured last step side by side as
        one Chrome trace (open it in ui.perfetto.dev or chrome://tracing); rank 0 writes.

        Collective: call it on every rank; every rank raises ValueError alike if the program
        has not run a step or rank 0 cannot write ``path``.
        """
        measured = self.timeline()
        timelines = [t for t in (self.predicted_timeline, measured) if t is not None]
        box: list = [None]
        if dist.get_rank() == 0:
            try:
                save_chrome_trace(path, *timelines)
            except ValueError as err:
                box[0] = str(err)
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise ValueError(box[0])

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
    ) -> torch.Tensor:
        """Clip the gradients by the norm of the whole model's gradient, as
        ``torch.nn.utils.clip_grad_norm_`` clips the local model's: shards and stages on every
        rank count, replicas and tied weights once. Collective: call it on every rank, after
        ``step`` and before the optimizer step.

        Args:
            max_norm: the largest norm the gradients keep.
            norm_type: p of the p-norm, or ``float("inf")``.
            error_if_nonfinite: raise RuntimeError (on every rank) if the norm is nan or inf.

        Returns:
            The whole gradient's norm before clipping (the same on every rank).

        Example::

            loss = program.step(x, y)
            norm = program.clip_grad_norm_(1.0)
            opt.step(); opt.zero_grad()
        """
        self._require_bound()
        return clip_grad_norm(self, max_norm, norm_type, error_if_nonfinite)

    def local_slice(self, global_rows: int) -> slice:
        """The rows of a global batch of ``global_rows`` rows that this rank's replica takes.

        Example::

            rows = program.local_slice(len(x_global))
            loss = program.step(x_global[rows], y_global[rows], batch="local")
        """
        rank = dist.get_rank() if dist.is_initialized() else 0
        replica = self.plan.replica_of(rank)
        rows = self.plan.rows(global_rows)
        start = row_offsets(rows)[replica]
        return slice(start, start + rows[replica])

    def _model_inputs(self, inputs: Any, kwargs: Mapping[str, Any] | None) -> tuple[tuple, dict]:
        """The step's inputs as ``(args, kwargs)`` of the model, checked against its forward
        (no collective: every rank raises alike). The pipeline flattens them for its stages."""
        return self.program.call.model_inputs(*call_inputs(inputs, kwargs))

    def _replica_batch(
        self, inputs: Any, target: Any, mode: str, device: torch.device, *, agree: bool = True,
        kwargs: Mapping[str, Any] | None = None,
    ) -> ReplicaBatch:
        """Check the step's arguments, start the agreement check, keep this replica's rows.

        ``inputs`` and ``kwargs`` are read as :func:`~.batch.call_inputs` reads them; keyword
        tensors are cut along ``Config.batch_dim`` like positional ones, None and other
        non-tensors passed as they are. ``agree=False`` (global batches only) skips the check's
        collective: the caller then verifies ``check.world_digest`` after the step, riding on a
        collective it makes anyway.
        """
        require_initialized("step()")
        mode = self.config.batch if mode is None else mode
        if mode not in ("global", "local"):
            raise ValueError(f"step(batch={mode!r}): use 'global' or 'local'")
        given = kwargs
        args, kwargs = self._model_inputs(inputs, kwargs)
        dim = self.config.batch_dim
        rows = batch_rows((args, kwargs), target, dim)
        # Digests before cutting: uneven replicas legitimately hold different row counts.
        check = BatchCheck(
            # Labelled as the user passed them (a pipeline's stage inputs are flattened).
            labelled(*call_inputs(inputs, given), target), dim, local=mode == "local",
            values=self.config.check_batch_values, device=device,
        )  # fmt: skip
        agreement = BatchAgreement(check, rows, device, self.plan.pipelines) if agree or mode == "local" else None
        total = rows if mode == "global" else None
        if mode == "global":
            replica = self.plan.replica_of(dist.get_rank())
            try:
                split = self.plan.rows(rows)
            except ValueError:
                if agreement is not None:
                    agreement.wait()  # a rank whose batch differs is the first thing to report
                raise
            self._check_micro_batches(split, rows, agreement)
            rows = split[replica]
            args, kwargs, target = narrow((args, kwargs, target), dim, row_offsets(split)[replica], rows)
        return ReplicaBatch(args, target, rows, agreement, mode, total, kwargs, check)

    def _join_world(self) -> WorldInfo:
        """This rank's place in the launched world, checked against the plan; sets the device."""
        info = world_info()
        # The first collective of every program: ranks set up differently fail here, named.
        check_same_setup(self.config, self.plan, self.program.param_bytes)
        if info.world_size != self.plan.world_size:
            raise ValueError(
                f"the plan was made for {self.plan.world_size} ranks but the world has "
                f"{info.world_size}; call wh.parallelize after wh.init() in the launched job"
            )
        if info.rank != self.program.rank:
            raise ValueError(
                f"this program was built for rank {self.program.rank} but runs as rank {info.rank}; "
                "call wh.parallelize in each launched process (after wh.init(), or with torchrun's "
                "RANK set)"
            )
        self._device = info.device
        return info

    def _micro_batches(self, value: Any, rows: int) -> tuple[list, list[int]]:
        """``value`` (its tensors cut along ``Config.batch_dim``) as ``num_micro_batch``
        micro-batches of near-equal rows on this rank's device, and their rows."""
        mb_rows = split_rows(rows, [1.0] * self.plan.num_micro_batch, what="micro-batches")
        dim = self.config.batch_dim
        micro = [to_device(narrow(value, dim, at, n), self._device) for at, n in zip(row_offsets(mb_rows), mb_rows)]
        return micro, mb_rows

    def _check_micro_batches(self, split: tuple[int, ...], total: int, agreement: BatchAgreement | None) -> None:
        # Every rank judges the whole split, so all of them raise together or none does.
        m = self.plan.num_micro_batch
        fewest = min(split)
        replica = split.index(fewest)
        norms = self.program.single_value_batch_norms
        refusal = None
        if fewest < m:
            refusal = (
                f"num_micro_batch={m} is larger than the {fewest} rows replica {replica} gets "
                f"of a batch of {total}; pass a global batch of at least {m * len(split)} rows or "
                "use fewer micro-batches"
            )
        # Micro-batches are near-equal: the smallest of r rows in m has r // m.
        elif norms and fewest // m < 2 and self.program.data_group is None and any(
            s.module.training for s in self.program.local_stages
        ):
            refusal = (
                f"BatchNorm {norms[0]!r} normalizes one value per channel per row, and replica {replica} "
                f"gets a micro-batch of 1 row ({fewest} rows of a batch of {total} in {m} "
                "micro-batch(es)): torch refuses that in training (\"Expected more than 1 value per "
                "channel\"), and the captured graph would leave its running variance NaN; pass a "
                f"batch giving every replica at least {2 * m} rows, or use fewer micro-batches"
            )
        if refusal is not None:
            if agreement is not None:
                agreement.wait()  # a rank whose batch differs is the first thing to report
            raise every_rank(ValueError(refusal))

    @contextlib.contextmanager
    def _communicating(self) -> Iterator[None]:
        """The part of a step after its communication began: an error raised here on this rank
        alone (not marked :func:`~.guard.step_state.every_rank`) refuses later steps."""
        try:
            yield
        except BaseException as err:
            self._step_state.failed(self._steps_begun, err)
            raise

    def _waiting(self, action: str, peers: str = "every rank") -> Any:
        """A watched wait of this step on ``peers`` (:func:`~.guard.watchdog.waiting`)."""
        return waiting(dist.get_rank(), self._steps_begun, action, peers)

    def _global_rows(self, batch: ReplicaBatch) -> int:
        """Wait for the agreement check; the global batch's rows (checked against the plan)."""
        if batch.agreement is None:
            return batch.total
        with self._waiting("the batch check (an all-reduce of every rank's rows and digests)"):
            summed = batch.agreement.wait()
        world = dist.get_world_size()
        if batch.mode == "global":
            return summed // world
        # In local mode every rank of a replica passes that replica's rows.
        total = summed // (world // self.plan.dp_degree)
        replica = self.plan.replica_of(dist.get_rank())
        self._check_micro_batches(self.plan.rows(total), total, batch.agreement)
        if self.plan.rows(total)[replica] != batch.rows:
            raise ValueError(
                f"rank {dist.get_rank()} passed {batch.rows} rows but the plan gives its replica "
                f"{self.plan.rows(total)[replica]} of the global {total}; cut the batch with "
                f"program.local_slice({total})"
            )
        return total

    def _make_data_group(self, rank: int, device: torch.device) -> dist.ProcessGroup | None:
        """Make every data-parallel group (collective: all ranks, in one order) and return
        ``rank``'s: the ranks holding the same parameters in each replica. None is the whole
        world (plain data parallel) or no group at all (a single replica).

        Where gradients can meet in shared memory (``Config.shared_memory``, CPU ranks, every
        data-parallel group on one host), each group also gets a twin the gradient reducers
        use for that alone (``self._host``)."""
        plan = self.plan
        width = len(plan.pipelines[0])
        self._host = None
        if plan.dp_degree == 1:
            return None
        members = [list(m) for m in self.program.data_groups]
        mine = plan.pipelines[plan.replica_of(rank)].index(rank)
        groups = [new_group(m) for m in members] if width > 1 else [None]
        if self.program.data_group is not None:  # Config(sync_batch_norm): its BatchNorms' group
            self.program.data_group.bind(dist.group.WORLD if groups[mine] is None else groups[mine])
        # Every rank decides alike, from every rank's facts (its config included), so the
        # groups match.
        facts: list = [None] * dist.get_world_size()
        dist.all_gather_object(facts, (self.config.shared_memory, device.type, *host_facts()))
        if all(wanted and kind == "cpu" and shm for wanted, kind, _, shm in facts) and all(
            len({facts[r][2] for r in m}) == 1 for m in members
        ):
            self._host = HostLink([new_group(m) for m in members][mine])
        return groups[mine]

    def _bind_tensor_groups(self) -> dict[tuple[int, ...], dist.ProcessGroup]:
        """Make every tensor-parallel group the program names (collective: all ranks, in one
        order) and bind this rank's to the communication its sharded modules hold."""
        made = {ranks: new_group(list(ranks)) for ranks in self.program.tensor_groups}
        if self.program.tensor_group is not None:
            self.program.tensor_group.bind(made[self.program.tensor_group.ranks])
        return made

    def _start_zero(self, names: Mapping[int, str]) -> None:
        """Start ``Config.zero_stage`` (with more than one replica): the shards' owner."""
        if self.config.zero_stage:
            self._zero = ZeroShards(self.config.zero_stage, names)

    @contextlib.contextmanager
    def _zero_full(self, refresh: bool = False) -> Iterator[None]:
        """Full parameters inside, under ZeRO (see :meth:`ZeroShards.full`; collective)."""
        if self._zero is None:
            yield
            return
        with self._zero.full(refresh):
            yield

    def _make_reducer(
        self, params: list, group: dist.ProcessGroup | None, extra_numel: int = 0, module: nn.Module | None = None,
        always_run: frozenset[str] = frozenset(),
    ) -> GradientReducer | ShardedReducer | ShardedParameters:
        """The gradient synchronization of ``params`` (of ``module``) over ``group``: bucketed
        all-reduce, or ZeRO's sharding of them (``always_run``: see ``ProgramStage``)."""
        cap = int(self.config.bucket_cap_mb * 2**20)
        if self._zero is not None and self._zero.stage == 3:
            mine = {id(p) for p in params}
            others = frozenset(id(p) for p in module.parameters() if id(p) not in mine)
            sharded = ShardedParameters(module, group, comm_dtype=self.config.grad_comm_dtype, exclude=others,
                                        always_run=always_run)  # fmt: skip
            return self._zero.add(sharded, params)
        if self._zero is not None and self._zero.stage in (1, 2):
            # ZeRO 1/2 (whale.runtime.zero): the optimizer steps shards of these parameters.
            sharded = ShardedReducer(
                params, group, self._zero.stage, bucket_cap_bytes=cap,
                first_bucket_cap_bytes=min(cap, int(self.config.first_bucket_cap_mb * 2**20)),
                comm_dtype=self.config.grad_comm_dtype, extra_numel=extra_numel, host=self._host,
            )
            return self._zero.add(sharded, params)
        return GradientReducer(
            params,
            group=group,
            bucket_cap_bytes=cap,
            first_bucket_cap_bytes=min(cap, int(self.config.first_bucket_cap_mb * 2**20)),
            comm_dtype=self.config.grad_comm_dtype,
            extra_numel=extra_numel,
            host=self._host,
        )


def shard_from_source(stage: ProgramStage, src: int, group: dist.ProcessGroup | None) -> None:
    """Make a split stage's shards those of rank ``src``'s unsharded weights: the rewrite sliced
    each rank's own copy, and the ranks of a group must shard the same weights."""
    source = stage.source
    broadcast_tensors([t.data for t in source.parameters()] + list(source.buffers()), src=src, group=group)
    stage.sharded.load_full_state_dict(source.state_dict())
    stage.release_source()  # the rank keeps its shards only (issue 15, item 5)


def materialize(module: nn.Module, device: torch.device, what: str) -> None:
    """Allocate a meta-built part of a model (a stage, a shard) on ``device`` and initialize it
    with each layer's own ``reset_parameters``: a model built on the meta device is
    materialized part by part, so no rank ever holds all of it. Load real weights with
    ``load_full_state_dict`` after."""
    if any(b.is_meta for b in module.buffers()):
        raise ValueError(
            f"{what} has buffers on the meta device, whose values whale cannot recreate; "
            "build buffers (masks, statistics) on a real device, parameters may stay on meta"
        )
    module.to_empty(device=device)
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset) and any(True for _ in sub.parameters(recurse=False)):
            reset()
