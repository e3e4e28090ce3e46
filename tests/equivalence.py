"""Comparing a distributed run against the local model: loss, gradients by name, parameters.

Tolerances (fp32 throughout), shared by every equivalence test:
* loss: rtol 1e-6. The distributed loss is a row-weighted sum of per-replica (per-micro-batch)
  means reduced in float64; only the order of the additions differs from the local mean.
* gradients: atol 1e-6, rtol 1e-4. Gradients are weighted by rows and summed over ranks and
  micro-batches, so only the order of fp32 additions differs (observed <= 3e-6 after a step).
* parameters after the first AdamW step (lr 1e-2): Adam's first update is
  lr * g / (|g| + 1e-8), which does not scale with the gradient, so an entry whose gradient is
  near eps (a GELU-dead unit, ~1e-8) or exactly zero in exact arithmetic (the attention key
  bias, ~1e-11 of round-off) moves by O(lr) and its round-off changes the move by up to ~5%.
  Entries with ordinary gradients (|g| > 1e-5) change by at most
  lr * 1e-8 * |dg| / |g|**2 ~ 1e-7 and must agree to 2e-6; every entry must agree to 5e-4
  (5% of lr). Later steps are compared through their loss and gradients, not their
  parameters: the O(lr) moves of the near-zero entries feed the next step.
"""

from __future__ import annotations

import torch
from torch.testing import assert_close

LR = 1e-2


def assert_equivalent(out: dict, *, names=None) -> None:
    """``out`` holds loss/grads/params and their ``ref_`` twins; ``names`` limits the parameters."""
    assert_close(torch.tensor(out["loss"]), torch.tensor(out["ref_loss"]), rtol=1e-6, atol=0)
    names = sorted(names if names is not None else out["ref_params"])
    assert names, "no parameters to compare"
    for step, (grads, ref) in enumerate(zip(out["grads"], out["ref_grads"])):
        for name in names:
            assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-6, msg=f"step {step} grad {name}")
    for name in names:
        got, want = out["params"][name], out["ref_params"][name]
        assert_close(got, want, rtol=0, atol=5 * LR / 100, msg=f"param {name}")
        ordinary = out["ref_grads"][0][name].abs() > 1e-5
        assert_close(got[ordinary], want[ordinary], rtol=0, atol=2e-6, msg=f"param {name} (ordinary entries)")


def train_reference(reference: torch.nn.Module, batches, loss_fn) -> dict:
    """The local model on the same batches: loss and gradients per step, parameters and the
    state dict after each AdamW step."""
    opt = torch.optim.AdamW(reference.parameters(), lr=LR)
    out = {"ref_loss": [], "ref_grads": [], "ref_states": []}
    for x, y in batches:
        loss = loss_fn(reference(x), y)
        loss.backward()
        out["ref_loss"].append(loss.item())
        out["ref_grads"].append({n: p.grad.clone() for n, p in reference.named_parameters()})
        opt.step()
        opt.zero_grad()
        out.setdefault("ref_params", {n: p.detach().clone() for n, p in reference.named_parameters()})
        out["ref_states"].append({k: v.clone() for k, v in reference.state_dict().items()})
    return out


def train_distributed(program, batches, ref_states, *, batch: str = "global") -> dict:
    """Step the program on the same batches. Before every step after the first, the reference's
    weights are loaded (through ``load_full_state_dict``), so each step's loss and gradients are
    compared from identical weights instead of compounding the first step's round-off."""
    opt = torch.optim.AdamW(program.parameters(), lr=LR)
    out = {"loss": [], "grads": []}
    for step, (x, y) in enumerate(batches):
        if step:
            program.load_full_state_dict(ref_states[step - 1])
        if batch == "local":
            rows = program.local_slice(len(x))
            loss = program.step(x[rows], y[rows], batch="local")
        else:
            loss = program.step(x, y)
        out["loss"].append(loss.item())
        out["grads"].append(_whole(program, {n: p.grad for n, p in program.named_parameters()}))
        opt.step()
        opt.zero_grad()
        if "params" not in out:
            out["params"] = _whole(program, {n: p.detach() for n, p in program.named_parameters()})
    return out


def _whole(program, tensors: dict) -> dict:
    """Shards gathered into whole tensors by local-model name (a program without shards: copies)."""
    gather = getattr(program, "gather_full", None)
    whole = gather(tensors) if gather is not None else tensors
    return {n: t.detach().clone() for n, t in whole.items() if n in tensors or gather is not None}
