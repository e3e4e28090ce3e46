"""The search against brute force, its invariants, pins, and the pieces it is built from.

The oracle enumerates the whole plan space of small instances independently of the planner:
every tensor-parallel degree, pipeline degree and interleave, every arrangement of devices into
pipelines (devices of one node are interchangeable), every schedule, micro-batch count and cut,
and the best rows per replica by a dynamic program over replicas (replicas meet only in the
gradient all-reduce, so the step is the slowest replica's time). It scores with the same cost
model (:class:`CostModel`), so the comparison measures the search, not the model.

Tolerances: the planner must be within 2% of the brute-force optimum (the issue's bar); flow
shop and simulator agree to 1e-9 relative (the same float sums in a different order).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from tests.plan_oracle import brute_force, structure_key, structure_optima
from whale.capture import capture, module_annotation_map
from whale.config import Config
from whale.ir.cluster_spec import parse_cluster
from whale.ir.plan import Plan
from whale.planner.cost.layers import Layer, ModelProfile
from whale.planner.cost.model_profile import profile_model
from whale.planner.cost.predict import CostModel, CostOptions
from whale.planner.schedules.flow_shop import flow_shop, peak_held, peak_held_bound
from whale.planner.schedules.generate import make_schedule
from whale.planner.schedules.simulator import simulate
from whale.planner.search.auto import SearchSettings, auto_plan, plan_of, search
from whale.planner.search.explore import Explorer, NoPlanError
from whale.planner.search.pins import Pins, pins_from
from whale.planner.search.space import SearchSpace
from whale.primitives import pipeline, replicate, stage

DEVICES = ["A100-80GB", "V100-32GB", "T4", "A10", "H100-80GB", "P100-16GB"]


@st.composite
def instances(draw, max_devices=8):
    a_type, b_type = draw(st.lists(st.sampled_from(DEVICES), min_size=2, max_size=2, unique=True))
    a = draw(st.integers(1, max_devices - 1))
    b = draw(st.integers(1, max_devices - a))
    spec = f"{a}x{a_type},{b}x{b_type}"
    n = draw(st.integers(2, 5))
    layers = []
    for k in range(n):
        layers.append(Layer.simple(
            f"l{k}",
            flops=draw(st.floats(1e9, 2e12)),
            param_bytes=draw(st.integers(1, 6)) * 2**30 // draw(st.sampled_from([2, 8, 32])),
            act_bytes=draw(st.floats(1e6, 4e9)),
            row_bytes=draw(st.floats(0, 1e9)),
            hidden_bytes=draw(st.floats(1e5, 1e8)),
        ))  # fmt: skip
    batch = draw(st.integers(1, 10))
    return parse_cluster(spec), ModelProfile.from_layers(layers), batch


def _instance(spec, batch, layers):
    """An instance as :func:`instances` draws it; layers are (flops, param_bytes, act_bytes,
    row_bytes, hidden_bytes)."""
    fields = ("flops", "param_bytes", "act_bytes", "row_bytes", "hidden_bytes")
    layers = [Layer.simple(f"l{k}", **dict(zip(fields, values))) for k, values in enumerate(layers)]
    return parse_cluster(spec), ModelProfile.from_layers(layers), batch


# Instances randomized runs found 2-19% off, each fixed in the search (see the examples):
# balanced cuts ignore fill, drain and the gradient all-reduce, so a structure whose balanced
# cuts were poor was estimated high and never refined (screening now tries every cut when
# there are few, and every structure of few stages climbs); the lower bound assumed every
# device equally faster on every layer, and cut off the optimum (T4 + A100); and a structure
# was dropped when its most-micro-batch sibling did not fit, though with uneven rows fewer
# micro-batches hold less (V100 + P100).
_FOUND = {
    "all-reduce over the network": _instance("3xA100-80GB,5xV100-32GB", 5, [(1e9, 134217728, 1e6, 0.0, 1e5)] * 3),
    "one micro-batch: the sum of stages, not the slowest": _instance("5xA100-80GB,3xA10", 7, [
        (241823356410.29187, 67108864, 1999926264.4793358, 1.0, 22300019.829613492),
        (714592391322.651, 134217728, 4e9, 0.0, 1e7),
        (1190822057566.0789, 805306368, 1116984745.6397264, 198808727.4463651, 15171809.536179198),
        (55181706678.16018, 536870912, 3302475669.1458035, 191795309.3017069, 28186974.98459018)]),
    "all-reduce over the network, one A100 node": _instance("7xH100-80GB,1xA100-80GB", 6, [
        (4e9, 671088640, 237475075.88705602, 999999999.0, 1e7),
        (379878169919.054, 3221225472, 1e7, 2.606309324054856e-239, 99734129.75711018),
        (328311165505.0864, 1073741824, 119289908.38623819, 619663052.7030976, 3834049.9018041505),
        (1179971397599.9102, 1073741824, 43890489.975935504, 970932460.26923, 70815278.48586443)]),
    "all-reduce, cuts not convex (no climb reaches them)": _instance("3xA10,5xH100-80GB", 4, [
        (461351576442.4415, 536870912, 1e7, 715298188.0689642, 77235967.61360845),
        (361166342859.38196, 2147483648, 2077286316.4328384, 108757724.89804405, 34625371.53491938),
        (1651065188857.7922, 67108864, 2590675561.55548, 995851681.4750127, 4138319.7269005263),
        (1377613998261.4023, 167772160, 622977996.4235928, 0.0, 1e7)]),
    "interleaved cuts": _instance("5xA100-80GB,3xV100-32GB", 10, [
        (1277466126975.244, 3221225472, 1e7, 683724120.8513665, 47820364.10075158),
        (1197680708385.5413, 3221225472, 1998238271.0497453, 3.1322872154596806e-61, 51309749.65030424),
        (940344942253.5244, 3221225472, 3926460038.7448173, 9.6e-06, 85584031.80253144),
        (736063666018.5372, 1610612736, 1440783220.7573361, 616196093.0543832, 32804251.957584508),
        (228860789609.51334, 536870912, 3745858515.010601, 713939751.265581, 56574337.06469905)]),
    "bound above the optimum": _instance("1xT4,1xA100-80GB", 5, [
        (1e9, 33554432, 1e6, 0.0, 1224486.0100196926),
        (1e9, 33554432, 1e6, 0.0, 1e5),
        (1e9, 33554432, 1e6, 953657820.1499023, 1e5)]),
    "uneven rows: fewer micro-batches hold less": _instance("3xV100-32GB,3xP100-16GB", 7, [
        (1000000000.0000001, 536870912, 3625269243.482813, 689886275.7004324, 50529807.41440306),
        (1370037485728.4146, 3221225472, 591554102.022773, 856809537.830326, 54567154.928319015),
        (9e11, 1610612736, 975945482.2350279, 648182601.1321869, 91990042.4567912),
        (1696111681169.3777, 536870912, 1e7, 5e-324, 15202174.826978419),
        (1501869010508.8093, 536870912, 235599543.61021185, 6.103515625e-05, 63447098.410431884)]),
    "interleaved cuts, one A10": _instance("5xP100-16GB,1xA10", 10, [
        (1611045372656.4941, 100663296, 1e7, 919255276.2364867, 99999999.0),
        (1679560154851.31, 2147483648, 1e6, 558124086.016809, 94662632.33563325),
        (1e9, 536870912, 1377181423.965963, 9139927.130857209, 48190954.66541852),
        (1912623049827.359, 67108864, 1138893363.6060627, 225696163.85567275, 8447647.536823757),
        (1983061030478.9988, 134217728, 1999488504.3900285, 307944524.1491943, 51360662.22024438)]),
}  # fmt: skip


def _with_found(test):
    """``test`` with every instance of ``_FOUND`` as an explicit example (run before the draws)."""
    for instance in reversed(list(_FOUND.values())):
        test = example(instance)(test)
    return test


# derandomize: CI replays one fixed set of 80 instances (a regression fails every run, not one in
# many), after the instances randomized runs once found off (_FOUND).
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(instances())
@_with_found
def test_search_within_two_percent_of_brute_force(instance):
    cluster, profile, batch = instance
    oracle, best = brute_force(profile, cluster, batch)
    try:
        result = search(profile, cluster, batch, settings=SearchSettings(finalists=6))
    except NoPlanError:
        assert oracle == math.inf, f"the search found nothing but {best} runs in {oracle}"
        return
    except ValueError:
        assert oracle == math.inf
        return
    found = result.best.prediction.step_time
    assert result.best.prediction.fits
    assert found <= oracle * 1.02, (found, oracle, result.best.candidate, best)
    assert found >= oracle * (1 - 1e-9), "the search beat the whole space: the oracle is wrong"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(instances())
@example(_FOUND["bound above the optimum"])
def test_bound_is_below_every_plan_of_its_structure(instance):
    # Screening stops at the first structure whose bound exceeds its best estimate: a bound
    # above a plan of its own structure would cut that plan off unseen.
    cluster, profile, batch = instance
    optima = structure_optima(profile, cluster, batch)
    node_of = [k for k, node in enumerate(cluster.nodes) for _ in range(node.num_devices)]
    space = SearchSpace(profile, cluster, batch, CostOptions(), Pins(), SearchSettings())
    for structure in space.structures():
        best, _ = optima[structure_key(structure.layout, node_of, structure.num_stages, structure.schedule, structure.num_micro_batch)]
        assert structure.bound <= best * (1 + 1e-9), (structure, best)


def test_screening_stops_at_an_exact_time_as_soon_as_one_is_known(monkeypatch):
    # The structure with the best estimate so far is refined at once, and no structure whose
    # bound reaches an exact time known is screened. Here the winner's exact time lies below
    # the best estimate, and 18 structures' bounds between them: screening by estimates alone
    # screened them all.
    events, in_group_check = [], []
    screen, refine, group_fits = Explorer.screen, Explorer.refine, Explorer._group_fits

    def logged_screen(self, st):
        found = screen(self, st)
        if not in_group_check:  # a group's least-memory structure, screened for its memory
            events.append(("screen", st.bound, None if found is None else found[0]))
        return found

    def logged_group_fits(self, st, least):
        in_group_check.append(st)
        try:
            return group_fits(self, st, least)
        finally:
            in_group_check.pop()

    def logged_refine(self, st, cuts, rows):
        found = refine(self, st, cuts, rows)
        events.append(("refine", st.bound, None if found is None or not found.prediction.fits else found.prediction.step_time))
        return found

    monkeypatch.setattr(Explorer, "screen", logged_screen)
    monkeypatch.setattr(Explorer, "refine", logged_refine)
    monkeypatch.setattr(Explorer, "_group_fits", logged_group_fits)
    # No alternatives for explain: those are screened past the stop on purpose.
    settings_ = SearchSettings(finalists=1, alternatives=0)
    explorer = Explorer(_profile(n=10), parse_cluster("2xA100-80GB,2xV100-32GB,4xT4"), 32, CostOptions(), Pins(), settings_)
    winner = explorer.run().best.prediction.step_time
    exact = math.inf
    for kind, bound, time in events:
        if kind == "screen":
            assert bound <= exact, (bound, exact)
        elif time is not None:
            exact = min(exact, time)
    best_estimate = min(t for kind, _, t in events if kind == "screen" and t is not None)
    between = {id(x) for x in explorer.structures() if winner < x.bound <= best_estimate}
    assert len(between) >= 10, (winner, best_estimate)
    screened_bounds = [b for kind, b, _ in events if kind == "screen"]
    assert not any(winner < b <= best_estimate for b in screened_bounds)


def test_a_tensor_parallel_bound_counts_its_all_reduces_twice_not_three_times():
    # A tensor-parallel layer all-reduces once in forward and once in backward around 3x its
    # compute: the bound once counted 3x (compute + all-reduce) and lay 49% above the only plan
    # of that structure (two A100s over a 1 GB/s link), which screening then never saw.
    layers = [Layer(name=f"b{i}", flops=(2e9,), row_bytes=(1e5,), fixed_bytes=(4e6,), num_sharded=1,
                    param_bytes=4_000_000, replicated_param_bytes=0, act_bytes=1e6, replicated_act_bytes=0.0,
                    hidden_bytes=4e6, tp_all_reduces=2) for i in range(4)]  # fmt: skip
    cluster, profile, batch = parse_cluster("node0=2xA100-80GB(intra=1GB/s,intra_lat=100us)"), ModelProfile.from_layers(layers), 8
    optima = structure_optima(profile, cluster, batch)
    space = SearchSpace(profile, cluster, batch, CostOptions(), Pins(), SearchSettings())
    split = [st for st in space.structures() if st.layout.tensor_parallel == 2]
    assert split
    for structure in split:
        best, _ = optima[structure_key(structure.layout, [0, 0], structure.num_stages, structure.schedule, structure.num_micro_batch)]
        assert best < math.inf and best * 0.999 <= structure.bound <= best * (1 + 1e-9), (structure, best)


def test_brute_force_sees_heterogeneous_pipelines():
    # A case the oracle must solve with a mixed pipeline: the model fits only across both types.
    layers = [Layer.simple(f"l{k}", flops=1e11, param_bytes=3 * 2**30, act_bytes=1e6) for k in range(4)]
    cluster = parse_cluster("2xA100-80GB,2xT4")
    profile = ModelProfile.from_layers(layers)
    oracle, best = brute_force(profile, cluster, 8)
    result = search(profile, cluster, 8)
    assert best.layout.pipeline_degree > 1
    assert result.best.prediction.step_time <= oracle * 1.02


# --- invariants on random clusters -----------------------------------------------------------------


@st.composite
def big_instances(draw):
    types = draw(st.lists(st.sampled_from(DEVICES), min_size=1, max_size=3, unique=True))
    nodes = [f"n{k}={draw(st.sampled_from([1, 2, 4, 8]))}x{draw(st.sampled_from(types))}" for k in range(draw(st.integers(1, 4)))]
    n = draw(st.integers(2, 16))
    layers = [
        Layer.simple(
            f"l{k}",
            flops=draw(st.floats(1e9, 1e12)),
            param_bytes=draw(st.integers(1, 2**32)),
            act_bytes=draw(st.floats(1e5, 1e9)),
            hidden_bytes=1e6,
        )
        for k in range(n)
    ]
    return parse_cluster(",".join(nodes)), ModelProfile.from_layers(layers), draw(st.integers(1, 128))


@settings(max_examples=10, deadline=None)
@given(big_instances())
def test_plan_invariants(instance):
    cluster, profile, batch = instance
    try:
        result = search(profile, cluster, batch)
    except ValueError:  # NoPlanError included: nothing fits, or a batch smaller than any plan
        return
    c, pred = result.best.candidate, result.best.prediction
    layout = c.layout
    ranks = [r for pipe in layout.pipelines for g in pipe for r in g]
    # Device counts add up: every rank exactly once, dp x pp x tp = world.
    assert sorted(ranks) == list(range(cluster.world_size))
    assert layout.dp_degree * layout.pipeline_degree * layout.tensor_parallel == cluster.world_size
    # Every layer placed once: stages are contiguous, non-empty, and cover all layers.
    bounds = (0, *c.cuts, profile.num_layers)
    assert all(a < b for a, b in itertools.pairwise(bounds)) and len(bounds) == c.num_stages + 1
    assert c.num_stages % layout.pipeline_degree == 0
    # Rows add up and every micro-batch has a row.
    assert sum(c.rows) == batch and min(c.rows) >= c.num_micro_batch
    # No device over memory, recomputed from the per-rank prediction.
    assert all(m <= cap for m, cap in zip(pred.rank_memory, pred.rank_capacity))
    assert pred.rank_capacity == tuple(CostModel(profile, cluster).capacity(r) for r in range(cluster.world_size))
    plan = plan_of(result.best, profile, cluster)
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.rows(batch) == c.rows


def test_faster_replicas_take_more_rows_and_memory_caps_them():
    layers = [Layer.simple(f"l{k}", flops=5e11, param_bytes=2**28, act_bytes=2e7) for k in range(4)]
    profile = ModelProfile.from_layers(layers)
    result = search(profile, parse_cluster("1xH100-80GB,1xT4"), 24, pins=Pins(pipeline_degree=1))
    c = result.best.candidate
    assert c.num_stages == 1 and c.rows[0] > c.rows[1]  # the H100 is faster
    # Speed alone would give the T4 7 of 24 rows; its memory holds 2 per micro-batch (4 GiB of
    # states, 4.8 GB of activations per row, 14.4 GiB usable), so 4 rows: the rest moves over.
    heavy = ModelProfile.from_layers([Layer.simple(f"l{k}", flops=5e11, param_bytes=2**28, act_bytes=1.2e9) for k in range(4)])
    result = search(heavy, parse_cluster("1xA100-80GB,1xT4"), 24, pins=Pins(pipeline_degree=1, num_micro_batch=2))
    assert result.best.prediction.fits and result.best.candidate.rows == (20, 4)


# --- pins and errors ------------------------------------------------------------------------------------


def _profile(n=6, params=2**24):
    return ModelProfile.from_layers([Layer.simple(f"l{k}", flops=1e10, param_bytes=params, act_bytes=1e7) for k in range(n)])


@pytest.mark.parametrize(
    "pins, check",
    [
        (Pins(pipeline_degree=2), lambda c: c.layout.pipeline_degree == 2),
        (Pins(num_micro_batch=4), lambda c: c.num_micro_batch == 4),
        (Pins(tensor_parallel=2), lambda c: c.layout.tensor_parallel == 2),
        (Pins(num_stages=4, pipeline_degree=2), lambda c: c.num_stages == 4 and c.schedule == "interleaved_1f1b"),
        (Pins(schedule="gpipe"), lambda c: c.schedule == "gpipe" and c.num_stages > 1),
        (Pins(row_weights=(3.0, 1.0)), lambda c: c.rows == (12, 4)),
        (Pins(cuts=(2, 4), num_stages=3), lambda c: c.cuts == (2, 4) and c.layout.pipeline_degree == 3),
    ],
)
def test_pins_are_kept(pins, check):
    cluster = parse_cluster("3xA100-80GB,3xV100-32GB" if pins.cuts else "4xA100-80GB,4xV100-32GB")
    result = search(_profile(), cluster, 12 if pins.cuts else 16, pins=pins)
    assert check(result.best.candidate), result.best.candidate


def test_contradicting_pins_are_named():
    with pytest.raises(ValueError, match=r"num_stages.*pipeline_degree.*contradict"):
        Pins(num_stages=3, pipeline_degree=2)
    with pytest.raises(ValueError, match=r"only interleaved_1f1b runs"):
        Pins(num_stages=4, pipeline_degree=2, schedule="1f1b")
    pinned = Pins(tensor_parallel=3, sources={"tensor_parallel": "--tensor-parallel 3"})
    with pytest.raises(ValueError, match=r"--tensor-parallel 3.*admit no plan"):
        search(_profile(), parse_cluster("4xA100-80GB"), 16, pins=pinned)
    with pytest.raises(ValueError, match=r"pipeline\(num_micro_batch=8\).*Config\(num_micro_batch=4\)"):
        pins_from({"": (pipeline(8),)}, Config(num_micro_batch=4))
    with pytest.raises(ValueError, match=r"row_weights.*replica_group|replicate"):
        Pins(row_weights=(1.0, 1.0, 1.0), replica_group=2)


def test_model_that_fits_nowhere_names_the_smallest_shortfall():
    huge = _profile(n=4, params=40 * 2**30)  # 160 GiB of fp32 Adam state per layer
    with pytest.raises(NoPlanError, match=r"fits on no plan.*needs [\d.]+ GiB on rank \d+ \(T4\).*GiB missing there"):
        search(huge, parse_cluster("2xT4"), 8)


# --- the engine's parts -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["gpipe", "1f1b", "interleaved_1f1b"]),
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(1, 3),
    st.randoms(use_true_random=False),
)
def test_flow_shop_equals_the_simulator(name, p, v, k, rnd):
    v = v if name == "interleaved_1f1b" else 1
    s, m = p * v, p * k if name == "interleaved_1f1b" else k + p - 1
    f = [rnd.uniform(0.1, 3) for _ in range(s)]
    b = [rnd.uniform(0.1, 5) for _ in range(s)]
    c = [rnd.uniform(0, 1) for _ in range(s - 1)]
    sched = make_schedule(name, s, m, p if name == "interleaved_1f1b" else None)
    ref = simulate(sched, f, b, c)
    fast = flow_shop(name, p, m, f, b, c)
    assert fast.step_time == pytest.approx(ref.step_time, rel=1e-9)
    assert fast.busy == pytest.approx(ref.per_rank_busy, rel=1e-9)
    acts = [rnd.uniform(0, 1) for _ in range(s)]
    assert peak_held(name, p, m, [1.0] * s) == tuple(float(x) for x in ref.peak_in_flight)
    exact, bound = peak_held(name, p, m, acts), peak_held_bound(name, p, m, acts)
    assert all(u >= e - 1e-12 for e, u in zip(exact, bound))
    if name != "interleaved_1f1b":
        assert bound == pytest.approx(exact)


def test_group_link_matches_the_cluster():
    cluster = parse_cluster("n0=4xA100-80GB,n1=2xV100-32GB(net=25Gbps),n2=2xT4")
    costs = CostModel(_profile(), cluster)
    for group in [(0,), (0, 1), (0, 4), (4, 5, 6), tuple(range(8)), (1, 7)]:
        assert costs.group_link(group) == cluster.group_link(group)


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.out(torch.relu(self.fc(x)))


class _Net(nn.Module):
    def __init__(self, d=32, n=6, stages=False):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.blocks = nn.ModuleList()
        for k in range(n):
            if stages and k in (0, n // 2):
                with stage():
                    self.blocks.append(_Block(d))
            else:
                self.blocks.append(_Block(d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_layers_of_a_captured_model_cover_every_node_once():
    captured = capture(_Net(), (torch.randn(4, 8),))
    profile = profile_model(captured, 4, granularity=4)
    assert [layer.name for layer in profile.layers] == ["embed", *[f"blocks.{k}" for k in range(6)], "head"]
    flops = sum(layer.total_flops for layer in profile.layers) * 4
    assert flops == pytest.approx(captured.total_flops)
    assert sum(layer.param_bytes for layer in profile.layers) == captured.total_param_bytes
    # A cut between blocks sends the residual stream: one (rows, 32) float tensor per row.
    assert profile.cut_bytes[3] == 32 * 4


def test_auto_plan_keeps_stage_annotations_and_runs_the_runtime_shape():
    torch.manual_seed(0)
    model = _Net(stages=True)
    x = torch.randn(16, 8)
    captured = capture(model, (x,))
    scopes = dict(module_annotation_map(model))
    plan, report = auto_plan(captured, scopes, 4, Config(auto_parallel=True), cluster=parse_cluster("2xA100-80GB,2xV100-32GB"), global_batch=16)
    assert plan.num_stages == 2 and plan.stage_boundaries == () and plan.pipeline_degree in (1, 2)
    assert Plan.from_json(plan.to_json()) == plan
    assert "stage 1 on" in report.explain() or plan.pipeline_degree == 1
    # A partial annotation: replicate(device_count=None) is completed, Config pins are kept.
    with replicate():
        model = _Net()
    plan, report = auto_plan(capture(model, (x,)), dict(module_annotation_map(model)), 4,
                             Config(auto_parallel=True, num_micro_batch=2),
                             cluster=parse_cluster("4xT4"), global_batch=16)  # fmt: skip
    assert plan.num_micro_batch == 2 and sum(plan.rows(16)) == 16
    assert "rows/s" in report.table()


# --- the plan executes: auto_plan's output on the runtime, against the local model ---------------


def _auto_plan_case(pipeline_degree: int | None, split: bool = False) -> dict:
    """On each rank of a 2-rank pool: plan a tiny GPT for an A100 + T4 cluster, run the plan.

    With ``split``, the MLPs carry ``split()`` without a device count (a partial annotation the
    planner completes) on one node of two A100s.
    """
    import copy

    import whale as wh
    from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss
    from tests.equivalence import train_distributed, train_reference

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=32)
    corpus = SyntheticCorpus(cfg.vocab_size, length=4096)
    batches = [corpus.batch(12, cfg.block_size, s) for s in range(2)]
    model = GPT(cfg)
    if split:
        from whale.primitives import annotate
        from whale.primitives import split as split_annotation

        annotate(model, {f"blocks.{k}.mlp": split_annotation() for k in range(cfg.n_layer)})
    out = train_reference(copy.deepcopy(model), batches, lm_loss)
    config = Config(
        auto_parallel=True,
        pipeline_degree=pipeline_degree,
        cluster="2xA100-80GB" if split else "1xA100-80GB,1xT4",
    )
    program = wh.parallelize(model, loss_fn=lm_loss, example_inputs=(batches[0][0],), config=config)
    plan = program.plan
    out.update(train_distributed(program, batches, out.pop("ref_states")))
    out["plan"] = plan.to_json()
    return out


@pytest.mark.parametrize("pipeline_degree, split", [(1, False), (2, False), (None, True)])
def test_auto_plans_execute_and_match_the_local_model(world2, pipeline_degree, split):
    from tests.equivalence import assert_equivalent

    outs = world2.run("tests.test_search:_auto_plan_case", pipeline_degree, split)
    plan = Plan.from_json(outs[0]["plan"])
    if split:
        assert plan.tensor_parallel == 2 and plan.pipelines == ((0, 1),)  # split() completed
    else:
        assert plan.pipeline_degree == pipeline_degree
    if pipeline_degree == 1:
        assert plan.rows(12)[0] > plan.rows(12)[1]  # the A100 replica takes more rows
    for out in outs:
        assert_equivalent(out, names=out["params"])  # a stage's rank holds its stage's parameters


def test_no_plan_error_writes_a_message_given_as_a_function_once_when_read():
    import pickle

    calls = []
    err = NoPlanError(lambda: calls.append(1) or "the model fits on no plan of this cluster")
    assert calls == []  # not written until read
    assert str(err) == "the model fits on no plan of this cluster" and str(err) == str(err)
    assert calls == [1] and err.args == (str(err),)
    copy = pickle.loads(pickle.dumps(NoPlanError(lambda: "nothing fits")))
    assert type(copy) is NoPlanError and str(copy) == "nothing fits"
    with pytest.raises(NoPlanError, match="fits on no plan"):
        raise err
