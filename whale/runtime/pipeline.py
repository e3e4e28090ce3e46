"""The pipeline program: runs each rank's action list of a schedule, stage by stage.

Every rank holds the stage programs of its pipeline position (several with an interleaved
schedule) and executes its list from ``whale.ir.schedule`` in order: ``F`` runs a stage
on a micro-batch, ``B`` runs its backward, ``SA``/``RA`` move activations to the next stage and
``SG``/``RG`` move gradients back. Sends are asynchronous (waited at the end of the step).
A receive is posted at its place in the list, or earlier, while the rank computes the two
actions before it, once its shapes are known (``whale.runtime.p2p``); only the compute that
reads it waits for its data. That is the simulator's async p2p model: the schedule is the same
data the planner simulates, and a receive's place in the list does not delay the transfer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..capture import CapturedModel
from ..config import Config
from ..ir.plan import Plan
from ..ir.schedule import Action, ActionKind
from ..rewrite.tensor_parallel.sharded_model import ShardedModel
from ..rewrite.stage_split import StageProgram
from ..rewrite.tensor_parallel.shard import shard_model
from .batch import batch_rows, broadcast_tensors
from .grad_sync import GradientReducer
from .p2p import Incoming, Transfers, shape_key
from .process_group import require_initialized
from .program_base import ProgramBase, ReplicaBatch, materialize

__all__ = ["PipelineProgram", "step_bubble"]

_RECEIVES = (ActionKind.RECV_ACT, ActionKind.RECV_GRAD)
# Receives are posted while the rank computes the actions before them: up to the list's
# receives of the compute after the next one.
_LOOKAHEAD_COMPUTES = 2


class PipelineProgram(ProgramBase):
    """What :func:`whale.parallelize` returns when the model has pipeline stages.

    Each rank builds and trains only its own stages' parameters (``parameters()``); the
    returned loss is the global batch's, the same on every rank; ``.grad`` of each local
    parameter equals the local model's gradient on the global batch after ``step``.
    """

    def __init__(
        self,
        graph_module: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        plan: Plan,
        config: Config,
        stages: tuple[StageProgram, ...],
        stage_graphs: Mapping[int, CapturedModel] | None = None,
        stage_shard_sizes: Mapping[int, Mapping[str, tuple[int, ...]]] | None = None,
    ) -> None:
        assert len(stages) == plan.num_stages
        self.plan = plan
        self.config = config
        self.loss_fn = loss_fn
        self.stages = stages
        # Stages holding a split part, captured on their own; sharded at bind time.
        self._stage_graphs = dict(stage_graphs or {})
        self._stage_shard_sizes = dict(stage_shard_sizes or {})
        self._modules = {st.index: st.module for st in stages}
        self._sharded: dict[int, ShardedModel] = {}
        self._graph_module = graph_module
        self.schedule = plan.schedule
        # Each stage's parameters by attribute path -> local-model name, fixed before any stage
        # is materialized (materializing makes new tensors, and ties must survive it).
        names = {id(p): n for n, p in graph_module.named_parameters()}
        self._param_paths = [
            {path: names[id(p)] for path, p in st.module.named_parameters(remove_duplicate=False)}
            for st in stages
        ]
        self._bound = False
        if dist.is_available() and dist.is_initialized():
            self._bind()

    # ---- the optimizer-facing surface -------------------------------------------------------

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters, under the local model's names (tied weights once)."""
        self._require_bound()
        yield from self._params.items()

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters: those of its own stages only."""
        for _, p in self.named_parameters():
            yield p

    def memory(self) -> dict[str, int]:
        """Parameter bytes held by this rank against the whole model's."""
        self._require_bound()
        mine = sum(p.numel() * p.element_size() for p in self._params.values())
        sizes = {n: p.numel() * p.element_size() for paths, st in zip(self._param_paths, self.stages)
                 for path, n in paths.items() for p in [st.module.get_parameter(path)]}
        total = sum(sizes.values())
        return {"param_bytes": mine, "model_param_bytes": total}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The local model's state dict, gathered from the stages and their shards (collective:
        call it on every rank)."""
        self._require_bound()
        state = {}
        for s in sorted(self._local):
            # Shards are gathered inside the tensor-parallel group, stage by stage in one order.
            part = self._sharded[s].full_state_dict() if s in self._sharded else self._modules[s].state_dict()
            state.update({n: t.detach().cpu() for n, t in part.items()})
        rank = dist.get_rank()
        first = self.plan.replica_of(rank) == 0 and self.plan.tensor_group_of(rank)[0] == rank
        parts: list[dict] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, state if first else {})
        merged: dict[str, torch.Tensor] = {}
        for part in parts:
            merged.update(part)
        return {n: merged[n] for n in self._graph_module.state_dict() if n in merged}

    def load_full_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load the local model's state dict: each rank takes its stages' entries (its shards)."""
        self._require_bound()
        expected = set(self._graph_module.state_dict())
        missing, unexpected = expected - set(state_dict), set(state_dict) - expected
        if missing or unexpected:
            raise ValueError(
                f"load_full_state_dict(): missing keys {sorted(missing)}, unexpected keys "
                f"{sorted(unexpected)}; pass a state dict of the local model"
            )
        with torch.no_grad():
            for s in sorted(self._local):
                if s in self._sharded:
                    keys = self._sharded[s].full_keys
                    self._sharded[s].load_full_state_dict({k: state_dict[k] for k in keys})
                else:
                    for name, t in self._modules[s].state_dict(keep_vars=True).items():
                        t.copy_(state_dict[name])

    def gather_full(self, tensors: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """Whole tensors by local-model name from this rank's ones (e.g. gradients of shards);
        collective inside the tensor-parallel group."""
        self._require_bound()
        out = {}
        for s in sorted(self._local):
            names = {n for n in self._param_paths[s].values() if n in tensors and n not in out}
            if s in self._sharded:
                out.update(self._sharded[s].gather_full({n: tensors[n] for n in sorted(names)}))
            else:
                out.update({n: tensors[n] for n in names})
        return out

    def train(self, mode: bool = True) -> PipelineProgram:
        for module in self._modules.values():
            module.train(mode)
        return self

    def eval(self) -> PipelineProgram:
        return self.train(False)

    def __call__(self, *args: Any) -> Any:
        """The model's output on ``args``, without gradients: the batch is cut into
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
        if last in self._stage_graphs:
            raise NotImplementedError(
                "inference through a pipeline whose last stage is split: its output stays sharded "
                "over the tensor-parallel group; load full_state_dict() into the local model instead"
            )
        rows = batch_rows(args, None, self.config.batch_dim)
        m = self.plan.num_micro_batch
        if rows < m:
            raise ValueError(f"program(...) got {rows} rows, fewer than num_micro_batch={m}; pass at least {m}")
        micro, _ = self._micro_batches(args, rows)
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
        return self._share_output([outputs[(last, i)] for i in range(m)] if self._local_stage(last) else None)

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

    # ---- training ----------------------------------------------------------------------------

    def step(self, inputs: Any, target: Any = None, *, batch: str = "global") -> torch.Tensor:
        """Run the schedule over the micro-batches; gradients synchronized. See DataParallelProgram.step."""
        if not self._bound:
            require_initialized("step()")
            self._bind()
        start = time.perf_counter()
        self.last_step_entry = time.time()
        cut = self._replica_batch(inputs, target, batch, self._device)
        # A global batch's rows are known here; the check that every rank passed the same one
        # then runs behind the first compute and is waited before the first transfer.
        total = cut.total if cut.total is not None else self._global_rows(cut)
        micro, mb_rows = self._micro_batches((cut.args, cut.target), cut.rows)
        weights = [n / total if self.config.loss_reduction == "mean" else 1.0 for n in mb_rows]
        loss_sum, loss_work = self._run(micro, weights, cut, start)
        for reducer in self._reducers.values():
            reducer.finish()
        for param, group in self._tied:
            dist.all_reduce(param.grad, group=group)
        loss_work.wait()
        # Every rank of the last stage's tensor-parallel group holds the loss once.
        return (loss_sum / self.plan.tensor_parallel).to(torch.float32)

    def _run(self, micro: list, weights: list[float], cut: ReplicaBatch, start: float) -> tuple[torch.Tensor, dist.Work]:
        """Execute this rank's action list; the loss sum and its (started) all-reduce."""
        st = _StepState(micro, weights, [shape_key(args) for args, _ in micro], self._device)
        actions = self.schedule.actions[self.plan.position_of(dist.get_rank())]
        last = self.plan.num_stages - 1
        # This rank's part of the loss is final after its last forward of the last stage (or
        # at once if it holds none); its all-reduce starts then and is waited at the very end.
        final_forward = max((at for at, a in enumerate(actions) if a.kind is ActionKind.FORWARD and a.stage == last), default=-1)
        ahead = _lookahead(actions)
        checked = False
        timeline: list[tuple[str, float, float]] = []
        for at, action in enumerate(actions):
            if not checked and not action.is_compute:
                # Nothing is posted before every rank is known to cut the same batch: a stray
                # receive would take a later step's message.
                self._global_rows(cut)
                checked = True
                if final_forward < 0:
                    st.loss_work = dist.all_reduce(st.loss_sum, async_op=True)
            got = None
            if action.is_compute:
                # Receives are posted ahead of their place once their shapes are known, and
                # waited only here, by the compute that reads them.
                for later in actions[at + 1 : ahead[at]] if checked else ():
                    if later.kind in _RECEIVES and later not in st.incoming and self._can_post(later, st.keys):
                        st.incoming[later] = self._post(later, st.keys)
                needed = self.schedule.input_receive(action)
                got = None if needed is None else st.incoming.pop(needed).wait()
            began = time.perf_counter()  # waiting for data is idle time, not compute
            self._execute(action, st, got)
            if at == final_forward:
                self._global_rows(cut)  # (a single rank has no transfer that waited for it)
                st.loss_work = dist.all_reduce(st.loss_sum, async_op=True)
            timeline.append((str(action), began - start, time.perf_counter() - start))
        if st.loss_work is None:  # a rank with neither a transfer nor the last stage
            self._global_rows(cut)
            st.loss_work = dist.all_reduce(st.loss_sum, async_op=True)
        for work, _ in st.sends:
            work.wait()
        self.last_timeline = tuple(timeline)
        return st.loss_sum, st.loss_work

    def _execute(self, action: Action, st: _StepState, got: list[torch.Tensor] | None) -> None:
        """Run one action; ``got`` holds the received tensors a compute reads, if any."""
        s, i = key = (action.stage, action.micro_batch)
        kind = action.kind
        if kind is ActionKind.FORWARD:
            self._forward(s, i, st, got)
        elif kind is ActionKind.BACKWARD:
            if key == self._final_backward.get(s) and s in self._reducers:
                self._reducers[s].begin()
            if got is not None:
                st.grads[key] = _fill_grads(st.outputs[key], got)
            self._backward(s, i, st)
        elif kind is ActionKind.SEND_ACT:
            st.sends += self._transfers.send_activations(list(st.outputs[key]), self._peer(s + 1), s, i, st.keys[i])
        elif kind is ActionKind.SEND_GRAD:
            st.sends += self._transfers.send_grads(st.outputs.pop(("in_grads", s, i)), self._peer(s - 1), s - 1, i)
        elif action not in st.incoming:  # a receive not posted ahead: its header comes first
            st.incoming[action] = self._post(action, st.keys)

    def _forward(self, s: int, i: int, st: _StepState, got: list[torch.Tensor] | None) -> None:
        last = self.plan.num_stages - 1
        args, target = st.micro[i]
        received = st.inputs.get((s, i), []) if got is None else st.inputs.setdefault((s, i), got)
        with torch.enable_grad():
            out = self._modules[s](*args, *received)
            if s == last:
                sharded = self._sharded.get(s)
                loss_fn = sharded.loss_fn if sharded is not None and sharded.loss_fn else self.loss_fn
                loss = loss_fn(out) if target is None else loss_fn(out, target)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise TypeError("loss_fn must return a scalar tensor")
                out = loss * st.weights[i]
                st.loss_sum += out.detach().double()
        st.outputs[(s, i)] = out
        if s < last and self._local_stage(s + 1):
            st.inputs[(s + 1, i)] = [_as_leaf(t) for t in out]

    def _backward(self, s: int, i: int, st: _StepState) -> None:
        out = st.outputs.pop((s, i))
        if s == self.plan.num_stages - 1:
            out.backward()
        else:
            pairs = [(o, g) for o, g in zip(out, st.grads.pop((s, i))) if o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        received = st.inputs.pop((s, i), [])
        in_grads = [(t.grad if t.grad is not None else torch.zeros_like(t)) for t in received if t.requires_grad]
        if s > 0 and self._local_stage(s - 1):
            st.grads[(s - 1, i)] = _fill_grads(st.outputs[(s - 1, i)], in_grads)
        else:
            st.outputs[("in_grads", s, i)] = in_grads

    def _can_post(self, receive: Action, keys: list[tuple]) -> bool:
        """A receive can go ahead of its place once its boundary's header is cached."""
        boundary = receive.stage - 1 if receive.kind is ActionKind.RECV_ACT else receive.stage
        return self._transfers.knows(boundary, keys[receive.micro_batch])

    def _post(self, receive: Action, keys: list[tuple]) -> Incoming:
        s, i = receive.stage, receive.micro_batch
        if receive.kind is ActionKind.RECV_ACT:
            count = len(self.stages[s].received)
            return self._transfers.recv_activations(self._peer(s - 1), s - 1, i, keys[i], count)
        return self._transfers.recv_grads(self._peer(s + 1), s, i, keys[i])

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

    # ---- setup -------------------------------------------------------------------------------

    def _local_stage(self, s: int) -> bool:
        return s in self._local

    def _require_bound(self) -> None:
        if not self._bound:
            require_initialized("the pipelined program")
            self._bind()

    def _local_state(self) -> dict[str, torch.Tensor]:
        """This rank's parameters and buffers (shards where split), by local-model name."""
        state = {}
        for s in self._local:
            state.update(self._modules[s].state_dict(keep_vars=True))
        return state

    def _peer(self, stage: int) -> int:
        """The rank running ``stage`` in this rank's pipeline, at this rank's tensor-parallel index."""
        rank = dist.get_rank()
        ranks = self.plan.pipelines[self.plan.replica_of(rank)]
        k = self.plan.tensor_parallel
        return ranks[(stage % self.plan.pipeline_degree) * k + ranks.index(rank) % k]

    def _shard_stage(self, s: int, group: dist.ProcessGroup, on_meta: bool) -> None:
        """Replace stage ``s`` by this rank's tensor-parallel shard of it."""
        module = self._modules[s]
        if not on_meta:
            # Every rank of the group shards the same weights: those of its first rank.
            ranks = dist.get_process_group_ranks(group)
            broadcast_tensors([t.data for t in module.state_dict(keep_vars=True).values()], src=ranks[0], group=group)
        last = s == self.plan.num_stages - 1
        sharded = shard_model(
            module,
            self._stage_graphs[s],
            group=group,
            shard_sizes=self._stage_shard_sizes.get(s, {}),
            loss_fn=self.loss_fn if last else None,
            gather_output=not last,  # the next stage receives whole activations
        )
        self._sharded[s] = sharded
        self._modules[s] = sharded.module
        if on_meta:
            materialize(sharded.module, self._device, f"stage {s}")

    def _tie_local_parameters(self) -> dict[str, nn.Parameter]:
        """This rank's parameters by name; a weight several local stages use is one tensor."""
        chosen: dict[str, nn.Parameter] = {}
        for s in sorted(self._local):
            module = self._modules[s]
            for path, name in self._param_paths[s].items():
                owner_path, _, attr = path.rpartition(".")
                owner = module.get_submodule(owner_path)
                if name in chosen:
                    setattr(owner, attr, chosen[name])
                else:
                    chosen[name] = getattr(owner, attr)
        return chosen

    def _bind(self) -> None:
        info = self._join_world()
        plan = self.plan
        position = plan.position_of(info.rank)
        self._local = set(plan.stages_at(position))
        k = plan.tensor_parallel
        # Groups are made collectively: every rank creates every group, in one order.
        data_group = self._make_data_group(info.rank, info.device)
        tensor_groups = {
            (d, pos): dist.new_group(list(ranks[pos * k : (pos + 1) * k]))
            for d, ranks in enumerate(plan.pipelines)
            for pos in range(plan.pipeline_degree)
        } if k > 1 else {}
        for s in sorted(self._local):
            module = self._modules[s]
            on_meta = any(t.is_meta for t in module.parameters())
            if s in self._stage_graphs:
                self._shard_stage(s, tensor_groups[(plan.replica_of(info.rank), position)], on_meta)
            elif on_meta:
                materialize(module, self._device, f"stage {s}")
            self._modules[s].to(self._device)
        self._params = self._tie_local_parameters()
        held: dict[str, set[int]] = {}  # parameter name -> pipeline positions that hold it
        for s, paths in enumerate(self._param_paths):
            for name in paths.values():
                held.setdefault(name, set()).add(s % plan.pipeline_degree)
        self._tied = []
        for name in sorted(n for n, pos in held.items() if len(pos) > 1):
            # A tied weight is whole (never sharded): sum it per tensor-parallel index, or each
            # rank of a group would add its identical copy once more.
            for t in range(k):
                ranks = sorted(p[pos * k + t] for p in plan.pipelines for pos in held[name])
                group = dist.new_group(ranks)
                if name in self._params and info.rank in ranks:
                    self._tied.append((self._params[name], group))
        tied_names = {n for n, pos in held.items() if len(pos) > 1}
        # Replicas of a position start from the first replica's weights; tied copies agree too.
        if plan.dp_degree > 1:
            mine = [t.data for t in self._local_state().values()]
            broadcast_tensors(mine, src=plan.data_group_of(info.rank)[0], group=data_group)
        for param, group in self._tied:
            broadcast_tensors([param.data], src=min(dist.get_process_group_ranks(group)), group=group)
        actions = self.schedule.actions[position]
        self._final_backward = {}
        last_at = {}
        for at, a in enumerate(actions):
            if a.kind is ActionKind.BACKWARD:
                self._final_backward[a.stage] = (a.stage, a.micro_batch)
                last_at[a.stage] = at
        self._reducers: dict[int, GradientReducer] = {}
        if plan.dp_degree > 1:
            # A parameter two local stages share is final after the later of their backwards.
            owner: dict[str, int] = {}
            for s in sorted(self._local, key=lambda s: last_at[s]):
                for name in self._param_paths[s].values():
                    owner[name] = s
            for s in sorted(self._local):
                params = [
                    p for name, p in self._params.items() if owner[name] == s and name not in tied_names
                ]
                if params:
                    self._reducers[s] = self._make_reducer(params, data_group)
        self._transfers = Transfers(self._device)
        self._bound = True


@dataclasses.dataclass
class _StepState:
    """What one step's actions hand each other, by (stage, micro-batch)."""

    micro: list  # per micro-batch: (args, target)
    weights: list[float]  # per micro-batch: its loss's weight in the global loss
    keys: list[tuple]  # per micro-batch: the shape key of its transfers
    device: dataclasses.InitVar[torch.device]
    inputs: dict = dataclasses.field(default_factory=dict)  # received (or handed-over) inputs
    outputs: dict = dataclasses.field(default_factory=dict)  # outputs (the weighted loss last)
    grads: dict = dataclasses.field(default_factory=dict)  # gradients of the outputs
    incoming: dict = dataclasses.field(default_factory=dict)  # posted receives by action
    sends: list = dataclasses.field(default_factory=list)  # (work, tensor) of posted sends
    loss_sum: torch.Tensor = None
    loss_work: dist.Work | None = None

    def __post_init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)


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


def _as_leaf(t: torch.Tensor) -> torch.Tensor:
    """A received (or locally handed over) tensor: a leaf, so its gradient can be sent back."""
    return t.detach().requires_grad_(t.requires_grad)


def _fill_grads(outputs, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Line up gradients (sent for the outputs that require grad) with all outputs."""
    it = iter(grads)
    return [next(it) if o.requires_grad else None for o in outputs]


def _lookahead(actions: tuple[Action, ...]) -> dict[int, int]:
    """For each compute's index, the end of the list slice whose receives it posts first."""
    computes = [at for at, a in enumerate(actions) if a.is_compute]
    return {
        at: computes[k + _LOOKAHEAD_COMPUTES] if k + _LOOKAHEAD_COMPUTES < len(computes) else len(actions)
        for k, at in enumerate(computes)
    }
