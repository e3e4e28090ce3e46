"""At ``parallelize``: every rank must run the same Config, plan, model and torch.

A Config that differs between ranks (``grad_comm_dtype``, ``bucket_cap_mb``) makes ranks build
different buckets and collectives: they hang or fail far from the cause. One small gather when
the program binds compares a digest of each Config field, the plan, the model's parameters and
the torch version, and every rank raises the same error naming each difference.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["check_same_setup", "setup_digests"]

_SHOWN = 80  # characters of a value shown in the error
# Config fields that may differ between ranks without changing what they run: local paths (the
# plan and profiles a path names are compared by what they give) and rank 0's printing.
_PER_RANK = frozenset({"offload_dir", "plan", "profiles", "quiet"})


def setup_digests(config: Any, plan: Any, param_bytes: dict[str, int]) -> list[tuple[str, int, str]]:
    """``(what, crc32, shown value)`` of each thing every rank must hold alike."""
    out = []
    for field in dataclasses.fields(config):
        if field.name in _PER_RANK:
            continue
        text = repr(getattr(config, field.name))
        out.append((f"Config.{field.name}", zlib.crc32(text.encode()), _short(text)))
    model = ";".join(f"{n}:{b}" for n, b in sorted(param_bytes.items()))
    out.append(("the model's parameters (names and sizes)", zlib.crc32(model.encode()), f"{len(param_bytes)} parameters"))
    text = plan.to_json()
    out.append(("the plan", zlib.crc32(text.encode()), f"digest {zlib.crc32(text.encode()):08x}"))
    out.append(("the torch version", zlib.crc32(torch.__version__.encode()), torch.__version__))
    return out


def check_same_setup(config: Any, plan: Any, param_bytes: dict[str, int]) -> None:
    """Collective (all ranks): raise ValueError on every rank if their setups differ."""
    mine = setup_digests(config, plan, param_bytes)
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    problems = _differences(every)
    if problems:
        raise ValueError(
            f"rank {dist.get_rank()}: the ranks called wh.parallelize with different setups: "
            + "; ".join(problems)
            + ". Every rank must build the same model with the same wh.Config (and cluster), "
            "e.g. from one config file, not per-rank arguments"
        )


def _differences(every: list[list[tuple[str, int, str]]]) -> list[str]:
    problems = []
    lengths = {len(d) for d in every}
    if len(lengths) > 1:  # a different whale on some rank: its Config has other fields
        return [f"the Config has {sorted(lengths)} fields on different ranks (different whale versions)"]
    for k, (what, _, _) in enumerate(every[0]):
        values: dict[int, list[int]] = {}
        shown: dict[int, str] = {}
        for rank, digests in enumerate(every):
            _, crc, text = digests[k]
            values.setdefault(crc, []).append(rank)
            shown[crc] = text
        if len(values) > 1:
            parts = [f"{shown[crc]} on {_ranks(ranks)}" for crc, ranks in values.items()]
            problems.append(f"{what} differs: " + ", ".join(parts))
    # A plan differing only because a Config field does says nothing new.
    if len(problems) > 1:
        problems = [p for p in problems if not p.startswith("the plan differs")]
    elif problems and problems[0].startswith("the plan differs"):
        problems[0] += (
            " (the ranks planned from different facts: each rank's devices and memory, "
            "or a measured profile; pass Config(cluster=...) so every rank plans for one cluster)"
        )
    return problems


def _ranks(ranks: list[int]) -> str:
    head = ", ".join(map(str, ranks[:8])) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
    return f"rank{'s' if len(ranks) > 1 else ''} {head}"


def _short(text: str) -> str:
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."
