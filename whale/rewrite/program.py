"""``DistributedProgram``: what the rewrite hands the runtime, for one rank.

It holds the rank's stage modules, already cut and sharded, the resolved shard sizes, and every
process group the job needs, named by its ranks. The runtime makes those groups (all ranks, in
the listed order), binds them, moves the modules to the device and executes the plan's
schedule; it never captures, plans or rewrites.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..capture.graph_io import input_mismatch
from ..ir.plan import Plan
from .collectives import CommGroup
from .tensor_parallel.sharded_model import ShardedModel

__all__ = ["DistributedProgram", "ModelCall", "ProgramStage", "TiedWeight"]


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
        state_names: each key of the stage module's ``state_dict()`` -> every name the local
            model's ``state_dict()`` gives that tensor (a tied weight has several: GPT-2's
            ``transformer.wte.weight`` and ``lm_head.weight``). Non-persistent buffers (rotary
            ``inv_freq``, ``position_ids``) are not in the stage's state dict either: the stage
            keeps them as built, no state dict needs or carries them.
        updated_buffers: the buffers (attribute paths of ``module``) its forward updates
            (counters, running statistics): a pipeline's replicas take the first replica's
            after each step.
        always_run: containers (``nn.ModuleList``/``nn.Sequential``) inside another whose
            every child the captured graph runs, so ZeRO 3 may gather each child alone.
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
    state_names: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    updated_buffers: tuple[str, ...] = ()
    always_run: frozenset[str] = frozenset()

    def release_source(self) -> None:
        """Drop :attr:`source` once the runtime made the shards from it (when binding): the
        unsharded weights are needed that once, and a rank then holds its shards only."""
        object.__setattr__(self, "source", None)  # the one field binding consumes


@dataclasses.dataclass(frozen=True, eq=False)
class ModelCall:
    """How a step's inputs reach the program, and the program's output the loss.

    The user calls the program as they call the local model: positional and keyword inputs.
    A data-parallel program runs the model itself on them; pipeline stages run the captured
    graph, whose placeholders are the inputs flattened (``CapturedModel.flatten_inputs``), and
    the last stage's flat outputs are restored to the model's output object
    (``CapturedModel.unflatten_output``), so ``loss_fn`` sees what the local model returns.

    Attributes:
        signature: ``forward``'s signature (None where it cannot be read: inputs go unchecked).
        flatten: ``(args, kwargs) -> `` the graph's placeholder values in order; None where the
            program runs the model itself.
        restore: the last stage's flat outputs -> the model's output; None: returned as they are.
        model_name: the local model's class name, for messages.
        defaults: keyword inputs every call gets where the caller leaves them out: those capture
            set (``use_cache=False``), where the program runs a captured graph that needs them
            (a model sharded by ``split``).
    """

    signature: inspect.Signature | None
    flatten: Callable[[tuple, Mapping[str, Any]], tuple] | None = None
    restore: Callable[[Any], Any] | None = None
    model_name: str = "model"
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def check(self, args: tuple, kwargs: Mapping[str, Any]) -> None:
        """Raise ``TypeError`` if ``args``/``kwargs`` do not fit ``forward`` (no collective: every
        rank given the same inputs raises the same error), as capture checks the example."""
        if self.signature is None:
            return
        reason = input_mismatch(self.signature, self.model_name, args, kwargs)
        if reason is not None:
            raise TypeError(reason)

    def model_inputs(self, args: tuple, kwargs: Mapping[str, Any]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` as the program's model takes them (checked first)."""
        self.check(args, kwargs)
        return tuple(args), {**self.defaults, **kwargs}

    def stage_inputs(self, args: tuple, kwargs: Mapping[str, Any]) -> tuple:
        """The inputs as the stage programs take them (checked first)."""
        self.check(args, kwargs)
        if self.flatten is None:
            return tuple(args)
        return tuple(self.flatten(tuple(args), dict(kwargs)))

    def output(self, flat: Any) -> Any:
        """The model's output from the last stage's outputs."""
        return flat if self.restore is None else self.restore(flat)


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
        call: how inputs reach the stages and the last stage's output the loss.
        data_group: this rank's data-parallel ranks, which its SyncBatchNorm modules communicate
            in (``Config(sync_batch_norm=True)``; None otherwise); the runtime binds it.
        single_value_batch_norms: the BatchNorms that see one value per channel per row, which
            a micro-batch of one row must not reach in training (``sync_batch_norm.py``).
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
    call: ModelCall = dataclasses.field(default_factory=lambda: ModelCall(None))
    data_group: CommGroup | None = None  # Config(sync_batch_norm)
    single_value_batch_norms: tuple[str, ...] = ()

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
