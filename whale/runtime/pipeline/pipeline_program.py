"""The pipeline program users train: parameters, state dicts, inference and the step.

Each rank holds the stage programs of its pipeline position (several with an interleaved
schedule), as the rewrite cut and sharded them (:class:`~whale.rewrite.program.DistributedProgram`);
:class:`~.stage_setup.StageSetup` binds them and :class:`~.executor.StepExecutor` runs the
plan's schedule over them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ...config import Config
from ...ir.schedule import Action, ActionKind
from ...rewrite.program import DistributedProgram
from ..batch import batch_rows, call_inputs
from ..emulate import Stretch
from ..offload import attach_offload
from ..p2p import Incoming, shape_key
from ..process_group import require_initialized
from ..program_base import ProgramBase, ReplicaBatch
from .executor import StepExecutor
from .stage_setup import StageSetup

__all__ = ["PipelineProgram", "step_bubble"]


class PipelineProgram(StageSetup, StepExecutor, ProgramBase):
    """What :func:`whale.parallelize` returns when the model has pipeline stages.

    Each rank builds and trains only its own stages' parameters (``parameters()``); the
    returned loss is the global batch's, the same on every rank; ``.grad`` of each local
    parameter equals the local model's gradient on the global batch after ``step``.

    Memory: after binding, the program holds this rank's stages' parameters and buffers only
    (shards where a stage is split); it keeps no reference to the other stages' weights, to
    the captured graph or to the unsharded copies the shards were cut from. The local model
    object is the user's and whale never changes it, so its weights stay alive as long as the
    caller holds it: write ``model = wh.parallelize(model, ...)`` (or ``del model``) to free
    them, or call :meth:`release_local_model` to keep the object with the other stages' tensors
    on the meta device.

    A buffer forward updates (a counter, running statistics) lives in the one stage that reads
    and writes it, and after each step equals the local model's after it ran forward on the
    step's micro-batches in order (the first replica's: the others take it at the end of the
    step with ``Config.broadcast_buffers``): with one micro-batch and one replica, the local
    model's after the step exactly.
    """

    def __init__(self, program: DistributedProgram, config: Config) -> None:
        plan = program.plan
        assert len(program.stages) == plan.num_stages and plan.schedule is not None
        self.program = program
        self.plan = plan
        self.config = config
        self.loss_fn = program.loss_fn
        self.stages = program.stages
        self.schedule = plan.schedule
        self._modules = {st.index: st.module for st in program.local_stages}
        self._sharded = {st.index: st.sharded for st in program.local_stages if st.sharded is not None}
        # Each stage's parameters by attribute path -> local-model name, fixed before any stage
        # is materialized (materializing makes new tensors, and ties must survive it).
        self._param_paths = [dict(st.param_names) for st in program.stages]
        self._init_record()
        self._bound = False
        if dist.is_available() and dist.is_initialized():
            self._bind()

    def _bind(self) -> None:
        super()._bind()
        self.offload = attach_offload(self, self.config, list(self._modules.values()))  # Config(offload=...)

    # ---- the optimizer-facing surface -------------------------------------------------------

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters, under the local model's names (tied weights once)."""
        self._require_bound()
        if self._zero is not None:  # Config.zero_stage: this rank's shards
            yield from ((n, self._zero.shard(p)) for n, p in self._params.items())
            return
        yield from self._params.items()

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters: those of its own stages only."""
        for _, p in self.named_parameters():
            yield p

    def memory(self) -> dict[str, int]:
        """Parameter bytes held by this rank against the whole model's."""
        self._require_bound()
        mine = sum(p.numel() * p.element_size() for p in self._params.values())
        return {"param_bytes": mine, "model_param_bytes": sum(self.program.param_bytes.values())}

    def release_local_model(self, model: nn.Module) -> int:
        """Opt in to free, in the local model ``model`` this program was built from, every
        parameter and buffer this rank's stages do not hold: each becomes a meta tensor of the
        same shape and dtype (``requires_grad`` kept), so the object keeps its structure
        (``named_parameters``, ``state_dict`` keys, ``config``) but not the memory. The tensors
        this rank runs, which the stages share with ``model``, are left as they are. Running
        ``model`` afterwards fails on the meta tensors; ``full_state_dict()`` still gathers the
        whole model from the stage owners.

        Returns:
            The bytes released on this rank.

        Raises:
            ValueError: ``model``'s state-dict keys are not the ones this program was built from.

        Example::

            program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(x,), config=config)
            program.release_local_model(model)   # model.config etc. stay usable
        """
        self._require_bound()
        keys = tuple(model.state_dict())
        if keys != tuple(self.program.state_keys):
            extra = sorted(set(keys) - set(self.program.state_keys))[:3]
            missing = sorted(set(self.program.state_keys) - set(keys))[:3]
            raise ValueError(
                f"release_local_model(): {type(model).__name__} is not the model this program was "
                f"built from (state-dict keys differ: unexpected {extra}, missing {missing}); pass "
                "the model given to wh.parallelize"
            )
        held = {
            t.untyped_storage().data_ptr()
            for m in self._modules.values()
            for t in (*m.parameters(), *m.buffers())
            if not t.is_meta
        }
        replaced: dict[int, torch.Tensor] = {}  # a tied tensor gets one meta tensor: ties kept
        originals: list[torch.Tensor] = []  # alive until the loop ends, so ids stay unique
        freed: dict[int, int] = {}
        with torch.no_grad():
            for module in model.modules():
                for table in (module._parameters, module._buffers):
                    for name, t in table.items():
                        if t is None or t.is_meta or t.untyped_storage().data_ptr() in held:
                            continue
                        if id(t) not in replaced:
                            meta = torch.empty_like(t, device="meta")
                            if isinstance(t, nn.Parameter):
                                meta = nn.Parameter(meta, requires_grad=t.requires_grad)
                            replaced[id(t)] = meta
                            originals.append(t)
                            freed[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                        table[name] = replaced[id(t)]
        return sum(freed.values())

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The local model's state dict, gathered from the stages and their shards (collective:
        call it on every rank). A tied weight appears under every name the local model gives
        it; non-persistent buffers are left out, as the local model leaves them out."""
        self._require_bound()
        with self._zero_full():
            return self._full_state_dict()

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for s in sorted(self._local):
            # Shards are gathered inside the tensor-parallel group, stage by stage in one order.
            part = self._sharded[s].full_state_dict() if s in self._sharded else self._modules[s].state_dict()
            names = self.stages[s].state_names
            for key, t in part.items():
                for name in names.get(key, (key,)):
                    state[name] = t.detach().cpu().clone() if self._zero is not None else t.detach().cpu()
        rank = dist.get_rank()
        first = self.plan.replica_of(rank) == 0 and self.plan.tensor_group_of(rank)[0] == rank
        parts: list[dict] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, state if first else {})
        merged: dict[str, torch.Tensor] = {}
        for part in parts:
            merged.update(part)
        missing = [n for n in self.program.state_keys if n not in merged]
        if missing:  # every entry is held by a stage (rewrite.stage_split.hold_unread_state)
            raise RuntimeError(
                f"full_state_dict(): no stage holds {missing} of the local model's state dict; this is a "
                "whale bug, please report it with the model's class"
            )
        return {n: merged[n] for n in self.program.state_keys}

    def load_full_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load the local model's state dict: each rank takes its stages' entries (its shards).
        Names must match the local model's ``state_dict()`` (every name of a tied weight)."""
        self._require_bound()
        expected = set(self.program.state_keys)
        missing, unexpected = expected - set(state_dict), set(state_dict) - expected
        if missing or unexpected:
            raise ValueError(
                f"load_full_state_dict(): missing keys {sorted(missing)}, unexpected keys "
                f"{sorted(unexpected)}; pass a state dict of the local model"
            )
        with torch.no_grad(), self._zero_full(refresh=True):
            for s in sorted(self._local):
                names = self.stages[s].state_names

                def entry(key: str, names: Mapping = names) -> torch.Tensor:
                    # As the local model's load_state_dict: the last name of a tied weight wins.
                    return state_dict[names.get(key, (key,))[-1]]

                if s in self._sharded:
                    keys = self._sharded[s].full_keys
                    self._sharded[s].load_full_state_dict({k: entry(k) for k in keys})
                else:
                    for key, t in self._modules[s].state_dict(keep_vars=True).items():
                        t.copy_(entry(key))

    def gather_full(self, tensors: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """Whole tensors by local-model name from this rank's ones (e.g. gradients of shards);
        collective inside the tensor-parallel group."""
        self._require_bound()
        if self._zero is not None:  # ZeRO shards first (over the data group)
            tensors = self._zero.gather_full(tensors, self._params)
        out = {}
        for s in sorted(self._local):
            names = {n for n in self._param_paths[s].values() if n in tensors and n not in out}
            if s in self._sharded:
                # The shards are named by the stage's paths: a tied weight's may not be its name.
                path = {}
                for p, n in self._param_paths[s].items():
                    path.setdefault(n, p)
                got = self._sharded[s].gather_full({path[n]: tensors[n] for n in sorted(names)})
                out.update({n: got[path[n]] for n in names})
            else:
                out.update({n: tensors[n] for n in names})
        return out

    def train(self, mode: bool = True) -> PipelineProgram:
        for module in self._modules.values():
            module.train(mode)
        return self

    def eval(self) -> PipelineProgram:
        return self.train(False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model's output on its inputs (positional and keyword, as the local model takes
        them), without gradients: the batch is cut into
        ``num_micro_batch`` micro-batches that flow through the stages in the order of the
        schedule's forwards, and every rank of the pipeline returns the whole output. Each
        replica runs the whole batch it is given, as a data-parallel program runs its local
        model. Collective: call it on every rank. Use ``eval()`` first for dropout and the like.

        Example::

            program.eval()
            logits = program(x)
        """
        self._require_bound()
        last = self.plan.num_stages - 1
        if self.stages[last].is_split:
            raise NotImplementedError(
                "inference through a pipeline whose last stage is split: its output stays sharded "
                "over the tensor-parallel group; load full_state_dict() into the local model instead"
            )
        args, _ = self._model_inputs(args, kwargs)
        rows = batch_rows(args, None, self.config.batch_dim)
        m = self.plan.num_micro_batch
        if rows < m:
            raise ValueError(f"program(...) got {rows} rows, fewer than num_micro_batch={m}; pass at least {m}")
        micro, _ = self._micro_batches(args, rows)
        if self._zero is not None:
            self._zero.sync()
        # Headers of inference transfers are cached apart: their tensors do not require grad.
        keys = [("inference", shape_key(a)) for a in micro]
        position = self.plan.position_of(dist.get_rank())
        forwards = (ActionKind.FORWARD, ActionKind.SEND_ACT, ActionKind.RECV_ACT)
        outputs: dict = {}
        inputs: dict = {}
        incoming: dict[Action, Incoming] = {}
        sends: list = []
        with torch.no_grad():
            for action in (a for a in self.schedule.actions[position] if a.kind in forwards):
                s, i = action.stage, action.micro_batch
                if action.kind is ActionKind.RECV_ACT:
                    incoming[action] = self._post(action, keys)
                elif action.kind is ActionKind.SEND_ACT:
                    sends += self._transfers.send_activations(list(outputs.pop((s, i))), self._peer(s + 1), s, i, keys[i])
                else:
                    needed = self.schedule.input_receive(action)
                    received = incoming.pop(needed).wait() if needed else inputs.pop((s, i), [])
                    outputs[(s, i)] = self._modules[s](*micro[i], *received)
                    if s < last and self._local_stage(s + 1):
                        inputs[(s + 1, i)] = list(outputs.pop((s, i)))
        for work, _ in sends:
            work.wait()
        flat = self._share_output([outputs[(last, i)] for i in range(m)] if self._local_stage(last) else None)
        return self.program.call.output(flat)

    def _share_output(self, parts: list | None) -> Any:
        """Every rank of the pipeline gets the output the last stage's rank (of its tensor
        index) joined from the micro-batches' ``parts``."""
        rank = dist.get_rank()
        ranks = self.plan.pipelines[self.plan.replica_of(rank)]
        k = self.plan.tensor_parallel
        index = ranks.index(rank) % k  # this rank's tensor-parallel index
        source = ranks[(self.plan.pipeline_degree - 1) * k + index]
        box = [_join(parts, self.config.batch_dim) if parts is not None else None]
        if rank == source:
            for at, r in enumerate(ranks):
                if r != rank and at % k == index:
                    dist.send_object_list(box, dst=r)
        else:
            dist.recv_object_list(box, src=source)
        return box[0]

    def _model_inputs(self, inputs: Any, kwargs: Mapping[str, Any] | None) -> tuple[tuple, dict]:
        """The inputs as the stage programs take them: the captured graph's inputs, flattened
        from the model's positional and keyword inputs (checked against its forward first)."""
        args, kwargs = call_inputs(inputs, kwargs)
        return self.program.call.stage_inputs(args, kwargs), {}

    def step(self, inputs: Any, target: Any = None, *, batch: str | None = None, **kwargs: Any) -> torch.Tensor:
        """Run the schedule over the micro-batches; gradients synchronized. Inputs as in
        :meth:`DataParallelProgram.step <whale.runtime.data_parallel.DataParallelProgram.step>`:
        a tensor, a tuple, a dict of keyword inputs, and more keyword inputs in ``kwargs``."""
        if not self._bound:
            require_initialized("step()")
            self._bind()
        if self._zero is not None:
            self._zero.sync()  # the optimizer's updated shards into the full parameters
        start, stretch = self._step_begin()
        cut = self._replica_batch(inputs, target, batch, self._device, kwargs=kwargs)
        with self._communicating():
            return self._step_after_check(cut, start, stretch)

    def _step_after_check(self, cut: ReplicaBatch, start: float, stretch: Stretch) -> torch.Tensor:
        # A global batch's rows are known here; the check that every rank passed the same one
        # then runs behind the first compute and is waited before the first transfer.
        total = cut.total if cut.total is not None else self._global_rows(cut)
        micro, mb_rows = self._micro_batches((cut.args, cut.target), cut.rows)
        weights = [n / total if self.config.loss_reduction == "mean" else 1.0 for n in mb_rows]
        for reducer in self._reducers.values():
            reducer.pace = stretch.catch_up
        loss_sum, loss_work, timeline = self._run(micro, weights, cut, start, stretch)
        synced = time.perf_counter()
        with self._waiting("the gradient all-reduces, tied weights' and buffers", "the data-parallel ranks"):
            for reducer in self._reducers.values():
                reducer.finish()
            if self._zero is not None:
                self._zero.mark_synchronized()
            for param, group in self._tied:
                dist.all_reduce(param.grad, group=group)
            self._share_updated_buffers()
        with self._waiting("the loss all-reduce"):
            loss_work.wait()
        extra = (("sync", synced - start, time.perf_counter() - start),) if self._reducers or self._tied else ()
        self._step_end(start, timeline, extra)
        # Every rank of the last stage's tensor-parallel group holds the loss once.
        return (loss_sum / self.plan.tensor_parallel).to(torch.float32)

    def measured_bubble(self) -> float:
        """The pipeline's idle fraction in the last step, as the simulator defines it
        (``SimResult.bubble_fraction``); see :func:`step_bubble`. Collective: call it on every
        rank; every rank gets the same value.
        """
        if not getattr(self, "last_timeline", None):
            raise RuntimeError("measured_bubble() needs a step() first")
        ranks: list = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, (self.last_step_entry, self.last_timeline))
        return step_bubble(ranks)[0]


def step_bubble(ranks: Sequence[tuple[float, tuple]]) -> tuple[float, float]:
    """Bubble and span of one step from every rank's (``last_step_entry``, ``last_timeline``).

    As in the simulator, the step starts together on every rank, when the last rank enters it
    (``time.time()``: hosts' clocks are assumed to agree, as they do on one host), and ends
    with the last action on any rank; the bubble is 1 - (forward and backward time of all
    ranks inside that span) / (ranks x span). Sends and receives count as idle.
    """
    origin = max(entry for entry, _ in ranks)
    end = max(entry + timeline[-1][2] for entry, timeline in ranks if timeline)
    span = end - origin
    busy = sum(
        max(0.0, min(entry + e, end) - max(entry + b, origin))
        for entry, timeline in ranks
        for code, b, e in timeline
        if _is_compute(code)
    )
    return 1.0 - busy / (len(ranks) * span), span


def _join(parts: list, dim: int) -> Any:
    """One output from the micro-batches' outputs: tensors concatenated along ``dim``, tuples,
    lists and dicts element by element."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=dim) if first.dim() > 0 else torch.stack(parts)
    if isinstance(first, (tuple, list)):
        return type(first)(_join(list(column), dim) for column in zip(*parts))
    if isinstance(first, dict):
        return {key: _join([p[key] for p in parts], dim) for key in first}
    raise TypeError(
        f"the model returns a {type(first).__name__}; a pipeline joins tensors and tuples, "
        "lists or dicts of them from its micro-batches"
    )


def _is_compute(code: str) -> bool:
    """``"1F3"`` and ``"0B2"`` are compute; ``"0SA3"`` and the like move tensors."""
    return code.strip("0123456789") in ("F", "B")
