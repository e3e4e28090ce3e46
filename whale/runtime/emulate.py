"""Emulated slow devices at run time: stretching a rank's compute by idling.

``WHALE_EMULATE_SLOWDOWN`` (read and checked by :mod:`whale.ir.emulation`) names ranks that
behave as devices ``FACTOR`` times slower. Each compute piece (a stage's forward or backward
of a micro-batch, a data-parallel forward or backward) is followed by ``time.sleep`` of
``(FACTOR - 1)`` times what it took, so the rank idles rather than burning the CPU the other
ranks need. A gradient reducer paces its bucket launches the same way (:meth:`Stretch.catch_up`
before each launch), so the other ranks receive the slow rank's gradients when a slow device
would have sent them. A testing aid: it lets one host show what a mixed cluster does.
"""

from __future__ import annotations

import time

import torch.distributed as dist

from ..ir.emulation import ENV_VAR, Slowdowns, slowdown_factor, slowdown_from_env

__all__ = ["Stretch", "check_ranks", "from_env_checked", "rank_slowdown"]


class Stretch:
    """One rank's emulated slowdown for the compute pieces of a step.

    ``begin()`` before a piece, ``end()`` after it: the piece then lasts ``factor`` times its
    compute. ``catch_up()`` inside a piece idles for what is owed so far (a gradient bucket then
    leaves when the slow device would have made it).

    Example::

        stretch = Stretch(3.0)
        stretch.begin(); y = model(x); stretch.end()  # lasts 3x the forward
    """

    __slots__ = ("_began", "_slept", "factor")

    def __init__(self, factor: float = 1.0) -> None:
        self.factor = factor
        self._began: float | None = None
        self._slept = 0.0

    def begin(self) -> None:
        if self.factor > 1.0:
            self._began = time.perf_counter()
            self._slept = 0.0

    def catch_up(self) -> None:
        """Idle until ``factor`` x the compute since :meth:`begin` has passed."""
        if self._began is None:
            return
        now = time.perf_counter()
        owed = (self.factor - 1.0) * (now - self._began - self._slept) - self._slept
        if owed > 0:
            time.sleep(owed)
            self._slept += time.perf_counter() - now

    def end(self) -> None:
        self.catch_up()
        self._began = None


def rank_slowdown(spec: Slowdowns, rank: int, step: int) -> Stretch:
    """The stretch of ``rank`` at ``step`` (factor 1, doing nothing, where none is named)."""
    return Stretch(slowdown_factor(spec, rank, step))


def check_ranks(spec: Slowdowns, world_size: int) -> None:
    """Every rank the spec names is in the world."""
    outside = sorted(r for r in spec if r >= world_size)
    if outside:
        raise ValueError(
            f"{ENV_VAR} names rank(s) {outside} but the world has {world_size} ranks "
            f"(0..{world_size - 1}); name ranks of this job"
        )


def from_env_checked() -> Slowdowns:
    """The spec in the environment, checked against the world if it is initialized."""
    spec = slowdown_from_env()
    if spec and dist.is_available() and dist.is_initialized():
        check_ranks(spec, dist.get_world_size())
    return spec
