"""ShardedModel: this rank's part of a tensor-parallel model, and moving whole state dicts in and out."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..collectives import global_rank, group_size, process_group, uneven_all_gather
from .decisions import TensorParallelPlan
from .modules import ShardSpec, shard_tensor

__all__ = ["ShardedModel"]


@dataclasses.dataclass(frozen=True, eq=False)
class ShardedModel:
    """What :func:`~whale.rewrite.tensor_parallel.shard_model` returns for one rank.

    Attributes:
        module: this rank's model: same forward signature as the local model, output equal to
            the local model's, except when the model ends in a split classifier whose loss is
            cross-entropy: then the output is this rank's slice of the logits (classes last) and
            ``loss_fn`` must compute the loss.
        loss_fn: the vocabulary-parallel cross-entropy for such a model, else None.
        param_shards: local parameter name -> where it sits in the local model's parameter.
        full_specs: every sharded or rank-owned tensor of the local model (all ranks' shards),
            by the local model's name; what ``full_state_dict`` gathers.
        full_keys: the local model's state-dict keys, in order.
        plan: the analysis behind the rewrite.
        sizes: per-region shard sizes (atoms per rank), by region name.
        rank: this rank's index in ``group``.
        group: the tensor-parallel process group (None: the default group).
    """

    module: nn.Module
    loss_fn: Callable[..., torch.Tensor] | None
    param_shards: Mapping[str, ShardSpec]
    full_specs: Mapping[str, ShardSpec]
    full_keys: tuple[str, ...]
    plan: TensorParallelPlan
    sizes: Mapping[str, tuple[int, ...]]
    rank: int
    group: Any = None
    unused_state: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    tied: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # name -> every name of its Parameter

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def gather_full(self, local: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """Whole tensors under the local model's names from this rank's tensors (collective).

        ``local`` maps local names (parameters, or their gradients) to tensors; None counts as
        zeros (a parameter that got no gradient on this rank), and a sharded name that is None
        on every rank stays None (a parameter nothing used, as on the local model). Every rank
        must call it with the same names.

        Example::

            grads = sharded.gather_full({n: p.grad for n, p in sharded.module.named_parameters()})
        """
        out: dict[str, torch.Tensor] = {}
        names = [k for k in self.full_keys if k in local or k in self.full_specs]
        mine = {}
        for name in names:
            if name in self.full_specs:
                key = next((n for n in self.tied.get(name, (name,)) if n in local), name)  # a tied weight by another name
                mine[name] = local.get(key) if name in self.param_shards else None
        held = torch.tensor([mine[n] is not None for n in mine], dtype=torch.int32)
        if len(held) and group_size(self.group) > 1:
            dist.all_reduce(held, op=dist.ReduceOp.MAX, group=process_group(self.group))
        anywhere = dict(zip(mine, held.tolist(), strict=True))
        for name in names:
            spec = self.full_specs.get(name)
            if spec is None:
                out[name] = local[name].detach().clone() if local[name] is not None else None
            elif anywhere[name]:
                out[name] = self._gather_one(spec, mine[name])
            elif name in local:
                out[name] = None
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The local model's state dict, shards gathered (a collective: call it on every rank)."""
        state = {**self.unused_state, **self.module.state_dict()}
        gathered = self.gather_full({k: v for k, v in state.items() if k in self.full_keys})
        return {k: gathered[k] for k in self.full_keys}

    def load_full_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a local model's state dict: each rank copies its slices (no communication)."""
        missing = [k for k in self.full_keys if k not in state_dict]
        unexpected = [k for k in state_dict if k not in self.full_keys]
        if missing or unexpected:
            raise ValueError(
                f"load_full_state_dict(): missing keys {missing}, unexpected keys {unexpected}; "
                "pass a state dict of the local (unsharded) model"
            )
        own = self.module.state_dict(keep_vars=True)
        with torch.no_grad():
            for name in self.full_keys:
                full = state_dict[name]
                spec = self.full_specs.get(name)
                if spec is not None and tuple(full.shape) != spec.full_shape:
                    raise ValueError(
                        f"load_full_state_dict(): {name} has shape {tuple(full.shape)}, the local "
                        f"model's is {spec.full_shape}"
                    )
                if spec is not None and name not in self.param_shards:
                    continue  # another rank's expert
                alias = next((n for n in self.tied.get(name, ()) if n in own), name)  # a tied name the program lacks
                target = own.get(alias, self.unused_state.get(name))
                value = full if spec is None else shard_tensor(full, self.param_shards[name])
                if target is None:
                    raise KeyError(f"load_full_state_dict(): {name} has no tensor in this rank's program")
                target.copy_(value)

    def _gather_one(self, spec: ShardSpec, mine: torch.Tensor | None) -> torch.Tensor:
        dtype, device = self._dtype_device()
        if spec.dim is None:
            buf = mine.detach().clone() if mine is not None else torch.zeros(spec.full_shape, dtype=dtype, device=device)
            if group_size(self.group) > 1:
                dist.broadcast(buf, src=global_rank(self.group, spec.owner), group=process_group(self.group))
            return buf
        if mine is None:
            shape = list(spec.full_shape)
            shape[spec.dim] = spec.num_blocks * spec.rank_lengths[self.rank]
            mine = torch.zeros(shape, dtype=dtype, device=device)
        return uneven_all_gather(mine.detach().contiguous(), spec.dim, spec.rank_lengths, self.group, spec.num_blocks)

    def _dtype_device(self) -> tuple[torch.dtype, torch.device]:
        for p in self.module.parameters():
            return p.dtype, p.device
        return torch.get_default_dtype(), torch.device("cpu")

