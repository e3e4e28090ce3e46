"""The pipeline's step executor: one rank's action list of the plan's schedule, in order.

``F`` runs a stage on a micro-batch, ``B`` its backward, ``SA``/``RA`` move activations to the
next stage and ``SG``/``RG`` gradients back. Sends are asynchronous (waited at the end of the
step). A receive is posted at its place in the list, or earlier, while the rank computes the
two actions before it, once its shapes are known (:mod:`whale.runtime.p2p`); only the compute
that reads it waits for its data. That is the simulator's async p2p model: the schedule is the
data the planner simulates, and a receive's place in the list does not delay the transfer.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.distributed as dist

from ...ir.schedule import Action, ActionKind
from ..emulate import Stretch
from ..p2p import Incoming, shape_key
from ..program_base import ReplicaBatch

__all__ = ["StepExecutor"]

_RECEIVES = (ActionKind.RECV_ACT, ActionKind.RECV_GRAD)
# Receives are posted while the rank computes the actions before them: up to the list's
# receives of the compute after the next one.
_LOOKAHEAD_COMPUTES = 2


class StepExecutor:
    """Runs one step of this rank's action list (a part of :class:`PipelineProgram`, which
    binds the stages, transfers and reducers it uses)."""

    def _compile_actions(self, actions: tuple[Action, ...]) -> None:
        """Work out once what each action of this rank's list needs at run time."""
        schedule, last = self.schedule, self.plan.num_stages - 1
        ahead = _lookahead(actions)
        ops = []
        for at, a in enumerate(actions):
            peer = -1
            if not a.is_compute:
                peer = self._peer(a.stage + 1 if a.kind in (ActionKind.SEND_ACT, ActionKind.RECV_GRAD) else a.stage - 1)
            later = tuple(r for r in actions[at + 1 : ahead[at]] if r.kind in _RECEIVES) if a.is_compute else ()
            ops.append(_Op(a, str(a), a.kind, a.stage, a.micro_batch, a.is_compute, peer,
                           schedule.input_receive(a) if a.is_compute else None, later))  # fmt: skip
        self._ops = tuple(ops)
        # This rank's part of the loss is final after its last forward of the last stage (or
        # at once if it holds none); its all-reduce starts then and is waited at the very end.
        self._final_forward = max((at for at, a in enumerate(actions) if a.kind is ActionKind.FORWARD and a.stage == last), default=-1)

    def _run(self, micro: list, weights: list[float], cut: ReplicaBatch, start: float, stretch: Stretch) -> tuple[torch.Tensor, dist.Work, tuple]:
        """Execute this rank's action list; the loss sum, its (started) all-reduce and what
        each action took (``(code, begin, end)`` from ``start``)."""
        st = _StepState(micro, weights, [shape_key(args) for args, _ in micro], self._device)
        final_forward = self._final_forward
        checked = False
        incoming = st.incoming
        timeline: list[tuple[str, float, float]] = []
        record = timeline.append
        clock = time.perf_counter
        for at, op in enumerate(self._ops):
            got = None
            if op.is_compute:
                # Receives are posted ahead of their place once their shapes are known, and
                # waited only here, by the compute that reads them.
                if checked:
                    for later in op.ahead:
                        if later not in incoming and self._can_post(later, st.keys):
                            incoming[later] = self._post(later, st.keys)
                if op.needs is not None:
                    with self._waiting(_what(op.needs), f"rank {self._peer_of(op.needs)}"):
                        got = incoming.pop(op.needs).wait()
                began = clock()  # waiting for data is idle time, not compute
                stretch.begin()
                if op.kind is ActionKind.FORWARD:
                    self._forward(op.stage, op.micro_batch, st, got)
                else:
                    self._backward_action(op, st, got)
                stretch.end()
                if at == final_forward:
                    self._global_rows(cut)  # (a single rank has no transfer that waited for it)
                    st.loss_work = dist.all_reduce(st.loss_sum, async_op=True)
            else:
                if not checked:
                    # Nothing is posted before every rank is known to cut the same batch: a stray
                    # receive would take a later step's message.
                    self._global_rows(cut)
                    checked = True
                    if final_forward < 0:
                        st.loss_work = dist.all_reduce(st.loss_sum, async_op=True)
                began = clock()
                self._transfer(op, st)
            record((op.code, began - start, clock() - start))
        if st.loss_work is None:  # a rank with neither a transfer nor the last stage
            self._global_rows(cut)
            st.loss_work = dist.all_reduce(st.loss_sum, async_op=True)
        with self._waiting("its sends to be received", "the next and previous stages' ranks"):
            for work, _ in st.sends:
                work.wait()
        return st.loss_sum, st.loss_work, tuple(timeline)

    def _backward_action(self, op: _Op, st: _StepState, got: list[torch.Tensor] | None) -> None:
        s, i = key = (op.stage, op.micro_batch)
        if key == self._final_backward.get(s) and s in self._reducers:
            self._reducers[s].begin()
        if got is not None:
            st.grads[key] = _fill_grads(st.outputs[key], got)
        self._backward(s, i, st)

    def _transfer(self, op: _Op, st: _StepState) -> None:
        """Post a send, or a receive not posted ahead (its header comes first)."""
        s, i, kind = op.stage, op.micro_batch, op.kind
        if kind is ActionKind.SEND_ACT:
            st.sends += self._transfers.send_activations(list(st.outputs[(s, i)]), op.peer, s, i, st.keys[i])
        elif kind is ActionKind.SEND_GRAD:
            st.sends += self._transfers.send_grads(st.outputs.pop(("in_grads", s, i)), op.peer, s - 1, i)
        elif op.action not in st.incoming:
            # The first receive over a boundary waits for its header.
            with self._waiting(_what(op.action) + " (its header)", f"rank {op.peer}"):
                st.incoming[op.action] = self._post(op.action, st.keys)

    def _forward(self, s: int, i: int, st: _StepState, got: list[torch.Tensor] | None) -> None:
        last = self.plan.num_stages - 1
        args, target = st.micro[i]
        received = st.inputs.get((s, i), []) if got is None else st.inputs.setdefault((s, i), got)
        with torch.enable_grad():
            out = self._modules[s](*args, *received)
            if s == last:
                out = self.program.call.output(out)  # what the local model returns
                loss = self.loss_fn(out) if target is None else self.loss_fn(out, target)
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

    def _peer_of(self, receive: Action) -> int:
        return self._peer(receive.stage - 1 if receive.kind is ActionKind.RECV_ACT else receive.stage + 1)

    def _post(self, receive: Action, keys: list[tuple]) -> Incoming:
        s, i = receive.stage, receive.micro_batch
        if receive.kind is ActionKind.RECV_ACT:
            count = len(self.stages[s].received)
            return self._transfers.recv_activations(self._peer(s - 1), s - 1, i, keys[i], count)
        return self._transfers.recv_grads(self._peer(s + 1), s, i, keys[i])


def _what(receive: Action) -> str:
    """A receive as the watchdog names it."""
    if receive.kind is ActionKind.RECV_ACT:
        return f"the activations into stage {receive.stage}, micro-batch {receive.micro_batch} (action {receive})"
    return f"the gradients into stage {receive.stage}, micro-batch {receive.micro_batch} (action {receive})"


@dataclasses.dataclass(frozen=True, slots=True)
class _Op:
    """One action of this rank's list with what running it needs, worked out at bind."""

    action: Action
    code: str  # its label in ``last_timeline`` ("1F3")
    kind: ActionKind
    stage: int
    micro_batch: int
    is_compute: bool
    peer: int  # the rank at the other end of a send or receive; -1 for a compute
    needs: Action | None  # the receive whose tensors a compute reads
    ahead: tuple[Action, ...]  # the receives a compute posts before it runs, if it can


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
