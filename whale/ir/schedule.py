"""Pipeline schedules as data: per-rank action lists, their text form and generators.

A schedule says, for every rank, the exact order in which it runs forwards, backwards, sends and
receives. The planner simulates it (:mod:`whale.planner.schedules.simulator`); the runtime executes the same
lists. One action is written ``<stage><code><micro-batch>``, in the spirit of
``torch.distributed.pipelining``'s ``"1F0"``:

====  ================================================  =========
code  meaning                                           example
====  ================================================  =========
F     forward of a micro-batch on a stage               ``0F3``
B     backward (input and weight gradients)             ``1B3``
SA    send the stage's output activation to stage s+1   ``0SA3``
RA    receive the stage's input activation from s-1     ``1RA3``
SG    send the stage's input gradient to stage s-1      ``1SG3``
RG    receive the stage's output gradient from s+1      ``0RG3``
====  ================================================  =========

Stages form a chain ``0 -> 1 -> ... -> num_stages - 1``; the last stage computes the loss.
Sends and receives appear only between stages on different ranks: two adjacent stages on one
rank (interleaving on a single rank) hand tensors over locally.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Sequence

__all__ = [
    "SCHEDULE_NAMES",
    "Action",
    "ActionKind",
    "Schedule",
    "format_schedule",
    "parse_schedule",
]


class ActionKind(str, enum.Enum):
    """What an :class:`Action` does; the value is its code in the text form."""

    FORWARD = "F"
    BACKWARD = "B"
    SEND_ACT = "SA"
    RECV_ACT = "RA"
    SEND_GRAD = "SG"
    RECV_GRAD = "RG"


_F, _B = ActionKind.FORWARD, ActionKind.BACKWARD
_SA, _RA, _SG, _RG = (
    ActionKind.SEND_ACT,
    ActionKind.RECV_ACT,
    ActionKind.SEND_GRAD,
    ActionKind.RECV_GRAD,
)
_SENDS = (_SA, _SG)
# Activations flow to the next stage, gradients to the previous one.
_PEER_OFFSET = {_SA: 1, _RA: -1, _SG: -1, _RG: 1}
_MATCH = {_SA: _RA, _RA: _SA, _SG: _RG, _RG: _SG}
_WORDS = {
    _F: "forward",
    _B: "backward",
    _SA: "send of the activation",
    _RA: "receive of the activation",
    _SG: "send of the gradient",
    _RG: "receive of the gradient",
}
# The generators of whale.planner.schedules.generate, by name.
SCHEDULE_NAMES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved_1f1b")
_ACTION_RE = re.compile(r"(\d+)(F|B|SA|RA|SG|RG)(\d+)")


def _check_int(owner: str, name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}({name}={value!r}) must be an int >= {minimum}")


@dataclasses.dataclass(frozen=True, repr=False)
class Action:
    """One step of one rank: compute, send or receive for a (stage, micro-batch).

    ``peer_stage`` is the stage at the other end of a send or receive; it is filled in (stage + 1
    for SA and RG, stage - 1 for RA and SG) and must be left None for F and B.

    Example::

        Action("F", stage=0, micro_batch=3) == Action.from_str("0F3")
        Action.from_str("1RA3").peer_stage  # 0
    """

    kind: ActionKind
    stage: int
    micro_batch: int
    peer_stage: int | None = None

    def __post_init__(self) -> None:
        try:
            kind = ActionKind(self.kind)
        except ValueError:
            codes = [k.value for k in ActionKind]
            raise ValueError(f"Action(kind={self.kind!r}) is unknown; use one of {codes}") from None
        object.__setattr__(self, "kind", kind)
        _check_int("Action", "stage", self.stage, 0)
        _check_int("Action", "micro_batch", self.micro_batch, 0)
        if kind in (_F, _B):
            if self.peer_stage is not None:
                raise ValueError(
                    f"Action {self}: a {_WORDS[kind]} has no peer, "
                    f"got peer_stage={self.peer_stage!r}"
                )
            return
        expected = self.stage + _PEER_OFFSET[kind]
        if expected < 0:
            raise ValueError(f"Action {self}: stage 0 is the first stage, it has no previous stage")
        if self.peer_stage is None:
            object.__setattr__(self, "peer_stage", expected)
        elif self.peer_stage != expected:
            raise ValueError(
                f"Action {self}: stages form a chain, so its peer is stage {expected}, "
                f"not peer_stage={self.peer_stage!r}; leave peer_stage out"
            )

    def __str__(self) -> str:
        return f"{self.stage}{ActionKind(self.kind).value}{self.micro_batch}"

    def __repr__(self) -> str:
        return f"Action.from_str({str(self)!r})"

    @classmethod
    def from_str(cls, text: str) -> Action:
        """Parse one action code such as ``"0F3"`` or ``"1RA3"``."""
        match = _ACTION_RE.fullmatch(text.strip())
        if match is None:
            raise ValueError(
                f"cannot read action {text!r}: write <stage><code><micro-batch>, e.g. '0F3' "
                f"or '1RA3', with code one of {[k.value for k in ActionKind]}"
            )
        return cls(ActionKind(match.group(2)), int(match.group(1)), int(match.group(3)))

    @property
    def is_compute(self) -> bool:
        """True for F and B, False for sends and receives."""
        return self.kind in (_F, _B)

    @property
    def is_send(self) -> bool:
        """True for SA and SG."""
        return self.kind in _SENDS

    def matching(self) -> Action:
        """The action on the peer that pairs with this send or receive (``0SA3`` <-> ``1RA3``)."""
        if self.is_compute:
            raise ValueError(
                f"{self} is a {_WORDS[self.kind]}: only sends and receives have a match"
            )
        assert self.peer_stage is not None
        return Action(_MATCH[self.kind], self.peer_stage, self.micro_batch)

    def describe(self) -> str:
        """Words for error messages: ``"1B2 (backward of stage 1, micro-batch 2)"``."""
        peer = "" if self.is_compute else f", peer stage {self.peer_stage}"
        what = f"{_WORDS[self.kind]} of stage {self.stage}, micro-batch {self.micro_batch}"
        return f"{self} ({what}{peer})"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-rank action lists of one pipeline step.

    ``stage_to_rank[s]`` is the rank that runs stage ``s``; ``actions[r]`` is what rank ``r``
    executes, in order. With interleaving a rank holds several (virtual) stages. Structure is
    checked here; :func:`~.schedule_check.validate` checks that the lists make a correct, deadlock-free step.

    Example::

        sched = make_schedule("1f1b", num_stages=4, num_micro_batch=8)
        sched.actions[3][:3]  # (Action.from_str('3RA0'), Action.from_str('3F0'), ...)
    """

    name: str
    num_stages: int
    num_micro_batch: int
    stage_to_rank: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or any(c.isspace() for c in self.name):
            raise ValueError(
                f"Schedule(name={self.name!r}) must be a non-empty string without spaces"
            )
        _check_int("Schedule", "num_stages", self.num_stages, 1)
        _check_int("Schedule", "num_micro_batch", self.num_micro_batch, 1)
        stage_to_rank = tuple(self.stage_to_rank)
        actions = tuple(tuple(rank_actions) for rank_actions in self.actions)
        object.__setattr__(self, "stage_to_rank", stage_to_rank)
        object.__setattr__(self, "actions", actions)
        if len(stage_to_rank) != self.num_stages:
            raise ValueError(
                f"Schedule: stage_to_rank has {len(stage_to_rank)} entries for "
                f"num_stages={self.num_stages}; give one rank per stage"
            )
        for stage, rank in enumerate(stage_to_rank):
            if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < len(actions):
                raise ValueError(
                    f"Schedule: stage {stage} is on rank {rank!r}, but there are action lists for "
                    f"{len(actions)} ranks (0..{len(actions) - 1})"
                )
        for rank, rank_actions in enumerate(actions):
            for position, action in enumerate(rank_actions):
                if not isinstance(action, Action):
                    raise TypeError(
                        f"Schedule: rank {rank} position {position} holds {action!r}, not an Action"
                    )

    @property
    def num_ranks(self) -> int:
        """Number of ranks, one action list each."""
        return len(self.actions)

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages that run on ``rank``, in pipeline order."""
        return tuple(s for s, r in enumerate(self.stage_to_rank) if r == rank)

    def input_receive(self, compute: Action) -> Action | None:
        """The receive whose tensor ``compute`` reads (a forward's activation, a backward's
        output gradient), or None where that tensor is made on the same rank or not at all."""
        stage, micro_batch, place = compute.stage, compute.micro_batch, self.stage_to_rank
        if compute.kind is _F and stage > 0 and place[stage - 1] != place[stage]:
            return Action(_RA, stage, micro_batch)
        if compute.kind is _B and stage < self.num_stages - 1 and place[stage + 1] != place[stage]:
            return Action(_RG, stage, micro_batch)
        return None


# ---------------------------------------------------------------------------------------------
# Text form.

_HEADER_RE = re.compile(
    r"schedule\s+(\S+)\s+num_stages=(\d+)\s+num_micro_batch=(\d+)\s+stage_to_rank=([\d,]+)"
)
_RANK_RE = re.compile(r"rank\s+(\d+)\s*:(.*)")


def format_schedule(schedule: Schedule) -> str:
    """The text form: a header line, then one line of action codes per rank.

    Example::

        >>> print(format_schedule(make_schedule("gpipe", 2, 2)))
        schedule gpipe num_stages=2 num_micro_batch=2 stage_to_rank=0,1
        rank 0: 0F0 0SA0 0F1 0SA1 0RG0 0B0 0RG1 0B1
        rank 1: 1RA0 1F0 1RA1 1F1 1B0 1SG0 1B1 1SG1
    """
    header = (
        f"schedule {schedule.name} num_stages={schedule.num_stages} "
        f"num_micro_batch={schedule.num_micro_batch} "
        f"stage_to_rank={','.join(str(r) for r in schedule.stage_to_rank)}"
    )
    lines = [
        f"rank {rank}: {' '.join(str(a) for a in actions)}".rstrip()
        for rank, actions in enumerate(schedule.actions)
    ]
    return "\n".join([header, *lines])


def parse_schedule(
    text: str,
    *,
    name: str | None = None,
    num_stages: int | None = None,
    num_micro_batch: int | None = None,
    stage_to_rank: Sequence[int] | None = None,
) -> Schedule:
    """Read the text form of :func:`format_schedule`; ``parse_schedule(format_schedule(s)) == s``.

    The ``schedule ...`` header is optional. Without it, the keyword arguments give what it
    would; what is still missing is inferred: ``num_stages`` and ``num_micro_batch`` from the
    largest indices seen, ``stage_to_rank`` from the lines that hold each stage's actions, and
    ``name`` is ``"custom"``. Blank lines and lines starting with ``#`` are ignored. The result
    is not validated: call :func:`~.schedule_check.validate`.

    Example::

        sched = parse_schedule("rank 0: 0F0 0B0", num_micro_batch=1)
    """
    header: tuple[str, int, int, tuple[int, ...]] | None = None
    ranks: list[list[Action]] = []
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("schedule"):
            match = _HEADER_RE.fullmatch(line)
            if match is None or header or ranks:
                raise ValueError(
                    f"line {line_no}: {line!r} is not a valid header; the first line may be "
                    "'schedule <name> num_stages=<n> num_micro_batch=<m> "
                    "stage_to_rank=<r0>,<r1>,...'"
                )
            ranks_of_stages = tuple(int(r) for r in match.group(4).split(",") if r)
            header = (match.group(1), int(match.group(2)), int(match.group(3)), ranks_of_stages)
            continue
        match = _RANK_RE.fullmatch(line)
        if match is None:
            raise ValueError(f"line {line_no}: expected 'rank <r>: <actions>', got {line!r}")
        if int(match.group(1)) != len(ranks):
            raise ValueError(
                f"line {line_no}: expected the line of rank {len(ranks)}, got rank {match.group(1)}"
            )
        actions = []
        for position, token in enumerate(match.group(2).split()):
            try:
                actions.append(Action.from_str(token))
            except ValueError as err:
                raise ValueError(
                    f"line {line_no} (rank {len(ranks)}, position {position}): {err}"
                ) from None
        ranks.append(actions)
    if header is not None:
        given = (name, num_stages, num_micro_batch, stage_to_rank)
        keys = ("name", "num_stages", "num_micro_batch", "stage_to_rank")
        for key, value, said in zip(keys, given, header, strict=True):
            if value is not None and (tuple(value) if key == "stage_to_rank" else value) != said:
                raise ValueError(
                    f"parse_schedule({key}={value!r}) contradicts the header, which says {said!r}"
                )
        return Schedule(*header, ranks)
    everything = [a for actions in ranks for a in actions]
    if num_stages is None:
        num_stages = max((a.stage for a in everything), default=0) + 1
    if num_micro_batch is None:
        num_micro_batch = max((a.micro_batch for a in everything), default=0) + 1
    if stage_to_rank is None:
        stage_to_rank = _infer_stage_to_rank(ranks, num_stages)
    return Schedule(name or "custom", num_stages, num_micro_batch, tuple(stage_to_rank), ranks)


def _infer_stage_to_rank(ranks: list[list[Action]], num_stages: int) -> tuple[int, ...]:
    owner: dict[int, int] = {}
    for rank, actions in enumerate(ranks):
        for action in actions:
            if owner.setdefault(action.stage, rank) != rank:
                raise ValueError(
                    f"stage {action.stage} has actions on rank {owner[action.stage]} "
                    f"and rank {rank}; a stage runs on one rank (pass stage_to_rank to say which)"
                )
    missing = [s for s in range(num_stages) if s not in owner]
    if missing:
        raise ValueError(
            f"stages {missing} have no actions, so their ranks are unknown; pass stage_to_rank"
        )
    return tuple(owner[s] for s in range(num_stages))
