"""The sharded layers the tensor-parallel rewrite puts in place of the local model's, and the
communication modules it inserts between them.

Every sharded layer keeps the local layer's parameter names, holding only this rank's slice
(cloned, so the full tensor can be freed), and is described by a :class:`ShardSpec` per sharded
parameter. Collectives run over the group given at construction (:mod:`whale.rewrite.collectives`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..collectives import copy_to_group, gather_from_group, reduce_from_group, scatter_to_group

__all__ = [
    "ColumnParallelLinear",
    "CopyToGroup",
    "GatherFromGroup",
    "ReduceFromGroup",
    "RowParallelLinear",
    "ScatterToGroup",
    "ShardSpec",
    "ShardedMultiheadAttention",
    "VocabParallelEmbedding",
    "global_numel",
    "global_size",
    "shard_tensor",
]


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """Where a local parameter sits in the local model's parameter ``full_name``.

    Along ``dim`` the full tensor is ``num_blocks`` equal blocks; this rank holds elements
    ``[offset, offset + length)`` of every block, and rank ``r`` holds ``rank_lengths[r]`` of
    each block. ``dim=None`` marks a whole tensor held by one rank only (an expert), ``owner``.

    Example: a fused qkv weight (3 * 64, 64) split 3:1 by heads of 16 on rank 1 is
    ``ShardSpec("qkv.weight", 0, 48, 16, (192, 64), num_blocks=3, rank_lengths=(48, 16))``.
    """

    full_name: str
    dim: int | None
    offset: int
    length: int
    full_shape: tuple[int, ...]
    num_blocks: int = 1
    rank_lengths: tuple[int, ...] = ()
    owner: int | None = None


def shard_tensor(full: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """This rank's slice of ``full`` as ``spec`` says (a copy)."""
    if spec.dim is None:
        return full.detach().clone()
    block = full.shape[spec.dim] // spec.num_blocks
    pieces = [full.narrow(spec.dim, b * block + spec.offset, spec.length) for b in range(spec.num_blocks)]
    return torch.cat(pieces, dim=spec.dim).detach().clone()


def _param(full: nn.Parameter, spec: ShardSpec) -> nn.Parameter:
    return nn.Parameter(shard_tensor(full, spec), requires_grad=full.requires_grad)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    if not transposed:
        return F.linear(x, weight, bias)
    if bias is not None and x.dim() == 2:
        return torch.addmm(bias, x, weight)  # as transformers' Conv1D computes it
    return x @ weight if bias is None else x @ weight + bias


def global_size(x: torch.Tensor, dim: int, full: int, index: int | None = None):
    """``x.size()`` (or ``x.size(index)``) of a sharded ``x`` as the local model sees it."""
    sizes = list(x.shape)
    sizes[dim] = full
    return torch.Size(sizes) if index is None else sizes[index]


def global_numel(x: torch.Tensor, dim: int, full: int) -> int:
    """``x.numel()`` of a sharded ``x`` as the local model sees it."""
    return math.prod(global_size(x, dim, full))


class CopyToGroup(nn.Module):
    """Identity forward, all-reduce backward."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return copy_to_group(x, self.group)


class ReduceFromGroup(CopyToGroup):
    """All-reduce forward, identity backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_group(x, self.group)


class GatherFromGroup(nn.Module):
    """All-gather shards of per-rank widths ``sizes`` along ``dim`` (blocked); own slice backward."""

    def __init__(self, dim: int, sizes: tuple[int, ...], num_blocks: int, group) -> None:
        super().__init__()
        self.dim, self.sizes, self.num_blocks, self.group = dim, sizes, num_blocks, group

    def extra_repr(self) -> str:
        return f"dim={self.dim}, sizes={list(self.sizes)}, num_blocks={self.num_blocks}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather_from_group(x, self.dim, self.sizes, self.group, self.num_blocks)


class ScatterToGroup(GatherFromGroup):
    """Keep this rank's slice forward; all-gather the gradient backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scatter_to_group(x, self.dim, self.sizes, self.group, self.num_blocks)


class ColumnParallelLinear(nn.Module):
    """``nn.Linear`` holding this rank's output features (of every block); no communication.

    The input arrives through a :class:`CopyToGroup` the rewrite inserts (shared by all column
    layers reading the same value, so their input gradients are all-reduced once).
    """

    def __init__(self, linear: nn.Module, weight: ShardSpec, bias: ShardSpec | None) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = weight.num_blocks * weight.length
        self.transposed = getattr(linear, "transposed", False)  # a (in, out) weight: Conv1D
        self.weight = _param(linear.weight, weight)
        self.bias = None if bias is None else _param(linear.bias, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features} (local)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.weight, self.bias, self.transposed)


class RowParallelLinear(nn.Module):
    """``nn.Linear`` holding this rank's input features; partial sums all-reduced, bias added once."""

    def __init__(self, linear: nn.Module, weight: ShardSpec, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.in_features = weight.num_blocks * weight.length
        self.out_features = linear.out_features
        self.transposed = getattr(linear, "transposed", False)
        self.group = group
        self.weight = _param(linear.weight, weight)
        self.bias = linear.bias  # replicated: every rank adds it after the all-reduce

    def extra_repr(self) -> str:
        return f"in_features={self.in_features} (local), out_features={self.out_features}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_group(_linear(x, self.weight, None, self.transposed), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """``nn.Embedding`` holding rows ``[offset, offset + length)``; other ids give zeros, then all-reduce."""

    def __init__(self, embedding: nn.Embedding, spec: ShardSpec, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        if embedding.max_norm is not None or embedding.sparse:
            raise ValueError(
                "split() of nn.Embedding with max_norm or sparse=True: whale's vocabulary-parallel "
                "embedding supports neither; drop them or keep the embedding replicated"
            )
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.offset, self.length, self.group = spec.offset, spec.length, group
        pad = embedding.padding_idx
        local_pad = pad - spec.offset if pad is not None and spec.offset <= pad < spec.offset + spec.length else None
        self.padding_idx = local_pad
        self.weight = _param(embedding.weight, spec)

    def extra_repr(self) -> str:
        return f"rows [{self.offset}, {self.offset + self.length}) of {self.num_embeddings}, dim={self.embedding_dim}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.offset
        outside = (local < 0) | (local >= self.length)
        out = F.embedding(local.masked_fill(outside, 0), self.weight, self.padding_idx)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_group(out, self.group)


class ShardedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` holding ``heads`` of its heads from ``first_head`` on.

    q, k, v arrive through :class:`CopyToGroup` nodes; the output projection is row-parallel
    (one all-reduce). With ``need_weights`` the head-averaged weights cost one more all-reduce.
    """

    def __init__(self, mha: nn.MultiheadAttention, first_head: int, heads: int, rank_heads: tuple[int, ...], group) -> None:
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(
                "split() of nn.MultiheadAttention with add_bias_kv or add_zero_attn: not supported "
                "by whale's head-parallel attention; drop them or keep the attention replicated"
            )
        self.embed_dim, self.num_heads, self.group = mha.embed_dim, mha.num_heads, group
        self.head_dim, self.heads, self.first_head = mha.head_dim, heads, first_head
        self.rank_heads = rank_heads
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim
        d = self.head_dim
        lengths = tuple(h * d for h in rank_heads)
        rows = lambda blocks, shape, name: ShardSpec(name, 0, first_head * d, heads * d, shape, blocks, lengths)
        self.specs: dict[str, ShardSpec] = {}
        if mha._qkv_same_embed_dim:
            self.specs["in_proj_weight"] = rows(3, tuple(mha.in_proj_weight.shape), "in_proj_weight")
            self.in_proj_weight = _param(mha.in_proj_weight, self.specs["in_proj_weight"])
        else:
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                full = getattr(mha, name)
                self.specs[name] = rows(1, tuple(full.shape), name)
                setattr(self, name, _param(full, self.specs[name]))
        self.in_proj_bias = None
        if mha.in_proj_bias is not None:
            self.specs["in_proj_bias"] = rows(3, tuple(mha.in_proj_bias.shape), "in_proj_bias")
            self.in_proj_bias = _param(mha.in_proj_bias, self.specs["in_proj_bias"])
        self.out_proj = nn.Module()
        out_spec = ShardSpec("out_proj.weight", 1, first_head * d, heads * d, tuple(mha.out_proj.weight.shape), 1, lengths)
        self.specs["out_proj.weight"] = out_spec
        self.out_proj.weight = _param(mha.out_proj.weight, out_spec)
        self.out_proj.bias = mha.out_proj.bias

    def extra_repr(self) -> str:
        return f"heads {self.first_head}..{self.first_head + self.heads - 1} of {self.num_heads}, embed_dim={self.embed_dim}"

    def _project(self, x: torch.Tensor, which: int) -> torch.Tensor:
        width = self.heads * self.head_dim
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight[which * width : (which + 1) * width]
        else:
            w = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)[which]
        b = None if self.in_proj_bias is None else self.in_proj_bias[which * width : (which + 1) * width]
        return F.linear(x, w, b)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        bsz, tgt, src = query.shape[0], query.shape[1], key.shape[1]
        split = lambda t, n: t.view(bsz, n, self.heads, self.head_dim).transpose(1, 2)
        q, k, v = split(self._project(query, 0), tgt), split(self._project(key, 1), src), split(self._project(value, 2), src)
        mask = self._mask(attn_mask, key_padding_mask, is_causal, bsz, tgt, src, q.dtype)
        scores = (q @ k.transpose(-2, -1)) * (self.head_dim ** -0.5)
        if mask is not None:
            scores = scores + mask
        probs = F.softmax(scores, dim=-1)
        y = F.dropout(probs, self.dropout, self.training) @ v
        y = y.transpose(1, 2).reshape(bsz, tgt, self.heads * self.head_dim)
        out = reduce_from_group(F.linear(y, self.out_proj.weight), self.group)
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = reduce_from_group(probs.sum(1) / self.num_heads, self.group)
        else:
            weights = gather_from_group(probs, 1, self.rank_heads, self.group)
        return out, weights

    def _mask(self, attn_mask, key_padding_mask, is_causal, bsz, tgt, src, dtype):
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=self.out_proj.weight.device).triu(1)
        mask = None
        if attn_mask is not None:
            m = _additive(attn_mask, dtype)
            if m.dim() == 3:  # (bsz * num_heads, tgt, src): keep this rank's heads
                m = m.view(bsz, self.num_heads, tgt, src)[:, self.first_head : self.first_head + self.heads]
            mask = m
        if key_padding_mask is not None:
            kp = _additive(key_padding_mask, dtype).view(bsz, 1, 1, src)
            mask = kp if mask is None else mask + kp
        return mask


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """PyTorch's convention: a bool mask is True where attention is not allowed."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)
