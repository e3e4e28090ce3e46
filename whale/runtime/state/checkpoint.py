"""Sharded checkpoints on ``torch.distributed.checkpoint`` that any plan can load.

Each rank writes only what it holds (a pipeline rank its stages, a tensor-parallel rank its
shard's blocks where they sit in the whole tensor); a tensor several ranks hold alike (data
parallel replicas, parameters a tensor-parallel group does not shard, tied weights) is written
once, by DCP's deduplication. Names are the local model's, so a checkpoint saved under data
parallel loads under a pipeline, tensor parallel under data parallel, 2 ranks under 4, and into
the local model itself. Under ``Config(zero_stage=...)`` a rank holds a slice of each
parameter's flattened elements (its optimizer state; under stage 3 the parameter too): it writes
that slice as the few boxes of the parameter's shape it is (``local_state.flat_boxes``), where
they sit, so a ZeRO checkpoint is the same as any other and loads under any plan or stage. Layout under a root directory::

    ckpt/step-00000120/.metadata, __0_0.distcp, ...
        model.<name>                 the local model's state_dict() entries
        optim.state.<name>.<key>     the optimizer's state of each parameter (exp_avg ...)
        optim.param_groups.<name>    its group's hyperparameters (pickled)
        step                         the step given to save

Example::

    wh.checkpoint.save("ckpt", program, optimizer, step=step)       # every rank
    step = wh.checkpoint.load("ckpt", program, optimizer)            # the newest, any plan

    # the local model and a checkpoint, both ways (no process group needed):
    wh.checkpoint.save("ckpt", model, optimizer, step=0)             # model: a plain nn.Module
    step = wh.checkpoint.load("ckpt", model, optimizer)
    # or a torch.save file of the nested dict {"model": model.state_dict(), "optim": ..., "step": n}:
    torch.distributed.checkpoint.format_utils.dcp_to_torch_save(wh.checkpoint.latest("ckpt"), "model.pt")
    # and back: a file of {"model": model.state_dict()} as a checkpoint any plan loads
    torch.distributed.checkpoint.format_utils.torch_save_to_dcp("model.pt", "ckpt/step-00000000")
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from . import ckpt_dirs
from .ckpt_dirs import latest
from .dcp_chunks import ChunkedTensor
from .local_state import LocalTensor, local_state, program_stages
from .optim_state import (
    GROUPS,
    apply_optimizer_state,
    optimizer_load_targets,
    optimizer_names,
    optimizer_save_state,
)

__all__ = ["SaveHandle", "latest", "load", "save"]

MODEL = "model."


class SaveHandle:
    """A save running behind training (``save(..., asynchronous=True)``): ``wait()`` returns
    the checkpoint's path once every rank's part is written and the checkpoint is in place, or
    raises the save's error. The next ``save`` or ``load`` of the same program waits for it."""

    def __init__(self, work: Any, args: tuple) -> None:
        self._result: Path | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work, args), name="whale-checkpoint", daemon=True)
        self._thread.start()

    def _run(self, work: Any, args: tuple) -> None:
        try:
            self._result = work(*args)
        except BaseException as err:  # noqa: BLE001 - handed to wait()
            self._error = err

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> Path:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the checkpoint save did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result


def save(
    path: str | os.PathLike, program: Any, optimizer: torch.optim.Optimizer | None = None, *,
    step: int = 0, asynchronous: bool = False,
) -> Path | SaveHandle:
    """Save ``program``'s state (and ``optimizer``'s) as the checkpoint of ``step`` under the
    root ``path`` (``path/step-<step>``). Collective: call it on every rank.

    Each rank writes only its own shards; the checkpoint appears all at once, after every rank
    has written (a crash or an error midway leaves the previous checkpoints as they were).

    Args:
        path: the checkpoint root (created if missing; on a file system every rank sees).
        program: a program from :func:`whale.parallelize`, or the local ``nn.Module``.
        optimizer: an optimizer over ``program.parameters()``, or None.
        step: the training step the state follows; :func:`load` returns it.
        asynchronous: copy the state to CPU memory now and write it in a background thread over
            a process group of its own; returns a :class:`SaveHandle` (``handle.wait()``).

    Returns:
        The checkpoint's directory, or a :class:`SaveHandle`.

    Example::

        handle = wh.checkpoint.save("ckpt", program, opt, step=step, asynchronous=True)
        ...  # train on
        handle.wait()
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"wh.checkpoint.save(step={step!r}): pass the training step, an int >= 0")
    io = _io_of(program)
    io.wait()
    state = _save_state(program, optimizer, step, snapshot=asynchronous)
    root = Path(path)
    if not asynchronous:
        return _write(state, root, step, None)
    group = io.background_group()
    io.pending = SaveHandle(_write, (state, root, step, group))
    return io.pending


def load(
    path: str | os.PathLike, program: Any, optimizer: torch.optim.Optimizer | None = None, *,
    step: int | None = None,
) -> int:
    """Load a checkpoint saved under any plan into ``program`` (and ``optimizer``), in place.
    Collective: call it on every rank.

    Args:
        path: a checkpoint root (its newest checkpoint is loaded, or that of ``step``), or one
            checkpoint's directory.
        program: a program from :func:`whale.parallelize`, or the local ``nn.Module``.
        optimizer: an optimizer over ``program.parameters()`` (its state and hyperparameters
            are replaced by the checkpoint's), or None to load the model only.

    Returns:
        The step the checkpoint was saved with (0 for one converted from a torch.save file).

    Raises:
        FileNotFoundError: no checkpoint at ``path``, on every rank alike (the ranks compare
            what they found before reading anything).
        ValueError: the checkpoint is of another model (naming the missing, unexpected and
            mismatched keys) or holds no optimizer state where one is asked for.
    """
    _io_of(program).wait()
    where = _agreed_checkpoint(path, step)
    metadata = dcp.FileSystemReader(where).read_metadata()
    entries = local_state(program)
    _check_model(where, metadata, program, entries)
    targets: dict[str, Any] = {"model": _present({k: _target(e) for k, e in entries.items()})}
    if "step" in metadata.state_dict_metadata:  # absent from a converted torch.save file
        targets["step"] = None
    named = list(program.named_parameters())
    tensors: dict = {}
    if optimizer is not None:
        names = optimizer_names(optimizer, named)
        if not any(k.startswith(GROUPS) for k in metadata.state_dict_metadata):
            raise ValueError(f"the checkpoint at {where} holds no optimizer state; pass optimizer=None to load the model only")
        targets["optim"], tensors = optimizer_load_targets(names, _optimizer_entries(program, entries), optimizer, metadata)
    with _quiet():
        dcp.load(targets, storage_reader=dcp.FileSystemReader(where), no_dist=not _distributed())
    if optimizer is not None:
        apply_optimizer_state(optimizer, names, targets["optim"], tensors)
    return int(targets.get("step") or 0)


# ---- saving --------------------------------------------------------------------------------


def _save_state(program: Any, optimizer: torch.optim.Optimizer | None, step: int, snapshot: bool) -> dict[str, Any]:
    zero = getattr(program, "_zero", None)
    if zero is not None:
        zero.sync()  # ZeRO 1/2: the optimizer's last update into the full parameters (collective)
    entries = local_state(program)
    state: dict[str, Any] = {"model": _present({k: _source(e, snapshot) for k, e in entries.items()}), "step": step}
    if optimizer is not None:
        names = optimizer_names(optimizer, list(program.named_parameters()))
        state["optim"] = optimizer_save_state(optimizer, names, _optimizer_entries(program, entries), snapshot)
    return state


def _optimizer_entries(program: Any, entries: dict[str, LocalTensor]) -> dict[str, LocalTensor]:
    """Where the optimizer's parameters lie: the model's entries, or under ZeRO its shards."""
    zero = getattr(program, "_zero", None)
    return entries if zero is None or zero.stage == 3 else local_state(program, optimizer_view=True)


def _source(entry: LocalTensor, snapshot: bool) -> torch.Tensor | None:
    t = entry.tensor.detach()
    if snapshot:
        t = t.to("cpu", copy=True)
    if not entry.sharded:
        return t
    blocks = dataclasses.replace(entry, tensor=t).blocks()
    return ChunkedTensor(entry.global_shape, blocks) if blocks else None


def _target(entry: LocalTensor) -> torch.Tensor | None:
    if not entry.sharded:
        return entry.tensor
    blocks = entry.blocks()
    return ChunkedTensor(entry.global_shape, blocks) if blocks else None


def _present(tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Leave out what this rank holds none of (an empty ZeRO shard): other ranks write it."""
    return {k: v for k, v in tensors.items() if v is not None}


def _write(state: dict, root: Path, step: int, group: Any) -> Path:
    """Write ``state`` into a fresh hidden directory, then rename it into place (rank 0) once
    every rank has written; every rank returns or raises alike."""
    distributed = _distributed()
    rank = dist.get_rank(group) if distributed else 0
    box: list = [None]
    if rank == 0:
        try:
            box[0] = str(ckpt_dirs.make_temp(root, step))
        except OSError as err:
            box[0] = err
    if distributed:
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if isinstance(box[0], OSError):
        raise OSError(f"wh.checkpoint.save: cannot create a directory under {root}: {box[0]}")
    temp = Path(box[0])
    final = ckpt_dirs.step_dir(root, step)
    try:
        with _quiet():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(temp), process_group=group, no_dist=not distributed)
    except CheckpointException as err:
        _discard(temp, rank)
        raise RuntimeError(
            f"wh.checkpoint.save of step {step} under {root} failed ({_failures(err)}); nothing of it "
            "was kept and the previous checkpoints are as they were"
        ) from err
    except BaseException:
        _discard(temp, rank)
        raise
    result: list = [None]
    if rank == 0:
        try:
            ckpt_dirs.commit(temp, final)
        except OSError as err:
            result[0] = f"wh.checkpoint.save: cannot move {temp} into place as {final}: {err}"
    if distributed:
        dist.broadcast_object_list(result, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if result[0] is not None:
        raise OSError(result[0])
    return final


def _discard(temp: Path, rank: int) -> None:
    if rank == 0:
        shutil.rmtree(temp, ignore_errors=True)


def _failures(err: CheckpointException) -> str:
    return "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, (e, _) in sorted(err.failures.items()))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns that a save without a process group is meant for one process: here it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class _CheckpointIO:
    """Per program: the save in flight, and the process group background saves use (made
    once, collectively, at the first asynchronous save)."""

    def __init__(self) -> None:
        self.pending: SaveHandle | None = None
        self._group = None

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.wait()

    def background_group(self) -> Any:
        if not _distributed():
            return None
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group


def _io_of(program: Any) -> _CheckpointIO:
    program_stages(program)  # a clear TypeError for anything that is neither kind
    io = program.__dict__.get("_whale_checkpoint_io")
    if io is None:
        io = _CheckpointIO()
        program.__dict__["_whale_checkpoint_io"] = io
    return io


# ---- checking a checkpoint against the program ----------------------------------------------


def _agreed_checkpoint(path: str | os.PathLike, step: int | None) -> Path:
    """The checkpoint every rank loads: each finds it on its own file system, then the ranks
    compare, so a rank that cannot see it (or sees another) fails every rank alike."""
    try:
        where, error = ckpt_dirs.resolve(path, step), None
    except FileNotFoundError as err:
        where, error = None, str(err)
    if not _distributed() or dist.get_world_size() == 1:
        if error is not None:
            raise FileNotFoundError(error)
        return where
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (str(where) if where else None, error))
    failed = [(r, e) for r, (_, e) in enumerate(seen) if e is not None]
    if failed:
        rank, first = failed[0]
        raise FileNotFoundError(f"{first} (on rank {rank}{'' if len(failed) == 1 else f' and {len(failed) - 1} more'})")
    found = {w for w, _ in seen}
    if len(found) > 1:
        raise ValueError(
            f"the ranks found different checkpoints under {path}: {sorted(found)}; checkpoints must be on a "
            "file system every rank sees alike (pass step= to pick one)"
        )
    return where


def _check_model(where: Path, metadata: Any, program: Any, entries: dict[str, LocalTensor]) -> None:
    """Raise on every rank if the checkpoint is not of this model: keys missing or unexpected,
    or shapes that differ (each rank checks those it holds; the ranks share what they found)."""
    saved = {k[len(MODEL):]: md for k, md in metadata.state_dict_metadata.items() if k.startswith(MODEL)}
    stages = program_stages(program)
    expected = list(program.program.state_keys) if stages is not None else list(entries)
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in set(expected)]
    mismatched = []
    for name, entry in entries.items():
        md = saved.get(name)
        if isinstance(md, TensorStorageMetadata) and tuple(md.size) != entry.global_shape:
            mismatched.append(f"{name}: checkpoint {tuple(md.size)}, model {entry.global_shape}")
    if _distributed():
        found: list = [None] * dist.get_world_size()
        dist.all_gather_object(found, mismatched)
        mismatched = sorted({m for part in found for m in part})
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if mismatched:
            parts.append(f"mismatched shapes {_few(mismatched)}")
        raise ValueError(
            f"the checkpoint at {where} is not of this model ({_model_name(program)}): "
            f"{'; '.join(parts)}; load a checkpoint saved from the same model (any plan)"
        )


def _few(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... ({len(items)} in all)' if len(items) > limit else ''}]"


def _model_name(program: Any) -> str:
    if program_stages(program) is None:
        return type(program).__name__
    return program.program.call.model_name
