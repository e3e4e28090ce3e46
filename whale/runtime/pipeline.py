"""The pipeline program: runs each rank's action list of a schedule, stage by stage.

Every rank holds the stage programs of its pipeline position (several with an interleaved
schedule) and executes its list from ``whale.planner.schedules`` in order: ``F`` runs a stage
on a micro-batch, ``B`` runs its backward, ``SA``/``RA`` move activations to the next stage and
``SG``/``RG`` move gradients back. Sends are asynchronous (waited at the end of the step),
receives block until their data is there. The schedule is the same data the planner simulates.

Tensors crossing a boundary travel with a small header (shape, dtype, requires-grad) the first
time a boundary sees a given micro-batch size; both ends know the row split, so later
micro-batches of that size send only the data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config
from ..planner.plan import Plan
from ..planner.rows import row_offsets, split_rows
from ..planner.schedules import ActionKind, make_schedule
from ..rewrite.stage_split import StageProgram
from .batch import broadcast_tensors, narrow, to_device
from .grad_sync import GradientReducer
from .process_group import require_initialized, world_info
from ..capture import CapturedModel
from ..rewrite.sharded_model import ShardedModel
from ..rewrite.tensor_parallel import shard_model
from .program import ProgramBase, materialize

__all__ = ["PipelineProgram"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool, torch.uint8, torch.int8)
_MAX_DIMS = 8


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
        interleaved = plan.schedule == "interleaved_1f1b"
        self.schedule = make_schedule(
            plan.schedule, plan.num_stages, plan.num_micro_batch, plan.pipeline_degree if interleaved else None
        )
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

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "a pipelined program holds only its own stages; run inference by loading "
            "full_state_dict() into the local model"
        )

    # ---- training ----------------------------------------------------------------------------

    def step(self, inputs: Any, target: Any = None, *, batch: str = "global") -> torch.Tensor:
        """Run the schedule over the micro-batches; gradients synchronized. See DataParallelProgram.step."""
        if not self._bound:
            require_initialized("step()")
            self._bind()
        cut = self._replica_batch(inputs, target, batch, self._device)
        total = self._global_rows(cut)
        args, target, my_rows = cut.args, cut.target, cut.rows
        dim = self.config.batch_dim
        m = self.plan.num_micro_batch
        mb_rows = split_rows(my_rows, [1.0] * m, what="micro-batches")
        starts = row_offsets(mb_rows)
        micro = [to_device(narrow((args, target), dim, starts[i], n), self._device) for i, n in enumerate(mb_rows)]
        weights = [n / total if self.config.loss_reduction == "mean" else 1.0 for n in mb_rows]
        loss_sum = self._run(micro, mb_rows, weights)
        for reducer in self._reducers.values():
            reducer.finish()
        for param, group in self._tied:
            dist.all_reduce(param.grad, group=group)
        dist.all_reduce(loss_sum)
        # Every rank of the last stage's tensor-parallel group holds the loss once.
        return (loss_sum / self.plan.tensor_parallel).to(torch.float32)

    def _run(self, micro: list, mb_rows: list[int], weights: list[float]) -> torch.Tensor:
        rank = dist.get_rank()
        last = self.plan.num_stages - 1
        inputs: dict[tuple[int, int], list[torch.Tensor]] = {}
        outputs: dict[tuple[int, int], Any] = {}
        grads: dict[tuple[int, int], list[torch.Tensor]] = {}
        sends: list[tuple[dist.Work, torch.Tensor]] = []
        # Receives are posted where the schedule lists them and waited only when their data is
        # needed, so a backward never waits for an activation only a later forward reads.
        pending: dict[tuple[str, tuple[int, int]], list[dist.Work]] = {}
        loss_sum = torch.zeros((), dtype=torch.float64, device=self._device)
        position = self.plan.position_of(rank)
        timeline: list[tuple[str, float, float]] = []
        start = time.perf_counter()
        for action in self.schedule.actions[position]:
            s, i = action.stage, action.micro_batch
            key = (s, i)
            kind = action.kind
            began = time.perf_counter()
            if kind is ActionKind.FORWARD:
                for work in pending.pop(("act", key), ()):
                    work.wait()
                began = time.perf_counter()  # waiting for data is idle time, not compute
                args, target = micro[i]
                received = inputs.get(key, [])
                with torch.enable_grad():
                    out = self._modules[s](*args, *received)
                    if s == last:
                        loss_fn = self._sharded[s].loss_fn if s in self._sharded and self._sharded[s].loss_fn else self.loss_fn
                        loss = loss_fn(out) if target is None else loss_fn(out, target)
                        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                            raise TypeError("loss_fn must return a scalar tensor")
                        out = loss * weights[i]
                        loss_sum += out.detach().double()
                outputs[key] = out
                if s < last and self._local_stage(s + 1):
                    inputs[(s + 1, i)] = [_as_leaf(t) for t in out]
            elif kind is ActionKind.BACKWARD:
                if key == self._final_backward.get(s) and s in self._reducers:
                    self._reducers[s].begin()
                for work in pending.pop(("grad", key), ()):
                    work.wait()
                began = time.perf_counter()
                out = outputs.pop(key)
                if s == last:
                    out.backward()
                else:
                    pairs = [(o, g) for o, g in zip(out, grads.pop(key)) if o.requires_grad]
                    if pairs:
                        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
                received = inputs.pop(key, [])
                in_grads = [
                    (t.grad if t.grad is not None else torch.zeros_like(t)) for t in received if t.requires_grad
                ]
                if s > 0 and self._local_stage(s - 1):
                    grads[(s - 1, i)] = _fill_grads(outputs[(s - 1, i)], in_grads)
                else:
                    outputs[("in_grads", s, i)] = in_grads
            elif kind is ActionKind.SEND_ACT:
                sends += self._send(list(outputs[key]), self._peer(s + 1), 0, s, i, mb_rows[i])
            elif kind is ActionKind.RECV_ACT:
                got, pending[("act", key)] = self._recv(
                    self._peer(s - 1), 0, s - 1, i, mb_rows[i], len(self.stages[s].received)
                )
                inputs[key] = got
            elif kind is ActionKind.SEND_GRAD:
                sends += self._send(outputs.pop(("in_grads", s, i)), self._peer(s - 1), 1, s, i, mb_rows[i])
            elif kind is ActionKind.RECV_GRAD:
                mine = [o for o in outputs[key] if o.requires_grad]
                got, pending[("grad", key)] = self._recv(self._peer(s + 1), 1, s + 1, i, mb_rows[i], len(mine), like=mine)
                grads[key] = _fill_grads(outputs[key], got)
            timeline.append((str(action), began - start, time.perf_counter() - start))
        for work, _ in sends:
            work.wait()
        self.last_timeline = tuple(timeline)
        return loss_sum

    def measured_bubble(self) -> float:
        """The pipeline's idle fraction in the last step, as the simulator defines it
        (``SimResult.bubble_fraction``): 1 - (forward + backward time of all ranks) /
        (ranks x the step's span up to the last action on any rank). Sends and receives count
        as idle. Collective: call it on every rank; every rank gets the same value.
        """
        if not getattr(self, "last_timeline", None):
            raise RuntimeError("measured_bubble() needs a step() first")
        compute = sum(end - begin for code, begin, end in self.last_timeline if _is_compute(code))
        # Ranks leave the step's agreement check together, so their clocks start aligned.
        span = torch.tensor([self.last_timeline[-1][2]], dtype=torch.float64, device=self._device)
        busy = torch.tensor([compute], dtype=torch.float64, device=self._device)
        dist.all_reduce(span, op=dist.ReduceOp.MAX)
        dist.all_reduce(busy)
        return 1.0 - busy.item() / (dist.get_world_size() * span.item())

    # ---- point to point --------------------------------------------------------------------

    def _send(self, tensors: list[torch.Tensor], peer: int, kind: int, stage: int, mb: int, rows: int):
        works = []
        header_key = (kind, stage, rows)
        if kind == 0 and header_key not in self._headers:
            header = _header(tensors)
            self._headers[header_key] = header
            works.append((dist.isend(header, peer, tag=_tag(kind, stage, mb, 63, True)), header))
        for j, t in enumerate(tensors):
            t = t.detach().contiguous()
            works.append((dist.isend(t, peer, tag=_tag(kind, stage, mb, j, False)), t))
        return works

    def _recv(self, peer: int, kind: int, stage: int, mb: int, rows: int, count: int, like=None):
        """Post the receives of one message: the tensors (filled once the works finish), works."""
        if like is not None:
            specs = [(t.shape, t.dtype, False) for t in like]
        else:
            header_key = (kind, stage, rows)
            if header_key not in self._headers:
                header = torch.empty((count, 3 + _MAX_DIMS), dtype=torch.int64)
                dist.recv(header, peer, tag=_tag(kind, stage, mb, 63, True))
                self._headers[header_key] = header
            specs = _specs(self._headers[header_key])
        tensors, works = [], []
        for j, (shape, dtype, requires_grad) in enumerate(specs):
            t = torch.empty(shape, dtype=dtype, device=self._device)
            works.append(dist.irecv(t, peer, tag=_tag(kind, stage, mb, j, False)))
            # A leaf, so the gradient of a received activation can be sent back.
            tensors.append(t.requires_grad_(requires_grad))
        return tensors, works

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
        info = world_info()
        plan = self.plan
        if info.world_size != plan.world_size:
            raise ValueError(
                f"the plan was made for {plan.world_size} ranks but the world has {info.world_size}"
            )
        self._device = info.device
        position = plan.position_of(info.rank)
        self._local = set(plan.stages_at(position))
        k = plan.tensor_parallel
        # Groups are made collectively: every rank creates every group, in one order.
        data_group = self._make_data_group(info.rank)
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
        self._headers: dict[tuple[int, int, int], torch.Tensor] = {}
        self._bound = True


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


def _tag(kind: int, stage: int, mb: int, index: int, header: bool) -> int:
    # Unique per message, so gloo matches sends and receives by tag, never by arrival order.
    return (((kind * 64 + stage) * 4096 + mb) * 64 + index) * 2 + int(header)


def _header(tensors: list[torch.Tensor]) -> torch.Tensor:
    header = torch.zeros((len(tensors), 3 + _MAX_DIMS), dtype=torch.int64)
    for j, t in enumerate(tensors):
        if t.dim() > _MAX_DIMS or t.dtype not in _DTYPES:
            raise ValueError(
                f"a {t.dim()}-d {t.dtype} tensor crosses a stage boundary; whale sends up to "
                f"{_MAX_DIMS}-d tensors of {[str(d) for d in _DTYPES]}"
            )
        header[j, 0] = t.dim()
        header[j, 1] = _DTYPES.index(t.dtype)
        header[j, 2] = int(t.requires_grad)
        header[j, 3 : 3 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    return header


def _specs(header: torch.Tensor) -> list[tuple[tuple[int, ...], torch.dtype, bool]]:
    specs = []
    for row in header.tolist():
        ndim = row[0]
        specs.append((tuple(row[3 : 3 + ndim]), _DTYPES[row[1]], bool(row[2])))
    return specs
