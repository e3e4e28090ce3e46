"""Sharded checkpoints under ``Config(zero_stage=1|2|3)``, resharded across plans.

Under ZeRO each rank holds, of each parameter, a slice of its flattened elements (its shard of
the optimizer state; under stage 3 of the parameter too). ``wh.checkpoint`` writes such a
slice as the few boxes it is of the parameter's shape (a partial first row, whole rows, a
partial last row; placed by the tensor-parallel shard beside it) at their global offsets, under
the local model's names, so the checkpoint is the same whatever plan saved it, and DCP's
resharding reads it into any other plan: zero 0 data parallel, a pipeline, tensor parallel,
another zero stage, another world size.

Each case trains steps 0-1 under one plan, saves, loads into a program of another plan whose
weights were scrambled, trains steps 2-3, and compares the whole state dict with the local
model trained steps 0-3 uninterrupted. Tolerance atol 5e-5 as tests/test_checkpoint.py (the
reason is in its docstring: plans differ in summation order only, ~1e-7 on a gradient, which
AdamW with eps=1e-6 can amplify at most 1e4-fold on near-zero entries; a wrong or missing
moment is off by ~lr = 1e-2).
"""

from __future__ import annotations

import pytest

from tests import ckpt_cases
from tests.test_checkpoint import _assert_state

CASE = "tests.ckpt_cases:"


@pytest.fixture(scope="module")
def gpt_ref():
    return ckpt_cases.train_local("gpt", range(4))["state"]


def _pool(world2, world4, n):
    return world2 if n == 2 else world4


@pytest.mark.parametrize(
    "src,n_src,dst,n_dst",
    [
        ("z2", 2, "dp", 2),  # zero 2 -> zero 0 data parallel
        ("z3", 2, "pp-z1", 4),  # zero 3 -> a pipeline of 2 stages x 2 replicas under zero 1, 4 ranks
        ("tp-z2", 4, "z3", 2),  # split x zero 2 on 4 ranks -> zero 3 on 2
        ("dp", 2, "z3", 2),  # zero 0 -> zero 3
        ("pp-z3", 4, "tp-z1", 4),  # a pipeline x zero 3 -> split x zero 1
    ],
)
def test_reshard_zero_gpt(world2, world4, tmp_path, gpt_ref, src, n_src, dst, n_dst):
    saved = _pool(world2, world4, n_src).run(CASE + "run", "gpt", src, str(tmp_path), steps=(0, 2), save=True)
    if "z" in src:
        _assert_written_in_slices(saved)
    if src == "z2":  # and into the local model itself, in this process (no process group)
        local = ckpt_cases.run("gpt", "local", str(tmp_path), steps=(2, 4), load=True)
        _assert_state(local["state"], gpt_ref)
    outs = _pool(world2, world4, n_dst).run(CASE + "run", "gpt", dst, str(tmp_path), steps=(2, 4), load=True)
    assert {o["loaded_step"] for o in outs} == {2}
    for out in outs:
        _assert_state(out["state"], gpt_ref)


def _assert_written_in_slices(saved: list[dict]) -> None:
    """Each rank wrote its own slices of the moments (no gather): a moment is written as chunks
    that partition it, a parameter cut by the replicas' boundary in chunks of several ranks'
    files (a data-parallel save writes each moment whole, once)."""
    import math

    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(saved[0]["saved"]).read_metadata()
    moments = {k: md for k, md in metadata.state_dict_metadata.items() if k.endswith(".exp_avg")}
    assert moments
    split = 0
    for key, md in moments.items():
        assert sum(math.prod(c.sizes) for c in md.chunks) == math.prod(md.size), key
        files = {metadata.storage_data[idx].relative_path.split("_")[2] for idx in metadata.storage_data
                 if idx.fqn == key}
        split += len(files) > 1
    assert split, "no moment was written in slices by several ranks"


def test_reshard_zero_hf(world2, tmp_path):
    """transformers GPT-2 (tied lm_head) saved under zero 3, loaded under uneven tensor parallel."""
    ref = ckpt_cases.train_local("gpt2", range(4))["state"]
    world2.run(CASE + "run", "gpt2", "z3", str(tmp_path), steps=(0, 2), save=True, asynchronous=True)
    outs = world2.run(CASE + "run", "gpt2", "tp", str(tmp_path), steps=(2, 4), load=True)
    _assert_state(outs[0]["state"], ref)


def test_flat_boxes_cover_a_slice_exactly():
    """Every slice [lo, hi) of a flattened tensor of several shapes is cut into boxes of its
    shape, each contiguous in the flat, in order, covering the slice once (<= 2 * ndim - 1)."""
    import itertools
    import math

    from whale.runtime.state.local_state import flat_boxes

    assert flat_boxes(2, 11, (3, 4)) == [(2, (0, 2), (1, 2)), (4, (1, 0), (1, 4)), (8, (2, 0), (1, 3))]
    for shape in [(3, 4), (2, 3, 5), (7,), (), (4, 1, 3)]:
        n = math.prod(shape)
        strides = [math.prod(shape[k + 1:]) for k in range(len(shape))]
        for lo, hi in itertools.combinations_with_replacement(range(n + 1), 2):
            boxes = flat_boxes(lo, hi, shape)
            assert len(boxes) <= max(1, 2 * len(shape) - 1)
            covered = []
            for start, offsets, sizes in boxes:
                flat = [sum(i * s for i, s in zip(index, strides))
                        for index in itertools.product(*(range(o, o + z) for o, z in zip(offsets, sizes)))]
                assert flat == list(range(start, start + math.prod(sizes))), (shape, lo, hi, boxes)
                covered += flat
            assert covered == list(range(lo, hi)), (shape, lo, hi, boxes)
