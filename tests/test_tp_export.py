"""Tensor parallelism (``split``) on transformers models captured with ``torch.export``.

GPT-2 (fused ``c_attn`` Conv1D split by heads, ``c_proj`` row, ``wte`` and the tied LM head one
vocabulary region), Llama (grouped-query attention
split by whole kv-head groups, SwiGLU gate/up column and down row, vocabulary-parallel
embedding, split LM head with the vocabulary-parallel cross-entropy), BERT (attention and
intermediate layers) and T5 (self- and cross-attention, feed-forward, the relative-position
embedding vocabulary-parallel, the shared embedding tied three ways with the LM head), and
grouped-query attention written with ``scaled_dot_product_attention(enable_gqa=True)``, annotated by module name with uneven shard sizes, on 2 gloo
ranks against the local model after one AdamW step (tests/tp_export_cases.py; one case runs
every family, so capture and the pool are paid once). Tolerances, fp32:

* loss: rtol 1e-6. Sharded matmuls sum their contraction in pieces (row-parallel partial sums
  all-reduced, log-sum-exp combined over ranks), so only fp32 summation order differs.
* gradients: rtol 1e-4, atol 1e-6, gathered to the local model's names; same reason.
* parameters after AdamW (eps=1e-6): atol 5e-5. Adam's first step moves an entry by about
  ``lr * g / (|g| + eps)``, sensitive to the gradient by at most ``lr / eps = 1e4``; round-off of
  ~1e-9 on near-zero gradient entries moves it by <= 1e-5.
* logits on a batch of another size than the captured one: atol 1e-5 (summation order, on
  logits of size ~1).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import whale as wh
from tests.tp_export_cases import SPLITS
from whale.capture import capture
from whale.rewrite import TensorParallelAnalysis

CASES = "tests.tp_export_cases"
FAMILIES = ["gpt2", "llama", "bert", "t5", "gqa-sdpa"]


def _assert_equivalent(name: str, out: dict) -> None:
    assert_close(torch.tensor(out["loss"]), torch.tensor(out["ref_loss"]), rtol=1e-6, atol=0, msg=f"{name} loss")
    assert out["sharded"], f"{name}: nothing was sharded"
    assert set(out["sharded"]) <= set(out["grads"]), f"{name}: every sharded weight has a gathered gradient"
    for param, g in out["grads"].items():
        assert_close(g, out["ref_grads"][param], rtol=1e-4, atol=1e-6, msg=f"{name} grad {param}")
    assert list(out["params"]) == list(out["ref_params"]), f"{name}: the local model's state-dict keys"
    for key, ref in out["ref_params"].items():
        assert_close(out["params"][key], ref, rtol=0, atol=5e-5, msg=f"{name} param {key}")


def test_transformers_split_equals_local(world2):
    pytest.importorskip("transformers")
    outs = world2.run(f"{CASES}:families", FAMILIES, True)
    for name in FAMILIES:
        out = outs[0][name]
        _assert_equivalent(name, out)
        assert out["fallbacks"] == (), f"{name}: nothing gathered inside the split ({out['fallbacks']})"
        assert outs[1][name]["loss"] == out["loss"], "every rank computes the same loss"
        assert all(o[name]["round_trip"] for o in outs), f"{name}: full state dict loads back"
        assert all(o[name]["batch_dynamic"] < 1e-5 for o in outs), f"{name}: another batch size"
        for region, given in SPLITS[name][1].items():
            assert out["sizes"][region] == tuple(given)
    llama, gpt2 = outs[0]["llama"], outs[0]["gpt2"]
    # GQA, 4 query heads over 2 kv heads: an atom is a kv head with its 2 query heads.
    assert llama["regions"]["model.layers.0.self_attn"] == ("heads", 2)
    assert "split(4) at 'model.layers.0.self_attn': 4 shards but only 2 heads" in llama["four_ranks"]
    kinds = {path: kind for path, (kind, _) in llama["decisions"].items()}
    assert kinds["model.layers.0.mlp.gate_proj"] == kinds["model.layers.0.mlp.up_proj"] == "column"
    assert kinds["model.layers.0.mlp.down_proj"] == kinds["model.layers.0.self_attn.o_proj"] == "row"
    assert kinds["model.embed_tokens"] == "vocab" and kinds["lm_head"] == "column"
    # scaled_dot_product_attention(enable_gqa=True): q, k, v shard by whole kv-head groups.
    assert outs[0]["gqa-sdpa"]["regions"]["attn"] == ("heads", 2)
    # The split LM head's logits stay sharded by class (vocabulary-parallel cross-entropy).
    assert [o["llama"]["logits_width"] for o in outs] == [36, 28]
    # GPT-2's LM head is tied to wte: one vocabulary region, both layers share one shard.
    assert [o["gpt2"]["logits_width"] for o in outs] == [40, 24]
    assert gpt2["regions"]["transformer.wte+lm_head"] == ("classes", 64)
    assert gpt2["decisions"]["transformer.wte"][0] == "vocab"
    assert outs[0]["t5"]["regions"]["encoder.embed_tokens+decoder.embed_tokens+lm_head"] == ("classes", 64)
    assert [o["t5"]["logits_width"] for o in outs] == [30, 34]
    # GPT-2's fused qkv Conv1D: three blocks (q, k, v), each split by heads.
    assert gpt2["decisions"]["transformer.h.0.attn.c_attn"] == ("column", 3)
    assert gpt2["decisions"]["transformer.h.0.attn.c_proj"][0] == "row"
    assert gpt2["regions"]["transformer.h.0.attn"] == ("heads", 4)


class _RawMatmul(nn.Module):
    """A parameter used by a plain matmul: no linear/addmm/embedding to shard."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) @ self.w


def test_split_of_an_unshardable_exported_node_names_it():
    model = _RawMatmul()
    wh.annotate(model, {"": wh.split()})
    captured = capture(model, (torch.randn(2, 8),), frontend="export")
    with pytest.raises(ValueError, match=r"cannot shard node matmul \(aten.matmul.default\) at '<root>'.*'w'"):
        TensorParallelAnalysis(2)(model, captured)


def test_exported_split_is_planned_like_fx():
    """The same hand-written model gives the same regions from either front end."""
    from tests.tp_cases import SwiGLU

    model = SwiGLU()
    wh.annotate(model, {"": wh.split()})
    x = torch.randn(2, 4, 32)
    plans = [TensorParallelAnalysis(2)(model, capture(model, (x,), frontend=f)) for f in ("fx", "export")]
    fx, export = ({d.path: d.kind for d in p.modules.values()} for p in plans)
    assert fx == export == {"w1": "column", "w3": "column", "w2": "row"}
    assert [(r.kind, r.num_atoms) for r in plans[0].regions] == [(r.kind, r.num_atoms) for r in plans[1].regions]


def test_sharded_loss_reads_the_logits_field_as_the_output_allows():
    """A loss traced as ``out.logits`` runs on shards for a ModelOutput; for a dict output the
    traced attribute read would fail, so the logits are gathered instead (None)."""
    from tests.hf_models import lm_loss
    from whale.rewrite.tensor_parallel.parallel_loss import VocabParallelCrossEntropy, parallel_loss

    ce = VocabParallelCrossEntropy(offset=0, num_classes=64)
    assert parallel_loss(lm_loss, ce, 64, 3, "logits") is not None
    assert parallel_loss(lm_loss, ce, 64, 3, ("item", "logits")) is None
    assert parallel_loss(lambda out, y: torch.nn.functional.cross_entropy(out["logits"].flatten(0, 1), y.flatten()),
                         ce, 64, 3, ("item", "logits")) is not None


class _Statted(nn.Module):
    """A router whose module holds a child beside its weight (ERNIE 4.5's ``moe_statics``)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 8) * 0.1)
        self.stats = nn.Linear(4, 4)

    def forward(self, x):
        return self.stats(torch.nn.functional.linear(x, self.weight))


def test_a_split_refusal_names_what_else_a_linears_module_holds():
    model = nn.Sequential(nn.Linear(8, 8), _Statted())
    wh.annotate(model, {"": wh.split()})
    with pytest.raises(ValueError) as error:
        TensorParallelAnalysis(2)(model, capture(model, torch.randn(2, 8), frontend="export"))
    message = str(error.value)
    assert "whose module '1' holds more than a weight and a bias (stats)" in message, message
