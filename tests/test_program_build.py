"""The rewrite builds each rank's DistributedProgram before any process group exists, and a
Plan read back from JSON is complete: its schedule is the one the runtime executes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import whale as wh
from examples.gpt import GPT, GPTConfig
from whale.capture import capture
from whale.ir.plan import Plan
from whale.planner.schedules.generate import make_schedule
from whale.rewrite.build import ProgramRewrite
from whale.rewrite.tensor_parallel.modules import ColumnParallelLinear


def _lm(logits, y):
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


@pytest.fixture
def gpt_pipeline_split(monkeypatch):
    """A 4-rank plan: 2 stages x 2-way split, GPT with its head tied to the embedding."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16))
    wh.annotate(model, {"blocks": wh.split(2)})
    x = torch.randint(32, (4, 8))
    program = wh.parallelize(model, loss_fn=_lm, example_inputs=x,
                             config=wh.Config(stage_boundaries=["blocks.1"], num_micro_batch=2))
    return model, x, program


def test_every_rank_program_is_built_without_a_process_group(gpt_pipeline_split):
    model, x, program = gpt_pipeline_split
    assert not dist.is_initialized()
    plan = program.plan
    rewrite = ProgramRewrite(model, capture(model, (x,)), plan, _lm)
    for rank in range(plan.world_size):
        built = rewrite.build(plan, rank)
        local = [s.index for s in built.local_stages]
        assert local == list(plan.stages_at(plan.position_of(rank)))
        # Stage modules arrive sharded; the communication is named by ranks, not groups.
        assert built.tensor_group.ranks == plan.tensor_group_of(rank)
        assert set(built.tensor_groups) == {(0, 1), (2, 3)}
        (stage,) = built.local_stages
        fc = stage.module.get_submodule(f"blocks.{stage.index}.mlp.fc")
        assert isinstance(fc, ColumnParallelLinear) and fc.weight.shape[0] == 32
        # The tied embedding/head is summed over the positions holding it, per tensor index.
        (tied,) = built.tied
        assert tied.name == "wte.weight" and tied.groups == ((0, 2), (1, 3))
    with pytest.raises(RuntimeError, match="no process group yet"):
        _ = rewrite.build(plan, 0).tensor_group.process_group


def test_rank_outside_the_plan_is_refused(gpt_pipeline_split):
    model, x, program = gpt_pipeline_split
    rewrite = ProgramRewrite(model, capture(model, (x,)), program.plan, _lm)
    with pytest.raises(ValueError, match="rank 4 is outside the plan's world of 4"):
        rewrite.build(program.plan, 4)


def test_plan_from_json_carries_the_schedule(gpt_pipeline_split):
    model, x, program = gpt_pipeline_split
    plan = program.plan
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.schedule == make_schedule("1f1b", 2, 2)
    built = ProgramRewrite(model, capture(model, (x,)), again, _lm).build(again, 3)
    assert built.plan.schedule.actions == plan.schedule.actions


def _edited(plan: Plan, **changes) -> str:
    data = json.loads(plan.to_json())
    data.update(changes)
    return json.dumps(data)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"world_size": "4"}, r"plan field 'world_size' is malformed"),
        ({"colour": 1}, r"\['colour'\] are unknown"),
        ({"schedule": ["rank 0: 0F0 0XX0"]}, r"plan field 'schedule' is malformed: .*0XX0"),
        ({"schedule": None}, r"Plan\(schedule=...\): a plan of 2 stages needs its Schedule"),
        ({"pipelines": [[0, 2], [1, 1]]}, r"Plan\(pipelines=...\)"),
        ({"row_weights": [1.0, 1.0]}, r"Plan\(row_weights=...\): 2 weights for 1 replicas"),
        ({"version": 1}, r"plan format version must be 2"),
    ],
)
def test_plan_from_json_names_the_bad_field(gpt_pipeline_split, changes, message):
    plan = gpt_pipeline_split[2].plan
    with pytest.raises(ValueError, match=message):
        Plan.from_json(_edited(plan, **changes))


def test_plan_from_json_refuses_what_is_not_a_plan():
    with pytest.raises(ValueError, match="not: Expecting value"):
        Plan.from_json("plan?")
    one = {"version": 2, "world_size": 1, "pipelines": [[0]], "row_weights": [1.0]}
    with pytest.raises(ValueError, match=r"field\(s\) \['replica_groups'\] are missing"):
        Plan.from_json(json.dumps(one))
    with pytest.raises(ValueError, match=r"plan field 'num_stages' is malformed: None is not an int"):
        Plan.from_json(json.dumps({**one, "replica_groups": [[0]], "num_stages": None}))
    assert Plan.from_json(json.dumps({**one, "replica_groups": [[0]]})).num_stages == 1


def test_tensor_parallel_check_answers_with_the_rewrites_reason():
    from tests.hf_models import llama
    from whale.rewrite.build import tensor_parallel_check

    case = llama()
    assert tensor_parallel_check(case.model, capture(case.model, case.inputs)) is None  # no split()
    wh.annotate(case.model, {"model.layers": wh.split()})
    check = tensor_parallel_check(case.model, capture(case.model, case.inputs))
    assert check(2) is None
    assert "only 2" in check(4)  # 2 kv heads: whole kv groups per rank
