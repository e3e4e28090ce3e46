"""``Config(cluster="auto")``: the ranks measure themselves at ``parallelize``, exchange what they
found, and run the plan for that cluster.

Equivalence (tests/equivalence.py tolerances): uneven rows change only the order of the fp32
additions, as for ``row_weights`` (loss rtol 1e-6; gradients rtol 1e-4, atol 1e-6; parameters
after one AdamW step 2e-6 on entries with ordinary gradients).

Rows: rank 1 is emulated 2x slower. Both ranks measure at once on a shared host: on a quiet
host the two ranks' raw rates differ by 0.94-1.24x (30 runs), so the measured speed ratio is
accepted between 1.5 and 2.7 (even rows, what a measurement that missed the emulation gives, are
1.0; an emulation counted twice gives 4). A loaded host can make one core slower for the whole
measurement (CI once read 3.5x: rank 1's core ran 1.75x slower than rank 0's): such a run is a
true reading of that host, not of the emulation, so :func:`_measured` runs the case again, up to
:data:`ATTEMPTS` runs in all, and fails with every ratio it saw when none is in the band (a wrong
factor lands outside it every time).
The rows run are those that minimise the cost model's step time on the measured cluster
(tests/test_cluster_rows_cost.py checks that function): at least the speed share on rank 0,
more where fixed per-step costs, which the slow rank pays twice over, weigh.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import types

import pytest
import torch

import whale as wh
from tests.equivalence import assert_equivalent
from whale.ir.cluster_spec import parse_cluster
from whale.ir.device_catalog import get_profile, save_profiles
from whale.ir.devices import CPU_PROFILE
from whale.ir.plan import Plan
from whale.planner.annotated.cluster_rows import replica_speeds, rows_on_cluster
from whale.planner.measure import slowed
from whale.planner.self_profile import (
    SAME_CLASS,
    RankReport,
    cluster_from_reports,
    rank_report,
)

CASES = "tests.auto_cases"


ATTEMPTS = 3


def _share(rows) -> float:
    return rows[0] / sum(rows)


def _ratio(outs) -> float:
    speeds = outs[0]["speeds"]
    return speeds[0] / speeds[1]


def _within(run, reading, low: float, high: float):
    """``run()`` until ``reading(result)`` (what was measured) is in ``[low, high]``, at most
    :data:`ATTEMPTS` runs (see the module's docstring); the accepted result."""
    seen = []
    for _ in range(ATTEMPTS):
        result = run()
        seen.append(reading(result))
        if low <= seen[-1] <= high:
            return result
    pytest.fail(f"the measured reading was outside [{low}, {high}] in all {ATTEMPTS} runs: {seen}")


def _measured(world2, reading, low: float, high: float, *args, **kwargs) -> list:
    """:func:`_within` of ``world2.run(*args, **kwargs)``: every rank's output."""
    return _within(lambda: world2.run(*args, **kwargs), reading, low, high)


def test_rank_twice_as_slow_gets_the_cost_models_rows_and_equals_the_local_model(world2, tmp_path):
    saved = str(tmp_path / "measured.json")
    # The emulated 2x, measured (see the module's docstring).
    outs = _measured(world2, _ratio, 1.5, 2.7, f"{CASES}:gpt_auto", "1:2", 24, save_to=saved)
    for out in outs:
        assert_equivalent(out)
        assert out["rows"] == outs[0]["rows"], "every rank plans for the same cluster"
        assert out["devices"] == outs[0]["devices"]
    # Rows minimise the cost model's step time on the measured cluster: this small GPT's steps
    # are mostly per-operation costs, which the slow rank also pays twice over, so rank 0 takes
    # more than its speed share (2/3 at 2x).
    assert outs[0]["rows"] == outs[0]["cost_rows"], outs[0]
    assert outs[0]["rows"][0] >= outs[0]["speed_rows"][0] and _share(outs[0]["speed_rows"]) >= 0.55, outs[0]
    assert outs[0]["devices"][0] == "CPU" and outs[0]["devices"][1].startswith("CPU-slow"), outs[0]["devices"]
    # Rank 0 prints the plan it runs, once; rank 1 prints nothing.
    assert "whale: running the plan for the measured cluster" in outs[0]["printed"]
    assert outs[0]["printed"].count("whale: running") == 1 and outs[1]["printed"] == ""
    # Measured once, saved, run again as written (no measurement, no emulation): same rows.
    again = world2.run(f"{CASES}:gpt_run", None, 24, plan=saved)
    for out in again:
        assert_equivalent(out)
        assert out["rows"] == outs[0]["rows"] and out["plan_json"] == outs[0]["plan_json"]


def test_transformers_model_data_parallel_rows_by_the_cost_model(world2):
    # Llama of tests/hf_models.py (captured with torch.export), data parallel on the measured
    # cluster: the cost model's rows, and the result equals the local model.
    pytest.importorskip("transformers")
    outs = _measured(world2, _ratio, 1.5, 2.7, f"{CASES}:hf_auto", "llama", "1:2", 12, cluster="auto", quiet=True)
    for out in outs:
        assert_equivalent(out, names=out["params"].keys())
        assert out["rows"] == outs[0]["rows"]
    assert outs[0]["stages"] == 1 and outs[0]["rows"] == outs[0]["cost_rows"], outs[0]
    assert outs[0]["rows"][0] >= outs[0]["speed_rows"][0] > 6, outs[0]


def test_transformers_model_auto_parallel_on_the_measured_cluster(world2):
    # GPT-2 searched (auto_parallel) on the measured cluster; quiet: nothing printed.
    pytest.importorskip("transformers")
    outs = _measured(world2, _ratio, 1.5, 2.7, f"{CASES}:hf_auto", "gpt2", "1:2", 12, cluster="auto",
                     auto_parallel=True, quiet=True)  # fmt: skip
    for out in outs:
        assert_equivalent(out, names=out["params"].keys())
        assert out["printed"] == ""
        assert out["plan_json"] == outs[0]["plan_json"]
    if outs[0]["stages"] == 1:
        # Data parallel: the fast rank takes at least its speed share (which is over half), and
        # more where the slow rank also pays its measured per-step fixed costs slowly: the
        # search prices rows with the cost model, so on this small model up to (11, 1).
        assert outs[0]["rows"][0] >= outs[0]["speed_rows"][0] and _share(outs[0]["speed_rows"]) >= 0.55, outs[0]
    assert outs[0]["devices"][1].startswith("CPU-slow")


def test_split_shards_follow_the_measured_speed(world2):
    # Rank 1 emulated 2x slower: the heads, columns and vocabulary rows of the split parts are
    # cut by measured speed (2:1 up to whole heads), and the result equals the local model.
    def share(outs) -> float:
        fast, slow = outs[0]["shard_sizes"]["blocks.0.mlp"]
        return fast / (fast + slow)

    outs = _measured(world2, share, 0.55, 0.8, f"{CASES}:split_auto", "1:2", split={"blocks": 2, "lm_head": 2})
    for out in outs:
        assert_equivalent(out)
        assert out["shard_sizes"] == outs[0]["shard_sizes"]
    sizes = outs[0]["shard_sizes"]
    fast = sizes["blocks.0.mlp"][0]
    # 4 whole heads at a measured share of 0.55-0.8: 2 or 3 on the fast rank (2.67 at exactly 2x;
    # the measured ratio on shared cores has been 1.5-2.4), never fewer than the slow one's.
    heads = sizes["blocks.0.attn"]
    assert heads in ((2, 2), (3, 1)), sizes
    assert outs[0]["shards"]["blocks.0.mlp.fc.weight"] == (fast, 32)


def test_profile_file_is_used_and_a_file_for_other_devices_is_refused_on_every_rank(world2, tmp_path):
    good, bad = tmp_path / "cpu.json", tmp_path / "a100.json"
    measured = dataclasses.replace(CPU_PROFILE, peak_flops={"fp32": 1e11}, source="measured for the test")
    save_profiles([measured], good)
    save_profiles([get_profile("A100-80GB")], bad)
    outs = world2.run(f"{CASES}:gpt_auto", "1:2", 12, profiles=str(good))
    for out in outs:
        assert_equivalent(out)
    # The file's rate, the emulated factor applied: speed alone splits exactly 2:1; the rows
    # run are the cost model's on the file's profile (its per-operation costs too).
    assert outs[0]["speeds"] == pytest.approx([1e11, 5e10])
    assert outs[0]["speed_rows"] == [8, 4] and outs[0]["rows"] == outs[0]["cost_rows"], outs[0]
    errors = world2.run(f"{CASES}:gpt_error", cluster="auto", profiles=str(bad))
    for message in errors:
        assert "describes ['A100-80GB'] but rank 0 runs on 'CPU'" in message, message
        assert "rank 1" in message and "whale profile --out" in message


def test_unreadable_profile_file_fails_before_any_exchange(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        wh.parallelize(model, loss_fn=torch.nn.functional.mse_loss, example_inputs=(torch.randn(4, 4),),
                       config=wh.Config(cluster="auto", profiles=str(path)))  # fmt: skip


def test_profiles_without_auto_and_auto_without_init_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="gives the device profiles of cluster='auto'"):
        wh.Config(profiles="p.json")
    with pytest.raises(TypeError, match="Config\\(profiles=...\\) is the path"):
        wh.Config(cluster="auto", profiles=3)
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("this process already holds a process group")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="call wh.init\\(\\) before wh.parallelize"):
        wh.parallelize(torch.nn.Linear(4, 2), loss_fn=torch.nn.functional.mse_loss,
                       example_inputs=(torch.randn(4, 4),), config=wh.Config(cluster="auto"))  # fmt: skip


def test_self_profile_sees_the_emulated_slowdown_and_is_quick():
    # One process measures rank 0 and an emulated 2x-slow rank 1 alternately (5 rounds, medians):
    # the ratio is the factor within the noise of a shared host (as _measured, up to ATTEMPTS
    # tries), far from 1 (not seen) and from 4 (counted twice); the exact factor is checked on a
    # steady clock below. Single-threaded, as torchrun's ranks (and the pool's) run: timed in
    # CPU time. (A slow spell read 2.47-2.70 in all three tries of one CI run.)
    def rounds():
        fast, slow = [], []
        for _ in range(5):
            fast.append(rank_report(0, environ={}))
            slow.append(rank_report(1, environ={"WHALE_EMULATE_SLOWDOWN": "1:2"}))
        return fast, slow

    def ratio(reports) -> float:
        fast, slow = reports
        return statistics.median(r.speed for r in fast) / statistics.median(r.speed for r in slow)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fast, slow = _within(rounds, ratio, 1.5, 2.8)
    finally:
        torch.set_num_threads(threads)
    assert max(r.seconds for r in fast) < 1.0 and max(r.seconds for r in slow) < 2.0
    assert all(r.error is None and r.measured for r in fast + slow)


def test_self_profile_counts_the_emulated_factor_once_on_a_steady_clock(monkeypatch):
    # The measured tests above read a noisy host; on a clock where every timed piece takes the
    # same time, the emulated rank's speed is exactly 1/FACTOR of the other's (counted once,
    # in the multiply's rate), its per-operation and optimizer costs exactly FACTOR times, and
    # both ranks idle after each sample as the slowest (pace 3: twice what it took).
    from whale.planner import self_profile

    ticks, slept = [0.0], []

    def clock() -> float:
        ticks[0] += 1e-3
        return ticks[0]

    steady = types.SimpleNamespace(thread_time=clock, perf_counter=clock, sleep=slept.append)
    monkeypatch.setattr(self_profile, "time", steady)  # this module's clock only
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = {"WHALE_EMULATE_SLOWDOWN": "1:3"}
        fast, slow = rank_report(0, environ=spec), rank_report(1, environ=spec)
    finally:
        torch.set_num_threads(threads)
    assert fast.error is None and slow.error is None
    assert fast.speed / slow.speed == pytest.approx(3.0, rel=1e-9)
    assert slow.profile["op_overhead"] == pytest.approx(3 * fast.profile["op_overhead"], rel=1e-9)
    per_tensor, per_param = fast.profile["optimizer_step"]["adamw"]
    assert per_tensor > 0 and per_param > 0
    assert slow.profile["optimizer_step"]["adamw"] == pytest.approx([3 * per_tensor, 3 * per_param], rel=1e-9)
    assert slept and all(s == pytest.approx(2e-3) for s in slept), sorted(set(slept))
    assert fast.profile["jitter"] == 0.0 and slow.profile["jitter"] == 0.0  # every sample alike


def test_self_profile_prices_the_probed_multiply_at_its_rate_and_no_faster_past_it(monkeypatch):
    # On a clock where every timed piece takes 1 ms, the probe (5 x F.linear of 512 x 128 by a
    # (512, 128) weight per sample) runs at 5 x 32 x 128^3 FLOPs per ms, and each sample of the
    # curve takes one tick (a small size's several calls share it): its share rises with its
    # FLOPs per sample up to the probe. The profile must
    # run the probed size at exactly that rate, smaller ones slower, and larger ones no faster
    # (the CPU datasheet's curve still rises there: it priced GPT's larger matmuls too fast
    # against its smaller ones, a fixed part of every step that moved rows to the faster rank).
    from whale.ir.devices import DeviceProfile
    from whale.planner import self_profile
    from whale.planner.cost.formulas import efficiency_at

    ticks = [0.0]

    def clock() -> float:
        ticks[0] += 1e-3
        return ticks[0]

    monkeypatch.setattr(self_profile, "time", types.SimpleNamespace(thread_time=clock, perf_counter=clock, sleep=lambda s: None))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = rank_report(0, environ={})
    finally:
        torch.set_num_threads(threads)
    profile = DeviceProfile.from_dict(report.profile)
    probe = 32.0 * 128**3

    def rate(flops: float) -> float:
        return profile.peak("fp32") * float(efficiency_at(profile, flops))

    assert rate(probe) == pytest.approx(5 * probe / 1e-3, rel=1e-6)
    assert rate(8 * probe) == pytest.approx(rate(probe), rel=1e-9)
    assert rate(probe / 512) <= rate(probe / 64) <= rate(probe / 8) < rate(probe)
    # The datasheet's speed (what classes of ranks and the bandwidth scale by) is as before.
    assert report.speed == pytest.approx(5 * probe / 1e-3 / float(efficiency_at(CPU_PROFILE, probe)) / CPU_PROFILE.peak("fp32"))


def test_rotation_gives_each_rank_of_a_host_every_core_in_turn_from_its_own():
    from whale.planner.self_profile import _rotation

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no thread affinity on this system")
    cores = sorted(os.sched_getaffinity(0))
    two = {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    if len(cores) >= 2:
        assert _rotation(0, two) == [cores[1], cores[2 % len(cores)]]
        assert _rotation(5, {"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0"}) == cores[:2]
        many = _rotation(0, {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": str(len(cores) + 3)})
        assert sorted(many) == cores  # more ranks than cores: every core once
    assert _rotation(0, {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}) == []  # alone: not pinned
    assert _rotation(0, {"LOCAL_RANK": "x", "LOCAL_WORLD_SIZE": "2"}) == []


def test_self_profile_reads_the_rank_not_the_core_it_measured_on(monkeypatch):
    # Core 1 runs everything 3x slower than core 0 (a shared host's steal). Rotated, both ranks
    # of the host measure on both cores and read one speed, half the speed core 0 alone gives;
    # the thread's cores are restored afterwards.
    from whale.planner import self_profile

    pinned, pins, ticks = [{0, 1}], [], [0.0]

    def set_affinity(pid, cpus):
        pinned[0] = set(cpus)
        pins.append(frozenset(cpus))

    def clock() -> float:
        ticks[0] += 3e-3 if pinned[0] == {1} else 1e-3
        return ticks[0]

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(pinned[0]), raising=False)
    monkeypatch.setattr(os, "sched_setaffinity", set_affinity, raising=False)
    steady = types.SimpleNamespace(thread_time=clock, perf_counter=clock, sleep=lambda s: None)
    monkeypatch.setattr(self_profile, "time", steady)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        host = {"LOCAL_WORLD_SIZE": "2"}
        first = rank_report(0, environ={**host, "LOCAL_RANK": "0"})
        order0, pins[:] = list(pins), []
        second = rank_report(1, environ={**host, "LOCAL_RANK": "1"})
        order1 = list(pins)
        alone = rank_report(0, environ={"LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    finally:
        torch.set_num_threads(threads)
    assert first.speed == pytest.approx(second.speed, rel=1e-9)
    assert first.speed == pytest.approx(alone.speed / 2, rel=1e-9)  # mean of 1 and 3 ms: 2 ms
    assert order0[:2] == [{0}, {1}] and order1[:2] == [{1}, {0}]  # turns start at the rank's core
    assert order0[-1] == order1[-1] == {0, 1} and pinned[0] == {0, 1}  # restored

    def refuse(pid, cpus):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setaffinity", refuse, raising=False)
    torch.set_num_threads(1)
    try:  # a container that forbids pinning: measured where the scheduler puts it, no error
        unpinned = rank_report(0, environ={**host, "LOCAL_RANK": "0"})
    finally:
        torch.set_num_threads(threads)
    assert unpinned.error is None and unpinned.speed == pytest.approx(alone.speed, rel=1e-9)


def test_two_ranks_measuring_at_once_see_the_emulated_factor(world2):
    # As parallelize measures: both ranks at once, single-threaded, rank 1 emulated 2x slower.
    # Two single-threaded ranks on shared cores: a measured ratio, not an exact one; 1.5-2.7
    # still tells a 2x-slower device from an equal one (1.0) and from a 4x one.
    outs = _measured(world2, lambda o: o[0]["speed"] / o[1]["speed"], 1.5, 2.7, f"{CASES}:emulated_rank_reports", "1:2")
    assert all(o["error"] is None for o in outs)
    assert outs[0]["seconds"] < 1.0 and outs[1]["seconds"] < 2.0, outs


def _report(rank, host="a", speed=1.0, cpu=True, error=None, memory=64 << 30):
    profile = dataclasses.replace(slowed(CPU_PROFILE, 1 / speed, "CPU"), memory_bytes=memory)
    return RankReport(rank, host, "CPU", profile.to_dict(), speed, cpu, True, 0.01, error)


def test_cluster_from_reports_groups_hosts_shares_ram_and_classes_speeds():
    reports = [_report(0, "a", 1.0), _report(1, "a", 0.9), _report(2, "b", 0.5), _report(3, "b", 1.05)]
    cluster = cluster_from_reports(reports)
    assert [n.name for n in cluster.nodes] == ["a", "b"] and cluster.world_size == 4
    names = [d.profile.name for d in cluster.devices()]
    assert names == ["CPU", "CPU", "CPU-slow2", "CPU"], names
    peaks = [d.profile.peak("fp32") for d in cluster.devices()]
    # 1.0, 0.9 and 1.05 are one class (within SAME_CLASS of 1.05): its median speed, 1.0.
    assert peaks[0] == peaks[1] == peaks[3] == pytest.approx(CPU_PROFILE.peak("fp32"))
    assert peaks[2] == pytest.approx(CPU_PROFILE.peak("fp32") / 2)
    assert 1.05 / 0.9 < SAME_CLASS
    # The CPU ranks of a host share its RAM.
    assert {d.profile.memory_bytes for d in cluster.devices()} == {32 << 30}
    assert cluster_from_reports(reports) == cluster, "a pure function: every rank builds the same"


def test_cluster_from_reports_splits_hosts_that_are_not_consecutive_and_names_errors():
    cluster = cluster_from_reports([_report(0, "x.y"), _report(1, "9z"), _report(2, "x.y")])
    assert [n.name for n in cluster.nodes] == ["x.y", "host-9z", "x.y-2"]
    with pytest.raises(ValueError, match=r"rank 1 \(h, CPU\): no such device"):
        cluster_from_reports([_report(0, "h"), RankReport(1, "h", "CPU", None, error="no such device")])


def test_rows_on_cluster_follow_speed_under_memory():
    cluster = parse_cluster("node0=1xA100-80GB+1xT4")
    plan = Plan(world_size=2, pipelines=((0,), (1,)), row_weights=(1.0, 1.0), replica_groups=((0, 1),))
    a100, t4 = (get_profile(n).peak("fp32") for n in ("A100-80GB", "T4"))
    assert replica_speeds(plan, cluster) == (a100, t4)
    rows = rows_on_cluster(plan, cluster, example_rows=100).rows(100)
    assert rows[0] == pytest.approx(100 * a100 / (a100 + t4), abs=1)
    assert rows_on_cluster(plan, cluster).row_weights == (1.0, t4 / a100)
    pinned = dataclasses.replace(plan, pinned_rows=(50, 50))
    assert rows_on_cluster(pinned, cluster, example_rows=100) is pinned


def test_replica_speed_is_the_slowest_position_and_a_mixed_tensor_group_sums():
    from whale.planner.schedules.generate import make_schedule

    a100, t4 = (get_profile(n).peak("fp32") for n in ("A100-80GB", "T4"))
    # Two pipelines of 2 stages: replica 0 = ranks (0, 2), replica 1 = ranks (1, 3).
    cluster = parse_cluster("a=2xA100-80GB,b=1xA100-80GB+1xT4")
    pipe = Plan(world_size=4, pipelines=((0, 2), (1, 3)), row_weights=(1.0, 1.0), replica_groups=((0, 1),),
                num_stages=2, schedule=make_schedule("1f1b", 2, 2), num_micro_batch=2)  # fmt: skip
    assert replica_speeds(pipe, cluster) == (a100, t4)
    # Tensor groups of 2: (A100, A100) and (A100, T4); the mixed one shards by speed.
    tp = Plan(world_size=4, pipelines=((0, 1), (2, 3)), row_weights=(1.0, 1.0), replica_groups=((0, 1),),
              tensor_parallel=2)  # fmt: skip
    assert replica_speeds(tp, cluster) == (2 * a100, a100 + t4)
    given = dataclasses.replace(tp, shard_sizes=(("mlp", (2, 2)),))  # even shards: the T4 paces
    assert replica_speeds(given, cluster) == (2 * a100, 2 * t4)


def test_rows_on_cluster_cap_rows_by_memory():
    # 2 ranks, rank 0 four times as fast but with room for only 10 rows of activations.
    from whale.planner.cost.formulas import training_memory
    from whale.planner.cost.layers import Layer, ModelProfile

    layer = Layer("l", (1e9,), (0.0,), (0.0,), 0, 4_000, 0, 1e6, 0.0, 0.0, 0)
    profile = ModelProfile.from_layers([layer])
    static = training_memory(param_bytes=4_000, precision="fp32", optimizer="adamw").total
    fast = dataclasses.replace(slowed(CPU_PROFILE, 0.25, "fast"), memory_bytes=int((static + 10e6) / 0.9) + 1)
    slow = dataclasses.replace(CPU_PROFILE, memory_bytes=1 << 40)
    from whale.ir.topology import Cluster, Node

    cluster = Cluster(nodes=(Node(name="n", devices=(fast, slow)),))
    plan = Plan(world_size=2, pipelines=((0,), (1,)), row_weights=(1.0, 1.0), replica_groups=((0, 1),))
    assert rows_on_cluster(plan, cluster, example_rows=20).rows(20) == (16, 4)
    assert rows_on_cluster(plan, cluster, example_rows=20, profile=profile).rows(20) == (10, 10)
    tiny = dataclasses.replace(fast, memory_bytes=1000)
    with pytest.raises(ValueError, match="measured cluster .*hold \\[0\\] rows"):
        rows_on_cluster(plan, Cluster(nodes=(Node(name="n", devices=(tiny, slow)),)), example_rows=20, profile=profile)


def test_auto_in_a_process_of_its_own_plans_for_this_device():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    # (The measurement's own time is checked through RankReport.seconds above.)
    program = wh.parallelize(model, loss_fn=torch.nn.functional.mse_loss, example_inputs=(torch.randn(8, 16),),
                             config=wh.Config(cluster="auto", quiet=True))  # fmt: skip
    assert program.config.cluster.world_size == 1 and program.config.cluster.devices()[0].profile.name == "CPU"
