"""Emulated slow devices at run time: stretching a rank's compute by idling.

``WHALE_EMULATE_SLOWDOWN`` (read and checked by :mod:`whale.ir.emulation`) names ranks that
behave as devices ``FACTOR`` times slower. Each compute piece (a stage's forward or backward
of a micro-batch, a data-parallel forward or backward) is followed by ``time.sleep`` of
``(FACTOR - 1)`` times what it took, so the rank idles rather than burning the CPU the other
ranks need. A gradient reducer paces its bucket launches the same way (:meth:`Stretch.catch_up`
before each launch), so the other ranks receive the slow rank's gradients when a slow device
would have sent them. The optimizer step the user runs after ``step`` over the program's
parameters is stretched alike (:func:`stretch_optimizer_steps`: a slow device updates its
weights slowly too, and the planner's cost model counts that step at the device's speed). A
testing aid: it lets one host show what a mixed cluster does.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from ..ir.emulation import ENV_VAR, Slowdowns, slowdown_factor, slowdown_from_env

__all__ = ["Stretch", "check_ranks", "from_env_checked", "rank_slowdown", "slows_down", "stretch_optimizer_steps"]


class Stretch:
    """One rank's emulated slowdown for the compute pieces of a step.

    ``begin()`` before a piece, ``end()`` after it: the piece then lasts ``factor`` times its
    compute. ``catch_up()`` inside a piece idles for what is owed so far (a gradient bucket then
    leaves when the slow device would have made it). A sleep that wakes late (a busy host) is
    taken off the next piece's idling, so a step of several pieces is not stretched by the
    scheduler's wake-up latency on top of the factor.

    Example::

        stretch = Stretch(3.0)
        stretch.begin(); y = model(x); stretch.end()  # lasts 3x the forward
    """

    __slots__ = ("_began", "_credit", "_slept", "factor")

    def __init__(self, factor: float = 1.0) -> None:
        self.factor = factor
        self._began: float | None = None
        self._slept = 0.0
        self._credit = 0.0  # seconds slept beyond what earlier pieces owed

    def begin(self) -> None:
        if self.factor > 1.0:
            self._began = time.perf_counter()
            self._slept = 0.0

    def _owed(self, now: float) -> float:
        return (self.factor - 1.0) * (now - self._began - self._slept) - self._slept - self._credit

    def catch_up(self) -> None:
        """Idle until ``factor`` x the compute since :meth:`begin` has passed."""
        if self._began is None:
            return
        now = time.perf_counter()
        owed = self._owed(now)
        if owed > 0:
            time.sleep(owed)
            self._slept += time.perf_counter() - now

    def end(self) -> None:
        self.catch_up()
        if self._began is not None:
            self._credit = max(0.0, -self._owed(time.perf_counter()))
        self._began = None


def rank_slowdown(spec: Slowdowns, rank: int, step: int) -> Stretch:
    """The stretch of ``rank`` at ``step`` (factor 1, doing nothing, where none is named)."""
    return Stretch(slowdown_factor(spec, rank, step))


def slows_down(spec: Slowdowns, rank: int) -> bool:
    """Whether ``spec`` ever makes ``rank`` slower (some factor above 1)."""
    return any(factor > 1.0 for factor, _ in spec.get(rank, ()))


def stretch_optimizer_steps(owner: object, parameters: Callable[[Any], Iterable[torch.Tensor]],
                            factor: Callable[[Any], float]) -> Callable[[], None]:  # fmt: skip
    """Make every ``torch.optim`` step over ``owner``'s parameters last ``factor()`` times its
    compute on this rank (the user steps the optimizer, so whale hooks it: global step hooks of
    ``torch.optim``, which an optimizer over other tensors passes untouched).

    Args:
        owner: the program; the hooks go when it is garbage collected (held weakly, and passed
            to the two functions below, which must not hold it themselves).
        parameters: ``owner``'s tensors the optimizer steps (its ``parameters()``), read at an
            optimizer's first step; an optimizer holding any of them is stretched.
        factor: ``owner``'s slowdown for the step just run (read at each optimizer step).

    Returns:
        A function that removes the hooks.

    Example::

        remove = stretch_optimizer_steps(program, type(program).parameters, lambda program: 2.0)
        opt.step()   # lasts twice its compute
    """
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    owner_ref = weakref.ref(owner)
    held: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> steps owner's tensors
    running: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> its Stretch

    def ours(optimizer) -> bool:
        if optimizer not in held:
            program = owner_ref()
            if program is None:
                return False
            mine = {id(p) for p in parameters(program)}
            held[optimizer] = any(id(p) in mine for group in optimizer.param_groups for p in group["params"])
        return held[optimizer]

    def before(optimizer, args, kwargs) -> None:
        program = owner_ref()
        if program is not None and ours(optimizer):
            stretch = Stretch(factor(program))
            stretch.begin()
            running[optimizer] = stretch

    def after(optimizer, args, kwargs) -> None:
        stretch = running.pop(optimizer, None)
        if stretch is not None:
            stretch.end()

    handles = (register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after))

    def remove() -> None:
        for handle in handles:
            handle.remove()

    weakref.finalize(owner, remove)
    return remove


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
