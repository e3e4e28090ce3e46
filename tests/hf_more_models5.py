"""A fifth set of transformers architectures whale was not written against, beyond
tests/hf_models.py and tests/hf_more_models{,2,3,4}.py, built tiny from configs (no download).
What each adds:

* ``gemma``: GeGLU MLP, RMSNorm with weight stored minus one, embeddings scaled by sqrt(hidden)
  (a buffer), multi-query attention (one kv head), tied head.
* ``qwen2``: biased q/k/v projections (an unbiased o_proj), grouped-query attention.
* ``qwen3_moe``: per-head q/k RMSNorm, top-2 of 4 experts with normalized routing weights on
  the second layer only (``mlp_only_layers``: the first layer a dense MLP).
* ``jamba``: hybrid: a Mamba mixer (no kernels: the sequential scan) in layer 0, attention with
  a mixture of experts in layer 1, dt/B/C RMSNorms.
* ``granitemoe``: experts stored as stacked 3-d weights (``input_linear``/``output_linear``),
  embedding, residual, attention and logits multipliers; ``use_cache`` only through
  ``**kwargs`` (capture turns ``config.use_cache`` off while it runs).
* ``jetmoe``: mixture of attention heads (q and o projections are experts routed per token)
  and a mixture of MLP experts, both top-2 of 4; the experts split the rows by counts read from
  the routing (``.tolist()``), sizes known only at run time (captured as opaque calls).
* ``dbrx``: fused Wqkv with clipping (``clip_qkv``), LayerNorms without bias, experts stored as
  2-d ``w1``/``v1``/``w2`` parameters viewed per expert, in a loop over the experts some token
  was routed to, which export cannot trace (captured as one opaque call per layer).
* ``mamba2``: state-space duality: multi-head SSM computed in chunks (segment sums, cumsum,
  exp), a gated RMSNorm, grouped B/C.
* ``recurrent_gemma``: Griffin: a real-gated linear recurrent unit (RG-LRU) block with a
  temporal conv1d in layer 0, local sliding-window attention in layer 1, logits soft-capping.
* ``xglm``: sinusoidal positions computed from the input (offset by the padding index), scaled
  embeddings, pre-norm decoder, a final LayerNorm.
* ``longformer``: sliding-window local attention (window 4 on 8 tokens, chunked with
  as_strided and diagonal shifts) plus a global-attention token with its own q/k/v projections;
  ``if is_global_attn:`` on a tensor's value (the self-attention captured as an opaque call).
* ``big_bird``: block-sparse attention (block size 1, one random block: a numpy-seeded random
  plan, gathered blocks), global first and last blocks; its pooler is unused (no gradient).
* ``convbert``: mixed attention: half the heads self-attention, half span-based dynamic
  convolution (a separable conv1d predicting per-token kernels, unfold), grouped linear FFN
  absent (num_groups=1), an embedding narrower than hidden.
* ``switch_transformers``: encoder-decoder with top-1 routing to 4 experts, a per-row expert
  capacity (tokens beyond it skip the experts), sparse every other layer, T5 relative bias.
* ``hubert``: raw audio: convolutional feature extractor with a layer norm per conv layer
  (``feat_extract_norm="layer"``), a stable-layer-norm encoder, a weight-normed positional conv.
* ``mobilevit``: vision: inverted residual convolutions with BatchNorm, then transformer blocks
  over unfolded patches (reshape/transpose of the image into patch sequences and back);
  initializer_range 0.1 (at 0.02 the logits are ~1e-7 and almost every gradient is below 1e-5).
"""

from __future__ import annotations

import torch

from tests.hf_models import SEQ, VOCAB, HFCase, _tokens, _transformers, lm_loss
from tests.hf_more_models import CLASSES, _decoder, class_loss
from tests.hf_more_models4 import _BERT_LIKE, _LLAMA_LIKE, _mlm


def gemma(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "GemmaConfig", "GemmaForCausalLM", "gemma", rows, seed, num_key_value_heads=1, head_dim=8,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2, **_LLAMA_LIKE)  # fmt: skip


def qwen2(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "Qwen2Config", "Qwen2ForCausalLM", "qwen2", rows, seed, num_key_value_heads=2,
                    **_LLAMA_LIKE)  # fmt: skip


def qwen3_moe(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "Qwen3MoeConfig", "Qwen3MoeForCausalLM", "qwen3_moe", rows, seed, num_key_value_heads=2,
                    head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                    mlp_only_layers=[0], **_LLAMA_LIKE)  # fmt: skip


def jamba(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "JambaConfig", "JambaForCausalLM", "jamba", rows, seed, num_key_value_heads=2,
                    num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
                    attn_layer_period=2, attn_layer_offset=1, use_mamba_kernels=False, mamba_d_state=4,
                    mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, use_cache=False, **_LLAMA_LIKE)  # fmt: skip


def granitemoe(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "GraniteMoeConfig", "GraniteMoeForCausalLM", "granitemoe", rows, seed,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=2.0,
                    logits_scaling=4.0, residual_multiplier=0.5, attention_multiplier=0.25, pad_token_id=0,
                    **{**_LLAMA_LIKE, "intermediate_size": 16})  # fmt: skip


def jetmoe(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "JetMoeConfig", "JetMoeForCausalLM", "jetmoe", rows, seed, hidden_size=32,
                    num_hidden_layers=2, num_key_value_heads=2, kv_channels=8, intermediate_size=16,
                    max_position_embeddings=SEQ, num_local_experts=4, num_experts_per_tok=2,
                    pad_token_id=0)  # fmt: skip


def dbrx(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.DbrxConfig(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, max_seq_len=SEQ,
                       attn_config={"kv_n_heads": 2, "clip_qkv": 0.5},
                       ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2},
                       pad_token_id=0)  # fmt: skip
    # transformers 5.x's DbrxAttention reads attn_config.rope_theta, which the config no longer
    # has (rotary takes config.rope_parameters); the attribute is stored, never used.
    cfg.attn_config.rope_theta = cfg.rope_parameters["rope_theta"]
    x, y = _tokens(rows, seed)
    return HFCase("dbrx", t.DbrxForCausalLM(cfg), {"input_ids": x}, y, lm_loss)


def mamba2(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "Mamba2Config", "Mamba2ForCausalLM", "mamba2", rows, seed, num_heads=8, head_dim=8,
                    hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, n_groups=2, chunk_size=4,
                    conv_kernel=4, use_cache=False)  # fmt: skip


def recurrent_gemma(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "RecurrentGemmaConfig", "RecurrentGemmaForCausalLM", "recurrent_gemma", rows, seed,
                    num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                    num_key_value_heads=1, lru_width=32, attention_window_size=4, conv1d_width=4,
                    logits_soft_cap=30.0, block_types=["recurrent", "attention"], use_cache=False)  # fmt: skip


def xglm(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "XGLMConfig", "XGLMForCausalLM", "xglm", rows, seed, d_model=32, ffn_dim=64, num_layers=2,
                    attention_heads=4, max_position_embeddings=SEQ, dropout=0.0, attention_dropout=0.0,
                    activation_dropout=0.0, layerdrop=0.0, scale_embedding=True, pad_token_id=1)  # fmt: skip


def longformer(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    case = _mlm(t, "LongformerConfig", "LongformerForMaskedLM", "longformer", rows, seed, attention_window=4,
                max_position_embeddings=SEQ + 2, pad_token_id=1, **_BERT_LIKE)  # fmt: skip
    g = torch.zeros_like(case.inputs["input_ids"])
    g[:, 0] = 1  # the first token attends globally
    case.inputs["global_attention_mask"] = g
    return case


def big_bird(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _mlm(t, "BigBirdConfig", "BigBirdForMaskedLM", "big_bird", rows, seed, attention_type="block_sparse",
                block_size=1, num_random_blocks=1, max_position_embeddings=SEQ, **_BERT_LIKE)  # fmt: skip


def convbert(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _mlm(t, "ConvBertConfig", "ConvBertForMaskedLM", "convbert", rows, seed, embedding_size=16,
                head_ratio=2, conv_kernel_size=3, num_groups=1, max_position_embeddings=SEQ,
                **_BERT_LIKE)  # fmt: skip


def switch_transformers(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.SwitchTransformersConfig(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                     num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
                                     num_heads=4, num_experts=4, expert_capacity=4, router_jitter_noise=0.0,
                                     dropout_rate=0.0, decoder_start_token_id=0, use_cache=False)  # fmt: skip
    x, y = _tokens(rows, seed)
    return HFCase("switch_transformers", t.SwitchTransformersForConditionalGeneration(cfg),
                  {"input_ids": x, "decoder_input_ids": y}, y, lm_loss)  # fmt: skip


def hubert(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.HubertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 4),
                         num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, feat_extract_norm="layer",
                         do_stable_layer_norm=True, conv_bias=True, hidden_dropout=0.0, activation_dropout=0.0,
                         attention_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0,
                         mask_time_prob=0.0, apply_spec_augment=False, classifier_proj_size=16,
                         num_labels=CLASSES)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(rows, 128, generator=g)  # 128 samples -> 15 frames
    labels = torch.randint(CLASSES, (rows,), generator=g)
    return HFCase("hubert", t.HubertForSequenceClassification(cfg), {"input_values": audio}, labels, class_loss)


def mobilevit(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.MobileViTConfig(image_size=32, patch_size=2, hidden_sizes=[16, 16, 16],
                            neck_hidden_sizes=[8, 8, 16, 16, 16, 16, 32], num_attention_heads=2, mlp_ratio=2.0,
                            expand_ratio=2.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            classifier_dropout_prob=0.0, num_labels=CLASSES,
                            initializer_range=0.1)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(rows, 3, 32, 32, generator=g)
    labels = torch.randint(CLASSES, (rows,), generator=g)
    return HFCase("mobilevit", t.MobileViTForImageClassification(cfg), {"pixel_values": pixels}, labels, class_loss)


BUILDERS = {
    "gemma": gemma, "qwen2": qwen2, "qwen3_moe": qwen3_moe, "jamba": jamba, "granitemoe": granitemoe,
    "jetmoe": jetmoe, "dbrx": dbrx, "mamba2": mamba2, "recurrent_gemma": recurrent_gemma, "xglm": xglm,
    "longformer": longformer, "big_bird": big_bird, "convbert": convbert, "switch_transformers": switch_transformers,
    "hubert": hubert, "mobilevit": mobilevit,
}  # fmt: skip
