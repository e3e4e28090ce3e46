"""A fourth set of transformers architectures whale was not written against, beyond
tests/hf_models.py and tests/hf_more_models{,2,3}.py, built tiny from configs (no download).
What each adds:

* ``mamba``: a selective state-space model (no attention): depthwise causal conv1d, a scan
  over the sequence, tied head.
* ``xlnet``: two-stream relative attention (content and query streams, ``perm_mask`` and
  ``target_mapping`` inputs): logits only at the 2 predicted positions.
* ``funnel``: the sequence pooled between blocks (8 -> 4 tokens, the [CLS] kept apart),
  relative-shift attention, a decoder that upsamples back to the full length.
* ``mobilebert``: bottlenecks in and out of every layer, several stacked FFNs, NoNorm
  (an elementwise affine, no statistics), a trigram embedding, a head whose decoder is the
  tied embedding concatenated with a dense weight.
* ``fnet``: Fourier mixing (``torch.fft.fftn``, real part) instead of attention.
* ``mpnet``: a relative position bias computed once in the encoder and shared by every layer.
* ``roformer``: rotary BERT (sinusoidal table sliced per call, rotation applied to q and k).
* ``esm``: protein LM: rotary attention, pre-LayerNorm, token dropout rescaling by the
  per-row share of mask tokens.
* ``wav2vec2``: raw audio: a convolutional feature extractor with GroupNorm, a grouped
  positional convolution under a weight-norm parametrization, mean-pooled classifier.
* ``dinov2``: vision, layer scale, classifier on the [CLS] token concatenated with the mean of
  the patches, an unused mask token parameter.
* ``segformer``: hierarchical vision: overlapping patch embeddings (strided convolutions),
  spatial-reduction attention, a depthwise conv in the MLP, classification.
* ``olmoe``: mixture of experts (top-2 of 4) with q/k RMSNorm over the whole projection.
* ``glm4``: partial (interleaved) rotary, fused gate_up_proj, post-attention and post-MLP norms.
* ``nemotron``: squared ReLU MLP (no gate), LayerNorm1P (weight stored minus one), partial rotary.
* ``mbart``: encoder-decoder, pre-norm with final layer norms, scaled embeddings tied to the head.
* ``biogpt``: learned positions from the attention mask (cumsum, offset 2), scaled embedding.
"""

from __future__ import annotations

import torch

from tests.hf_models import SEQ, VOCAB, HFCase, _tokens, _transformers, lm_loss
from tests.hf_more_models import CLASSES, _decoder, class_loss

_LLAMA_LIKE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "max_position_embeddings": SEQ}  # fmt: skip
_BERT_LIKE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # fmt: skip


def _mlm(t, config_cls: str, model_cls: str, name: str, rows: int, seed: int, mask: bool = True, **cfg) -> HFCase:
    torch.manual_seed(seed)
    model = getattr(t, model_cls)(getattr(t, config_cls)(vocab_size=VOCAB, **cfg))
    x, y = _tokens(rows, seed)
    inputs = {"input_ids": x}
    if mask:
        m = torch.ones_like(x)
        m[:, -2:] = 0
        inputs["attention_mask"] = m
    return HFCase(name, model, inputs, y, lm_loss)


def _images(rows: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 3, size, size, generator=g), torch.randint(CLASSES, (rows,), generator=g)


def mamba(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "MambaConfig", "MambaForCausalLM", "mamba", rows, seed, hidden_size=32, state_size=4,
                    num_hidden_layers=2, expand=2, conv_kernel=4, use_cache=False)  # fmt: skip


def xlnet(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.XLNetConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_inner=64, dropout=0.0, mem_len=None,
                        pad_token_id=0)  # fmt: skip
    x, y = _tokens(rows, seed)
    predict = 2  # the last 2 tokens: no token sees them; the query stream predicts them
    perm = torch.zeros(rows, SEQ, SEQ)
    perm[:, :, -predict:] = 1.0
    mapping = torch.zeros(rows, predict, SEQ)
    for i in range(predict):
        mapping[:, i, SEQ - predict + i] = 1.0
    inputs = {"input_ids": x, "perm_mask": perm, "target_mapping": mapping}
    return HFCase("xlnet", t.XLNetLMHeadModel(cfg), inputs, y[:, -predict:], lm_loss)


def funnel(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _mlm(t, "FunnelConfig", "FunnelForMaskedLM", "funnel", rows, seed, block_sizes=[1, 1],
                num_decoder_layers=1, d_model=32, n_head=4, d_head=8, d_inner=64, hidden_dropout=0.0,
                attention_dropout=0.0, activation_dropout=0.0, initializer_std=0.02)  # fmt: skip


def mobilebert(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _mlm(t, "MobileBertConfig", "MobileBertForMaskedLM", "mobilebert", rows, seed, hidden_size=32,
                embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16, num_attention_heads=4,
                intermediate_size=32, num_hidden_layers=2, num_feedforward_networks=2, normalization_type="no_norm",
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                max_position_embeddings=SEQ)  # fmt: skip


def fnet(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _mlm(t, "FNetConfig", "FNetForMaskedLM", "fnet", rows, seed, mask=False, hidden_size=32,
                num_hidden_layers=2, intermediate_size=64, max_position_embeddings=SEQ,
                use_tpu_fourier_optimizations=False, hidden_dropout_prob=0.0)  # fmt: skip


def mpnet(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _mlm(t, "MPNetConfig", "MPNetForMaskedLM", "mpnet", rows, seed, max_position_embeddings=SEQ + 2,
                pad_token_id=1, **_BERT_LIKE)  # fmt: skip


def roformer(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _mlm(t, "RoFormerConfig", "RoFormerForMaskedLM", "roformer", rows, seed, embedding_size=32,
                max_position_embeddings=SEQ, **_BERT_LIKE)  # fmt: skip


def esm(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    case = _mlm(t, "EsmConfig", "EsmForMaskedLM", "esm", rows, seed, max_position_embeddings=SEQ + 2,
                position_embedding_type="rotary", pad_token_id=1, mask_token_id=3, token_dropout=True,
                emb_layer_norm_before=False, **_BERT_LIKE)  # fmt: skip
    x = case.inputs["input_ids"].clamp(min=4)
    x[::2, 1] = 3  # a mask token in every other row: token dropout rescales those rows
    case.inputs["input_ids"] = x
    return case


def wav2vec2(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.Wav2Vec2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 4),
                           num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, feat_extract_norm="group",
                           hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
                           final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, apply_spec_augment=False,
                           classifier_proj_size=16, num_labels=CLASSES)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(rows, 128, generator=g)  # 128 samples -> 15 frames
    labels = torch.randint(CLASSES, (rows,), generator=g)
    return HFCase("wav2vec2", t.Wav2Vec2ForSequenceClassification(cfg), {"input_values": audio}, labels, class_loss)


def dinov2(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=16,
                         patch_size=4, layerscale_value=0.5, num_labels=CLASSES)  # fmt: skip
    pixels, labels = _images(rows, seed)
    return HFCase("dinov2", t.Dinov2ForImageClassification(cfg), {"pixel_values": pixels}, labels, class_loss)


def segformer(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                            patch_sizes=[3, 3], strides=[2, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                            classifier_dropout_prob=0.0, drop_path_rate=0.0, decoder_hidden_size=16,
                            num_labels=CLASSES)  # fmt: skip
    pixels, labels = _images(rows, seed)
    return HFCase("segformer", t.SegformerForImageClassification(cfg), {"pixel_values": pixels}, labels, class_loss)


def olmoe(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "OlmoeConfig", "OlmoeForCausalLM", "olmoe", rows, seed, hidden_size=32, intermediate_size=16,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                    num_experts_per_tok=2, max_position_embeddings=SEQ, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2)  # fmt: skip


def glm4(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "Glm4Config", "Glm4ForCausalLM", "glm4", rows, seed, num_key_value_heads=2, head_dim=8,
                    partial_rotary_factor=0.5, pad_token_id=0, **_LLAMA_LIKE)  # fmt: skip


def nemotron(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "NemotronConfig", "NemotronForCausalLM", "nemotron", rows, seed, num_key_value_heads=2,
                    head_dim=8, partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                    **_LLAMA_LIKE)  # fmt: skip


def mbart(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.MBartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=SEQ, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                        scale_embedding=True, pad_token_id=1)  # fmt: skip
    x, y = _tokens(rows, seed)
    return HFCase("mbart", t.MBartForConditionalGeneration(cfg), {"input_ids": x, "decoder_input_ids": y}, y,
                  lm_loss)  # fmt: skip


def biogpt(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _mlm(t, "BioGptConfig", "BioGptForCausalLM", "biogpt", rows, seed, max_position_embeddings=SEQ,
                scale_embedding=True, layerdrop=0.0, pad_token_id=1, **_BERT_LIKE)  # fmt: skip


BUILDERS = {
    "mamba": mamba, "xlnet": xlnet, "funnel": funnel, "mobilebert": mobilebert, "fnet": fnet, "mpnet": mpnet,
    "roformer": roformer, "esm": esm, "wav2vec2": wav2vec2, "dinov2": dinov2, "segformer": segformer,
    "olmoe": olmoe, "glm4": glm4, "nemotron": nemotron, "mbart": mbart, "biogpt": biogpt,
}  # fmt: skip
