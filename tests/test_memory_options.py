"""The planner's memory options (whale/planner/search/memory_options.py): activation
checkpointing, ZeRO and optimizer offload turned on when, and only when, the plain plan does not
fit; what they cost; the Plan carrying them (JSON round trip, old JSON)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from whale.capture import capture
from whale.ir.cluster_spec import parse_cluster
from whale.ir.plan import Plan
from whale.planner.cost.model_profile import profile_model
from whale.planner.cost.predict import CostOptions
from whale.planner.search.auto import search
from whale.planner.search.explore import NoPlanError, SearchSettings
from whale.planner.search.memory_options import (
    MemoryChoice,
    OptionCostModel,
    checkpointable_layers,
    search_with_memory,
)
from whale.planner.search.pins import Pins

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OPTIONS = CostOptions(dtype="bf16", precision="mixed", optimizer="adamw")


def _gpt(layers: int, hidden: int, heads: int, seq: int):
    sys.path.insert(0, _ROOT)
    from examples.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=50257, block_size=seq, n_layer=layers, n_head=heads, n_embd=hidden)
    with torch.device("meta"):
        model = GPT(cfg)
    return model, (torch.zeros(1, seq, dtype=torch.long, device="meta"),)


def gpt3_13b():
    """GPT-3 13B (Brown et al. 2020, Table 2.1): 40 layers, d_model 5120, 40 heads, 2048 tokens."""
    return _gpt(40, 5120, 40, 2048)


@pytest.fixture(scope="module")
def profile_13b():
    model, inputs = gpt3_13b()
    return profile_model(capture(model, inputs), 1), {n for n, _ in model.named_modules()}


def test_13b_on_8_v100_fits_only_with_options(profile_13b):
    profile, paths = profile_13b
    cluster = parse_cluster("node0=8xV100-32GB")
    with pytest.raises(NoPlanError) as plain:
        search(profile, cluster, 1536, options=_OPTIONS)
    result, choice = search_with_memory(profile, cluster, 1536, plain.value, options=_OPTIONS, pins=Pins(), settings=SearchSettings(),
                                        allowed=("checkpoint", "zero", "offload"), module_paths=paths)
    assert result.best.prediction.fits and not choice.is_plain
    # Offloading the optimizer state costs the least here: its traffic hides behind the last
    # backward almost entirely, while checkpointing adds a forward to every micro-batch.
    assert choice.offload == "optimizer", choice

    # Checkpointing alone (what parallelize may turn on): the fewest layers that fit.
    result, choice = search_with_memory(profile, cluster, 1536, plain.value, options=_OPTIONS, pins=Pins(), settings=SearchSettings(),
                                        allowed=("checkpoint",), module_paths=paths)
    names = choice.names(profile)
    assert names and all(n in paths for n in names) and len(names) < profile.num_layers
    assert result.best.prediction.fits
    fewer = dataclasses.replace(choice, checkpointed=choice.checkpointed - {max(choice.checkpointed)})
    assert not OptionCostModel(profile, cluster, _OPTIONS, fewer).predict(result.best.candidate).fits
    # Recomputing costs time: the same plan with every layer kept is faster (memory unbounded).
    def time(ch):
        return OptionCostModel(profile, cluster, _OPTIONS, ch, unlimited=True).predict(result.best.candidate).step_time

    assert time(MemoryChoice()) < time(choice)


def test_zero_divides_state_by_the_data_parallel_degree(profile_13b):
    profile, _ = profile_13b
    cluster = parse_cluster("node0=8xV100-32GB")
    pipe, cuts = ((0,), (1,), (2,), (3,)), (11, 21, 31)  # 2 replicas of a 4-rank pipeline: dp 2
    previous = OptionCostModel(profile, cluster, _OPTIONS, MemoryChoice()).replica_memory(pipe, 4, "1f1b", 768, cuts, 768)[0]
    for z in (1, 2, 3):  # each stage shards more: every rank keeps less
        zero = OptionCostModel(profile, cluster, _OPTIONS, MemoryChoice(zero_stage=z))
        memory = zero.replica_memory(pipe, 4, "1f1b", 768, cuts, 768)[0]
        assert all(y < x for x, y in zip(previous, memory)), (z, previous, memory)
        previous = memory


def test_plain_plan_fits_without_options():
    model, inputs = _gpt(4, 256, 4, 128)
    profile = profile_model(capture(model, inputs), 1)
    result = search(profile, parse_cluster("node0=2xV100-32GB"), 8, options=_OPTIONS)
    assert result.best.prediction.fits  # search_with_memory is never reached: auto_plan adds nothing
    assert checkpointable_layers(profile, None)


def test_plan_json_round_trip_and_old_json():
    plan = Plan(world_size=2, pipelines=((0,), (1,)), row_weights=(1.0, 1.0), replica_groups=((0, 1),),
                activation_checkpointing=("h.0", "h.1"), zero_stage=2, offload="optimizer")
    back = Plan.from_json(plan.to_json())
    assert back == plan
    assert "memory options: activation checkpointing of 2 module(s) (h.0, h.1); ZeRO stage 2; offload optimizer" in plan.table()
    old = json.loads(plan.to_json())
    for key in ("activation_checkpointing", "zero_stage", "offload"):
        del old[key]
    assert Plan.from_json(json.dumps(old)) == dataclasses.replace(plan, activation_checkpointing=(), zero_stage=0, offload="none")
    with pytest.raises(ValueError, match=r"Plan\(zero_stage=...\).*0, 1, 2 or 3"):
        dataclasses.replace(plan, zero_stage=4)
    with pytest.raises(ValueError, match=r"Plan\(offload=...\).*'none', 'optimizer', 'params'"):
        dataclasses.replace(plan, offload="disk")


def test_cli_plans_13b_on_8_v100_and_explains_the_options(tmp_path):
    out = tmp_path / "plan.json"
    done = subprocess.run(
        [sys.executable, "-m", "whale.cli", "plan", f"{os.path.abspath(__file__)}:gpt3_13b", "--global-batch", "1536",
         "--dtype", "bf16", "--cluster", "node0=8xV100-32GB", "--explain", "--out", str(out)],
        capture_output=True, text=True, check=False, cwd=_ROOT, env={**os.environ, "PYTHONPATH": _ROOT},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "memory options (the plain plan does not fit): offload optimizer to host memory" in done.stdout
    assert "memory options turned on (no plan fits without them):" in done.stdout
    assert "offload: optimizer state in host memory" in done.stdout and "ms per step" in done.stdout
    from whale.planner.saved_plan import load_plan

    assert load_plan(str(out)).plan.offload == "optimizer"


def test_auto_checkpointing_of_a_fixed_plan_takes_the_fewest_layers_that_fit():
    from tests.models import TinyGPT
    from whale.planner.cost.plan_cost import candidate_of
    from whale.planner.cost.predict import CostModel
    from whale.planner.search.memory_options import checkpoint_to_fit

    torch.manual_seed(0)
    model = TinyGPT(n_layer=4, n_embd=64, block_size=32)
    x = torch.randint(64, (4, 32))
    paths = {n for n, _ in model.named_modules()}
    profile = profile_model(capture(model, (x,)), 4)
    plan = Plan(world_size=1, pipelines=((0,),), row_weights=(1.0,), replica_groups=((0,),))
    cluster = parse_cluster("node0=1xV100-32GB")
    batch = 4096
    options = CostOptions()
    assert checkpoint_to_fit(plan, profile, cluster, batch, options, paths) == ()  # fits plainly
    candidate = candidate_of(plan, profile, batch)
    every = MemoryChoice(checkpointed=checkpointable_layers(profile, paths))
    plain = CostModel(profile, cluster, options).predict(candidate).rank_memory[0]
    least = OptionCostModel(profile, cluster, options, every).predict(candidate).rank_memory[0]
    assert least < plain
    # A device with room for about half the saving: some blocks, not all, and they fit.
    room = (plain + least) / 2 / cluster.devices()[0].profile.memory_bytes
    tight = CostOptions(memory_fraction=room)
    chosen = checkpoint_to_fit(plan, profile, cluster, batch, tight, paths)
    assert 0 < len(chosen) < len(every.checkpointed) and set(chosen) <= paths, chosen
    picked = MemoryChoice(checkpointed=frozenset(k for k, layer in enumerate(profile.layers) if layer.name in chosen))
    assert OptionCostModel(profile, cluster, tight, picked).predict(candidate).fits
