"""Saved plans: ``whale plan ... --out plan.json`` writes a plan with what it was made for, and
``Config(plan="plan.json")`` executes it as written after checking it against the model, the
world size and the devices.

The run of a saved plan is compared with the local model under tests/equivalence.py's
tolerances (fp32; only the order of additions differs: loss rtol 1e-6, gradients rtol 1e-4 and
atol 1e-6, parameters after one AdamW step 2e-6 on entries with ordinary gradients).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import whale as wh
from tests.equivalence import assert_equivalent
from whale.cli import main
from whale.ir.plan import Plan
from whale.planner.saved_plan import (
    SavedPlan,
    device_kind,
    load_plan,
    model_digest,
    save_plan,
)

pytest.importorskip("transformers")

CASES = "tests.auto_cases"
GPT2 = "tests/auto_cases.py:gpt2_target"
GPT = "tests/auto_cases.py:gpt_target"


def _plan_file(tmp_path, name: str, *flags: str, target: str = GPT2) -> str:
    path = str(tmp_path / name)
    assert main(["plan", target, *flags, "--out", path]) == 0
    return path


@pytest.fixture(scope="module")
def gpt2_plan(tmp_path_factory) -> str:
    """GPT-2 planned by the search for this host's 2 CPUs."""
    return _plan_file(tmp_path_factory.mktemp("plans"), "gpt2.json", "--world-size", "2")


@pytest.fixture(scope="module")
def a100_plan(tmp_path_factory) -> str:
    """The examples' GPT planned for two A100s."""
    return _plan_file(tmp_path_factory.mktemp("plans"), "a100.json", "--cluster", "node0=2xA100-80GB", target=GPT)


def test_saved_plan_round_trips_and_runs_as_written(world2, gpt2_plan):
    saved = load_plan(gpt2_plan)
    assert saved.devices == ("CPU", "CPU") and saved.model_class == "GPT2LMHeadModel"
    assert saved.plan.world_size == 2 and saved.global_batch == 8
    assert load_plan(gpt2_plan) == saved and saved.to_json() == Path(gpt2_plan).read_text()
    outs = world2.run(f"{CASES}:hf_auto", "gpt2", None, 8, plan=gpt2_plan)
    for out in outs:
        assert_equivalent(out, names=out["params"].keys())
        assert Plan.from_json(out["plan_json"]) == saved.plan, "executed as written"
    assert outs[0]["printed"].startswith(f"whale: running the saved plan from {gpt2_plan}")
    assert outs[1]["printed"] == ""


def test_plan_for_another_model_is_refused(gpt2_plan):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"was made for another model: GPT2LMHeadModel with \d+ parameter "
                                         r"tensors .* but this model is Sequential with 4"):  # fmt: skip
        wh.parallelize(model, loss_fn=torch.nn.functional.mse_loss, example_inputs=(torch.randn(4, 8),),
                       config=wh.Config(plan=gpt2_plan))  # fmt: skip


def test_a_pipeline_plan_needs_example_inputs():
    from tests.auto_cases import gpt_target
    from whale.planner.schedules.generate import make_schedule

    model, _ = gpt_target()
    piped = Plan(world_size=1, pipelines=((0,),), row_weights=(1.0,), replica_groups=((0,),), num_stages=2,
                 schedule=make_schedule("interleaved_1f1b", 2, 2, 1), num_micro_batch=2,
                 stage_boundaries=("blocks.1",))  # fmt: skip
    with pytest.raises(ValueError, match="has 2 stages .* pass example_inputs="):
        wh.parallelize(model, loss_fn=torch.nn.functional.cross_entropy, config=wh.Config(plan=piped))


def test_plan_for_another_world_size_is_refused(a100_plan):
    from tests.auto_cases import gpt_target

    model, inputs = gpt_target()
    loss = torch.nn.functional.cross_entropy
    with pytest.raises(ValueError, match="is for a world of 2 ranks, but this job has 1; launch 2 processes"):
        wh.parallelize(model, loss_fn=loss, example_inputs=inputs, config=wh.Config(plan=a100_plan))
    bare = Plan(world_size=3, pipelines=((0,), (1,), (2,)), row_weights=(1.0,) * 3, replica_groups=((0, 1, 2),))
    with pytest.raises(ValueError, match=r"Config\(plan=<Plan>\) is for a world of 3 ranks, but this job has 1"):
        wh.parallelize(model, loss_fn=loss, example_inputs=inputs, config=wh.Config(plan=bare))


def test_plan_for_other_devices_is_refused_on_every_rank(world2, a100_plan):
    messages = world2.run(f"{CASES}:gpt_error", plan=a100_plan)
    for message in messages:
        assert "is for other devices (node0=2xA100-80GB; rank 0: A100-80GB, rank 1: A100-80GB)" in message, message
        assert "but this job runs on rank 0: CPU, rank 1: CPU" in message and "re-plan" in message


def test_bare_plan_json_and_malformed_files(tmp_path):
    plan = Plan(world_size=1, pipelines=((0,),), row_weights=(1.0,), replica_groups=((0,),))
    bare = tmp_path / "bare.json"
    bare.write_text(plan.to_json())
    assert load_plan(bare) == SavedPlan(plan, source=str(bare))
    model = torch.nn.Linear(4, 2)
    program = wh.parallelize(model, loss_fn=torch.nn.functional.mse_loss, example_inputs=(torch.randn(4, 4),),
                             config=wh.Config(plan=str(bare), quiet=True))  # fmt: skip
    assert program.plan == plan
    for text, match in [
        ("{not json", "is not JSON"),
        ("[1, 2]", "a plan file is a JSON object, got list"),
        (json.dumps({"format": "whale-plan", "version": 7}), "plan file version 7, this whale reads 1"),
        (json.dumps({"format": "whale-plan", "version": 1, "model": {}}), "the plan file is malformed"),
        (json.dumps({"version": 2}), "plan field\\(s\\) .* are missing"),
    ]:
        path = tmp_path / "bad.json"
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_plan(path)
    with pytest.raises(ValueError, match="cannot read the plan file"):
        load_plan(tmp_path / "missing.json")


def test_config_refuses_what_a_saved_plan_fixes():
    with pytest.raises(ValueError, match=r"fixes what Config\(cluster='auto', num_micro_batch=2\) asks for"):
        wh.Config(plan="p.json", cluster="auto", num_micro_batch=2)
    with pytest.raises(ValueError, match="auto_parallel=True"):
        wh.Config(plan="p.json", auto_parallel=True)
    with pytest.raises(TypeError, match="Config\\(plan=...\\) is the path of a plan file"):
        wh.Config(plan=3)
    wh.Config(plan="p.json", cluster="node0=2xCPU", bucket_cap_mb=4.0)  # what the plan does not fix


def test_save_is_atomic_and_out_is_checked_before_the_search(tmp_path, monkeypatch, capsys):
    model = torch.nn.Linear(4, 2)
    plan = Plan(world_size=1, pipelines=((0,),), row_weights=(1.0,), replica_groups=((0,),))
    target = tmp_path / "plan.json"

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        save_plan(target, plan, model)
    assert os.listdir(tmp_path) == [], "no half-written file, no temporary left"
    monkeypatch.undo()
    save_plan(target, plan, model)
    assert load_plan(target).digest == model_digest(model)[0]
    assert main(["plan", GPT2, "--out", str(tmp_path / "no" / "such" / "folder.json")]) == 2
    assert main(["plan", GPT2, "--out", str(tmp_path / "plan.txt")]) == 2
    err = capsys.readouterr().err
    assert "cannot write --out" in err and "end the name with .json" in err


def test_device_kind_and_digest():
    assert device_kind("CPU-slow2") == "CPU" and device_kind("CPU-slow1.9-2") == "CPU"
    assert device_kind("NVIDIA A100-SXM4-80GB") == "A100-80GB" and device_kind("my-npu") == "my-npu"
    wide, narrow = torch.nn.Linear(8, 2), torch.nn.Linear(4, 2)
    assert model_digest(wide)[0] != model_digest(narrow)[0]
    assert model_digest(wide)[1:] == (2, 18)
    assert model_digest(torch.nn.Linear(8, 2, device="meta"))[0] == model_digest(wide)[0]
