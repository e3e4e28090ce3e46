"""A seventh set of transformers (5.25) architectures whale was not written against, built tiny from
configs (no download), like tests/hf_more_models6.py. What each adds:

* ``rwkv``: RWKV-4 time mixing (the CPU path: a Python loop over tokens of the WKV recurrence
  with a running max for stability), token shift by ZeroPad2d, squared-ReLU channel mixing.
* ``xlstm``: mLSTM blocks (the native chunkwise kernel, chunk 4 on 8 tokens, exponential input
  gates with a max stabiliser), soft-capped gates and logits.
* ``falcon_h1``: attention and Mamba-2 (torch chunked scan, chunk 4) side by side in every layer,
  with the many muP multipliers (embedding, lm head, attention in/out, key, ssm, mlp).
* ``nemotron_h``: one mixer per layer: Mamba-2, MoE (top-2 of 4 sigmoid router with a shared
  expert), attention, relu^2 MLP.
* ``kimi_linear``: Kimi delta attention (torch fallback: chunked gated delta rule, short convs,
  per-channel forget gate) in layer 0, multi-head latent attention (no rope) in layer 1, MoE top-2
  of 4 with a shared expert in layer 1.
* ``lfm2``: a gated short convolution (causal depthwise conv1d, kernel 3) in layer 0 and GQA
  attention with q/k norms in layer 1; tied head.
* ``gemma3n``: text-only Gemma 3n: AltUp (2 predicted streams with a learned router), LAuReL
  low-rank residual, per-layer input embeddings, activation sparsity (gaussian top-k cut-off in
  layer 0), KV sharing (layer 2 reuses layer 0's keys/values through a dict), sliding window 4.
* ``diffllama``: differential attention (two softmax maps subtracted with a learned lambda from
  four re-parameterising vectors), group norm per head.
* ``longcat_flash``: two MLA attentions and two dense MLPs per layer plus a shortcut MoE (top-2 of
  4 real experts plus 2 identity "zero" experts).
* ``modernbert``: masked LM, global attention in layer 0 and local (window 4: 2 either side)
  attention in layer 1, different rope thetas, GeGLU, no biases; tied decoder.
* ``longt5``: encoder with transient-global attention (local radius 2, global blocks of 2 tokens
  whose sums every token attends to), T5 decoder, tied embeddings.
* ``prophetnet``: encoder-decoder with n-gram (2) predicting self-attention in the decoder: a main
  and a predict stream through the same weights, relative position buckets; loss over both.
* ``t5gemma``: Gemma-2 style encoder-decoder (sliding window 4 then global, attention and final
  logit soft-capping, GQA), cross attention.
* ``nystromformer``: masked LM with Nystrom-approximated attention (4 landmarks from segment means
  of 8 tokens, iterative pseudo-inverse, depthwise conv on values).
* ``levit``: vision: conv stem, attention with learned biases gathered by a fixed index buffer,
  hardswish, Linear+BatchNorm1d everywhere, an attention subsample between stages, distilled head.
* ``patchtst``: time series forecasting: per-sample std scaling, patching (unfold), channel
  independent transformer with BatchNorm, a flatten head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.hf_models import SEQ, VOCAB, HFCase, _tokens, _transformers, lm_loss
from tests.hf_more_models import CLASSES, _decoder, class_loss
from tests.hf_more_models4 import _BERT_LIKE, _LLAMA_LIKE, _mlm

_NODROP = {"attention_dropout": 0.0}


def rwkv(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "RwkvConfig", "RwkvForCausalLM", "rwkv", rows, seed, hidden_size=32, attention_hidden_size=32,
                    intermediate_size=64, num_hidden_layers=2, context_length=SEQ, rescale_every=0,
                    use_cache=False)  # fmt: skip


def xlstm(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "xLSTMConfig", "xLSTMForCausalLM", "xlstm", rows, seed, hidden_size=32, embedding_dim=32,
                    num_hidden_layers=2, num_blocks=2, num_heads=2, mode="train", chunk_size=4,
                    chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native",
                    return_last_states=True, autocast_kernel_dtype="float32", ffn_round_up_to_multiple_of=16,
                    ffn_proj_factor=2.0, max_inference_chunksize=SEQ, use_cache=False)  # fmt: skip


def falcon_h1(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "FalconH1Config", "FalconH1ForCausalLM", "falcon_h1", rows, seed, **_LLAMA_LIKE,
                    num_key_value_heads=2, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                    mamba_n_groups=1, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=4,
                    mamba_rms_norm=True, lm_head_multiplier=0.5, embedding_multiplier=2.0,
                    mlp_multipliers=[0.5, 1.5], key_multiplier=0.7, attention_out_multiplier=0.9,
                    attention_in_multiplier=1.1, ssm_multipliers=[0.5, 0.6, 0.7, 0.8, 0.9],
                    ssm_in_multiplier=1.2, ssm_out_multiplier=0.8, use_cache=False)  # fmt: skip


def nemotron_h(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "NemotronHConfig", "NemotronHForCausalLM", "nemotron_h", rows, seed, hidden_size=32,
                    layers_block_type=["mamba", "moe", "attention", "mlp"], num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, max_position_embeddings=SEQ, intermediate_size=64,
                    use_mamba_kernels=False, ssm_state_size=4, mamba_num_heads=4, mamba_head_dim=16, n_groups=1,
                    conv_kernel=4, expand=2, chunk_size=4, n_routed_experts=4, num_experts_per_tok=2,
                    n_shared_experts=1, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16,
                    use_cache=False)  # fmt: skip


def kimi_linear(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "KimiLinearConfig", "KimiLinearForCausalLM", "kimi_linear", rows, seed, **_LLAMA_LIKE,
                    moe_intermediate_size=16, num_key_value_heads=4, num_shared_experts=1, kv_lora_rank=8,
                    q_lora_rank=None, qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=8, num_experts=4,
                    num_experts_per_token=2, layer_types=["linear_attention", "full_attention"],
                    mlp_layer_types=["dense", "sparse"], linear_head_dim=8, linear_num_heads=4,
                    linear_conv_kernel_dim=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                    use_cache=False)  # fmt: skip


def lfm2(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "Lfm2Config", "Lfm2ForCausalLM", "lfm2", rows, seed, **_LLAMA_LIKE, num_key_value_heads=2,
                    layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False, conv_L_cache=3,
                    use_cache=False)  # fmt: skip


def gemma3n(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    case = _decoder(t, "Gemma3nTextConfig", "Gemma3nForCausalLM", "gemma3n", rows, seed, hidden_size=32,
                    intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=8, max_position_embeddings=SEQ, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8, altup_num_inputs=2,
                    laurel_rank=4, num_kv_shared_layers=1, activation_sparsity_pattern=[0.95, 0.0, 0.0],
                    final_logit_softcapping=30.0, use_cache=False)  # fmt: skip
    # AltUp's training forward clamps ``prediction_coefs.weight.data`` in place (a no-op here: the
    # weights are far below the clip of 120), which torch.export cannot trace ("fake tensor in the
    # exported program constant's list"); without the clip the model exports.
    object.__setattr__(case.model.config, "altup_coef_clip", None)
    return case


def diffllama(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "DiffLlamaConfig", "DiffLlamaForCausalLM", "diffllama", rows, seed, **_LLAMA_LIKE,
                    num_key_value_heads=2, head_dim=8, lambda_std_dev=0.1, use_cache=False)  # fmt: skip


def longcat_flash(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "LongcatFlashConfig", "LongcatFlashForCausalLM", "longcat_flash", rows, seed, hidden_size=32,
                    num_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
                    ffn_hidden_size=64, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                    v_head_dim=8, head_dim=4, moe_topk=2, n_routed_experts=4, zero_expert_num=2, expert_ffn_hidden_size=16,
                    routed_scaling_factor=2.0, use_cache=False)  # fmt: skip


def modernbert(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _mlm(t, "ModernBertConfig", "ModernBertForMaskedLM", "modernbert", rows, seed, hidden_size=32,
                intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=SEQ,
                local_attention=4, layer_types=["full_attention", "sliding_attention"], pad_token_id=0,
                eos_token_id=2, bos_token_id=1, cls_token_id=1, sep_token_id=2, embedding_dropout=0.0,
                mlp_dropout=0.0, attention_dropout=0.0)  # fmt: skip


def longt5(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.LongT5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                         num_heads=4, local_radius=2, global_block_size=2, encoder_attention_type="transient-global",
                         relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                         feed_forward_proj="gated-gelu", decoder_start_token_id=0, use_cache=False)  # fmt: skip
    x, y = _tokens(rows, seed)
    return HFCase("longt5", t.LongT5ForConditionalGeneration(cfg), {"input_ids": x, "decoder_input_ids": y}, y,
                  lm_loss)  # fmt: skip


def longt5_mask(rows: int = 8, seed: int = 0) -> HFCase:
    """``longt5`` given its attention mask (all ones): LongT5Stack builds the default mask only when
    not compiling (``is_torchdynamo_compiling()``), and transient-global attention without a mask
    cannot run a batch over 1 (position bias of batch 1 concatenated with a side bias of batch B)."""
    case = longt5(rows, seed)
    case.name = "longt5_mask"
    case.inputs["attention_mask"] = torch.ones_like(case.inputs["input_ids"])
    return case


def gemma3n_clip(rows: int = 8, seed: int = 0) -> HFCase:
    """``gemma3n`` as transformers builds it: AltUp clamps ``prediction_coefs.weight.data`` in place in
    every training forward, which torch.export cannot trace."""
    case = gemma3n(rows, seed)
    case.name = "gemma3n_clip"
    object.__setattr__(case.model.config, "altup_coef_clip", 120.0)
    return case


def prophet_loss(out, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the main stream on ``target`` plus the 2nd-token stream on ``target``
    shifted by one (last position against token 0)."""
    main = F.cross_entropy(out.logits.flatten(0, 1), target.flatten())
    ahead = F.cross_entropy(out.logits_ngram[:, 0].flatten(0, 1), target.roll(-1, 1).flatten())
    return main + 0.5 * ahead


def prophetnet(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.ProphetNetConfig(vocab_size=VOCAB, hidden_size=32, encoder_ffn_dim=64, num_encoder_layers=2,
                             num_encoder_attention_heads=4, decoder_ffn_dim=64, num_decoder_layers=2,
                             num_decoder_attention_heads=4, max_position_embeddings=SEQ + 2, ngram=2, num_buckets=8,
                             relative_max_distance=16, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                             use_cache=False)  # fmt: skip
    x, y = _tokens(rows, seed)
    return HFCase("prophetnet", t.ProphetNetForConditionalGeneration(cfg), {"input_ids": x, "decoder_input_ids": y},
                  y, prophet_loss)  # fmt: skip


def t5gemma(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    sub = dict(vocab_size=VOCAB,  # noqa: C408 - a config given as keywords hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=SEQ, query_pre_attn_scalar=8,
               sliding_window=4, layer_types=["sliding_attention", "full_attention"], dropout_rate=0.0,
               attention_dropout=0.0, final_logit_softcapping=30.0, attn_logit_softcapping=50.0)  # fmt: skip
    cfg = t.T5GemmaConfig(encoder=dict(sub), decoder=dict(sub), vocab_size=VOCAB, dropout_rate=0.0,
                          attention_dropout=0.0, use_cache=False)  # fmt: skip
    x, y = _tokens(rows, seed)
    return HFCase("t5gemma", t.T5GemmaForConditionalGeneration(cfg), {"input_ids": x, "decoder_input_ids": y}, y,
                  lm_loss)  # fmt: skip


def nystromformer(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _mlm(t, "NystromformerConfig", "NystromformerForMaskedLM", "nystromformer", rows, seed, mask=False,
                **_BERT_LIKE,
                max_position_embeddings=SEQ + 2, segment_means_seq_len=SEQ, num_landmarks=4, conv_kernel_size=3,
                inv_coeff_init_option=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip


def levit(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.LevitConfig(image_size=64, patch_size=16, hidden_sizes=[16, 32], num_attention_heads=[2, 4],
                        depths=[2, 1], key_dim=[4, 4], mlp_ratio=[2, 2], attention_ratio=[2, 2],
                        down_ops=[["Subsample", 4, 16 // 4, 4, 2, 2]], drop_path_rate=0,
                        num_labels=CLASSES)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(rows, 3, 64, 64, generator=g)
    labels = torch.randint(CLASSES, (rows,), generator=g)
    return HFCase("levit", t.LevitForImageClassification(cfg), {"pixel_values": pixels}, labels, class_loss)


def forecast_loss(out, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the forecast (rows, prediction length, channels)."""
    return F.mse_loss(out.prediction_outputs, target)


def patchtst(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.PatchTSTConfig(num_input_channels=3, context_length=16, patch_length=4, patch_stride=4,
                           num_hidden_layers=2, d_model=16, num_attention_heads=2, ffn_dim=32, norm_type="batchnorm",
                           prediction_length=4, scaling="std", distribution_output="normal", loss="mse",
                           positional_encoding_type="sincos", share_projection=True, do_mask_input=False)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    past = torch.randn(rows, 16, 3, generator=g).cumsum(1)
    future = torch.randn(rows, 4, 3, generator=g)
    return HFCase("patchtst", t.PatchTSTForPrediction(cfg), {"past_values": past}, future, forecast_loss)


BUILDERS = {
    "rwkv": rwkv, "xlstm": xlstm, "falcon_h1": falcon_h1, "nemotron_h": nemotron_h, "kimi_linear": kimi_linear,
    "lfm2": lfm2, "gemma3n": gemma3n, "diffllama": diffllama, "longcat_flash": longcat_flash,
    "modernbert": modernbert, "longt5": longt5, "prophetnet": prophetnet, "t5gemma": t5gemma,
    "nystromformer": nystromformer, "levit": levit, "patchtst": patchtst,
    "longt5_mask": longt5_mask, "gemma3n_clip": gemma3n_clip,  # variants
}  # fmt: skip
