"""Architectures whale was not written against (tests/hf_more_models.py), where they took a
new code path or exposed a bug: each equals the local model on 2 gloo ranks (loss, gradients by
name, parameters after an AdamW step; tolerances of tests/equivalence.py: fp32, only the order
of additions differs), or is refused with a message that says where and what to do instead.

* Falcon computes its layers as ``x @ W.T (+ b)``, not ``F.linear``: those shard as Linear
  layers (before: ``split()`` refused the whole model). With ALiBi the per-head position bias
  follows the sharded heads; with one kv head (multi-query) the attention cannot split by heads,
  so it runs gathered, and ``parallelize`` warns.
* GPT-NeoX fuses q, k, v per head (``[heads, (q, k, v), head_dim]``), Mixtral routes tokens to
  experts through a sorted grouped matmul (captured by ``torch.export`` with a dynamic batch),
  ViT takes images, BART ties its embeddings four ways and adds a ``final_logits_bias``.
* OPT ties its LM head to the embedding but reaches it through ``project_out``: the head is
  sliced by vocabulary as the embedding is (before: refused, "one tied weight sharded two ways").
* Mixtral's experts are one stacked tensor multiplied by a grouped matmul, which torch's FLOP
  counter does not know: the cost model now counts it (before: the experts cost nothing).
* The model run whole (data parallel) is called with ``use_cache=False`` as the captured graph
  is (before: transformers' default cache was filled in forward and again by a checkpointed
  layer's recompute, so Mistral's and Falcon's attention saw 11 or 16 keys for 8 queries).
* A pipeline stage that receives the output of another stage's ``split()`` part is no part of
  that split (before: BART under pipeline x split had the decoder's stage hold an "empty" split
  of the encoder's layers and refused).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

import whale as wh
from tests.hf_models import capture_case
from tests.hf_more_models import BUILDERS
from tests.test_hf_pipeline import _check
from whale.cli import main
from whale.rewrite import TensorParallelAnalysis
from whale.rewrite.stage_split import assign_stages, capture_split_stages, split_stages

CASES = "tests.hf_more_cases"


@pytest.mark.parametrize(
    "name, kwargs",
    [
        # the whole model split: x @ W.T + b layers, ALiBi heads, the LM head tied to the embedding
        ("falcon_alibi", {"split": ("",)}),
        # fused qkv laid out per head, attention and MLP in parallel off one residual
        ("gpt_neox", {"split": ("gpt_neox.layers",)}),
        # encoder-decoder, embeddings tied four ways, final_logits_bias on sharded logits
        ("bart", {"split": ("",)}),
        # the LM head tied to the embedding follows project_out, a Linear of its own; project_in
        # goes column-parallel, so the layer norms after it gather (and parallelize says so)
        ("opt", {"split": ("",)}),
        # experts routed by data, 7 rows in 4 micro-batches; images into a 2-stage pipeline
        ("mixtral", {"stage_boundaries": ["model.layers.1"], "num_micro_batch": 4, "schedule": "gpipe", "rows": 7}),
        ("vit", {"stage_boundaries": ["vit.layers.1"], "num_micro_batch": 2}),
        # a checkpointed layer under data parallel, with and without a captured graph
        ("mistral", {"activation_checkpointing": ["model.layers.1"], "example": False}),
        ("falcon", {"activation_checkpointing": ["transformer.h.0"]}),
    ],
    ids=["falcon-alibi-split", "gpt-neox-split", "bart-split", "opt-split", "mixtral-pipeline", "vit-pipeline",
         "mistral-checkpointed-layer", "falcon-checkpointed-layer"],
)
def test_equals_local(world2, name, kwargs):
    outs = world2.run(f"{CASES}:equivalence_warnings", name, **kwargs)
    _check(outs)
    if name == "opt":
        (message,) = outs[0]["warnings"]
        assert "gathered whole" in message and "normalization over the sharded dim" in message, message
    else:
        assert outs[0]["warnings"] == [], "every split value stays sharded"


def test_multi_query_attention_runs_gathered_and_says_so(world2):
    outs = world2.run(f"{CASES}:equivalence_warnings", "falcon", split=("transformer.h",))
    _check(outs)
    (message,) = outs[0]["warnings"]
    assert "gathered whole" in message and "transformer.h.0.self_attention" in message, message


def test_stacked_experts_are_refused_with_where_split_can_go():
    case = BUILDERS["mixtral"]()
    wh.annotate(case.model, {"model.layers": wh.split()})
    cap = capture_case(case)
    # The experts' grouped matmuls count in the cost model: each of the 8 x 8 tokens meets 2
    # experts, (32 -> 2 x 64) then (64 -> 32). Before, torch's counter knew no formula: 0 FLOPs.
    grouped = [n.flops for n in cap.nodes if "grouped_mm" in n.target]
    assert grouped == [2 * 128 * 32 * 128, 2 * 128 * 64 * 32] * 2
    with pytest.raises(ValueError) as err:
        TensorParallelAnalysis(2)(case.model, cap)
    message = str(err.value)
    assert "'model.layers.0.mlp.experts.gate_up_proj' of shape (4, 128, 32)" in message
    assert "grouped_mm" in message and "stacks 4 matrices" in message
    assert "(e.g. 'model.layers.0.self_attn', 'model.layers.1.self_attn')" in message


def test_convolutions_are_refused_with_where_split_can_go():
    case = BUILDERS["convnext"]()
    wh.annotate(case.model, {"convnext.encoder.stages.1.layers": wh.split()})
    with pytest.raises(ValueError) as err:
        TensorParallelAnalysis(2)(case.model, capture_case(case))
    message = str(err.value)
    assert "aten.conv2d" in message and "whale does not shard convolutions" in message
    assert "stacks" not in message, "a convolution's weight is not a stack of experts"
    assert "(e.g. 'convnext.encoder.stages.1.layers.0.pwconv1', 'convnext.encoder.stages.1.layers.0.pwconv2')" in message


def test_a_stage_receiving_a_split_output_holds_no_split_of_it():
    case = BUILDERS["bart"]()
    wh.annotate(case.model, {"model.encoder.layers": wh.split(), "model.decoder.layers": wh.split()})
    cap = capture_case(case)
    stage, num = assign_stages(cap, ["model.decoder"])
    graphs = capture_split_stages(split_stages(cap, stage, num), cap)
    assert sorted(graphs) == [0, 1]
    for s, graph in graphs.items():  # before: stage 1 refused a split of the encoder holding nothing
        plan = TensorParallelAnalysis(2)(graph.graph_module, graph)
        side = ("model.encoder.layers.", "model.decoder.layers.")[s]
        assert plan.fallbacks == () and all(r.name.startswith(side) for r in plan.regions), (s, plan.summary())
        assert len(plan.regions) == (4, 6)[s]  # attention and MLP per layer; the decoder's cross-attention


_TARGET = """
import whale as wh
from tests.hf_more_models import BUILDERS


def falcon():
    case = BUILDERS["falcon_alibi"]()
    wh.annotate(case.model, {"transformer.h": wh.split()})
    return case.model, case.inputs
"""


def test_whale_plan_shards_falcon(capsys, tmp_path):
    target = tmp_path / "falcon_target.py"
    target.write_text(_TARGET)
    code = main(["plan", f"{target}:falcon", "--cluster", "node0=2xA100-80GB,node1=2xT4", "--global-batch", "16",
                 "--tensor-parallel", "2", "--json"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    assert json.loads(out.out)["tensor_parallel"] == 2
