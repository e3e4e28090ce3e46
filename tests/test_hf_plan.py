"""The planner on transformers models (GPT-2, Llama with grouped-query attention, BERT, T5, built
small from configs): what it proposes is what the runtime runs.

* Layers begin at module boundaries: blocks (``model.layers.3``) and the modules beside them,
  never between the projections of an MLP or inside an attention; every layer the planner may
  begin a stage at is a boundary the rewrite's stage split accepts (in graph order, only
  tensors crossing: T5's encoder and decoder included).
* Plans are executable: tensor parallelism only where the model has ``split()`` parts the
  rewrite can shard, degrees that divide the world, micro-batches no more than rows, stages no
  more than places to begin one.
* The best plans ``Config(auto_parallel=True)`` picks on 2 and 4 CPU ranks (and on 4 with the
  blocks of GPT-2 and Llama annotated ``split()``) run and equal the local model after an AdamW
  step (tests/hf_plan_cases.py), with the tolerances of tests/equivalence.py: fp32, only the
  order of additions differs.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

pytest.importorskip("transformers")

import whale as wh  # noqa: E402
from tests.equivalence import assert_equivalent  # noqa: E402
from tests.hf_models import BUILDERS, SEQ, capture_case  # noqa: E402
from whale.capture import module_annotation_map  # noqa: E402
from whale.cli import main  # noqa: E402
from whale.ir.cluster_spec import parse_cluster  # noqa: E402
from whale.planner.cost.model_profile import profile_model  # noqa: E402
from whale.planner.search.auto import auto_plan  # noqa: E402
from whale.planner.search.pins import Pins  # noqa: E402
from whale.rewrite.stage_split import assign_stages, split_stages  # noqa: E402

NAMES = ("gpt2", "llama", "bert", "t5")
CASES = "tests.hf_plan_cases"

LAYERS = {
    "gpt2": ["transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h.0", "transformer.h.1",
             "transformer.ln_f", "lm_head"],
    "llama": ["model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1", "model.norm", "lm_head"],
    "bert": ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "cls"],
    "t5": ["encoder.embed_tokens", "encoder.dropout", "encoder.block.0", "encoder.block.1",
           "encoder.final_layer_norm", "decoder.embed_tokens", "decoder.dropout", "decoder.block.0",
           "decoder.block.1", "decoder.final_layer_norm", "lm_head"],
}  # fmt: skip


@pytest.fixture(scope="module")
def captured():
    """name -> (case, captured model): one capture per model for the pure tests."""
    out = {}
    for name in NAMES:
        case = BUILDERS[name]()
        out[name] = (case, capture_case(case))
    return out


def _plan(case, cap, cluster: str, batch: int = 8, **kwargs):
    cl = parse_cluster(cluster)
    scopes = dict(module_annotation_map(case.model))
    return auto_plan(cap, scopes, cl.world_size, wh.Config(auto_parallel=True), cluster=cl,
                     global_batch=batch, example_rows=8, **kwargs)  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_layers_are_whole_modules_and_every_start_is_a_boundary_the_split_accepts(captured, name):
    case, cap = captured[name]
    profile = profile_model(cap, 8)
    assert [layer.name for layer in profile.layers] == LAYERS[name]
    starts = [layer.name for layer in profile.layers[1:] if layer.cuttable]
    assert starts, "somewhere to begin a second stage"
    for boundary in starts:  # each alone: graph order, a computing stage, only tensors crossing
        stage, num = assign_stages(cap, (boundary,))
        split_stages(cap, stage, num)
    # Several at once, in graph order, as a plan lists them.
    stage, num = assign_stages(cap, tuple(starts))
    assert len(split_stages(cap, stage, num)) == len(starts) + 1


@pytest.mark.parametrize("name", NAMES)
def test_a_tied_weight_is_held_by_every_layer_that_reads_it(captured, name):
    # torch.export gives a tied weight (GPT-2's embedding and head) one placeholder: every layer
    # that reads it holds it (a stage holding any of them keeps a copy, and the copies' gradients
    # are summed), so the profile lists it as shared and prices its sum across stages.
    case, cap = captured[name]
    profile = profile_model(cap, 8)
    by_tensor: dict[int, list[str]] = {}
    for pname, param in case.model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(pname)
    shared = {p: {profile.layers[k].name for k in layers} for p, _, layers in profile.shared_params}
    across = []
    for names in (names for names in by_tensor.values() if len(names) > 1):
        # The layers of the modules that own the tied copies (BERT's prediction bias is tied to
        # its decoder's inside one layer: nothing to sum across stages).
        owners = {layer.name for layer in profile.layers for n in names if n.startswith(layer.name + ".")}
        found = [p for p in shared if p in names]
        if len(owners) > 1:
            across.append(names)
            assert len(found) == 1 and shared[found[0]] == owners, (names, shared, owners)
        else:
            assert not found, (names, shared)
    assert len(shared) == len(across)
    assert bool(across) == (name != "llama")  # the test's Llama keeps its head untied


def test_no_stage_boundary_sends_the_swiglu_intermediate():
    # A Llama whose MLP is 4x wide: the old grouping began layers at gate/up/down, and the
    # search could cut there, sending the 4x intermediate. Now every place a stage may begin
    # sends less than that intermediate, and the plans pick blocks.
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    case = BUILDERS["llama"]()
    case.model = transformers.LlamaForCausalLM(cfg)
    cap = capture_case(case)
    profile = profile_model(cap, 8)
    intermediate = 128 * SEQ * 4  # bytes per row of one fp32 gate (or up) output
    cuts = [c for layer, c in zip(profile.layers, profile.cut_bytes) if layer.cuttable][1:]
    assert cuts and max(cuts) < intermediate
    starts = {layer.name for layer in profile.layers if layer.cuttable}
    assert not any(".mlp" in b or ".self_attn" in b for b in starts)
    for cluster in ("node0=4xCPU", "node0=8xCPU", "node0=8xA100-80GB"):
        for stages in (2, 4):
            plan, _ = _plan(case, cap, cluster, batch=16, extra_pins=Pins(num_stages=stages))
            assert len(plan.stage_boundaries) == stages - 1
            assert set(plan.stage_boundaries) <= starts, plan.stage_boundaries


@pytest.mark.parametrize("name", NAMES)
def test_proposed_plans_are_executable(captured, name):
    case, cap = captured[name]
    profile = profile_model(cap, 8)
    places = sum(layer.cuttable for layer in profile.layers[1:])
    for cluster, batch in (("node0=2xCPU", 6), ("node0=4xCPU", 8), ("node0=8xCPU", 8),
                           ("node0=2xA100-80GB,node1=2xV100-32GB", 8)):  # fmt: skip
        plan, report = _plan(case, cap, cluster, batch=batch)
        world = plan.world_size
        assert plan.tensor_parallel == 1, "no split() parts: the runtime shards nothing"
        assert report.executable
        assert world % (plan.dp_degree * plan.tensor_parallel) == 0
        assert min(plan.rows(batch)) >= plan.num_micro_batch >= 1
        assert plan.num_stages - 1 <= places
        if plan.num_stages > 1:
            assert len(plan.stage_boundaries) == plan.num_stages - 1
            stage, num = assign_stages(cap, plan.stage_boundaries)
            split_stages(cap, stage, num)


def test_a_graph_export_fixed_to_its_rows_gets_data_parallel_only(captured):
    # parallelize refuses stages or shards over such a graph unless every micro-batch has its
    # rows; the planner proposes plain data parallel, which runs the model itself.
    case, cap = captured["bert"]
    fixed = dataclasses.replace(cap, fixed_rows=8)
    for cluster in ("node0=2xCPU", "node0=4xCPU"):
        # The batch-dynamic graph gets a pipeline (its stage count is the cost model's call),
        # so keeping the fixed-rows graph whole is the planner's doing, not the cost model's.
        assert _plan(case, cap, cluster)[0].num_stages >= 2
        plan, _ = _plan(case, fixed, cluster)
        assert (plan.num_stages, plan.tensor_parallel) == (1, 1)


def test_tensor_parallel_only_in_degrees_the_rewrite_accepts(captured):
    case = BUILDERS["llama"]()
    wh.annotate(case.model, {"model.layers": wh.split()})
    cap = capture_case(case)
    refused = "2 kv heads cannot form 4 groups"  # what the rewrite's analysis says for 4 ranks

    def check(degree):
        return None if degree == 2 else refused

    plan, _ = _plan(case, cap, "node0=4xA100-80GB", tensor_parallel_check=check)
    assert plan.tensor_parallel == 2
    with pytest.raises(ValueError, match=refused):
        _plan(case, cap, "node0=4xA100-80GB", tensor_parallel_check=check, extra_pins=Pins(tensor_parallel=4))


_TARGET = """
import whale as wh
from tests.hf_models import BUILDERS


def whale_target():
    case = BUILDERS[{name!r}]()
    wh.annotate(case.model, {split!r})
    return case.model, case.inputs
"""


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_whale_plan_takes_keyword_inputs_and_proposes_no_tensor_parallel_without_split(capsys, tmp_path, name):
    target = tmp_path / f"hf_{name}.py"
    target.write_text(_TARGET.format(name=name, split={}))
    code = main(["plan", str(target), "--cluster", "node0=4xA100-80GB", "--global-batch", "64", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    plan = json.loads(out.out)
    assert plan["tensor_parallel"] == 1
    assert all(any(b == n for n in LAYERS[name]) for b in plan["stage_boundaries"])


def _check_world(outs: list[dict], names=NAMES) -> str:
    summary = []
    for name in names:
        placed = set()
        for rank, out in enumerate(outs):
            got = out[name]
            assert "error" not in got, f"{name} rank {rank}: {got['error']}\nplan: {got['plan']}"
            assert_equivalent(got, names=got["params"].keys())
            placed |= set(got["params"])
        assert placed == set(outs[0][name]["ref_params"]), f"{name}: parameters trained on no rank"
        plan = json.loads(outs[0][name]["plan"])
        summary.append(f"{name}: {plan['num_stages']} stages {plan['stage_boundaries']}, "
                       f"{plan['num_micro_batch']} micro-batches")  # fmt: skip
    return "; ".join(summary)


def test_best_plans_run_on_two_ranks(world2):
    _check_world(world2.run(f"{CASES}:auto_equivalence", NAMES, "node0=2xCPU"))


def test_best_plans_run_on_four_ranks(world4):
    _check_world(world4.run(f"{CASES}:auto_equivalence", NAMES, "node0=4xCPU"))


def test_whale_plan_shards_grouped_query_attention_only_where_kv_heads_divide(capsys, tmp_path):
    # Llama's 2 kv heads: the rewrite refuses 4 shards, so 4 devices get tp 2 (x dp 2), not 4.
    target = tmp_path / "hf_llama_split.py"
    target.write_text(_TARGET.format(name="llama", split={"model.layers": "SPLIT"}).replace("'SPLIT'", "wh.split()"))
    code = main(["plan", str(target), "--cluster", "node0=4xA100-80GB", "--global-batch", "64", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert json.loads(out.out)["tensor_parallel"] == 2
    code = main(["plan", str(target), "--cluster", "node0=4xA100-80GB", "--tensor-parallel", "4"])
    assert code == 2 and "only 2 heads" in capsys.readouterr().err


def test_best_plans_with_split_parts_run_on_four_ranks(world4):
    # With split() on the blocks the search may shard them; the plans it picks (tensor
    # parallel 2 x data parallel 2: Llama's 2 kv heads allow no more) run and equal the local
    # model (shards gathered by name).
    split = {"llama": "model.layers", "gpt2": "transformer.h"}
    outs = world4.run(f"{CASES}:auto_equivalence", tuple(split), "node0=4xCPU", split=split)
    _check_world(outs, names=tuple(split))
    for name in split:
        assert json.loads(outs[0][name]["plan"])["tensor_parallel"] == 2
