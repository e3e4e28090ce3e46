"""An optimizer's state as a checkpoint holds it: per parameter, under the local model's names.

A torch optimizer keys its state by parameter object and its ``state_dict()`` by position,
which differ from plan to plan (a pipeline rank holds some parameters, a tensor-parallel rank
shards of them). A checkpoint keys them by the local model's parameter name instead:
``optim.state.<name>.<key>`` (``exp_avg`` ...: laid out as the parameter, so a shard's state is
written where the shard sits) and ``optim.param_groups.<name>``, the hyperparameters of the
group holding it (pickled: lr, betas ...). Any plan, or the local model, reads them back.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from .dcp_chunks import ChunkedTensor
from .local_state import LocalTensor

__all__ = ["apply_optimizer_state", "optimizer_load_targets", "optimizer_names", "optimizer_save_state"]

STATE = "optim.state."
GROUPS = "optim.param_groups."


def optimizer_names(optimizer: torch.optim.Optimizer, named: list[tuple[str, torch.nn.Parameter]]) -> list[list[str]]:
    """The local model's name of each parameter of each param group of ``optimizer``."""
    name_of = {id(p): n for n, p in named}
    out = []
    for g, group in enumerate(optimizer.param_groups):
        names = []
        for i, p in enumerate(group["params"]):
            if id(p) not in name_of:
                raise ValueError(
                    f"the optimizer's param group {g} holds a parameter (#{i}, shape {tuple(p.shape)}) that is "
                    "not one of the program's; build the optimizer on program.parameters()"
                )
            names.append(name_of[id(p)])
        out.append(names)
    return out


def optimizer_save_state(
    optimizer: torch.optim.Optimizer, names: list[list[str]], entries: Mapping[str, LocalTensor], snapshot: bool
) -> dict[str, Any]:
    """``{"state": {name: {key: value}}, "param_groups": {name: bytes}}`` for a DCP save: a
    sharded parameter's state as :class:`ChunkedTensor` blocks where the shard sits.
    ``snapshot`` copies every tensor to the CPU (for a save that runs behind training)."""
    state: dict[str, dict[str, Any]] = {}
    groups: dict[str, bytes] = {}
    for group, group_names in zip(optimizer.param_groups, names):
        hyper = pickle.dumps({k: v for k, v in group.items() if k != "params"})
        for p, name in zip(group["params"], group_names):
            groups[name] = hyper
            held = optimizer.state.get(p)
            if not held:
                continue
            entry = entries[name]
            values = {key: _state_value(name, key, v, entry, snapshot) for key, v in held.items()}
            state[name] = {key: v for key, v in values.items() if v is not None}  # None: none of it here
    return {"state": state, "param_groups": groups}


def _state_value(name: str, key: str, value: Any, entry: LocalTensor, snapshot: bool) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach()
    if snapshot:
        value = value.to("cpu", copy=True)
    if not entry.sharded or value.dim() == 0:
        return value  # a whole tensor, or a scalar every shard's rank holds alike (a step count)
    if tuple(value.shape) != tuple(entry.tensor.shape):
        raise NotImplementedError(
            f"optimizer state {key!r} of the sharded parameter {name} has shape {tuple(value.shape)}, "
            f"neither the shard's {tuple(entry.tensor.shape)} nor a scalar: whale cannot tell where it "
            "sits in the whole tensor (use an optimizer whose state is laid out as its parameter)"
        )
    blocks = entry.blocks(like=value)
    return ChunkedTensor(entry.global_shape, blocks) if blocks else None


def optimizer_load_targets(
    names: list[list[str]], entries: Mapping[str, LocalTensor], optimizer: torch.optim.Optimizer,
    metadata: Metadata,
) -> tuple[dict[str, Any], dict[tuple[str, str], torch.Tensor]]:
    """What to read of the optimizer from a checkpoint: ``{"state": ..., "param_groups": ...}``
    with a tensor (or blocks of one) for every state the checkpoint holds of this rank's
    parameters, laid out as the parameter here: the optimizer's own where it has a state of
    that shape and dtype (read in place, as DCP loads a model), else a new one; and those
    tensors by (name, key)."""
    params = [list(g["params"]) for g in optimizer.param_groups]
    saved = metadata.state_dict_metadata
    keys_of: dict[str, list[str]] = {}
    for fqn in saved:
        if fqn.startswith(STATE):
            name, _, key = fqn[len(STATE):].rpartition(".")
            keys_of.setdefault(name, []).append(key)
    state: dict[str, dict[str, Any]] = {}
    groups: dict[str, Any] = {}
    tensors: dict[tuple[str, str], torch.Tensor] = {}
    for group_names, group_params in zip(names, params):
        for name, p in zip(group_names, group_params):
            if GROUPS + name in saved:
                groups[name] = None
            targets = {}
            for key in keys_of.get(name, ()):
                md = saved[f"{STATE}{name}.{key}"]
                if not isinstance(md, TensorStorageMetadata):
                    targets[key] = None  # a non-tensor value, read as it was saved
                    continue
                local, target = _allocate(md, entries[name], p, optimizer.state.get(p, {}).get(key))
                tensors[(name, key)] = local
                if target is not None:  # None: this rank holds none of it (an empty ZeRO shard)
                    targets[key] = target
            if targets:
                state[name] = targets
    return {"state": state, "param_groups": groups}, tensors


def _allocate(
    md: TensorStorageMetadata, entry: LocalTensor, p: torch.nn.Parameter, held: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = md.properties.dtype
    if tuple(md.size) == entry.global_shape and len(md.size) > 0:
        if isinstance(held, torch.Tensor) and held.shape == p.shape and held.dtype == dtype and held.is_contiguous():
            local = held.detach()
        else:
            local = torch.empty(p.shape, dtype=dtype, device=p.device)
        if not entry.sharded:
            return local, local
        blocks = entry.blocks(like=local)
        return local, ChunkedTensor(entry.global_shape, blocks) if blocks else None
    local = torch.empty(tuple(md.size), dtype=dtype)  # a scalar (a step count): kept where the optimizer keeps it
    return local, local


def apply_optimizer_state(
    optimizer: torch.optim.Optimizer, names: list[list[str]], loaded: Mapping[str, Any],
    tensors: Mapping[tuple[str, str], torch.Tensor],
) -> None:
    """Give ``optimizer`` the state and hyperparameters read into ``loaded`` (through its own
    ``load_state_dict``, which casts and places the state as the optimizer keeps it)."""
    current = optimizer.state_dict()
    unread: dict[str, dict[str, torch.Tensor]] = {}  # state of empty ZeRO shards: nothing to read
    for (name, key), t in tensors.items():
        if key not in loaded["state"].get(name, {}):
            unread.setdefault(name, {})[key] = t
    state: dict[int, dict[str, Any]] = {}
    index = 0
    new_groups = []
    for g, (group, group_names) in enumerate(zip(current["param_groups"], names)):
        hypers = {}
        for name in group_names:
            held = {**loaded["state"].get(name, {}), **unread.get(name, {})}
            if held:
                state[index] = {k: tensors.get((name, k), v) for k, v in held.items()}
            raw = loaded["param_groups"].get(name)
            if raw is not None:
                hypers[name] = pickle.loads(raw)
            index += 1
        new_group = dict(group)
        if hypers:
            first_name, first = next(iter(hypers.items()))
            for name, h in hypers.items():
                if h != first:
                    diff = sorted(k for k in set(h) | set(first) if h.get(k) != first.get(k))
                    raise ValueError(
                        f"param group {g} holds {first_name} and {name}, which the checkpoint gives "
                        f"different hyperparameters ({', '.join(diff)}); build the optimizer with the "
                        "param groups it was saved with"
                    )
            new_group.update({k: v for k, v in first.items() if k != "params"})
        new_groups.append(new_group)
    optimizer.load_state_dict({"state": state, "param_groups": new_groups})

