"""transformers architectures beyond tests/hf_models.py, built tiny from configs (no download).

Each differs from GPT-2/Llama/BERT/T5 in a way that a parallelizing rewrite can get wrong:

* ``mistral``: grouped-query attention with a sliding window shorter than the sequence.
* ``gpt_neox``: attention and MLP in parallel off one residual, partial rotary, and a fused
  ``query_key_value`` laid out per head (``[heads, (q, k, v), head_dim]``, not GPT-2's
  ``[(q, k, v), heads, head_dim]``).
* ``falcon``: multi-query attention (one kv head) fused into ``query_key_value``, ALiBi
  position biases (one slope per head), parallel attention and MLP.
* ``distilbert``: an encoder whose attention mask is a keyword input.
* ``vit``: image inputs, a patch-embedding convolution, a class token, a classification head.
* ``bart``: encoder-decoder with learned positions (offset 2), embeddings tied four ways and a
  ``final_logits_bias`` buffer.
* ``mixtral``: mixture of experts with top-2 routing (data-dependent control flow).

Builders return ``tests.hf_models.HFCase`` like those of tests/hf_models.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.hf_models import SEQ, VOCAB, HFCase, _tokens, _transformers, lm_loss

CLASSES = 10


def class_loss(out, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of an image classifier's ``.logits`` (rows, classes)."""
    return F.cross_entropy(out.logits, target)


def _decoder(t, config_cls, model_cls, name: str, rows: int, seed: int, **cfg) -> HFCase:
    torch.manual_seed(seed)
    model = getattr(t, model_cls)(getattr(t, config_cls)(vocab_size=VOCAB, **cfg))
    x, y = _tokens(rows, seed)
    return HFCase(name, model, {"input_ids": x}, y, lm_loss)


def mistral(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "MistralConfig", "MistralForCausalLM", "mistral", rows, seed, hidden_size=32,
                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=SEQ, sliding_window=4)  # fmt: skip


def gpt_neox(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "GPTNeoXConfig", "GPTNeoXForCausalLM", "gpt_neox", rows, seed, hidden_size=32,
                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5,
                    max_position_embeddings=SEQ, use_parallel_residual=True, hidden_dropout=0.0,
                    attention_dropout=0.0)  # fmt: skip


def falcon(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "FalconConfig", "FalconForCausalLM", "falcon", rows, seed, hidden_size=32,
                    num_hidden_layers=2, num_attention_heads=4, multi_query=True, alibi=True,
                    parallel_attn=True, new_decoder_architecture=False, hidden_dropout=0.0,
                    attention_dropout=0.0)  # fmt: skip


def falcon_alibi(rows: int = 8, seed: int = 0) -> HFCase:
    """Falcon with one kv head per query head, ALiBi and biased ``x @ W.T + b`` layers."""
    t = _transformers()
    return _decoder(t, "FalconConfig", "FalconForCausalLM", "falcon_alibi", rows, seed, hidden_size=32,
                    num_hidden_layers=2, num_attention_heads=4, multi_query=False, alibi=True, bias=True,
                    parallel_attn=True, new_decoder_architecture=False, hidden_dropout=0.0,
                    attention_dropout=0.0)  # fmt: skip


def falcon_gqa(rows: int = 8, seed: int = 0) -> HFCase:
    """Falcon's new decoder architecture (40B/180B): 2 kv heads, rotary, fused grouped qkv."""
    t = _transformers()
    return _decoder(t, "FalconConfig", "FalconForCausalLM", "falcon_gqa", rows, seed, hidden_size=32,
                    num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
                    alibi=False, bias=True, hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip


def distilbert(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                             max_position_embeddings=SEQ, dropout=0.0, attention_dropout=0.0)  # fmt: skip
    x, y = _tokens(rows, seed)
    mask = torch.ones_like(x)
    mask[:, -2:] = 0
    return HFCase("distilbert", t.DistilBertForMaskedLM(cfg), {"input_ids": x, "attention_mask": mask}, y, lm_loss)


def vit(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=64, num_labels=CLASSES,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(rows, 3, 16, 16, generator=g)
    labels = torch.randint(CLASSES, (rows,), generator=g)
    return HFCase("vit", t.ViTForImageClassification(cfg), {"pixel_values": pixels}, labels, class_loss)


def bart(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                       decoder_ffn_dim=64, max_position_embeddings=SEQ, dropout=0.0, attention_dropout=0.0,
                       activation_dropout=0.0)  # fmt: skip
    x, y = _tokens(rows, seed)
    model = t.BartForConditionalGeneration(cfg)
    return HFCase("bart", model, {"input_ids": x, "decoder_input_ids": y}, y, lm_loss)


def mixtral(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "MixtralConfig", "MixtralForCausalLM", "mixtral", rows, seed, hidden_size=32,
                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=SEQ, num_local_experts=4, num_experts_per_tok=2,
                    router_jitter_noise=0.0)  # fmt: skip


def whisper(rows: int = 8, seed: int = 0) -> HFCase:
    """Whisper: a convolutional front end over audio features, encoder-decoder."""
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.WhisperConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=8, max_target_positions=SEQ,
                          dropout=0.0, pad_token_id=0, decoder_start_token_id=1)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(rows, 8, 16, generator=g)
    x, y = _tokens(rows, seed)
    return HFCase("whisper", t.WhisperForConditionalGeneration(cfg),
                  {"input_features": feats, "decoder_input_ids": x}, y, lm_loss)  # fmt: skip


def opt(rows: int = 8, seed: int = 0) -> HFCase:
    """OPT: learned positions from the attention mask, project_in/out around a narrower embedding."""
    t = _transformers()
    return _decoder(t, "OPTConfig", "OPTForCausalLM", "opt", rows, seed, hidden_size=32, ffn_dim=64,
                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=SEQ,
                    word_embed_proj_dim=16, dropout=0.0)  # fmt: skip


def qwen2_moe(rows: int = 8, seed: int = 0) -> HFCase:
    """Qwen2-MoE: stacked experts beside a gated shared expert."""
    t = _transformers()
    return _decoder(t, "Qwen2MoeConfig", "Qwen2MoeForCausalLM", "qwen2_moe", rows, seed, hidden_size=32,
                    intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                    num_experts_per_tok=2, max_position_embeddings=SEQ)  # fmt: skip


def convnext(rows: int = 8, seed: int = 0) -> HFCase:
    """ConvNeXt: depthwise convolutions, channels-last layer norms, no attention."""
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=CLASSES,
                           image_size=16)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(rows, 3, 16, 16, generator=g)
    labels = torch.randint(CLASSES, (rows,), generator=g)
    return HFCase("convnext", t.ConvNextForImageClassification(cfg), {"pixel_values": pixels}, labels, class_loss)


BUILDERS = {
    "mistral": mistral, "gpt_neox": gpt_neox, "falcon": falcon, "falcon_alibi": falcon_alibi,
    "falcon_gqa": falcon_gqa, "distilbert": distilbert, "vit": vit,
    "bart": bart, "mixtral": mixtral, "whisper": whisper, "opt": opt, "qwen2_moe": qwen2_moe, "convnext": convnext,
}  # fmt: skip

