"""A sixth set of transformers (5.25) architectures whale was not written against, built tiny from
configs (no download), like tests/hf_more_models5.py. What each adds:

* ``gpt_oss``: attention sinks (a per-head learned logit in the softmax), sliding window 4 on
  8 tokens in layer 0, biased q/k/v/o, experts as stacked 3-d ``gate_up_proj``/``down_proj``
  with a clamped SwiGLU (alpha, limit), top-2 of 4 with softmax over the top-k.
* ``llama4``: text-only Llama 4: MoE (top-2 of 4, sigmoid router scores scaling the expert
  *input*) plus a shared expert; chunked attention (chunk 4 on 8 tokens) and a NoPE layer with
  attention temperature tuning; q/k L2 norm; dense MLP in layer 0 (``moe_layers=[1]``).
* ``deepseek_v2``: multi-head latent attention (q/kv low-rank projections with their own
  RMSNorms, a decoupled rotary part shared across heads), MoE with a shared expert, top-2 of 4
  greedy, first layer dense.
* ``qwen3_next``: hybrid: gated DeltaNet linear attention (torch fallback: causal conv1d,
  chunked delta rule) in layer 0, gated full attention (q projects a sigmoid output gate) in
  layer 1, zero-centred RMSNorm, MoE top-2 of 4 with a gated shared expert.
* ``bamba``: hybrid Mamba-2 (torch chunked scan, chunk 4) in layer 0, attention in layer 1.
* ``zamba2``: Mamba-2 layers plus a *shared* transformer block (one set of attention/MLP
  weights reused by every hybrid layer) fed the concatenation of the hidden state and the
  original embeddings, with per-layer LoRA adapters and a per-layer linear; tied head.
* ``falcon_mamba``: Mamba-1 with RMS-normed B/C/dt (no kernels: the sequential scan).
* ``phimoe``: SparseMixer routing (a custom autograd Function for the router gradient;
  jitter 0 makes the Gumbel sampling deterministic), sliding window 4, LayerNorms, biased head.
* ``minimax``: hybrid lightning (linear, block size 4, per-head decay) attention in layer 0 and
  softmax attention in layer 1, each residual scaled by alpha/beta factors, MoE top-2 of 4.
* ``ernie4_5_moe``: MoE in layer 1 only, top-2 of 4 with an expert bias correction
  (``moe_statics``, a non-trained e_score_correction_bias) plus a shared expert; biased linears.
* ``cohere2``: parallel attention and MLP off one LayerNorm, sliding window 4 in layer 0 with
  rotary only on the sliding layers (the global layer has no positions), logit scale, tied head.
* ``led``: Longformer encoder-decoder: local windowed attention (window 4) and a global token in
  the encoder, an ordinary decoder.
* ``nllb_moe``: encoder-decoder, top-2 of 4 experts with a capacity counted over the whole
  batch (set so that no token drops: a replica would drop others), a sparse layer every other
  layer, sinusoidal positions. transformers 5.25 reaches experts 0 and 1 only (it one-hots a
  mask that is one-hot already), so experts 2 and 3 get no gradient, locally as well.
* ``reformer``: reversible residual layers (a custom autograd Function that runs the layers
  under no_grad and their children again in backward: the encoder is captured as one opaque call), local attention (chunk 4) in layer 0, LSH attention (2 buckets, fixed hash
  seed) in layer 1, axial position embeddings, chunked feed-forward.
* ``swinv2``: vision: shifted windows (window 4 on 8x8 patches), continuous relative position
  bias from a small MLP on log-spaced coordinates, cosine attention with a learned per-head
  logit scale, patch merging between stages.
* ``wav2vec2_conformer``: raw audio, conformer blocks: two half-step feed-forwards, rotary
  self-attention, a convolution module (GLU, depthwise conv1d, BatchNorm).
"""

from __future__ import annotations

import torch

from tests.hf_models import SEQ, VOCAB, HFCase, _tokens, _transformers, lm_loss
from tests.hf_more_models import CLASSES, _decoder, class_loss
from tests.hf_more_models4 import _LLAMA_LIKE

_MOE = {"num_local_experts": 4, "num_experts_per_tok": 2}


def gpt_oss(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "GptOssConfig", "GptOssForCausalLM", "gpt_oss", rows, seed,
                    **{**_LLAMA_LIKE, "intermediate_size": 16}, num_key_value_heads=2, head_dim=8, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"], use_cache=False, **_MOE)  # fmt: skip


def llama4(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "Llama4TextConfig", "Llama4ForCausalLM", "llama4", rows, seed,
                    **{**_LLAMA_LIKE, "intermediate_size": 16}, intermediate_size_mlp=64, num_key_value_heads=2,
                    head_dim=8, moe_layers=[1], no_rope_layers=[1, 0], attention_chunk_size=4,
                    layer_types=["chunked_attention", "full_attention"], floor_scale=4, attn_scale=0.1,
                    use_cache=False, **_MOE)  # fmt: skip


def deepseek_v2(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "DeepseekV2Config", "DeepseekV2ForCausalLM", "deepseek_v2", rows, seed, **_LLAMA_LIKE,
                    num_key_value_heads=4, kv_lora_rank=8, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                    v_head_dim=8, head_dim=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                    moe_intermediate_size=16, first_k_dense_replace=1, topk_method="greedy",
                    use_cache=False)  # fmt: skip


def qwen3_next(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "Qwen3NextConfig", "Qwen3NextForCausalLM", "qwen3_next", rows, seed, **_LLAMA_LIKE,
                    num_key_value_heads=2, head_dim=8, linear_conv_kernel_dim=4, linear_key_head_dim=8,
                    linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                    moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
                    num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"],
                    use_cache=False)  # fmt: skip


def bamba(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "BambaConfig", "BambaForCausalLM", "bamba", rows, seed, **_LLAMA_LIKE, num_key_value_heads=2,
                    attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head="auto", mamba_n_groups=1, mamba_d_state=4,
                    mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=4, use_cache=False)  # fmt: skip


def zamba2(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "Zamba2Config", "Zamba2ForCausalLM", "zamba2", rows, seed, hidden_size=32,
                    num_hidden_layers=2, layers_block_type=["mamba", "hybrid"], mamba_d_state=4, mamba_d_conv=4,
                    mamba_expand=2, n_mamba_heads=4, use_mamba_kernels=False, chunk_size=4, intermediate_size=64,
                    num_attention_heads=4, num_key_value_heads=4, use_shared_attention_adapter=True,
                    adapter_rank=4, use_mem_rope=True, max_position_embeddings=SEQ, use_cache=False)  # fmt: skip


def falcon_mamba(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "FalconMambaConfig", "FalconMambaForCausalLM", "falcon_mamba", rows, seed, hidden_size=32,
                    state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4, time_step_rank=4,
                    use_mambapy=False, use_cache=False)  # fmt: skip


def phimoe(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "PhimoeConfig", "PhimoeForCausalLM", "phimoe", rows, seed,
                    **{**_LLAMA_LIKE, "intermediate_size": 16}, num_key_value_heads=2, sliding_window=4,
                    router_jitter_noise=0.0, input_jitter_noise=0.0, lm_head_bias=True, use_cache=False,
                    **_MOE)  # fmt: skip


def minimax(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "MiniMaxConfig", "MiniMaxForCausalLM", "minimax", rows, seed,
                    **{**_LLAMA_LIKE, "intermediate_size": 16}, num_key_value_heads=2, head_dim=8, block_size=4,
                    layer_types=["linear_attention", "full_attention"], full_attn_alpha_factor=0.5,
                    linear_attn_alpha_factor=0.75, mlp_alpha_factor=1.5, mlp_beta_factor=0.5, use_cache=False,
                    **_MOE)  # fmt: skip


def ernie4_5_moe(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", "ernie4_5_moe", rows, seed, **_LLAMA_LIKE,
                    num_key_value_heads=2, use_bias=True, moe_intermediate_size=16, moe_k=2, moe_num_experts=4,
                    moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=1, pad_token_id=0,
                    use_cache=False)  # fmt: skip


def cohere2(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "Cohere2Config", "Cohere2ForCausalLM", "cohere2", rows, seed, **_LLAMA_LIKE,
                    num_key_value_heads=2, head_dim=8, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"], logit_scale=0.5, use_cache=False)  # fmt: skip


def led(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.LEDConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                      max_encoder_position_embeddings=SEQ, max_decoder_position_embeddings=SEQ, attention_window=4,
                      dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, use_cache=False)  # fmt: skip
    x, y = _tokens(rows, seed)
    g = torch.zeros_like(x)
    g[:, 0] = 1  # the first token attends globally
    return HFCase("led", t.LEDForConditionalGeneration(cfg),
                  {"input_ids": x, "global_attention_mask": g, "decoder_input_ids": y}, y, lm_loss)  # fmt: skip


def nllb_moe(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.NllbMoeConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                          max_position_embeddings=SEQ + 2, num_experts=4, expert_capacity=2 * rows * SEQ,  # no token dropped: capacity counts the whole batch
                          encoder_sparse_step=2, decoder_sparse_step=2, router_z_loss_coef=0.0,
                          router_aux_loss_coef=0.0, second_expert_policy="all", moe_token_dropout=0.0,
                          moe_eval_capacity_token_fraction=1.0, dropout=0.0, attention_dropout=0.0,
                          activation_dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0, use_cache=False,
                          decoder_start_token_id=2)  # fmt: skip
    x, y = _tokens(rows, seed)
    return HFCase("nllb_moe", t.NllbMoeForConditionalGeneration(cfg), {"input_ids": x, "decoder_input_ids": y},
                  y, lm_loss)  # fmt: skip


def reformer(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.ReformerConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, attention_head_size=8,
                           attn_layers=["local", "lsh"], feed_forward_size=64, axial_pos_embds=True,
                           axial_pos_shape=(2, 4), axial_pos_embds_dim=(16, 16), max_position_embeddings=SEQ,
                           local_attn_chunk_length=4, local_num_chunks_before=1, local_num_chunks_after=0,
                           lsh_attn_chunk_length=4, lsh_num_chunks_before=1, lsh_num_chunks_after=0, num_buckets=2,
                           num_hashes=1, hash_seed=0, is_decoder=True, chunk_size_lm_head=0,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           lsh_attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
                           axial_norm_std=0.1, pad_token_id=0, eos_token_id=2, use_cache=False)  # fmt: skip
    x, y = _tokens(rows, seed)
    return HFCase("reformer", t.ReformerModelWithLMHead(cfg), {"input_ids": x}, y, lm_loss)


def swinv2(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.Swinv2Config(image_size=16, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 1],
                         num_heads=[2, 4], window_size=4, mlp_ratio=2.0, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, drop_path_rate=0.0, num_labels=CLASSES)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(rows, 3, 16, 16, generator=g)
    labels = torch.randint(CLASSES, (rows,), generator=g)
    return HFCase("swinv2", t.Swinv2ForImageClassification(cfg), {"pixel_values": pixels}, labels, class_loss)


def wav2vec2_conformer(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.Wav2Vec2ConformerConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 4),
                                    num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
                                    feat_extract_norm="layer", position_embeddings_type="rotary",
                                    conformer_conv_dropout=0.0, conv_depthwise_kernel_size=3, hidden_dropout=0.0,
                                    activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
                                    final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, apply_spec_augment=False,
                                    classifier_proj_size=16, num_labels=CLASSES)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(rows, 128, generator=g)  # 128 samples -> 15 frames
    labels = torch.randint(CLASSES, (rows,), generator=g)
    return HFCase("wav2vec2_conformer", t.Wav2Vec2ConformerForSequenceClassification(cfg), {"input_values": audio},
                  labels, class_loss)  # fmt: skip


BUILDERS = {
    "gpt_oss": gpt_oss, "llama4": llama4, "deepseek_v2": deepseek_v2, "qwen3_next": qwen3_next, "bamba": bamba,
    "zamba2": zamba2, "falcon_mamba": falcon_mamba, "phimoe": phimoe, "minimax": minimax,
    "ernie4_5_moe": ernie4_5_moe, "cohere2": cohere2, "led": led, "nllb_moe": nllb_moe, "reformer": reformer,
    "swinv2": swinv2, "wav2vec2_conformer": wav2vec2_conformer,
}  # fmt: skip
