"""Vocabulary-parallel softmax cross-entropy: the loss of a split classifier, never gathering logits.

Rank ``r`` holds the logits of classes ``[offset, offset + V_r)``. Per row it computes its local
log-sum-exp, the target's logit if the target is one of its classes, and the sum of its logits
(for label smoothing); one all-gather of these ``3 x rows`` numbers gives every rank the global
log-sum-exp and target logit (Megatron-LM uses three all-reduces for the same). The backward
``softmax - one_hot`` needs only local values: no communication.

A loss given as a function (``lm_loss`` flattening ``(B, T, V)`` logits before
``F.cross_entropy``) is traced with ``torch.fx``; when the logits reach one ``F.cross_entropy``
through reshapes only, it runs on shards with that call replaced (see :func:`parallel_loss`).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..collectives import group_size, process_group

__all__ = ["VocabParallelCrossEntropy", "parallel_loss", "vocab_parallel_cross_entropy"]

_RESHAPES = frozenset({"view", "reshape", "flatten", "contiguous", "float", "to", "type", "double"})


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, offset, num_classes, ignore_index, smoothing, group):
        z = logits.float()
        width = z.shape[-1]
        local_t = target - offset
        valid = target != ignore_index
        here = valid & (local_t >= 0) & (local_t < width)
        picked = z.gather(1, local_t.clamp(0, width - 1).unsqueeze(1)).squeeze(1)
        stats = torch.stack([torch.logsumexp(z, dim=-1), picked * here, z.sum(-1)], dim=1)
        if group_size(group) > 1:
            parts = [torch.empty_like(stats) for _ in range(group_size(group))]
            dist.all_gather(parts, stats.contiguous(), group=process_group(group))
            every = torch.stack(parts)  # (ranks, rows, 3)
            lse, target_logit, total = torch.logsumexp(every[..., 0], 0), every[..., 1].sum(0), every[..., 2].sum(0)
        else:
            lse, target_logit, total = stats[:, 0], stats[:, 1], stats[:, 2]
        loss = (1 - smoothing) * (lse - target_logit)
        if smoothing:
            loss = loss + smoothing * (lse - total / num_classes)
        loss = loss.masked_fill(~valid, 0.0)
        ctx.save_for_backward(z, lse, local_t, here, valid)
        ctx.smoothing, ctx.num_classes, ctx.dtype = smoothing, num_classes, logits.dtype
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, lse, local_t, here, valid = ctx.saved_tensors
        g = torch.exp(z - lse.unsqueeze(1))
        rows = torch.nonzero(here).squeeze(1)
        g[rows, local_t[rows]] -= 1 - ctx.smoothing
        if ctx.smoothing:
            g -= ctx.smoothing / ctx.num_classes
        g *= (grad.float() * valid).unsqueeze(1)
        return g.to(ctx.dtype), None, None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    offset: int,
    num_classes: int,
    group: dist.ProcessGroup | None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``F.cross_entropy`` over the last dim of logits sharded by class.

    Args:
        logits: ``(..., V_local)``: this rank's classes ``[offset, offset + V_local)``.
        target: ``(...)`` class ids in ``[0, num_classes)`` (or ``ignore_index``).
        offset: first class this rank holds.
        num_classes: classes over all ranks.
        group: the tensor-parallel group.
        ignore_index, reduction, label_smoothing: as ``F.cross_entropy``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"vocab_parallel_cross_entropy(reduction={reduction!r}): use 'mean', 'sum' or 'none'")
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"vocab_parallel_cross_entropy: logits {tuple(logits.shape)} (classes last) and target "
            f"{tuple(target.shape)} disagree; the target has the logits' shape without the class dim"
        )
    per_row = _VocabParallelCE.apply(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), offset, num_classes,
        ignore_index, float(label_smoothing), group,
    )
    if reduction == "none":
        return per_row.view(target.shape)
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / (target != ignore_index).sum()


@dataclasses.dataclass(frozen=True)
class VocabParallelCrossEntropy:
    """``loss(logits_shard, target)``: cross-entropy with classes on the last dim, sharded by class."""

    offset: int
    num_classes: int
    group: Any = None
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(
            logits, target, offset=self.offset, num_classes=self.num_classes, group=self.group,
            ignore_index=self.ignore_index, reduction=self.reduction, label_smoothing=self.label_smoothing,
        )


class _ShardedLoss:
    """A traced loss function run with its ``F.cross_entropy`` on shards."""

    def __init__(self, gm: torch.fx.GraphModule, ce: VocabParallelCrossEntropy, width: int) -> None:
        self.gm, self.ce, self.width = gm, ce, width

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _LossInterpreter(self).run(logits, target)


class _LossInterpreter(torch.fx.Interpreter):
    def __init__(self, loss: _ShardedLoss) -> None:
        super().__init__(loss.gm)
        self.loss = loss

    def call_method(self, target, args, kwargs):
        if target in ("view", "reshape") and args and isinstance(args[0], torch.Tensor):
            shape = list(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list)) else list(args[1:])
            if shape and shape[-1] == self.loss.ce.num_classes:
                shape[-1] = self.loss.width  # the class dim is local on this rank
            args = (args[0], *shape)
        return super().call_method(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        if target is F.cross_entropy:
            logits, tgt = args[:2]
            if logits.dim() != 2:
                raise ValueError(
                    f"the loss calls F.cross_entropy on {logits.dim()}-D logits; on a split classifier "
                    "whale needs them flattened to (rows, classes) first"
                )
            kw = dict(zip(("weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing"), args[2:]))
            kw.update(kwargs)
            ce = dataclasses.replace(
                self.loss.ce,
                ignore_index=kw.get("ignore_index", -100),
                reduction=kw.get("reduction", "mean"),
                label_smoothing=kw.get("label_smoothing", 0.0),
            )
            return ce(logits, tgt)
        return super().call_function(target, args, kwargs)


def parallel_loss(
    loss_fn: Callable | None, ce: VocabParallelCrossEntropy, width: int, output_ndim: int,
    field: str | int | None = None,
) -> Callable | None:
    """``loss_fn`` computed on logits sharded by class, or None when whale cannot tell it is cross-entropy.

    None (no loss given) and ``F.cross_entropy`` / ``nn.CrossEntropyLoss`` on 2-D logits map
    to ``ce``; a function is traced and accepted when its logits reach a single
    ``F.cross_entropy`` (without class weights) through reshapes alone. ``field``: the model
    returns an object and the logits are its ``field`` (``out.logits``, ``out["logits"]``,
    ``out[0]``); the loss must be a function that reads that field.
    """
    if field is not None:
        if loss_fn is None or loss_fn is F.cross_entropy or isinstance(loss_fn, nn.Module):
            return None
    elif loss_fn is None:
        return ce
    if loss_fn is F.cross_entropy:
        return ce if output_ndim == 2 else None
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None or output_ndim != 2:
            return None
        return dataclasses.replace(
            ce, ignore_index=loss_fn.ignore_index, reduction=loss_fn.reduction, label_smoothing=loss_fn.label_smoothing
        )
    try:
        gm = torch.fx.symbolic_trace(loss_fn)
    except Exception:  # noqa: BLE001 - any tracing failure means: not recognizably cross-entropy
        return None
    return _ShardedLoss(gm, ce, width) if _is_cross_entropy_of_logits(gm, field) else None


def _reads_field(node: torch.fx.Node, source: torch.fx.Node, field: str | int | tuple[str, str]) -> bool:
    """``out.field`` / ``out[field]``; a field given as ``("item", key)`` is read by ``out[key]`` only (a dict)."""
    readers = (getattr, operator.getitem) if not isinstance(field, tuple) else (operator.getitem,)
    key = field[1] if isinstance(field, tuple) else field
    return node.op == "call_function" and node.target in readers and node.args[0] is source and node.args[1] == key


def _is_cross_entropy_of_logits(gm: torch.fx.GraphModule, field: str | int | None = None) -> bool:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 2:
        return False
    ces = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.cross_entropy]
    if len(ces) != 1:
        return False
    weight = ces[0].args[2] if len(ces[0].args) > 2 else ces[0].kwargs.get("weight")
    if weight is not None:
        return False
    # Every use of the logits must be a reshape leading to the cross-entropy's input.
    frontier, chain = [placeholders[0]], set()
    if field is not None:
        if not all(_reads_field(u, placeholders[0], field) for u in placeholders[0].users):
            return False
        frontier = list(placeholders[0].users)
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user is ces[0] and user.args[0] is node:
                continue
            if user.op == "call_method" and user.target == "size":
                continue  # the local size is what a view on this rank needs
            if user.op != "call_method" or user.target not in _RESHAPES or user.args[0] is not node:
                return False
            chain.add(user)
            frontier.append(user)
    return True
