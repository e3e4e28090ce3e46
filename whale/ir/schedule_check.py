"""Checking a pipeline schedule: one correct, deadlock-free step (see :mod:`.schedules`)."""

from __future__ import annotations

from .schedule import _B, _F, _PEER_OFFSET, _RA, _RG, _SA, _SG, Action, Schedule

__all__ = ["validate"]


def validate(schedule: Schedule) -> None:
    """Check that a schedule is one correct, deadlock-free pipeline step; raise ValueError if not.

    Checked: every action is for an existing stage and micro-batch and sits on the rank of its
    stage; every (stage, micro-batch) is forwarded once and backwarded once; every send has
    exactly one matching receive on the peer's rank (and only stages on different ranks talk);
    each rank orders its work causally (a forward after the receive of its input or after the
    local forward of the previous stage, a backward after its forward and after the receive of
    its output gradient or the local backward of the next stage, a send after the compute that
    produced its tensor); and executing the lists with blocking, rendezvous send/receive
    finishes. Errors name the rank, the position in its list and the action.

    Example::

        validate(make_schedule("1f1b", 4, 8))  # passes silently
    """
    stages, micro_batches = schedule.num_stages, schedule.num_micro_batch
    place = schedule.stage_to_rank
    empty = [r for r in range(schedule.num_ranks) if r not in place]
    if empty:
        raise ValueError(
            f"ranks {empty} hold no stage (stage_to_rank={place}); drop them or give them a stage"
        )

    where: dict[Action, tuple[int, int]] = {}
    for rank, actions in enumerate(schedule.actions):
        for position, action in enumerate(actions):
            at = f"rank {rank} position {position}: {action.describe()}"
            if action.stage >= stages:
                raise ValueError(
                    f"{at} is for stage {action.stage}, but there are {stages} stages "
                    f"(0..{stages - 1})"
                )
            if action.micro_batch >= micro_batches:
                raise ValueError(
                    f"{at} is for micro-batch {action.micro_batch}, but there are "
                    f"{micro_batches} (0..{micro_batches - 1})"
                )
            if place[action.stage] != rank:
                raise ValueError(
                    f"{at} is on rank {rank}, but stage {action.stage} runs on "
                    f"rank {place[action.stage]}"
                )
            if not action.is_compute:
                peer = action.peer_stage
                assert peer is not None
                if peer >= stages:
                    raise ValueError(
                        f"{at}: stage {action.stage} is the last stage, there is no stage {peer}"
                    )
                if place[peer] == rank:
                    raise ValueError(
                        f"{at}: stages {action.stage} and {peer} are both on rank {rank}, "
                        "which hands the tensor over locally; remove the send/receive"
                    )
            if action in where:
                first_rank, first_position = where[action]
                raise ValueError(
                    f"{at} appears twice; it is also at rank {first_rank} position {first_position}"
                )
            where[action] = (rank, position)

    for stage in range(stages):
        for micro_batch in range(micro_batches):
            for kind in (_F, _B):
                action = Action(kind, stage, micro_batch)
                if action not in where:
                    raise ValueError(
                        f"{action.describe()} is missing from rank {place[stage]}; "
                        "every micro-batch is forwarded once and backwarded once on every stage"
                    )
    for action, (rank, position) in where.items():
        if not action.is_compute and action.matching() not in where:
            match = action.matching()
            raise ValueError(
                f"rank {rank} position {position}: {action.describe()} has no matching {match} "
                f"on rank {place[match.stage]}"
            )
    for stage in range(stages - 1):
        if place[stage] != place[stage + 1]:
            for micro_batch in range(micro_batches):
                for send in (Action(_SA, stage, micro_batch), Action(_SG, stage + 1, micro_batch)):
                    if send not in where:
                        raise ValueError(
                            f"{send.describe()} and its {send.matching()} are missing: "
                            f"stages {stage} and {stage + 1} are on ranks {place[stage]} and "
                            f"{place[stage + 1]}, so the tensor must be sent"
                        )

    for action, (rank, position) in where.items():
        for need in _prerequisites(action, stages, place):
            need_position = where[need][1]
            if need_position > position:
                raise ValueError(
                    f"rank {rank} position {position}: {action.describe()} comes before "
                    f"{need.describe()} at position {need_position}, which it depends on"
                )
    _check_no_deadlock(schedule)


def _prerequisites(action: Action, num_stages: int, place: tuple[int, ...]) -> list[Action]:
    """Actions on the same rank that must come before ``action``."""
    stage, micro_batch = action.stage, action.micro_batch
    if action.kind is _F:
        if stage == 0:
            return []
        local = place[stage - 1] == place[stage]
        return [Action(_F, stage - 1, micro_batch) if local else Action(_RA, stage, micro_batch)]
    if action.kind is _B:
        needs = [Action(_F, stage, micro_batch)]
        if stage < num_stages - 1:
            local = place[stage + 1] == place[stage]
            needs.append(
                Action(_B, stage + 1, micro_batch) if local else Action(_RG, stage, micro_batch)
            )
        return needs
    if action.kind is _SA:
        return [Action(_F, stage, micro_batch)]
    if action.kind is _SG:
        return [Action(_B, stage, micro_batch)]
    return []


def _check_no_deadlock(schedule: Schedule) -> None:
    """Run the lists with rendezvous p2p: a send and its receive complete together, at the heads."""
    lists, place = schedule.actions, schedule.stage_to_rank
    head = [0] * len(lists)
    progressed = True
    while progressed:
        progressed = False
        for rank, actions in enumerate(lists):
            while head[rank] < len(actions) and actions[head[rank]].is_compute:
                head[rank] += 1
                progressed = True
            if head[rank] == len(actions):
                continue
            action = actions[head[rank]]
            peer = place[action.stage + _PEER_OFFSET[action.kind]]
            if head[peer] < len(lists[peer]) and lists[peer][head[peer]] == action.matching():
                head[rank] += 1
                head[peer] += 1
                progressed = True
    blocked = [r for r in range(len(lists)) if head[r] < len(lists[r])]
    if not blocked:
        return
    # Each blocked rank waits on one peer: follow the waits until they close a cycle.
    chain, rank = [], blocked[0]
    while rank not in chain:
        chain.append(rank)
        action = lists[rank][head[rank]]
        rank = place[action.stage + _PEER_OFFSET[action.kind]]
    cycle = chain[chain.index(rank) :]
    waits = "; ".join(
        f"rank {r} position {head[r]} waits in {lists[r][head[r]]} for rank "
        f"{place[lists[r][head[r]].matching().stage]} to reach {lists[r][head[r]].matching()}"
        for r in cycle
    )
    raise ValueError(
        f"deadlock with blocking send/receive: {waits}. Order each rank's sends and receives so "
        "that matching pairs line up (e.g. as make_schedule does)"
    )
