"""An eighth set of transformers (5.25) architectures whale was not written against, built tiny from
configs (no download), like tests/hf_more_models7.py. What each adds:

* ``doge``: dynamic mask attention (a per-key mask from ``exp(A * softplus(dt_proj(v)))``, top-4
  of 8 keys kept by ``topk``/``scatter``) and a CDMoE (product-key retrieval experts: 4 experts,
  top-2, embeddings as expert weights, plus a shared MLP) in every layer.
* ``minicpm3``: multi-head latent attention (q and kv low rank, rope on a slice), muP-style
  embedding scale and depth-scaled residuals, tied head.
* ``exaone4``: sliding window 4 then global, q/k norms, post-norm residuals (norm after each block).
* ``dots1``: a dense layer then an MoE layer (top-2 of 4, sigmoid router with a correction bias,
  a shared expert), sliding window 4 in layer 1.
* ``glm4_moe``: a dense layer then an MoE layer (top-2 of 4 in 2 groups, group-limited routing),
  q/k norms, partial rotary.
* ``hunyuan_v1_moe``: MoE top-2 of 4 with a shared MLP in every layer, q/k layer norms.
* ``bitnet``: attention and MLP sub-norms, relu^2 gated MLP.
* ``ctrl``: sinusoidal positions (a buffer) scaled embedding, pre-norm, tied head with bias.
* ``xlm``: masked LM with language embeddings (a ``langs`` input, 2 languages), learned positions,
  post-norm, tied adaptive-free prediction layer with its own bias.
* ``sew_d``: audio: conv feature extractor (group norm), squeeze (pooling by 2) and upsample
  around a DeBERTa-v2 encoder (disentangled relative attention, position buckets, a conv
  layer), sequence classification.
* ``squeezebert``: masked LM with grouped 1x1 convolutions (Conv1d, groups 2) in place of linears.
* ``pegasus_x``: encoder with block-local attention (blocks of 4, staggered every other layer)
  plus 2 global tokens, sinusoidal positions, Pegasus decoder, tied embeddings.
* ``perceiver``: masked LM: byte embeddings cross-attended into 4 latents, 2 latent
  self-attentions, decoded by 8 trainable position queries, logits by the embedding matrix.
* ``vit_mae``: pre-training: 75% of 16 patches masked by argsort of a ``noise`` input (the
  random masking path; the noise an input so the run is deterministic), fixed sincos positions,
  a decoder with mask tokens restored by gather; loss on the masked patches only.
* ``regnet``: image classification: conv stem, Y blocks (grouped 3x3, squeeze-excitation),
  BatchNorm everywhere.
* ``canine``: character model: hash embeddings (4 hashes), local attention (chunks of 4 of 16
  chars), downsampling conv by 4, deep transformer on 4 molecules, conv upsampling; token
  classification per character.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.hf_models import SEQ, VOCAB, HFCase, _tokens, _transformers, lm_loss
from tests.hf_more_models import CLASSES, _decoder, class_loss
from tests.hf_more_models4 import _BERT_LIKE, _LLAMA_LIKE, _mlm


def _doge_a(case: HFCase) -> HFCase:
    """``A`` starts at zero, where the dynamic mask is constant (``exp(0) = 1``) and ``dt_proj`` gets
    no gradient: set it to 0.5 so the mask depends on the values."""
    with torch.no_grad():
        for layer in case.model.model.layers:
            layer.self_attn.A.fill_(0.5)
    return case


def doge(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _doge_a(_decoder(t, "DogeConfig", "DogeForCausalLM", "doge", rows, seed, **_LLAMA_LIKE,
                            num_key_value_heads=2, keep_window_size=4, is_moe=True, num_experts=4,
                            num_experts_per_tok=2, use_cache=False))  # fmt: skip


def doge_dense(rows: int = 8, seed: int = 0) -> HFCase:
    """``doge`` without the CDMoE (plain MLPs): its router reshapes (rows, tokens, 2 keys) to
    (2, rows * tokens, keys), mixing rows (transformers' own comment: "this split mixes router
    logits across tokens")."""
    t = _transformers()
    return _doge_a(_decoder(t, "DogeConfig", "DogeForCausalLM", "doge_dense", rows, seed, **_LLAMA_LIKE,
                            num_key_value_heads=2, keep_window_size=4, is_moe=False, use_cache=False))  # fmt: skip


def minicpm3(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "MiniCPM3Config", "MiniCPM3ForCausalLM", "minicpm3", rows, seed, **_LLAMA_LIKE,
                    num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                    v_head_dim=8, scale_emb=2.0, scale_depth=1.4, dim_model_base=16, use_cache=False)  # fmt: skip


def exaone4(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "Exaone4Config", "Exaone4ForCausalLM", "exaone4", rows, seed, **_LLAMA_LIKE,
                    num_key_value_heads=2, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"], use_cache=False)  # fmt: skip


def dots1(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "Dots1Config", "Dots1ForCausalLM", "dots1", rows, seed, **_LLAMA_LIKE, num_key_value_heads=2,
                    moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
                    first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.0, sliding_window=4,
                    layer_types=["full_attention", "sliding_attention"], use_cache=False)  # fmt: skip


def glm4_moe(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "Glm4MoeConfig", "Glm4MoeForCausalLM", "glm4_moe", rows, seed, **_LLAMA_LIKE,
                    num_key_value_heads=2, moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=4,
                    num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
                    routed_scaling_factor=2.0, use_qk_norm=True, use_cache=False)  # fmt: skip


def hunyuan_v1_moe(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", "hunyuan_v1_moe", rows, seed, **_LLAMA_LIKE,
                    num_key_value_heads=2, head_dim=8, num_experts=4, moe_topk=2, use_cache=False)  # fmt: skip


def bitnet(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "BitNetConfig", "BitNetForCausalLM", "bitnet", rows, seed, **_LLAMA_LIKE, num_key_value_heads=2,
                    use_cache=False)  # fmt: skip


def ctrl(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.CTRLConfig(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, dff=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                       embd_pdrop=0.0, use_cache=False)  # fmt: skip
    x, y = _tokens(rows, seed)
    return HFCase("ctrl", t.CTRLLMHeadModel(cfg), {"input_ids": x}, y, lm_loss)


def xlm(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.XLMConfig(vocab_size=VOCAB, emb_dim=32, n_layers=2, n_heads=4, dropout=0.0, attention_dropout=0.0,
                      n_langs=2, use_lang_emb=True, max_position_embeddings=SEQ, causal=False)  # fmt: skip
    x, y = _tokens(rows, seed)
    langs = torch.zeros_like(x)
    langs[1::2] = 1
    mask = torch.ones_like(x)
    mask[:, -2:] = 0
    return HFCase("xlm", t.XLMWithLMHeadModel(cfg), {"input_ids": x, "attention_mask": mask, "langs": langs}, y,
                  lm_loss)  # fmt: skip


def sew_d(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.SEWDConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, squeeze_factor=2, max_position_embeddings=16, position_buckets=8,
                       conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 4), num_conv_pos_embeddings=4,
                       num_conv_pos_embedding_groups=2, feat_extract_norm="group", hidden_dropout=0.0,
                       activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0,
                       layerdrop=0.0, mask_time_prob=0.0, apply_spec_augment=False, classifier_proj_size=16,
                       num_labels=CLASSES)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(rows, 136, generator=g)  # 136 samples -> 16 frames -> squeezed to 8
    labels = torch.randint(CLASSES, (rows,), generator=g)
    return HFCase("sew_d", t.SEWDForSequenceClassification(cfg), {"input_values": audio}, labels, class_loss)


def squeezebert(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _mlm(t, "SqueezeBertConfig", "SqueezeBertForMaskedLM", "squeezebert", rows, seed, **_BERT_LIKE,
                embedding_size=32, max_position_embeddings=SEQ, q_groups=2, k_groups=2, v_groups=2,
                post_attention_groups=1, intermediate_groups=2, output_groups=2)  # fmt: skip


def pegasus_x(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.PegasusXConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4,
                           max_position_embeddings=SEQ, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                           num_global_tokens=2, block_size=4, stagger_local_blocks=True, use_cache=False)  # fmt: skip
    x, y = _tokens(rows, seed)
    return HFCase("pegasus_x", t.PegasusXForConditionalGeneration(cfg), {"input_ids": x, "decoder_input_ids": y}, y,
                  lm_loss)  # fmt: skip


def perceiver(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.PerceiverConfig(vocab_size=VOCAB, max_position_embeddings=SEQ, d_model=32, num_latents=4, d_latents=32,
                            num_blocks=1, num_self_attends_per_block=2, num_self_attention_heads=4,
                            num_cross_attention_heads=2, attention_probs_dropout_prob=0.0)  # fmt: skip
    x, y = _tokens(rows, seed)
    mask = torch.ones_like(x)
    mask[:, -2:] = 0
    return HFCase("perceiver", t.PerceiverForMaskedLM(cfg), {"inputs": x, "attention_mask": mask}, y, lm_loss)


def mae_loss(out, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the reconstruction on the masked patches (ViTMAE's own loss)."""
    per_patch = (out.logits - target).pow(2).mean(-1)
    return (per_patch * out.mask).sum() / out.mask.sum()


def vit_mae(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         image_size=16, patch_size=4, decoder_num_attention_heads=4, decoder_hidden_size=16,
                         decoder_num_hidden_layers=1, decoder_intermediate_size=32, mask_ratio=0.75)  # fmt: skip
    model = t.ViTMAEForPreTraining(cfg)
    # transformers 5.25 leaves the fixed sincos positions (encoder and decoder) and the mask token
    # at zero when built from a config: set them as a checkpoint would have them.
    from transformers.models.vit_mae import modeling_vit_mae as mae

    with torch.no_grad():
        pos = mae.build_2d_sinusoidal_position_embedding(height=4, width=4, embed_dim=32, cls_token=True)
        model.vit.embeddings.position_embeddings.copy_(pos.reshape(model.vit.embeddings.position_embeddings.shape))
        model.decoder.initialize_weights(16)
        model.decoder.mask_token.normal_(std=0.02)
        model.vit.embeddings.cls_token.normal_(std=0.02)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(rows, 3, 16, 16, generator=g)
    noise = torch.rand(rows, 16, generator=g)
    target = model.patchify(pixels).detach()
    return HFCase("vit_mae", model, {"pixel_values": pixels, "noise": noise}, target, mae_loss)


def vit_mae_rand(rows: int = 8, seed: int = 0) -> HFCase:
    """``vit_mae`` drawing its own noise (``torch.rand`` inside forward): a run cannot match the
    local model's (each replica draws for its own rows)."""
    case = vit_mae(rows, seed)
    case.name = "vit_mae_rand"
    del case.inputs["noise"]
    return case


def regnet(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.RegNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8,
                         layer_type="y", num_labels=CLASSES)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(rows, 3, 16, 16, generator=g)
    labels = torch.randint(CLASSES, (rows,), generator=g)
    return HFCase("regnet", t.RegNetForImageClassification(cfg), {"pixel_values": pixels}, labels, class_loss)


def token_class_loss(out, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of per-token classes (rows, tokens, classes)."""
    return F.cross_entropy(out.logits.flatten(0, 1), target.flatten())


def canine(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.CanineConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=32,
                         downsampling_rate=4, upsampling_kernel_size=4, num_hash_functions=4, num_hash_buckets=64,
                         local_transformer_stride=4, num_labels=CLASSES)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    chars = torch.randint(32, 0x250, (rows, 16), generator=g)  # 16 code points: 4 molecules
    labels = torch.randint(CLASSES, (rows, 16), generator=g)
    mask = torch.ones_like(chars)
    mask[:, -3:] = 0
    return HFCase("canine", t.CanineForTokenClassification(cfg), {"input_ids": chars, "attention_mask": mask}, labels,
                  token_class_loss)  # fmt: skip


BUILDERS = {
    "doge": doge, "minicpm3": minicpm3, "exaone4": exaone4, "dots1": dots1, "glm4_moe": glm4_moe,
    "hunyuan_v1_moe": hunyuan_v1_moe, "bitnet": bitnet, "ctrl": ctrl, "xlm": xlm, "sew_d": sew_d,
    "squeezebert": squeezebert, "pegasus_x": pegasus_x, "perceiver": perceiver, "vit_mae": vit_mae,
    "regnet": regnet, "canine": canine,
    "doge_dense": doge_dense, "vit_mae_rand": vit_mae_rand,  # variants
}  # fmt: skip
