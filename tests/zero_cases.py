"""Cases run on every rank of a gloo pool (see tests/world.py) for the ZeRO tests."""

from __future__ import annotations

import copy

import torch

import whale as wh
from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss
from tests.equivalence import LR, train_distributed, train_reference

_STEPS = 3


def _gpt(global_batch: int, n_layer: int = 2):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=n_layer, n_head=2, n_embd=32)
    corpus = SyntheticCorpus(cfg.vocab_size, length=4096)
    batches = [corpus.batch(global_batch, cfg.block_size, s) for s in range(_STEPS)]
    return GPT(cfg), batches, lm_loss


def hf_equivalence(name: str, zero_stage: int, **config) -> dict:
    """A transformers model under ZeRO against the local model (as tests/hf_cases.py), with
    the shards' gradients and parameters gathered."""
    from tests.hf_cases import _batches, _step, _train_reference
    from tests.hf_models import BUILDERS

    case = BUILDERS[name](rows=8)
    batches = _batches(case)
    out = _train_reference(copy.deepcopy(case.model), batches, case.loss_fn)
    program = wh.parallelize(case.model, loss_fn=case.loss_fn, example_inputs=case.inputs,
                             config=wh.Config(zero_stage=zero_stage, **config))
    opt = torch.optim.AdamW(program.parameters(), lr=LR)
    out.update(loss=[], grads=[])
    for step, (inputs, target) in enumerate(batches):
        if step:
            program.load_full_state_dict(out["ref_states"][step - 1])
        out["loss"].append(_step(program, inputs, target, "dict").item())
        out["grads"].append(program.gather_full({n: p.grad for n, p in program.named_parameters()}))
        opt.step()
        opt.zero_grad()
        if "params" not in out:
            out["params"] = program.gather_full({n: p.detach() for n, p in program.named_parameters()})
    del out["ref_states"]
    out["memory"] = memory(program, opt_shards(program))
    return out


def equivalence(kind: str, global_batch: int, zero_stage: int, split: tuple[str, ...] = (), **config) -> dict:
    """The local model and the program on the same batches (see tests/equivalence.py), then
    three more steps without reloading, against the same program with zero_stage=0.
    ``split``: module paths annotated ``wh.split(2)`` (tensor parallel beside ZeRO)."""
    model, batches, loss_fn = _gpt(global_batch)
    if split:
        wh.annotate(model, {path: wh.split(2) for path in split})
    reference, plain_model = copy.deepcopy(model), copy.deepcopy(model)
    out = train_reference(reference, batches, loss_fn)
    cfg = wh.Config(zero_stage=zero_stage, **config)
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],), config=cfg)
    out.update(train_distributed(program, batches, out.pop("ref_states")))
    out["rows"] = program.plan.rows(global_batch)
    # Several steps in a row, each from the last's weights, against whale without ZeRO.
    plain = wh.parallelize(plain_model, loss_fn=loss_fn, example_inputs=(batches[0][0],),
                           config=wh.Config(zero_stage=0, **config))
    plain.load_full_state_dict(program.full_state_dict())
    runs = []
    for prog in (program, plain):
        opt = torch.optim.AdamW(prog.parameters(), lr=LR)
        losses = []
        for x, y in batches:
            losses.append(prog.step(x, y).item())
            opt.step()
            opt.zero_grad()
        runs.append((losses, prog.full_state_dict()))
    out["steps_loss"], out["plain_steps_loss"] = runs[0][0], runs[1][0]
    out["steps_state"], out["plain_steps_state"] = runs[0][1], runs[1][1]
    out["memory"] = memory(program, opt_shards(program))
    return out


def opt_shards(program) -> dict:
    """An AdamW on the program's parameters after one step (lr 0: nothing moves): its state's
    elements."""
    opt = torch.optim.AdamW(program.parameters(), lr=0.0)
    for p in program.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return {"opt_numel": sum(t.numel() for s in opt.state.values() for t in s.values() if t.dim())}


def memory(program, extra: dict) -> dict:
    """This rank's elements: optimizer-facing parameters, full parameters resident now (this
    rank's own: its tensor-parallel shards, its pipeline stages)."""
    full = [p for _, p in _full_parameters(program)]
    resident = sum(p.untyped_storage().nbytes() // p.element_size() for p in full)
    total = sum(p.numel() for p in full)
    # A weight tied across pipeline stages stays whole (its tied group sums it).
    whole = sum(p.numel() for p in program.parameters() if any(p is q for q in full))
    return {"shard_numel": sum(p.numel() for p in program.parameters()), "resident_numel": resident,
            "model_numel": total, "unsharded_numel": whole, **extra}


def _full_parameters(program):
    if hasattr(program, "module"):
        return list(program.module.named_parameters())
    return list(program._params.items())


def full_model_optimizer(zero_stage: int) -> None:
    """Bad input: an optimizer on the model's own parameters under ZeRO, caught at its step."""
    model, batches, loss_fn = _gpt(8)
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],),
                             config=wh.Config(zero_stage=zero_stage))
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    program.step(*batches[0])
    opt.step()


def pipeline_equivalence(zero_stage: int) -> dict:
    """Two stages x two replicas of uneven rows (4 ranks), each stage's data group sharded."""
    model, batches, loss_fn = _gpt(8, n_layer=2)
    reference = copy.deepcopy(model)
    out = train_reference(reference, batches, loss_fn)
    cfg = wh.Config(zero_stage=zero_stage, stage_boundaries=["blocks.1"], num_micro_batch=2, row_weights=(3, 1))
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],), config=cfg)
    out.update(train_distributed(program, batches, out.pop("ref_states")))
    out["plan"] = (program.plan.num_stages, program.plan.dp_degree)
    out["memory"] = memory(program, opt_shards(program))
    return out


def collectives(zero_stage: int) -> dict:
    """Collectives of one step after the first (its sync of the updated shards included)."""
    import torch.distributed as dist

    model, batches, loss_fn = _gpt(8, n_layer=3)
    cfg = wh.Config(zero_stage=zero_stage, bucket_cap_mb=0.02, first_bucket_cap_mb=0.02)
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],), config=cfg)
    opt = torch.optim.AdamW(program.parameters(), lr=LR)
    program.step(*batches[0])
    opt.step()
    calls: dict[str, int] = {}
    from whale.runtime.process_group import FLAT_COLLECTIVES

    real = {name: getattr(dist, name) for name in ("all_reduce", *FLAT_COLLECTIVES.values())}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return real[name](*args, **kwargs)
        return call

    peak = [0]
    if zero_stage == 3:  # full parameters held while each block runs (after its prefetch)
        def record(module, args, output):
            peak[0] = max(peak[0], program._reducer.resident_numel())

        for block in model.blocks:
            block.register_forward_hook(record)
    for name in real:
        setattr(dist, name, counting(name))
    try:
        program.step(*batches[1])
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    reducer = program._reducer
    units = len(reducer.units) if zero_stage == 3 else len(reducer.parts)
    sizes = {"root": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("blocks.")),
             "block": sum(p.numel() for p in model.blocks[0].parameters()),
             "model": sum(p.numel() for p in model.parameters())}
    return {"calls": calls, "units": units, "peak": peak[0], **sizes}
