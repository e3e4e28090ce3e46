"""``CostModel.replica_memory``'s per-member memo gives the bytes the direct count gives.

The memo keys a member's held activations and state bytes on its position, share and blocks
(layer ranges) alone, so it is only right if a rank's memory reads nothing of the other
positions' stages. Checked against a direct count (the schedule's peak over all stages at
once, as the planner counted before the memo) on one CostModel whose memo warms up over many
cuts, pipelines with tensor-parallel groups of several widths and devices, every schedule,
exact and screening peaks. Tolerance: exact (bytes are integers, the limit is computed alike).
"""

from __future__ import annotations

import math
import random

import pytest

from whale.ir.cluster_spec import parse_cluster
from whale.planner.cost.layers import Layer, ModelProfile
from whale.planner.cost.predict import CostModel, CostOptions
from whale.planner.schedules.flow_shop import peak_held, peak_held_bound


def _direct(costs: CostModel, pipeline, num_stages, schedule, m, cuts, rows, exact):
    """replica_memory counted without memos: every member's stages from scratch."""
    p = len(pipeline)
    q_max = -(-rows // m)
    bounds = (0, *cuts, costs.num_layers)
    shares = [costs.shard_shares(g) for g in pipeline]
    held_of = peak_held if exact or num_stages * m <= 512 else peak_held_bound
    memory, fits, limit = [[] for _ in range(p)], True, math.inf
    for k in range(max(len(g) for g in pipeline)):
        member = [min(k, len(g) - 1) for g in pipeline]
        acts = [costs.member_act(shares[s % p][member[s % p]], bounds[s], bounds[s + 1]) for s in range(num_stages)]
        held = held_of(schedule, p, m, acts)
        for pos, group in enumerate(pipeline):
            if k >= len(group):
                continue
            state = costs.state_bytes(shares[pos][member[pos]], [(bounds[s], bounds[s + 1]) for s in range(pos, num_stages, p)])
            cap = costs.capacity(group[k])
            memory[pos].append(state + int(held[pos] * q_max))
            fits &= memory[pos][-1] <= cap
            room = cap - state
            limit = min(limit, -1 if room < 0 else m * (room // held[pos]) if held[pos] > 0 else math.inf)
    return tuple(tuple(x) for x in memory), fits, limit


@pytest.mark.parametrize("seed", range(3))
def test_memoised_replica_memory_matches_direct_count(seed):
    rnd = random.Random(seed)
    n = 12
    layers = tuple(
        Layer(**{**(base := Layer.simple(f"l{k}", flops=1e12, param_bytes=rnd.randint(1, 8) * 2**28,
                                          act_bytes=rnd.uniform(1e6, 3e9), hidden_bytes=1e6)).__dict__,
                 "replicated_param_bytes": base.param_bytes // 8, "replicated_act_bytes": base.act_bytes / 4})
        for k in range(n)
    )  # fmt: skip
    profile = ModelProfile(layers=layers, cut_bytes=(0.0,) + (1e6,) * (n - 1), shared_params=(("tied", 2**27, (0, n - 1)),))
    costs = CostModel(profile, parse_cluster("4xA100-80GB,4xV100-32GB,4xT4"), CostOptions(dtype="bf16", precision="mixed"))
    pipelines = [((0, 1), (4,), (8, 9)), ((0,), (1,)), ((4, 5, 6, 7),), ((8,), (0, 1), (5,), (10, 11))]
    checked = 0
    for _ in range(150):
        pipe = rnd.choice(pipelines)
        p = len(pipe)
        v = rnd.choice([1, 2, 3]) if p > 1 else 1
        s = p * v
        if s > n:
            continue
        schedule = "interleaved_1f1b" if v > 1 else rnd.choice(["gpipe", "1f1b"])
        m = rnd.choice([1, 2, 4, 8, 64, 200])
        cuts = tuple(sorted(rnd.sample(range(1, n), s - 1)))
        rows, exact = rnd.choice([m, 3 * m + 1]), rnd.random() < 0.5
        got = costs.replica_memory(pipe, s, schedule, m, cuts, rows, exact=exact)
        assert got == _direct(costs, pipe, s, schedule, m, cuts, rows, exact), (pipe, s, schedule, m, cuts, rows, exact)
        checked += 1
    assert checked > 100
