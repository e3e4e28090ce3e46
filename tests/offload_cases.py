"""Cases run on every rank of a gloo pool (tests/world.py) for ``Config(offload=...)``."""

from __future__ import annotations

import copy
import os
import tempfile

import torch

import whale as wh
from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss
from tests.equivalence import LR, train_reference

_STEPS = 3


def _gpt(rows: int):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=3, n_head=2, n_embd=32)
    corpus = SyntheticCorpus(cfg.vocab_size, length=4096)
    batches = [corpus.batch(rows, cfg.block_size, s) for s in range(_STEPS)]
    return GPT(cfg), [((x,), {}, y) for x, y in batches], lm_loss


def _hf(name: str, rows: int):
    from tests.hf_models import BUILDERS

    case = BUILDERS[name](rows=rows)
    batches = [(case.inputs, case.target)] * _STEPS
    return case.model, [((), dict(x), y) for x, y in batches], case.loss_fn


def _run(program, batches, opt, probe=None) -> dict:
    out = {"loss": [], "params": [], "resident": []}
    for args, kwargs, y in batches:
        loss = program.step(args if args else kwargs, y)
        if probe is not None:
            program.offload.on_layer = lambda layer: out["resident"].append(sum(probe()))
        opt.step()
        if probe is not None:  # before anything reads the state or parameters back
            out["after"] = (sum(probe()), sum(program.offload.resident_param_bytes()))
        opt.zero_grad()
        out["loss"].append(loss.item())
        # The local model's names and shapes (ZeRO's program.parameters() are shards).
        out["params"].append({n: t.detach().clone() for n, t in program.full_state_dict().items()})
    out["state"] = {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()}
    return out


def train(mode: str, model_name: str = "gpt", pipeline: bool = False, zero: int = 0) -> dict:
    """Train ``_STEPS`` AdamW steps with ``Config(offload=mode)`` and without, from the same
    weights and batches, and the local model one step; report what the test compares."""
    model, batches, loss_fn = _gpt(8) if model_name == "gpt" else _hf(model_name, 8)
    local = copy.deepcopy(model)
    plain_model = copy.deepcopy(model)
    args, kwargs, _ = batches[0]
    example = args if args else kwargs
    bounds = {"stage_boundaries": ["blocks.1"]} if pipeline else {}
    bounds["zero_stage"] = zero  # the offloaded state is then this rank's shard's
    with tempfile.TemporaryDirectory() as directory:
        config = wh.Config(offload=mode, offload_dir=directory, **bounds)
        program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=example, config=config)
        plain = wh.parallelize(plain_model, loss_fn=loss_fn, example_inputs=example, config=wh.Config(**bounds))
        opt = torch.optim.AdamW(program.parameters(), lr=LR)
        opt_plain = torch.optim.AdamW(plain.parameters(), lr=LR)
        off = program.offload
        got = _run(program, batches, opt, probe=lambda: off.resident_state_bytes(opt))
        want = _run(plain, batches, opt_plain)
        files_during = os.listdir(directory)
        layer_bytes = [sum(v.numel() * v.element_size() for p in layer for v in opt.state[p].values() if v.dim())
                       for layer in off.layers]
        result = {
            "mode": mode,
            "layers": off.layer_names,
            "loss_equal": got["loss"] == want["loss"],
            "params_equal": all(
                torch.equal(a[n], b[n]) for a, b in zip(got["params"], want["params"]) for n in b
            ),
            "state_equal": got["state"].keys() == want["state"].keys() and all(
                torch.equal(got["state"][i][k], want["state"][i][k]) for i in want["state"] for k in want["state"][i]
            ),
            "state_bytes": off.state_bytes(opt),
            "layer_bytes": layer_bytes,
            "resident_during_step": got["resident"],
            "resident_after_step": got["after"][0],
            "param_resident_after_step": got["after"][1],
            "state_is_tier": all(
                any(v is view for blk, _ in off._state[opt].values() for view in blk.views)
                for p in program.parameters() for v in opt.state[p].values() if v.numel() and v.dim()
            ),  # (an empty ZeRO shard has nothing to offload)
            "files_during": files_during,
        }
        if not pipeline:
            ref = train_reference(local, [(a[0], y) for a, _, y in batches[:1]], loss_fn) if args else None
            if ref is not None:
                result["ref_loss"] = ref["ref_loss"][0]
                result["loss0"] = got["loss"][0]
                result["max_param_diff"] = max(
                    (got["params"][0][n] - ref["ref_params"][n]).abs().max().item() for n in ref["ref_params"]
                )
        off.close()
        result["files_after_close"] = os.listdir(directory)
        # After close the program trains on, its state back in ordinary memory.
        batch_args, batch_kwargs, y = batches[0]
        program.step(batch_args if batch_args else batch_kwargs, y)
        opt.step()
    return result


def checkpoint_roundtrip(root: str) -> dict:
    """Save a checkpoint with offloaded state, load it into a new offloaded program, compare."""
    model, batches, loss_fn = _gpt(8)
    fresh = copy.deepcopy(model)
    (x,), _, y = batches[0]
    config = wh.Config(offload="optimizer")
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(x,), config=config)
    opt = torch.optim.AdamW(program.parameters(), lr=LR)
    for (x,), _, y in batches[:2]:
        program.step(x, y)
        opt.step()
        opt.zero_grad()
    wh.checkpoint.save(root, program, opt, step=2)
    other = wh.parallelize(fresh, loss_fn=loss_fn, example_inputs=(x,), config=config)
    opt2 = torch.optim.AdamW(other.parameters(), lr=LR)
    step = wh.checkpoint.load(root, other, opt2)
    loaded_equal = all(
        torch.equal(opt.state[p][k], opt2.state[q][k])
        for p, q in zip(program.parameters(), other.parameters()) for k in opt.state[p]
    )
    params_loaded = all(torch.equal(p, q) for p, q in zip(program.parameters(), other.parameters()))
    # One more step each: the loaded state moves into the tier and training goes on alike.
    (x,), _, y = batches[2]
    for prog, o in ((program, opt), (other, opt2)):
        prog.step(x, y)
    grads_equal = all(torch.equal(p.grad, q.grad) for p, q in zip(program.parameters(), other.parameters()))
    groups_equal = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in opt2.param_groups]
    for o in (opt, opt2):
        o.step()
    return {
        "params_loaded": params_loaded, "grads_equal": grads_equal, "groups_equal": groups_equal,
        "groups": (opt.param_groups[0].get("lr"), opt2.param_groups[0].get("lr"), len(opt.param_groups), len(opt2.param_groups)),
        "step": step,
        "loaded_equal": loaded_equal,
        "after_equal": all(torch.equal(p, q) for p, q in zip(program.parameters(), other.parameters())),
        "tier_bytes": other.offload.state_bytes(opt2),
    }
