"""Emulated slow devices, a testing aid: ``WHALE_EMULATE_SLOWDOWN="RANK:FACTOR[@STEP],..."``.

Each entry makes rank ``RANK`` behave as a device ``FACTOR`` times slower, from step ``STEP`` on
(0, the first step, when left out): the runtime stretches the rank's compute by idling
(:mod:`whale.runtime.emulate`), and the profiler divides the rates it measures on that rank by
the factor, so the planner sees the emulated speed as it would see a real one. A rank may get
several entries with different steps (a device that slows down, then recovers: ``1:3@10,1:1@20``).

Example::

    WHALE_EMULATE_SLOWDOWN="1:2,0:1.5@10" torchrun --nproc_per_node=2 train.py
    # rank 1 runs at half speed from the start, rank 0 at 1/1.5 of its speed from step 10

This module only reads and checks the text; nothing here sleeps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

__all__ = [
    "ENV_VAR",
    "GRAMMAR",
    "Slowdowns",
    "parse_slowdown",
    "slowdown_factor",
    "slowdown_from_env",
]

ENV_VAR = "WHALE_EMULATE_SLOWDOWN"
GRAMMAR = 'RANK:FACTOR[@STEP],... e.g. "1:2,0:1.5@10" (RANK and STEP ints >= 0, FACTOR a number >= 1)'

Slowdowns = dict[int, tuple[tuple[float, int], ...]]
"""Per rank, its ``(factor, from_step)`` entries in step order."""


def parse_slowdown(text: str, *, source: str = ENV_VAR) -> Slowdowns:
    """Read ``"RANK:FACTOR[@STEP],..."``; an empty text emulates nothing.

    A factor is a finite number >= 1 (1 leaves the rank as it is; a faster device cannot be
    emulated by idling). The same rank at the same step twice is an error.

    Raises:
        ValueError: naming the entry that does not parse and the grammar.

    Example::

        >>> parse_slowdown("1:2,0:1.5@10")
        {0: ((1.5, 10),), 1: ((2.0, 0),)}
    """
    if not isinstance(text, str):
        raise TypeError(
            f"{source} must be a string of the form {GRAMMAR}, got {type(text).__name__}"
        )
    out: dict[int, dict[int, float]] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            if text.strip():
                raise ValueError(
                    f"{source}={text!r} has an empty entry; write {GRAMMAR}"
                )
            continue
        rank, factor, step = _entry(entry, text, source)
        phases = out.setdefault(rank, {})
        if step in phases:
            raise ValueError(
                f"{source}={text!r} gives rank {rank} twice at step {step}; give each rank one "
                f"factor per step ({GRAMMAR})"
            )
        phases[step] = factor
    return {
        rank: tuple((f, s) for s, f in sorted(phases.items()))
        for rank, phases in sorted(out.items())
    }


def _entry(entry: str, text: str, source: str) -> tuple[int, float, int]:
    def bad(what: str) -> ValueError:
        return ValueError(f"{source}={text!r}: entry {entry!r} {what}; write {GRAMMAR}")

    rank_text, colon, rest = entry.partition(":")
    if not colon:
        raise bad("has no ':' between RANK and FACTOR")
    factor_text, at, step_text = rest.partition("@")
    rank = _int(rank_text)
    if rank is None:
        raise bad(f"has rank {rank_text.strip()!r}, not an int >= 0")
    try:
        factor = float(factor_text)
    except ValueError:
        raise bad(f"has factor {factor_text.strip()!r}, not a number") from None
    if not math.isfinite(factor) or factor <= 0:
        raise bad(
            f"has factor {factor_text.strip()!r}: a factor is a finite positive number"
        )
    if factor < 1:
        raise bad(
            f"has factor {factor:g} < 1: idling can only make a rank slower (use a factor >= 1, "
            "1 for the rank as it is)"
        )
    step = 0
    if at:
        step = _int(step_text)
        if step is None:
            raise bad(f"has step {step_text.strip()!r}, not an int >= 0")
    return rank, factor, step


def _int(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() and text.isascii() else None


def slowdown_factor(
    spec: Mapping[int, tuple[tuple[float, int], ...]], rank: int, step: int = 0
) -> float:
    """How many times slower ``rank`` runs at ``step`` (1.0 where the spec names no entry for it).

    The entry with the largest ``from_step <= step`` holds.

    Example::

        >>> slowdown_factor(parse_slowdown("1:2,1:4@10"), 1, 12)
        4.0
    """
    factor = 1.0
    for value, from_step in spec.get(rank, ()):
        if from_step > step:
            break
        factor = value
    return factor


def slowdown_from_env(environ: Mapping[str, str] | None = None) -> Slowdowns:
    """The spec in ``WHALE_EMULATE_SLOWDOWN`` (empty when unset); raises ValueError if it does
    not parse."""
    environ = os.environ if environ is None else environ
    return parse_slowdown(environ.get(ENV_VAR, ""))
