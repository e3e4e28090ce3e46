"""Capture memoised by node signature (whale/capture/node_memo.py) measures exactly what a node by
node run measures.

Every comparison is exact (no tolerance): shapes, strides, dtypes, FLOPs and byte counts are
integers computed from the same metadata, so memoisation may not change a single one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from examples.gpt import GPT, GPTConfig
from tests import hf_models
from whale.capture import CaptureError, capture, costs, node_memo


def _captured(monkeypatch, memoise: bool, model, inputs, **kwargs):
    """capture() with the memo on or off, and the memos it used (their hit counts)."""
    memos = []

    class Recording(node_memo.NodeMemo):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            memos.append(self)

    monkeypatch.setattr(costs, "NodeMemo", Recording)
    monkeypatch.setattr(costs, "MEMOISE", memoise)
    return capture(model, inputs, **kwargs), memos


def _measured(captured) -> list:
    """Everything capture measured per node, and the fake value's metadata."""
    rows = []
    for node, info in zip(captured.graph_module.graph.nodes, captured.nodes, strict=True):
        leaves = [v for v in torch.utils._pytree.tree_leaves(node.meta.get("val")) if isinstance(v, torch.Tensor)]
        meta = [(tuple(v.shape), v.stride(), v.dtype, v.requires_grad) for v in leaves]
        rows.append((info, meta))
    return rows


def _same_with_and_without_memo(monkeypatch, model, inputs, **kwargs) -> int:
    """Captures both ways, asserts identical measurements, returns the memo's hits."""
    on, memos = _captured(monkeypatch, True, model, inputs, **kwargs)
    off, unused = _captured(monkeypatch, False, model, inputs, **kwargs)
    assert not unused
    assert _measured(on) == _measured(off)
    return sum(m.hits for m in memos)


def test_gpt_blocks_are_measured_once_and_identically(monkeypatch):
    cfg = GPTConfig(vocab_size=96, block_size=16, n_layer=4, n_head=2, n_embd=32)
    torch.manual_seed(0)
    hits = _same_with_and_without_memo(monkeypatch, GPT(cfg), (torch.randint(0, 96, (2, 16)),))
    assert hits > 3 * 10  # blocks 2-4 come from the memo (~30 nodes each)


def test_gpt_on_meta(monkeypatch):
    cfg = GPTConfig(vocab_size=96, block_size=16, n_layer=3, n_head=2, n_embd=32)
    with torch.device("meta"):
        model = GPT(cfg)
    hits = _same_with_and_without_memo(monkeypatch, model, (torch.zeros(2, 16, dtype=torch.long, device="meta"),))
    assert hits > 0


@pytest.mark.parametrize(
    ("build", "batch_dim"),
    [(hf_models.gpt2, 0), (hf_models.gpt2, None), (hf_models.llama, None)],
    ids=["gpt2-dynamic-batch", "gpt2-static", "llama-static"],
)
def test_transformers_exports_are_identical(monkeypatch, build, batch_dim):
    case = build(rows=2)
    hits = _same_with_and_without_memo(monkeypatch, case.model, case.inputs, batch_dim=batch_dim)
    if batch_dim is None:
        assert hits > 0  # static shapes: the second layer's aten ops come from the memo


class _Twins(nn.Module):
    """Pairs of leaf modules of one class fed the same input: whatever differs must not be shared."""

    def __init__(self) -> None:
        super().__init__()
        self.narrow, self.wide = nn.Linear(8, 4), nn.Linear(8, 16)
        self.no_bias = nn.Linear(8, 4, bias=False)
        self.drop_a, self.drop_b = nn.Dropout(0.1), nn.Dropout(0.5)
        self.hooked, self.plain = nn.Linear(8, 4), nn.Linear(8, 4)
        # A forward hook can change what a module returns; a hooked module is never memoised.
        self.hooked.register_forward_hook(lambda module, args, out: out[..., :2])
        self.f32, self.f64 = nn.Linear(8, 4), nn.Linear(8, 4).double()

    def forward(self, x):
        a, b, c = self.narrow(x), self.wide(x), self.no_bias(x)
        d, e = self.drop_a(x), self.drop_b(x)
        f, g = self.hooked(x), self.plain(x)
        h, i = self.f32(x), self.f64(x.double())
        return a, b, c, d, e, f, g, h, i


def test_a_memo_never_crosses_modules_whose_attributes_or_state_differ(monkeypatch):
    model = _Twins()
    captured, memos = _captured(monkeypatch, True, model, (torch.randn(3, 8),), frontend="fx")
    shapes = {n.target: n.shapes for n in captured.nodes if n.op == "call_module"}
    assert shapes["narrow"] == shapes["plain"] == ((3, 4),) and shapes["wide"] == ((3, 16),)
    assert shapes["hooked"] == ((3, 2),)
    dtypes = {n.target: n.dtypes for n in captured.nodes if n.op == "call_module"}
    assert dtypes["f64"] == ("float64",) and dtypes["f32"] == ("float32",)
    by_target = {n.target: n for n in captured.nodes}
    assert by_target["no_bias"].param_bytes < by_target["narrow"].param_bytes
    # Only the plain Linear(8, 4) twins of `narrow` share a signature: plain and f32.
    assert sum(m.hits for m in memos) == 2
    assert _measured(captured) == _measured(_captured(monkeypatch, False, model, (torch.randn(3, 8),), frontend="fx")[0])


def test_module_keys_tell_hyper_parameters_apart():
    key = node_memo._module_key
    assert key(nn.Linear(8, 4)) == key(nn.Linear(8, 4))
    assert key(nn.Linear(8, 4)) != key(nn.Linear(8, 16))
    assert key(nn.Dropout(0.1)) != key(nn.Dropout(0.5))
    assert key(nn.LayerNorm(8)) != key(nn.LayerNorm(8, eps=1e-6))
    assert key(nn.GELU()) != key(nn.GELU(approximate="tanh"))
    assert key(nn.Linear(8, 4).train()) != key(nn.Linear(8, 4).eval())

    class MyLinear(nn.Linear):  # a user's class: its forward may do anything
        pass

    assert key(MyLinear(8, 4)) is None
    holding = nn.Linear(8, 4)
    holding.table = torch.zeros(3)  # a tensor attribute the memo cannot key
    assert key(holding) is None
    assert key(nn.Sequential(nn.Linear(8, 4))) is None  # submodules: not a leaf


class _InPlace(nn.Module):
    """Memoised results that later nodes change in place, take views of and detach."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            y = block(x)
            y.relu_()  # legal on an op's result (not on a leaf that requires grad)
            z = y.t().detach()
            x = y.view(2, -1).reshape(-1, 8) + z.t()
        return x


def test_in_place_views_and_detach_after_memoised_nodes(monkeypatch):
    hits = _same_with_and_without_memo(monkeypatch, _InPlace(), (torch.randn(4, 8),), frontend="fx")
    assert hits > 0


class _SplitInPlace(nn.Module):
    """In place on one of several views a split returns: autograd refuses it, fx capture fails."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            a, b = block(x).split(4, dim=1)  # the second split has the first one's signature
            if i == 1:
                a.mul_(2)
            x = torch.cat([a, b], dim=1)
        return x


@pytest.mark.parametrize("memoise", [True, False])
def test_what_autograd_refuses_is_refused_with_the_memo_too(monkeypatch, memoise):
    # The second block's split comes from the memo; its views must still refuse the mul_.
    with pytest.raises(CaptureError, match="fx: RuntimeError: Output 0 of Split is a view"):
        _captured(monkeypatch, memoise, _SplitInPlace(), (torch.randn(4, 8),), frontend="fx")


class _GradientPenalty(nn.Module):
    """A forward that differentiates its own blocks: every node must hang off the real graph."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            y = block(x)
            (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
            x = y + g
        return x


def test_a_forward_that_differentiates_is_measured_node_by_node(monkeypatch):
    x = torch.randn(4, 8, requires_grad=True)
    assert _same_with_and_without_memo(monkeypatch, _GradientPenalty(), (x,), frontend="fx") == 0
