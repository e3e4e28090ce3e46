"""A third set of transformers architectures whale was not written against, beyond
tests/hf_models.py, tests/hf_more_models.py and tests/hf_more_models2.py, built tiny from configs
(no download); tests/test_hf_more3.py runs them. What each adds:

* ``qwen3``: per-head q/k RMSNorm (over head_dim) before rotary, GQA.
* ``starcoder2``: biased layers, LayerNorm, GELU MLP (c_fc/c_proj), GQA.
* ``cohere``: parallel attention and MLP off one LayerNorm (no bias), interleaved rotary, q/k
  LayerNorm with a weight of shape (heads, head_dim), logit scale, tied head.
* ``olmo2``: q/k RMSNorm over the WHOLE projection (all heads together), post-norms.
* ``stablelm``: partial rotary, per-head q/k LayerNorm (a ModuleList, one per head), parallel residual.
* ``granite``: embedding/residual/attention multipliers, logits scaling.
* ``gemma3``: Gemma 3 text: q/k RMSNorm, sliding/global layers, scaled embedding, tied head.
* ``gpt_neo``: global and local (windowed) attention layers, unscaled attention.
* ``codegen``: fused qkv_proj in CodeGen's ``mp_num=4`` layout, interleaved partial rotary.
* ``roberta``: position ids from the input (padding offset, cumsum), MLM head, attention mask.
* ``electra``: factorized embeddings projected up, generator MLM head.
* ``deberta_v2``: disentangled relative attention (c2p, p2c), shared relative embeddings.
* ``mpt``: ALiBi, fused Wqkv, bias-free LayerNorm.
* ``persimmon``: fused per-head qkv, q/k LayerNorm, squared ReLU.
* ``phi``: Phi-1/2: partial rotary, parallel attention and MLP, biased dense layers, LM head bias.
* ``deepseek_v3``: multi-head latent attention (low-rank q and kv), a dense first layer, MoE.
"""

from __future__ import annotations

import torch

from tests.hf_models import SEQ, VOCAB, HFCase, _tokens, _transformers, lm_loss
from tests.hf_more_models import _decoder

_LLAMA_LIKE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "max_position_embeddings": SEQ}  # fmt: skip


def qwen3(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "Qwen3Config", "Qwen3ForCausalLM", "qwen3", rows, seed, num_key_value_heads=2, head_dim=8,
                    **_LLAMA_LIKE)  # fmt: skip


def starcoder2(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "Starcoder2Config", "Starcoder2ForCausalLM", "starcoder2", rows, seed, num_key_value_heads=2,
                    use_bias=True, residual_dropout=0.0, embedding_dropout=0.0, attention_dropout=0.0,
                    **_LLAMA_LIKE)  # fmt: skip


def cohere(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "CohereConfig", "CohereForCausalLM", "cohere", rows, seed, num_key_value_heads=2,
                    use_qk_norm=True, logit_scale=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                    **_LLAMA_LIKE)  # fmt: skip


def olmo2(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "Olmo2Config", "Olmo2ForCausalLM", "olmo2", rows, seed, num_key_value_heads=2,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2, **_LLAMA_LIKE)  # fmt: skip


def stablelm(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "StableLmConfig", "StableLmForCausalLM", "stablelm", rows, seed, num_key_value_heads=2,
                    partial_rotary_factor=0.5, qk_layernorm=True, use_parallel_residual=True,
                    hidden_dropout=0.0, attention_dropout=0.0, **_LLAMA_LIKE)  # fmt: skip


def granite(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "GraniteConfig", "GraniteForCausalLM", "granite", rows, seed, num_key_value_heads=2,
                    embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25,
                    logits_scaling=4.0, **_LLAMA_LIKE)  # fmt: skip


def gemma3(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "Gemma3TextConfig", "Gemma3ForCausalLM", "gemma3", rows, seed, num_key_value_heads=2,
                    head_dim=8, sliding_window=4, query_pre_attn_scalar=8, pad_token_id=0,
                    layer_types=["sliding_attention", "full_attention"], **_LLAMA_LIKE)  # fmt: skip


def gpt_neo(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "GPTNeoConfig", "GPTNeoForCausalLM", "gpt_neo", rows, seed, hidden_size=32, num_layers=2,
                    num_heads=4, intermediate_size=64, attention_types=[[["global", "local"], 1]], window_size=4,
                    max_position_embeddings=SEQ, embed_dropout=0.0, attention_dropout=0.0,
                    resid_dropout=0.0)  # fmt: skip


def codegen(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "CodeGenConfig", "CodeGenForCausalLM", "codegen", rows, seed, n_embd=32, n_layer=2,
                    n_head=4, rotary_dim=4, n_positions=SEQ, n_ctx=SEQ, n_inner=64, resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip


def _mlm(t, config_cls: str, model_cls: str, name: str, rows: int, seed: int, **cfg) -> HFCase:
    torch.manual_seed(seed)
    model = getattr(t, model_cls)(getattr(t, config_cls)(vocab_size=VOCAB, **cfg))
    x, y = _tokens(rows, seed)
    mask = torch.ones_like(x)
    mask[:, -2:] = 0
    return HFCase(name, model, {"input_ids": x, "attention_mask": mask}, y, lm_loss)


_BERT_LIKE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # fmt: skip


def roberta(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _mlm(t, "RobertaConfig", "RobertaForMaskedLM", "roberta", rows, seed, max_position_embeddings=SEQ + 2,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, **_BERT_LIKE)  # fmt: skip


def electra(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _mlm(t, "ElectraConfig", "ElectraForMaskedLM", "electra", rows, seed, embedding_size=16,
                max_position_embeddings=SEQ, **_BERT_LIKE)  # fmt: skip


def deberta_v2(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _mlm(t, "DebertaV2Config", "DebertaV2ForMaskedLM", "deberta_v2", rows, seed, max_position_embeddings=SEQ,
                relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=4, max_relative_positions=-1,
                position_biased_input=False, norm_rel_ebd="layer_norm", share_att_key=True,
                **_BERT_LIKE)  # fmt: skip


def mpt(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "MptConfig", "MptForCausalLM", "mpt", rows, seed, d_model=32, n_heads=4, n_layers=2,
                    expansion_ratio=2, max_seq_len=SEQ, resid_pdrop=0.0, emb_pdrop=0.0,
                    attn_config={"attn_pdrop": 0, "alibi": True})  # fmt: skip


def persimmon(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "PersimmonConfig", "PersimmonForCausalLM", "persimmon", rows, seed, qk_layernorm=True,
                    partial_rotary_factor=0.5, hidden_dropout=0.0, attention_dropout=0.0, pad_token_id=0,
                    **_LLAMA_LIKE)  # fmt: skip


def phi(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "PhiConfig", "PhiForCausalLM", "phi", rows, seed, partial_rotary_factor=0.5,
                    resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **_LLAMA_LIKE)  # fmt: skip


def deepseek_v3(rows: int = 8, seed: int = 0) -> HFCase:
    t = _transformers()
    return _decoder(t, "DeepseekV3Config", "DeepseekV3ForCausalLM", "deepseek_v3", rows, seed, hidden_size=32,
                    intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
                    qk_nope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                    topk_group=1, n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=SEQ,
                    rope_interleave=True, pad_token_id=0)  # fmt: skip


BUILDERS = {
    "qwen3": qwen3, "starcoder2": starcoder2, "cohere": cohere, "olmo2": olmo2, "stablelm": stablelm,
    "granite": granite, "gemma3": gemma3, "gpt_neo": gpt_neo, "codegen": codegen, "roberta": roberta,
    "electra": electra, "deberta_v2": deberta_v2, "mpt": mpt, "persimmon": persimmon, "phi": phi,
    "deepseek_v3": deepseek_v3,
}  # fmt: skip
