"""Cases run on every rank of a gloo pool for the pipeline tests (see tests/world.py)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import whale as wh
from tests.equivalence import train_distributed, train_reference
from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss

_STEPS = 2


def _gpt(n_layer: int, global_batch: int):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=n_layer, n_head=2, n_embd=32)
    corpus = SyntheticCorpus(cfg.vocab_size, length=4096)
    return GPT(cfg), [corpus.batch(global_batch, cfg.block_size, s) for s in range(_STEPS)]


def equivalence(
    *,
    n_layer: int = 4,
    global_batch: int = 8,
    boundaries=None,
    annotate=None,
    schedule: str = "1f1b",
    num_micro_batch: int = 4,
    pipeline_degree=None,
    row_weights=None,
    batch: str = "global",
) -> dict:
    """Train ``_STEPS`` steps pipelined; every rank also trains the local model on the same data.

    Returns this rank's loss, gradients and parameters (by local name) and the reference's.
    """
    model, batches = _gpt(n_layer, global_batch)
    if annotate:
        wh.annotate(model, {name: [_make(k) for k in kinds] for name, kinds in annotate.items()})
    reference = copy.deepcopy(model)
    config = wh.Config(
        schedule=schedule,
        num_micro_batch=num_micro_batch,
        pipeline_degree=pipeline_degree,
        stage_boundaries=boundaries,
        row_weights=row_weights,
    )
    out = train_reference(reference, batches, lm_loss)
    program = wh.parallelize(model, loss_fn=lm_loss, example_inputs=(batches[0][0],), config=config)
    out.update(train_distributed(program, batches, out.pop("ref_states"), batch=batch))
    out["memory"] = program.memory()
    out["final"] = {n: p.detach().clone() for n, p in program.named_parameters()}
    full = program.full_state_dict()  # collective: every rank calls it
    out["full_state"] = full if dist.get_rank() == 0 else None
    return out


def _make(kind: str):
    if kind == "stage":
        return wh.stage()
    if kind.startswith("pipeline"):
        return wh.pipeline(int(kind.split(":")[1])) if ":" in kind else wh.pipeline()
    if kind == "replicate":
        return wh.replicate()
    raise ValueError(kind)
