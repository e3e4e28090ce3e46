"""Cases run on every rank of a gloo pool for tests/test_zero_compose.py: ZeRO stage 2 with
``Config(batch="local")`` and with ``Config(adaptive_rows=True)``."""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

import whale as wh
from tests.equivalence import LR, train_distributed, train_reference
from tests.zero_cases import _gpt
from whale.ir.emulation import ENV_VAR


def local_batch(zero_stage: int, **config) -> dict:
    """Each rank passes only its replica's rows (``Config(batch="local")``, cut by
    ``program.local_slice``), under ZeRO: the local model's loss, gradients and parameters."""
    model, batches, loss_fn = _gpt(8)
    out = train_reference(copy.deepcopy(model), batches, loss_fn)
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],),
                             config=wh.Config(zero_stage=zero_stage, batch="local", **config))
    out.update(train_distributed(program, batches, out.pop("ref_states"), batch="local"))
    out["rows"] = program.plan.rows(8)
    return out


def adaptive(zero_stage: int, steps: int = 8, spec: str = "1:8", **config) -> dict:
    """``Config(adaptive_rows=True)`` under ZeRO with rank 1 emulated 8x slower: the rows move
    toward rank 0 while every step stays the local model's (from the reference's weights each
    step, as tests/adaptive_cases.py); the shards' gradients gathered by name."""
    model, _, loss_fn = _gpt(16)
    from examples.gpt import SyntheticCorpus

    corpus = SyntheticCorpus(64, length=4096)
    batches = [corpus.batch(16, 16, s) for s in range(steps)]
    out = train_reference(copy.deepcopy(model), batches, loss_fn)
    os.environ[ENV_VAR] = spec
    try:
        program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],),
                                 config=wh.Config(zero_stage=zero_stage, adaptive_rows=True, **config))
    finally:
        del os.environ[ENV_VAR]
    opt = torch.optim.AdamW(program.parameters(), lr=LR)
    out.update(loss=[], grads=[], states=[], rows=[])
    for step, (x, y) in enumerate(batches):
        if step:
            program.load_full_state_dict(out["ref_states"][step - 1])
        out["rows"].append(program.plan.rows(len(y)))
        out["loss"].append(program.step(x, y).item())
        out["grads"].append({k: v.clone() for k, v in
                             program.gather_full({n: p.grad for n, p in program.named_parameters()}).items()})
        opt.step()
        opt.zero_grad()
        out["states"].append({k: v.detach().clone() for k, v in program.full_state_dict().items()})
    out["moves"] = program.rebalancer.moves
    out["rank"] = dist.get_rank()
    return out
