"""Sharded checkpoints (``wh.checkpoint``): saved under one plan, loaded under another, training
continues as if uninterrupted; atomic saves; the local model both ways; bad input.

Each reshard case trains steps 0-1 under one plan, saves (each rank its shards), loads into a
program of another plan whose weights were scrambled, trains steps 2-3 with the loaded AdamW
state, and compares the whole state dict with the local model trained steps 0-3 uninterrupted
(tests/ckpt_cases.py). Tolerance atol 5e-5, fp32: loading itself is exact (bytes copied), and
what differs is the plans' summation order (sharded matmuls, micro-batches, bucketed
all-reduces), ~1e-7 on a gradient; AdamW with eps=1e-6 moves an entry by about lr*g/(|g|+eps),
whose sensitivity to g is at most lr/eps = 1e4, so over 4 steps such round-off on near-zero
gradient entries stays below 5e-5 (observed <= 1e-5). A load into the wrong weights or without
the optimizer's moments is off by ~1e-2 (lr) or more.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.testing import assert_close

import whale as wh
from tests import ckpt_cases
from tests.world import CaseError

CASE = "tests.ckpt_cases:"
ATOL = 5e-5


def _assert_state(got: dict, ref: dict) -> None:
    assert list(got) == list(ref), "the local model's state-dict keys, in order"
    for k, v in ref.items():
        assert_close(got[k], v, rtol=0, atol=ATOL, msg=k)


@pytest.fixture(scope="module")
def gpt_ref():
    return ckpt_cases.train_local("gpt", range(4))["state"]


@pytest.mark.parametrize("src,dst", [("dp", "pp"), ("tp", "local"), ("pp", "tp")])
def test_reshard_gpt(world2, tmp_path, gpt_ref, src, dst):
    """GPT (tied embedding and head, fused qkv split by heads) over 2 ranks."""
    world2.run(CASE + "run", "gpt", src, str(tmp_path), steps=(0, 2), save=True)
    outs = world2.run(CASE + "run", "gpt", dst, str(tmp_path), steps=(2, 4), load=True)
    assert outs[0]["loaded_step"] == 2
    _assert_state(outs[0]["state"], gpt_ref)


def test_reshard_hf_uneven_tp_to_dp(world2, tmp_path):
    """transformers GPT-2 split with uneven shards (heads 3:1, MLP columns 100:28, vocabulary
    rows 40:24), saved with an asynchronous save, loaded under data parallel."""
    ref = ckpt_cases.train_local("gpt2", range(4))["state"]
    world2.run(CASE + "run", "gpt2", "tp", str(tmp_path), steps=(0, 2), save=True, asynchronous=True)
    outs = world2.run(CASE + "run", "gpt2", "dp", str(tmp_path), steps=(2, 4), load=True)
    _assert_state(outs[0]["state"], ref)


def test_reshard_2_ranks_to_4(world2, world4, tmp_path, gpt_ref):
    """Saved by 2 data-parallel ranks, loaded by 4 ranks as a pipeline of 2 stages x split 2."""
    world2.run(CASE + "run", "gpt", "dp", str(tmp_path), steps=(0, 2), save=True)
    outs = world4.run(CASE + "run", "gpt", "pp-tp", str(tmp_path), steps=(2, 4), load=True)
    assert {o["loaded_step"] for o in outs} == {2}
    _assert_state(outs[0]["state"], gpt_ref)


def test_local_model_both_ways(tmp_path, gpt_ref):
    """A local model and its optimizer to a checkpoint and back without a process group, and a
    checkpoint to one torch.save file whose "model" entry is the local state_dict()."""
    from torch.distributed.checkpoint.format_utils import (
        dcp_to_torch_save,
        torch_save_to_dcp,
    )

    saved = ckpt_cases.run("gpt", "local", str(tmp_path), steps=(0, 2), save=True)
    assert saved["saved"] == str(tmp_path / "step-00000002")
    out = ckpt_cases.run("gpt", "local", str(tmp_path), steps=(2, 4), load=True)
    assert out["loaded_step"] == 2
    _assert_state(out["state"], gpt_ref)
    dcp_to_torch_save(wh.checkpoint.latest(tmp_path), tmp_path / "model.pt")
    whole = torch.load(tmp_path / "model.pt", weights_only=False)
    assert whole["step"] == 2
    for k, v in saved["state"].items():
        assert torch.equal(whole["model"][k], v), k
    assert set(whole["optim"]["state"]["wte.weight"]) == {"step", "exp_avg", "exp_avg_sq"}
    # And back: a torch.save file of {"model": state_dict} as a checkpoint (model only, step 0).
    torch.save({"model": saved["state"]}, tmp_path / "plain.pt")
    torch_save_to_dcp(tmp_path / "plain.pt", tmp_path / "plain")
    fresh, _, _, _ = ckpt_cases.build("gpt")
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    assert wh.checkpoint.load(tmp_path / "plain", fresh) == 0
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved["state"][k]), k
    with pytest.raises(ValueError, match="holds no optimizer state; pass optimizer=None"):
        wh.checkpoint.load(tmp_path / "plain", fresh, torch.optim.AdamW(fresh.parameters()))
    with pytest.raises(ValueError, match="not one of the program's; build the optimizer on program.parameters"):
        wh.checkpoint.save(tmp_path, fresh, torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()), step=9)


def test_failed_save_keeps_previous(world2, tmp_path):
    """A save that fails on one rank midway raises on every rank, leaves no temporary directory
    and keeps the previous checkpoint loadable and unchanged. Data-parallel replicas write their
    (identical) state once."""
    outs = world2.run(CASE + "failing_save", str(tmp_path))
    for out in outs:
        assert "RuntimeError: wh.checkpoint.save of step 4" in out["error"], out["error"]
        assert "rank 1: OSError: disk full (injected)" in out["error"]
        assert out["step"] == 2 and out["same"]
        assert out["entries"] == ["step-00000002"]
        # Both replicas hold everything; the files hold each recorded entry once (DCP's
        # deduplication): a replica writing its copy too would double what was written.
        assert out["written"] == out["recorded"], (out["written"], out["recorded"])


def test_bad_input(world2, tmp_path):
    with pytest.raises(CaseError, match="no checkpoint at .*missing: the directory does not exist"):
        world2.run(CASE + "bad_load", str(tmp_path / "missing"), "same")
    world2.run(CASE + "run", "gpt", "dp", str(tmp_path), steps=(0, 1), save=True)
    with pytest.raises(CaseError) as err:
        world2.run(CASE + "bad_load", str(tmp_path), "other")
    message = err.value.message
    assert "not of this model (GPT)" in message
    assert "missing keys [blocks.2.ln_1.weight, blocks.2.ln_1.bias" in message
    assert "mismatched shapes [blocks.0.attn.proj.bias: checkpoint (32,), model (48,)" in message
    empty = tmp_path / "empty"
    os.mkdir(empty)
    with pytest.raises(FileNotFoundError, match="no step-\\* directory"):
        wh.checkpoint.load(empty, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="step=-1"):
        wh.checkpoint.save(tmp_path, torch.nn.Linear(2, 2), step=-1)
