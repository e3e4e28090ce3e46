"""A second set of transformers architectures beyond tests/hf_models.py and
tests/hf_more_models.py, built tiny from configs (no download).

Each differs from those already covered in a way a parallelizing rewrite can get wrong:

* ``gptj``: interleaved (every-other-channel) rotary on part of the head, attention and MLP in
  parallel off one layer norm, an LM head with a bias.
* ``bloom``: ALiBi, a fused ``query_key_value`` laid out per head, an embedding layer norm.
* ``gpt_bigcode``: multi-query attention in one fused ``c_attn`` (q for all heads, then one k
  and one v).
* ``phi3``: fused ``qkv_proj`` (q, k, v sliced apart) and fused ``gate_up_proj`` (gate and up
  halves split by ``chunk``), partial rotary; ``phi3_gqa`` with grouped kv heads.
* ``gemma2``: embeddings scaled by sqrt(hidden), GeGLU, attention and final logit soft-capping,
  sliding-window layers alternating with global ones, pre and post norms, a tied head.
* ``albert``: ONE layer's weights run at every depth (a shared module called twice), factorized
  embeddings projected up, a tied decoder with a separate bias.
* ``umt5``: T5 with relative position biases per layer (not only the first) and an untied head.
* ``pegasus``: encoder-decoder with sinusoidal (frozen) positions, embeddings scaled, tied.
* ``swin``: windowed attention with shifted windows (roll + masks), patch merging, a relative
  position bias table gathered by an index buffer.
* ``resnet``: convolutions and BatchNorm (running statistics buffers updated in forward).
* ``clip``: two towers (text and vision), keyword inputs ``input_ids`` and ``pixel_values``,
  projections and a learned logit scale.

Builders return ``tests.hf_models.HFCase`` like those of tests/hf_models.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.hf_models import SEQ, VOCAB, HFCase, _tokens, _transformers
from tests.hf_more_models import CLASSES, _decoder, class_loss


def _images(rows: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 3, size, size, generator=g), torch.randint(CLASSES, (rows,), generator=g)


def gptj(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "GPTJConfig", "GPTJForCausalLM", "gptj", rows, seed, n_embd=32, n_layer=2, n_head=4,
                    rotary_dim=4, n_positions=SEQ, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip


def bloom(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "BloomConfig", "BloomForCausalLM", "bloom", rows, seed, hidden_size=32, n_layer=2, n_head=4,
                    hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip


def gpt_bigcode(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "GPTBigCodeConfig", "GPTBigCodeForCausalLM", "gpt_bigcode", rows, seed, n_embd=32,
                    n_layer=2, n_head=4, n_positions=SEQ, multi_query=True, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0)  # fmt: skip


def phi3(rows: int = 8, seed: int = 0, kv_heads: int = 4, name: str = "phi3") -> HFCase:
    """Phi-3-mini's layout: one kv head per query head in the fused ``qkv_proj``."""
    t = _transformers()
    return _decoder(t, "Phi3Config", "Phi3ForCausalLM", name, rows, seed, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads, partial_rotary_factor=0.5,
                    max_position_embeddings=SEQ, original_max_position_embeddings=SEQ, pad_token_id=0,
                    resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)  # fmt: skip


def phi3_gqa(rows: int = 8, seed: int = 0) -> HFCase:
    """Phi-3-medium's layout: 2 kv heads for 4 query heads, ``[q of all heads | k | v]`` fused."""
    return phi3(rows, seed, kv_heads=2, name="phi3_gqa")


def gemma2(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "Gemma2Config", "Gemma2ForCausalLM", "gemma2", rows, seed, hidden_size=32,
                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=8, max_position_embeddings=SEQ, sliding_window=4, attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0, query_pre_attn_scalar=8, pad_token_id=0)  # fmt: skip


def albert(rows: int = 8, seed: int = 0) -> HFCase:
    """ALBERT: 2 hidden layers that run one shared layer group (its weights used twice)."""
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=SEQ,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         classifier_dropout_prob=0.0)  # fmt: skip
    x, y = _tokens(rows, seed)
    mask = torch.ones_like(x)
    mask[:, -2:] = 0
    return HFCase("albert", t.AlbertForMaskedLM(cfg), {"input_ids": x, "attention_mask": mask}, y, _lm_loss)


def _lm_loss(out, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.flatten(0, 1), target.flatten())


def umt5(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.UMT5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                       dropout_rate=0.0, decoder_start_token_id=0, tie_word_embeddings=False)  # fmt: skip
    x, y = _tokens(rows, seed)
    return HFCase("umt5", t.UMT5ForConditionalGeneration(cfg), {"input_ids": x, "decoder_input_ids": y}, y, _lm_loss)


def pegasus(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.PegasusConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, max_position_embeddings=SEQ, dropout=0.0, attention_dropout=0.0,
                          activation_dropout=0.0, pad_token_id=0, decoder_start_token_id=0)  # fmt: skip
    x, y = _tokens(rows, seed)
    return HFCase("pegasus", t.PegasusForConditionalGeneration(cfg), {"input_ids": x, "decoder_input_ids": y}, y,
                  _lm_loss)  # fmt: skip


def swin(rows: int = 8, seed: int = 0) -> HFCase:
    """Swin: 16x16 images, 2x2 patches, windows of 4 (shifted in the second block), patch merging."""
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.SwinConfig(image_size=16, patch_size=2, num_channels=3, embed_dim=8, depths=[2, 1], num_heads=[2, 4],
                       window_size=4, mlp_ratio=2.0, num_labels=CLASSES, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, drop_path_rate=0.0)  # fmt: skip
    pixels, labels = _images(rows, seed)
    return HFCase("swin", t.SwinForImageClassification(cfg), {"pixel_values": pixels}, labels, class_loss)


def resnet(rows: int = 8, seed: int = 0) -> HFCase:
    """ResNet: convolutions with BatchNorm (running statistics updated in every training forward)."""
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                         layer_type="basic", num_labels=CLASSES)  # fmt: skip
    pixels, labels = _images(rows, seed)
    return HFCase("resnet", t.ResNetForImageClassification(cfg), {"pixel_values": pixels}, labels, class_loss)


def clip_loss(out, target: torch.Tensor) -> torch.Tensor:
    """Each image's scaled similarity to its own caption against a target score (a Huber loss,
    so gradients stay of order one at CLIP's logit scale of 14): a loss of rows taken one by
    one. CLIP's contrastive loss compares every row with every other row of the batch, which
    no data-parallel split of the rows preserves."""
    return F.smooth_l1_loss(out.logits_per_image.diagonal(), target)


def clip(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    text = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": SEQ, "eos_token_id": VOCAB - 1}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 16, "patch_size": 8}  # fmt: skip
    cfg = t.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    model = t.CLIPModel(cfg)
    # A key's bias adds one constant to all of a query's scores, which softmax cancels: its
    # gradient is zero but for round-off, which AdamW scales up to +-lr whatever its size.
    # Frozen, so that the comparison measures whale and not the sign of round-off.
    for name, p in model.named_parameters():
        if name.endswith("k_proj.bias"):
            p.requires_grad_(False)
    x, _ = _tokens(rows, seed)
    x = x.clamp(max=VOCAB - 2)
    x[:, -1] = VOCAB - 1  # each caption ends with its end token, whose state is the text's embedding
    pixels, _ = _images(rows, seed)
    target = torch.randn(rows, generator=torch.Generator().manual_seed(seed + 7))
    return HFCase("clip", model, {"input_ids": x, "pixel_values": pixels}, target, clip_loss)


BUILDERS = {
    "gptj": gptj, "bloom": bloom, "gpt_bigcode": gpt_bigcode, "phi3": phi3, "phi3_gqa": phi3_gqa, "gemma2": gemma2, "albert": albert,
    "umt5": umt5, "pegasus": pegasus, "swin": swin, "resnet": resnet, "clip": clip,
}  # fmt: skip
