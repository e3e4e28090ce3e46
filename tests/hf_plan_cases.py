"""Cases run on every rank of a gloo pool (tests/world.py): the plan ``Config(auto_parallel=True)``
chooses for a transformers model (tests/hf_models.py) executes and equals the local model.

Each case trains the local model one AdamW step and the program ``parallelize`` builds from the
planner's best plan one step on the same batch, and returns what
``tests.equivalence.assert_equivalent`` compares (this rank's parameters, shards gathered) with
the plan as JSON, so a failure names the plan that did not run.
"""

from __future__ import annotations

import copy

import torch

import whale as wh
from tests.equivalence import LR, _whole
from tests.hf_cases import BUILDERS


def _reference(model, inputs, target, loss_fn) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    loss = loss_fn(model(**inputs), target)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}  # not the frozen
    out = {"ref_loss": [loss.item()], "ref_grads": [grads]}
    opt.step()
    out["ref_params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def auto_equivalence(names: tuple[str, ...], cluster: str, rows: int = 8, split: dict | None = None) -> dict:
    """For each model: the auto plan on ``cluster``, one step against the local model;
    ``split`` maps a model name to the module path annotated ``wh.split()`` in it.

    Returns ``{name: out}`` with ``out`` as ``assert_equivalent`` takes it plus ``"plan"`` (the
    plan's JSON); a model whose plan fails to build or step returns ``{"error": ..., "plan": ...}``
    so that one report covers every model.
    """
    results = {}
    for name in names:
        case = BUILDERS[name](rows=rows)
        if split and name in split:
            wh.annotate(case.model, {split[name]: wh.split()})
        out = _reference(copy.deepcopy(case.model), case.inputs, case.target, case.loss_fn)
        plan_json = None
        try:
            program = wh.parallelize(
                case.model, loss_fn=case.loss_fn, example_inputs=case.inputs,
                config=wh.Config(auto_parallel=True, cluster=cluster),
            )  # fmt: skip
            plan_json = program.plan.to_json()
            opt = torch.optim.AdamW(program.parameters(), lr=LR)
            loss = program.step(case.inputs, case.target)
            out["loss"] = [loss.item()]
            out["grads"] = [_whole(program, {n: p.grad for n, p in program.named_parameters() if p.requires_grad})]
            opt.step()
            out["params"] = _whole(program, {n: p.detach() for n, p in program.named_parameters()})
        except Exception as err:  # noqa: BLE001 - reported per model, with the plan
            out = {"error": f"{type(err).__name__}: {err}"}
        out["plan"] = plan_json
        results[name] = out
    return results
