"""Calibrated predictions: profile fields and files, simulated timelines, and recorded steps.

``tests/data/predict_host.json`` was recorded on a quiet 2-core CPU host (load average about
1; median error 5.5% in that run, 13.9% and 23.4% in two others the same hour) by::

    python benchmarks/bench_predict.py --record tests/data/predict_host.json

It holds the host profile (the core's own rates, with how each class of graph node runs in a
transformer block), the all-reduce link (timed between computations), every plan that ran, the
share of a core each rank got during each of its runs (and its CPU pace where the run was
recorded with ``--pace``; 1 where not), its predicted and measured median step time
(2 gloo ranks, 1 thread each, a 4-layer GPT of width 128, batch 16).

Each case's ``predicted`` is a golden value: the cost model's prediction from the recorded
inputs, which the benchmark printed at record time (``recorded_predicted``) and which a change
to the cost model rewrites under ``WHALE_UPDATE_GOLDEN=1`` (as the CLI's golden files), so that
no change to a prediction goes unseen. Rewritten on 2026-12-07 for the all-reduce of weights tied
across stages and the measured backward / forward of each class of node (median error 5.5% ->
4.8%), and again for gradients summed in shared memory on one host (data -2.4% -> -3.9%, mixed
-23.0% -> -21.4%; median 4.8%)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import statistics
import time

import pytest
import torch

import whale as wh
from examples.gpt import GPT, GPTConfig
from whale.capture import capture
from whale.ir.cluster_spec import parse_cluster
from whale.ir.device_catalog import get_profile, load_profiles, save_profiles
from whale.ir.devices import DeviceProfile
from whale.ir.plan import Plan
from whale.planner.cost.formulas import efficiency_at, op_time, optimizer_step_time
from whale.planner.cost.layers import Layer, ModelProfile
from whale.planner.cost.model_profile import profile_model
from whale.planner.cost.plan_cost import predict_plan
from whale.planner.cost.predict import Candidate, CostModel, RankLayout
from whale.planner.measure import emulated, slowed
from whale.planner.schedules.generate import make_schedule
from whale.planner.schedules.simulator import sim_timeline, simulate
from whale.planner.search.auto import search
from whale.planner.search.pins import Pins

_RECORD_PATH = pathlib.Path(__file__).parent / "data" / "predict_host.json"
RECORD = json.loads(_RECORD_PATH.read_text())
HOST = DeviceProfile.from_dict(RECORD["profile"], where="predict_host.json")


def _gpt(batch: int):
    cfg = GPTConfig(**RECORD["model"])
    torch.manual_seed(0)
    x = torch.randint(cfg.vocab_size, (batch, cfg.block_size))
    return GPT(cfg), x


def _rank_cluster(case: str, host: DeviceProfile, shares, paces=None) -> object:
    """As the benchmark: rank ``r`` is the host at ``shares[r]`` of a core and at CPU pace
    ``paces[r]`` (rank 1 of the emulated plan at half speed besides: it ran with
    WHALE_EMULATE_SLOWDOWN=1:2)."""
    bandwidth, latency = RECORD["cases"].get(case, {}).get("link", RECORD["link"])
    link = f"intra={bandwidth / 1e9:.4g}GB/s,intra_lat={latency * 1e6:.4g}us"
    devices = {}
    for rank, share in enumerate(shares):
        # rank 1 emulated 2x slower: its compute and its optimizer step stretched
        device = emulated(host, rank, {"WHALE_EMULATE_SLOWDOWN": "1:2"}) if case == "emulated-slow" else host
        pace = paces[rank] if paces else 1.0
        devices[rank] = slowed(device, pace / share, f"{device.name}-r{rank}")
    spec = "+".join(f"1x{d.name}" for d in devices.values())
    return parse_cluster(f"node0={spec}({link})", profiles=list(devices.values()))


def test_recorded_steps_are_predicted_within_the_bound() -> None:
    # As the benchmark: each run predicted on the profile's core rates at the share of a core
    # each rank got while it could run during that run's steps (other jobs shared the host),
    # the median over the runs.
    # Bound: the median |error| over the plans <= 15% (the goal) and each plan within 40%: the
    # recording host's 2 cores ran other helpers' jobs whose load drifted within a run.
    errors = {}
    for case, entry in RECORD["cases"].items():
        model, x = _gpt(RECORD["batch"])
        if case == "tensor":  # as the benchmark: every block split
            wh.annotate(
                model,
                {f"blocks.{k}": wh.split() for k in range(RECORD["model"]["n_layer"])},
            )
        plan = Plan.from_json(json.dumps(entry["plan"]))
        profile = profile_model(
            capture(model, (x,)), RECORD["batch"], boundaries=plan.stage_boundaries
        )
        # A case run on another world size (the 4-rank mixed plan) has the profile it measured.
        host = DeviceProfile.from_dict(entry.get("profile", RECORD["profile"]), where="predict_host.json")
        assert len(entry["shares"][0]) == plan.world_size
        paces = entry.get("paces", [None] * len(entry["shares"]))  # recorded without: 1.0
        predicted = statistics.median(
            predict_plan(plan, profile, _rank_cluster(case, host, shares, pace), RECORD["batch"]).prediction.step_time
            for shares, pace in zip(entry["shares"], paces)
        )
        if os.environ.get("WHALE_UPDATE_GOLDEN") == "1":
            entry.setdefault("recorded_predicted", entry["predicted"])
            entry["predicted"] = predicted
        assert predicted == pytest.approx(entry["predicted"], rel=1e-9)  # the golden prediction
        errors[case] = predicted / entry["measured"] - 1
    if os.environ.get("WHALE_UPDATE_GOLDEN") == "1":
        _RECORD_PATH.write_text(json.dumps(RECORD, indent=1) + "\n")
    assert statistics.median(abs(e) for e in errors.values()) <= 0.15, errors
    assert all(abs(e) <= 0.4 for e in errors.values()), errors


def test_a_small_model_is_not_cut_into_tiny_micro_batches() -> None:
    # Every micro-batch pays each operation's dispatch and runs small matmuls below the peak:
    # on the measured host a 2-stage pipeline of a small GPT with 16 rows gets micro-batches of
    # 3 or more rows. The rates alone (efficiency 1, no cost per operation) cut it into 1-row
    # micro-batches, which the host runs slower.
    model, x = _gpt(16)
    profile = profile_model(capture(model, (x,)), 16)
    flat = dataclasses.replace(HOST, efficiency=((1.0, 1.0),), op_overhead=0.0)
    rows = {}
    for name, device in (("calibrated", HOST), ("rates only", flat)):
        cluster = parse_cluster(
            f"2x{device.name}(intra=0.5GB/s,intra_lat=500us)", profiles=[device]
        )
        best = search(profile, cluster, 16, pins=Pins(num_stages=2)).best.candidate
        rows[name] = best.rows[0] / best.num_micro_batch
    assert rows["calibrated"] >= 3 and rows["rates only"] < 2, rows


def test_the_efficiency_curve_rises_and_small_ops_are_not_at_peak() -> None:
    for device in (HOST, get_profile("A100-80GB"), get_profile("cpu")):
        sizes = [10.0**k for k in range(3, 13)]
        shares = [efficiency_at(device, s) for s in sizes]
        assert shares == sorted(shares) and 0 < shares[0] < shares[-1] <= 1, device.name
    a100 = get_profile("A100-80GB")
    assert efficiency_at(a100, 1e6) < 0.05 and efficiency_at(
        a100, 1e12
    ) == pytest.approx(0.5)
    # A 64 x 64 x 64 matmul costs more than its FLOPs at the peak: efficiency and dispatch.
    flops = 2 * 64**3
    assert op_time(flops, 0, HOST) > HOST.overhead() + flops / HOST.peak("fp32")


def test_the_optimizer_step_is_memory_bound_per_parameter_plus_per_tensor() -> None:
    a100 = get_profile("A100-80GB")
    assert optimizer_step_time(1e9, 0, a100) == pytest.approx(
        28e9 / a100.memory_bandwidth
    )
    per_tensor, per_param = HOST.optimizer_cost("adamw")
    assert optimizer_step_time(1e6, 10, HOST) == pytest.approx(
        10 * per_tensor + 1e6 * per_param
    )
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        optimizer_step_time(1e6, 1, HOST, optimizer="lamb")


def test_sim_timeline_has_the_simulated_intervals() -> None:
    result = simulate(make_schedule("1f1b", 2, 3), [1.0, 1.5], [2.0, 3.0], 0.25)
    timeline = sim_timeline(result, ranks=[4, 5])
    assert timeline.source == "simulated" and timeline.ranks == (4, 5)
    expected = [
        (r, t.start, t.end) for r, row in zip((4, 5), result.timeline) for t in row
    ]
    assert [(e.rank, e.start, e.end) for e in timeline.events] == expected
    first = next(e for e in timeline.events if e.rank == 5)
    assert (first.name, first.category, first.stage, first.micro_batch) == (
        "RA1.0",
        "recv",
        1,
        0,
    )
    assert {e.category for e in timeline.events} == {
        "forward",
        "backward",
        "send",
        "recv",
    }
    assert timeline.step_time == result.step_time
    with pytest.raises(ValueError, match="one global rank"):
        sim_timeline(result, ranks=[0])


@pytest.mark.parametrize(
    ("layout", "stages", "schedule", "micro", "cuts", "rows"),
    [
        (RankLayout(1, (((0,), (1,)), ((2,), (3,)))), 2, "1f1b", 4, (4,), (8, 8)),
        (RankLayout(2, (((0, 1), (2, 3)),)), 2, "gpipe", 4, (3,), (16,)),
        (RankLayout(1, (((0,), (1,)),)), 4, "interleaved_1f1b", 4, (2, 4, 6), (16,)),
        (
            RankLayout(1, (((0,),), ((1,),), ((2,),), ((3,),))),
            1,
            "1f1b",
            2,
            (),
            (4, 4, 4, 4),
        ),
    ],
)
def test_the_cost_models_timeline_has_its_predicted_step(
    layout, stages, schedule, micro, cuts, rows
) -> None:
    layers = [
        Layer.simple(
            f"l{i}", flops=1e9, param_bytes=4 << 20, act_bytes=1e5, hidden_bytes=1e4
        )
        for i in range(8)
    ]
    costs = CostModel(ModelProfile.from_layers(layers), parse_cluster("4xA100-80GB"))
    candidate = Candidate(layout, stages, schedule, micro, cuts, rows)
    prediction, timeline = costs.predict(candidate), costs.timeline(candidate)
    assert timeline.step_time == pytest.approx(prediction.step_time, rel=1e-12)
    assert timeline.ranks == tuple(
        sorted(r for pipe in layout.pipelines for g in pipe for r in g)
    )
    assert "optimizer" in {e.category for e in timeline.events}
    assert ("sync" in {e.category for e in timeline.events}) == (layout.dp_degree > 1)


# --- profile files ----------------------------------------------------------------------------

_BASE = {
    "name": "Gadget", "memory_bytes": 1 << 30, "peak_flops": {"fp32": 1e12}, "memory_bandwidth": 1e11,
    "intra_link": "pcie4", "source": "measured by hand",
}  # fmt: skip


def _write(tmp_path, **fields) -> pathlib.Path:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"version": 1, "devices": [{**_BASE, **fields}]}))
    return path


def test_a_profile_file_without_the_new_fields_loads_with_defaults(tmp_path) -> None:
    (old,) = load_profiles(_write(tmp_path)).values()
    assert old.efficiency is None and old.efficiency_curve() == (
        (1.0, 1.0),
    )  # measured: as is
    assert old.overhead() > 0 and old.optimizer_cost("adamw") == (0.0, 28 / 1e11)
    path = tmp_path / "again.json"
    save_profiles([HOST, old], path)
    assert list(load_profiles(path).values()) == [HOST, old]
    assert "efficiency" not in json.loads(path.read_text())["devices"][1]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"efficiency": "fast"},
            r"devices\[0\]: efficiency must be a list of \[flops, share\] pairs",
        ),
        (
            {"efficiency": [[1e6, 0.5], [1e5, 0.9]]},
            r"efficiency\[1\] = \[100000.0, 0.9\] after",
        ),
        (
            {"efficiency": [[1e6, 1.5]]},
            r"efficiency\[0\] = \[1000000.0, 1.5\] is out of range",
        ),
        ({"op_overhead": "8us"}, "op_overhead must be seconds per operation"),
        ({"optimizer_step": {"lamb": [1e-5, 1e-9]}}, "unknown optimizer 'lamb'"),
        ({"optimizer_step": [1e-5, 1e-9]}, "optimizer_step must be an object"),
        (
            {"optimizer_step": {"adamw": [-1, 1e-9]}},
            r"optimizer_step\['adamw'\] .* must be numbers >= 0",
        ),
    ],
)
def test_bad_profile_fields_name_the_file_and_the_field(
    tmp_path, fields, message
) -> None:
    path = _write(tmp_path, **fields)
    with pytest.raises(ValueError, match=message) as error:
        load_profiles(path)
    assert str(path) in str(error.value)


def test_a_profile_file_that_does_not_parse_or_lacks_the_device(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "devices": [')
    with pytest.raises(
        ValueError, match=r"bad.json is not valid JSON.*whale profile --out"
    ):
        load_profiles(bad)
    with pytest.raises(ValueError, match="cannot read the profile file"):
        load_profiles(tmp_path / "missing.json")
    path = _write(tmp_path)
    assert load_profiles(path, require=["gadget"])
    with pytest.raises(
        ValueError,
        match=r"no profile for the device 'H100' \(it describes \['Gadget'\]\)",
    ):
        load_profiles(path, require=["H100"])


def test_an_emulated_slow_rank_profiles_as_a_slower_device() -> None:
    # The profiler sees WHALE_EMULATE_SLOWDOWN as the planner would see a slower device: rank 1
    # at factor 2 has half the rates and bandwidth and twice the per-operation cost, under a name
    # of its own; rank 0, and a factor that starts at a later step, leave the profile as measured.
    env = {"WHALE_EMULATE_SLOWDOWN": "1:2,2:3@10"}
    slow = emulated(HOST, rank=1, environ=env)
    assert slow.name == f"{HOST.name}-slow2"
    assert slow.peak("fp32") == pytest.approx(HOST.peak("fp32") / 2)
    assert slow.memory_bandwidth == pytest.approx(HOST.memory_bandwidth / 2)
    assert slow.overhead() == pytest.approx(HOST.overhead() * 2)
    assert emulated(HOST, rank=0, environ=env) is HOST
    assert emulated(HOST, rank=2, environ=env) is HOST
    with pytest.raises(ValueError, match="WHALE_EMULATE_SLOWDOWN"):
        emulated(HOST, rank=1, environ={"WHALE_EMULATE_SLOWDOWN": "1:fast"})


def test_the_run_queue_share_counts_only_time_a_thread_could_run() -> None:
    # Sleeping is no lost share: a thread that sleeps most of an interval on an idle core still
    # got all of the time it could run. On a loaded host the share falls by what others took.
    from whale.planner.measure import run_queue_clock, run_queue_share

    assert run_queue_share(None, (1.0, 0.0)) is None and run_queue_share((1.0, 0.0), None) is None
    assert run_queue_share((1.0, 1.0), (2.0, 1.0)) == 1.0  # 1 s on a CPU, no wait
    assert run_queue_share((1.0, 1.0), (1.5, 2.5)) == pytest.approx(0.25)
    assert run_queue_share((1.0, 1.0), (1.0, 9.0)) is None  # it never ran: no share to state
    before = run_queue_clock()
    if before is None:
        pytest.skip("no scheduler statistics on this system")
    time.sleep(0.05)
    after = run_queue_clock()
    assert after[0] >= before[0] and after[1] >= before[1]


# --- gradient sync ------------------------------------------------------------------------------


def _tied_profile(users: tuple[int, ...]) -> ModelProfile:
    layers = [Layer.simple(f"l{i}", flops=1e9, param_bytes=8 << 20, act_bytes=1e5, hidden_bytes=1e4) for i in range(4)]
    return dataclasses.replace(ModelProfile.from_layers(layers), shared_params=(("l0.weight", 8 << 20, users),))


def test_weights_tied_across_positions_are_all_reduced_after_the_backward() -> None:
    # GPT's embedding and head share a weight: a pipeline holding them on two positions sums
    # their gradients (rewrite.stage_split's tied groups) after every bucket, so each of the
    # two positions pays that all-reduce after its last backward, and the step grows by it.
    from whale.planner.cost.formulas import all_reduce_time

    cluster = parse_cluster("node0=2xA100-80GB,node1=2xA100-80GB")
    pipeline = RankLayout(1, (((0,), (2,)),))  # two positions on two nodes
    tied_costs = CostModel(_tied_profile((0, 3)), cluster)
    plain_costs = CostModel(_tied_profile((0,)), cluster)  # used by one layer: nothing to sum
    grad = (8 << 20) * tied_costs.grad_bytes_per_param
    expected = all_reduce_time(grad, 2, cluster.group_link([0, 2]))
    assert expected > 0
    sync = tied_costs.sync_time(pipeline, 2, (2,))
    assert sync == pytest.approx((expected, expected)) and sync.tail == pytest.approx((expected, expected))
    assert sync.tied == pytest.approx((expected, expected))
    assert plain_costs.sync_time(pipeline, 2, (2,)) == (0.0, 0.0)
    assert tied_costs.sync_time(pipeline, 2, (3,)).tied == pytest.approx((expected, expected))
    # Both users on one stage (layers 0 and 1 before the cut at 2): no all-reduce.
    assert CostModel(_tied_profile((0, 1)), cluster).sync_time(pipeline, 2, (2,)) == (0.0, 0.0)
    # Interleaved: stages 0 and 3 of four sit on positions 0 and 1.
    assert tied_costs.sync_time(pipeline, 4, (1, 2, 3)).tied == pytest.approx((expected, expected))
    # One position (data parallel only): the weight is whole on every rank.
    dp = RankLayout(1, (((0,),), ((2,),)))
    assert tied_costs.tied_sync_time(dp, 1, ()) == (0.0,)
    candidate = Candidate(pipeline, 2, "1f1b", 2, (2,), (8,))
    tied, plain = tied_costs.predict(candidate), plain_costs.predict(candidate)
    assert tied.step_time == pytest.approx(plain.step_time + expected, rel=1e-9)
    assert tied_costs.timeline(candidate).step_time == pytest.approx(tied.step_time, rel=1e-12)
    assert "sync" in {e.category for e in tied_costs.timeline(candidate).events}


def test_a_gpt_profile_names_its_tied_embedding_and_head() -> None:
    model, x = _gpt(4)
    shared = profile_model(capture(model, (x,)), 4).shared_params
    assert len(shared) == 1
    name, size, users = shared[0]
    assert "wte" in name or "lm_head" in name, name
    assert size == model.wte.weight.numel() * 4 and len(users) == 2 and users[0] < users[1]


def test_link_samples_are_means_of_skewed_runs() -> None:
    # A step pays its collectives in sum: measure_links averages each size's runs, where the
    # device rates take the median (a few slow runs are part of a step's collectives).
    from whale.planner.measure import _timed

    def clock():  # the warm-up's start, then runs of 1, 1, 1 and 9 s
        return iter([0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 12.0]).__next__

    assert _timed(lambda: None, lambda: None, 4, clock=clock(), mean=True) == pytest.approx(3.0)
    assert _timed(lambda: None, lambda: None, 4, clock=clock()) == pytest.approx(1.0)


def test_the_efficiency_curve_is_not_bent_by_a_change_of_the_hosts_pace(monkeypatch) -> None:
    # A device that runs every size at one rate (a flat curve), read by a clock that ticks every
    # 10 us and slowed to half its pace for a stretch as long as one round of the sizes (a
    # shared host's cores change pace every ~0.1 s). Sizes timed in turn each see the stretch
    # in one sample of three, and a small size calls the multiply often enough a sample for the
    # tick not to matter: the curve reads flat. Timed one size after the other, one call a
    # sample, the smallest size's 13 us read as 10 and set the peak a third too high.
    from whale.planner.measure import matmul_curve

    rate, now, done = 1e10, [0.0], [0.0]
    sizes = (16, 32, 64, 128)
    round_ = sum(32.0 * n**3 * max(1, (128 // n) ** 3 // 8) for n in sizes)  # FLOPs of a round

    def linear(a, w):
        flops = 2.0 * a.shape[0] * a.shape[1] * w.shape[0]
        now[0] += flops / (rate / 2 if 2 * round_ <= done[0] < 3 * round_ else rate)
        done[0] += flops

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    peak, curve = matmul_curve(sizes, torch.float32, "cpu", lambda: None, 3, lambda: now[0] // 1e-5 * 1e-5)
    assert peak == pytest.approx(rate, rel=0.02)
    assert [share for _, share in curve] == pytest.approx([1.0] * len(sizes), rel=0.02)
