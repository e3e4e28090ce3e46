"""Capturing transformers models as users build them: default config, keyword inputs, any rows.

Each of GPT-2, Llama (grouped-query attention), BERT and T5 is captured once per module (export
of a tiny model costs 1-3 s) from its default config (``use_cache=True``) and keyword inputs.
The checks: the user's model is untouched by capture; the graph runs on 1, 3 and 8 rows (a
pipeline's micro-batches of any size) and gives the model's own output object; the flat graph
fed by ``flatten_inputs`` and read back by ``unflatten_output`` does the same.

Outputs are compared exactly (rtol=0, atol=0): the exported graph runs the same aten ops in the
same order as eager, on the same CPU, so every bit agrees.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.fx import Graph, GraphModule
from torch.utils._pytree import tree_leaves

import whale as wh
from tests.hf_models import BUILDERS, HFCase
from whale.capture import CapturedModel, capture

pytest.importorskip("transformers")

NAMES = tuple(BUILDERS)


@dataclasses.dataclass
class Captured:
    case: HFCase
    captured: CapturedModel
    state_before: dict[str, tuple[int, torch.Tensor]]  # name -> (id, value) of every param/buffer


def _state(model: torch.nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name: (id(t), t.detach().clone()) for name, t in named}


@pytest.fixture(scope="module")
def hf() -> dict[str, Captured]:
    out = {}
    for name in NAMES:
        case = BUILDERS[name]()
        before = _state(case.model)
        out[name] = Captured(case, capture(case.model, case.inputs), before)
    return out


def flat_run(gm: GraphModule, flat: tuple) -> list:
    """Run the captured graph as a stage does: flat placeholders in, the output node's leaves out."""
    graph = Graph()
    graph.output(graph.graph_copy(gm.graph, {}))  # the default codegen: no pytree in or out
    return tree_leaves(GraphModule(gm, graph)(*flat))


@pytest.mark.parametrize("name", NAMES)
def test_capture_leaves_the_user_model_untouched(hf, name):
    c = hf[name]
    model = c.case.model
    now = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    assert [n for n, _ in now] == list(c.state_before)
    for n, t in now:
        ident, value = c.state_before[n]
        assert type(t) in (torch.Tensor, torch.nn.Parameter), f"{n} is now a {type(t).__name__}"
        assert id(t) == ident and torch.equal(t, value), f"capture changed {n}"
    # transformers' default config is kept: capture passed use_cache=False, it did not set it.
    assert getattr(model.config, "use_cache", True) is True


@pytest.mark.parametrize("name", NAMES)
def test_graph_runs_on_any_rows_and_returns_the_model_output(hf, name):
    c = hf[name]
    captured, model = c.captured, c.case.model
    assert captured.frontend == "export" and captured.fixed_rows is None
    for rows in (1, 3, 8):
        inputs = BUILDERS[name](rows=rows, seed=rows).inputs
        ref = model(**inputs, use_cache=False) if captured.input_defaults else model(**inputs)
        out = captured.unflatten_output(flat_run(captured.graph_module, captured.flatten_inputs((), inputs)))
        assert type(out) is type(ref)
        assert out.logits.shape[0] == rows
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
        # The whole graph module restores the output pytree itself, given the same inputs.
        whole = captured.graph_module(**inputs, **captured.input_defaults)
        torch.testing.assert_close(whole.logits, ref.logits, rtol=0, atol=0)


def test_default_config_is_captured_with_use_cache_false(hf):
    for name in ("gpt2", "llama", "t5"):
        captured = hf[name].captured
        assert captured.input_defaults == {"use_cache": False}
        assert "with use_cache=False (set by capture" in captured.summary()
    # BERT's forward has no use_cache parameter: nothing is added.
    assert hf["bert"].captured.input_defaults == {}


def test_flatten_inputs_takes_either_spelling_and_names_layout_changes(hf):
    captured = hf["gpt2"].captured
    x = hf["gpt2"].case.inputs["input_ids"]
    by_name = captured.flatten_inputs((), {"input_ids": x})
    assert captured.flatten_inputs((x,), {}) == by_name
    assert captured.flatten_inputs((), {"input_ids": x, "attention_mask": None}) == by_name
    assert len(by_name) == sum(n.op == "placeholder" for n in captured.graph_module.graph.nodes)
    with pytest.raises(ValueError, match=r"captured from 0 positional inputs and keyword inputs "
                                         r"\['input_ids', 'use_cache'\].*'attention_mask'"):
        captured.flatten_inputs((), {"input_ids": x, "attention_mask": torch.ones_like(x)})
    with pytest.raises(ValueError, match=r"exported with use_cache=False .* got use_cache=True"):
        captured.flatten_inputs((), {"input_ids": x, "use_cache": True})
    with pytest.raises(ValueError, match=r"returns 1 values, got 2"):
        captured.unflatten_output([x, x])


def test_bert_keyword_inputs_with_a_mask_and_a_none(hf):
    bert = hf["bert"]
    x, mask = bert.case.inputs["input_ids"], bert.case.inputs["attention_mask"]
    flat = bert.captured.flatten_inputs((x,), {"attention_mask": mask, "token_type_ids": None})
    assert [t is v for t, v in zip(flat, (x, mask))] == [True, True]


def test_required_input_given_only_in_example_kwargs(hf):
    # forward requires input_ids: an empty positional tuple plus keywords is still a whole call.
    gpt2 = hf["gpt2"]
    again = capture(gpt2.case.model, (), example_kwargs=gpt2.case.inputs)
    assert again.frontend == "export" and len(again.nodes) == len(gpt2.captured.nodes)


# ------------------------------------------------------------------------------- parallelize


@pytest.fixture
def world(monkeypatch):
    assert not dist.is_initialized(), "these tests need the test process to have no group"
    monkeypatch.setenv("WORLD_SIZE", "2")


def test_parallelize_takes_keyword_inputs_and_finds_their_rows(world):
    case = BUILDERS["bert"](rows=6)
    program = wh.parallelize(
        case.model, loss_fn=case.loss_fn,
        example_inputs={"token_type_ids": None, "attention_mask": case.inputs["attention_mask"],
                        "input_ids": case.inputs["input_ids"]},
    )
    assert program.plan.rows(6) == (3, 3)


def test_parallelize_names_a_keyword_forward_does_not_take_before_anything_else(world):
    case = BUILDERS["llama"]()
    bad = {"input_ids": case.inputs["input_ids"], "attn_mask": case.inputs["input_ids"]}
    # Checked first: the bad config below is never reached.
    with pytest.raises(ValueError) as info:
        wh.parallelize(case.model, loss_fn=case.loss_fn, example_inputs=bad, config=3)
    msg = str(info.value)
    assert "keyword input 'attn_mask' is not a parameter of LlamaForCausalLM.forward(" in msg
    assert "input_ids=None, attention_mask=None" in msg and "output_attentions" in msg
