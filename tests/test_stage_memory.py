"""Only what a rank runs stays on it (issue 15, item 5): after binding, a rank of a pipeline
holds its own stages' parameters and buffers, a rank of a split part its shards, and nothing of
the rest of the model once the caller drops the local model (``model = wh.parallelize(model,
...)``). Measured as the bytes of every tensor storage alive in the rank's process
(tests/memory_cases.py) against the program's own modules' bytes: equal up to a few small
tensors that are not weights (the example batch, 4 KiB of slack). ``full_state_dict()`` still
gathers the whole local model from the stage owners, equal bit for bit to a fresh build.
"""

from __future__ import annotations

import pytest

CASES = "tests.memory_cases"
SLACK = 4096  # bytes of non-weight tensors a binding may leave alive (indices, the example)


def _check_held(outs, *, share: float) -> None:
    for out in outs:
        assert out["held"] - SLACK <= out["own"] <= out["held"], out
        assert out["own"] <= share * out["model_bytes"], f"the rank holds more than its part: {out}"
        assert out["params"] <= out["own"]
        assert out["full_equal"], "full_state_dict() is not the local model's"


def test_pipeline_rank_holds_its_stage_only(world2):
    # TinyGPT, 4 blocks cut at h.2: each rank ~half the weights (embeddings on 0, head on 1).
    outs = world2.run(f"{CASES}:held_after_binding", stage_boundaries=["h.2"], num_micro_batch=2)
    _check_held(outs, share=0.55)
    assert sum(o["own"] for o in outs) == pytest.approx(outs[0]["model_bytes"], rel=0.01)


def test_transformers_pipeline_rank_holds_its_stage_only(world2):
    # GPT-2: the tied embedding is held by both stages (it is their weight); the rest is cut.
    pytest.importorskip("transformers")
    outs = world2.run(f"{CASES}:held_after_binding", model="gpt2", stage_boundaries=["transformer.h.1"],
                      num_micro_batch=2)
    _check_held(outs, share=0.6)


def test_tensor_parallel_rank_holds_its_shards_only(world2):
    # The four MLPs split 2 ways: each rank holds the unsplit weights and half of every MLP.
    outs = world2.run(f"{CASES}:held_after_binding", split=("h.0.mlp", "h.1.mlp", "h.2.mlp", "h.3.mlp"))
    _check_held(outs, share=0.7)


def test_release_local_model_opt_in(world2):
    outs = world2.run(f"{CASES}:release_local_model", stage_boundaries=["h.2"], num_micro_batch=2)
    for out in outs:
        # Before: the caller's model keeps the other stage alive; after: only the own stage.
        assert out["with_model"] > 1.8 * out["own"]
        assert out["held"] - SLACK <= out["own"] <= out["held"]
        assert out["released"] == pytest.approx(out["with_model"] - out["held"], abs=SLACK)
        # The model object keeps this rank's tensors (shared with the program), the rest on meta.
        assert out["real"] == out["program_params"] and set(out["meta"]).isdisjoint(out["real"])
        assert out["full_equal"] and out["loss"] == outs[0]["loss"]
        assert "is not the model this program was built from" in out["wrong_model"]


def test_pipeline_of_split_stages_holds_its_shards_only(world4):
    # 2 stages x 2-way split of every MLP: a rank holds a half of its stage's MLPs.
    outs = world4.run(f"{CASES}:held_after_binding", split=("h.0.mlp", "h.1.mlp", "h.2.mlp", "h.3.mlp"),
                      stage_boundaries=["h.2"], num_micro_batch=2)
    _check_held(outs, share=0.4)
