"""The search's time floor is below the simulated replica time, so the moves it skips lose nothing.

:func:`~.time_floor.replica_floor` must be below the simulated time for any stage times, p2p,
all-reduce and optimizer times (the exact climbs skip a move whose floor reaches the best move
found); ``1e-9`` relative is float noise. The search's results with the floor equal those
without it (``tests/test_search_deep.py``, the golden plans of ``tests/test_cli.py``).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from whale.planner.schedules.flow_shop import compute_orders, flow_shop
from whale.planner.search.time_floor import replica_floor


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved_1f1b"])
def test_every_schedule_begins_and_ends_a_position_on_its_first_stage(schedule):
    # The floors rest on this: position r first runs stage r's forward of micro-batch 0 and
    # last runs a backward of stage r.
    for p in range(1, 7):
        for v in (1, 2, 3) if schedule == "interleaved_1f1b" else (1,):
            for m in range(1, 20):
                if schedule == "interleaved_1f1b" and m % p:
                    continue
                orders = compute_orders(schedule, p * v, m, p)
                for r, order in enumerate(orders):
                    assert order[0] == (True, r, 0)
                    assert order[-1][:2] == (False, r)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["gpipe", "1f1b", "interleaved_1f1b"]),
    st.integers(1, 6),
    st.integers(1, 3),
    st.integers(1, 5),
    st.randoms(use_true_random=False),
)
def test_replica_floor_is_below_the_simulated_time(schedule, p, v, k, rnd):
    v = v if schedule == "interleaved_1f1b" else 1
    m = k * p if schedule == "interleaved_1f1b" else k
    s = p * v
    forward = [rnd.uniform(0.1, 3.0) for _ in range(s)]
    backward = [f * rnd.uniform(1.0, 3.0) for f in forward]
    p2p = [rnd.choice([0.0, rnd.uniform(0, 1.0)]) for _ in range(s - 1)]
    opt = [rnd.uniform(0, 2.0) for _ in range(p)]
    sync = [rnd.choice([0.0, rnd.uniform(0, 20.0)]) for _ in range(p)]
    run = flow_shop(schedule, p, m, forward, backward, p2p)
    exact = max(run.finish[r] + max(0.0, sync[r] - run.last_compute[r]) + opt[r] for r in range(p))
    floor = replica_floor(forward, backward, p2p, opt, sync, m, p)
    assert floor <= exact * (1 + 1e-9)
    if schedule == "1f1b" and not any(p2p) and not any(opt) and not any(sync) and len(set(forward)) == 1:
        assert floor == pytest.approx(exact)  # balanced and free: the floor is the step
