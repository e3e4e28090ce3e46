"""BatchNorm over the global batch of a data-parallel step (``Config(sync_batch_norm=True)``).

Each replica holds some rows of the global batch (uneven rows are normal: ``Config.row_weights``).
A local BatchNorm normalizes each replica's rows by that replica's statistics; the local model
normalizes the whole batch by the whole batch's. :class:`SyncBatchNorm` gives the latter:

* forward (training): one all-reduce of a packed float64 buffer ``[sum x, sum x**2, count]`` per
  channel over the data-parallel ranks gives the global mean and (biased) variance, weighted by
  every replica's own count; the running statistics then take the local BatchNorm's update on
  the global batch (unbiased variance, ``momentum``, ``num_batches_tracked``, the cumulative
  average when ``momentum=None``), the same on every replica.
* backward: one all-reduce of ``[sum dy, sum dy * xhat]`` per channel, float64 (skipped where
  the input needs no gradient); weight and bias gradients stay local, the gradient reducer
  sums them. Every rank's ``dy`` is already the gradient of the global loss (replicas weight
  their losses by rows), so plain sums are exact for uneven rows.
* eval: the running statistics, no communication (without running statistics, the batch given).

Each replica sums its rows in float64 around its own mean (``M2 + n * mean**2``), so the
``E[x**2] - E[x]**2`` of the combination cancels in float64, not in the input's precision.

``torch.nn.SyncBatchNorm`` runs on CUDA tensors only and weights every rank alike when
counts are uneven in its backward; this one runs wherever the process group does (gloo, NCCL).

With ``num_micro_batch > 1`` every micro-batch is normalized over the replicas' micro-batches
of the same index (a global micro-batch) and updates the running statistics once: the step
equals the local model accumulating gradients over those global micro-batches, not the local
model on the whole batch at once.

Example::

    program_module = sync_batch_norms(model, CommGroup((0, 1)))   # model itself is not modified
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..ir.plan import Plan
from .collectives import CommGroup, group_size, process_group
from .module_copies import PathCopies
from .program import ProgramStage

__all__ = ["SyncBatchNorm", "batch_norm_pass", "batch_norm_paths", "sync_batch_norms"]

_SYNCABLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class SyncBatchNorm(_BatchNorm):
    """A BatchNorm1d/2d/3d whose training statistics are those of the rows of every rank of
    ``group`` together. Its state dict is the BatchNorm's (same keys, same values).

    Made by :meth:`from_batch_norm`, which shares the BatchNorm's parameters and buffers.
    """

    group: CommGroup
    _bn_class: type[_BatchNorm]

    @classmethod
    def from_batch_norm(cls, bn: _BatchNorm, group: CommGroup) -> SyncBatchNorm:
        """A SyncBatchNorm over ``group`` sharing ``bn``'s parameters and buffers (their very
        tensors, and the dicts holding them); ``bn`` itself is not changed."""
        if not isinstance(bn, _SYNCABLE):
            raise TypeError(f"SyncBatchNorm.from_batch_norm takes a BatchNorm1d/2d/3d, got {type(bn).__name__}")
        sync = copy.copy(bn)  # a new object; _parameters and _buffers are bn's own dicts
        sync.__class__ = cls
        sync._bn_class = type(bn)
        sync.group = group
        return sync

    def _check_input_dim(self, input: torch.Tensor) -> None:
        self._bn_class._check_input_dim(self, input)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group.ranks}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(input)  # running statistics (or this batch's): no communication
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return sync_batch_norm(
            input, self.weight, self.bias, self.running_mean, self.running_var, factor, self.eps, self.group
        )


def sync_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    group: CommGroup,
) -> torch.Tensor:
    """Training-mode batch norm of ``x`` (``(N, C, *)``) with the statistics of every rank's
    ``x`` in ``group``; updates the running statistics (when given) in place."""
    mean, var, count = _global_stats(x, group)
    if running_mean is not None:
        with torch.no_grad():
            # Unbiased, as the local BatchNorm's running_var.
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            unbiased = var * (count / (count - 1))
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    compute = _compute_dtype(x)
    invstd = torch.rsqrt(var + eps).to(compute)
    return _Normalize.apply(x, weight, bias, mean.to(compute), invstd, count, group)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(1, -1, *([1] * (ndim - 2)))


def _global_stats(x: torch.Tensor, group: CommGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance (float64) of every rank's ``x``, and the row count."""
    if x.dim() < 2:
        raise ValueError(f"SyncBatchNorm: expected an (N, C, ...) input, got shape {tuple(x.shape)}")
    dims = [0, *range(2, x.dim())]
    local_count = x.numel() // x.shape[1]
    with torch.no_grad():
        var, mean = torch.var_mean(x.to(_compute_dtype(x)), dim=dims, correction=0)
        mean, var = mean.double(), var.double()
        n = torch.full((1,), float(local_count), dtype=torch.float64, device=x.device)
        packed = torch.cat([mean * local_count, (var + mean * mean) * local_count, n])
        if group_size(group) > 1:
            dist.all_reduce(packed, group=process_group(group))
    c = x.shape[1]
    count = packed[2 * c]
    if local_count <= 1 and count.item() <= 1:  # only then: .item() waits for the device
        raise ValueError(
            f"SyncBatchNorm: expected more than 1 value per channel when training over the "
            f"global batch, got input size {tuple(x.shape)} on every rank of {group!r}"
        )
    mean = packed[:c] / count
    var = (packed[c : 2 * c] / count - mean * mean).clamp_min(0)
    return mean, var, count


class _Normalize(torch.autograd.Function):
    """``(x - mean) * invstd * weight + bias`` with global statistics; the backward sums the
    statistics' gradient terms over ``group`` (one all-reduce)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count, group):
        nd = x.dim()
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        y = (x.to(invstd.dtype) - _channel_view(mean, nd)) * _channel_view(scale, nd)
        if bias is not None:
            y = y + _channel_view(bias.to(invstd.dtype), nd)
        ctx.save_for_backward(x, weight, mean, invstd, count)
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, count = ctx.saved_tensors
        nd = x.dim()
        dims = [0, *range(2, nd)]
        dy = dy.to(invstd.dtype)
        xhat = (x.to(invstd.dtype) - _channel_view(mean, nd)) * _channel_view(invstd, nd)
        # Summed in float64: the backward subtracts these projections of dy (a cancellation).
        sum_dy = dy.sum(dims, dtype=torch.float64)
        sum_dy_xhat = (dy * xhat).sum(dims, dtype=torch.float64)
        # Weight and bias gradients stay this rank's: the gradient reducer sums them.
        grad_weight = sum_dy_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            c = x.shape[1]
            packed = torch.cat([sum_dy, sum_dy_xhat])
            if group_size(ctx.group) > 1:
                dist.all_reduce(packed, group=process_group(ctx.group))
            mean_dy, mean_dy_xhat = (packed[:c] / count).to(dy.dtype), (packed[c:] / count).to(dy.dtype)
            scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
            grad_x = (dy - _channel_view(mean_dy, nd) - xhat * _channel_view(mean_dy_xhat, nd)) * _channel_view(scale, nd)
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def batch_norm_paths(model: nn.Module) -> list[str]:
    """Paths of the BatchNorm modules whose statistics are per replica under data parallel
    (every ``_BatchNorm`` but ``torch.nn.SyncBatchNorm`` and whale's own)."""
    return [
        name for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and not isinstance(m, (nn.SyncBatchNorm, SyncBatchNorm))
    ]


def single_value_batch_norms(model: nn.Module, captured, example_rows: int | None) -> tuple[str, ...]:
    """Paths of the BatchNorms that normalize one value per channel per batch row (a classifier's
    ``BatchNorm1d`` on ``(rows, features)``; not LeViT's on ``(rows * tokens, features)``), read
    from the captured graph at the example's rows: a micro-batch of one row gives them a single
    value per channel, which torch refuses in training ("Expected more than 1 value per channel")
    and an exported graph, which drops that check, turns into a NaN running variance. Empty
    without a graph (the model then runs itself, and torch raises)."""
    paths = set(batch_norm_paths(model))
    if captured is None or not example_rows or not paths:
        return ()
    found: dict[str, bool] = {}
    for info in captured.nodes:
        path = info.module_path
        if path in paths and path not in found and info.shapes and len(info.shapes[0]) >= 2 and (
            info.op == "call_module" or "batch_norm" in info.target
        ):
            shape = info.shapes[0]
            found[path] = math.prod(shape) == shape[1] * example_rows
    return tuple(path for path, single in found.items() if single)


def sync_batch_norms(model: nn.Module, group: CommGroup) -> nn.Module:
    """``model`` with every BatchNorm1d/2d/3d replaced by a :class:`SyncBatchNorm` over ``group``.

    ``model`` is not modified: the modules on the path from the root to each BatchNorm are
    shallow copies (new child lists; parameters, buffers and every other module shared), so the
    result trains the very parameter and buffer tensors of ``model``. Returns ``model`` itself
    when it has no BatchNorm.

    Raises:
        ValueError: a BatchNorm subclass with its own ``forward`` (whale cannot tell what it
            computes) or a lazy BatchNorm not yet materialized.
    """
    paths = batch_norm_paths(model)
    for path in paths:
        bn = model.get_submodule(path)
        if not isinstance(bn, _SYNCABLE) or type(bn).forward is not _BatchNorm.forward:
            raise ValueError(
                f"Config(sync_batch_norm=True): {path!r} is a {type(bn).__name__}, whose forward "
                "whale cannot synchronize; use nn.BatchNorm1d/2d/3d there or sync_batch_norm=False"
            )
        if any(isinstance(t, nn.parameter.UninitializedParameter) for t in bn.parameters()):
            raise ValueError(f"Config(sync_batch_norm=True): {path!r} is a lazy BatchNorm not yet materialized; run one forward first")
    if not paths:
        return model
    copies = PathCopies(model)
    for path in paths:
        parent, _, name = path.rpartition(".")
        copies(parent)._modules[name] = SyncBatchNorm.from_batch_norm(model.get_submodule(path), group)
    return copies.root


def batch_norm_pass(
    stages: tuple[ProgramStage, ...], plan: Plan, rank: int, model: nn.Module, enabled: bool
) -> tuple[tuple[ProgramStage, ...], CommGroup | None]:
    """The rewrite's BatchNorm step (``Config(sync_batch_norm=...)``) on rank ``rank``'s stages.

    Enabled, a data-parallel program of several replicas gets its BatchNorms replaced by
    :class:`SyncBatchNorm` over the rank's data-parallel group (:func:`sync_batch_norms`; the
    user's model is not modified), and that group is returned for the runtime to bind.
    Disabled, a model with BatchNorm run over several replicas is warned about, once; so is
    one run on several micro-batches (enabled or not: each micro-batch has its own statistics).

    Raises:
        ValueError: enabled on a model with BatchNorm in a plan with pipeline stages or
            ``split`` parts, which this pass does not synchronize.
    """
    paths = batch_norm_paths(model)
    shown = ", ".join(repr(p) for p in paths[:6]) + (f" and {len(paths) - 6} more" if len(paths) > 6 else "")
    if paths and plan.num_micro_batch > 1:
        warnings.warn(
            f"BatchNorm modules {shown} run on {plan.num_micro_batch} micro-batches: each "
            "micro-batch is normalized by its own statistics (over the replicas' micro-batches of "
            "its index with Config(sync_batch_norm=True)), and the running statistics are updated "
            "once per micro-batch, as the local model run on each micro-batch in turn would, not "
            "as the local model on the whole batch. Use num_micro_batch=1 for the whole batch's "
            "statistics.",
            UserWarning,
            stacklevel=4,  # warn -> this pass -> ProgramRewrite.build -> parallelize -> the user
        )
    if not paths or plan.dp_degree == 1:
        return stages, None  # one replica normalizes the whole batch already
    if not enabled:
        warnings.warn(
            f"BatchNorm modules {shown} run data parallel over {plan.dp_degree} replicas: each "
            "normalizes its replica's rows by their own statistics (not the global batch's, as "
            "the local model does), and rank 0's running statistics replace the others' each "
            "step (Config.broadcast_buffers). Pass Config(sync_batch_norm=True) for statistics "
            "over the global batch.",
            UserWarning,
            stacklevel=4,  # warn -> this pass -> ProgramRewrite.build -> parallelize -> the user
        )
        return stages, None
    if plan.num_stages > 1 or plan.tensor_parallel > 1:
        raise ValueError(
            f"Config(sync_batch_norm=True) synchronizes BatchNorm in data-parallel programs "
            f"without pipeline stages or split() parts; this plan has {plan.num_stages} stage(s) "
            f"and tensor_parallel={plan.tensor_parallel}. BatchNorm modules: {paths[:6]}; use "
            "Config(sync_batch_norm=False) (each replica's own statistics) or plain replicate"
        )
    (stage,) = stages
    group = CommGroup(plan.data_group_of(rank))
    return (dataclasses.replace(stage, module=sync_batch_norms(stage.module, group)),), group
