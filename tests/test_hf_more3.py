"""A third set of architectures whale was not written against (tests/hf_more_models3.py): each
equals the local model on 2 gloo ranks under a strategy that meets what it adds (loss,
gradients by name, parameters after an AdamW step; tolerances of tests/equivalence.py: fp32,
only the order of additions differs; state dicts round-trip as tests/test_hf_pipeline.py
checks), or is refused with a message that says what is wrong and what to do.

Found by running the 16 of them under data parallel, a split of the whole model, a 2-stage
pipeline, ZeRO 3, an uneven 1F1B pipeline and a checkpointed layer (96 cases, all equal to the
local model or refused clearly), and fixed:

* Splitting a tied LM head alone (RoBERTa's ``lm_head``; GPT-2's) was refused naming the weight
  as its own user ("``lm_head.decoder.weight`` ... also used by ``'lm_head.decoder.weight'``"):
  an exported graph reads the weight by its canonical name. The refusal now names the
  operations that read it and their modules (``'roberta.embeddings.word_embeddings'
  (aten.embedding.default)``).
* A whole-model split refused for a weight it cannot shard suggested modules to split instead
  without their tied partners (DeBERTa-v2: ``'cls'`` without the embedding its decoder is tied
  to), so following the advice met the refusal above. The suggestion now adds the modules that
  share a weight with a suggested one.
* Cohere's refusal named ``_assert_tensor_metadata`` (a dtype check ``.to(float32)`` records)
  as the op that reads ``q_norm.weight``; it now names the multiply that uses it.
* Gemma 3's RMSNorm ends in ``output.type_as(x)``: a second sharded operand made the cast fall
  back, so q and k were gathered and the whole attention ran unsharded (equal, but not faster).
  ``type_as`` and ``to(other)`` take only a dtype from it: the attention now stays sharded.
"""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("transformers")

import whale as wh
from tests.hf_models import capture_case
from tests.hf_more_models3 import BUILDERS
from tests.test_hf_more2 import _check_trainable
from whale.rewrite import TensorParallelAnalysis
from whale.rewrite.tensor_parallel.shard import shard_model

CASES = "tests.hf_more_cases"
# deberta_v2's whole-model split suggests these (tests below): its LM head with the embedding
# it is tied to, and the encoder layers.
DEBERTA_SPLIT = ("cls", "deberta.embeddings", "deberta.encoder.layer")


@pytest.mark.parametrize(
    "name, kwargs",
    [
        # per-head q/k RMSNorm over head_dim, GQA: the whole model split, attention sharded by heads
        ("qwen3", {"split": ("",)}),
        # biased layers, GQA: 7 rows in 4 micro-batches of a 1F1B pipeline
        ("starcoder2", {"stage_boundaries": ["model.layers.1"], "num_micro_batch": 4, "schedule": "1f1b", "rows": 7}),
        # parallel attention and MLP off one LayerNorm: the MLPs split (its refusal's suggestion)
        ("cohere", {"split": ("model.layers.0.mlp", "model.layers.1.mlp")}),
        # q/k RMSNorm over all heads together: gathered there (warned), equal
        ("olmo2", {"split": ("",)}),
        # a q/k LayerNorm module per head, parallel residual: a 2-stage GPipe pipeline
        ("stablelm", {"stage_boundaries": ["model.layers.1"], "num_micro_batch": 2, "schedule": "gpipe"}),
        # embedding, residual, attention and logit multipliers: the whole model split
        ("granite", {"split": ("",)}),
        # q/k RMSNorm ending in type_as, sliding and global layers, scaled tied embedding
        ("gemma3", {"split": ("",)}),
        # global and windowed attention layers, unscaled attention
        ("gpt_neo", {"split": ("",)}),
        # qkv fused in CodeGen's mp_num = 4 layout, interleaved partial rotary
        ("codegen", {"split": ("",)}),
        # position ids computed from the input (cumsum over the padding mask): a checkpointed layer
        ("roberta", {"activation_checkpointing": ["roberta.encoder.layer.1"]}),
        # factorized embeddings projected up: ZeRO 3
        ("electra", {"zero_stage": 3}),
        # disentangled relative attention, relative embeddings shared by the layers
        ("deberta_v2", {"split": DEBERTA_SPLIT}),
        # ALiBi, fused Wqkv, bias-free LayerNorm
        ("mpt", {"split": ("",)}),
        # fused per-head qkv, q/k LayerNorm, squared ReLU
        ("persimmon", {"split": ("",)}),
        # parallel attention and MLP, LM head with a bias: a 2-stage 1F1B pipeline
        ("phi", {"stage_boundaries": ["model.layers.1"], "num_micro_batch": 2}),
        # latent attention (low-rank q and kv), a dense first layer, stacked experts after it:
        # what its whole-model refusal suggests (the dense layer, the attention, the shared expert)
        ("deepseek_v3", {"split": ("model.layers.0", "model.layers.1.self_attn", "model.layers.1.mlp.shared_experts")}),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_equals_local(world2, name, kwargs):
    outs = world2.run(f"{CASES}:equivalence_warnings", name, **kwargs)
    _check_trainable(outs)
    if name == "olmo2":  # a norm over every head reduces over the sharded dim
        (message,) = outs[0]["warnings"]
        assert "q_norm): reduction over the sharded dim" in message, message
    elif name in ("qwen3", "gemma3", "granite", "mpt", "persimmon", "codegen"):
        assert outs[0]["warnings"] == [], "every split value stays sharded"


def _split_error(name: str, paths: tuple[str, ...], *, shard: bool) -> str:
    """The ValueError a split of ``paths`` gets on one process (a group of 2 planned; ``shard``:
    also rewrite the model, where tied weights are checked)."""
    case = BUILDERS[name]()
    wh.annotate(case.model, {p: wh.split() for p in paths})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError) as error:
            if shard:
                shard_model(case.model, capture_case(case), group=None, rank_in_group=0)
            else:
                TensorParallelAnalysis(2)(case.model, capture_case(case))
    return str(error.value)


def test_a_tied_head_split_alone_names_the_embedding_that_reads_it():
    message = _split_error("roberta", ("lm_head",), shard=True)
    assert message.startswith("lm_head.decoder.weight is sharded by split() but also used by "
                              "'roberta.embeddings.word_embeddings' (aten.embedding"), message


def test_a_refused_split_suggests_modules_with_their_tied_partners():
    message = _split_error("deberta_v2", ("",), shard=False)
    assert "reads the parameter 'deberta.encoder.rel_embeddings.weight' of shape (8, 32)" in message
    assert "(e.g. " + ", ".join(repr(p) for p in DEBERTA_SPLIT) + ")" in message, message


def test_a_dtype_check_is_not_named_as_the_refused_use():
    message = _split_error("cohere", ("",), shard=False)
    assert message.startswith("split() cannot shard node mul_6 (aten.mul.Tensor) at "
                              "'model.layers.0.self_attn.q_norm'"), message
    assert "_assert_tensor_metadata" not in message
    assert "(e.g. 'model.layers.0.mlp', 'model.layers.1.mlp')" in message, message
