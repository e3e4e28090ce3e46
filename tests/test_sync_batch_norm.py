"""``Config(sync_batch_norm=True)``: BatchNorm over the global batch of a data-parallel step.

Tolerances:
* the math against ``nn.BatchNorm`` in one process (a group of one): float64 to 1e-12 (the
  same formulas, other summation orders); float32 to the default ``assert_close`` tolerances
  (rtol 1.3e-6, atol 1e-5), as the statistics are summed in float64 and normalization in
  float32 in another order than ATen's kernel.
* the 2-rank equivalence: loss rtol 1e-6 and parameters after AdamW as tests/equivalence.py
  explains (observed <= 6e-8). Gradients: rtol 1e-4 and atol 2e-5 of the tensor's largest
  gradient, where the data-parallel tests take atol 1e-6: BatchNorm's backward subtracts dy's
  projections on 1 and xhat and divides by the batch std, so float32 round-off grows with the
  tensor's scale. The local model itself is up to 4e-6 x max|grad| from its float64 twin on
  the first step here (features.1.conv.weight: 2.1e-5 of 5.4); the distributed step, which
  sums in another order, is up to 8.5e-6 x max|grad| from the local one (1e-6 on the second
  step, whose gradients are 8x smaller). Running statistics: rtol 1e-5 / atol 1e-6 (observed
  3e-7 relative: the global statistics are float64 sums over the replicas' rows, so only the
  order of additions differs); ``num_batches_tracked`` exactly.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import whale as wh
from tests.equivalence import LR
from tests.sync_bn_cases import batch_norm_cnn
from whale.rewrite.collectives import CommGroup
from whale.rewrite.sync_batch_norm import SyncBatchNorm, sync_batch_norms

CASES = "tests.sync_bn_cases"


# ---- the math, one process ------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, shape, kwargs",
    [
        (nn.BatchNorm1d, (6, 5), {}),
        (nn.BatchNorm1d, (6, 5, 3), {"momentum": None}),
        (nn.BatchNorm2d, (4, 5, 3, 3), {}),
        (nn.BatchNorm3d, (3, 5, 2, 2, 2), {"affine": False}),
        (nn.BatchNorm2d, (4, 5, 3, 3), {"track_running_stats": False}),
    ],
    ids=["1d", "1d-seq-cumulative", "2d", "3d-no-affine", "2d-no-running-stats"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_local_batch_norm_in_a_group_of_one(cls, shape, kwargs, dtype):
    torch.manual_seed(0)
    bn = cls(5, **kwargs).to(dtype)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    ref = copy.deepcopy(bn)
    sync = SyncBatchNorm.from_batch_norm(bn, CommGroup((0,)))
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    for _ in range(3):
        x = (torch.randn(shape, dtype=dtype) * 3 + 2).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        y, yr = sync(x), ref(xr)
        assert_close(y, yr, **tol)
        g = torch.randn_like(y)
        y.backward(g)
        yr.backward(g)
        assert_close(x.grad, xr.grad, **tol)
        for name, p in ref.named_parameters():
            assert_close(getattr(bn, name).grad, p.grad, **tol, msg=name)
            p.grad = getattr(bn, name).grad = None
        for name, b in ref.named_buffers():  # sync shares bn's buffers
            assert_close(getattr(bn, name), b, **tol, msg=name)
    sync.eval(), ref.eval()
    x = torch.randn(shape, dtype=dtype)
    assert_close(sync(x), ref(x), **tol)
    assert sync.state_dict().keys() == ref.state_dict().keys()


def test_sync_batch_norms_leaves_the_users_model_alone():
    model = batch_norm_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    program = sync_batch_norms(model, CommGroup((0,)))
    assert all(type(m) is not SyncBatchNorm for m in model.modules())
    assert isinstance(program.features[0].norm, SyncBatchNorm)
    assert isinstance(program.head[0], SyncBatchNorm)
    # Only the path to each BatchNorm is copied: the rest, parameters and buffers, is shared.
    assert program is not model and program.features[0].conv is model.features[0].conv
    assert program.head[1] is model.head[1]
    assert [id(p) for p in program.parameters()] == [id(p) for p in model.parameters()]
    assert list(program.state_dict()) == list(model.state_dict())
    x = torch.randn(4, 3, 16, 16)
    program(x)  # training: updates the (shared) running statistics
    assert model.features[0].norm.num_batches_tracked.item() == 1
    assert not torch.equal(model.features[0].norm.running_mean, before["features.0.norm.running_mean"])
    assert model.features[0].norm.training and type(model.features[0].norm) is nn.BatchNorm2d
    assert sync_batch_norms(nn.Linear(2, 2), CommGroup((0,))).__class__ is nn.Linear


def test_refuses_a_batch_norm_with_its_own_forward():
    class Frozen(nn.BatchNorm2d):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match=r"'1' is a Frozen.*sync_batch_norm=False"):
        sync_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 1), Frozen(4)), CommGroup((0, 1)))


# ---- Config and the rewrite, without processes -------------------------------------------------


def test_config_sync_batch_norm_is_a_bool():
    assert wh.Config().sync_batch_norm is False
    assert wh.Config(sync_batch_norm=True).sync_batch_norm is True
    with pytest.raises(TypeError, match=r"Config\(sync_batch_norm=\.\.\.\) is a bool, got 1"):
        wh.Config(sync_batch_norm=1)
    assert wh.Config.from_dict({"sync_batch_norm": True}).sync_batch_norm


def _parallelize(monkeypatch, world: int, **config):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    model = batch_norm_cnn(cumulative=False)  # capturable: no other warning
    x = torch.randn(8, 3, 16, 16)
    return model, wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=(x,), config=wh.Config(**config))


def test_warns_once_naming_the_batch_norms_without_sync(monkeypatch):
    with pytest.warns(UserWarning) as record:
        _parallelize(monkeypatch, 2)
    (w,) = [w for w in record if "BatchNorm" in str(w.message)]
    message = str(w.message)
    assert "'features.0.norm', 'features.1.norm', 'head.0'" in message
    assert "2 replicas" in message and "Config(sync_batch_norm=True)" in message
    assert w.filename == __file__  # points at the user's parallelize call


def test_no_warning_with_sync_or_one_replica(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _parallelize(monkeypatch, 2, sync_batch_norm=True)
        _parallelize(monkeypatch, 1)


def test_rewrite_replaces_batch_norms_in_the_program_only(monkeypatch):
    model, program = _parallelize(monkeypatch, 2, sync_batch_norm=True)
    assert program.program.data_group.ranks == (0, 1)
    syncs = [m for m in program.module.modules() if isinstance(m, SyncBatchNorm)]
    assert len(syncs) == 3 and all(m.group is program.program.data_group for m in syncs)
    assert not any(isinstance(m, SyncBatchNorm) for m in model.modules())
    with pytest.raises(RuntimeError, match="no process group yet"):
        _ = program.program.data_group.process_group


def test_refused_with_pipeline_stages(monkeypatch):
    with pytest.raises(ValueError, match=r"sync_batch_norm=True\) synchronizes .* 2 stage\(s\)"):
        _parallelize(monkeypatch, 4, sync_batch_norm=True, stage_boundaries=["features.1"])


# ---- 2 gloo ranks --------------------------------------------------------------------------------


@pytest.mark.parametrize("row_weights, rows", [(None, (4, 4)), ((3, 1), (6, 2))], ids=["even", "uneven"])
def test_equivalence_world2(world2, row_weights, rows):
    outs = world2.run(f"{CASES}:equivalence", 8, row_weights=row_weights)
    out = outs[0]
    assert tuple(out["rows"]) == rows
    _assert_equivalent(out)
    for name, ref in out["ref_buffers"].items():
        got = out["buffers"][name]
        if ref.is_floating_point():
            assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(got, ref), name
    assert "SyncBatchNorm" in out["program_classes"]
    assert "SyncBatchNorm" not in out["user_classes"]
    for other in outs[1:]:
        assert other["loss"] == out["loss"]
        for name, p in out["params"].items():
            assert torch.equal(other["params"][name], p), f"replicas diverged at {name}"
        for name, b in out["buffers"].items():
            assert torch.equal(other["buffers"][name], b), f"running statistics diverged at {name}"


def test_micro_batches_equal_accumulation_over_global_micro_batches(world2):
    # Documented semantics with num_micro_batch > 1: each micro-batch is normalized over the
    # replicas' micro-batches of that index, and the running statistics move once per micro-batch.
    out = world2.run(f"{CASES}:micro_batches", 8, 2, row_weights=(3, 1))[0]
    assert_close(torch.tensor(out["loss"]), torch.tensor(out["ref_loss"]), rtol=1e-6, atol=0)
    for name, want in out["ref_grads"].items():
        assert_close(out["grads"][name], want, rtol=1e-4, atol=2e-5 * want.abs().max().item(), msg=name)
    for name, want in out["ref_buffers"].items():
        assert_close(out["buffers"][name], want, rtol=1e-5, atol=1e-6, msg=name)
    assert out["buffers"]["head.0.num_batches_tracked"].item() == 2


def test_without_sync_uneven_replicas_differ_from_the_local_model(world2):
    # The reason the option exists: per-replica statistics give another loss.
    out = world2.run(f"{CASES}:equivalence", 8, row_weights=(3, 1), sync_batch_norm=False)[0]
    assert abs(out["loss"][0] - out["ref_loss"][0]) > 1e-3


def _assert_equivalent(out: dict) -> None:
    """tests/equivalence.py's checks with the gradient tolerance of the module docstring."""
    assert_close(torch.tensor(out["loss"]), torch.tensor(out["ref_loss"]), rtol=1e-6, atol=0)
    for step, (grads, ref) in enumerate(zip(out["grads"], out["ref_grads"])):
        for name, want in ref.items():
            atol = 2e-5 * want.abs().max().item()
            assert_close(grads[name], want, rtol=1e-4, atol=atol, msg=f"step {step} grad {name}")
    for name, want in out["ref_params"].items():
        got = out["params"][name]
        assert_close(got, want, rtol=0, atol=5 * LR / 100, msg=f"param {name}")
        ordinary = out["ref_grads"][0][name].abs() > 1e-5
        assert_close(got[ordinary], want[ordinary], rtol=0, atol=2e-6, msg=f"param {name} (ordinary entries)")


def test_one_all_reduce_per_batch_norm_forward_and_backward(world2):
    calls = world2.run(f"{CASES}:collectives_per_step")[0]
    bn = sorted(n for n, dtype in calls["calls"] if dtype == "torch.float64")
    # forward: [sum x, sum x**2] per channel and the count; backward: [sum dy, sum dy * xhat];
    # both float64, for BatchNorms of 8, 16 and 256 channels.
    assert bn == sorted([2 * c + 1 for c in (8, 16, 256)] + [2 * c for c in (8, 16, 256)])
    assert len(calls["calls"]) == 6 + calls["buckets"]



@pytest.mark.parametrize("exported", [False, True], ids=["fx", "export"])
def test_a_one_row_micro_batch_for_a_one_value_batch_norm_is_refused_on_every_rank(world2, exported):
    # 7 rows in 4 micro-batches: 2, 2, 2, 1. torch refuses the 1-row one in training; an exported
    # graph (which drops that check) left the running variance NaN. Every rank raises before
    # the step sends anything; 8 rows train, the statistics finite.
    config = {"stage_boundaries": ["head"], "num_micro_batch": 4, "schedule": "1f1b"}
    outs = world2.run(f"{CASES}:one_row_micro_batch", exported, 7, **config)
    for out in outs:
        assert "BatchNorm 'norm' normalizes one value per channel per row, and replica 0 gets a micro-batch of 1 row" in out["error"]
        assert "at least 8 rows, or use fewer micro-batches" in out["error"]
    outs = world2.run(f"{CASES}:one_row_micro_batch", exported, 8, **config)
    assert all(out["finite"] for out in outs) and outs[0]["loss"] == outs[1]["loss"]
