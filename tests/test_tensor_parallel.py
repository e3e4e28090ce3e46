"""Tensor parallelism (``split``) against the local model, on real gloo processes.

Each case trains 2 AdamW steps sharded and compares with the local model trained on the same
batches (see tests/tp_cases.py). Tolerances, fp32 throughout:

* loss: rtol 1e-6. Sharded matmuls sum their contraction in pieces (row-parallel partial sums
  all-reduced, log-sum-exp combined over ranks), so only fp32 summation order differs.
* gradients: rtol 1e-4, atol 1e-7 at the first step, gathered to the local model's names. Same
  reason; observed <= 1e-7 absolute on gradients of size ~1e-2. The second step's gradients
  are taken at parameters that already differ by the AdamW round-off below (~1e-5), so they
  get atol 1e-6 (observed <= 2e-7).
* parameters after AdamW (eps=1e-6): atol 5e-5. Adam's first steps move an entry by about
  ``lr * g / (|g| + eps)``, whose sensitivity to the gradient is at most ``lr / eps = 1e4``; the
  round-off above on near-zero gradient entries (~1e-9) becomes <= 1e-5 after two steps.

Collective counts are read with ``torch.distributed.tensor.debug.CommDebugMode`` (it sees gloo's
c10d calls) and asserted per pattern: e.g. a transformer block costs one all-reduce per
attention and one per MLP, forward and backward, as in Megatron-LM.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from tests.world import CaseError

CASES = "tests.tp_cases"

# Forward and backward collectives of one step, per model kind, any number of ranks.
COUNTS = {
    "block": ({"allreduce": 2}, {"allreduce": 2}),  # attention + MLP: one each way
    "gpt": ({"allreduce": 5, "allgather": 1}, {"allreduce": 5}),  # embedding + 2 blocks; CE; head input
    "gpt-sdpa": ({"allreduce": 4}, {"allreduce": 4}),
    "mha": ({"allreduce": 1}, {"allreduce": 1}),
    "classifier": ({"allgather": 1}, {"allreduce": 1}),  # CE statistics; the head's input grad
    "classifier-smooth": ({"allgather": 1}, {"allreduce": 1}),
    "embedding": ({"allreduce": 1}, {}),
    "moe": ({"alltoall_base": 2, "allgather": 1}, {"alltoall_base": 2, "allgather": 1}),
    "mha-masked": ({"allreduce": 2}, {}),  # + the head-averaged weights; its input needs no grad
    "variants": ({"allreduce": 3, "allgather": 1}, {"allreduce": 3}),  # 3 col/row pairs, a gathered Linear
}


def _assert_equivalent(out: dict) -> None:
    assert_close(torch.tensor(out["loss"]), torch.tensor(out["ref_loss"]), rtol=1e-6, atol=0)
    for step, (grads, ref) in enumerate(zip(out["grads"], out["ref_grads"])):
        assert set(grads) == set(ref), "gradients gathered under the local model's names"
        for name, r in ref.items():
            g = grads[name]
            if r is None:
                assert g is None or not g.any(), name
                continue
            g = torch.zeros_like(r) if g is None else g  # an expert no token reached
            assert_close(g, r, rtol=1e-4, atol=1e-7 if step == 0 else 1e-6, msg=f"step {step} grad {name}")
    assert list(out["params"]) == list(out["ref_params"])
    for name, ref in out["ref_params"].items():
        assert_close(out["params"][name], ref, rtol=0, atol=5e-5, msg=f"param {name}")


def _assert_counts(outs: list[dict], kind: str) -> None:
    for out in outs:
        for fwd, bwd in out["counts"]:
            assert (fwd, bwd) == COUNTS[kind]


@pytest.mark.parametrize(
    "kind, sizes",
    [
        ("block", None),
        ("block", {"attn": [1, 3], "mlp": [40, 88]}),
        ("gpt", {"wte": [30, 66], "h.0.attn": [3, 1], "h.0.mlp": [100, 28], "h.1.attn": [1, 3], "lm_head": [70, 26]}),
        ("gpt-sdpa", {"blocks.0.attn": [3, 1], "blocks.1.mlp": [20, 108]}),
        ("mha", None),
        ("mha", {"attn": [3, 1]}),
        ("mha-masked", {"attn": [1, 3]}),
        ("variants", {"a1": [3, 1], "m1": [10, 86], "a2": [1, 3], "lone": [5, 27]}),
        ("classifier", None),
        ("classifier", {"head": [700, 300]}),
        ("classifier-smooth", {"head": [301, 699]}),
        ("embedding", {"embed": [123, 877]}),
        ("moe", None),
        ("moe", {"moe": [4, 2]}),
    ],
    ids=["block-even", "block-uneven", "gpt-uneven", "gpt-sdpa-uneven", "mha-even", "mha-uneven", "mha-masked-uneven", "variants-uneven",
         "classifier-even", "classifier-uneven", "classifier-smooth-uneven", "embedding-uneven", "moe-even", "moe-uneven"],
)
def test_equivalence_world2(world2, kind, sizes):
    outs = world2.run(f"{CASES}:equivalence", kind, sizes)
    _assert_equivalent(outs[0])
    _assert_counts(outs, kind)
    if sizes:
        for region, given in sizes.items():
            assert outs[0]["sizes"][region] == tuple(given)
    # Only the lone Linear of "variants" is gathered, where its output leaves the split.
    assert len(outs[0]["fallbacks"]) == (kind == "variants")
    assert all(o["loss"] == outs[0]["loss"] for o in outs), "every rank computes the same loss"


def test_split_classifier_keeps_logits_sharded(world2):
    widths = [o["logits_width"] for o in world2.run(f"{CASES}:equivalence", "classifier", {"head": [700, 300]})]
    assert widths == [700, 300], "each rank holds only its classes' logits; they are never gathered"


@pytest.mark.parametrize(
    "kind, sizes",
    [
        ("gpt", {"h.0.mlp": [16, 48, 32, 32], "lm_head": [10, 30, 26, 30]}),
        ("block", None),
        ("classifier", {"head": [100, 200, 300, 400]}),
        ("moe", {"moe": [1, 2, 2, 1]}),
        ("mha", None),
    ],
    ids=["gpt-uneven", "block-even", "classifier-uneven", "moe-uneven", "mha-even"],
)
def test_equivalence_world4(world4, kind, sizes):
    outs = world4.run(f"{CASES}:equivalence", kind, sizes)
    _assert_equivalent(outs[0])
    _assert_counts(outs, kind)


def test_split_inside_replicate_2tp_x_2dp(world4):
    """2-way tensor parallel inside 2-way data parallel: shards + gradient all-reduce over DP."""
    outs = world4.run(f"{CASES}:equivalence", "gpt", {"h.0.attn": [3, 1], "lm_head": [60, 36]}, tp=2)
    _assert_equivalent(outs[0])
    assert outs[0]["loss"] == outs[1]["loss"] == outs[2]["loss"]


@pytest.mark.parametrize("kind, sizes", [("gpt", {"h.1.attn": [1, 3]}), ("moe", {"moe": [5, 1]})])
def test_full_state_dict_round_trip(world2, kind, sizes):
    assert world2.run(f"{CASES}:state_dict_round_trip", kind, sizes) == [True, True]


def test_bad_shard_sizes_name_the_region(world2):
    with pytest.raises(CaseError) as info:
        world2.run(f"{CASES}:bad_sizes")
    assert info.value.type_name == "ValueError"
    assert "shard_sizes['attn'] = [3, 3] adds up to 6 but 'attn' has 4 heads" in info.value.message
