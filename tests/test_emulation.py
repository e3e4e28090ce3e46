"""WHALE_EMULATE_SLOWDOWN: the spec's grammar, and a rank that idles as a slower device would.

The emulated pipeline must still equal the local model (tolerances: tests/equivalence.py); the
slowed rank's compute must last about FACTOR times as long (checked loosely, >= 2x for 3x, on
a shared machine) while its CPU time does not grow alike: it sleeps rather than computes.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.distributed as dist

import whale as wh
from tests.equivalence import assert_equivalent
from whale.ir.emulation import (
    ENV_VAR,
    parse_slowdown,
    slowdown_factor,
    slowdown_from_env,
)
from whale.runtime.emulate import Stretch, check_ranks
from whale.runtime.process_group import init


def test_parse_and_factor_by_step():
    spec = parse_slowdown("1:2, 0:1.5@10,1:4@3")
    assert spec == {0: ((1.5, 10),), 1: ((2.0, 0), (4.0, 3))}
    assert [slowdown_factor(spec, 1, s) for s in (0, 2, 3, 9)] == [2.0, 2.0, 4.0, 4.0]
    assert [slowdown_factor(spec, 0, s) for s in (9, 10)] == [1.0, 1.5]
    assert slowdown_factor(spec, 7, 0) == 1.0
    assert parse_slowdown("") == {} and parse_slowdown("  ") == {}
    assert slowdown_from_env({ENV_VAR: "0:3"}) == {0: ((3.0, 0),)}
    assert slowdown_from_env({}) == {}


@pytest.mark.parametrize(
    "text, match",
    [
        ("1", r"entry '1' has no ':'"),
        ("x:2", r"entry 'x:2' has rank 'x', not an int >= 0"),
        ("-1:2", r"rank '-1', not an int >= 0"),
        ("1:fast", r"factor 'fast', not a number"),
        ("1:0", r"factor '0': a factor is a finite positive number"),
        ("1:-2", r"factor '-2': a factor is a finite positive number"),
        ("1:inf", r"factor 'inf': a factor is a finite positive number"),
        ("1:nan", r"factor 'nan'"),
        ("1:0.5", r"factor 0.5 < 1: idling can only make a rank slower"),
        ("1:2@later", r"step 'later', not an int >= 0"),
        ("1:2,,0:3", r"has an empty entry"),
        ("1:2,1:3", r"gives rank 1 twice at step 0"),
    ],
)
def test_bad_specs_name_the_entry_and_show_the_grammar(text, match):
    with pytest.raises(ValueError, match=match) as err:
        parse_slowdown(text)
    assert ENV_VAR in str(err.value) and "RANK:FACTOR[@STEP]" in str(err.value)


def test_bad_spec_fails_before_any_process_group(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1:slow")
    was = dist.is_initialized()
    with pytest.raises(ValueError, match="factor 'slow', not a number"):
        init("gloo")
    assert dist.is_initialized() == was
    monkeypatch.setenv(ENV_VAR, "3:2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        ValueError, match=r"names rank\(s\) \[3\] but the world has 2 ranks"
    ):
        init("gloo")
    check_ranks({1: ((2.0, 0),)}, 2)  # a rank of the world is fine


def test_bad_spec_fails_when_the_program_is_made(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "0:2@")
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="step '', not an int >= 0"):
        wh.parallelize(
            model,
            loss_fn=torch.nn.functional.mse_loss,
            example_inputs=(torch.randn(4, 4),),
        )


def test_stretch_idles_for_the_factor():
    stretch = Stretch(3.0)
    began, cpu = time.perf_counter(), time.thread_time()
    stretch.begin()
    while time.perf_counter() - began < 0.02:  # 20 ms of compute
        pass
    stretch.end()
    wall, used = time.perf_counter() - began, time.thread_time() - cpu
    assert wall >= 3 * 0.02 * 0.95
    assert used < 0.045, "the stretch sleeps, it does not burn the CPU"
    Stretch(1.0).end()  # factor 1: nothing to do, nothing begun


def test_pipeline_rank_slowed_from_a_step_still_equals_the_local_model(world2):
    # Rank 1 (the last stage) runs 3x slower from step 2 on; steps 0 and 1 run as they are.
    outs = world2.run("tests.pp_cases:emulated_slowdown", "1:3@2", 4)
    for out in outs:
        assert_equivalent(out, names=out["params"].keys())
    slow = outs[1]
    normal, slowed = min(slow["compute"][:2]), min(slow["compute"][2:])
    assert slowed >= 2.0 * normal, slow["compute"]
    # The time is slept, not computed: the CPU time does not triple with it.
    assert min(slow["cpu"][2:]) < 2.0 * max(slow["cpu"][:2]), slow["cpu"]
    # program.timeline() shows the last (slowed) step as rank 1 recorded it.
    assert slow["timeline_compute"][1] == pytest.approx(slow["compute"][-1], rel=1e-6)
    # Rank 0 is not slowed; its compute stays near its own (at most it waits, outside compute).
    fast = outs[0]
    assert min(fast["compute"][2:]) < 2.0 * max(fast["compute"][:2]), fast["compute"]


def test_data_parallel_backward_stretched(world2):
    # Rank 1 slowed from step 3: its backwards (gradient buckets paced alike) last ~3x. Medians
    # of 3 steps on each side (step 0 warms up), and 1.7x, not 3x: other processes on a shared
    # host stretch single steps of either side by up to ~1.7x.
    outs = world2.run("tests.dp_cases:timeline_case", "1:3@3", 6, 128)
    backward = outs[1]["backward"]
    assert statistics.median(backward[3:]) >= 1.7 * statistics.median(backward[:3]), backward


def test_optimizer_step_over_the_programs_parameters_is_stretched(world2):
    # A slow device also updates its weights slowly (the cost model prices the optimizer step at
    # the device's speed): rank 1, 3x slower from step 2, stretches the AdamW step over the
    # program's parameters, and only that one. 1.7x, not 3x, on medians: other processes on a
    # shared host stretch single steps of either side.
    outs = world2.run("tests.auto_cases:emulated_optimizer", "1:3@3", 8)
    slow, fast = outs[1], outs[0]

    def ratio(out, steps) -> float:  # wall time of the program's AdamW step over the copies' one
        return statistics.median(out["ours"][k][0] / out["other"][k][0] for k in steps)

    # Steps 1-2 against 3-7 (step 0 makes the AdamW states): the copies' step, run right after
    # in the same step, sees the same load; were it stretched too, the ratio would not grow.
    assert ratio(slow, range(3, 8)) >= 1.7 * ratio(slow, range(1, 3)), slow
    # Slept, not computed: the CPU time does not triple.
    assert statistics.median(c for _, c in slow["ours"][3:]) < 2.0 * max(c for _, c in slow["ours"][1:3]), slow["ours"]
    # Only the emulated rank hooks torch.optim (rank 0's steps cannot be stretched), and the
    # hooks go with the program.
    assert slow["hooks_while"] == 1 and fast["hooks_while"] == 0
    assert slow["hooks_after"] == 0 and fast["hooks_after"] == 0
