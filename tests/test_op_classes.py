"""Operation classes: the profile field, the cost model's use of it, and the block probe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import whale as wh
from whale.ir.cluster_spec import parse_cluster
from whale.ir.device_catalog import load_profiles, save_profiles
from whale.ir.devices import OP_CLASSES, DeviceProfile
from whale.planner.class_probe import _steps, block_shape, class_factors
from whale.planner.cost.formulas import all_reduce_time, host_sum_time
from whale.planner.cost.layers import Layer, ModelProfile
from whale.planner.cost.predict import (
    Candidate,
    CostModel,
    CostOptions,
    RankLayout,
    cost_options,
)
from whale.planner.measure import _fit_per_tensor_and_param, slowed
from whale.planner.search.memory_options import MemoryChoice, OptionCostModel

_BASE = {
    "name": "Gadget", "memory_bytes": 1 << 30, "peak_flops": {"fp32": 1e12}, "memory_bandwidth": 1e11,
    "intra_link": "shm", "source": "measured by hand", "efficiency": [[1.0, 1.0]], "op_overhead": 1e-5,
}  # fmt: skip
CLASSES = {"linear": [2.0, 1.5], "attention": [4.0, 1.7], "elementwise": [1.5, 1.2], "view": [3.0, 1.1]}


def _write(tmp_path, **fields):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"version": 1, "devices": [{**_BASE, **fields}]}))
    return path


def test_op_classes_load_save_and_default_to_one(tmp_path) -> None:
    (device,) = load_profiles(_write(tmp_path, op_classes=CLASSES)).values()
    assert device.class_factors() == (2.0, 4.0, 1.5, 3.0)
    assert device.op_classes[0] == ("linear", 2.0, 1.5)
    (old,) = load_profiles(_write(tmp_path, name="Old")).values()  # a file written before the field
    assert old.op_classes is None and old.class_factors() == (1.0,) * len(OP_CLASSES)
    partial = DeviceProfile.from_dict({**_BASE, "op_classes": {"attention": [3.0, 2.0]}})
    assert partial.class_factors() == (1.0, 3.0, 1.0, 1.0)
    path = tmp_path / "again.json"
    save_profiles([device, old], path)
    assert list(load_profiles(path).values()) == [device, old]
    written = json.loads(path.read_text())["devices"]
    assert written[0]["op_classes"] == CLASSES and "op_classes" not in written[1]
    # Slowing a device scales its rates and overheads; how its classes compare stays.
    assert slowed(device, 2.0).class_factors() == device.class_factors()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([2.0, 1.5], "op_classes must be an object such as"),
        ({"conv": [2.0, 1.5]}, r"unknown operation class 'conv'; use one of \['linear', 'attention'"),
        ({"linear": [0, 1.5]}, r"op_classes\['linear'\] = \[0, 1.5\] must be numbers in \(0, 1000\]"),
        ({"linear": [2.0]}, "needs two numbers"),
        ({"view": ["fast", 1.0]}, "must be numbers in"),
    ],
)
def test_bad_op_classes_name_the_file_and_the_field(tmp_path, value, message) -> None:
    path = _write(tmp_path, op_classes=value)
    with pytest.raises(ValueError, match=message) as error:
        load_profiles(path)
    assert str(path) in str(error.value)


def test_the_cost_model_times_each_node_by_its_class() -> None:
    # One layer with a node of each class: a linear (FLOPs, parameter reads), an attention
    # (FLOPs on activations), a layer norm (bytes only) and a view (nothing moved).
    layer = Layer(
        name="block", flops=(2e9, 1e9, 0.0, 0.0), row_bytes=(1e6, 1e6, 4e7, 0.0),
        fixed_bytes=(4e6, 0.0, 0.0, 0.0), num_sharded=2, param_bytes=4_000_000,
        replicated_param_bytes=0, act_bytes=1e6, replicated_act_bytes=0.0, hidden_bytes=1e5, tp_all_reduces=1,
    )  # fmt: skip
    profile = ModelProfile.from_layers([layer])
    plain = DeviceProfile.from_dict(_BASE)
    classed = DeviceProfile.from_dict({**_BASE, "name": "Classed", "op_classes": CLASSES})
    rows, overhead = 2, 1e-5
    # Rooflines at efficiency 1: the linear and attention compute bound, the layer norm memory bound.
    roof = np.array([max(4e9 / 1e12, (2e6 + 4e6) / 1e11), max(2e9 / 1e12, 2e6 / 1e11), 8e7 / 1e11, 0.0])
    for device, factors, view in ((plain, (1, 1, 1, 1), 1.0), (classed, (2.0, 4.0, 1.5, 3.0), 3.0)):
        costs = CostModel(profile, parse_cluster(f"1x{device.name}", profiles=[device]), CostOptions())
        expected = float(roof @ np.array(factors)) + overhead * (3 + 0.5 * view)
        assert costs.layer_times(device, rows)[0] == pytest.approx(expected, rel=1e-12), device.name
        # Forward and backward: three times that in all, split by each class's measured
        # backward / forward (1.5, 1.7, 1.2 and 1.1 above); twice the forward where none is measured.
        forward, backward = costs.group_times((0,), (1.0,), rows, 0, 1)
        assert forward + backward == pytest.approx(3 * expected, rel=1e-12)
        nodes = roof * np.array(factors) + overhead * np.array([1, 1, 1, 0.5 * view])
        ratios = np.array([1.5, 1.7, 1.2, 1.1]) if device is classed else np.full(4, 2.0)
        assert forward == pytest.approx(float(3 * nodes @ (1 / (1 + ratios))), rel=1e-12), device.name


def test_the_block_probe_books_forward_and_backward_by_class() -> None:
    # A clock that ticks one second per reading: each forward step costs 1 s, each backward
    # interval between two gradient hooks 1 s, and the block run whole 1 s (a reading before
    # and one after); the factors then follow from the counts alone.
    ticks = iter(range(1_000_000))
    b, t, w, h = block_shape(cuda=False, quick=True)
    steps = _steps(b, t, w, h, 4, "cpu", torch.float32)
    count = {k: sum(1 for _, s in steps if s[0] == k) for k in OP_CLASSES}
    assert count == {"linear": 4, "attention": 1, "elementwise": 6, "view": 11}
    factors = class_factors("cpu", lambda: None, lambda: float(next(ticks)), shape=(b, t, w, h),
                            dtype=torch.float32, repeat=1, overhead=0.0, base=lambda flops, moved: 0.01)  # fmt: skip
    # Hooks sit on every output that needs a gradient (not on the split's tuple): one backward
    # interval per such output, the last one (layer norm 1) running until backward ends.
    hooked = {k: sum(1 for _, s in steps if s[0] == k) for k in OP_CLASSES}
    hooked["view"] -= 1
    # The pieces of a run add up to one tick per step and per backward interval, the block run
    # whole to one: every class is scaled by their ratio, and its backward / forward kept (the
    # base is 0.01 s a node, so that the factors stay inside what a profile file accepts).
    scale = 100 / (sum(count.values()) + sum(hooked.values()))
    for kind in ("linear", "attention", "elementwise"):
        forward, backward = count[kind], hooked[kind]
        assert factors[kind][0] == pytest.approx(scale * (forward + backward) / (3 * count[kind])), kind
        assert factors[kind][1] == pytest.approx(backward / forward), kind


def test_the_optimizer_fit_recovers_per_tensor_and_per_parameter_costs() -> None:
    samples = [(k, k * n, k * 2e-5 + k * n * 1e-9) for k, n in ((1, 1 << 20), (8, 1 << 17), (64, 4096))]
    a, b = _fit_per_tensor_and_param(samples)
    assert a == pytest.approx(2e-5) and b == pytest.approx(1e-9)
    assert _fit_per_tensor_and_param([(1, 100, 0.0), (2, 200, 0.0)]) == (0.0, 0.0)


def test_the_last_gradient_bucket_is_not_hidden_by_the_backward() -> None:
    # Two replicas of a 30 MiB model over a 1 GB/s link: buckets of 1 MiB (first), then 25 MiB,
    # leave 4 MiB for the last, which holds the first layer's gradients and starts only when the
    # backward ends; the rest overlaps it. Its ring all-reduce is what the sync adds.
    mib = 2**20
    layers = [Layer.simple(f"l{k}", flops=1e12, param_bytes=size, act_bytes=1e3)
              for k, size in enumerate((4 * mib, 25 * mib, 1 * mib))]  # fmt: skip
    profile = ModelProfile.from_layers(layers)
    cluster = parse_cluster("2xA100-80GB(intra=1GB/s,intra_lat=10us)")
    costs = CostModel(profile, cluster, CostOptions())
    layout = RankLayout(1, (((0,),), ((1,),)))
    sync = costs.sync_time(layout, 1, ())
    assert sync[0] == pytest.approx(2 * 10e-6 + 30 * mib / 1e9, rel=1e-12)
    assert sync.tail[0] == pytest.approx(2 * 10e-6 + 4 * mib / 1e9, rel=1e-12)
    candidate = Candidate(layout, 1, "1f1b", 1, (), (8, 8))
    prediction = costs.predict(candidate)
    forward = float(costs.layer_times(cluster.devices()[0].profile, 8).sum())
    compute = 3 * forward  # the backward (2x) is far longer than the whole all-reduce
    assert 2 * forward > sync[0]
    expected = compute + sync.tail[0] + prediction.optimizer_time[0]
    assert prediction.step_time == pytest.approx(expected, rel=1e-9)
    assert costs.timeline(candidate).step_time == pytest.approx(prediction.step_time, rel=1e-12)
    # One replica: nothing to synchronise.
    alone = costs.sync_time(RankLayout(1, (((0,),),)), 1, ())
    assert tuple(alone) == (0.0,) and alone.tail == (0.0,)
    with pytest.raises(ValueError, match="bucket_bytes=0"):
        CostOptions(bucket_bytes=0)


def test_cpu_ranks_of_one_host_sum_gradients_in_shared_memory() -> None:
    # As the runtime does (whale.runtime.host_reduce): two barriers over the link and one pass
    # over memory, where the ring over a 1 GB/s link would move the bytes through it. Across
    # hosts, with Config(shared_memory=False), and under ZeRO 2 and 3 (reduce-scatter over the
    # process group), the ring.
    mib = 2**20
    profile = ModelProfile.from_layers([Layer.simple("l0", flops=1e9, param_bytes=30 * mib, act_bytes=1e3)])
    layout = RankLayout(1, (((0,),), ((1,),)))
    one_host = parse_cluster("node0=2xCPU(intra=1GB/s,intra_lat=500us)")
    link = one_host.nodes[0].device_link
    memory = one_host.devices()[0].profile.memory_bandwidth
    summed = CostModel(profile, one_host, CostOptions()).sync_time(layout, 1, ())
    assert summed[0] == pytest.approx(host_sum_time(30 * mib, 2, memory, link), rel=1e-12)
    assert summed[0] == pytest.approx(2 * (2 * 500e-6 + 4 / 1e9) + 1.5 * 30 * mib / memory, rel=1e-12)
    ring = all_reduce_time(30 * mib, 2, link)
    assert summed[0] < ring / 10
    socket = CostModel(profile, one_host, CostOptions(shared_memory=False)).sync_time(layout, 1, ())
    assert socket[0] == pytest.approx(ring, rel=1e-12)
    for zero, expected in ((1, summed[0]), (2, ring), (3, 1.5 * ring)):
        costs = OptionCostModel(profile, one_host, CostOptions(), MemoryChoice(zero_stage=zero))
        assert costs.sync_time(layout, 1, ())[0] == pytest.approx(expected, rel=1e-12), zero
    two_hosts = parse_cluster("node0=1xCPU,node1=1xCPU")
    across = CostModel(profile, two_hosts, CostOptions()).sync_time(layout, 1, ())
    assert across[0] == pytest.approx(all_reduce_time(30 * mib, 2, two_hosts.link(0, 1)), rel=1e-12)
    # GPUs on one node keep the ring (NCCL sums over their link).
    gpus = parse_cluster("2xA100-80GB(intra=1GB/s,intra_lat=500us)")
    assert CostModel(profile, gpus, CostOptions()).sync_time(layout, 1, ())[0] == pytest.approx(ring, rel=1e-12)


def test_a_jobs_config_sets_the_cost_models_buckets_and_shared_memory() -> None:
    # What parallelize predicts, plans rows and fits checkpoints with: the runtime's buckets (the
    # first capped by the others' size) and whether gradients meet in shared memory.
    options = cost_options(wh.Config(bucket_cap_mb=8, first_bucket_cap_mb=16, shared_memory=False))
    assert (options.bucket_bytes, options.first_bucket_bytes, options.shared_memory) == (8 * 2**20, 8 * 2**20, False)
    assert cost_options(wh.Config()) == CostOptions()
