"""Autograd-correct collectives for tensor and expert parallelism, over a given process group.

Each function is one collective in forward and its adjoint in backward, the pairs of Megatron-LM
(Shoeybi et al. 2019, section 3): a value that is *replicated* over the group (the same on every
rank) has a gradient that is replicated too, so

=========================  =============================  ==================================
function                   forward                        backward
=========================  =============================  ==================================
``copy_to_group``          identity                       all-reduce (sum of partial grads)
``reduce_from_group``      all-reduce (sum of partials)   identity
``gather_from_group``      all-gather, uneven widths      keep this rank's slice
``scatter_to_group``       keep this rank's slice         all-gather, uneven widths
``all_to_all``             all-to-all, uneven splits      all-to-all with the splits swapped
=========================  =============================  ==================================

Sharded dimensions may be *blocked*: a fused ``qkv`` projection's output is ``num_blocks = 3``
equal blocks (q, k, v), each sharded the same way, so rank ``r`` holds ``sizes[r]`` consecutive
elements of every block. ``sizes`` are per-rank widths of one block and may differ per rank.

The collectives are ordinary ``c10d`` calls, so ``torch.distributed.tensor.debug.CommDebugMode``
counts them (gloo and NCCL alike). In a group of one every function is the identity.

Example::

    x = copy_to_group(x, group)                     # before a column-parallel Linear
    y = reduce_from_group(F.linear(h, w_rows), group)  # after a row-parallel Linear
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = [
    "CommGroup",
    "all_to_all",
    "copy_to_group",
    "gather_from_group",
    "global_rank",
    "group_rank",
    "process_group",
    "group_size",
    "reduce_from_group",
    "scatter_to_group",
    "uneven_all_gather",
]


class CommGroup:
    """Ranks a rewritten program communicates among, named by their global ranks.

    The rewrite builds a program before any process group exists; the communication modules
    it inserts hold a ``CommGroup``, and the runtime binds the process group it makes for
    ``ranks`` (:meth:`bind`) before the first collective. A group of one rank needs none.

    Example::

        tp = CommGroup((0, 1))
        y = reduce_from_group(x, tp)          # after tp.bind(dist.new_group([0, 1]))
    """

    def __init__(self, ranks: Sequence[int]) -> None:
        self.ranks = tuple(ranks)
        self._process_group: dist.ProcessGroup | None = None

    def __repr__(self) -> str:
        return f"CommGroup({self.ranks})"

    @property
    def size(self) -> int:
        return len(self.ranks)

    def bind(self, group: dist.ProcessGroup) -> None:
        """Attach the process group made for ``ranks`` (once, by the runtime)."""
        if self._process_group is not None and self._process_group is not group:
            raise RuntimeError(f"{self!r} is already bound to another process group")
        self._process_group = group

    @property
    def process_group(self) -> dist.ProcessGroup:
        if self._process_group is None:
            raise RuntimeError(
                f"{self!r} has no process group yet: run the program's step() after wh.init(), "
                "which binds the groups it communicates in"
            )
        return self._process_group


def process_group(group: CommGroup | dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The process group a collective runs over (None: the default group)."""
    return group.process_group if isinstance(group, CommGroup) else group


def group_size(group: CommGroup | dist.ProcessGroup | None) -> int:
    """Ranks in ``group`` (None: the default group); 1 when torch.distributed is not initialized."""
    if isinstance(group, CommGroup):
        return group.size
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def group_rank(group: CommGroup | dist.ProcessGroup | None) -> int:
    """This process's rank inside ``group`` (0 when not initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    if isinstance(group, CommGroup):
        return group.ranks.index(dist.get_rank())
    return dist.get_rank(group)


def global_rank(group: CommGroup | dist.ProcessGroup | None, index: int) -> int:
    """The global rank of ``group``'s ``index``-th rank."""
    if isinstance(group, CommGroup):
        return group.ranks[index]
    return index if group is None else dist.get_global_rank(group, index)


def _check_sizes(what: str, sizes: Sequence[int], group: dist.ProcessGroup | None) -> None:
    if len(sizes) != group_size(group):
        raise ValueError(f"{what}: {len(sizes)} shard sizes {list(sizes)} for a group of {group_size(group)}")


def uneven_all_gather(
    x: torch.Tensor, dim: int, sizes: Sequence[int], group: dist.ProcessGroup | None, num_blocks: int = 1
) -> torch.Tensor:
    """All-gather ``x`` along ``dim`` where rank ``r`` holds ``num_blocks * sizes[r]`` elements.

    No autograd; the result holds, for each block, the ranks' pieces in rank order.
    """
    n = len(sizes)
    if n == 1:
        return x
    rank = group_rank(group)
    if x.shape[dim] != num_blocks * sizes[rank]:
        raise ValueError(
            f"all-gather along dim {dim}: rank {rank} holds {x.shape[dim]} elements, expected "
            f"{num_blocks} x {sizes[rank]}"
        )
    front = x.movedim(dim, 0)
    widest = max(sizes) * num_blocks
    if front.shape[0] < widest:
        # gloo and NCCL gather equal-sized buffers: pad to the widest shard, trim after.
        pad = front.new_zeros((widest - front.shape[0], *front.shape[1:]))
        front = torch.cat([front, pad])
    front = front.contiguous()
    pieces = [torch.empty_like(front) for _ in range(n)]
    dist.all_gather(pieces, front, group=process_group(group))
    if num_blocks == 1:
        parts = [p[: sizes[r]] for r, p in enumerate(pieces)]
    else:
        parts = [
            pieces[r][b * sizes[r] : (b + 1) * sizes[r]] for b in range(num_blocks) for r in range(n)
        ]
    whole = torch.cat(parts)
    return whole if dim % whole.dim() == 0 else whole.movedim(0, dim)


def _local_slice(x: torch.Tensor, dim: int, sizes: Sequence[int], rank: int, num_blocks: int) -> torch.Tensor:
    total = sum(sizes)
    if x.shape[dim] != num_blocks * total:
        raise ValueError(
            f"scatter along dim {dim}: the tensor has {x.shape[dim]} elements, expected "
            f"{num_blocks} blocks x {total} (shard sizes {list(sizes)})"
        )
    start = sum(sizes[:rank])
    if num_blocks == 1:
        return x.narrow(dim, start, sizes[rank])
    return torch.cat(
        [x.narrow(dim, b * total + start, sizes[rank]) for b in range(num_blocks)], dim=dim
    )


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=process_group(ctx.group))
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        dist.all_reduce(out, group=process_group(group))
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _own(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` as a tensor of its own: autograd forbids modifying a custom Function's output in
    place when it is a view or the input itself (a model's ``h.unsqueeze_(1)`` after a gather)."""
    out = out.contiguous()
    return out.clone() if out is x or out._is_view() else out


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, group, num_blocks):
        ctx.args = (dim, sizes, group_rank(group), num_blocks)
        return _own(uneven_all_gather(x, dim, sizes, group, num_blocks), x)

    @staticmethod
    def backward(ctx, grad):
        dim, sizes, rank, num_blocks = ctx.args
        return _local_slice(grad, dim, sizes, rank, num_blocks).contiguous(), None, None, None, None


class _ScatterToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, rank, group, num_blocks):
        ctx.args = (dim, sizes, group, num_blocks)
        return _own(_local_slice(x, dim, sizes, rank, num_blocks), x)

    @staticmethod
    def backward(ctx, grad):
        dim, sizes, group, num_blocks = ctx.args
        return uneven_all_gather(grad, dim, sizes, group, num_blocks), None, None, None, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.args = (output_splits, input_splits, group)
        x = x.contiguous()
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x, list(output_splits), list(input_splits), group=process_group(group))
        return out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits, group = ctx.args
        grad = grad.contiguous()
        out = grad.new_empty((sum(input_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad, list(input_splits), list(output_splits), group=process_group(group))
        return out, None, None, None


def copy_to_group(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Identity forward, all-reduce backward: a replicated value entering sharded compute.

    Each rank's sharded consumers contribute a partial gradient; their sum is the gradient.
    """
    if group_size(group) == 1:
        return x
    return _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-reduce (sum) forward, identity backward: partial sums (a row-parallel Linear) made whole."""
    if group_size(group) == 1:
        return x
    return _ReduceFromGroup.apply(x, group)


def gather_from_group(
    x: torch.Tensor,
    dim: int,
    sizes: Sequence[int],
    group: dist.ProcessGroup | None,
    num_blocks: int = 1,
) -> torch.Tensor:
    """All-gather shards of uneven widths along ``dim`` (forward); keep own slice (backward).

    Args:
        x: this rank's shard, ``num_blocks * sizes[rank]`` wide along ``dim``.
        dim: the sharded dimension.
        sizes: per-rank width of one block, in rank order of ``group``.
        group: the process group (None: default).
        num_blocks: equal blocks the full dimension is made of, each sharded alike.
    """
    _check_sizes("gather_from_group", sizes, group)
    if len(sizes) == 1:
        return x
    return _GatherFromGroup.apply(x, dim % x.dim(), tuple(sizes), group, num_blocks)


def scatter_to_group(
    x: torch.Tensor,
    dim: int,
    sizes: Sequence[int],
    group: dist.ProcessGroup | None,
    num_blocks: int = 1,
) -> torch.Tensor:
    """Keep this rank's slice of a replicated ``x`` (forward); all-gather the gradient (backward)."""
    _check_sizes("scatter_to_group", sizes, group)
    if len(sizes) == 1:
        return x
    return _ScatterToGroup.apply(x, dim % x.dim(), tuple(sizes), group_rank(group), group, num_blocks)


def all_to_all(
    x: torch.Tensor,
    output_splits: Sequence[int],
    input_splits: Sequence[int],
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """Exchange rows of ``x`` (dim 0): ``input_splits[r]`` rows go to rank ``r``, ``output_splits[r]`` come back.

    Backward sends the gradient rows the opposite way (the splits swapped).
    """
    _check_sizes("all_to_all", output_splits, group)
    _check_sizes("all_to_all", input_splits, group)
    if x.shape[0] != sum(input_splits):
        raise ValueError(f"all_to_all: {x.shape[0]} rows but input splits {list(input_splits)}")
    if len(input_splits) == 1:
        return x
    return _AllToAll.apply(x, tuple(output_splits), tuple(input_splits), group)
