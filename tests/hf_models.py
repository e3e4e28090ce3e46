"""Small transformers models built from configs (no download), with a batch and a loss each.

Every builder returns ``HFCase(model, inputs, target, loss_fn)``: ``model(**inputs)`` runs the
local model, ``loss_fn(model(**inputs), target)`` is its training loss. Weights are random
(seeded), configs tiny so a forward and backward take milliseconds on a CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

VOCAB = 64
SEQ = 8


@dataclasses.dataclass
class HFCase:
    name: str
    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    target: torch.Tensor
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]


def capture_case(case: HFCase):
    """``whale.capture`` of a case's model on its example inputs (keywords as keywords)."""
    from whale.capture import capture, split_example_inputs

    args, kwargs = split_example_inputs(case.model, case.inputs, "test")
    return capture(case.model, args, example_kwargs=kwargs)


def lm_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the model's ``.logits`` (the output object's field) against ``target``."""
    logits = out.logits if hasattr(out, "logits") else out["logits"]
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def _transformers():
    import pytest

    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def _tokens(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(VOCAB, (rows, SEQ), generator=g), torch.randint(VOCAB, (rows, SEQ), generator=g)


def gpt2(rows: int = 8, seed: int = 0) -> HFCase:
    """GPT-2 (Conv1D layers, fused c_attn, lm_head tied to wte)."""
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=4,
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    x, y = _tokens(rows, seed)
    return HFCase("gpt2", t.GPT2LMHeadModel(cfg), {"input_ids": x}, y, lm_loss)


def llama(rows: int = 8, seed: int = 0) -> HFCase:
    """Llama with grouped-query attention (4 heads, 2 kv heads), SwiGLU MLP, rotary inv_freq."""
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    x, y = _tokens(rows, seed)
    return HFCase("llama", t.LlamaForCausalLM(cfg), {"input_ids": x}, y, lm_loss)


def bert(rows: int = 8, seed: int = 0) -> HFCase:
    """BERT masked LM (non-persistent position_ids buffer, attention mask as a keyword input)."""
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=SEQ,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    x, y = _tokens(rows, seed)
    mask = torch.ones_like(x)
    mask[:, -2:] = 0
    return HFCase("bert", t.BertForMaskedLM(cfg), {"input_ids": x, "attention_mask": mask}, y, lm_loss)


def t5(rows: int = 8, seed: int = 0) -> HFCase:
    """T5 encoder-decoder (shared embeddings tied across encoder, decoder and head)."""
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     dropout_rate=0.0, decoder_start_token_id=0)
    x, y = _tokens(rows, seed)
    return HFCase("t5", t.T5ForConditionalGeneration(cfg), {"input_ids": x, "decoder_input_ids": y}, y, lm_loss)


BUILDERS = {"gpt2": gpt2, "llama": llama, "bert": bert, "t5": t5}
