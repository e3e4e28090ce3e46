"""A fourth set of architectures whale was not written against (tests/hf_more_models4.py): each
equals the local model on 2 gloo ranks under a strategy that meets what it adds (loss,
gradients by name, parameters after an AdamW step; tolerances of tests/equivalence.py: fp32,
only the order of additions differs; state dicts round-trip as tests/test_hf_pipeline.py
checks), or is refused with a message that says what is wrong and what to do.

Found by running the 16 of them under data parallel, a split of the whole model, a 2-stage
pipeline, ZeRO 3, an uneven 1F1B pipeline and a checkpointed layer (96 cases), and fixed:

* A pipeline held no parameter that forward never reads (DINOv2's ``mask_token``, ESM's
  contact head, XLNet's segment biases when no ``token_type_ids`` are passed): no stage had
  them, and ``full_state_dict()`` failed on a bare assertion (a checkpoint would have lost
  them). Each now goes to the stage of its neighbour in the state dict, untrained.
* Data parallel (ZeRO 1 to 3, a checkpointed layer) gave such a parameter a zero gradient
  where the local model gives none, so AdamW's weight decay moved it. A parameter no rank used
  now keeps no gradient, as DDP leaves it (tests/test_data_parallel.py checks one used on
  one rank only, too).
* A refused whole-model split suggested modules whose split was refused in turn: the first
  four of Mamba's list cut its LM head from the embedding it is tied to, and MobileBERT's
  ``'mobilebert'`` held the embedding its head reads directly (concatenated with a dense
  weight). A shortened suggestion now keeps each module's tied partners, and a layer whose
  weight an op also reads directly is left out of it.
* RoFormer's rotary ``stack(...).reshape_as(q)`` had no sharding rule, so q and k were
  gathered and its attention ran whole on every rank (equal, not faster). ``reshape_as`` and
  ``view_as`` to a tensor sharded as the result would be now keep the shard.
"""

from __future__ import annotations

import re
import warnings

import pytest

pytest.importorskip("transformers")

import whale as wh
from tests.hf_cases import BUILDERS, whole_split_refusal
from tests.hf_models import capture_case
from tests.test_hf_more2 import _check_trainable
from whale.rewrite.tensor_parallel.shard import shard_model

CASES = "tests.hf_more_cases"


@pytest.mark.parametrize(
    "name, kwargs",
    [
        # a state-space scan over the sequence, depthwise conv1d: 7 rows in a 1F1B pipeline
        ("mamba", {"stage_boundaries": ["backbone.layers.1"], "num_micro_batch": 4, "schedule": "1f1b", "rows": 7}),
        # two-stream relative attention; segment biases unused without token_type_ids: ZeRO 3
        # gives them no gradient
        ("xlnet", {"zero_stage": 3}),
        # the sequence pooled between blocks: the FFNs split (its refusal's suggestion)
        ("funnel", {"split": ("funnel.decoder.layers.0.ffn", "funnel.encoder.blocks.0.0.ffn",
                              "funnel.encoder.blocks.1.0.ffn")}),
        # bottlenecks, NoNorm, stacked FFNs: the encoder split, the tied head left whole
        ("mobilebert", {"split": ("mobilebert.encoder",)}),
        # Fourier mixing; the pooler's output reaches no loss (no gradient): a checkpointed layer
        ("fnet", {"activation_checkpointing": ["fnet.encoder.layer.1"]}),
        # a relative position bias shared by every layer: a 2-stage pipeline
        ("mpnet", {"stage_boundaries": ["mpnet.encoder.layer.1"], "num_micro_batch": 2}),
        # rotary BERT: the whole model split
        ("roformer", {"split": ("",)}),
        # the contact head, never run, held by the last stage: 7 rows in a 1F1B pipeline
        ("esm", {"stage_boundaries": ["esm.encoder.layer.1"], "num_micro_batch": 4, "schedule": "1f1b", "rows": 7}),
        # raw audio through convolutions (replicated), the transformer layers split
        ("wav2vec2", {"split": ("wav2vec2.encoder.layers",)}),
        # the unused mask token held by stage 0
        ("dinov2", {"stage_boundaries": ["dinov2.encoder.layer.1"], "num_micro_batch": 2}),
        # strided convolutions, spatial-reduction attention: ZeRO 3
        ("segformer", {"zero_stage": 3}),
        # mixture of experts (stacked, refused for split): the attention split
        ("olmoe", {"split": ("model.layers.0.self_attn", "model.layers.1.self_attn")}),
        # partial interleaved rotary, fused gate_up_proj: the whole model split
        ("glm4", {"split": ("",)}),
        # squared ReLU, LayerNorm1P: the whole model split
        ("nemotron", {"split": ("",)}),
        # encoder | decoder as two stages, the embedding tied across them
        ("mbart", {"stage_boundaries": ["model.decoder"], "num_micro_batch": 2}),
        # positions from the attention mask: ZeRO 1
        ("biogpt", {"zero_stage": 1}),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_equals_local(world2, name, kwargs):
    outs = world2.run(f"{CASES}:equivalence_warnings", name, **kwargs)
    _check_trainable(outs)
    if name == "roformer":  # the rotary attention stays sharded; only the MLM head's norm gathers
        (message,) = outs[0]["warnings"]
        assert "1 sharded value(s)" in message and "(cls.predictions.transform.LayerNorm)" in message, message
    elif name in ("glm4", "nemotron"):
        assert outs[0]["warnings"] == [], "every split value stays sharded"


def test_a_split_stage_keeps_what_its_graph_never_reads(world4):
    """Pipeline x split on 4 ranks: stage 0 (split) holds DINOv2's unused mask token whole, beside
    its shards (the sharded stage is made from a graph that never reads it)."""
    outs = world4.run(f"{CASES}:equivalence_warnings", "dinov2", split=("dinov2.encoder",),
                      stage_boundaries=["dinov2.encoder.layer.1"], num_micro_batch=2)
    _check_trainable(outs)


@pytest.mark.parametrize(
    "name, suggested, left",
    [
        # the embedding with the LM head tied to it, though the list is shortened
        ("mamba", ("backbone.embeddings", "lm_head"), "'backbone.layers.0.mixer'"),
        # the head concatenates the tied embedding with a dense weight: the embedding stays whole
        ("mobilebert", ("mobilebert.encoder",), "'mobilebert.embeddings.word_embeddings'"),
        # a weight-norm convolution is named by its module, not its parametrization's
        ("wav2vec2", ("wav2vec2.encoder.layers",), "'wav2vec2.encoder.pos_conv_embed.conv'"),
        # an MLP whose column and row layers sit in two modules (one feeds the other), shown together
        ("swinv2", ("swinv2.encoder.layers.0.blocks.0.intermediate", "swinv2.encoder.layers.0.blocks.0.output"),
         "'swinv2.encoder.layers.0.blocks.0.attention.self'"),
    ],
)
def test_following_a_refused_splits_suggestion_is_not_refused(name, suggested, left):
    """A whole-model split refused for a weight whale cannot shard suggests modules to split
    instead; splitting them shards no weight without its other user (the tied-weight check in
    ``shard_model`` passes)."""
    message = whole_split_refusal(name)
    paths = tuple(p.strip("'") for p in re.search(r"\(e\.g\. (.*?)\), leaving", message).group(1).split(", "))
    assert set(suggested) <= set(paths), message
    assert left in message.split("leaving")[1] and ".parametrizations." not in message, message
    case = BUILDERS[name]()
    wh.annotate(case.model, {p: wh.split() for p in paths})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shard_model(case.model, capture_case(case), group=None, rank_in_group=0)
