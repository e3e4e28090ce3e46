"""Pipeline parallelism against the local model, on real gloo processes.

Each rank returns the loss, and the gradients and parameters of its own stages by local-model
name; every rank also trains the local model on the same batches. Tolerances: see
tests/equivalence.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import whale as wh
from examples.gpt import GPT, GPTConfig
from tests.equivalence import assert_equivalent
from whale.planner.schedules.generate import make_schedule
from whale.planner.schedules.simulator import simulate
from whale.runtime.pipeline import step_bubble

CASES = "tests.pp_cases:equivalence"


def _check(outs: list[dict]) -> None:
    all_names = set(outs[0]["ref_params"])
    placed = set()
    for out in outs:
        assert_equivalent(out, names=out["params"].keys())
        placed |= set(out["params"])
        assert out["loss"] == outs[0]["loss"], "every rank returns the global loss"
    assert placed == all_names, f"parameters on no rank: {sorted(all_names - placed)}"
    # The gathered state dict is every stage's trained weights, exactly, under local names.
    full = outs[0]["full_state"]
    for out in outs:
        for name, p in out["final"].items():
            assert torch.equal(full[name], p), name
    assert set(full) >= all_names
    # The measured timeline covers every rank, each compute of each rank's list once.
    if "timeline" in outs[0]:
        ranks, computes = outs[0]["timeline"]
        assert ranks == tuple(range(len(outs)))
        assert computes == sum(o["num_computes"] for o in outs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"boundaries": ["blocks.2"], "schedule": "1f1b", "num_micro_batch": 4},
        {"boundaries": ["blocks.1"], "schedule": "gpipe", "num_micro_batch": 3},
        {
            "annotate": {f"blocks.{i}": ["stage"] for i in range(4)},
            "schedule": "interleaved_1f1b",
            "pipeline_degree": 2,
            "num_micro_batch": 4,
        },
        {"boundaries": ["blocks.3"], "schedule": "1f1b", "num_micro_batch": 3, "batch": "local"},
        # Activations change shape between steps with the same rows: no stale transfer header.
        {"boundaries": ["blocks.2"], "num_micro_batch": 2, "seq_lens": [16, 8, 16]},
    ],
    ids=[
        "1f1b-even",
        "gpipe-uneven-1+3-layers-mb3",
        "interleaved-4-stages",
        "1f1b-uneven-3+1-local-rows",
        "1f1b-sequence-length-changes",
    ],
)
def test_pipeline_world2(world2, kwargs):
    outs = world2.run(CASES, **kwargs)
    _check(outs)
    mem = [o["memory"] for o in outs]
    if "boundaries" in kwargs and kwargs["boundaries"] == ["blocks.2"]:
        # Two stages of two blocks: each rank holds about half (the tied embedding on both).
        for m in mem:
            assert m["param_bytes"] < 0.6 * m["model_param_bytes"], m


@pytest.mark.parametrize(
    "kwargs",
    [
        {"boundaries": ["blocks.1", "blocks.2", "blocks.3"], "num_micro_batch": 4, "global_batch": 6},
        {
            "annotate": {"": ["replicate", "pipeline:2"], "blocks.0": ["stage"], "blocks.1": ["stage"]},
            "row_weights": (3, 1),
            "num_micro_batch": 1,  # the pipeline(2) annotation sets it
        },
        {
            "boundaries": ["blocks.1", "blocks.2", "blocks.3"],
            "schedule": "interleaved_1f1b",
            "pipeline_degree": 2,
            "num_micro_batch": 2,
        },
    ],
    ids=["4-stages-1f1b-uneven-microbatches", "2-stages-x-2-replicas-uneven-rows", "interleaved-x-2-replicas"],
)
def test_pipeline_world4(world4, kwargs):
    outs = world4.run(CASES, **kwargs)
    _check(outs)


def test_skip_connection_over_two_stages(world4):
    outs = world4.run("tests.pp_cases:skip_equivalence")
    _check(outs)
    received = outs[0]["received"]
    # Stage 2 receives h1 and h0, relayed by stage 1: two tensors over one boundary. The cat
    # of h2 and h1 runs where its last input is made (stage 2), so stage 3 receives one.
    assert [len(r) for r in received] == [0, 1, 2, 1]


@pytest.mark.parametrize("exported", [False, True], ids=["fx", "export"])
def test_a_value_written_in_place_reaches_a_later_stage_with_its_write(world2, exported):
    """A mask built from the input alone is recomputed by each stage that uses it, unless it is
    written in place: then the stage that writes it sends it (stage 1 had recomputed it without
    its zeros, and the loss differed, with no error)."""
    outs = world2.run("tests.pp_cases:masked_equivalence", exported)
    assert [o["aten"] for o in outs] == [exported] * 2
    _check(outs)


def test_ranks_passing_different_batches_all_raise_and_recover(world2):
    outs = world2.run("tests.pp_cases:different_batches_per_rank")
    messages = [o.split("|")[0] for o in outs]
    assert all("shapes or dtypes differ" in m for m in messages), messages
    assert outs[0].split("|")[1] == outs[1].split("|")[1]  # the next step's global loss


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["gpipe", "1f1b"]),
    p=st.integers(2, 4),
    m=st.integers(1, 6),
    fwd=st.floats(0.5, 3),
    bwd=st.floats(0.5, 5),
    leads=st.lists(st.floats(0, 10), min_size=4, max_size=4),
)
def test_step_bubble_is_the_simulators(name, p, m, fwd, bwd, leads):
    # A simulated step as ranks record it: each entered `lead` earlier than the last one and
    # measures from its own entry; the bubble must not count that lead.
    sim = simulate(make_schedule(name, p, m), fwd, bwd, p2p_time=0.1)
    ranks = []
    for rank, row in enumerate(sim.timeline):
        lead = leads[rank] if rank else 0.0  # rank 0 enters last
        ranks.append((100.0 - lead, tuple((str(t.action), t.start + lead, t.end + lead) for t in row)))
    bubble, span = step_bubble(ranks)
    assert span == pytest.approx(sim.step_time)
    assert bubble == pytest.approx(sim.bubble_fraction)


def test_measured_bubble_agrees_on_every_rank(world2):
    bubbles = world2.run("tests.pp_cases:measured_bubble")
    assert bubbles[0] == bubbles[1]
    assert 0.0 < bubbles[0] < 1.0


@pytest.mark.parametrize(
    "config",
    [
        {"stage_boundaries": ["blocks.2"], "num_micro_batch": 4},
        {"stage_boundaries": ["blocks.1", "blocks.2", "blocks.3"], "schedule": "interleaved_1f1b",
         "pipeline_degree": 2, "num_micro_batch": 2},
    ],
    ids=["1f1b", "interleaved"],
)
def test_inference_returns_the_local_models_output_on_every_rank(world2, config):
    # The same weights and ops, cut into stages and micro-batches: equal to float32 round-off
    # (matmuls of fewer rows may sum in another order).
    for out in world2.run("tests.pp_cases:inference", **config):
        assert out["shape"] == (6, 16, 64)
        assert out["diff"] < 1e-5, out


def test_inference_with_replicas(world4):
    outs = world4.run("tests.pp_cases:inference", stage_boundaries=["blocks.2"], num_micro_batch=2)
    assert all(o["diff"] < 1e-5 and o["shape"] == (6, 16, 64) for o in outs), outs


@pytest.mark.parametrize("extra", [[], ["--stages", "2", "--micro-batches", "2"]], ids=["data-parallel", "pipeline"])
def test_gpt_example_learns(world2, extra):
    # The README's main job, smaller: the loss falls, and the held-out batch (forward only,
    # through the stages when pipelined) is evaluated alike on every rank.
    argv = ["--steps", "30", "--layers", "2", "--embd", "64", "--block", "32", "--batch", "8", "--lr", "1e-2", *extra]
    outs = world2.run("tests.pp_cases:gpt_example", argv)
    assert outs[0]["last"] < 0.7 * outs[0]["first"], outs[0]  # observed 5.56 -> 2.97
    assert outs[0]["held_out"] == outs[1]["held_out"] < outs[0]["first"]


def test_stages_annotated_inside_forward(world2):
    outs = world2.run("tests.pp_cases:forward_scoped")
    for out in outs:
        assert out["stages"] == (2, 2)  # two stage() blocks under pipeline(2)
        assert_equivalent(out, names=out["params"].keys())


def test_model_built_on_meta_is_materialized_per_stage(world2):
    outs = world2.run("tests.pp_cases:built_on_meta")
    for out in outs:
        assert_equivalent(out, names=out["params"].keys())
        # The other stage's parameters were never allocated on this rank.
        assert out["meta_left"] > 0
        assert out["memory"]["param_bytes"] < 0.6 * out["memory"]["model_param_bytes"]


# ---- bad input, before any process group --------------------------------------------------------


@pytest.fixture
def world(monkeypatch):
    def set_world(n: int) -> None:
        monkeypatch.setenv("WORLD_SIZE", str(n))

    return set_world


def _gpt(n_layer: int = 4) -> tuple[GPT, torch.Tensor]:
    cfg = GPTConfig(vocab_size=32, block_size=8, n_layer=n_layer, n_head=2, n_embd=16)
    return GPT(cfg), torch.randint(32, (8, 8))


def _loss(logits, y):
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def test_stage_that_owns_no_computation(world):
    world(2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x))

    net = wh.annotate(Net(), {"a": wh.stage(), "unused": wh.stage(), "b": wh.stage()})
    with pytest.raises(ValueError, match=r"owns no computation"):
        wh.parallelize(net, loss_fn=F.mse_loss, example_inputs=torch.randn(8, 4),
                       config=wh.Config(schedule="interleaved_1f1b", pipeline_degree=1))


def test_more_stages_than_devices(world):
    world(2)
    model, x = _gpt()
    with pytest.raises(ValueError, match=r"4 pipeline stages need 4 ranks but the world has 2"):
        wh.parallelize(model, loss_fn=_loss, example_inputs=x,
                       config=wh.Config(stage_boundaries=["blocks.1", "blocks.2", "blocks.3"]))


def test_micro_batches_larger_than_the_batch(world):
    world(2)
    model, x = _gpt()
    with pytest.raises(ValueError, match=r"num_micro_batch=16 is larger than the 8 rows"):
        wh.parallelize(model, loss_fn=_loss, example_inputs=x,
                       config=wh.Config(stage_boundaries=["blocks.2"], num_micro_batch=16))
    with pytest.raises(ValueError, match=r"num_micro_batch=0"):
        wh.Config(num_micro_batch=0)
    with pytest.raises(ValueError, match=r"pipeline\(num_micro_batch=...\) takes|must be >= 1"):
        wh.pipeline(0)


def test_unknown_schedule(world):
    world(2)
    model, x = _gpt()
    with pytest.raises(ValueError, match=r"zero_bubble.*gpipe|gpipe.*zero_bubble"):
        wh.parallelize(model, loss_fn=_loss, example_inputs=x,
                       config=wh.Config(stage_boundaries=["blocks.2"], schedule="zero_bubble"))


def test_one_module_in_two_stages(world):
    world(2)
    model, x = _gpt()
    with pytest.raises(ValueError, match=r"'blocks.0'.*two stages|two stages.*'blocks.0'"):
        wh.annotate(model, {"blocks": wh.stage(), "blocks.0": wh.stage()})


def test_later_stage_feeding_an_earlier_one(world):
    world(2)

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(self.b(self.a(x)))

    net = wh.annotate(Loop(), {"a": wh.stage(), "b": wh.stage()})
    with pytest.raises(ValueError, match=r"later stage cannot feed an earlier one"):
        wh.parallelize(net, loss_fn=F.mse_loss, example_inputs=torch.randn(8, 4))


def test_boundary_that_names_no_module(world):
    world(2)
    model, x = _gpt()
    with pytest.raises(ValueError, match=r"stage boundary 'blocks.9' names no module"):
        wh.parallelize(model, loss_fn=_loss, example_inputs=x,
                       config=wh.Config(stage_boundaries=["blocks.9"]))


def test_pipeline_plan_lays_out_ranks(world):
    world(4)
    model, x = _gpt()
    program = wh.parallelize(model, loss_fn=_loss, example_inputs=x,
                             config=wh.Config(stage_boundaries=["blocks.2"], num_micro_batch=2))
    plan = program.plan
    assert plan.pipelines == ((0, 2), (1, 3))
    assert (plan.dp_degree, plan.pipeline_degree, plan.num_stages) == (2, 2, 2)
    assert [s.modules for s in program.stages][1][0] == "blocks.2"
    assert type(plan).from_json(plan.to_json()) == plan
