"""Cases run on every rank of a gloo pool (see tests/world.py) for tests/test_adaptive_rows.py.

Each case trains a model under ``Config(adaptive_rows=True)`` with one rank emulated slower
(``WHALE_EMULATE_SLOWDOWN``) and, on every rank, the local model on the same batches; before
every step after the first, the reference's state (weights and buffers) is loaded into the
program, so each step is compared from identical weights, whatever rows it ran with.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

import whale as wh
from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss
from tests.equivalence import LR
from whale.ir.emulation import ENV_VAR


def _build(kind: str, rows: int, steps: int):
    """(model, batches of (inputs, target), loss_fn) for ``kind``."""
    torch.manual_seed(0)
    if kind == "gpt":
        cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
        corpus = SyntheticCorpus(cfg.vocab_size, length=4096)
        return GPT(cfg), [corpus.batch(rows, cfg.block_size, s) for s in range(steps)], lm_loss
    from tests.hf_models import BUILDERS

    case = BUILDERS[kind](rows=rows)
    batches = [({k: v.roll(3 * s, dims=0) for k, v in case.inputs.items()}, case.target.roll(3 * s, dims=0))
               for s in range(steps)]
    return case.model, batches, case.loss_fn


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _rows_of(inputs, rows: slice):
    return {k: v[rows] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[rows]


def equivalence(kind: str, *, spec: str = "1:8", rows: int = 16, steps: int = 8, batch: str = "global",
                **config) -> dict:
    """``steps`` AdamW steps under ``Config(adaptive_rows=True, **config)`` with ranks slowed
    by ``spec``, against the local model: per step the rows each replica ran, the loss, the
    gradients by name, the parameters and buffers after the optimizer step, with the local
    model's twins; and the program's moves."""
    model, batches, loss_fn = _build(kind, rows, steps)
    reference = copy.deepcopy(model)
    opt = torch.optim.AdamW(reference.parameters(), lr=LR)
    ref = {"loss": [], "grads": [], "states": []}
    for inputs, target in batches:
        loss = loss_fn(_call(reference, inputs), target)
        loss.backward()
        ref["loss"].append(loss.item())
        ref["grads"].append({n: p.grad.clone() for n, p in reference.named_parameters()})
        opt.step()
        opt.zero_grad()
        ref["states"].append({k: v.clone() for k, v in reference.state_dict().items()})
    os.environ[ENV_VAR] = spec
    try:
        program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=batches[0][0],
                                 config=wh.Config(adaptive_rows=True, **config))
    finally:
        del os.environ[ENV_VAR]
    opt = torch.optim.AdamW(program.parameters(), lr=LR)
    out = {"loss": [], "grads": [], "states": [], "rows": []}
    for step, (inputs, target) in enumerate(batches):
        if step:
            program.load_full_state_dict(ref["states"][step - 1])
        out["rows"].append(program.plan.rows(len(target)))
        if batch == "local":
            mine = program.local_slice(len(target))
            loss = program.step(_rows_of(inputs, mine), target[mine], batch="local")
        else:
            loss = program.step(inputs, target)
        out["loss"].append(loss.item())
        out["grads"].append({n: p.grad.detach().clone() for n, p in program.named_parameters()})
        opt.step()
        opt.zero_grad()
        out["states"].append({k: v.detach().clone() for k, v in program.full_state_dict().items()})
    out["ref"] = ref
    out["moves"] = program.rebalancer.moves
    balancer = program.rebalancer.balancer
    out["estimate"] = {"costs": balancer.costs(), "noise": balancer.noise(), "window": [list(c) for c in balancer._costs]}
    out["rank"] = dist.get_rank()
    return out


def pipeline_refused() -> str:
    """``Config(adaptive_rows=True)`` on a model with stage() annotations: parallelize raises."""
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    wh.annotate(model, {"blocks.0": wh.stage(), "blocks.1": wh.stage()})
    x, _ = SyntheticCorpus(cfg.vocab_size, length=256).batch(8, cfg.block_size, 0)
    try:
        wh.parallelize(model, loss_fn=lm_loss, example_inputs=(x,), config=wh.Config(adaptive_rows=True))
    except ValueError as err:
        return str(err)
    return ""
