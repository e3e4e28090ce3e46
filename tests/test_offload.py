"""``Config(offload=...)``: the tier round-trips exactly, training with it equals training
without (bitwise: the same update runs layer by layer on the same values), resident state
drops to a layer's worth, bad input is a clear error, nothing is left behind."""

from __future__ import annotations

import copy
import os
import stat

import pytest
import torch
from torch import nn

import whale as wh
from whale.runtime.offload import Offload, TierBlock, check_offload_dir

CASES = "tests.offload_cases"


def _stack(layers: int = 6, width: int = 256) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(layers)])


def test_tier_round_trips_bitwise(tmp_path):
    tensors = [torch.randn(3, 5), torch.randn(17).double(), torch.randint(0, 9, (4, 4)), torch.randn(2, 2).half(),
               torch.rand(7) > 0.5]
    block = TierBlock(tensors, str(tmp_path), pinned=False)
    block.release()
    assert block.resident() == 0
    for t, v in zip(tensors, block.views):
        assert v.dtype == t.dtype and torch.equal(v, t)  # fetched back from the file, bitwise
    block.prefetch()
    assert block.resident() >= block.nbytes
    block.views[0].mul_(2)
    block.release()
    assert torch.equal(block.views[0], tensors[0] * 2)  # a write survives the write back
    block.close()
    assert os.listdir(tmp_path) == []  # the file was unlinked when made


@pytest.mark.parametrize("mode", ["optimizer", "params"])
def test_layered_step_equals_plain_step_and_keeps_one_layer_resident(tmp_path, mode):
    model = _stack()
    plain = copy.deepcopy(model)
    off = Offload(model.named_parameters(), mode, str(tmp_path), [model])
    assert off.layer_names == [str(i) for i in range(6)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    resident: list[int] = []
    for step in range(3):
        x = torch.randn(8, 256)
        for m, o in ((model, opt), (plain, opt_plain)):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
        off.on_layer = lambda layer: resident.append(sum(off.resident_state_bytes(opt)))
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters())), step
    layer = off.state_bytes(opt) // 6
    # During the update: the layer updating and the one prefetched (at most 2 of 6 layers).
    assert resident and max(resident) <= 2 * layer + 4096, (resident, layer)
    assert sum(off.resident_state_bytes(opt)) == 0  # all written back after the step
    for p, q in zip(model.parameters(), plain.parameters()):  # (reading maps the pages in)
        for key in opt_plain.state[q]:
            assert torch.equal(opt.state[p][key], opt_plain.state[q][key])
    assert opt.state_dict()["state"][0]["exp_avg"].shape == (256, 256)
    off.close()
    assert os.listdir(tmp_path) == []


def test_offloaded_parameters_are_fetched_one_layer_ahead_in_forward_and_backward(tmp_path):
    model = _stack(6, 256)
    plain = copy.deepcopy(model)
    off = Offload(model.named_parameters(), "params", str(tmp_path), [model])
    layer = off._params[0].nbytes
    seen: dict[str, list[int]] = {"forward": [], "backward": []}

    def measure(phase: str) -> None:
        off.wait()
        seen[phase].append(sum(off.resident_param_bytes()))

    for linear in model.modules():
        if isinstance(linear, nn.Linear):  # after the offload's own hooks
            linear.register_forward_pre_hook(lambda m, args: measure("forward"))
            linear.weight.register_post_accumulate_grad_hook(lambda p: measure("backward"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    for _ in range(2):
        x = torch.randn(8, 256)
        for m, o in ((model, opt), (plain, opt_plain)):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
    off.wait()
    assert sum(off.resident_param_bytes()) == 0  # written back after the update
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))
    # The layer computing and the next one fetched; never the 6 layers (page rounding: +2 pages).
    assert len(seen["forward"]) == 12 and max(seen["forward"]) <= 2 * layer + 8192, (seen, layer)
    assert len(seen["backward"]) == 12 and max(seen["backward"]) <= 3 * layer + 8192, (seen, layer)
    off.close()


def test_closure_and_foreign_parameters_are_refused(tmp_path):
    model = _stack(2, 8)
    off = Offload(model.named_parameters(), "optimizer", str(tmp_path))
    model(torch.randn(2, 8)).sum().backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: torch.tensor(0.0))
    mixed = torch.optim.SGD([*model.parameters(), nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match=r"not the parallelized program's; build it on program.parameters\(\)"):
        mixed.step()
    off.close()


def test_unknown_offload_value_names_the_known_ones():
    with pytest.raises(ValueError, match=r"offload='cpu'.*\['none', 'optimizer', 'params'\]"):
        wh.Config(offload="cpu")
    with pytest.raises(TypeError, match="offload_dir"):
        wh.Config(offload="optimizer", offload_dir=3)


def test_unwritable_offload_dir_is_a_clear_error_at_parallelize(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    # root writes anywhere on a disk: /proc then is the directory nobody can make a file in
    target = "/proc" if os.geteuid() == 0 else str(locked)
    model = _stack(2, 8)
    config = wh.Config(offload="optimizer", offload_dir=target)
    with pytest.raises(ValueError, match=rf"offload_dir='{target}'.* cannot be written.*directory this process can write"):
        wh.parallelize(model, loss_fn=lambda out, y: out.sum(), example_inputs=(torch.randn(2, 8),), config=config)


def test_missing_offload_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        check_offload_dir(tmp_path / "absent")


@pytest.mark.parametrize("mode", ["optimizer", "params"])
def test_data_parallel_with_offload_equals_without_and_the_local_model(world2, mode):
    for r in world2.run(f"{CASES}:train", mode):
        assert r["loss_equal"] and r["params_equal"] and r["state_equal"], r
        assert r["layers"][:2] == ["tok_emb", "pos_emb"] or len(r["layers"]) >= 4, r["layers"]
        assert r["state_is_tier"]
        # Parameters after the first AdamW step: the local model's (tests/equivalence.py).
        assert abs(r["loss0"] - r["ref_loss"]) <= 1e-6 * abs(r["ref_loss"])
        assert r["max_param_diff"] <= 5e-4
        assert max(r["resident_during_step"]) <= 2 * max(r["layer_bytes"]) + 8192
        assert r["resident_after_step"] == 0 and r["param_resident_after_step"] == 0
        assert r["files_during"] == [] and r["files_after_close"] == []


@pytest.mark.parametrize("zero", [1, 2])
def test_offload_under_zero_equals_zero_alone(world2, zero):
    """ZeRO's shards are what program.parameters() gives the optimizer, so offload takes their
    state: bitwise the same training as ZeRO without offload, and nothing resident between steps."""
    for r in world2.run(f"{CASES}:train", "optimizer", "gpt", False, zero):
        assert r["loss_equal"] and r["params_equal"] and r["state_equal"], r
        assert r["state_is_tier"] and r["resident_after_step"] == 0, r
        assert r["max_param_diff"] <= 5e-4  # the local model's parameters after one AdamW step


@pytest.mark.parametrize("mode", ["optimizer", "params"])
def test_pipeline_with_offload_equals_without(world2, mode):
    for r in world2.run(f"{CASES}:train", mode, "gpt", True):
        assert r["loss_equal"] and r["params_equal"] and r["state_equal"], r


def test_transformers_gpt2_with_offloaded_params_equals_without(world2):
    for r in world2.run(f"{CASES}:train", "params", "gpt2"):
        assert r["loss_equal"] and r["params_equal"] and r["state_equal"], r
        assert any(name.startswith("transformer.h.") for name in r["layers"]), r["layers"]


def test_checkpoint_of_offloaded_state_round_trips(world2, tmp_path):
    for r in world2.run(f"{CASES}:checkpoint_roundtrip", str(tmp_path / "ckpt")):
        assert r["step"] == 2 and r["loaded_equal"] and r["after_equal"] and r["tier_bytes"] > 0, r


def test_state_dict_round_trip_between_two_offloaded_models(tmp_path):
    """``optimizer.state_dict()`` reads the tier; a loaded state moves into it at the next step;
    two programs' offloads each step only their own optimizer (once)."""
    a = _stack(3, 32)
    b = copy.deepcopy(a)
    offs = [Offload(m.named_parameters(), "optimizer", str(tmp_path)) for m in (a, b)]
    oa, ob = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (a, b))
    x = torch.randn(4, 32)
    for _ in range(2):
        a(x).square().mean().backward()
        oa.step()
        oa.zero_grad()
    b.load_state_dict(a.state_dict())
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    for m, o in ((a, oa), (b, ob)):
        m(x).square().mean().backward()
        o.step()
    assert oa.state[next(a.parameters())]["step"].item() == 3
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert offs[1].state_bytes(ob) == offs[0].state_bytes(oa) > 0
    for off in offs:
        off.close()
