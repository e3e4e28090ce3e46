"""Tensor parallelism (``split``) on transformers models captured with ``torch.export``.

GPT-2 (fused ``c_attn`` Conv1D split by heads, ``c_proj`` row), Llama (grouped-query attention
split by whole kv-head groups, SwiGLU gate/up column and down row, vocabulary-parallel
embedding, split LM head), BERT (attention and intermediate layers) and T5 (self-, cross-
attention, feed-forward, the relative-position embedding vocabulary-parallel), on 2 gloo ranks
against the local model after one AdamW step (tests/tp_export_cases.py). Tolerances, fp32:

* loss: rtol 1e-6. Sharded matmuls sum their contraction in pieces (row-parallel partial sums
  all-reduced), so only fp32 summation order differs.
* gradients: rtol 1e-4, atol 1e-6, gathered to the local model's names; same reason.
* parameters after AdamW (eps=1e-6): atol 5e-5. Adam's first step moves an entry by about
  ``lr * g / (|g| + eps)``, sensitive to the gradient by at most ``lr / eps = 1e4``; round-off of
  ~1e-9 on near-zero gradient entries moves it by <= 1e-5.

Pure analysis checks (no processes) cover the decisions and the errors.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import whale as wh
from tests.hf_models import BUILDERS
from tests.tp_export_cases import SPLITS, _kwargs
from whale.capture import capture
from whale.rewrite import TensorParallelAnalysis

pytest.importorskip("transformers")

CASES = "tests.tp_export_cases"
FAMILIES = ["gpt2", "llama", "bert", "t5"]


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
    """Uneven shard sizes (the even split is the same code with other offsets)."""
    outs = world2.run(f"{CASES}:families", FAMILIES, True)
    for name in FAMILIES:
        out = outs[0][name]
        _assert_equivalent(name, out)
        assert out["fallbacks"] == (), f"{name}: nothing gathered inside the split ({out['fallbacks']})"
        assert outs[1][name]["loss"] == out["loss"], "every rank computes the same loss"
        for region, given in SPLITS[name][1].items():
            assert out["sizes"][region] == tuple(given)
    # The split LM head's logits stay sharded by class: its loss is the vocabulary-parallel cross-entropy.
    assert [o["llama"]["logits_width"] for o in outs] == [36, 28]


def _plan(name: str, scopes=None, ranks: int = 2):
    case = BUILDERS[name](rows=2)
    wh.annotate(case.model, {s: wh.split() for s in (scopes or SPLITS[name][0])})
    captured = capture(case.model, (), example_kwargs=_kwargs(name, case.inputs))
    assert captured.frontend == "export"
    return TensorParallelAnalysis(ranks)(case.model, captured)


def test_llama_gqa_shards_whole_kv_groups():
    plan = _plan("llama")
    regions = {r.name: (r.kind, r.num_atoms) for r in plan.regions}
    # 4 query heads over 2 kv heads: an atom is a kv head with its 2 query heads.
    assert regions["model.layers.0.self_attn"] == ("heads", 2)
    assert regions["model.layers.1.mlp"] == ("columns", 64)
    assert regions["model.embed_tokens"] == ("vocabulary entries", 64)
    kinds = {d.path: d.kind for d in plan.modules.values()}
    assert kinds["model.layers.0.mlp.gate_proj"] == kinds["model.layers.0.mlp.up_proj"] == "column"
    assert kinds["model.layers.0.mlp.down_proj"] == kinds["model.layers.0.self_attn.o_proj"] == "row"
    assert kinds["model.embed_tokens"] == "vocab" and kinds["lm_head"] == "column"
    with pytest.raises(ValueError, match="only 2 heads"):
        _plan("llama", ranks=4)


def test_gpt2_fused_qkv_is_three_blocks_of_heads():
    plan = _plan("gpt2")
    attn = next(d for d in plan.modules.values() if d.path == "transformer.h.0.attn.c_attn")
    assert (attn.kind, attn.layout.blocks, attn.layout.per_block) == ("column", 3, 32)
    assert plan.region("transformer.h.0.attn").num_atoms == 4


def test_split_of_an_unshardable_node_names_it():
    """A matrix parameter read by an op whale cannot shard (here the tied GPT-2 head inside
    the split while its embedding stays outside) is refused with the node and module path."""
    with pytest.raises(ValueError, match=r"lm_head.*(second time|tied)|tied weight"):
        _plan("gpt2", scopes=["transformer", "lm_head"])
