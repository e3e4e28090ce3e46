"""The annotations: arguments, the scope stack, the three places to annotate, eager semantics."""

from __future__ import annotations

import contextvars
import copy
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import whale as wh
from whale.primitives import current_scope, module_annotations

# ---- arguments ------------------------------------------------------------------------------


def test_primitive_arguments_are_recorded():
    assert wh.replicate(2).device_count == 2
    assert wh.replicate().device_count is None
    assert wh.split(device_count=4).device_count == 4
    assert wh.pipeline(8).num_micro_batch == 8
    assert wh.cluster([[0, 1], [2, 3]]).layout == ((0, 1), (2, 3))
    assert repr(wh.replicate(2)) == "replicate(device_count=2)"


@pytest.mark.parametrize(
    "make, error, needle",
    [
        (lambda: wh.replicate(devices=2), TypeError, "unknown argument(s) ['devices']"),
        (lambda: wh.replicate("2"), TypeError, "takes a positive int"),
        (lambda: wh.replicate(True), TypeError, "takes a positive int"),
        (lambda: wh.split(0), ValueError, "must be >= 1"),
        (lambda: wh.stage(2), TypeError, "at most 0 positional"),
        (lambda: wh.pipeline(num_micro_batch=2.5), TypeError, "takes a positive int"),
        (lambda: wh.cluster("rows"), ValueError, "'auto', 'node'"),
        (lambda: wh.cluster([[0, 1], [1, 2]]), ValueError, "appears in two groups"),
        (lambda: wh.cluster([[0, -1]]), TypeError, "ranks >= 0"),
    ],
)
def test_bad_primitive_arguments(make, error, needle):
    with pytest.raises(error) as info:
        make()
    assert needle in str(info.value)


# ---- the scope stack --------------------------------------------------------------------------

_KINDS = [wh.replicate, wh.split, wh.stage, lambda: wh.pipeline(2), wh.cluster]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, len(_KINDS) - 1)), max_size=20))
def test_scope_stack_follows_with_blocks(ops):
    """Random enters/exits: the stack always mirrors the open blocks, illegal nests are refused."""
    open_scopes: list = []
    try:
        for enter, kind in ops:
            if enter:
                a = _KINDS[kind]()
                kinds = [s.kind for s in open_scopes]
                legal = not (a.kind in ("split", "stage", "pipeline") and a.kind in kinds) and not (
                    a.kind == "pipeline" and "stage" in kinds
                )
                if legal:
                    a.__enter__()
                    open_scopes.append(a)
                else:
                    with pytest.raises(ValueError):
                        a.__enter__()
            elif open_scopes:
                open_scopes.pop().__exit__(None, None, None)
            assert current_scope() == tuple(open_scopes)
    finally:
        while open_scopes:
            open_scopes.pop().__exit__(None, None, None)
    assert current_scope() == ()


def test_scope_is_restored_after_an_exception():
    with pytest.raises(RuntimeError):
        with wh.replicate():
            raise RuntimeError("boom")
    assert current_scope() == ()


def test_scope_is_per_thread():
    seen = []
    with wh.replicate():
        t = threading.Thread(target=lambda: seen.append(current_scope()))
        t.start()
        t.join()
        inner = contextvars.copy_context().run(current_scope)
    assert seen == [()]
    assert len(inner) == 1


def test_reentering_the_same_annotation_is_refused():
    r = wh.replicate()
    with r:
        with pytest.raises(ValueError, match="already entered"):
            r.__enter__()


# ---- the three places --------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        with wh.replicate(2):
            self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
            with wh.split(2):
                self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.embed(x)
        with wh.replicate():
            x = self.body(x)
        return self.head(x)


def test_init_scope_tags_submodules_with_the_whole_stack():
    net = Net()
    (rep,) = module_annotations(net.body)
    assert rep.kind == "replicate" and rep.device_count == 2
    assert module_annotations(net.body[0]) == (rep,)
    assert [a.kind for a in module_annotations(net.head)] == ["replicate", "split"]
    assert module_annotations(net.head)[0] is rep
    assert module_annotations(net.embed) == ()


def test_annotate_by_name_appends_innermost_and_validates_first():
    net = Net()
    wh.annotate(net, {"embed": wh.replicate(), "body.0": [wh.cluster(), wh.replicate()]})
    assert [a.kind for a in module_annotations(net.body[0])] == ["replicate", "cluster", "replicate"]
    with pytest.raises(ValueError, match="did you mean"):
        wh.annotate(net, {"embedd": wh.replicate()})
    # A split under the split of 'head' is refused, and nothing of the call is applied.
    before = module_annotations(net.embed)
    with pytest.raises(ValueError, match="cannot contain another split"):
        wh.annotate(net, {"embed": wh.stage(), "head": wh.split(2)})
    assert module_annotations(net.embed) == before
    with pytest.raises(TypeError, match="must be a primitive"):
        wh.annotate(net, {"embed": "replicate"})


class PlainNet(nn.Module):
    """Net without annotations: same modules, created in the same order."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(self.embed(x)))


def test_eager_mode_is_unchanged_by_annotations():
    torch.manual_seed(0)
    net = Net()
    torch.manual_seed(0)
    plain = PlainNet()
    x = torch.randn(3, 4, requires_grad=True)
    assert torch.equal(net(x), plain(x))
    net(x).sum().backward()
    g = x.grad.clone()
    x.grad = None
    plain(x).sum().backward()
    assert torch.equal(g, x.grad)


def test_copies_share_annotations_by_identity():
    net = Net()
    clone = copy.deepcopy(net)
    assert module_annotations(clone.body)[0] is module_annotations(net.body)[0]
