"""Pipeline schedules as data: generation, text form, validator and simulator (no processes).

Exactness: all times below are small integers, so every simulated time is an exact float sum and
step times compare with ``==``. Bubble fractions are one float division of exact values, so they
are compared to the closed forms within 1e-12.
"""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from whale.ir import schedule as schedules_module
from whale.planner.schedules import simulator as simulator_module
from whale.ir.schedule_check import validate
from whale.ir.schedule import (
    SCHEDULE_NAMES,
    Action,
    ActionKind,
    Schedule,
    format_schedule,
    parse_schedule,
)
from whale.planner.schedules import flow_shop as flow_shop_module
from whale.planner.schedules import generate as generate_module
from whale.planner.schedules.flow_shop import compute_orders, flow_shop
from whale.planner.schedules.generate import make_schedule
from whale.planner.schedules.simulator import render_table, run_orders, simulate

EXACT = 1e-12  # one float division of exact integers


@st.composite
def any_schedule(draw: st.DrawFn) -> Schedule:
    """Every generator over 1..6 stages and 1..12 micro-batches (interleaved: its valid subset)."""
    name = draw(st.sampled_from(SCHEDULE_NAMES))
    if name == "interleaved_1f1b":
        ranks = draw(st.integers(1, 6))
        chunks = draw(st.integers(1, 6 // ranks))
        micro = ranks * draw(st.integers(1, 12 // ranks))
        return make_schedule(name, ranks * chunks, micro, num_ranks=ranks)
    return make_schedule(name, draw(st.integers(1, 6)), draw(st.integers(1, 12)))


stage_counts = st.integers(1, 6)
micro_counts = st.integers(1, 12)
small_times = st.integers(1, 9)


# --- generation, validation, simulation of everything generated ------------------------------


@settings(max_examples=150, deadline=None)
@given(any_schedule(), small_times, small_times)
def test_every_generated_schedule_is_valid_and_simulates(
    sched: Schedule, fwd: int, bwd: int
) -> None:
    validate(sched)
    result = simulate(sched, fwd, bwd, p2p_time=1)
    # Nothing is lost or counted twice: busy time is all the work of all stages.
    assert sum(result.per_rank_busy) == sched.num_stages * sched.num_micro_batch * (fwd + bwd)
    assert 0.0 <= result.bubble_fraction < 1.0
    assert all(idle >= 0 for idle in result.per_rank_idle)
    assert max(result.timeline[r][-1].end for r in range(sched.num_ranks)) == result.step_time
    # Rendezvous p2p only adds waits to the same lists.
    blocking = simulate(sched, fwd, bwd, p2p_time=1, blocking=True)
    assert blocking.step_time >= result.step_time


@settings(max_examples=60, deadline=None)
@given(any_schedule())
def test_text_form_round_trips(sched: Schedule) -> None:
    text = format_schedule(sched)
    assert parse_schedule(text) == sched
    # Without the header everything but the name is inferred from the lines.
    body = text.split("\n", 1)[1]
    assert parse_schedule(body, name=sched.name) == sched


@settings(max_examples=60, deadline=None)
@given(any_schedule(), st.data())
def test_validator_rejects_any_single_deletion(sched: Schedule, data: st.DataObject) -> None:
    rank = data.draw(st.sampled_from([r for r in range(sched.num_ranks) if sched.actions[r]]))
    position = data.draw(st.integers(0, len(sched.actions[rank]) - 1))
    actions = [list(a) for a in sched.actions]
    removed = actions[rank].pop(position)
    broken = Schedule(
        sched.name, sched.num_stages, sched.num_micro_batch, sched.stage_to_rank, actions
    )
    with pytest.raises(
        ValueError, match=str(removed) if removed.is_compute else "matching|missing"
    ):
        validate(broken)


@settings(max_examples=60, deadline=None)
@given(any_schedule(), st.data())
def test_validator_accepts_only_what_runs(sched: Schedule, data: st.DataObject) -> None:
    """After a random swap of neighbours, the schedule is rejected or still simulates to the end."""
    rank = data.draw(
        st.sampled_from([r for r in range(sched.num_ranks) if len(sched.actions[r]) > 1])
    )
    position = data.draw(st.integers(0, len(sched.actions[rank]) - 2))
    actions = [list(a) for a in sched.actions]
    row = actions[rank]
    row[position], row[position + 1] = row[position + 1], row[position]
    swapped = Schedule(
        sched.name, sched.num_stages, sched.num_micro_batch, sched.stage_to_rank, actions
    )
    try:
        validate(swapped)
    except ValueError:
        return
    simulate(swapped, 1, 2, blocking=True)


# --- the simulator's closed forms --------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(stage_counts, micro_counts, small_times, small_times)
def test_gpipe_bubble_is_exact(p: int, m: int, fwd: int, bwd: int) -> None:
    result = simulate(make_schedule("gpipe", p, m), fwd, bwd)
    assert result.step_time == (m + p - 1) * (fwd + bwd)
    assert result.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=EXACT)


@settings(max_examples=80, deadline=None)
@given(stage_counts, micro_counts, st.data())
def test_gpipe_with_uneven_stages_and_links_is_a_flow_shop(
    p: int, m: int, data: st.DataObject
) -> None:
    """Forwards then backwards pass the stages like jobs through a flow shop: exact makespan."""
    fwd = data.draw(st.lists(small_times, min_size=p, max_size=p))
    bwd = data.draw(st.lists(small_times, min_size=p, max_size=p))
    link = data.draw(st.integers(0, 3))
    result = simulate(make_schedule("gpipe", p, m), fwd, bwd, p2p_time=link)
    expected = sum(fwd) + sum(bwd) + 2 * (p - 1) * link + (m - 1) * (max(fwd) + max(bwd))
    assert result.step_time == expected


@settings(max_examples=80, deadline=None)
@given(stage_counts, micro_counts, small_times, small_times)
def test_1f1b_matches_gpipe_time_and_holds_fewer_activations(
    p: int, m: int, fwd: int, bwd: int
) -> None:
    gpipe = simulate(make_schedule("gpipe", p, m), fwd, bwd)
    one_f_one_b = simulate(make_schedule("1f1b", p, m), fwd, bwd)
    assert one_f_one_b.step_time == gpipe.step_time
    assert gpipe.peak_in_flight == (m,) * p
    assert one_f_one_b.peak_in_flight == tuple(min(p - rank, m) for rank in range(p))


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 4), small_times, small_times)
def test_interleaved_bubble(ranks: int, chunks: int, groups: int, fwd: int, bwd: int) -> None:
    """Megatron's (p-1)/(v*m+p-1); exact for equal virtual-stage times and free p2p, as checked
    here (times are per virtual stage, so a rank does v * m * (fwd + bwd) work either way)."""
    m = ranks * groups
    result = simulate(
        make_schedule("interleaved_1f1b", ranks * chunks, m, num_ranks=ranks), fwd, bwd
    )
    assert result.bubble_fraction == pytest.approx(
        (ranks - 1) / (chunks * m + ranks - 1), abs=EXACT
    )
    if ranks > 1 and chunks > 1:
        plain = simulate(make_schedule("1f1b", ranks, m), chunks * fwd, chunks * bwd)
        assert result.step_time < plain.step_time


def test_heterogeneous_times_per_stage() -> None:
    sched = make_schedule("1f1b", 3, 4)
    result = simulate(sched, [1, 3, 1], [2, 6, 2])
    # The slow middle stage is the bottleneck: busy 4 * 9 = 36, it never waits after stage 0's 0F0.
    assert result.per_rank_busy == (12.0, 36.0, 12.0)
    assert result.step_time == 1 + 36 + 2


def test_local_handoff_on_one_rank_has_no_p2p() -> None:
    sched = make_schedule("interleaved_1f1b", 3, 2, num_ranks=1)
    assert all(a.is_compute for a in sched.actions[0])
    assert simulate(sched, 1, 1).bubble_fraction == 0.0


# --- one event loop: the simulator's core ------------------------------------------------------


def test_every_prediction_runs_in_the_simulators_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """Placement, the search's flow shop and the simulator all advance clocks in run_orders (the
    flow shop once per shape, to order its computes; its times are checked float for float
    against run_orders below)."""
    callers = []
    flow_shop_module._program.cache_clear()

    def spy(*args, **kwargs):
        callers.append(kwargs.get("p2p_listed", False))
        return run_orders(*args, **kwargs)

    for module in (generate_module, flow_shop_module, simulator_module):
        monkeypatch.setattr(module, "run_orders", spy)
    sched = make_schedule("1f1b", 3, 4)
    assert callers == [False]
    assert flow_shop("1f1b", 3, 4, [1.0] * 3, [2.0] * 3, [0.0] * 2).step_time == 18.0
    assert simulate(sched, 1, 2, blocking=True).step_time == 18.0
    assert callers == [False, False, True]


@settings(max_examples=80, deadline=None)
@given(any_schedule(), st.data())
def test_flow_shop_equals_the_simulator_float_for_float(
    sched: Schedule, data: st.DataObject
) -> None:
    """Generated lists send each tensor right after the compute that made it, so the compute
    orders alone (what the flow shop and the placement run) give the simulator's times."""
    s, m, ranks = sched.num_stages, sched.num_micro_batch, sched.num_ranks
    times = st.floats(0, 5)
    fwd, bwd = (data.draw(st.lists(times, min_size=s, max_size=s)) for _ in range(2))
    link = data.draw(st.lists(times, min_size=s - 1, max_size=s - 1))
    ref = simulate(sched, fwd, bwd, link)
    fast = flow_shop(sched.name, ranks, m, fwd, bwd, link)
    finish = tuple(max(t.end for t in row if t.action.is_compute) for row in ref.timeline)
    assert (fast.step_time, fast.finish, fast.busy) == (ref.step_time, finish, ref.per_rank_busy)
    orders = compute_orders(sched.name, s, m, ranks)
    starts = run_orders(orders, sched.stage_to_rank, m, fwd, bwd, link).start
    assert [list(row) for row in starts] == [
        [t.start for t in row if t.action.is_compute] for row in ref.timeline
    ]


# --- text form and printer ---------------------------------------------------------------------


def test_action_codes() -> None:
    assert Action.from_str("0F3") == Action(ActionKind.FORWARD, 0, 3)
    recv = Action.from_str("1RA3")
    assert (recv.kind, recv.stage, recv.micro_batch, recv.peer_stage) == (
        ActionKind.RECV_ACT,
        1,
        3,
        0,
    )
    assert recv.matching() == Action("SA", 0, 3)
    assert Action("SG", 2, 0).peer_stage == 1 and Action("RG", 2, 0).peer_stage == 3
    assert [str(a) for a in (Action("B", 12, 10), Action("SA", 0, 1))] == ["12B10", "0SA1"]


def test_docstring_examples() -> None:
    for module in (schedules_module, generate_module, simulator_module):
        failed, _ = doctest.testmod(
            module, extraglobs={"make_schedule": make_schedule}, report=True
        )
        assert failed == 0


def test_render_table_shows_longer_actions() -> None:
    sched = make_schedule("gpipe", 2, 2)
    table = render_table(sched, simulate(sched, 1, 2))
    assert "rank 1  .   1F0 1F1 1B0 -   1B1 -   .   ." in table.splitlines()
    with pytest.raises(ValueError, match="the result has 2 ranks, the schedule 3"):
        render_table(make_schedule("gpipe", 3, 2), simulate(sched, 1, 2))


@settings(max_examples=40, deadline=None)
@given(any_schedule(), small_times, small_times, st.sampled_from([0, 0.25, 1.5]))
def test_render_table_draws_every_compute_once(
    sched: Schedule, fwd: int, bwd: int, link: float
) -> None:
    table = render_table(sched, simulate(sched, fwd, bwd, p2p_time=link))
    cells = [cell for line in table.splitlines()[2:] for cell in line.split()[2:]]
    computes = sorted(str(a) for rank in sched.actions for a in rank if a.is_compute)
    assert sorted(c for c in cells if c not in ("-", ".")) == computes


def test_parse_errors() -> None:
    with pytest.raises(
        ValueError, match=r"line 1 \(rank 0, position 1\): cannot read action '0X1'"
    ):
        parse_schedule("rank 0: 0F0 0X1")
    with pytest.raises(ValueError, match="line 2: expected the line of rank 1, got rank 2"):
        parse_schedule("rank 0: 0F0 0B0\nrank 2: 1F0")
    with pytest.raises(ValueError, match="contradicts the header"):
        parse_schedule(format_schedule(make_schedule("gpipe", 2, 2)), num_micro_batch=3)
    with pytest.raises(ValueError, match="stage 0 has actions on rank 0 and rank 1"):
        parse_schedule("rank 0: 0F0\nrank 1: 0B0")


# --- validator on hand-broken schedules ----------------------------------------------------------

GOOD = """\
schedule 1f1b num_stages=2 num_micro_batch=3 stage_to_rank=0,1
rank 0: 0F0 0SA0 0F1 0SA1 0RG0 0B0 0F2 0SA2 0RG1 0B1 0RG2 0B2
rank 1: 1RA0 1F0 1RA1 1B0 1SG0 1F1 1B1 1RA2 1SG1 1F2 1B2 1SG2
"""


def broken(old: str, new: str) -> Schedule:
    assert old in GOOD
    return parse_schedule(GOOD.replace(old, new, 1))


def test_good_hand_written_schedule() -> None:
    assert parse_schedule(GOOD) == make_schedule("1f1b", 2, 3)


def test_a_late_send_delays_its_receiver() -> None:
    """The simulator sends where the list says, not when the tensor is made."""
    late = broken("0SA0 0F1", "0F1 0SA0")
    on_time, delayed = simulate(parse_schedule(GOOD), 1, 2), simulate(late, 1, 2)
    assert (on_time.timeline[1][1].start, on_time.step_time) == (1.0, 12.0)
    assert str(delayed.timeline[1][1].action) == "1F0"
    assert (delayed.timeline[1][1].start, delayed.step_time) == (2.0, 13.0)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        # a missing backward
        ("1F2 1B2", "1F2", r"1B2 \(backward of stage 1, micro-batch 2\) is missing from rank 1"),
        # a send with no receive
        (
            "1RA2 ",
            "",
            r"rank 0 position 7: 0SA2 \(send of the activation .*\) has no matching 1RA2 on rank 1",
        ),
        # both ranks send first: each blocks until the other receives
        (
            "1RA1 1B0 1SG0",
            "1B0 1SG0 1RA1",
            r"deadlock .*rank 0 position 3 waits in 0SA1 for rank 1 to reach 1RA1; "
            r"rank 1 position 3 waits in 1SG0 for rank 0 to reach 0RG0",
        ),
        # a forward before its input arrives
        ("1RA0 1F0", "1F0 1RA0", r"rank 1 position 0: 1F0 .* comes before 1RA0 .* at position 1"),
        # a backward before its forward
        (
            "0F0 0SA0 0F1 0SA1 0RG0 0B0",
            "0B0 0F0 0SA0 0F1 0SA1 0RG0",
            r"rank 0 position 0: 0B0 .* comes before 0F0 .* at position 1",
        ),
        (
            "0F1 0SA1",
            "0F1 0F1 0SA1",
            "rank 0 position 3: 0F1 .* appears twice; it is also at rank 0 position 2",
        ),
        ("0RG0 0B0 0F2", "0F2", "0B0 .* is missing from rank 0"),
        ("1B2 1SG2", "1SG2 1B2", r"rank 1 position 10: 1SG2 .* comes before 1B2"),
        ("0F0 0SA0", "0F0 0SA0 1F0", "is on rank 0, but stage 1 runs on rank 1"),
        ("0F0 0SA0", "0F0 0SA0 0F7", "is for micro-batch 7, but there are 3"),
        ("rank 1: ", "rank 1: 1SA0 ", "stage 1 is the last stage, there is no stage 2"),
    ],
)
def test_validator_names_what_is_wrong(old: str, new: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate(broken(old, new))


def test_validator_rejects_p2p_between_stages_on_one_rank() -> None:
    sched = Schedule(
        "custom", 2, 1, (0, 0), [[Action("F", 0, 0), Action("SA", 0, 0), Action("RA", 1, 0)]]
    )
    with pytest.raises(
        ValueError, match="stages 0 and 1 are both on rank 0, which hands the tensor over locally"
    ):
        validate(sched)


def test_validator_rejects_a_rank_without_stages() -> None:
    with pytest.raises(ValueError, match=r"ranks \[1\] hold no stage"):
        validate(Schedule("custom", 1, 1, (0,), [[Action("F", 0, 0), Action("B", 0, 0)], []]))


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        (
            ("pipedream", 2, 4),
            {},
            ValueError,
            r"unknown pipeline schedule 'pipedream'; "
            r"known schedules: \['gpipe', '1f1b', 'interleaved_1f1b'\]",
        ),
        (("gpipe", 2, 0), {}, ValueError, r"num_micro_batch=0\) must be an int >= 1"),
        (("1f1b", 0, 4), {}, ValueError, r"num_stages=0\) must be an int >= 1"),
        (
            ("1f1b", 4, 4),
            {"num_ranks": 2},
            ValueError,
            "num_stages=4 and num_ranks=2; use 'interleaved_1f1b'",
        ),
        (("interleaved_1f1b", 4, 4), {}, ValueError, "needs num_ranks"),
        (
            ("interleaved_1f1b", 6, 4),
            {"num_ranks": 4},
            ValueError,
            "num_stages=6 is not a multiple of num_ranks=4",
        ),
        (
            ("interleaved_1f1b", 8, 6),
            {"num_ranks": 4},
            ValueError,
            "num_micro_batch=6 is not a multiple of num_ranks=4.*use e.g. 8",
        ),
    ],
)
def test_make_schedule_errors(args: tuple, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        make_schedule(*args, **kwargs)


def test_small_micro_batch_counts_work() -> None:
    for name in ("gpipe", "1f1b"):
        for m in (1, 2):
            validate(make_schedule(name, 5, m))


def test_action_and_schedule_errors() -> None:
    with pytest.raises(ValueError, match=r"Action\(kind='X'\) is unknown"):
        Action("X", 0, 0)
    with pytest.raises(ValueError, match=r"Action\(micro_batch=-1\) must be an int >= 0"):
        Action("F", 0, -1)
    with pytest.raises(ValueError, match="stage 0 is the first stage"):
        Action("RA", 0, 0)
    with pytest.raises(ValueError, match="its peer is stage 2, not peer_stage=3"):
        Action("SA", 1, 0, peer_stage=3)
    with pytest.raises(ValueError, match="has no peer"):
        Action("F", 1, 0, peer_stage=2)
    with pytest.raises(ValueError, match="stage_to_rank has 1 entries for num_stages=2"):
        Schedule("custom", 2, 1, (0,), [[]])
    with pytest.raises(
        ValueError, match=r"stage 1 is on rank 5, but there are action lists for 2 ranks"
    ):
        Schedule("custom", 2, 1, (0, 5), [[], []])
    with pytest.raises(TypeError, match="rank 0 position 0 holds '0F0', not an Action"):
        Schedule("custom", 1, 1, (0,), [["0F0"]])


def test_simulate_errors() -> None:
    sched = make_schedule("1f1b", 3, 4)
    with pytest.raises(
        ValueError, match=r"forward_time=...\) has 2 entries; give one per stage \(3\)"
    ):
        simulate(sched, [1, 2], 1)
    with pytest.raises(ValueError, match=r"backward_time=...\): entry 1 is -1"):
        simulate(sched, 1, [1, -1, 1])
    with pytest.raises(
        ValueError,
        match=r"p2p_time=...\) has 3 entries; give one per boundary between stages \(2\)",
    ):
        simulate(sched, 1, 1, p2p_time=[0, 0, 0])
    with pytest.raises(TypeError, match="forward_time"):
        simulate(sched, "1", 1)
