"""``DistributedProgram``: what the rewrite hands the runtime, for one rank.

It holds the rank's stage modules, already cut and sharded, the resolved shard sizes, and every
process group the job needs, named by its ranks. The runtime makes those groups (all ranks, in
the listed order), binds them, moves the modules to the device and executes the plan's
schedule; it never captures, plans or rewrites.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..ir.plan import Plan
from .collectives import CommGroup
from .tensor_parallel.sharded_model import ShardedModel

__all__ = ["DistributedProgram", "ProgramStage", "TiedWeight"]


@dataclasses.dataclass(frozen=True, eq=False)
class ProgramStage:
    """One pipeline stage (the whole model when there are no stages).

    Attributes:
        index: the stage's place in the pipeline.
        received: names of the values it receives from the previous stage, in order.
        sent: names of the values it sends to the next stage, in order.
        modules: module paths whose computation it runs (outermost first).
        param_names: attribute path of each of its parameters -> the local model's name (every
            path of a tied weight listed).
        module: this rank's program of the stage (sharded where the stage is split); None for a
            stage another pipeline position runs.
        sharded: the tensor-parallel rewrite of ``module`` (shard specs for whole state dicts),
            or None where the stage is not split or not this rank's.
        source: the unsharded stage whose weights the first rank of the tensor group shares with
            the others when the program is bound (None without a split).
        is_split: the stage holds a ``split`` part (on every rank of its position).
    """

    index: int
    received: tuple[str, ...]
    sent: tuple[str, ...]
    modules: tuple[str, ...]
    param_names: Mapping[str, str]
    module: nn.Module | None = None
    sharded: ShardedModel | None = None
    source: nn.Module | None = None
    is_split: bool = False


@dataclasses.dataclass(frozen=True)
class TiedWeight:
    """A weight several pipeline positions hold (GPT's embedding and head): its gradient is
    summed over ``groups[t]``, the holders at tensor-parallel index ``t``."""

    name: str
    groups: tuple[tuple[int, ...], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class DistributedProgram:
    """One rank's part of the distributed program; see the module docstring.

    Attributes:
        plan: the plan it executes (the schedule included).
        rank: the global rank it was built for.
        stages: every stage of the pipeline, this rank's with their modules.
        loss_fn: the loss of the last stage's output (the vocabulary-parallel cross-entropy
            where the model ends in a split classifier).
        state_keys: the local model's state-dict keys, in order.
        param_bytes: the local model's parameter bytes by name.
        shard_sizes: per split region, the atoms each rank of a tensor group holds.
        tensor_groups: every tensor-parallel group of the job (by replica, then position).
        tensor_group: this rank's, the one its sharded modules communicate in (None without split).
        tied: the weights shared across pipeline positions.
    """

    plan: Plan
    rank: int
    stages: tuple[ProgramStage, ...]
    loss_fn: Callable[..., torch.Tensor]
    state_keys: tuple[str, ...]
    param_bytes: Mapping[str, int]
    shard_sizes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    tensor_groups: tuple[tuple[int, ...], ...] = ()
    tensor_group: CommGroup | None = None
    tied: tuple[TiedWeight, ...] = ()

    @property
    def local_stages(self) -> tuple[ProgramStage, ...]:
        """The stages this rank runs."""
        return tuple(s for s in self.stages if s.module is not None)

    @property
    def data_groups(self) -> tuple[tuple[int, ...], ...]:
        """Every data-parallel group: the ranks holding the same parameters (shards), one per
        replica, for each place in a pipeline; empty with a single replica."""
        plan = self.plan
        if plan.dp_degree == 1:
            return ()
        return tuple(tuple(p[i] for p in plan.pipelines) for i in range(len(plan.pipelines[0])))
