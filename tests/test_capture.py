"""whale.capture: graphs, per-node annotations from all three places, shapes and costs.

FLOP expectations are analytic: a matmul of (m, k) by (k, n) is 2*m*k*n FLOPs (one multiply and
one add per term), which is what ``torch.utils.flop_counter`` counts; elementwise ops count 0.
"""

from __future__ import annotations

import copy
import dataclasses
import resource
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._pytree import tree_leaves

import whale as wh
from tests.models import AnnotatedGPT, MHAModel, ResNetLike, RoutedLM, ScopedMLP, SmallCNN, TinyGPT
from whale.capture import CaptureError, CapturedModel, NodeInfo, capture, module_annotation_map
from whale.capture.frontends import normalize_module_path

FRONTENDS = ("fx", "export")
F32 = 4  # bytes per float32


def gpt_forward_flops(B, T, n_layer, n_embd, vocab):
    """nanoGPT forward FLOPs: 4 Linear blocks per layer, two attention matmuls, the lm head."""
    C = n_embd
    per_layer = 2 * B * T * (C * 3 * C + C * C + 2 * C * 4 * C) + 2 * 2 * B * T * T * C
    return n_layer * per_layer + 2 * B * T * C * vocab


def nodes_in(captured: CapturedModel, path: str) -> tuple[NodeInfo, ...]:
    nodes = captured.by_module(path)
    assert nodes, f"no node under {path!r}; paths are {sorted({n.module_path for n in captured.nodes})}"
    return nodes


# ---------------------------------------------------------------------------------------- costs


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_linear_node_costs_are_exact(frontend):
    B, d_in, d_out = 3, 5, 7
    c = capture(nn.Sequential(nn.Linear(d_in, d_out)), torch.randn(B, d_in), frontend=frontend)
    (lin,) = [n for n in c.nodes if n.flops]
    assert lin.flops == 2 * B * d_in * d_out
    assert lin.shapes == ((B, d_out),) and lin.dtypes == ("float32",)
    assert lin.output_bytes == B * d_out * F32
    weights = (d_in * d_out + d_out) * F32
    # Reads input and weights, writes the output.
    assert lin.bytes_accessed == B * d_in * F32 + weights + B * d_out * F32
    assert c.total_param_bytes == weights
    assert sum(n.param_bytes for n in c.nodes) == weights
    if frontend == "fx":
        assert (lin.op, lin.target, lin.module_path, lin.param_bytes) == ("call_module", "0", "0", weights)
        assert lin.param_names == ("0.weight", "0.bias")
    else:
        assert (lin.op, lin.target, lin.module_path) == ("call_function", "aten.linear.default", "0")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    widths=st.lists(st.integers(1, 24), min_size=2, max_size=5),
    batch=st.integers(1, 6),
    bias=st.booleans(),
)
def test_linear_stack_flops_sum_to_analytic(widths, batch, bias):
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
    c = capture(nn.Sequential(*layers), torch.randn(batch, widths[0]), frontend="fx")
    assert c.total_flops == sum(2 * batch * a * b for a, b in zip(widths, widths[1:]))
    params = sum((a * b + (b if bias else 0)) * F32 for a, b in zip(widths, widths[1:]))
    assert c.total_param_bytes == params
    assert c.nodes[-1].shapes == ((batch, widths[-1]),)


def test_tinygpt_flops_match_analytic_and_agree_across_frontends():
    model, idx = TinyGPT(), torch.randint(0, 64, (2, 16))
    expected = gpt_forward_flops(2, 16, n_layer=2, n_embd=32, vocab=64)
    fx, ex = capture(model, idx, frontend="fx"), capture(model, idx, frontend="export")
    assert fx.total_flops == ex.total_flops == expected
    n_params = sum(p.numel() for p in model.parameters())
    assert fx.total_param_bytes == ex.total_param_bytes == n_params * F32
    assert fx.nodes[-1].shapes == ex.nodes[-1].shapes == ((2, 16, 64),)
    # Per-layer cost is identical for identical layers, on both front ends.
    for c in (fx, ex):
        assert sum(n.flops for n in c.by_module("h.0")) == sum(n.flops for n in c.by_module("h.1")) > 0


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_capture_on_meta_device_allocates_nothing(frontend):
    cfg = dict(vocab=50304, block_size=256, n_layer=8, n_head=32, n_embd=4096)
    with torch.device("meta"):
        model = TinyGPT(**cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params * F32 > 7e9  # a real allocation of this model would be obvious
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    c = capture(model, torch.randint(0, 50304, (2, 256)), frontend=frontend)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 1024 * 1024, f"peak RSS grew by {grown} KiB"
    assert c.total_param_bytes == n_params * F32
    assert c.total_flops == gpt_forward_flops(2, 256, 8, 4096, 50304)
    assert all(p.is_meta for p in model.parameters())
    assert c.nodes[-1].shapes == ((2, 256, 50304),)


class ViewsAndInPlace(nn.Module):
    def forward(self, x):
        y = x.view(4, 2)  # a view: no bytes move, no memory is new
        z = y * 2  # reads 8 floats, writes 8 fresh floats
        z.relu_()  # in place: reads and writes 8 floats, nothing new
        return z


def test_views_are_free_and_in_place_writes_count_once():
    c = capture(ViewsAndInPlace(), torch.randn(8), frontend="fx")
    view, mul, relu_ = (c.node(n) for n in ("view", "mul", "relu_"))
    assert (view.bytes_accessed, view.output_bytes) == (0, 0)
    assert (mul.bytes_accessed, mul.output_bytes) == (2 * 8 * F32, 8 * F32)
    assert (relu_.bytes_accessed, relu_.output_bytes) == (2 * 8 * F32, 0)


# ---------------------------------------------------------------------------------- annotations


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_annotations_from_init_land_on_their_nodes(frontend):
    model = AnnotatedGPT()
    c = capture(model, torch.randint(0, 64, (2, 16)), frontend=frontend)
    for path in ("h.0", "h.1", "h.0.attn.qkv", "h.1.mlp"):
        assert all(n.annotations == (model.blocks_scope,) for n in nodes_in(c, path))
    assert all(n.annotations == (model.head_scope,) for n in nodes_in(c, "lm_head"))
    assert all(n.annotations == () for n in nodes_in(c, "wte") + nodes_in(c, "ln_f"))
    assert c.annotations_used() == (model.blocks_scope, model.head_scope)
    flops = [n for n in nodes_in(c, "lm_head") if n.flops]
    assert [n.flops for n in flops] == [2 * 2 * 16 * 32 * 64]


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_annotations_from_forward_scopes_land_on_their_nodes(frontend):
    model = ScopedMLP()
    c = capture(model, torch.randn(2, 16), frontend=frontend)
    inner = (model.inner_scope,)
    # On export the weights are get_attr nodes: they take the scope of the code that uses them.
    assert all(n.annotations == inner for n in nodes_in(c, "fc1") + nodes_in(c, "fc2"))
    assert all(n.annotations == () for n in nodes_in(c, "inp") + nodes_in(c, "out"))
    # The relu between fc1 and fc2 is root code inside the scope; the one after inp is not.
    root_relus = [n for n in c.nodes if n.module_path == "" and "relu" in n.target]
    assert [n.annotations for n in root_relus] == [(), inner]


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_annotations_by_name_land_on_their_nodes(frontend):
    model = TinyGPT()
    s0, s1 = wh.stage(), wh.stage()
    wh.annotate(model, {"h.0": s0, "h.1": s1})
    c = capture(model, torch.randint(0, 64, (2, 16)), frontend=frontend)
    assert {n.annotations for n in nodes_in(c, "h.0")} == {(s0,)}
    assert {n.annotations for n in nodes_in(c, "h.1")} == {(s1,)}
    assert all(n.annotations == () for n in nodes_in(c, "lm_head"))


class Body(nn.Module):
    def __init__(self, scope):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scope = scope

    def forward(self, x):
        with self.scope:
            return self.fc(x) * 2


class Outer(nn.Module):
    def __init__(self, scope):
        super().__init__()
        self.body = Body(scope)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_nesting_across_module_path_and_forward_scope_is_outer_to_inner(frontend):
    pipe, st_, sp = wh.pipeline(2), wh.stage(), wh.split(2)
    model = wh.annotate(Outer(sp), {"": pipe, "body": st_})
    c = capture(model, torch.randn(3, 4), frontend=frontend)
    compute = [n for n in nodes_in(c, "body") if n.flops or "mul" in n.target]
    assert len(compute) == 2 and all(n.annotations == (pipe, st_, sp) for n in compute)
    assert all(n.annotations == (pipe,) for n in nodes_in(c, "head"))
    assert module_annotation_map(model)["body.fc"] == (pipe, st_)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_split_inside_split_across_path_and_scope_names_the_module(frontend):
    model = wh.annotate(Outer(wh.split(2)), {"body": wh.split(4)})
    nested = r"split\(device_count=2\) is nested inside split\(device_count=4\) at 'body"
    with pytest.raises(ValueError, match=nested):
        capture(model, torch.randn(3, 4), frontend=frontend)


class DoubleSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        with wh.split():
            with wh.split():
                return self.fc(x)


def test_split_inside_split_in_forward_is_reported_with_its_line():
    with pytest.raises(ValueError, match=r"(?s)cannot contain another split.*test_capture.py:\d+ in forward"):
        capture(DoubleSplit(), torch.randn(2, 4))


def test_capture_inside_a_scope_is_refused_and_tags_nothing():
    model = ScopedMLP()
    with pytest.raises(ValueError, match=r"inside `with replicate\(\):`.*outside any whale scope"):
        with wh.replicate():
            capture(model, torch.randn(2, 16), frontend="fx")
    assert all(module_annotation_map(model)[name] == () for name in ("", "inp", "fc1"))


class SharedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.only_inside = nn.Parameter(torch.randn(4, 4))
        self.scope = wh.split(2)

    def forward(self, x):
        y = x @ self.w
        with self.scope:
            return (y @ self.w) @ self.only_inside


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_state_takes_the_scopes_shared_by_all_its_uses(frontend):
    model = SharedWeight()
    c = capture(model, torch.randn(2, 4), frontend=frontend)
    assert c.node("w").annotations == ()  # used inside and outside the split
    assert c.node("only_inside").annotations == (model.scope,)
    assert c.node("w").param_bytes == c.node("only_inside").param_bytes == 16 * F32
    assert [n.annotations for n in c.nodes if n.flops] == [(), (model.scope,), (model.scope,)]


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.fc(x))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_a_module_called_twice_owns_both_calls_and_its_weights_count_once(frontend):
    c = capture(Twice(), torch.randn(3, 4), frontend=frontend)
    calls = [n for n in c.nodes if n.flops]
    assert [(n.module_path, n.flops) for n in calls] == [("fc", 2 * 3 * 16)] * 2
    assert c.total_param_bytes == (16 + 4) * F32


def test_module_annotation_map_merges_root_to_module():
    model = AnnotatedGPT()
    root = wh.cluster("node")
    wh.annotate(model, {"": root})
    amap = module_annotation_map(model)
    assert set(amap) == {name for name, _ in model.named_modules()}
    assert amap[""] == (root,)
    assert amap["h.0.attn.qkv"] == (root, model.blocks_scope)
    assert amap["lm_head"] == (root, model.head_scope)
    assert amap["wte"] == (root,)


# ------------------------------------------------------------------------------------ the graph


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_graph_module_computes_the_model_and_capture_leaves_state_untouched(frontend):
    torch.manual_seed(0)
    model, x = ResNetLike(), torch.randn(2, 3, 16, 16)
    reference = copy.deepcopy(model)
    c = capture(model, x, frontend=frontend)
    for name, t in [*model.state_dict().items()]:
        assert torch.equal(t, reference.state_dict()[name]), f"capture changed {name}"
    # Training mode: BatchNorm normalises by batch statistics, so both sides compute the same.
    torch.testing.assert_close(c.graph_module(x), reference(x), rtol=0, atol=0)
    assert all(n.meta.get("whale_node_info") is not None for n in c.graph_module.graph.nodes)


def test_resnet_costs_and_paths_agree_across_frontends():
    model, x = ResNetLike(), torch.randn(2, 3, 16, 16)
    fx, ex = capture(model, x, frontend="fx"), capture(model, x, frontend="export")
    assert fx.total_flops == ex.total_flops
    conv1 = fx.node("conv1")
    assert conv1.flops == 2 * 2 * 8 * 16 * 16 * 3 * 3 * 3  # 2 * B * C_out * H * W * C_in * k * k
    down = fx.node("layer2_0_downsample_0")
    assert (down.op, down.module_path) == ("call_module", "layer2.0.downsample.0")
    assert down.flops == 2 * 2 * 16 * 4 * 4 * 8  # 1x1 stride-2 conv on 8x8 -> 4x4
    assert {n.module_path for n in ex.nodes} >= {"layer2.0.downsample.0", "layer2.0.downsample.1"}
    bn = fx.node("bn1")
    assert bn.buffer_bytes == (8 + 8) * F32 + 8  # running mean and var, num_batches_tracked (int64)
    state = sum(p.numel() for p in model.parameters()) * F32
    assert fx.total_param_bytes == ex.total_param_bytes == state


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_multihead_attention_costs(frontend):
    B, T, d = 2, 5, 32
    model = MHAModel(d_in=8, d_model=d, n_head=4, d_out=8)
    c = capture(model, torch.randn(B, T, 8), frontend=frontend)
    attn_flops = 2 * B * T * d * 3 * d + 2 * 2 * B * T * T * d + 2 * B * T * d * d
    if frontend == "fx":
        attn = c.node("attn")
        assert (attn.op, attn.target) == ("call_module", "attn")
        assert attn.flops == attn_flops
        assert attn.param_bytes == (4 * d * d + 4 * d) * F32  # in_proj (3d x d) + out_proj (d x d)
    assert sum(n.flops for n in c.by_module("attn")) == attn_flops
    assert c.total_flops == attn_flops + 2 * B * T * 8 * d + 2 * B * T * d * 8


def test_small_cnn_agrees_across_frontends():
    model, x = SmallCNN(num_classes=10), torch.randn(2, 3, 16, 16)
    fx, ex = capture(model, x, frontend="fx"), capture(model, x, frontend="export")
    conv = 2 * 2 * 8 * 16 * 16 * 3 * 9 + 2 * 2 * 16 * 8 * 8 * 8 * 9
    assert fx.total_flops == ex.total_flops == conv + 2 * 2 * 16 * 10
    assert fx.nodes[-1].shapes == ex.nodes[-1].shapes == ((2, 10),)
    assert [n.target for n in fx.nodes if n.op == "call_module"][:2] == ["features.0", "features.1"]


class OptionalScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, scale=None):
        y = self.fc(x)
        if scale is not None:
            y = y * scale
        return y


def test_fx_specialises_non_tensor_arguments_and_accepts_kwargs():
    without = capture(OptionalScale(), torch.randn(2, 4), frontend="fx")
    assert not [n for n in without.nodes if n.target == "_operator.mul"]
    with_kw = capture(
        OptionalScale(), (torch.randn(2, 4),), frontend="fx", example_kwargs={"scale": torch.randn(4)}
    )
    (mul,) = [n for n in with_kw.nodes if n.target == "_operator.mul"]
    assert mul.shapes == ((2, 4),)


def test_captured_model_helpers():
    model = AnnotatedGPT()
    c = capture(model, torch.randint(0, 64, (2, 16)), frontend="fx")
    assert c.frontend == "fx"
    assert c.nodes[0].op == "placeholder" and c.nodes[-1].op == "output"
    assert set(c.by_module("h")) == set(c.by_module("h.0")) | set(c.by_module("h.1"))
    assert c.by_module("") == c.nodes
    assert not c.by_module("h.0.att")  # a prefix of a name is not a module
    text = c.summary(depth=1)
    assert "captured with fx" in text and "replicate()" in text and "split(device_count=2)" in text
    rows = [line.split()[0] for line in text.splitlines()[2:]]
    assert rows == ["(root)", "wte", "wpe", "h", "ln_f", "lm_head"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.nodes[0].flops = 1
    with pytest.raises(KeyError, match="no node named"):
        c.node("nope")


def test_capture_rejects_bad_arguments():
    with pytest.raises(ValueError, match="use 'auto', 'fx' or 'export'"):
        capture(nn.Linear(2, 2), torch.randn(1, 2), frontend="jit")
    with pytest.raises(TypeError, match="example_inputs is a tensor, a tuple .* or a dict"):
        capture(nn.Linear(2, 2), 3)
    with pytest.raises(ValueError, match=r"keyword input 'x' is not a parameter of Linear.forward\(input\)"):
        capture(nn.Linear(2, 2), {"x": torch.randn(1, 2)})
    with pytest.raises(ValueError, match=r"do not fit OptionalScale.forward\(x, scale=None\)"):
        capture(OptionalScale(), (torch.randn(1, 4), None, 3))


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("transformer.h.0.attn", "transformer.h.0.attn"),
        ("L['self'].transformer.h[0].attn", "transformer.h.0.attn"),
        ("L['self']._modules['transformer']._modules['h']._modules['0']", "transformer.h.0"),
        ("getattr(L['self'].transformer.h, '0').attn", "transformer.h.0.attn"),
        ("L__self___transformer_h_0_attn", "transformer.h.0.attn"),
        ("L['self']", ""),
    ],
)
def test_normalize_module_path(raw, expected):
    known = {"", "transformer", "transformer.h", "transformer.h.0", "transformer.h.0.attn"}
    assert normalize_module_path(raw, known) == expected


# ------------------------------------------------------------------------------ untraceable code


class DataDependent(nn.Module):
    """Data-dependent Python control flow in the root's own forward: neither front end can
    trace it, and no submodule holds it (a submodule's would be captured as an opaque call)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        if h.sum().item() > 0:  # data-dependent Python control flow: neither front end can trace it
            h = h * 2
        return self.out(h)


def test_untraceable_forward_raises_capture_error_naming_the_line():
    line = DataDependent.forward.__code__.co_firstlineno + 2
    with pytest.raises(CaptureError) as info:
        capture(DataDependent(), torch.randn(2, 4))
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "fx: TraceError" in msg and "export: " in msg
    assert msg.count(f"test_capture.py:{line} in forward") == 2  # both front ends point at it
    assert "in the root module" in msg and "h.sum().item() > 0" in msg
    assert "data parallel" in msg
    assert [f.frontend for f in info.value.failures] == ["fx", "export"]


def test_a_module_export_cannot_trace_is_captured_as_one_opaque_call(capsys):
    """RoutedLM's experts loop over the experts some row went to: export stops there, so each
    RoutedExperts call becomes one node that runs the module's own forward. The graph still
    takes any number of rows and gives the model's output and gradients; the node costs the
    FLOPs the module ran on the example."""
    torch.manual_seed(0)
    model = RoutedLM()
    ids = torch.randint(0, 32, (4, 6))
    expected = r"(?s)could not trace every module of RoutedLM:\n  RoutedExperts: .*in module 'blocks.0.moe'"
    with pytest.warns(UserWarning, match=expected) as caught:
        c = capture(model, ids)
    assert "'blocks.0.moe', 'blocks.1.moe', 'blocks.2.moe' as one opaque node" in str(caught[0].message)
    assert "def forward" not in capsys.readouterr().err  # torch's dump of each failed export's partial graph
    assert c.frontend == "export" and c.fixed_rows is None
    opaque = [n for n in c.nodes if "opaque" in str(n.target)]
    assert [n.module_path for n in opaque] == ["blocks.0.moe", "blocks.1.moe", "blocks.2.moe"]
    rows, width, experts = 4 * 6, 16, 4
    # The router on every row, one expert on every row (the rest is elementwise).
    assert [n.flops for n in opaque] == [2 * rows * width * experts + 2 * rows * width * width] * 3
    # Its memory: what autograd saved inside it on the example, more than its output alone.
    assert all(n.output_bytes > rows * width * 4 for n in opaque), [n.output_bytes for n in opaque]
    assert {n.module_path for n in c.nodes} >= {"blocks.0.fc", "embed", "head"}

    gm = c.graph_module
    ids3 = torch.randint(0, 32, (3, 6))
    got = c.unflatten_output(tree_leaves(gm(*c.flatten_inputs((ids3,), {}))))
    want = model(ids3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.square().mean().backward()  # the graph reads the model's own parameters
    through_graph = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    want.square().mean().backward()
    assert any(g is None for g in through_graph.values())  # experts no row was routed to
    for name, p in model.named_parameters():
        if p.grad is None:
            assert through_graph[name] is None, name
        else:
            torch.testing.assert_close(through_graph[name], p.grad, rtol=0, atol=0, msg=name)


class _RoundThrough(torch.autograd.Function):
    """A straight-through estimator: forward rounds, backward passes the gradient unchanged. A
    traced graph would keep the round and give its gradient (zero)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Quantized(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return _RoundThrough.apply(self.fc(x) * 4)


class _Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):  # the reentrant checkpoint runs fc under no_grad, again in backward
        return torch.utils.checkpoint.checkpoint(self.fc, x, use_reentrant=True)


@pytest.mark.parametrize("inner", [_Quantized, _Checkpointed])
def test_a_custom_autograd_function_makes_its_caller_one_opaque_call(inner):
    """The trace would keep a Function's forward and lose its backward; the module that applies
    it runs as itself instead, so the graph's gradients are the model's, at another batch too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), inner(), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match=rf"(?s){inner.__name__}: CustomFunctionCall: forward applies the custom "
                                         r"autograd.Function .*in module '1'"):  # fmt: skip
        c = capture(model, torch.randn(8, 4))
    assert [n.module_path for n in c.nodes if "opaque" in str(n.target)] == ["1"] and c.fixed_rows is None
    x = torch.randn(3, 4)
    got = c.unflatten_output(tree_leaves(c.graph_module(*c.flatten_inputs((x,), {}))))
    got.square().mean().backward()
    through_graph = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    assert through_graph["0.weight"].abs().sum() > 0  # through the Function's own backward
    for name, p in model.named_parameters():
        torch.testing.assert_close(through_graph[name], p.grad, rtol=0, atol=0, msg=name)


class _Swish(torch.autograd.Function):
    """x * sigmoid(x) with its derivative written out: the same gradients as its forward's."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * (s + x * s * (1 - s))


class _Swished(nn.Module):
    def forward(self, x):
        return _Swish.apply(x)


def test_a_custom_autograd_function_whose_backward_is_its_forwards_gradient_stays_in_the_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), _Swished(), nn.Linear(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no opaque call, no warning
        c = capture(model, torch.randn(8, 4))
    assert not [n for n in c.nodes if "opaque" in str(n.target)]
    assert "aten.sigmoid.default" in {n.target for n in c.nodes}
    assert all(p.grad is None for p in model.parameters())  # the comparison left no gradient behind


def test_a_custom_autograd_function_in_the_roots_own_forward_is_a_capture_error():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return _RoundThrough.apply(self.fc(x))

    with pytest.raises(CaptureError) as info:
        capture(Root(), torch.randn(2, 4))
    msg = str(info.value)
    assert "export: CustomFunctionCall: forward applies the custom autograd.Function" in msg and "_RoundThrough" in msg
    assert "in the root module" in msg and "Fix: apply the autograd.Function inside a submodule's forward" in msg


class _Tokens(nn.Module):
    """Flattens rows x tokens: on 8 rows of 8 tokens, 64, the width too."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, h):
        flat = self.fc(h.reshape(-1, h.shape[-1]))
        if flat.sum().item() > -1e9:  # untraceable: an opaque call
            flat = flat * 2
        return flat


class _TokensBack(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = _Tokens()
        self.out = nn.Linear(64, 2)

    def forward(self, h):
        return self.out(self.tokens(h).reshape(h.shape))  # rows x tokens back into rows, tokens


def test_an_opaque_output_dimension_follows_the_batch_only_where_it_moved_with_the_rows():
    """Recorded at the example's rows and at half of them: the output's first dimension (rows x
    8 tokens) moved with the rows, its second (the width, 64 as well) did not. Taken for the
    width, the first would fix the batch at 8 rows (its reshape back says 8 x rows = 64)."""
    model = _TokensBack()
    with pytest.warns(UserWarning, match="could not trace every module"):
        c = capture(model, torch.randn(8, 8, 64))
    assert c.fixed_rows is None
    x = torch.randn(3, 8, 64)
    got = c.unflatten_output(tree_leaves(c.graph_module(*c.flatten_inputs((x,), {}))))
    torch.testing.assert_close(got, model(x), rtol=0, atol=0)


class _FailsEagerly(nn.Module):
    def forward(self, h):
        if h.sum().item() > -1e9:  # untraceable, and it raises when run
            raise RuntimeError("this module cannot run on the example")
        return h


def test_a_module_that_cannot_run_eagerly_either_leaves_the_capture_error_and_no_mode_on():
    """The opaque call is recorded by running the model; where the module raises there, capture
    reports export's own failure, and the counting modes it entered for the call are left."""
    model = nn.Sequential(nn.Linear(4, 4), _FailsEagerly())
    with pytest.raises(CaptureError, match=r"in module '1'"):
        capture(model, torch.randn(2, 4))
    assert torch._C._len_torch_dispatch_stack() == 0
    assert torch.ones(2).sum().item() == 2.0


def test_a_stage_boundary_inside_an_opaque_call_is_refused_naming_it(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = wh.Config(stage_boundaries=["blocks.1.moe.experts.0"], num_micro_batch=2)
    with pytest.warns(UserWarning, match="could not trace every module"), pytest.raises(ValueError) as info:
        wh.parallelize(RoutedLM(), loss_fn=lambda out, y: out.sum(), example_inputs=torch.randint(0, 32, (4, 6)),
                       config=config)
    assert "falls inside 'blocks.1.moe', which whale runs as one opaque call" in str(info.value)
    assert "put the boundary at 'blocks.1.moe' or at a module outside it" in str(info.value)


def test_an_opaque_call_is_not_sharded_and_the_refusal_says_why(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = wh.annotate(RoutedLM(), {"blocks.0": wh.split(2)})
    with pytest.warns(UserWarning, match="could not trace every module"), pytest.raises(ValueError) as info:
        wh.parallelize(model, loss_fn=lambda out, y: out.sum(), example_inputs=torch.randint(0, 32, (4, 6)))
    msg = str(info.value)
    assert "split() cannot shard node opaque (whale_capture.opaque.default) at 'blocks.0.moe'" in msg
    assert "torch.export could not trace 'blocks.0.moe'" in msg and "nothing inside it can be sharded" in msg
    assert "Move split() to the modules it can shard (e.g. 'blocks.0.fc')" in msg


# ---------------------------------------------------------------------------------- transformers


def test_gpt2_falls_back_to_export_and_carries_names():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32, use_cache=False
    )
    model = transformers.GPT2LMHeadModel(cfg)
    s0, s1, head = wh.stage(), wh.stage(), wh.split(2)
    wh.annotate(model, {"transformer.h.0": s0, "transformer.h.1": s1, "lm_head": head})
    ids = torch.randint(0, 128, (2, 16))

    fx_fails = r"(?s)co_varnames.*modeling_gpt2.py:\d+, entering GPT2LMHeadModel.forward.*frontend='export'"
    with pytest.raises(CaptureError, match=fx_fails):
        capture(model, ids, frontend="fx")
    c = capture(model, ids)
    assert c.frontend == "export"
    paths = {n.module_path for n in c.nodes}
    assert {"transformer.h.0.attn", "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"} <= paths
    assert {n.annotations for n in nodes_in(c, "transformer.h.0")} == {(s0,)}
    assert {n.annotations for n in nodes_in(c, "transformer.h.1")} == {(s1,)}
    assert {n.annotations for n in nodes_in(c, "lm_head")} == {(head,)}
    c_attn = [n for n in nodes_in(c, "transformer.h.0.attn.c_attn") if n.flops]
    assert [n.flops for n in c_attn] == [2 * 32 * 64 * 192]  # Conv1D is an addmm over B*T rows
    assert c.total_flops == gpt_forward_flops(2, 16, n_layer=2, n_embd=64, vocab=128)
    # lm_head.weight is tied to transformer.wte.weight: counted once.
    assert c.total_param_bytes == sum(p.numel() for p in model.parameters()) * F32
    assert c.nodes[-1].shapes == ((2, 16, 128),)


def test_bert_captures_with_analytic_flops():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    H, I, B, T = 32, 64, 2, 8
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=I, max_position_embeddings=32,
    )
    model = transformers.BertModel(cfg)
    c = capture(model, torch.randint(0, 100, (B, T)))
    per_layer = 4 * 2 * B * T * H * H + 2 * 2 * B * T * T * H + 2 * 2 * B * T * H * I
    for i in range(2):
        assert sum(n.flops for n in nodes_in(c, f"encoder.layer.{i}")) == per_layer
    assert c.total_flops == 2 * per_layer + 2 * B * H * H  # + the pooler's dense on [CLS]
    assert c.total_param_bytes == sum(p.numel() for p in model.parameters()) * F32


def test_untraceable_forward_under_parallelize_names_both_reasons_and_what_still_works(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    staged = wh.annotate(DataDependent(), {"fc": wh.stage(), "out": wh.stage()})
    with pytest.raises(ValueError) as info:
        wh.parallelize(staged, loss_fn=F.mse_loss, example_inputs=torch.randn(4, 4))
    msg = str(info.value)
    assert "pipeline stages are cut from the captured graph" in msg
    assert "fx: TraceError" in msg and "export: " in msg and "h.sum().item() > 0" in msg
    assert "plain data parallel still works" in msg and "split()" in msg
    # Plain data parallel needs no graph: it is built, with a warning saying why.
    with pytest.warns(UserWarning, match="could not capture DataDependent"):
        program = wh.parallelize(DataDependent(), loss_fn=F.mse_loss, example_inputs=torch.randn(4, 4))
    assert program.plan.rows(4) == (2, 2)


def test_a_forward_returning_a_cache_is_told_what_to_set():
    transformers = pytest.importorskip("transformers")

    class ReturnsCache(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, **kwargs):
            return self.fc(x), transformers.DynamicCache()

    with pytest.raises(CaptureError, match=r"pass use_cache=False among the example's keyword inputs, "
                                           r"or set model.config.use_cache = False"):
        capture(ReturnsCache(), torch.randn(2, 4))


# --------------------------------------------------------------------- the model stays the user's


class UpdatesState(nn.Module):
    """Updates state in forward: a step counter buffer (reassigned), running statistics (in
    place) and a Python counter."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("stats", torch.ones(4))
        self.calls = 0

    def forward(self, x):
        self.count += 1
        self.stats.mul_(0.9).add_(0.1 * x.mean(0).detach())
        self.calls += 1
        return self.fc(x) * self.stats


def _state_of(model):
    named = [*model.named_parameters(), *model.named_buffers()]
    return {n: (id(t), type(t), t.detach().clone()) for n, t in named}, dict(vars(model))


def _assert_untouched(model, before):
    tensors, attrs = before
    now, now_attrs = _state_of(model)
    assert now.keys() == tensors.keys()
    for name, (ident, kind, value) in tensors.items():
        assert now[name][:2] == (ident, kind), f"capture replaced {name}"
        assert torch.equal(now[name][2], value), f"capture changed {name}"
    assert now_attrs.keys() == attrs.keys() and all(now_attrs[k] is attrs[k] for k in attrs)


def test_a_forward_that_updates_buffers_is_captured_by_export_and_the_model_is_untouched():
    torch.manual_seed(0)
    model, x = UpdatesState(), torch.randn(3, 4)
    reference = copy.deepcopy(model)
    before = _state_of(model)
    with pytest.raises(CaptureError, match=r"assigns module state \['count'\]"):
        capture(model, x, frontend="fx")
    _assert_untouched(model, before)  # no fx Proxy left in the buffer
    c = capture(model, x)
    _assert_untouched(model, before)
    assert c.frontend == "export" and model.calls == 0
    # The graph carries both updates: two steps move the buffers as two eager steps do.
    for rows in (3, 5):
        batch = torch.randn(rows, 4)
        torch.testing.assert_close(c.graph_module(batch), reference(batch), rtol=0, atol=0)
    assert int(c.graph_module.count) == int(reference.count) == 2
    torch.testing.assert_close(c.graph_module.stats, reference.stats, rtol=0, atol=0)


# ------------------------------------------------------------------ inputs and outputs of the graph


class DictOut(OptionalScale):
    def forward(self, x, scale=None):
        y = super().forward(x, scale)
        return {"y": y, "pair": (y, y.sum(-1))}


def _flat_run(gm, flat):
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))  # default codegen: flat placeholders in
    return torch.utils._pytree.tree_leaves(torch.fx.GraphModule(gm, graph)(*flat))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_flatten_inputs_and_unflatten_output_round_trip(frontend):
    model, x = DictOut(), torch.randn(3, 4)
    c = capture(model, {"x": x, "scale": None}, frontend=frontend)
    for rows in (1, 6):
        batch = torch.randn(rows, 4)
        flat = c.flatten_inputs((batch,), {})
        assert c.flatten_inputs((), {"x": batch}) == flat and flat[0] is batch
        out = c.unflatten_output(_flat_run(c.graph_module, flat))
        ref = model(batch)
        assert out.keys() == ref.keys() and isinstance(out["pair"], tuple)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="scale"):
        c.flatten_inputs((x,), {"scale": torch.ones(4)})


def test_fx_model_flat_output_is_the_single_tensor():
    torch.manual_seed(0)
    model, x = TinyGPT(), torch.randint(0, 64, (2, 16))
    c = capture(model, x, frontend="fx")
    assert c.flatten_inputs((x,), {}) == (x,) and c.input_defaults == {} and c.fixed_rows is None
    out = c.unflatten_output(_flat_run(c.graph_module, (x,)))
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def test_export_keeps_the_batch_dynamic_or_says_why_not():
    class FixedRows(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("row_scale", torch.ones(4, 1))

        def forward(self, x):
            return self.fc(x) * self.row_scale  # (B, 4) * (4, 1): only B == 4 broadcasts

    assert capture(nn.Linear(4, 4), torch.randn(4, 4), frontend="export").fixed_rows is None
    with pytest.warns(UserWarning, match=r"(?s)dimension 0 of FixedRows's inputs \['x'\].*constant \(4\)"
                                         r".*runs only on batches of 4 rows"):
        c = capture(FixedRows(), torch.randn(4, 4), frontend="export")
    assert c.fixed_rows == 4 and "batch fixed at 4 rows" in c.summary()
    with pytest.warns(UserWarning, match="give an example batch of 2 or more rows"):
        assert capture(nn.Linear(4, 4), torch.randn(1, 4), frontend="export").fixed_rows == 1


def test_a_pipeline_over_a_graph_with_fixed_rows_is_refused_before_any_step(monkeypatch):
    class FixedRowsTwoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)
            self.register_buffer("row_scale", torch.ones(8, 1))

        def forward(self, x):
            if x.shape[0] > 0:  # Python control flow on a size: fx refuses, export goes on
                x = self.fc1(x) * self.row_scale  # fixes the batch at 8 rows
            return self.fc2(x)

    monkeypatch.setenv("WORLD_SIZE", "2")
    model = wh.annotate(FixedRowsTwoLayers(), {"fc1": wh.stage(), "fc2": wh.stage()})
    with pytest.warns(UserWarning, match="runs only on batches of 8 rows"):
        with pytest.raises(ValueError, match=r"runs only on batches of 8 rows .* micro-batches of \[4\] rows"):
            wh.parallelize(model, loss_fn=F.mse_loss, example_inputs=torch.randn(8, 4),
                           config=wh.Config(num_micro_batch=2))


def test_an_in_place_write_to_a_parameters_data_names_the_module_and_the_fix():
    # Gemma 3n's AltUp clamps prediction_coefs.weight.data every training forward: export keeps
    # a "lifted tensor" it cannot follow, and torch's message names the module near its end.
    class Clamped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.coefs = nn.Linear(8, 8)

        def forward(self, x):
            self.coefs.weight.data.clamp_(-1.0, 1.0)
            return self.coefs(x)

    model = nn.Sequential(nn.Linear(8, 8), Clamped())
    with pytest.raises(CaptureError) as info:
        capture(model, torch.randn(4, 8), frontend="export")
    message = str(info.value)
    assert "Fix: forward in '1' makes a tensor export cannot follow, most often an in-place write to a parameter's .data" in message
