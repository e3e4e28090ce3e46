"""``split`` through ``wh.parallelize``: tensor parallel alone and inside replicate.

The sharding rules themselves are tested in tests/test_tensor_parallel.py; here the program
(plan, groups, data-parallel sync of shards, loss, state dicts) is. Tolerances: see
tests/equivalence.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import whale as wh
from examples.cnn import CNN
from examples.gpt import GPT, GPTConfig
from tests.equivalence import assert_equivalent

CASE = "tests.split_cases:gpt_split"


def _check(outs):
    for out in outs:
        assert_equivalent(out)
        assert out["full_matches"]
        assert out["loss"] == outs[0]["loss"]


def test_split_alone_world2_uneven_vocab_shards(world2):
    outs = world2.run(CASE, split={"blocks": 2, "lm_head": 2}, shard_sizes={"lm_head": [40, 24]})
    _check(outs)
    assert outs[0]["plan"] == (2, 1)
    assert outs[0]["shards"]["lm_head.weight"] == (40, 32)
    assert outs[1]["shards"]["lm_head.weight"] == (24, 32)


def test_split_on_a_workstation_shards_by_device_speed(world2):
    # Rank 0 is an A100, rank 1 a T4 (fp32 achievable 9.75 vs 4.05 TFLOP/s): with no
    # shard_sizes given, parallelize cuts heads, columns and vocabulary rows by speed.
    outs = world2.run(CASE, split={"blocks": 2, "lm_head": 2}, cluster="node0=1xA100-80GB+1xT4")
    _check(outs)
    assert outs[0]["shard_sizes"] == {
        "blocks.0.attn": (3, 1), "blocks.0.mlp": (90, 38),
        "blocks.1.attn": (3, 1), "blocks.1.mlp": (90, 38), "lm_head": (45, 19),
    }  # fmt: skip
    assert outs[0]["shards"]["lm_head.weight"] == (45, 32)
    assert outs[1]["shards"]["lm_head.weight"] == (19, 32)
    assert outs[0]["shards"]["blocks.0.mlp.fc.weight"] == (90, 32)
    assert outs[1]["shards"]["blocks.0.mlp.fc.weight"] == (38, 32)
    assert outs[0]["shards"]["blocks.0.attn.qkv.weight"] == (3 * 3 * 8, 32)  # q, k, v of 3 heads
    assert outs[1]["shards"]["blocks.0.attn.qkv.weight"] == (3 * 1 * 8, 32)


def test_split_inside_replicate_world4(world4):
    # 2 tensor-parallel ranks x 2 replicas with uneven rows: shards synced across replicas.
    outs = world4.run(CASE, split={"blocks": 2}, row_weights=(3, 1))
    _check(outs)
    assert outs[0]["plan"] == (2, 2)
    assert outs[0]["shards"]["blocks.0.mlp.fc.weight"] == (64, 32)


@pytest.fixture
def world(monkeypatch):
    def set_world(n: int) -> None:
        monkeypatch.setenv("WORLD_SIZE", str(n))

    return set_world


def _gpt():
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16))
    return model, torch.randint(32, (4, 8))


def _lm(logits, y):
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def test_unshardable_kind_is_named_before_any_group(world):
    world(2)
    model = wh.annotate(CNN(width=4), {"features": wh.split(2)})
    with pytest.raises(ValueError, match=r"Conv2d.*Linear|Linear.*Conv2d"):
        wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=torch.randn(4, 3, 16, 16))


def test_more_shards_than_heads(world):
    world(4)
    model, x = _gpt()
    wh.annotate(model, {"blocks.0.attn": wh.split(4)})
    with pytest.raises(ValueError, match=r"split\(4\) at .blocks.0.attn.: 4 shards but only 2 heads"):
        wh.parallelize(model, loss_fn=_lm, example_inputs=x)


def test_shard_sizes_that_do_not_add_up(world):
    world(2)
    model, x = _gpt()
    model.lm_head.weight = torch.nn.Parameter(model.wte.weight.detach().clone())
    wh.annotate(model, {"lm_head": wh.split(2)})
    with pytest.raises(ValueError, match=r"adds up to 40 but .lm_head. has 32 classes"):
        wh.parallelize(model, loss_fn=_lm, example_inputs=x,
                       config=wh.Config(shard_sizes={"lm_head": [20, 20]}))


def test_speed_sizes_are_planned_before_any_group(world):
    world(2)
    model, x = _gpt()
    wh.annotate(model, {"blocks": wh.split(2)})
    ws = "node0=1xA100-80GB+1xT4"
    auto = wh.parallelize(model, loss_fn=_lm, example_inputs=x, config=wh.Config(auto_parallel=True, cluster=ws))
    assert auto.plan.tensor_parallel == 2  # split() pins it
    assert dict(auto.plan.shard_sizes)["blocks.0.mlp"] == (45, 19)  # 64 columns by speed
    # Sizes the user gives win; on one device type the shards stay even.
    given = wh.Config(cluster=ws, shard_sizes={"blocks.0.mlp": [32, 32]})
    assert wh.parallelize(model, loss_fn=_lm, example_inputs=x, config=given).plan.shard_sizes == (("blocks.0.mlp", (32, 32)),)
    same = wh.Config(cluster="2xA100-80GB")
    assert wh.parallelize(model, loss_fn=_lm, example_inputs=x, config=same).plan.shard_sizes == ()
    world(4)
    mixed = wh.Config(cluster="a=1xA100-80GB+1xT4,b=2xA100-80GB")
    with pytest.raises(ValueError, match=r"groups \[\(0, 1\), \(2, 3\)\] mix device types differently"):
        wh.parallelize(model, loss_fn=_lm, example_inputs=x, config=mixed)


def test_split_device_count_must_divide_the_world(world):
    world(4)
    model, x = _gpt()
    wh.annotate(model, {"blocks": wh.split(3)})
    with pytest.raises(ValueError, match=r"split\(device_count=3\) does not divide the world of 4"):
        wh.parallelize(model, loss_fn=_lm, example_inputs=x)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"split": {"blocks.2": 2, "blocks.3": 2}, "boundaries": ["blocks.2"]},
        {
            "split": {"blocks.0": 2, "blocks.3.mlp": 2},
            "boundaries": ["blocks.2"],
            "num_micro_batch": 3,
            "shard_sizes": {"blocks.3.mlp": [96, 32]},
        },
        {
            "split": {"blocks.0": 2, "blocks.3.mlp": 2},
            "boundaries": ["blocks.2"],
            "cluster": "a=1xA100-80GB+1xT4,b=1xA100-80GB+1xT4",
        },
        {"split": {"blocks.0": 2}, "boundaries": ["blocks.2"]},
    ],
    ids=[
        "split-last-stage",
        "split-both-stages-uneven-mlp",
        "split-both-stages-by-device-speed",
        "split-first-stage",
    ],
)
def test_split_inside_pipeline_stages_world4(world4, kwargs):
    # 2 stages x 2 tensor-parallel ranks; the tied embedding/head spans both stages.
    outs = world4.run("tests.split_cases:split_in_stage", **kwargs)
    for out in outs:
        assert out["plan"] == (1, 2, 2)
        assert_equivalent(out, names=out["params"].keys())
        assert out["full_keys_ok"]
    if "shard_sizes" in kwargs:
        # Ranks 2 and 3 hold stage 1: its MLP's hidden columns split 96 / 32.
        assert outs[2]["shards"]["blocks.3.mlp.fc.weight"] == (96, 32)
        assert outs[3]["shards"]["blocks.3.mlp.fc.weight"] == (32, 32)
    if "cluster" in kwargs:
        # Each stage's group is an A100 and a T4: columns 90 / 38, heads 3 / 1.
        assert outs[2]["shards"]["blocks.3.mlp.fc.weight"] == (90, 32)
        assert outs[3]["shards"]["blocks.3.mlp.fc.weight"] == (38, 32)
        assert outs[0]["shards"]["blocks.0.attn.qkv.weight"] == (72, 32)
        assert outs[1]["shards"]["blocks.0.attn.qkv.weight"] == (24, 32)
    # Inference: refused where the last stage holds a split part (its output stays sharded),
    # else the local model's output with the trained weights, to float32 round-off.
    last_split = any(name.startswith("blocks.3") or name.startswith("blocks.2") for name in kwargs["split"])
    for out in outs:
        assert out["inference"] == "refused" if last_split else out["inference"] < 1e-5, out["inference"]
