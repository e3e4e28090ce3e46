"""Cases run on every rank of a gloo pool (see tests/world.py) for tests/test_sync_batch_norm.py."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import whale as wh
from examples.cnn import CNN, SyntheticImages
from tests.equivalence import train_distributed, train_reference

_STEPS = 2


def batch_norm_cnn(cumulative: bool = True) -> nn.Module:
    """examples/cnn.py's CNN with BatchNorm2d in place of GroupNorm (the second with
    ``momentum=None``, the cumulative average, if ``cumulative``) and a BatchNorm1d before the
    head. (``momentum=None`` reads ``num_batches_tracked`` as a Python number, which neither fx
    nor export can capture: data parallel then runs the model uncaptured, with a warning.)"""
    torch.manual_seed(0)
    model = CNN(width=8)
    for i, block in enumerate(model.features):
        # No conv bias before a BatchNorm (as ResNet): its gradient is zero in exact arithmetic,
        # round-off whose sign Adam's first step would turn into a move of +-lr.
        conv = block.conv
        block.conv = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=False)
        block.norm = nn.BatchNorm2d(conv.out_channels, momentum=None if i and cumulative else 0.1)
    model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features), model.head)
    with torch.no_grad():  # non-trivial affine parameters, so their gradients mean something
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def equivalence(global_batch: int, *, row_weights=None, sync_batch_norm: bool = True) -> dict:
    """``_STEPS`` AdamW steps distributed and, on every rank, the local model on the same data;
    with the running statistics after the last step and the user's model's BatchNorm classes."""
    model = batch_norm_cnn()
    data = SyntheticImages()
    batches = [data.batch(global_batch, s) for s in range(_STEPS)]
    reference = copy.deepcopy(model)
    out = train_reference(reference, batches, F.cross_entropy)
    states = out.pop("ref_states")
    config = wh.Config(row_weights=row_weights, sync_batch_norm=sync_batch_norm)
    program = wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=(batches[0][0],), config=config)
    out.update(train_distributed(program, batches, states))
    buffers = [k for k, v in states[-1].items() if not v.is_floating_point() or "running" in k]
    full = program.full_state_dict()
    out["buffers"] = {k: full[k].clone() for k in buffers}
    out["ref_buffers"] = {k: states[-1][k] for k in buffers}
    out["rows"] = program.plan.rows(global_batch)
    out["user_classes"] = sorted({type(m).__name__ for m in model.modules()})
    out["program_classes"] = sorted({type(m).__name__ for m in program.module.modules()})
    return out


def collectives_per_step(row_weights=None) -> dict:
    """All-reduces a second step makes and their sizes (the first binds and checks the batch)."""
    model = batch_norm_cnn()
    data = SyntheticImages()
    config = wh.Config(row_weights=row_weights, sync_batch_norm=True, shared_memory=False, broadcast_buffers=False)
    x, y = data.batch(8, 0)
    program = wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=(x,), config=config)
    program.step(x, y)
    calls = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append((tensor.numel(), str(tensor.dtype)))
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        program.step(x, y)
        program.eval()
        program(x)  # eval: running statistics, no communication
    finally:
        dist.all_reduce = real
    return {"calls": calls, "buckets": len(program._reducer.buckets)}


def micro_batches(global_batch: int, num_micro_batch: int, row_weights=None) -> dict:
    """One step with micro-batches against the local model accumulating gradients over the
    global micro-batches: micro-batch k is every replica's k-th micro-batch together."""
    from whale.ir.rows import row_offsets, split_rows

    model = batch_norm_cnn()
    x, y = SyntheticImages().batch(global_batch, 0)
    reference = copy.deepcopy(model)
    config = wh.Config(sync_batch_norm=True, num_micro_batch=num_micro_batch, row_weights=row_weights)
    program = wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=(x,), config=config)
    rows = program.plan.rows(global_batch)
    index: list[list[int]] = [[] for _ in range(num_micro_batch)]
    for start, n in zip(row_offsets(rows), rows):
        mb = split_rows(n, [1.0] * num_micro_batch, what="micro-batches")
        for k, (at, m) in enumerate(zip(row_offsets(mb), mb)):
            index[k] += range(start + at, start + at + m)
    ref_loss = 0.0
    for rows_k in index:
        loss = F.cross_entropy(reference(x[rows_k]), y[rows_k]) * (len(rows_k) / global_batch)
        loss.backward()
        ref_loss += loss.item()
    out = {"loss": program.step(x, y).item(), "ref_loss": ref_loss}
    out["grads"] = {n: p.grad.clone() for n, p in program.named_parameters()}
    out["ref_grads"] = {n: p.grad.clone() for n, p in reference.named_parameters()}
    full = program.full_state_dict()
    out["buffers"] = {k: full[k].clone() for k, v in reference.state_dict().items() if k.rsplit(".", 1)[-1] in _BUFFERS}
    out["ref_buffers"] = {k: v.clone() for k, v in reference.state_dict().items() if k.rsplit(".", 1)[-1] in _BUFFERS}
    return out


_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class _Head(nn.Module):
    """LeViT's classifier: BatchNorm1d over (rows, features), one value per channel per row.
    ``exported``: a branch on the batch size fx cannot trace, so capture uses torch.export,
    which drops BatchNorm's batch size check (transformers models are captured so)."""

    def __init__(self, exported: bool) -> None:
        super().__init__()
        self.exported = exported
        self.body, self.norm, self.head = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.body(x)
        if self.exported and x.shape[0] > 0:
            h = h * 1.0
        return self.head(self.norm(h))


def one_row_micro_batch(exported: bool, rows: int, **config) -> dict:
    """A step of ``rows`` rows of a pipeline over the head: the error every rank raised, or the
    loss and whether the running statistics are finite."""
    torch.manual_seed(0)
    model = _Head(exported)
    x, y = torch.randn(rows, 8), torch.randint(4, (rows,))
    program = wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=(torch.randn(8, 8),),
                             config=wh.Config(**config))  # fmt: skip
    try:
        loss = program.step(x, y).item()
    except ValueError as err:
        return {"error": str(err)}
    full = program.full_state_dict()
    return {"loss": loss, "finite": all(bool(torch.isfinite(full[k]).all()) for k in full if "running" in k)}
