"""The memory floor never drops a structure that has a plan that fits, and bounds shortfalls.

The floor (:class:`~whale.planner.search.memory_floor.MemoryFloor`) lets the search skip
structures before screening them; it must stay below the exact memory of every plan of a
structure, whatever its cuts and rows. Checked against exact predictions (``CostModel.predict``)
of many candidates per structure: every cut when there are few, rows spread evenly and unevenly,
on clusters whose nodes allow tensor parallelism, with a tied weight and replicated parts.
Tolerance: exact (the floor compares bytes; it allows itself 2 bytes of rounding).
"""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from whale.ir.cluster_spec import parse_cluster
from whale.planner.cost.layers import Layer, ModelProfile
from whale.planner.cost.predict import Candidate, CostOptions
from whale.planner.search.auto import SearchSettings, search
from whale.planner.search.explore import NoPlanError
from whale.planner.search.pins import Pins
from whale.planner.search.space import SearchSpace

DEVICES = ["A100-80GB", "V100-32GB", "T4", "A10", "P100-16GB"]


@st.composite
def instances(draw):
    kinds = draw(st.lists(st.sampled_from(DEVICES), min_size=1, max_size=2, unique=True))
    nodes = [f"{draw(st.sampled_from([1, 2, 4]))}x{kind}" for kind in kinds]
    n = draw(st.integers(2, 6))
    layers = []
    for k in range(n):
        params = draw(st.integers(1, 8)) * 2**30 // draw(st.sampled_from([2, 8]))
        layer = Layer.simple(f"l{k}", flops=1e12, param_bytes=params, act_bytes=draw(st.floats(1e6, 3e9)),
                             hidden_bytes=1e6)  # fmt: skip
        # Part of the layer replicated under tensor parallelism (norms, biases).
        repl = draw(st.sampled_from([0.0, 0.25]))
        layers.append(Layer(**{**layer.__dict__, "replicated_param_bytes": int(params * repl),
                               "replicated_act_bytes": layer.act_bytes * repl}))  # fmt: skip
    shared = ()
    if n >= 3 and draw(st.booleans()):  # a tied weight, read by the first and the last layer
        size = 2**29
        layers[0] = Layer(**{**layers[0].__dict__, "param_bytes": layers[0].param_bytes + size})
        layers[-1] = Layer(**{**layers[-1].__dict__, "param_bytes": layers[-1].param_bytes + size})
        shared = (("tied", size, (0, n - 1)),)
    profile = ModelProfile(layers=tuple(layers), cut_bytes=(0.0,) + (1e6,) * (n - 1), shared_params=shared)
    return parse_cluster(",".join(nodes)), profile, draw(st.integers(1, 12)), draw(st.integers(0, 2**16))


def _rows(batch: int, dp: int, m: int, rnd: random.Random) -> list[tuple[int, ...]]:
    """Even rows and a few uneven splits, each replica at least ``m`` rows."""
    even = tuple(batch // dp + (d < batch % dp) for d in range(dp))
    out = [even]
    for _ in range(3):
        rows = [m] * dp
        for _ in range(batch - m * dp):
            rows[rnd.randrange(dp)] += 1
        out.append(tuple(rows))
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(instances())
def test_floor_is_below_every_plan_of_its_structure(instance):
    cluster, profile, batch, seed = instance
    rnd = random.Random(seed)
    space = SearchSpace(profile, cluster, batch, CostOptions(), Pins(), SearchSettings())
    kept = space.structures()
    allowed = [k for k in range(1, profile.num_layers) if profile.layers[k].cuttable]
    for structure in kept + space.pruned:
        layout, s, schedule, m = structure.layout, structure.num_stages, structure.schedule, structure.num_micro_batch
        if m * layout.dp_degree > batch:
            continue
        classes = space.classes(layout)
        floor = space.floor.excess(classes, s, schedule, m, batch)
        cuts_list = list(itertools.combinations(allowed, s - 1))
        for cuts in rnd.sample(cuts_list, min(4, len(cuts_list))):
            for rows in _rows(batch, layout.dp_degree, m, rnd):
                prediction = space.costs.predict(Candidate(layout, s, schedule, m, cuts, rows))
                missing = prediction.shortfall[0]
                assert floor <= max(missing, 0) + 1e-6 * abs(missing), (structure, cuts, rows, floor, missing)
                if prediction.fits:
                    assert structure in kept, ("a plan that fits was dropped", structure, cuts, rows)


def test_a_model_that_fits_nowhere_is_dropped_before_screening():
    # 40 GPT-3-sized layers (1.8e9 fp32 parameters, 27 GiB of states each in mixed precision:
    # an A10 or a V100 holds none) on 64 GPUs of three types without tensor parallelism. The
    # floor drops every structure, and the error still names the closest plan and its lack.
    layer = Layer.simple("block", flops=3.7e12, param_bytes=7_247_757_312, act_bytes=4.4e8, hidden_bytes=5e7)
    profile = ModelProfile.from_layers([dataclasses.replace(layer, name=f"h.{k}") for k in range(40)])
    cluster = parse_cluster(",".join(
        [f"a{k}=8xA100-80GB" for k in range(4)] + [f"v{k}=8xV100-32GB" for k in range(2)]
        + [f"g{k}=8xA10" for k in range(2)]))  # fmt: skip
    options, settings_ = CostOptions(dtype="bf16"), SearchSettings(allow_tensor_parallel=False)
    space = SearchSpace(profile, cluster, 1536, options, Pins(), settings_)
    assert space.structures() == [] and len(space.pruned) > 100
    with pytest.raises(NoPlanError, match=r"the closest \(dp \d+ x pp \d+ .* GiB missing there"):
        search(profile, cluster, 1536, options=options, settings=settings_)
