"""``wh.Config``: schedule names checked when it is made, hashable with every field set."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch
from torch import nn

import whale as wh
from whale.ir.schedule import SCHEDULE_NAMES


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_every_known_schedule_is_accepted(name):
    assert wh.Config(schedule=name).schedule == name


@pytest.mark.parametrize("typo", ["1fb1", "GPipe", "interleaved", ""])
def test_schedule_typo_is_refused_at_construction(typo):
    with pytest.raises(ValueError, match=rf"Config\(schedule={typo!r}\)") as err:
        wh.Config(schedule=typo)
    for name in SCHEDULE_NAMES:
        assert repr(name) in str(err.value)


def test_schedule_typo_is_refused_without_pipeline_stages():
    # A replicated model has no stages, so no schedule is ever built: the Config still refuses.
    with pytest.raises(ValueError, match=r"Config\(schedule='1fb1'\)"):
        wh.Config(schedule="1fb1", stage_boundaries=None)
    with pytest.raises(ValueError, match=r"Config\(schedule='1fb1'\)"):
        wh.Config.from_dict({"schedule": "1fb1"})
    with pytest.raises(ValueError, match=r"Config\(schedule='1fb1'\)"):
        wh.parallelize(nn.Linear(4, 2), loss_fn=nn.functional.mse_loss, config={"schedule": "1fb1"})


def test_schedule_that_is_not_a_string():
    with pytest.raises(TypeError, match=r"Config\(schedule=\.\.\.\)"):
        wh.Config(schedule=1)


def test_config_with_shard_sizes_is_hashable():
    cfg = wh.Config(shard_sizes={"lm_head": [3, 1]})
    same = wh.Config(shard_sizes={"lm_head": (3, 1)})
    assert cfg == same
    assert hash(cfg) == hash(same)
    assert {cfg, same} == {cfg}
    assert cfg != wh.Config(shard_sizes={"lm_head": [2, 2]})
    assert cfg != wh.Config()


def test_shard_sizes_equality_ignores_key_order():
    a = wh.Config(shard_sizes={"blocks.0.mlp": [3, 1], "lm_head": [40, 24]})
    b = wh.Config(shard_sizes={"lm_head": [40, 24], "blocks.0.mlp": [3, 1]})
    assert a == b
    assert hash(a) == hash(b)


def test_shard_sizes_reads_as_a_mapping():
    sizes = wh.Config(shard_sizes={"lm_head": [3, 1], "blocks.0.mlp": [2, 2]}).shard_sizes
    assert dict(sizes) == {"lm_head": (3, 1), "blocks.0.mlp": (2, 2)}
    assert sizes == {"lm_head": (3, 1), "blocks.0.mlp": (2, 2)}
    assert sizes["lm_head"] == (3, 1)
    assert sorted(sizes.items()) == [("blocks.0.mlp", (2, 2)), ("lm_head", (3, 1))]
    assert "lm_head" in sizes and len(sizes) == 2
    assert (wh.Config(shard_sizes={}).shard_sizes or {"fallback": ()}) == {"fallback": ()}
    assert (wh.Config().shard_sizes or {}) == {}


def test_shard_sizes_is_read_only():
    given = {"lm_head": [3, 1]}
    cfg = wh.Config(shard_sizes=given)
    with pytest.raises(TypeError):
        cfg.shard_sizes["lm_head"] = (2, 2)
    with pytest.raises(TypeError):
        del cfg.shard_sizes["lm_head"]
    with pytest.raises(AttributeError):
        cfg.shard_sizes._items = {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.shard_sizes = {}
    given["lm_head"].append(7)  # the caller's dict and lists are copied, not kept
    given["other"] = [1, 1]
    assert dict(cfg.shard_sizes) == {"lm_head": (3, 1)}


def test_config_survives_pickle_copy_and_replace():
    cfg = wh.Config(shard_sizes={"lm_head": [3, 1]}, cluster="node0=1xA100-80GB+1xT4")
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert copy.deepcopy(cfg) == cfg
    changed = dataclasses.replace(cfg, num_micro_batch=2)
    assert changed.shard_sizes == cfg.shard_sizes
    assert changed != cfg


def test_config_with_every_field_set_is_hashable():
    cfg = wh.Config(
        num_micro_batch=2,
        grad_comm_dtype=torch.bfloat16,
        row_weights=[3, 1],
        schedule="gpipe",
        pipeline_degree=2,
        stage_boundaries=["blocks.2"],
        cluster="a=1xA100-80GB+1xT4,b=2xA100-80GB",
        shard_sizes={"lm_head": [3, 1]},
    )
    twin = wh.Config(
        num_micro_batch=2,
        grad_comm_dtype=torch.bfloat16,
        row_weights=(3, 1),
        schedule="gpipe",
        pipeline_degree=2,
        stage_boundaries=("blocks.2",),
        cluster="a=1xA100-80GB+1xT4,b=2xA100-80GB",
        shard_sizes={"lm_head": (3, 1)},
    )
    assert cfg == twin
    assert hash(cfg) == hash(twin)


@pytest.mark.parametrize("field", ["stage_boundaries", "activation_checkpointing"])
def test_module_path_lists_are_checked_alike(field):
    """Both fields take a list of distinct, non-empty module paths and store a tuple."""
    assert getattr(wh.Config(**{field: ["blocks.1", "blocks.3"]}), field) == ("blocks.1", "blocks.3")
    for bad in (["blocks.1", ""], [3], "blocks.1" if field == "stage_boundaries" else {"blocks.1": 1}):
        with pytest.raises(TypeError, match=rf"Config\({field}=.*list of module paths"):
            wh.Config(**{field: bad})
    with pytest.raises(ValueError, match=rf"Config\({field}=\['blocks.1', 'blocks.1'\]\) names a module twice"):
        wh.Config(**{field: ["blocks.1", "blocks.1"]})
