"""A model export cannot trace, every strategy: tests.models.RoutedLM loops over the experts its
rows were routed to, so capture makes each RoutedExperts one opaque call (tests/test_capture.py)
and the strategies that need a graph cut and run around it. On 2 gloo ranks, each rank's rows
reach other experts; loss, gradients by name (None where the local model has none) and
parameters after an AdamW step equal the local model's, with the tolerances of
tests/equivalence.py (fp32, only the order of additions differs)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

CASES = "tests.dp_cases"


@pytest.mark.parametrize(
    "config",
    [
        {"stage_boundaries": ["blocks.1"], "num_micro_batch": 2},  # GPipe-free default: 1F1B
        {"stage_boundaries": ["blocks.2"], "num_micro_batch": 4, "schedule": "gpipe"},
        # Each unit gathered and reduced in an order every rank shares, whichever experts its
        # rows reached (a unit per expert, or reducing a unit once its parameters all have
        # gradients, paired different collectives across ranks and hung).
        {"zero_stage": 3},
        {"activation_checkpointing": ["blocks.1"]},
    ],
    ids=["pipeline", "gpipe-uneven", "zero3", "checkpointed"],
)
def test_a_model_with_an_opaque_call_equals_the_local_model(world2, config):
    for out in world2.run(f"{CASES}:routed_lm", **config):
        assert_close(torch.tensor(out["loss"]), torch.tensor(out["ref_loss"]), rtol=1e-6, atol=0)
        for step, (grads, ref) in enumerate(zip(out["grads"], out["ref_grads"])):
            held = set(grads)  # a pipeline rank holds its stage's parameters
            assert held and held <= set(ref), step
            for n in held:
                if ref[n] is None:
                    assert grads[n] is None, f"step {step} grad {n}"
                else:
                    assert_close(grads[n], ref[n], rtol=1e-4, atol=1e-6, msg=f"step {step} grad {n}")
        unused = [n for n, g in out["ref_grads"][0].items() if g is None]
        assert unused == [] or all(n.startswith("blocks.") for n in unused)
        for n, p in out["ref_params"][0].items():
            assert_close(out["params"][0][n], p, rtol=0, atol=5e-4, msg=n)
