"""Every step: do the ranks pass the same batch? Shapes, dtypes and a checksum of the values.

Ranks passing batches of one shape but different values (the DistributedDataParallel habit:
each rank loads its own rows) would each keep their replica's rows of a different batch and
silently train on part of the data. So a step's fingerprint covers values as well: an integer
checksum of each input's bytes, weighted by position (a permutation of rows changes it too),
computed where the batch lives (no copy to the host, no synchronization) in integer arithmetic,
so ranks on different devices agree bit for bit. Its cost is one multiply-add pass over the
batch: 40 ms for 64 ImageNet images (37 MiB) on one CPU thread, 0.25% of a ResNet-18-sized
step, 0.4 ms for 8 x 1024 tokens (benchmarks/bench_guard.py). Only a 20-bit digest of it travels: a
difference is missed with probability 2**-20 per step.

With ``batch="local"`` replicas legitimately pass different rows: then only shapes (without
the rows) are compared across the world, and values within each replica, whose ranks (its
pipeline stages, its tensor-parallel shards) must pass the same rows. On a mismatch every rank
gathers every rank's per-input digests and raises the same error naming each input that differs.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .step_state import every_rank

__all__ = ["BatchAgreement", "BatchCheck", "describe_mismatch", "digest_digits", "digits_agree"]

_MASK = 2**20 - 1
# Odd multipliers: the golden ratio's (64-bit, as signed int64) and a 32-bit one.
_K1 = 0x9E3779B97F4A7C15 - 2**64
_K2 = 0x27D4EB2F
# Elements per pass: the products go through a scratch buffer of this many int32 (16 MiB).
_CHUNK = 1 << 22
_scratch: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def value_checksum(t: torch.Tensor) -> torch.Tensor:
    """An int64 scalar (on ``t``'s device) of ``t``'s bytes, each weighted by its position.

    The bytes are read as int32 words (int16 or bytes for smaller elements), multiplied by
    odd position weights and summed, all modulo 2**32: exact and order-free, so every device
    and thread count gives the same bits, and any single changed word changes the sum (an
    odd weight times a non-zero difference is non-zero modulo 2**32).
    """
    t = t.detach()
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=t.device)
    data = t.contiguous().reshape(-1)
    nbytes = data.numel() * data.element_size()
    if data.dtype == torch.bool:
        data = data.view(torch.uint8)
    for dtype, size in ((torch.int32, 4), (torch.int16, 2), (torch.uint8, 1)):
        if data.element_size() >= size and nbytes % size == 0:
            words = data.view(torch.uint8).view(dtype) if data.element_size() != size else data.view(dtype)
            break
    weights, scratch = _buffers(words.device)
    total = torch.zeros((), dtype=torch.int32, device=words.device)
    for at in range(0, words.numel(), _CHUNK):
        part = words[at : at + _CHUNK]
        n = part.numel()
        summed = torch.mul(part, weights[:n], out=scratch[:n]).sum(dtype=torch.int32)
        total = total * _K2 + summed  # chunk order counts too (wraps modulo 2**32)
    return total.to(torch.int64)


def _buffers(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The position weights and the product scratch of ``device``, made once."""
    got = _scratch.get(device)
    if got is None:
        w = (torch.arange(_CHUNK, dtype=torch.int64, device=device) * _K1 + _K2) | 1
        got = _scratch[device] = (w.to(torch.int32), torch.empty(_CHUNK, dtype=torch.int32, device=device))
    return got


def _fold(h: torch.Tensor) -> torch.Tensor:
    """A 20-bit digest of an int64 tensor scalar, every bit of it mixed in."""
    return (h ^ (h >> 20) ^ (h >> 40) ^ (h >> 60)) & _MASK


class BatchCheck:
    """The digests of one step's batch on this rank.

    Args:
        entries: ``(label, value)`` of every input and the target, flattened.
        dim: the batch dimension; ``local`` leaves the rows out of the world-wide digest.
        values: checksum values too (``Config.check_batch_values``), not only shapes.

    ``world_digest`` (20-bit, int64 tensor scalar) must be equal on every rank;
    ``replica_digest`` (``batch="local"`` with values) on the ranks of one replica.
    """

    def __init__(self, entries: list[tuple[str, object]], dim: int, *, local: bool, values: bool, device: torch.device) -> None:
        self.entries = entries
        self.local = local
        self._shapes = [_shape(v, dim if local else None) for _, v in entries]
        self._full_shapes = [_shape(v, None) for _, v in entries]
        shapes = zlib_crc(";".join(self._shapes))
        self.hashes: list[torch.Tensor | None] = [
            value_checksum(v) if values and isinstance(v, torch.Tensor) else None for _, v in entries
        ]
        total = torch.zeros((), dtype=torch.int64, device=device)
        for h in self.hashes:
            if h is not None:
                total = total * _K1 + h.to(device)
        if local:
            self.world_digest = torch.tensor(shapes, dtype=torch.int64, device=device)
            full = zlib_crc(";".join(self._full_shapes))
            self.replica_digest = _fold(total ^ full) if values else None
        else:
            self.world_digest = _fold(total ^ shapes) if values else torch.tensor(shapes & _MASK, dtype=torch.int64, device=device)
            self.replica_digest = None
        self.world_digest = self.world_digest & _MASK

    def summary(self) -> tuple:
        """What :func:`describe_mismatch` compares: shapes and value checksums per input."""
        hashes = [None if h is None else int(h) for h in self.hashes]
        return [(label, shape, full, h) for (label, _), shape, full, h in zip(self.entries, self._shapes, self._full_shapes, hashes)]


def zlib_crc(text: str) -> int:
    return zlib.crc32(text.encode())


def _shape(value: object, rows_dim: int | None) -> str:
    if isinstance(value, torch.Tensor):
        shape = list(value.shape)
        if rows_dim is not None and shape:
            shape[rows_dim] = -1
        return f"{value.dtype}{shape}".replace("torch.", "")
    return type(value).__name__


def labelled(args: tuple, kwargs: dict, target: object) -> list[tuple[str, object]]:
    """Every leaf of a step's inputs with a label a person reads: ``input 0``,
    ``input 'attention_mask'``, ``target[1]``."""
    out: list[tuple[str, object]] = []

    def walk(label: str, value: object) -> None:
        if isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                walk(f"{label}[{i}]", v)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{label}[{k!r}]", v)
        else:
            out.append((label, value))

    for i, a in enumerate(args):
        walk(f"input {i}", a)
    for k, v in kwargs.items():
        walk(f"input {k!r}", v)
    walk("target", target)
    return out


def digest_digits(digest: torch.Tensor) -> torch.Tensor:
    """A 20-bit digest as four 5-bit digits and their squares (float64, on its device),
    ``[d0, d0**2, d1, ...]``: summed over ranks they stay exact even in float32 (up to ~17,000
    ranks), so they can ride on a gradient bucket; see :func:`digits_agree`."""
    shifts = torch.tensor([0, 5, 10, 15], dtype=torch.int64, device=digest.device)
    d = ((digest >> shifts) & 31).double()
    return torch.stack([d, d * d], dim=1).reshape(-1)


def digits_agree(summed: list[float], world: int) -> bool:
    """Whether summed :func:`digest_digits` come from one digest on every rank (equality in
    Cauchy-Schwarz: world * sum(d**2) == sum(d)**2 exactly when all d are equal)."""
    return all(world * round(summed[2 * k + 1]) == round(summed[2 * k]) ** 2 for k in range(4))


class BatchAgreement:
    """Checks, without blocking, that the ranks' batches agree; sums their rows.

    One small asynchronous all-reduce (int64) carries the rows, the world digest f with f**2
    (all ranks agree exactly when world * sum(f**2) == sum(f)**2) and, with ``batch="local"``,
    one slot per replica holding its ranks' replica digests alike.
    """

    def __init__(self, check: BatchCheck, my_rows: int, device: torch.device, replicas: Sequence[Sequence[int]]) -> None:
        self.check = check
        num_replicas = len(replicas)
        replica = next(r for r, ranks in enumerate(replicas) if dist.get_rank() in ranks)
        self._replica_slots = check.replica_digest is not None and dist.get_world_size() > num_replicas
        self._replicas = replicas
        parts = [torch.tensor([my_rows], dtype=torch.int64, device=device), check.world_digest.reshape(1), (check.world_digest**2).reshape(1)]
        if self._replica_slots:
            slots = torch.zeros(2 * num_replicas, dtype=torch.int64, device=device)
            v = check.replica_digest
            slots[2 * replica] = v
            slots[2 * replica + 1] = v * v
            parts.append(slots)
        self._summed = torch.cat(parts)
        self._work = dist.all_reduce(self._summed, async_op=True)
        self._total: int | None = None

    def wait(self) -> int:
        """The rows summed over all ranks; raises ValueError on every rank if batches differ."""
        if self._total is None:
            self._work.wait()
            summed = self._summed.tolist()
            world = dist.get_world_size()
            ok = world * summed[2] == summed[1] ** 2
            if self._replica_slots:
                ok = ok and all(
                    len(ranks) * summed[4 + 2 * r] == summed[3 + 2 * r] ** 2 for r, ranks in enumerate(self._replicas)
                )
            if not ok:
                raise every_rank(ValueError(describe_mismatch(self.check, self._replicas)))
            self._total = summed[0]
        return self._total


def describe_mismatch(check: BatchCheck, replicas: Sequence[Sequence[int]], when: str = "") -> str:
    """Collective (all ranks): the error every rank raises, naming each input that differs."""
    rank, world = dist.get_rank(), dist.get_world_size()
    every: list = [None] * world
    dist.all_gather_object(every, check.summary())
    problems = []
    lengths = {len(s) for s in every}
    if len(lengths) > 1:
        problems.append(f"the number of inputs differs ({sorted(lengths)}): shapes or dtypes differ")
    else:
        for k, (label, *_) in enumerate(every[0]):
            shapes = {}
            for r, s in enumerate(every):
                shapes.setdefault(s[k][1], []).append(r)
            if len(shapes) > 1:
                seen = ", ".join(f"{shape} on ranks {ranks}" for shape, ranks in shapes.items())
                problems.append(f"{label}: shapes or dtypes differ ({seen})")
                continue
            # Values: over the world (global batch), within each replica (local rows).
            groups = [list(range(world))] if not check.local else [list(r) for r in replicas]
            for ranks in groups:
                full = {every[r][k][2] for r in ranks}
                values = {every[r][k][3] for r in ranks}
                if len(full) > 1:
                    problems.append(f"{label}: shapes differ within ranks {list(ranks)} ({sorted(full)})")
                elif len(values) > 1 and None not in values:
                    by_value: dict = {}
                    for r in ranks:
                        by_value.setdefault(every[r][k][3], []).append(r)
                    problems.append(
                        f"{label}: values differ, same shape {every[ranks[0]][k][2]} "
                        f"(ranks {' vs '.join(str(v) for v in by_value.values())})"
                    )
    if not problems:
        problems.append("their digests differ (a rank's batch changed while the check ran)")
    if check.local:
        advice = (
            "With batch='local' each replica's ranks (its pipeline stages and tensor-parallel "
            f"shards: {[list(r) for r in replicas][:4]}{'...' if len(replicas) > 4 else ''}) must "
            "pass the same rows, cut by program.local_slice, and every rank inputs of one shape"
        )
    else:
        advice = (
            "Every rank must pass the same global batch (e.g. the same seed for the data loader's "
            "shuffle), or, to load each rank's own rows as with DistributedDataParallel, pass "
            "batch='local' (Config(batch='local') or step(..., batch='local')) with the rows cut "
            "by program.local_slice"
        )
    return f"rank {rank}: the ranks passed different batches{when}: " + "; ".join(problems) + ". " + advice
