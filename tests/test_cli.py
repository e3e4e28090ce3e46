"""``whale plan`` and ``whale profile`` on the examples, and their errors (in-process, no GPU).

Each CLI case calls ``whale.cli.main`` directly (a subprocess per case would cost seconds of
imports); one case runs the installed entry point through ``python -m whale.cli`` to check the
command line itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import tomllib
import torch
from torch import nn

from whale.cli import main
from whale.ir.cluster_spec import load_cluster, parse_cluster
from whale.ir.devices import load_profiles
from whale.ir.plan import Plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT = os.path.join(ROOT, "examples", "gpt.py")
CNN = os.path.join(ROOT, "examples", "cnn.py")
BENCH = os.path.join(ROOT, "benchmarks", "bench_planner.py")


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_prints_the_per_device_table_and_explains(capsys):
    code, out, err = _run(capsys, "plan", GPT, "--cluster", "node0=2xA100-80GB,node1=2xV100-32GB",
                          "--global-batch", "64", "--explain")  # fmt: skip
    assert code == 0, err
    assert "ranks  device" in out and "A100-80GB" in out and "V100-32GB" in out
    assert "predicted step" in out and "memory GiB" in out and "busy s" in out
    assert "why:" in out and "best rejected alternatives:" in out and "search:" in out


def test_plan_json_round_trips_and_keeps_pins(capsys):
    code, out, err = _run(capsys, "plan", GPT, "--cluster", "4xT4", "--global-batch", "32",
                          "--pipeline-degree", "2", "--micro-batches", "4", "--json")  # fmt: skip
    assert code == 0, err
    plan = Plan.from_json(out)
    assert plan.world_size == 4 and plan.pipeline_degree == 2 and plan.num_micro_batch == 4
    assert sum(plan.rows(32)) == 32 and len(plan.stage_boundaries) == plan.num_stages - 1
    _, out, _ = _run(capsys, "plan", GPT, "--cluster", "4xT4", "--json", "--explain")
    data = json.loads(out)
    assert set(data) == {"plan", "report"} and data["report"]["step_time"] > 0


def test_world_size_without_cluster_is_the_homogeneous_default(capsys):
    code, out, err = _run(capsys, "plan", CNN, "--world-size", "4")
    assert code == 0, err
    assert "4 devices" in out and out.count("CPU") >= 4


def big_mlp():
    """A 4-layer MLP of 4 x 2^15 x 2^15 fp32 weights (16 GiB) on the meta device."""
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(2**15, 2**15) for _ in range(4)])
    return model, (torch.zeros(8, 2**15, device="meta"),)


def test_a_cluster_too_small_names_the_missing_memory_and_where(capsys):
    # 16 GiB of fp32 weights -> 64 GiB with gradients and Adam states; two T4 hold 28.8 GiB.
    code, _, err = _run(capsys, "plan", "tests.test_cli:big_mlp", "--cluster", "2xT4")
    assert code == 2
    assert "fits on no plan" in err
    assert "GiB on rank" in err and "(T4)" in err and "GiB missing there" in err


def test_gpt3_175b_plans_on_meta_without_weights(capsys):
    # 96 layers, d_model 12288, on 16 GPUs: the states alone (2.8 TB) exceed 16 x 80 GB.
    code, _, err = _run(capsys, "plan", f"{BENCH}:gpt3_175b", "--cluster", "a0=8xA100-80GB,v0=8xV100-32GB",
                          "--global-batch", "64", "--dtype", "bf16")  # fmt: skip
    assert code == 2 and "fits on no plan" in err and "GiB missing there" in err


def _returns_a_module_only():
    return nn.Linear(2, 2)


def _raises():
    raise RuntimeError("no data here")


def _returns_no_batch():
    return nn.Linear(2, 2), ("text",)


@pytest.mark.parametrize(
    "target, message",
    [
        ("missing_file.py", r"no file missing_file.py"),
        ("no_such_package.mod:fn", r"cannot import 'no_such_package.mod'"),
        ("tests.test_cli:nothing_here", r"has no function nothing_here\(\)"),
        ("tests.test_cli:_returns_a_module_only", r"must return \(model, example_inputs\).*got Linear"),
        ("tests.test_cli:_raises", r"_raises\(\) raised RuntimeError\('no data here'\)"),
        ("tests.test_cli:_returns_no_batch", r"no tensor input with a batch dimension"),
    ],
)
def test_bad_targets_are_named(capsys, target, message):
    code, _, err = _run(capsys, "plan", target, "--cluster", "2xT4")
    assert code == 2
    assert pytest.importorskip("re").search(message, err), err


def test_contradicting_pins_are_rejected(capsys):
    code, _, err = _run(capsys, "plan", GPT, "--cluster", "4xT4", "--stages", "3", "--pipeline-degree", "2")
    assert code == 2 and "--stages 3" in err and "--pipeline-degree 2" in err and "contradict" in err
    code, _, err = _run(capsys, "plan", GPT, "--cluster", "4xT4", "--tensor-parallel", "3")
    assert code == 2 and "--tensor-parallel 3" in err and "admit no plan" in err


def test_profile_writes_a_profile_the_planner_reads(capsys, tmp_path):
    out_file = tmp_path / "measured.json"
    code, _, err = _run(capsys, "profile", "--quick", "--out", str(out_file))
    assert code == 0, err
    profiles = load_profiles(out_file)
    (profile,) = profiles.values()
    assert profile.source.startswith("measured") and profile.peak("fp32") > 0
    cluster = parse_cluster(f"2x{profile.name}", profiles=profiles)
    assert cluster.nodes[0].device == profile
    code, _, err = _run(capsys, "plan", GPT, "--cluster", f"2x{profile.name}", "--profiles", str(out_file))
    assert code == 0, err


def links_case():
    from whale.planner.measure import profile_here

    _, cluster, links = profile_here(quick=True)
    return cluster.world_size, sorted(links), links["all_reduce"].bandwidth > 0, cluster.nodes[0].intra_link


def test_profile_measures_links_between_ranks(world2, tmp_path):
    results = world2.run("tests.test_cli:links_case")
    world, names, positive, intra = results[0]
    assert world == 2 and names == ["all_reduce", "p2p"] and positive
    assert intra is not None and intra.bandwidth > 0  # the measured ring, as the node's link


def test_link_fit_doctest():
    import doctest

    from whale.planner import measure

    assert doctest.testmod(measure).failed == 0


def test_the_console_script_is_declared_and_runs():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as file:
        assert tomllib.load(file)["project"]["scripts"]["whale"] == "whale.cli:main"
    done = subprocess.run([sys.executable, "-m", "whale.cli", "plan", "--help"], capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 0 and "--cluster" in done.stdout and "--explain" in done.stdout


def test_cluster_files_work_too(capsys, tmp_path):
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"nodes": [{"device": "A100-80GB", "count": 2}, {"device": "T4", "count": 2}]}))
    assert load_cluster(path).world_size == 4
    code, _, err = _run(capsys, "plan", GPT, "--cluster", f"@{path}", "--global-batch", "16")
    assert code == 0, err


_SPLIT_GPT = """
import torch
import whale as wh
from examples.gpt import GPT, GPTConfig


def whale_target():
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32))
    wh.annotate(model, {"blocks": wh.split(2), "lm_head": wh.split(2)})
    return model, (torch.randint(64, (8, 16)),)
"""


def test_plan_on_a_mixed_workstation_shows_uneven_shards(capsys, tmp_path):
    spec = "node0=1xA100-80GB+1xT4"
    code, out, err = _run(capsys, "plan", GPT, "--cluster", spec, "--global-batch", "32", "--tensor-parallel", "2")
    assert code == 0, err
    assert "0.707 of tp 2" in out and "0.293 of tp 2" in out  # the A100 takes more
    target = tmp_path / "split_gpt.py"
    target.write_text(_SPLIT_GPT)
    code, out, err = _run(capsys, "plan", str(target), "--cluster", spec, "--tensor-parallel", "2", "--json")
    assert code == 0, err
    plan = Plan.from_json(out)
    assert dict(plan.shard_sizes)["lm_head"] == (45, 19)
    _, out, _ = _run(capsys, "plan", str(target), "--cluster", spec, "--tensor-parallel", "2")
    assert "shard sizes of 'lm_head' by tensor index: [45, 19]" in out
