"""The planner's memory options (whale/planner/search/memory_options.py): activation
checkpointing, ZeRO and optimizer offload turned on when, and only when, the plain plan does not
fit; what they cost; the Plan carrying them (JSON round trip, old JSON)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
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


def test_reusing_the_plain_search_finds_the_same_plan(profile_13b):
    """auto_plan hands its plain search to search_with_memory (its structures, bounds and memos
    of times): the same plan, to the float, as a search that starts afresh; a plain search of
    something else is refused."""
    from whale.planner.cost.predict import CostModel
    from whale.planner.search.explore import Explorer

    profile, paths = profile_13b
    cluster = parse_cluster("node0=8xV100-32GB")
    plain = Explorer(profile, cluster, 1536, _OPTIONS, Pins(), SearchSettings())
    with pytest.raises(NoPlanError) as err:
        plain.run()
    kwargs = dict(options=_OPTIONS, pins=Pins(), settings=SearchSettings(), allowed=("checkpoint", "zero", "offload"),
                  module_paths=paths)  # fmt: skip
    fresh, fresh_choice = search_with_memory(profile, cluster, 1536, err.value, **kwargs)
    reused, reused_choice = search_with_memory(profile, cluster, 1536, err.value, base=plain, **kwargs)
    assert (reused.best, reused_choice, reused.alternatives) == (fresh.best, fresh_choice, fresh.alternatives)
    other = Explorer(profile, cluster, 768, _OPTIONS, Pins(), SearchSettings())
    with pytest.raises(ValueError, match="base searches another"):
        search_with_memory(profile, cluster, 1536, err.value, base=other, **kwargs)
    with pytest.raises(ValueError, match="share_times"):
        CostModel(profile, cluster, _OPTIONS).share_times(CostModel(profile, cluster, CostOptions()))


def test_choices_searched_beside_each_other_find_the_plan_searched_in_turn(profile_13b, monkeypatch):
    """Two choices at a time run in a forked child beside this process (forked.both) where a
    second core is free; on one core they run here one after the other. The same plan, to the
    float, and the same alternatives either way; the forked child's layouts come back as the
    search's own objects."""
    from whale.planner import forked

    profile, paths = profile_13b
    cluster = parse_cluster("node0=2xV100-32GB,node1=2xT4")
    with pytest.raises(NoPlanError) as err:
        search(profile, cluster, 1536, options=_OPTIONS)
    kwargs = {"options": _OPTIONS, "pins": Pins(), "settings": SearchSettings(),
              "allowed": ("checkpoint", "zero", "offload"), "module_paths": paths}  # fmt: skip
    forks, fork = [], os.fork

    def recording_fork():
        pid = fork()
        forks.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", recording_fork)
    beside, beside_choice = search_with_memory(profile, cluster, 1536, err.value, **kwargs)
    assert len(forks) == (1 if forked.can_fork() else 0)  # one pair of choices
    monkeypatch.setattr(forked, "can_fork", lambda: False)
    in_turn, in_turn_choice = search_with_memory(profile, cluster, 1536, err.value, **kwargs)
    assert (beside.best, beside_choice, beside.alternatives) == (in_turn.best, in_turn_choice, in_turn.alternatives)


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
    # The fastest plan over the choices without ZeRO 3 (ZeRO 3 only where none fits): ZeRO 1
    # with offload, 9 min 23 s predicted (offload alone: 9 min 26 s; ZeRO 3 with offload, which
    # zero3="any" picks, 8 min 51 s).
    line = next(x for x in done.stdout.splitlines() if x.startswith("memory options (the plain plan does not fit)"))
    assert line.endswith("offload optimizer to host memory") and "ZeRO stage 3" not in line, line
    assert "memory options turned on (no plan fits without them):" in done.stdout
    assert "offload: optimizer state in host memory" in done.stdout
    # What each option costs reads in a person's units (format_seconds), not as 1.2e+04 ms.
    costs = re.findall(r"; costs (.+?) per step \([+-][\d.]+%\)$", done.stdout, re.MULTILINE)
    assert costs and all(re.fullmatch(r"[+-][\d.]+ (us|ms|s)|[+-]\d+ (min \d+ s|h \d+ min)", c) for c in costs), costs
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


# --- pruning the choices of options: none that could have won is skipped ----------------------


def _tight_instances(count: int, seed: int):
    """Small instances (2 device types, 2-4 devices, 4-6 layers) whose plain plan does not fit
    but some memory option may: memory scaled so the states alone overflow a plain replica."""
    import random

    from tests.test_search import DEVICES, _instance

    rnd = random.Random(seed)
    out = []
    while len(out) < count:
        a_type, b_type = rnd.sample(DEVICES[:5], 2)
        a = rnd.randint(1, 3)
        b = rnd.randint(1, 4 - a)
        gib = rnd.choice([1, 2, 4])
        layers = [(rnd.uniform(1e10, 1e12), gib * 2**30, rnd.uniform(1e8, 4e9), rnd.uniform(0, 1e8),
                   rnd.uniform(1e6, 1e7)) for _ in range(rnd.randint(4, 6))]  # fmt: skip
        cluster, profile, batch = _instance(f"{a}x{a_type},{b}x{b_type}", rnd.randint(2, 8), layers)
        # Usable memory: 30-90% of what a replica's plain states need.
        share = rnd.uniform(0.3, 0.9) * 16 * sum(x[1] for x in layers) / (a + b) / max(d.profile.memory_bytes for d in cluster.devices())
        options = CostOptions(memory_fraction=min(0.95, share))
        try:
            search(profile, cluster, batch, options=options)
        except NoPlanError as err:
            out.append((cluster, profile, batch, options, err))
    return out


def _every_choice(profile) -> list[MemoryChoice]:
    """All 15 non-empty combinations of checkpointing (every layer), ZeRO 1-3 and offload."""
    every = checkpointable_layers(profile, None)
    return [MemoryChoice(checkpointed=c, zero_stage=z, offload=o)
            for c in (frozenset(), every) for z in (0, 1, 2, 3) for o in ("none", "optimizer")
            if c or z or o != "none"]  # fmt: skip


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_pruned_choices_could_not_have_won():
    """The pruned search (dominated choices dropped, memory floors, bounds with recomputation,
    cutoffs from the best plan so far) is as fast as a full search under every choice; with
    ``zero3="last"`` (the default), as fast as every choice without ZeRO 3 where one fits."""
    from whale.planner.search.explore import Explorer

    planned, zero3 = 0, 0
    for cluster, profile, batch, options, err in _tight_instances(10, seed=4):
        reference = {}
        for choice in _every_choice(profile):
            explorer = Explorer(profile, cluster, batch, options, Pins(), SearchSettings(),
                                costs=OptionCostModel(profile, cluster, options, choice))
            try:
                reference[choice] = explorer.run().best.prediction.step_time
            except NoPlanError:
                pass
        without = [t for c, t in reference.items() if c.zero_stage < 3]
        for mode, bar in (("any", min(reference.values(), default=None)), ("last", min(without or reference.values(), default=None))):
            try:
                result, choice = search_with_memory(profile, cluster, batch, err, options=options, pins=Pins(),
                                                    settings=SearchSettings(), allowed=("checkpoint", "zero", "offload"), zero3=mode)
            except NoPlanError:
                assert bar is None, (cluster, reference)
                continue
            planned += mode == "any"
            zero3 += mode == "any" and choice.zero_stage == 3
            assert result.best.prediction.fits
            again = OptionCostModel(profile, cluster, options, choice).predict(result.best.candidate)
            assert again.fits and again.step_time == pytest.approx(result.best.prediction.step_time, rel=1e-12)
            assert result.best.prediction.step_time <= bar * (1 + 1e-9), (mode, cluster, choice, reference)
            if mode == "last" and without:
                assert choice.zero_stage < 3
    assert planned >= 5 and zero3  # most instances fit under some choice; ZeRO 3 wins some


def test_bound_with_recomputation_stays_below_every_plan():
    """:meth:`SearchSpace.bound` with checkpointing's recomputation is below the exact step of
    every cut of every structure (memory unbounded, so every cut has a time)."""
    import itertools

    import numpy as np

    from whale.planner.cost.predict import Candidate
    from whale.planner.search.explore import Explorer

    for cluster, profile, batch, options, _ in _tight_instances(4, seed=5):
        every = MemoryChoice(checkpointed=checkpointable_layers(profile, None))
        costs = OptionCostModel(profile, cluster, options, every, unlimited=True)
        explorer = Explorer(profile, cluster, batch, options, Pins(), SearchSettings(), costs=costs)
        explorer.recomputed = np.array([float(x.total_flops) if k in every.checkpointed else 0.0
                                        for k, x in enumerate(profile.layers)])  # fmt: skip
        plain = Explorer(profile, cluster, batch, options, Pins(), SearchSettings(), costs=costs)
        n = profile.num_layers
        raised = 0
        for st in explorer.structures():
            dp = st.layout.dp_degree
            rows = tuple(batch // dp + (i < batch % dp) for i in range(dp))
            if min(rows) < st.num_micro_batch:
                continue
            raised += st.bound > plain.bound(st.layout, st.num_stages, st.num_micro_batch) * (1 + 1e-6)
            for cuts in itertools.combinations(range(1, n), st.num_stages - 1):
                c = Candidate(st.layout, st.num_stages, st.schedule, st.num_micro_batch, cuts, rows)
                assert costs.predict(c).step_time >= st.bound * (1 - 1e-9), (cluster, st, cuts)
        assert raised  # recomputation raises the bound: it prunes more than the plain one


def test_zero_3_keeps_the_last_bucket_of_the_sync():
    """ZeRO 3's sync is 1.5 all-reduces and still ends with the last bucket (never faster than ZeRO 2)."""
    from tests.test_search import _instance
    from whale.planner.search.rank_layouts import layouts

    cluster, profile, _ = _instance("4xA100-80GB", 4, [(1e11, 2**30, 1e8, 1e6, 1e6)] * 4)
    layout = next(iter(layouts(cluster, 1, 2)))
    two = OptionCostModel(profile, cluster, _OPTIONS, MemoryChoice(zero_stage=2)).sync_time(layout, 2, (2,))
    three = OptionCostModel(profile, cluster, _OPTIONS, MemoryChoice(zero_stage=3)).sync_time(layout, 2, (2,))
    assert three.tail == two.tail and any(two.tail)
    assert list(three) == pytest.approx([1.5 * t for t in two])
