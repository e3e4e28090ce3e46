"""A second set of architectures whale was not written against (tests/hf_more_models2.py):
each equals the local model on 2 gloo ranks (loss, gradients by name, parameters after an
AdamW step; tolerances of tests/equivalence.py: fp32, only the order of additions differs;
state dicts round-trip as tests/test_hf_pipeline.py checks), or is refused or warned about with
a message that says what is wrong and what to do.

* Gemma2 scales its embedding by a buffer (``embed_scale``) of the embedding module: a
  ``split()`` of the whole model slices that embedding by vocabulary and keeps the buffer
  (before: refused, "cannot shard node embedding (aten.embedding)").
* Phi-3 slices q, k and v out of its fused ``qkv_proj``: a slice of whole blocks of the sharded
  dim now has a sharding rule, so the attention stays sharded (before: gathered, with a warning).
* BLOOM reshapes its heads to ``(batch * heads, q, d)``, a size computed in forward: whale had
  fixed the local size at the example's batch, so micro-batches of other row counts crashed
  (a pipeline x split hung until the watchdog). Such a view is now gathered, with the warning.
* ALBERT runs one layer at every depth: a ``split()`` of it slices that layer once for both
  calls (before: refused, "reads the weight ... a second time"); where the calls would slice it
  differently (one input sharded, one whole) the refusal says so and what to split instead.
* A stage boundary at the module where forward() begins computing (CLIP's ``vision_model``,
  which runs before ``text_model``) left the first stage with nothing but torch.export's input
  guard: no parameters on rank 0, whose optimizer then failed while rank 1 waited. It is now
  refused, on every rank, as a stage that owns no computation.
* A boundary at a module holding several layers (an encoder-decoder's ``model.decoder``) got
  no step-time prediction ("names no module that computes in the graph"): it now begins at the
  first of its layers.
* ``program.eval()`` did not reach the captured graph: export records BatchNorm's and
  dropout's training flag as a constant, so a pipeline or split program in eval mode kept
  normalizing by batch statistics (moving the running ones) and dropping activations. The flag
  now follows the module's mode.
* BatchNorm on micro-batches (a ResNet pipeline) normalizes each micro-batch alone: whale now
  warns, as it does for data parallel replicas.

Also equal to the local model (no fix needed): fused multi-query ``c_attn`` (GPT-BigCode,
gathered with a warning: one k and one v head cannot split by heads) under ``split``; ALBERT's one layer run at every depth in a pipeline and
under ZeRO 3; CLIP's two towers with frozen parameters under ``split``; a synchronized
BatchNorm ResNet.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import whale as wh
from tests.equivalence import assert_equivalent
from tests.hf_models import capture_case
from tests.hf_more_models2 import BUILDERS
from tests.test_hf_pipeline import _check
from whale.planner.cost.model_profile import profile_model
from whale.rewrite import TensorParallelAnalysis
from whale.rewrite.stage_split import assign_stages

CASES = "tests.hf_more_cases"


def _check_trainable(outs: list[dict]) -> None:
    """tests/test_hf_pipeline.py's ``_check`` over the parameters that train; frozen ones (CLIP's
    key biases here) must come out of the step unchanged."""
    for out in outs:
        # Frozen on the local model, or never reached by its loss (no gradient there either);
        # a pipeline rank holds some of them.
        frozen = [n for n in out["ref_params"] if n not in out["ref_grads"][0]]
        got = [n for grads in out["grads"] for n in frozen if n in grads]
        assert not got, f"a parameter the local model gives no gradient got one: {sorted(set(got))}"
        for n in frozen:
            if n in out["params"]:
                assert torch.equal(out["params"][n], out["ref_params"][n]), n
        out["params"] = {n: p for n, p in out["params"].items() if n not in frozen}
        out["ref_params"] = {n: p for n, p in out["ref_params"].items() if n not in frozen}
    _check(outs)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        # scaled embedding (a buffer beside the weight), GeGLU, soft-capping, tied head
        ("gemma2", {"split": ("",)}),
        # multi-query attention fused in one c_attn: q for all heads, one k, one v
        ("gpt_bigcode", {"split": ("",)}),
        # ALiBi, query_key_value fused per head (taken apart by select), an embedding layer
        # norm, tied head; micro-batches of 4 rows where the example had 8
        ("bloom", {"split": ("",), "num_micro_batch": 2}),
        # fused qkv_proj sliced into q, k, v (whole blocks), fused gate_up_proj split by chunk
        ("phi3", {"split": ("model.layers",)}),
        # CLIP's two towers, frozen key biases: the split's frozen shards stay without gradient
        ("clip", {"split": ("text_model.encoder.layers", "vision_model.encoder.layers")}),
        # one layer's weights run at both depths: sliced once; in a pipeline, 7 rows in 4 micro-batches
        ("albert", {"split": ("albert.encoder.albert_layer_groups",)}),
        ("albert", {"stage_boundaries": ["predictions"], "num_micro_batch": 4, "schedule": "gpipe", "rows": 7}),
        ("albert", {"zero_stage": 3}),
        # shifted windows, patch merging, a relative position bias table gathered by index
        ("swin", {"stage_boundaries": ["swin.encoder.layers.1"], "num_micro_batch": 2}),
    ],
    ids=["gemma2-split", "gpt-bigcode-split", "bloom-split", "phi3-split", "clip-split", "albert-split", "albert-pipeline",
         "albert-zero3", "swin-pipeline"],
)
def test_equals_local(world2, name, kwargs):
    outs = world2.run(f"{CASES}:equivalence_warnings", name, **kwargs)
    _check_trainable(outs)
    if name == "gpt_bigcode":  # one k and one v head: the attention cannot split by heads
        (message,) = outs[0]["warnings"]
        assert "gathered whole" in message and "transformer.h.0.attn" in message, message
    elif name == "bloom":  # heads merged with the batch: gathered, correct for any rows
        (message,) = outs[0]["warnings"]
        assert "reshape (transformer.h.0.self_attention): the view's sharded dim has a size computed from the batch" in message
    else:
        assert outs[0]["warnings"] == [], "every split value stays sharded"


def test_scaled_embedding_keeps_its_buffer_when_sliced():
    case = BUILDERS["gemma2"]()
    wh.annotate(case.model, {"": wh.split()})
    plan = TensorParallelAnalysis(2)(case.model, capture_case(case))
    embed = plan.graph_module.get_submodule("model.embed_tokens")
    assert embed.embed_scale.item() == pytest.approx(32**0.5), "the buffer the graph multiplies by"
    assert "model.embed_tokens" in plan.summary()


def test_a_boundary_where_forward_begins_is_refused():
    case = BUILDERS["clip"]()
    cap = capture_case(case)
    with pytest.raises(ValueError, match=r"the first stage \(before 'vision_model', where forward\(\) begins"):
        assign_stages(cap, ["vision_model"])
    stage, num = assign_stages(cap, ["text_model"])  # CLIP runs its vision tower first
    assert num == 2 and sorted(set(stage.values())) == [0, 1]


def test_a_boundary_at_a_module_of_several_layers_is_priced():
    case = BUILDERS["pegasus"]()
    profile = profile_model(capture_case(case), 8, boundaries=["model.decoder"])
    (cut,) = profile.pinned_cuts
    names = [layer.name for layer in profile.layers]
    assert names[cut].startswith("model.decoder.") and not names[cut - 1].startswith("model.decoder.")


def test_batch_norm_on_micro_batches_warns_and_one_micro_batch_equals_local(world2):
    config = {"stage_boundaries": ["resnet.encoder.stages.1"]}
    one = world2.run(f"{CASES}:equivalence_warnings", "resnet", about="BatchNorm", num_micro_batch=1, **config)
    _check(one)
    assert one[0]["warnings"] == []
    two = world2.run(f"{CASES}:equivalence_warnings", "resnet", about="BatchNorm", num_micro_batch=2, **config)
    (message,) = two[0]["warnings"]
    assert "run on 2 micro-batches" in message and "num_micro_batch=1" in message, message


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("resnet", {"stage_boundaries": ["resnet.encoder.stages.1"], "num_micro_batch": 4}),
        ("gptj", {"stage_boundaries": ["transformer.h.1"], "num_micro_batch": 4, "dropout": 0.5}),
        ("gptj", {"split": ("transformer.h",), "dropout": 0.5}),
    ],
    ids=["resnet-pipeline", "gptj-dropout-pipeline", "gptj-dropout-split"],
)
def test_eval_reaches_the_captured_graph(world2, name, kwargs):
    # Before: the graph kept the training mode it was captured in (batch statistics, moving
    # running statistics, dropout): ResNet's eval output was off by 0.70.
    outs = world2.run(f"{CASES}:eval_inference", name, **kwargs)
    for out in outs:
        # fp32; 6 rows in 4 micro-batches add in another order than the local model's 6 rows
        assert out["diff"] < 1e-6 and out["state_kept"], out


def test_synchronized_batch_norm_equals_local(world2):
    outs = world2.run(f"{CASES}:equivalence_warnings", "resnet", about="BatchNorm", sync_batch_norm=True)
    for out in outs:
        assert_equivalent(out, names=out["params"].keys())
        assert out["full_keys"] == out["ref_keys"] and out["fresh_equal"] and out["full_matches_params"]
        # Running statistics summed in float64 across replicas: equal to a few float32 ulps.
        assert out["buffers_close"]
    assert outs[0]["warnings"] == []


def test_a_layer_called_at_every_depth_is_sliced_once_or_refused():
    case = BUILDERS["albert"]()
    wh.annotate(case.model, {"albert.encoder.albert_layer_groups": wh.split()})
    plan = TensorParallelAnalysis(2)(case.model, capture_case(case))
    layer = "albert.encoder.albert_layer_groups.0.albert_layers.0"
    calls = [d for d in plan.modules.values() if d.path == f"{layer}.attention.query"]
    assert [d.kind for d in calls] == ["column", "column"] and plan.fallbacks == ()
    assert len({d.region for d in calls}) == 1, "both depths slice the one weight alike"
    # With the input projection in the split too, depth 0 gets a sharded input, depth 1 a whole one.
    case = BUILDERS["albert"]()
    wh.annotate(case.model, {"albert.encoder": wh.split()})
    with pytest.raises(ValueError, match=r"called more than once and its calls shard it differently .*row.*column"):
        TensorParallelAnalysis(2)(case.model, capture_case(case))


def test_a_split_holding_only_convolutions_says_to_remove_it():
    case = BUILDERS["resnet"]()
    wh.annotate(case.model, {"resnet.encoder.stages.1": wh.split()})
    with pytest.raises(ValueError) as err:
        TensorParallelAnalysis(2)(case.model, capture_case(case))
    message = str(err.value)  # before: "Move split() to the modules it can shard", naming none
    assert "whale does not shard convolutions" in message
    assert "Nothing under this split() holds a layer whale can shard: remove the split()" in message
    assert "Move split()" not in message
