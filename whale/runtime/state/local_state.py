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
from collections.abc import Mapping

import torch
from torch import nn

from ...rewrite.program import ProgramStage
from ...rewrite.tensor_parallel.modules import ShardSpec

__all__ = ["LocalTensor", "local_state", "named_parameters", "program_stages"]


@dataclasses.dataclass(frozen=True)
class LocalTensor:
    """One tensor of the local model's state as this rank holds it.

    Attributes:
        tensor: what this rank holds (the whole tensor, or its shard as the rewrite laid it out).
        global_shape: the local model's shape of it.
        spec: where the shard sits in the whole tensor; None: this rank holds it whole.
    """

    tensor: torch.Tensor
    global_shape: tuple[int, ...]
    spec: ShardSpec | None = None

    def blocks(self, like: torch.Tensor | None = None) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        """``(view, global offsets)`` for each contiguous block of ``like`` (a tensor laid out as
        ``tensor``, e.g. an optimizer's state of it; ``tensor`` itself by default)."""
        t = self.tensor if like is None else like
        spec = self.spec
        if spec is None or spec.dim is None:
            return [(t, (0,) * t.dim())]
        block = spec.full_shape[spec.dim] // spec.num_blocks
        out = []
        for b in range(spec.num_blocks):
            if spec.length == 0:
                continue
            offsets = [0] * t.dim()
            offsets[spec.dim] = b * block + spec.offset
            out.append((t.narrow(spec.dim, b * spec.length, spec.length), tuple(offsets)))
        return out

    @property
    def sharded(self) -> bool:
        return self.spec is not None and self.spec.dim is not None


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


def local_state(program: object) -> dict[str, LocalTensor]:
    """Every tensor of the local model's ``state_dict()`` this rank holds, by the local model's
    names (a tied weight under each of its names, one tensor). Non-persistent buffers are left
    out, as the local model's ``state_dict()`` leaves them out.

    ``program``: a program from :func:`whale.parallelize`, or a local ``nn.Module`` (every
    tensor whole).
    """
    stages = program_stages(program)
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
