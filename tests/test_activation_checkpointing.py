"""``Config(activation_checkpointing=...)``: checkpointed programs equal the local model and the
same program without checkpointing, keep fewer activations, and refuse bad input clearly.

Tolerances: against the local model, tests/equivalence.py's (fp32; only the order of
additions across replicas and micro-batches differs; recomputation repeats the very same
forward). Checkpointed against plain under dropout: the same ops on the same inputs with the
same RNG state (``preserve_rng_state``), so losses, gradients and parameters agree to 1e-6
(observed equal)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import whale as wh
from tests.equivalence import assert_equivalent
from tests.memory_cases import saved_tensor_bytes
from tests.models import TinyGPT
from whale.rewrite.recompute import (
    check_checkpoint_paths,
    checkpoint_graph,
    checkpoint_module,
)

_CASES = "tests.recompute_cases"


def _saved_bytes(module, params, x) -> tuple[torch.Tensor, int]:
    """``module(x)`` and the bytes autograd keeps for backward from it: its activation memory."""
    return saved_tensor_bytes(lambda: module(x), params)


def _tiny(n_layer: int = 4):
    torch.manual_seed(0)
    return TinyGPT(n_layer=n_layer, n_embd=64, block_size=32), torch.randint(64, (8, 32))


def test_module_copies_recompute_and_save_fewer_activations():
    model, x = _tiny()
    paths = [f"h.{i}" for i in range(4)]
    plain_out, plain = _saved_bytes(model, model.parameters(), x)
    ckpt_model = checkpoint_module(model, paths)
    ckpt_out, ckpt = _saved_bytes(ckpt_model, model.parameters(), x)
    assert torch.equal(plain_out, ckpt_out)
    # Four blocks of 8x32x64 hidden states: the blocks' internals (attention scores, MLP 4x
    # width) are gone; what stays is the embeddings, block inputs, ln_f and the head.
    assert ckpt < 0.35 * plain, (ckpt, plain)
    assert all("forward" not in m.__dict__ for m in model.modules())  # the user's model untouched
    assert list(ckpt_model.state_dict()) == list(model.state_dict())
    ckpt_out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain_out.sum().backward()
    for n, p in model.named_parameters():
        assert_close(grads[n], p.grad, rtol=0, atol=0, msg=n)


def test_graph_regions_recompute_and_save_fewer_activations():
    from whale.capture import capture

    model, x = _tiny()
    gm = capture(model, (x,)).graph_module
    keys = list(gm.state_dict())
    plain_out, plain = _saved_bytes(gm, gm.parameters(), x)
    assert checkpoint_graph(gm, [f"h.{i}" for i in range(4)]) == 4
    assert checkpoint_graph(gm, ["h.0"]) == 0  # idempotent: a second build finds it outlined
    ckpt_out, ckpt = _saved_bytes(gm, gm.parameters(), x)
    assert torch.equal(plain_out, ckpt_out)
    assert ckpt < 0.35 * plain, (ckpt, plain)
    assert list(gm.state_dict()) == keys


def test_unknown_value_names_the_known_ones():
    with pytest.raises(ValueError, match=r"activation_checkpointing='full'.*\['none', 'auto'\]"):
        wh.Config(activation_checkpointing="full")
    with pytest.raises(TypeError, match="module paths"):
        wh.Config(activation_checkpointing=[3])
    with pytest.raises(ValueError, match="twice"):
        wh.Config(activation_checkpointing=["h.0", "h.0"])
    assert wh.Config(activation_checkpointing=["h.0"]).activation_checkpointing == ("h.0",)


def test_unknown_module_path_names_close_ones_before_any_process_group():
    model, x = _tiny(2)
    with pytest.raises(ValueError, match=r"no module 'h\.O'; close names: \['h\.1', 'h\.0'\]"):
        check_checkpoint_paths(model, ["h.O"])
    with pytest.raises(ValueError, match=r"no module 'transformer\.h\.0'"):
        wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=(x,),
                       config=wh.Config(activation_checkpointing=["transformer.h.0"]))


def test_batch_norm_inside_is_refused_naming_the_parts_free_of_it():
    nn = torch.nn
    # A conformer-like layer: every layer holds a BatchNorm, so the parts beside it are named,
    # largest first (the convolution module's own convolution too), and each is accepted.
    conv = nn.Sequential(nn.Conv1d(4, 4, 3), nn.BatchNorm1d(4))
    layer = nn.Sequential(nn.Linear(4, 4), conv, nn.Linear(4, 16))
    model = nn.Sequential(layer, nn.Linear(16, 2))
    with pytest.raises(ValueError, match="'0' holds the BatchNorm '0.1.1'.*running statistics") as info:
        check_checkpoint_paths(model, ["0"])
    assert "e.g. its parts ['0.2', '0.1.0', '0.0']" in str(info.value)
    check_checkpoint_paths(model, ["0.2", "0.1.0", "0.0", "1"])
    with pytest.raises(ValueError, match=r"none of its parts holding parameters is free of one"):
        check_checkpoint_paths(nn.Sequential(nn.BatchNorm1d(4)), ["0"])


@pytest.mark.parametrize("config", [
    {},                                                              # data parallel, 2 replicas
    {"stage_boundaries": ["h.1"], "num_micro_batch": 2},             # 2-stage pipeline
], ids=["dp", "pipeline"])
def test_tiny_gpt_equals_local_model(world2, config):
    outs = world2.run(f"{_CASES}:tiny_equivalence", ["h.0", "h.1"], **config)
    for rank, out in enumerate(outs):
        assert_equivalent(out, names=out["grads"][0])  # a pipeline rank: its stage's parameters
        assert out["user_forward_untouched"]
        want = ["h.0", "h.1"] if not config else [["h.0"], ["h.1"]][rank]
        assert out["recomputed"] == want


def test_an_object_that_cannot_be_copied_is_passed_as_it_is_with_one_warning():
    import threading

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x, holder):
            with holder.lock:
                return self.lin(x) * 2

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Scaled(), Scaled()

        def forward(self, x):
            holder = type("Holder", (), {})()
            holder.lock = threading.Lock()
            return self.b(self.a(x, holder), holder)

    torch.manual_seed(0)
    model, x = Net(), torch.randn(3, 4)
    model(x).sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with pytest.warns(UserWarning, match=r"Holder passed to Scaled.forward cannot be copied") as seen:
        checkpoint_module(model, ["a", "b"])(x).sum().backward()
    assert len([w for w in seen if "cannot be copied" in str(w.message)]) == 1
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, want[name]), name


@pytest.mark.parametrize("config", [{}, {"zero_stage": 3}], ids=["dp", "zero3"])
def test_an_object_forward_changes_is_recomputed_as_forward_first_saw_it(world2, config):
    """A cache object made in forward and appended to by each checkpointed layer (XLM's):
    backward recomputes each layer on a copy of the cache as it was, not on the cache forward
    left (its keys twice: other gradients, with no error)."""
    outs = world2.run(f"{_CASES}:cache_equivalence", **config)
    for out in outs:
        assert out["recomputed"] == ["attn.0", "attn.1"]
        assert_equivalent(out)


@pytest.mark.parametrize("name, paths, config", [
    ("tiny", ["h.0", "h.1"], {}),
    ("gpt2", ["transformer.h.0", "transformer.h.1"], {"stage_boundaries": ["transformer.h.1"], "num_micro_batch": 2}),
    ("gpt2", ["transformer.h.1"], {}),
], ids=["tiny-dp", "gpt2-pipeline", "gpt2-dp"])
def test_dropout_matches_the_plain_program(world2, name, paths, config):
    outs = world2.run(f"{_CASES}:dropout_runs", name, paths, **config)
    for out in outs:
        plain, ckpt = out["plain"], out["ckpt"]
        assert ckpt["recomputed"] and not plain["recomputed"]
        assert_close(torch.tensor(ckpt["loss"]), torch.tensor(plain["loss"]), rtol=1e-6, atol=0)
        for g, h in zip(ckpt["grads"], plain["grads"]):
            for n in h:
                assert_close(g[n], h[n], rtol=1e-6, atol=1e-7, msg=n)
        for n in plain["params"]:
            assert_close(ckpt["params"][n], plain["params"][n], rtol=1e-6, atol=1e-7, msg=n)
    # Dropout is on: the two steps differ (same weights' loss moves with the masks, too).
    assert outs[0]["plain"]["loss"][0] != outs[0]["plain"]["loss"][1]


def test_gpt2_pipeline_equals_local_model(world2):
    outs = world2.run("tests.hf_cases:equivalence", "gpt2", stage_boundaries=["transformer.h.1"], num_micro_batch=2,
                      activation_checkpointing=["transformer.h.0", "transformer.h.1"])
    for out in outs:
        assert_equivalent(out, names=out["grads"][0])


def test_auto_turns_nothing_on_where_the_plan_fits():
    model, x = _tiny(2)
    program = wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=(x,),
                             config=wh.Config(auto_parallel=True, activation_checkpointing="auto", quiet=True))
    assert program.plan.activation_checkpointing == ()
    program = wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=(x,),
                             config=wh.Config(activation_checkpointing="auto"))  # the plan the annotations fix
    assert program.plan.activation_checkpointing == ()


def test_the_plan_carries_the_checkpointed_modules():
    model, x = _tiny(2)
    program = wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=(x,),
                             config=wh.Config(activation_checkpointing=["h.1"]))
    assert program.plan.activation_checkpointing == ("h.1",)
    assert "activation checkpointing of 1 module(s) (h.1)" in program.plan.table()


def test_a_plan_that_chose_zero_runs_with_it_and_the_config_wins():
    """The planner turns ZeRO on where a plan only fits with it: a saved plan that chose it runs
    with it (the runtime reads the Config), and a zero_stage the user sets replaces the plan's."""
    from whale.ir.plan import Plan

    model, x = _tiny(2)
    plan = Plan(world_size=1, pipelines=((0,),), row_weights=(1.0,), replica_groups=((0,),), zero_stage=2)
    program = wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=(x,), config=wh.Config(plan=plan, quiet=True))
    assert (program.config.zero_stage, program.plan.zero_stage) == (2, 2)
    program = wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=(x,),
                             config=wh.Config(plan=plan, quiet=True, zero_stage=1))
    assert (program.config.zero_stage, program.plan.zero_stage) == (1, 1)
