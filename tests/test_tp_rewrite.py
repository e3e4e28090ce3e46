"""The tensor-parallel pass without processes: its decisions, shard arithmetic, and errors.

Plans are made for a group of 2 or 4 ranks and applied for one rank with no process group
(collectives are only constructed, never run), so the rewritten graph can be inspected and its
collectives counted statically. Numerics are in test_tensor_parallel.py.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import whale as wh
from examples.moe import MoE, MoELM
from tests.models import Block, MHAModel, TinyGPT
from tests.tp_cases import Classifier, build, lm_loss
from whale.capture import capture
from whale.capture.graph import NODE_INFO_KEY
from whale.ir.rows import row_offsets
from whale.rewrite.tensor_parallel.parallel_loss import VocabParallelCrossEntropy, parallel_loss
from whale.rewrite.tensor_parallel.shard_sizes import even_sizes, validate_sizes
from whale.rewrite.tensor_parallel.shard import TensorParallelRewrite, resolve_sizes, shard_model
from whale.rewrite.tensor_parallel.analysis import TensorParallelAnalysis
from whale.rewrite.tensor_parallel.layout import ShardLayout, view_groups, view_move
from whale.rewrite.tensor_parallel.modules import ColumnParallelLinear, RowParallelLinear, ShardSpec, shard_tensor


def _plan(model, x, ranks=2, **kw):
    return TensorParallelAnalysis(ranks, **kw)(model, capture(model, (x,)))


def _rewrite(model, x, ranks=2, rank=0, sizes=None):
    plan = _plan(model, x, ranks)
    module, shards, _ = TensorParallelRewrite(plan, resolve_sizes(plan, sizes), rank, None)(model)
    return plan, module, shards


def _comm_nodes(module) -> Counter:
    """Collectives the rewrite inserted as graph nodes, plus the ones sharded layers run inside."""
    counts = Counter()
    for node in module.graph.nodes:
        if node.op == "call_module":
            target = module.get_submodule(node.target)
            if node.target.startswith("_whale_tp."):
                counts[node.target.split(".")[1].rsplit("_", 1)[0]] += 1
            elif isinstance(target, RowParallelLinear):
                counts["reduce"] += 1
    return counts


# ---- shard arithmetic -------------------------------------------------------------------------


@given(st.integers(1, 500), st.integers(1, 16))
def test_even_sizes_add_up_and_differ_by_at_most_one(total, parts):
    sizes = even_sizes(total, parts)
    assert sum(sizes) == total and len(sizes) == parts and max(sizes) - min(sizes) <= 1
    assert row_offsets(sizes) == tuple(sum(sizes[:i]) for i in range(parts))


@pytest.mark.parametrize(
    "sizes, needle",
    [
        ([3, 3], "adds up to 6 but 'attn' has 4 heads; give sizes that add up to 4"),
        ([4], "has 1 entries for a tensor-parallel group of 2 ranks"),
        ([4, 0], "every rank needs at least 1 of the 4 heads"),
    ],
)
def test_bad_sizes_are_named(sizes, needle):
    with pytest.raises(ValueError, match="shard_sizes") as info:
        validate_sizes("attn", "heads", 4, sizes, 2)
    assert needle in str(info.value)


def test_sizes_of_wrong_type_and_more_shards_than_atoms():
    with pytest.raises(TypeError, match="list of ints"):
        validate_sizes("attn", "heads", 4, [1.5, 2.5], 2)
    with pytest.raises(ValueError, match="split\\(8\\) at 'attn': 8 shards but only 4 heads"):
        validate_sizes("attn", "heads", 4, None, 8)


def test_view_arithmetic():
    assert view_groups((2, 16, 32), (2, 16, 4, 8)) == [((0,), (0,)), ((1,), (1,)), ((2,), (2, 3))]
    heads = ShardLayout(2, 1, 32, 0, "qkv")
    assert view_move(heads, (2, 16, 32), (2, 16, 4, 8)) == view_move(heads, (2, 16, 32), (2, 16, 4, 8))
    move = view_move(heads, (2, 16, 32), (2, 16, 4, 8))
    assert (move.dim, move.blocks, move.per_block, move.splits_dim) == (2, 1, 4, True)
    # A fused qkv output of 3 blocks viewed as (B, T, 3, heads, head_dim): the heads dim is sharded.
    move = view_move(ShardLayout(2, 3, 32, 0, "qkv"), (2, 16, 96), (2, 16, 3, 4, 8))
    assert (move.dim, move.blocks, move.per_block) == (3, 1, 4)
    # Merging heads back: (B, T, heads, head_dim) -> (B, T, C).
    move = view_move(ShardLayout(2, 1, 4, 0, "qkv"), (2, 16, 4, 8), (2, 16, 32))
    assert (move.dim, move.blocks, move.per_block) == (2, 1, 32)
    # Heads merged into the batch dim: the batch becomes blocks, each holding this rank's heads.
    move = view_move(ShardLayout(1, 1, 4, 0, "qkv"), (2, 4, 16, 8), (8, 16, 8))
    assert (move.dim, move.blocks, move.per_block) == (0, 2, 4)
    # Three blocks of 4 viewed as (2, 6): a block straddles two rows, not shardable.
    assert view_move(ShardLayout(0, 3, 4, 0, "qkv"), (12,), (2, 6)) is None


# ---- decisions --------------------------------------------------------------------------------


def test_transformer_block_is_column_then_row_with_one_reduce_each_way():
    model, data, _ = build("block")
    plan, module, shards = _rewrite(model, data[0][0], sizes={"attn": [3, 1]})
    assert [(r.name, r.kind, r.num_atoms) for r in plan.regions] == [("attn", "heads", 4), ("mlp", "columns", 128)]
    kinds = {d.path: d.kind for d in plan.modules.values()}
    assert kinds == {"attn.qkv": "column", "attn.proj": "row", "mlp.fc": "column", "mlp.proj": "row"}
    # forward: one all-reduce per row layer; backward: one per copy before a column layer
    assert _comm_nodes(module) == Counter({"copy": 2, "reduce": 2})
    qkv = shards["attn.qkv.weight"]
    assert (qkv.dim, qkv.offset, qkv.length, qkv.num_blocks, qkv.rank_lengths) == (0, 0, 24, 3, (24, 8))
    assert module.get_submodule("attn.qkv").weight.shape == (72, 32)  # 3 heads of q, k and v
    assert module.get_submodule("attn.proj").weight.shape == (32, 24)
    assert plan.fallbacks == ()


def test_head_count_and_widths_in_the_graph_are_rewritten_to_the_local_ones():
    model, data, _ = build("gpt-sdpa")
    _, module, _ = _rewrite(model, data[0][0], rank=1, sizes={"blocks.0.attn": [3, 1]})
    node = next(n for n in module.graph.nodes if n.name == "split")
    assert node.args[1] == [8, 8, 8], "split(c) on one head of 8 per q, k, v"
    view = next(n for n in module.graph.nodes if n.name == "view")
    assert view.args[3] == 1, "one local head"
    assert isinstance(view.args[4], torch.fx.Node), "head_dim (c // n_head) stays as traced"
    reshape = next(n for n in module.graph.nodes if n.name == "reshape")
    assert reshape.args[3] == 8, "merged heads: 1 head x 8"


def test_timm_attention_swiglu_and_separate_qkv_are_found_without_names():
    model, data, _ = build("variants")
    plan, module, shards = _rewrite(model, data[0][0])
    regions = {r.name: (r.kind, r.num_atoms, set(r.modules)) for r in plan.regions}
    assert regions["a1"] == ("heads", 4, {"a1.qkv", "a1.proj"})
    assert regions["m1"] == ("columns", 96, {"m1.w1", "m1.w2", "m1.w3"})
    assert regions["a2"] == ("heads", 4, {"a2.q", "a2.k", "a2.v", "a2.o"})
    # qkv reshaped to (B, N, 3, heads, hd) and unbound: its output is 3 blocks, split by heads.
    assert shards["a1.qkv.weight"].num_blocks == 3
    # A lone Linear is column-parallel and gathered where its output leaves the scope.
    assert plan.fallbacks == ("norm (norm): leaves the split scope",)
    assert _comm_nodes(module) == Counter({"copy": 4, "reduce": 3, "gather": 1})


def test_split_classifier_keeps_logits_sharded_and_others_are_gathered():
    x = torch.randn(4, 16)
    plan = _plan(Classifier(), x)
    assert plan.output_layout is not None and plan.region("head").kind == "classes"
    plan = _plan(Classifier(), x, keep_sharded_output=False)
    assert plan.output_layout is None and plan.fallbacks == ("output (<root>): model output",)


def test_losses_recognized_as_cross_entropy():
    ce = VocabParallelCrossEntropy(offset=0, num_classes=1000)
    assert parallel_loss(None, ce, 500, 3) is ce
    assert parallel_loss(F.cross_entropy, ce, 500, 2) is ce
    assert parallel_loss(F.cross_entropy, ce, 500, 3) is None, "class dim 1 of 3-D logits is not the sharded one"
    smooth = parallel_loss(nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=0), ce, 500, 2)
    assert (smooth.label_smoothing, smooth.ignore_index) == (0.1, 0)
    assert parallel_loss(nn.CrossEntropyLoss(weight=torch.ones(1000)), ce, 500, 2) is None
    assert parallel_loss(lm_loss, ce, 500, 3) is not None, "reshapes then F.cross_entropy"

    def z_loss(logits, y):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten()) + logits.logsumexp(-1).pow(2).mean()

    assert parallel_loss(z_loss, ce, 500, 3) is None, "uses the logits beyond cross-entropy"
    assert parallel_loss(F.mse_loss, ce, 500, 2) is None


def test_vocab_parallel_cross_entropy_in_a_group_of_one_is_cross_entropy():
    logits, y = torch.randn(6, 10, requires_grad=True), torch.tensor([1, 2, -100, 9, 0, 3])
    for kw in ({}, {"label_smoothing": 0.2}, {"reduction": "sum"}):
        ce = VocabParallelCrossEntropy(0, 10, **{k: v for k, v in kw.items()})
        got = ce(logits, y)
        ref = F.cross_entropy(logits, y, **kw)
        torch.testing.assert_close(got, ref)
        g, = torch.autograd.grad(got, logits)
        r, = torch.autograd.grad(ref, logits)
        torch.testing.assert_close(g, r)


def test_gpt_everything_split():
    model, data, _ = build("gpt")
    plan, _, shards = _rewrite(model, data[0][0], ranks=4)
    kinds = Counter(d.kind for d in plan.modules.values())
    assert kinds == Counter({"column": 5, "row": 4, "vocab": 1})
    assert plan.region("lm_head").kind == "classes" and plan.output_layout is not None
    assert shards["wte.weight"].rank_lengths == (24, 24, 24, 24)


def test_multihead_attention_and_moe_decisions():
    model = MHAModel()
    wh.annotate(model, {"attn": wh.split()})
    plan = _plan(model, torch.randn(2, 5, 8), ranks=4)
    (decision,) = plan.modules.values()
    assert (decision.kind, decision.need_weights, plan.region("attn").num_atoms) == ("mha", False, 4)
    plan = _plan(MoELM(num_experts=6, top_k=2), torch.randint(128, (2, 8)))
    spec = plan.moe["moe"]
    assert (spec.num_experts, spec.top_k, spec.normalize, spec.router_attr) == (6, 2, True, "router")
    assert plan.region("moe").kind == "experts"


# ---- errors -----------------------------------------------------------------------------------


def test_split_of_a_kind_whale_cannot_shard_lists_what_it_can():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    wh.annotate(model, {"0": wh.split()})
    with pytest.raises(ValueError) as info:
        _plan(model, torch.randn(2, 3, 8, 8))
    msg = str(info.value)
    assert "split() at '0': whale cannot shard Conv2d" in msg
    assert "nn.Linear (column- and row-parallel" in msg and "nn.MultiheadAttention" in msg and "mixture-of-experts" in msg


def test_split_holding_nothing_shardable():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    wh.annotate(model, {"1": wh.split()})
    with pytest.raises(ValueError, match="split\\(\\) at '1' holds nothing whale can shard \\(found \\['LayerNorm'\\]\\)"):
        _plan(model, torch.randn(2, 8))


@pytest.mark.parametrize(
    "make, x, needle",
    [
        (lambda: _annotated(Block(32, 2, 16), {"attn": wh.split()}), torch.randn(2, 16, 32), "split(4) at 'attn': 4 shards but only 2 heads"),
        (lambda: MoELM(num_experts=3), torch.randint(128, (2, 8)), "split(4) at 'moe': 4 shards but only 3 experts"),
        (lambda: _annotated(MHAModel(n_head=2), {"attn": wh.split()}), torch.randn(2, 5, 8), "4 shards but only 2 heads"),
    ],
    ids=["attention-heads", "experts", "mha-heads"],
)
def test_more_shards_than_the_sharded_dim(make, x, needle):
    with pytest.raises(ValueError) as info:
        _plan(make(), x, ranks=4)
    assert needle in str(info.value)


def _annotated(model, names):
    wh.annotate(model, names)
    return model


def test_shard_sizes_for_unknown_or_duplicate_regions():
    model, data, _ = build("block")
    plan = _plan(model, data[0][0])
    with pytest.raises(ValueError, match="not sharded regions; the regions are \\['attn', 'mlp'\\]"):
        resolve_sizes(plan, {"ln_1": [1, 1]})
    with pytest.raises(ValueError, match="names region 'attn' twice"):
        resolve_sizes(plan, {"attn": [2, 2], "attn.qkv": [2, 2]})
    assert resolve_sizes(plan, {"attn.proj": [1, 3]})[plan.region("attn").id] == (1, 3)


def test_split_nested_in_split_is_refused_naming_the_module():
    model = TinyGPT()
    with pytest.raises(ValueError, match="nested inside"):
        wh.annotate(model, {"h": wh.split(), "h.0.mlp": wh.split()})
    # The pass checks on its own too, whatever produced the graph.
    model = TinyGPT()
    outer, inner = wh.split(), wh.split()
    wh.annotate(model, {"h.0.mlp": inner})
    captured = capture(model, (torch.randint(64, (2, 16)),))
    for node in captured.graph_module.graph.nodes:
        info = node.meta[NODE_INFO_KEY]
        if inner in info.annotations:
            node.meta[NODE_INFO_KEY] = dataclasses.replace(info, annotations=(outer, inner))
    with pytest.raises(ValueError, match="is nested inside .* at 'h.0.mlp.*a split cannot contain another split"):
        TensorParallelAnalysis(2)(model, captured)


def test_device_count_must_match_the_group():
    model = _annotated(Block(32, 4, 16), {"mlp": wh.split(4)})
    with pytest.raises(ValueError, match="split\\(device_count=4\\) at 'mlp.fc' asks for 4 devices but the tensor-parallel group has 2"):
        _plan(model, torch.randn(2, 16, 32))


def test_tied_weight_of_a_sharded_layer_is_refused():
    model = TinyGPT()
    model.lm_head.weight = model.wte.weight
    wh.annotate(model, {"lm_head": wh.split()})
    with pytest.raises(ValueError, match="lm_head.weight is sharded by split\\(\\) but also used by 'wte'"):
        shard_model(model, capture(model, (torch.randint(64, (2, 16)),)), group=None, rank_in_group=0)


def test_moe_with_other_routing_is_refused():
    class SigmoidMoE(MoE):
        def forward(self, x):
            gates = torch.sigmoid(self.router(x))
            out = 0
            for i, expert in enumerate(self.experts):
                out = out + gates[..., i : i + 1] * expert(x)
            return out

    model = nn.Sequential(nn.Linear(8, 16), SigmoidMoE(16, 32, 4))
    wh.annotate(model, {"1": wh.split()})
    with pytest.raises(ValueError, match="split\\(\\) at '1': SigmoidMoE looks like a mixture of experts"):
        _plan(model, torch.randn(2, 5, 8))


def test_sharded_layers_hold_slices_of_the_local_weights():
    model, data, _ = build("block")
    _, module, _ = _rewrite(model, data[0][0], rank=1, sizes={"mlp": [100, 28]})
    fc = module.get_submodule("mlp.fc")
    assert isinstance(fc, ColumnParallelLinear)
    assert torch.equal(fc.weight, model.mlp.fc.weight[100:])
    assert torch.equal(module.get_submodule("mlp.proj").weight, model.mlp.proj.weight[:, 100:])
    assert fc.weight.data_ptr() != model.mlp.fc.weight.data_ptr(), "a copy: the full weight can be freed"


@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.integers(1, 3), st.integers(0, 1))
def test_every_ranks_shard_put_together_is_the_whole_tensor(sizes, blocks, dim):
    """shard_tensor per rank, reassembled block by block in rank order, gives the full tensor back."""
    width = sum(sizes)
    full = torch.arange(blocks * width * 3).reshape((blocks * width, 3) if dim == 0 else (3, blocks * width))
    starts = row_offsets(sizes)
    pieces = [
        shard_tensor(full, ShardSpec("w", dim, starts[r], sizes[r], tuple(full.shape), blocks, tuple(sizes)))
        for r in range(len(sizes))
    ]
    rebuilt = torch.cat(
        [p.narrow(dim, b * sizes[r], sizes[r]) for b in range(blocks) for r, p in enumerate(pieces)], dim=dim
    )
    assert torch.equal(rebuilt, full)
