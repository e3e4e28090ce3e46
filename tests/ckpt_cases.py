"""Cases for checkpoints and clipping, run on every rank of a gloo pool (tests/world.py), and the
local model's reference the tests compare with (run in the test process itself).

A model kind is trained under a plan for some steps; ``run`` optionally loads a checkpoint
first and saves one after, so a test trains steps 0-1 under one plan, saves, loads under
another plan and trains steps 2-3, and compares with the local model trained steps 0-3
uninterrupted.
"""

from __future__ import annotations

import copy
import re

import torch
import torch.distributed as dist

import whale as wh
from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss
from tests import hf_models

LR = 1e-2
EPS = 1e-6  # as tests/tp_cases.py: a round-off-sized gradient must not become an lr-sized step
# GPT-2 split with uneven shards: heads 3:1, MLP columns 100:28, vocabulary rows 40:24.
HF_SPLIT = ["transformer.wte", "transformer.h", "lm_head"]
HF_SIZES = {"transformer.h.0.attn": [3, 1], "transformer.h.1.mlp": [100, 28], "lm_head": [40, 24]}


def build(kind: str):
    """(model, batches of 4 steps, loss_fn, call) for a kind; the same on every rank.
    ``call(model_or_program, x)`` is how the kind passes its inputs."""
    if kind == "gpt":
        torch.manual_seed(0)
        cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
        corpus = SyntheticCorpus(cfg.vocab_size, length=4096)
        return GPT(cfg), [corpus.batch(8, cfg.block_size, s) for s in range(4)], lm_loss, "positional"
    if kind == "gpt2":
        case = hf_models.gpt2(rows=8)
        g = torch.Generator().manual_seed(3)
        batches = [(case.inputs["input_ids"], case.target)] + [
            tuple(torch.randint(hf_models.VOCAB, (8, hf_models.SEQ), generator=g) for _ in range(2)) for _ in range(3)
        ]
        return case.model, batches, case.loss_fn, "input_ids"
    raise ValueError(kind)


def _inputs(style: str, x: torch.Tensor):
    return (x,) if style == "positional" else {"input_ids": x}


def make(kind: str, plan: str, model, batches, loss_fn, style):
    """The program of ``plan`` ("local": the model itself), annotated on ``model``."""
    if plan == "local":
        return model
    config = {}
    zero = re.search(r"z(\d)", plan)  # "z2", "pp-z1", "tp-z3": Config(zero_stage=...)
    if zero:
        config["zero_stage"] = int(zero.group(1))
    if plan.startswith("pp"):
        config.update(stage_boundaries=["blocks.1" if kind == "gpt" else "transformer.h.1"], num_micro_batch=2)
    if "tp" in plan:
        scopes = ["blocks"] if kind == "gpt" else HF_SPLIT
        wh.annotate(model, {s: wh.split(2) for s in scopes})
        if kind == "gpt2" and plan == "tp":
            config["shard_sizes"] = HF_SIZES
    example = _inputs(style, batches[0][0])
    return wh.parallelize(model, loss_fn=loss_fn, example_inputs=example, config=wh.Config(**config))


def train_local(kind: str, steps: range, clip: float | None = None) -> dict:
    """The local model trained on ``steps`` of the kind's batches, uninterrupted (the reference)."""
    model, batches, loss_fn, style = build(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    norms = []
    for i in steps:
        x, y = batches[i]
        out = model(*_inputs(style, x)) if style == "positional" else model(**_inputs(style, x))
        loss_fn(out, y).backward()
        if clip is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
        opt.step()
        opt.zero_grad()
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "norms": norms}


def run(kind: str, plan: str, path: str, *, steps: tuple[int, int], load: bool = False, save: bool = False,
        asynchronous: bool = False) -> dict:
    """Under ``plan``: load the newest checkpoint under ``path`` (into a model whose weights are
    scrambled first, so only the checkpoint can make them right), train ``steps``, save."""
    model, batches, loss_fn, style = build(kind)
    if load:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
    program = make(kind, plan, model, batches, loss_fn, style)
    opt = torch.optim.AdamW(program.parameters(), lr=LR, eps=EPS)
    out = {}
    if load:
        out["loaded_step"] = wh.checkpoint.load(path, program, opt)
    for i in range(*steps):
        x, y = batches[i]
        if plan == "local":
            pred = model(*_inputs(style, x)) if style == "positional" else model(**_inputs(style, x))
            loss_fn(pred, y).backward()
        else:
            program.step(_inputs(style, x) if style != "positional" else x, y)
        opt.step()
        opt.zero_grad()
    if save:
        saved = wh.checkpoint.save(path, program, opt, step=steps[1], asynchronous=asynchronous)
        if asynchronous:
            saved = saved.wait()
        out["saved"] = str(saved)
        if dist.is_initialized():  # what each rank wrote (DCP names its files __<rank>_*.distcp)
            dist.barrier()
            out["written"] = sum(f.stat().st_size for f in saved.glob(f"__{dist.get_rank()}_*.distcp"))
            out["optim_numel"] = sum(t.numel() for st in opt.state.values() for t in st.values() if t.dim() > 0)
    out["state"] = _full(program)
    out["rank"] = dist.get_rank() if dist.is_initialized() else 0
    return out


def _full(program) -> dict:
    if isinstance(program, torch.nn.Module):
        return {k: v.detach().clone() for k, v in program.state_dict().items()}
    return program.full_state_dict()


def clip_case(kind: str, plan: str, max_norm: float, norm_type: float) -> dict:
    """One step under ``plan``, clipped by ``program.clip_grad_norm_``: the norm and the whole
    gradients after clipping; the local model's the same way."""
    model, batches, loss_fn, style = build(kind)
    reference = copy.deepcopy(model)
    program = make(kind, plan, model, batches, loss_fn, style)
    x, y = batches[0]
    program.step(_inputs(style, x) if style != "positional" else x, y)
    norm = program.clip_grad_norm_(max_norm, norm_type)
    grads = program.gather_full({n: p.grad for n, p in program.named_parameters()})
    out = reference(*_inputs(style, x)) if style == "positional" else reference(**_inputs(style, x))
    loss_fn(out, y).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm, norm_type)
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    # Then one SGD step of the clipped gradients (the optimizer on this rank's parameters or
    # shards): the parameters must be the local model's.
    torch.optim.SGD(program.parameters(), lr=0.5).step()
    torch.optim.SGD(reference.parameters(), lr=0.5).step()
    params = program.full_state_dict()
    # Copies: a gradient's storage must outlive the program once the result is queued.
    plan_shape = (program.plan.dp_degree, program.plan.pipeline_degree, program.plan.tensor_parallel)
    return {"norm": norm.item(), "ref_norm": ref_norm.item(), "grads": _copies(grads), "ref_grads": _copies(ref_grads),
            "rank": dist.get_rank(), "plan": plan_shape, "params": _copies(params),
            "ref_params": _copies(reference.state_dict())}


def _copies(tensors: dict) -> dict:
    return {k: None if v is None else v.detach().clone() for k, v in tensors.items()}


def failing_save(path: str) -> dict:
    """Save step 2 under data parallel, then a save of step 4 that fails on rank 1 midway
    (after some of its data is written); the newest checkpoint must still be step 2's."""
    import torch.distributed.checkpoint as dcp

    model, batches, loss_fn, style = build("gpt")
    program = make("gpt", "dp", model, batches, loss_fn, style)
    opt = torch.optim.AdamW(program.parameters(), lr=LR, eps=EPS)
    for i in range(2):
        program.step(*batches[i])
        opt.step()
        opt.zero_grad()
    where = wh.checkpoint.save(path, program, opt, step=2)
    kept = {k: v.clone() for k, v in program.full_state_dict().items()}
    # What the checkpoint records (each entry once) against what the ranks wrote.
    recorded = sum(info.length for info in dcp.FileSystemReader(where).read_metadata().storage_data.values())
    written = sum(f.stat().st_size for f in where.glob("__*.distcp"))
    for i in range(2, 4):
        program.step(*batches[i])
        opt.step()
        opt.zero_grad()
    original = dcp.FileSystemWriter.write_data

    def broken(self, plan, planner):
        if dist.get_rank() == 1:
            raise OSError("disk full (injected)")
        return original(self, plan, planner)

    dcp.FileSystemWriter.write_data = broken
    try:
        wh.checkpoint.save(path, program, opt, step=4)
    except Exception as err:  # noqa: BLE001 - the test reads it
        error = f"{type(err).__name__}: {err}"
    else:
        error = None
    finally:
        dcp.FileSystemWriter.write_data = original
    dist.barrier()
    fresh, _, _, _ = build("gpt")
    program2 = make("gpt", "dp", fresh, batches, loss_fn, style)
    opt2 = torch.optim.AdamW(program2.parameters(), lr=LR, eps=EPS)
    step = wh.checkpoint.load(path, program2, opt2)
    now = program2.full_state_dict()
    import os

    return {"error": error, "step": step, "same": all(torch.equal(now[k], kept[k]) for k in kept),
            "entries": sorted(os.listdir(path)), "written": written, "recorded": recorded}


def bad_load(path: str, what: str) -> None:
    """Load under data parallel what is not a checkpoint of this model; raises."""
    model, batches, loss_fn, style = build("gpt")
    if what == "other":
        cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=3, n_head=4, n_embd=48)
        model = GPT(cfg)
    program = make("gpt", "dp", model, batches, loss_fn, style)
    wh.checkpoint.load(path, program, torch.optim.AdamW(program.parameters()))


def resume_example(argv: list[str]) -> None:
    """examples/resume_training.py's main on the pool's ranks (as torchrun would run it: one
    thread per rank, gloo), for an uninterrupted run to compare a resumed one with."""
    from examples.resume_training import main

    main(argv)

