"""Gradient clipping by the norm of the whole model's gradient, wherever its pieces are.

``torch.nn.utils.clip_grad_norm_(program.parameters(), ...)`` sees only this rank's pieces: a
pipeline rank clips by its stages' norm, a tensor-parallel rank by its shard's. Here every rank
adds up the part of the norm it alone holds: its shards' entries, a tensor a tensor-parallel
group holds whole on its first rank only, a weight tied across pipeline positions on one holder
only, and nothing on any replica but the first (replicas hold the same synchronized gradient),
except ZeRO's slices, which every replica counts (each holds its own).
One all-reduce (sum of ``|g|^p``, or max for the inf norm) gives every rank the whole norm,
and every rank scales all its gradients by the same factor, as the local model's clipping does.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .local_state import local_state

__all__ = ["clip_grad_norm"]


def clip_grad_norm(program, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
    """See :meth:`whale.runtime.program_base.ProgramBase.clip_grad_norm_`."""
    norm_type = float(norm_type)
    if not (norm_type > 0 or math.isinf(norm_type)) or math.isnan(norm_type) or norm_type == -math.inf:
        raise ValueError(f"clip_grad_norm_(norm_type={norm_type}): use a p > 0 or float('inf')")
    max_norm = float(max_norm)
    if math.isnan(max_norm) or max_norm < 0:
        raise ValueError(f"clip_grad_norm_(max_norm={max_norm}): use a number >= 0")
    named = list(program.named_parameters())
    grads = [p.grad for _, p in named if p.grad is not None]
    mine = _counted_names(program, named)
    # An empty ZeRO slice (a small parameter held by another replica) adds nothing, and has no inf norm.
    counted = [p.grad for name, p in named if p.grad is not None and name in mine and p.grad.numel()]
    device = program._device if getattr(program, "_device", None) is not None else torch.device("cpu")
    inf = math.isinf(norm_type)
    if counted:
        norms = torch.stack([torch.linalg.vector_norm(g.detach(), norm_type, dtype=torch.float32) for g in counted])
        part = norms.max().double() if inf else norms.double().pow(norm_type).sum()
    else:
        part = torch.zeros((), dtype=torch.float64)
    part = part.to(device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(part, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM)
    total = (part if inf else part.pow(1.0 / norm_type)).float()
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is non-finite ({total.item()}), so it "
            "cannot be clipped; pass error_if_nonfinite=False to clip anyway"
        )
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(g.device, g.dtype))
    return total


def _counted_names(program, named: list) -> set[str]:
    """The parameters whose gradient this rank counts in the whole norm (each entry once).

    Under ``Config(zero_stage=...)`` a parameter's gradient is split over the replicas (stage
    1: each shard's ``.grad`` is its slice of the summed gradient; 2 and 3: only that slice
    is kept), so every replica counts its own slice; what ZeRO leaves whole (weights tied
    across pipeline positions) counts on the first replica only, as without ZeRO."""
    plan = program.plan
    rank = dist.get_rank() if dist.is_initialized() else 0
    replica = plan.replica_of(rank)
    entries = local_state(program, optimizer_view=True)
    first_of_group = plan.tensor_group_of(rank)[0] == rank
    tied_holder: dict[str, bool] = {}
    for tied in program.program.tied:
        for group in tied.groups:
            holders = [r for r in group if plan.replica_of(r) == replica]
            if rank in holders:
                tied_holder[tied.name] = rank == min(holders)
    out = set()
    for name, _ in named:
        entry = entries.get(name)
        if replica != 0 and (entry is None or entry.flat is None):
            continue  # the first replica counts what every replica holds alike
        held_alone = entry is not None and entry.spec is not None  # a shard, or an expert only this rank has
        if (held_alone or first_of_group) and tied_holder.get(name, True):
            out.add(name)
    return out
