"""``CostModel``'s time memos give the times a direct computation gives.

``stage_lists`` memoises per replica and per stage on (group, rows per micro-batch, layer
range), ``optimizer_times`` per position on (group, layer ranges) and ``sync_time`` per position
on (layout, position, layer ranges). Each is right only if the value reads nothing else, so a
key that drops a part (the rows, the group, another position's layers) or a layout whose id is
reused by a new one would return a stale value. Checked on one CostModel whose memos warm up
over many pipelines, rows, micro-batches and cuts, against the formulas computed from scratch,
and layouts made and dropped in a loop (CPython hands their ids to the next ones).
Tolerance: exact (the same arithmetic in the same order).
"""

from __future__ import annotations

import random

import pytest

from whale.ir.cluster_spec import parse_cluster
from whale.planner.cost.formulas import (
    optimizer_step_time,
    point_to_point_time,
)
from whale.planner.cost.layers import Layer, ModelProfile
from whale.planner.cost.predict import CostModel, CostOptions, RankLayout


def _costs(rnd: random.Random, n: int) -> CostModel:
    layers = tuple(
        Layer(**{**(base := Layer.simple(f"l{k}", flops=rnd.uniform(1e10, 1e12), param_bytes=rnd.randint(1, 8) * 2**26,
                                          act_bytes=rnd.uniform(1e6, 1e8), hidden_bytes=1e6)).__dict__,
                 "replicated_param_bytes": base.param_bytes // 8, "tp_all_reduces": 2})
        for k in range(n)
    )  # fmt: skip
    profile = ModelProfile(layers=layers, cut_bytes=(0.0,) + tuple(rnd.uniform(1e5, 1e7) for _ in range(n - 1)))
    cluster = parse_cluster("a=4xA100-80GB,v=4xV100-32GB,t=4xT4")
    return CostModel(profile, cluster, CostOptions(dtype="bf16", precision="mixed"))


def _direct_stages(costs: CostModel, pipe, s: int, m: int, cuts, rows: int):
    p, q = len(pipe), rows / m
    bounds = (0, *cuts, costs.num_layers)
    both = [costs.group_times(pipe[j % p], costs.shard_shares(pipe[j % p]), q, bounds[j], bounds[j + 1]) for j in range(s)]
    p2p = []
    for j in range(s - 1):
        a, b = pipe[j % p][0], pipe[(j + 1) % p][0]
        p2p.append(0.0 if a == b else point_to_point_time(costs.cut_bytes[bounds[j + 1]] * q, costs.link(a, b)))
    return [f for f, _ in both], [b for _, b in both], p2p


def _direct_optimizer(costs: CostModel, pipe, s: int, cuts):
    p, bounds, out = len(pipe), (0, *cuts, costs.num_layers), []
    for pos, group in enumerate(pipe):
        blocks = [(bounds[j], bounds[j + 1]) for j in range(pos, s, p)]
        tensors = int(sum(costs.param_tensors[b] - costs.param_tensors[a] for a, b in blocks))
        repl = sum(costs.repl_params[b] - costs.repl_params[a] for a, b in blocks)
        sharded = sum(costs.block_param_bytes(a, b) for a, b in blocks) - repl
        out.append(max(
            optimizer_step_time((sharded * w + repl) / costs.profile.param_dtype_bytes, tensors, costs.device_of[r],
                                optimizer=costs.options.optimizer, precision=costs.options.precision)
            for r, w in zip(group, costs.shard_shares(group))
        ))  # fmt: skip
    return tuple(out)


def _direct_sync(costs: CostModel, layout: RankLayout, s: int, cuts):
    p, dp = layout.pipeline_degree, layout.dp_degree
    bounds, out, tail = (0, *cuts, costs.num_layers), [], []
    first, cap = costs.options.first_bucket_bytes, costs.options.bucket_bytes
    for pos in range(p):
        groups = [pipe[pos] for pipe in layout.pipelines]
        blocks = [(bounds[j], bounds[j + 1]) for j in range(pos, s, p)]
        repl = sum(costs.repl_params[b] - costs.repl_params[a] for a, b in blocks)
        sharded = sum(costs.block_param_bytes(a, b) for a, b in blocks) - repl
        grad = (sharded * max(costs.shard_shares(groups[0])) + repl) * costs.grad_bytes_per_param
        link = costs.group_link([g[0] for g in groups])
        last = grad if grad <= first else (grad - first) % cap or cap
        for size, into in ((grad, out), (last, tail)):
            into.append(2 * (dp - 1) * link.latency + 2 * (dp - 1) / dp * size / link.bandwidth)
    return out, tail


@pytest.mark.parametrize("seed", range(3))
def test_memoised_stage_times_match_direct_computation(seed):
    rnd = random.Random(seed)
    n = 12
    costs = _costs(rnd, n)
    # Ranks 0-3 A100, 4-7 V100, 8-11 T4: groups of one kind, of two kinds, and one rank in two pipelines.
    pipelines = [((0, 1), (4,), (8, 9)), ((0,), (1,)), ((4, 5, 6, 7),), ((8,), (0, 1), (5,), (10, 11)), ((2,), (9, 3))]
    checked = 0
    for _ in range(200):
        pipe = rnd.choice(pipelines)
        p = len(pipe)
        s = p * (rnd.choice([1, 2, 3]) if p > 1 else 1)
        if s > n:
            continue
        m = rnd.choice([1, 2, 4, 8])
        cuts = tuple(sorted(rnd.sample(range(1, n), s - 1)))
        rows = rnd.choice([m, 2 * m, 3 * m + 1])
        forward, backward, p2p = costs.stage_lists(pipe, s, m, cuts, rows)
        assert (forward, backward, p2p) == _direct_stages(costs, pipe, s, m, cuts, rows), (pipe, s, m, cuts, rows)
        forward.append(-1.0)  # the caller's lists are its own: the memo is not changed
        assert costs.stage_lists(pipe, s, m, cuts, rows) == _direct_stages(costs, pipe, s, m, cuts, rows)
        assert costs.optimizer_times(pipe, s, cuts) == _direct_optimizer(costs, pipe, s, cuts), (pipe, s, cuts)
        # The time floor's terms: the same floats, per position, without the lists.
        forward, backward, p2p = costs.stage_lists(pipe, s, m, cuts, rows)
        both = [f + b for f, b in zip(forward, backward)]
        terms = (tuple(sum(both[r::p]) for r in range(p)), tuple(forward[:p]), tuple(backward[:p]), tuple(p2p[:p]))
        assert costs.floor_terms(pipe, s, m, cuts, rows) == (*terms, _direct_optimizer(costs, pipe, s, cuts))
        checked += 1
    assert checked > 150


def test_memoised_sync_times_match_direct_computation():
    rnd = random.Random(7)
    n = 10
    costs = _costs(rnd, n)
    shapes = [  # replicas of pipelines; the same positions over different ranks and links
        (((0,), (4,)), ((1,), (5,)), ((8,), (9,))),
        (((0, 1),), ((4, 5),)),
        (((4,), (0,)), ((10,), (2,))),
    ]
    for _ in range(150):
        layout = RankLayout(rnd.choice([1, 2]), rnd.choice(shapes))  # a new object: ids are reused
        p = layout.pipeline_degree
        s = p * rnd.choice([1, 2, 3])
        cuts = tuple(sorted(rnd.sample(range(1, n), s - 1)))
        got = costs.sync_time(layout, s, cuts)
        out, tail = _direct_sync(costs, layout, s, cuts)
        assert tuple(got) == tuple(out) and got.tail == tuple(tail), (layout, s, cuts)
