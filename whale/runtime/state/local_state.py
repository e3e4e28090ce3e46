"""This rank's part of the local model's state: every tensor it holds, under the local model's
names, with where its pieces sit in the whole tensor.

A whale program holds its parameters in pieces: a pipeline rank the stages of its position, a
tensor-parallel rank its shard of each ``split`` parameter (along one dim, possibly in several
blocks, as a fused ``qkv`` weight is, and of uneven widths where shards follow device speed), an
expert-parallel rank its own experts whole. :func:`local_state` describes each tensor this
rank holds as :class:`LocalTensor`: a view per contiguous block with its global offsets, so a
checkpoint can write the blocks where they belong in the whole tensor, and read any plan's
blocks back into them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
from torch import nn

from ...rewrite.program import ProgramStage
from ...rewrite.tensor_parallel.modules import ShardSpec

__all__ = ["LocalTensor", "flat_boxes", "local_state", "named_parameters", "program_stages"]


@dataclasses.dataclass(frozen=True)
class LocalTensor:
    """One tensor of the local model's state as this rank holds it.

    Attributes:
        tensor: what this rank holds (the whole tensor, or its shard as the rewrite laid it out).
        global_shape: the local model's shape of it.
        spec: where the shard sits in the whole tensor; None: this rank holds it whole.
        flat: ZeRO (``Config.zero_stage``): ``tensor`` is the 1-D slice ``[lo, hi)`` of the
            flattened tensor of shape ``local_shape`` (what this rank holds without ZeRO: the
            whole tensor, or its tensor-parallel shard as ``spec`` places it); None: no ZeRO.
        local_shape: that tensor's shape (with ``flat`` only).
    """

    tensor: torch.Tensor
    global_shape: tuple[int, ...]
    spec: ShardSpec | None = None
    flat: tuple[int, int] | None = None
    local_shape: tuple[int, ...] | None = None

    def blocks(self, like: torch.Tensor | None = None) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        """``(view, global offsets)`` for each contiguous block of ``like`` (a tensor laid out as
        ``tensor``, e.g. an optimizer's state of it; ``tensor`` itself by default). Empty where
        this rank holds none of the tensor (an empty ZeRO shard, a zero-width shard)."""
        t = self.tensor if like is None else like
        if self.flat is not None:
            # A ZeRO slice of the flattened tensor: a few boxes of its shape (at most 3 for a
            # matrix: a partial first row, whole rows, a partial last row), then placed as the
            # tensor-parallel shard places them.
            lo, hi = self.flat
            out = []
            for start, offsets, sizes in flat_boxes(lo, hi, self.local_shape):
                n = math.prod(sizes)
                out.extend(self._placed(t[start - lo : start - lo + n].view(sizes), offsets))
            return out
        return self._placed(t, (0,) * t.dim())

    def _placed(self, t: torch.Tensor, offsets: tuple[int, ...]) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        """``t``, a box at ``offsets`` of what this rank holds without ZeRO, cut where the
        tensor-parallel shard's blocks end and placed where each sits in the whole tensor."""
        spec = self.spec
        if spec is None or spec.dim is None:
            return [(t, offsets)]
        if spec.length == 0:
            return []
        d, length = spec.dim, spec.length
        block = spec.full_shape[d] // spec.num_blocks
        out = []
        at, end = offsets[d], offsets[d] + t.shape[d]
        while at < end:
            b = at // length
            stop = min(end, (b + 1) * length)
            place = list(offsets)
            place[d] = b * block + spec.offset + at - b * length
            out.append((t.narrow(d, at - offsets[d], stop - at), tuple(place)))
            at = stop
        return out

    @property
    def sharded(self) -> bool:
        return self.flat is not None or (self.spec is not None and self.spec.dim is not None)


def flat_boxes(lo: int, hi: int, shape: tuple[int, ...]) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """The elements ``[lo, hi)`` of a flattened tensor of ``shape`` as boxes of that shape:
    ``(first flat index, offsets, sizes)`` each, in order, each contiguous in the flat (at most
    ``2 * ndim - 1`` boxes: partial rows at either end, recursively, whole rows between).

    Example::

        flat_boxes(2, 11, (3, 4))  # [(2, (0, 2), (1, 2)), (4, (1, 0), (1, 4)), (8, (2, 0), (1, 3))]
    """
    if hi <= lo:
        return []
    if not shape:
        return [(0, (), ())]
    inner = math.prod(shape[1:])
    first, last = lo // inner, (hi - 1) // inner
    if first == last:
        base = first * inner
        return [(s + base, (first, *o), (1, *z)) for s, o, z in flat_boxes(lo - base, hi - base, shape[1:])]
    out = []
    whole_from, whole_to = first, last + 1
    if lo % inner:
        out += flat_boxes(lo, (first + 1) * inner, shape)
        whole_from = first + 1
    if hi % inner:
        whole_to = last
    if whole_to > whole_from:
        out.append((whole_from * inner, (whole_from,) + (0,) * (len(shape) - 1), (whole_to - whole_from, *shape[1:])))
    if hi % inner:
        out += flat_boxes(last * inner, hi, shape)
    return out


def program_stages(program: object) -> tuple[ProgramStage, ...] | None:
    """The stages a whale program runs on this rank, or None for a plain ``nn.Module``."""
    inner = getattr(program, "program", None)
    stages = getattr(inner, "local_stages", None)
    if stages is None:
        if isinstance(program, nn.Module):
            return None
        raise TypeError(
            f"expected a program from wh.parallelize or a local nn.Module, got {type(program).__name__}"
        )
    return stages


def local_state(program: object, *, optimizer_view: bool = False) -> dict[str, LocalTensor]:
    """Every tensor of the local model's ``state_dict()`` this rank holds, by the local model's
    names (a tied weight under each of its names, one tensor). Non-persistent buffers are left
    out, as the local model's ``state_dict()`` leaves them out.

    ``program``: a program from :func:`whale.parallelize`, or a local ``nn.Module`` (every
    tensor whole). Under ``Config(zero_stage=3)`` a parameter is this rank's ZeRO shard (its
    ``flat`` slice); under stages 1 and 2 the full parameter, or, with ``optimizer_view``, the
    shard the optimizer steps (where its state lies).
    """
    stages = program_stages(program)
    zero = getattr(program, "_zero", None)
    if zero is not None and not (optimizer_view or zero.stage == 3):
        zero = None
    if stages is None:
        return {k: LocalTensor(v.detach(), tuple(v.shape)) for k, v in program.state_dict(keep_vars=True).items()}
    out: dict[str, LocalTensor] = {}
    for stage in stages:
        sharded = stage.sharded
        state: Mapping[str, torch.Tensor] = stage.module.state_dict(keep_vars=True)
        if sharded is not None:
            # Tensors the sharded program does not run (kept for whole state dicts) count too.
            state = {**sharded.unused_state, **state}
        for key, value in state.items():
            spec = None if sharded is None else _spec_of(sharded, key)
            if spec is None and sharded is not None and key in sharded.full_specs:
                continue  # another rank's whole tensor (an expert)
            shape = tuple(value.shape) if spec is None else tuple(spec.full_shape)
            flat = zero.flat_range(value) if zero is not None and isinstance(value, nn.Parameter) else None
            if flat is not None:
                entry = LocalTensor(zero.shard(value).detach(), shape, spec, flat, tuple(value.shape))
            else:
                entry = LocalTensor(value.detach(), shape, spec)
            for name in stage.state_names.get(key, (key,)):
                out[name] = entry
    return out


def named_parameters(program: object) -> list[tuple[str, nn.Parameter]]:
    """This rank's parameters under the local model's names, each once (a tied weight under the
    name the local model's ``named_parameters()`` gives it)."""
    return list(program.named_parameters())


def _spec_of(sharded, key: str) -> ShardSpec | None:
    spec = sharded.param_shards.get(key)
    if spec is None:
        for alias in sharded.tied.get(key, ()):
            spec = sharded.param_shards.get(alias)
            if spec is not None:
                break
    return spec
