"""Nodes of mixed device types: tensor groups inside them and speed-proportional shard widths.

Pure planner logic, no processes; the 2-rank run with uneven widths is in tests/test_split_api.py.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from whale.ir.cluster_spec import parse_cluster
from whale.planner.cost.formulas import training_memory
from whale.planner.cost.layers import Layer, ModelProfile
from whale.planner.search.rank_layouts import tensor_groups
from whale.planner.search.pins import Pins
from whale.planner.cost.predict import CostModel, CostOptions, achievable_peak
from whale.planner.search.auto import search
from whale.planner.search.speed_shards import speed_shard_sizes

_WORKSTATION = "node0=1xA100-80GB+1xT4"


def _profile(n=4, params=2**24):
    return ModelProfile.from_layers([Layer.simple(f"l{k}", flops=1e10, param_bytes=params, act_bytes=1e7) for k in range(n)])


def test_pinned_tensor_parallel_on_a_workstation_gives_the_a100_more():
    cluster = parse_cluster(_WORKSTATION)
    result = search(_profile(), cluster, 16, pins=Pins(tensor_parallel=2))
    layout, pred = result.best.candidate.layout, result.best.prediction
    assert layout.pipelines == (((0, 1),),)  # one group: A100 then T4
    costs = CostModel(_profile(), cluster)
    a100, t4 = costs.shard_shares((0, 1))
    assert a100 > t4 and math.isclose(a100 + t4, 1.0)
    assert math.isclose(a100 / t4, achievable_peak(costs.device_of[0]) / achievable_peak(costs.device_of[1]))
    # Each member keeps its share of the sharded states (Layer.simple shards everything).
    per_param = costs.state_bytes_per_param
    states = [costs.state_bytes(w, [(0, 4)]) for w in (a100, t4)]
    assert states == [int(4 * 2**24 * w * per_param) for w in (a100, t4)]
    assert pred.rank_memory[0] > pred.rank_memory[1]
    assert all(m <= c for m, c in zip(pred.rank_memory, pred.rank_capacity))


def test_speed_shard_sizes_on_a_workstation():
    cluster = parse_cluster(_WORKSTATION)
    sizes = speed_shard_sizes(cluster, [(0, 1)], {"attn": (4, 3 * 32 * 8), "mlp": (128, 64), "head": (64, 32)})
    assert sizes == {"attn": (3, 1), "mlp": (90, 38), "head": (45, 19)}
    # Groups of one type keep even shards: no sizes.
    assert speed_shard_sizes(parse_cluster("2xA100-80GB,2xT4"), [(0, 1), (2, 3)], {"mlp": (128, 64)}) == {}


def test_mixed_groups_must_share_one_pattern():
    cluster = parse_cluster("node0=1xA100-80GB+1xT4,node1=2xA100-80GB")
    assert tensor_groups(cluster, 2) is None  # (A100, T4) and (A100, A100) need two size lists
    assert tensor_groups(parse_cluster("a=1xA100-80GB+1xT4,b=1xA100-80GB+1xT4"), 2) == ((0, 1), (2, 3))
    assert tensor_groups(parse_cluster("a=2xA100-80GB+2xT4"), 2) == ((0, 1), (2, 3))  # each of one type
    assert tensor_groups(cluster, 1) == ((0,), (1,), (2,), (3,))
    with pytest.raises(ValueError, match="mix device types differently"):
        speed_shard_sizes(cluster, [(0, 1), (2, 3)], {"mlp": (128, 64)})
    with pytest.raises(ValueError, match="admit no plan"):
        search(_profile(), cluster, 16, pins=Pins(tensor_parallel=2))


def test_a_region_too_large_for_any_split_is_named():
    with pytest.raises(ValueError, match=r"cannot shard 'huge' \(4 atoms\) over A100-80GB \+ T4"):
        speed_shard_sizes(parse_cluster(_WORKSTATION), [(0, 1)], {"huge": (4, 2**40)})


_DEVICES = ["A100-80GB", "T4", "V100-32GB", "A10", "H100-80GB", "L4"]


@settings(max_examples=60, deadline=None)
# Memory caps the A10s below their rounded-up share; the one-atom minimum lifts three A100s.
@example(types=["A100-80GB", "T4", "A10", "A10"], regions=[(11, 1), (277, 14390854)])
@example(types=["A100-80GB", "A100-80GB", "A100-80GB", "H100-80GB"], regions=[(4, 0)])
@given(
    types=st.lists(st.sampled_from(_DEVICES), min_size=2, max_size=4),
    regions=st.lists(st.tuples(st.integers(4, 512), st.integers(0, 2**26)), min_size=1, max_size=4),
)
def test_speed_shard_sizes_invariants(types, regions):
    cluster = parse_cluster("ws=" + "+".join(f"1x{t}" for t in types))
    group = tuple(range(len(types)))
    given_regions = {f"r{k}": r for k, r in enumerate(regions)}
    options = CostOptions()
    try:
        sizes = speed_shard_sizes(cluster, [group], given_regions, options)
    except ValueError as error:
        assert "cannot shard" in str(error)  # too large for memory: said, never dropped
        return
    if len(set(types)) == 1:
        assert sizes == {}
        return
    devices = [d.profile for d in cluster.devices()]
    speeds = [achievable_peak(d, options) for d in devices]
    per_param = training_memory(1, optimizer=options.optimizer, precision=options.precision).total
    usable = [d.memory_bytes * options.memory_fraction for d in devices]
    total = sum(n * p for n, p in given_regions.values())
    held = [0.0] * len(types)
    for name, (atoms, params) in given_regions.items():
        got = sizes[name]
        assert sum(got) == atoms and min(got) >= 1
        fair = [atoms * s / sum(speeds) for s in speeds]
        # Memory moved atoms away where a device's share of its memory for this region (the
        # region's part of all sharded parameters) holds fewer than its fair count rounded up.
        caps = [u * atoms / (total * per_param) if params else math.inf for u in usable]
        capped = any(math.ceil(f) > c for f, c in zip(fair, caps))
        # Every device holds at least one atom: lifting one from below moves atoms away too.
        lifted = any(f < 1 for f in fair)
        if not capped and not lifted:
            assert all(abs(g - f) < 1 + 1e-9 for g, f in zip(got, fair)), (got, fair)
        for k, g in enumerate(got):
            held[k] += g * params * per_param
    for k, d in enumerate(devices):
        assert held[k] <= d.memory_bytes * options.memory_fraction + 1  # no device over memory
