"""ZeRO stage 2 composed with ``Config(batch="local")`` and with ``Config(adaptive_rows=True)``.

Tolerances as tests/equivalence.py (loss rtol 1e-6; gradients rtol 1e-4, atol 1e-6; parameters
after an AdamW step atol 2e-6 on entries whose gradient is not round-off, 5% of lr on all):
the shards' gradients are the same row-weighted sums, only reduce-scattered, and the local
batches are the same rows as the global batch's cut.
"""

from __future__ import annotations

import torch
from torch.testing import assert_close

from tests.equivalence import LR, assert_equivalent

CASES = "tests.zero_compose_cases"


def test_zero2_local_batches(world2):
    outs = world2.run(f"{CASES}:local_batch", 2, row_weights=(3, 1), num_micro_batch=2)
    assert tuple(outs[0]["rows"]) == (6, 2)
    for out in outs:
        assert_equivalent(out)


def test_zero2_adaptive_rows(world2):
    outs = world2.run(f"{CASES}:adaptive", 2, adaptive_window=2, adaptive_every=1)
    rows = outs[0]["rows"]
    assert outs[0]["rows"] == outs[1]["rows"] and outs[0]["moves"], rows
    assert rows[0] == (8, 8) and rows[-1][0] >= 10, rows  # toward the 8x faster rank 0
    for out in outs:
        assert_close(torch.tensor(out["loss"]), torch.tensor(out["ref_loss"]), rtol=1e-6, atol=0)
        for step, (grads, want) in enumerate(zip(out["grads"], out["ref_grads"])):
            for name, g in want.items():
                assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=f"step {step} grad {name}")
        for step, (state, want) in enumerate(zip(out["states"], out["ref_states"])):
            for key, value in want.items():
                grad = out["ref_grads"][step].get(key)
                if grad is None:
                    assert_close(state[key], value, rtol=1e-5, atol=1e-7, msg=f"step {step} {key}")
                    continue
                ordinary = grad.abs() > 1e-5
                assert_close(state[key][ordinary], value[ordinary], rtol=0, atol=2e-6, msg=f"step {step} {key}")
                assert_close(state[key], value, rtol=0, atol=5 * LR / 100, msg=f"step {step} {key}")
