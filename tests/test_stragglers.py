"""The expected wait for the slowest replica (``whale.planner.cost.stragglers``) and where the
cost model, the profiles and the measurements carry it.

The expected maximum is checked against sampled steps (numpy, fixed seed: 200,000 steps, or
20,000 of a thousand replicas, give the mean of the largest to 0.002-0.003 standard deviations
or better, and the tolerance is 0.01); the
cost model's wait against the closed form for two equal replicas, E[max] - mean = sigma /
sqrt(pi), exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from whale.ir.cluster_spec import parse_cluster
from whale.ir.device_catalog import get_profile, load_profiles
from whale.ir.devices import DeviceProfile
from whale.planner.cost.candidate import Candidate, RankLayout
from whale.planner.cost.layers import Layer, ModelProfile
from whale.planner.cost.predict import CostModel
from whale.planner.cost.stragglers import expected_max, straggler_wait


@pytest.mark.parametrize(
    "groups",
    [
        [(1.0, 0.1, 2)],
        [(1.0, 0.1, 1), (1.1, 0.2, 1)],
        [(1.0, 0.1, 8)],
        [(1.0, 0.1, 1000)],
        [(1.0, 0.1, 3), (0.9, 0.3, 5)],
        [(1.0, 0.1, 500), (1.05, 0.05, 500)],
    ],
)
def test_the_expected_largest_time_matches_sampled_steps(groups) -> None:
    rng = np.random.default_rng(0)
    count = min(200_000, 20_000_000 // sum(n for _, _, n in groups))  # at most 20M draws (160 MB)
    steps = np.concatenate([rng.normal(m, s, size=(count, n)) for m, s, n in groups], axis=1)
    widest = max(s for _, s, _ in groups)
    assert expected_max(groups) == pytest.approx(steps.max(axis=1).mean(), abs=0.01 * widest)


def test_steady_devices_or_one_replica_wait_nothing() -> None:
    assert straggler_wait([(1.0, 0.0, 8), (1.2, 0.0, 3)]) == 0.0
    assert straggler_wait([(1.0, 0.3, 1)]) == 0.0
    assert straggler_wait([]) == 0.0
    # One replica far slower than the rest: it is the last one almost always.
    assert straggler_wait([(2.0, 0.01, 1), (1.0, 0.01, 7)]) == pytest.approx(0.0, abs=1e-9)
    assert straggler_wait([(1.0, 0.1, 2)]) == pytest.approx(0.1 / math.sqrt(math.pi), rel=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.1, 10.0), st.floats(0.0, 0.5), st.integers(1, 64)), min_size=1, max_size=4
    )
)
def test_the_wait_is_bounded_and_grows_with_replicas(groups) -> None:
    # E[max] lies between the largest mean and that plus the largest of all the replicas as
    # if every one had the widest spread (Clark's combination of groups may pass that by its
    # error, 0.01 of a spread at most); one more replica never shortens it.
    top, widest = max(m for m, _, _ in groups), max(s for _, s, _ in groups)
    count = sum(n for _, _, n in groups)
    found = expected_max(groups)
    assert top - 1e-9 <= found <= top + widest * (expected_max([(0.0, 1.0, count)]) + 0.01) + 1e-9
    more = [*groups[:-1], (groups[-1][0], groups[-1][1], groups[-1][2] + 1)]
    assert expected_max(more) >= found - 1e-9


def _costs(jitter: float | None) -> CostModel:
    layers = [Layer.simple(f"l{i}", flops=1e9, param_bytes=4 << 20, act_bytes=1e5, hidden_bytes=1e4) for i in range(8)]
    device = dataclasses.replace(get_profile("A100-80GB"), jitter=jitter)
    return CostModel(ModelProfile.from_layers(layers), parse_cluster("4xA100-80GB", profiles=[device]))


@pytest.mark.parametrize(
    ("layout", "stages", "cuts", "rows"),
    [
        (RankLayout(1, (((0,),), ((1,),), ((2,),), ((3,),))), 1, (), (4, 4, 4, 4)),
        (RankLayout(1, (((0,), (1,)), ((2,), (3,)))), 2, (4,), (8, 8)),
        (RankLayout(2, (((0, 1), (2, 3)),)), 2, (3,), (16,)),
    ],
)
def test_replicas_of_varying_devices_wait_for_the_slowest_and_the_timeline_shows_it(layout, stages, cuts, rows) -> None:
    candidate = Candidate(layout, stages, "1f1b", 4, cuts, rows)
    steady, varying = _costs(None).predict(candidate), _costs(0.1).predict(candidate)
    replicas = len(layout.pipelines)
    if replicas == 1:  # no replica to wait for (a tensor-parallel group waits within: below)
        assert varying.straggler_wait == 0.0
        assert (varying == steady) == (layout.tensor_parallel == 1)
        return
    assert steady.straggler_wait == 0.0
    # Equal replicas: E[max of k] - mean = spread x busiest position x E[max of k standard normals].
    spread = 0.1 * max(steady.rank_busy)
    assert varying.straggler_wait == pytest.approx(spread * expected_max([(0.0, 1.0, replicas)]), rel=1e-9)
    assert varying.step_time == pytest.approx(max(varying.replica_times) + varying.straggler_wait, rel=1e-12)
    assert varying.replica_times == steady.replica_times
    timeline = _costs(0.1).timeline(candidate)
    assert timeline.step_time == pytest.approx(varying.step_time, rel=1e-12)
    assert _costs(0.1).timeline(candidate, varying).events == timeline.events  # the wait read from the prediction given
    waits = [e for e in timeline.events if e.name == "wait for the slowest replica"]
    assert len(waits) == 4 and all(e.duration == pytest.approx(varying.straggler_wait) for e in waits)


def test_a_tensor_parallel_group_waits_for_its_slowest_member_at_each_all_reduce() -> None:
    # Per all-reduce, E[max of 2] - mean = spread x segment / sqrt(pi); with spreads in
    # proportion to time, the segments' waits add up to spread x compute / sqrt(pi). The
    # all-reduces themselves cost the same; one rank alone waits for nothing.
    steady, varying = _costs(None), _costs(0.1)
    a100 = steady.device_of[0]
    compute = steady._split(a100, 8.0, 0.5, 2, 7)
    comm = steady.group_times((0, 1), (0.5, 0.5), 8.0, 2, 7)[0] - compute[0]
    assert comm > 0
    got = varying.group_times((0, 1), (0.5, 0.5), 8.0, 2, 7)
    want = tuple(c * (1 + 0.1 / math.sqrt(math.pi)) + comm for c in compute)
    assert got == pytest.approx(want, rel=1e-9)
    assert varying.group_times((0,), (1.0,), 8.0, 2, 7) == steady.group_times((0,), (1.0,), 8.0, 2, 7)
    four = varying.group_times((0, 1, 2, 3), (0.25,) * 4, 8.0, 2, 7)[0]
    alone = steady._split(a100, 8.0, 0.25, 2, 7)[0]
    comm4 = steady.group_times((0, 1, 2, 3), (0.25,) * 4, 8.0, 2, 7)[0] - alone
    assert four == pytest.approx(alone * (1 + 0.1 * expected_max([(0.0, 1.0, 4)])) + comm4, rel=1e-9)


def test_jitter_round_trips_in_a_profile_file_and_bad_values_name_the_field(tmp_path) -> None:
    base = {"name": "Gadget", "memory_bytes": 1 << 30, "peak_flops": {"fp32": 1e12}, "memory_bandwidth": 1e11,
            "intra_link": "pcie4", "source": "measured by hand"}  # fmt: skip
    profile = DeviceProfile.from_dict({**base, "jitter": 0.07})
    assert profile.jitter == 0.07 and DeviceProfile.from_dict(profile.to_dict()) == profile
    assert "jitter" not in DeviceProfile.from_dict(base).to_dict()  # a steady device's file is as before
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"version": 1, "devices": [{**base, "jitter": 0.07}]}))
    assert load_profiles(path)["Gadget"].jitter == 0.07
    for bad in (-0.1, 1.0, True, "0.1"):
        with pytest.raises(ValueError, match=r"jitter must be a spread in \[0, 1\)"):
            DeviceProfile.from_dict({**base, "jitter": bad})


def test_doctests() -> None:
    import doctest

    from whale.ir import profile_fields
    from whale.planner.cost import stragglers

    assert doctest.testmod(stragglers).failed == 0
    assert doctest.testmod(profile_fields).failed == 0


def test_explain_names_the_wait_for_the_slowest_replica(tmp_path, capsys) -> None:
    # Two data-parallel replicas of a device that varies 10% from step to step: --explain says
    # how long the step waits for the later one; a steady device's explanation has no such line.
    import os

    from whale import cli

    gpt = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "gpt.py")
    base = {"name": "Gadget", "memory_bytes": 64 << 30, "peak_flops": {"fp32": 1e13}, "memory_bandwidth": 1e12,
            "intra_link": "pcie4", "source": "measured by hand"}  # fmt: skip
    said = {}
    for jitter in (None, 0.1):
        path = tmp_path / f"{jitter}.json"
        path.write_text(json.dumps({"version": 1, "devices": [{**base, **({"jitter": jitter} if jitter else {})}]}))
        code = cli.main(["plan", gpt, "--cluster", "2xGadget", "--profiles", str(path), "--pipeline-degree", "1",
                         "--no-tensor-parallel", "--explain"])  # fmt: skip
        out, err = capsys.readouterr()
        assert code == 0, err
        said[jitter] = out
    assert "waiting for the slowest of 2 replicas" in said[0.1]
    assert "device times vary up to 10% from step to step" in said[0.1]
    assert "waiting for the slowest" not in said[None]
