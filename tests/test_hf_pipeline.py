"""transformers models (GPT-2, BERT, Llama with grouped-query attention, T5), built small from
configs, trained data parallel and pipelined against the local model on 2 gloo ranks.

Each case (tests/hf_cases.py) compares loss, every gradient by parameter name and the
parameters after an AdamW step with the tolerances of tests/equivalence.py: fp32 throughout,
only the order of additions differs. A micro-batch's loss is the model's mean cross-entropy
over its tokens, weighted by its rows; every row holds the same number of tokens, so the
weighted sum is the local model's mean exactly up to that order (rtol 1e-6), uneven
micro-batches included. Then the state-dict round trips: the program's full state dict has
exactly the local model's keys in its order (every name of a tied weight: GPT-2's
``lm_head.weight``, T5's ``shared``/``encoder.embed_tokens``/``decoder.embed_tokens``/
``lm_head``; no non-persistent buffer: Llama's ``inv_freq``, BERT's ``position_ids``), equals
the trained parameters bit for bit, loads back into the program and into a fresh local model,
and the program keeps the non-persistent buffers it was built with.
"""

from __future__ import annotations

import pytest
import torch

from tests.equivalence import assert_equivalent

pytest.importorskip("transformers")

CASES = "tests.hf_cases"

# name -> the module path at which the second stage starts
BOUNDARY = {
    "gpt2": "transformer.h.1",
    "bert": "bert.encoder.layer.1",
    "llama": "model.layers.1",
    "t5": "decoder",  # the shared embedding is used by both stages: a tied weight across them
}


def _check(outs: list[dict]) -> None:
    placed = set()
    for out in outs:
        assert_equivalent(out, names=out["params"].keys())
        placed |= set(out["params"])
        assert out["loss"] == outs[0]["loss"], "every rank returns the global loss"
        assert out["full_keys"] == out["ref_keys"], "the local model's state-dict keys, in order"
        assert out["tied_equal"] and out["full_matches_params"] and out["fresh_equal"]
        assert out["buffers_kept"]
    assert placed == set(outs[0]["ref_params"]), f"trained on no rank: {set(outs[0]['ref_params']) - placed}"


@pytest.mark.parametrize(
    "name, form, kwargs",
    [
        ("gpt2", "tuple", {"num_micro_batch": 2}),
        ("bert", "keywords", {}),
        ("llama", "none", {"example": False}),  # data parallel needs no captured graph
        ("t5", "dict", {}),
    ],
)
def test_data_parallel(world2, name, form, kwargs):
    outs = world2.run(f"{CASES}:equivalence", name, form=form, **kwargs)
    _check(outs)
    assert outs[0]["plan"][:2] == (1, 2)


@pytest.mark.parametrize(
    "name, form, schedule, num_micro_batch, rows",
    [
        ("gpt2", "dict", "1f1b", 2, 8),
        ("gpt2", "tuple", "gpipe", 4, 8),
        ("bert", "keywords", "gpipe", 4, 8),  # attention_mask as a keyword of step()
        ("llama", "none", "gpipe", 2, 7),  # uneven micro-batches: 4 + 3 rows; attention_mask=None
        ("t5", "dict", "1f1b", 4, 8),
    ],
)
def test_pipeline(world2, name, form, schedule, num_micro_batch, rows):
    outs = world2.run(
        f"{CASES}:equivalence", name, form=form, rows=rows, schedule=schedule,
        num_micro_batch=num_micro_batch, stage_boundaries=[BOUNDARY[name]],
    )
    _check(outs)
    assert outs[0]["plan"] == (2, 1, num_micro_batch)
    if name in ("gpt2", "t5"):
        assert len(outs[0]["tied_names"][0]) == {"gpt2": 2, "t5": 4}[name]
    # Only the hidden state crosses; positions, masks and Llama's rotary cos/sin (from the
    # inv_freq buffer) are recomputed by the stage that reads them.
    assert outs[0]["received"] == [0, 1]


@pytest.mark.parametrize("config", [{}, {"stage_boundaries": [BOUNDARY["bert"]], "num_micro_batch": 2}],
                         ids=["data-parallel", "pipeline"])
def test_keyword_that_forward_does_not_take(world2, config):
    # Raised on every rank before any collective: the next step runs as if nothing happened.
    outs = world2.run(f"{CASES}:bad_keyword", "bert", **config)
    for out in outs:
        assert "'attention_maskk'" in out["message"] and "attention_mask=None" in out["message"]
    assert outs[0]["loss"] == outs[1]["loss"]


@pytest.mark.parametrize("name", ["t5"])  # an output object of two fields (logits, encoder state)
def test_pipeline_inference_returns_the_models_output(world2, name):
    outs = world2.run(f"{CASES}:inference", name, stage_boundaries=[BOUNDARY[name]], num_micro_batch=4)
    for out in outs:
        assert out["type"] == out["ref_type"]
        assert out["diff"] == 0.0  # the same kernels on the same rows: bit for bit


@pytest.mark.parametrize(
    "config",
    [
        {"stage_boundaries": ["b"], "num_micro_batch": 1},
        {"stage_boundaries": ["b"], "num_micro_batch": 2, "schedule": "gpipe"},
        {"num_micro_batch": 2},  # data parallel: 2 replicas
    ],
    ids=["pipeline-1-micro-batch", "pipeline-2-micro-batches", "data-parallel"],
)
def test_buffers_updated_in_forward(world2, config):
    # A counter and running statistics: after every step, on every rank, the local model's
    # after it ran forward on the first replica's micro-batches in order. Exact: the same rows
    # through the same kernels (with one replica and one micro-batch, the local model's step).
    outs = world2.run(f"{CASES}:updated_buffers", **config)
    for out in outs:
        assert out["untouched_by_capture"]
        for got, want in zip(out["got"], out["want"]):
            for name in want:
                assert torch.equal(got[name], want[name]), (name, got[name], want[name])


@pytest.mark.parametrize(
    "name, split",
    [("gpt2", ("transformer.h",)), ("llama", ("model.layers",)), ("bert", ("bert.encoder.layer",)),
     ("t5", ("encoder.block", "decoder.block"))],
)
def test_split_state_dicts(world2, name, split):
    # Tensor parallel by module name (2 shards): equal to the local model, and the state dicts
    # round-trip with the local model's names (GPT-2's tied head named as the local model names
    # it; Llama's inv_freq kept out of them).
    outs = world2.run(f"{CASES}:equivalence", name, split=split)
    _check(outs)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        # data parallel x pipeline: 6 rows per replica in 4 micro-batches (2, 2, 1, 1), each
        # rank passing only its replica's rows; the embedding tied to the head is summed over
        # both positions of both replicas.
        ("gpt2", {"rows": 12, "stage_boundaries": ["transformer.h.1"], "num_micro_batch": 4, "schedule": "gpipe",
                  "form": "local"}),
        # pipeline x split: each stage sharded over 2 ranks; the tied head's shards by its name.
        ("gpt2", {"split": ("transformer.h",), "stage_boundaries": ["transformer.h.1"], "num_micro_batch": 2}),
        # the encoder-decoder and the masked LM in combinations too.
        ("t5", {"rows": 8, "stage_boundaries": ["decoder"], "num_micro_batch": 2, "schedule": "1f1b"}),
        ("bert", {"split": ("bert.encoder.layer",), "stage_boundaries": ["bert.encoder.layer.1"], "num_micro_batch": 2}),
    ],
    ids=["dp2-x-pp2", "pp2-x-split2", "t5-dp2-x-pp2", "bert-pp2-x-split2"],
)
def test_four_ranks(world4, name, kwargs):
    outs = world4.run(f"{CASES}:equivalence", name, **kwargs)
    _check(outs)


# ---- pure logic, no processes ----------------------------------------------------------------


def test_step_inputs_are_read_as_the_model_takes_them():
    from whale.runtime.batch import call_inputs

    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    assert call_inputs(x) == ((x,), {})
    assert call_inputs((x, m)) == ((x, m), {})
    assert call_inputs({"input_ids": x}, {"attention_mask": m}) == ((), {"input_ids": x, "attention_mask": m})
    with pytest.raises(TypeError, match=r"\['input_ids'\] are given both"):
        call_inputs({"input_ids": x}, {"input_ids": m})


def test_a_buffer_two_stages_use_is_refused():
    from tests.hf_cases import Counting
    from whale.capture import capture
    from whale.rewrite.stage_split import assign_stages

    class ReadsStatistics(Counting):
        def forward(self, x):  # stage 0 reads the statistics stage 1 (``b``) updates
            return self.b(torch.tanh(self.a(x)) + self.b.running)

    captured = capture(ReadsStatistics(), torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"buffer 'b.running' is updated in forward and used by stages \[0, 1\]"):
        assign_stages(captured, ["b"])
    # A value read after its update is sent like any other: the counter lives in stage 0.
    class ScaledByCount(Counting):
        def forward(self, x):
            self.steps += 1
            return self.b(torch.tanh(self.a(x))) * self.steps

    stage, _ = assign_stages(capture(ScaledByCount(), torch.randn(4, 8)), ["b"])
    assert stage["copy__default"] == 0
