"""A step that raised on one rank after its communication began cannot be resumed.

The other ranks are still inside that step, waiting for this rank's part of a collective or a
transfer; a next step here would pair its messages with theirs from the old step (a hang, or
gradients of two steps summed). So such a rank refuses every later step with an error saying
why, and its peers' watchdog (:mod:`.watchdog`) ends them. Errors whale raises on every rank at
the same point (a batch that differs, found by a collective every rank waited for) are marked
with :func:`every_rank` and leave the program usable: every rank is then out of the step alike.
"""

from __future__ import annotations

__all__ = ["StepRefused", "StepState", "every_rank"]

_MARK = "_whale_every_rank"


class StepRefused(RuntimeError):
    """``step()`` on a program whose earlier step raised on this rank mid-step."""


def every_rank(err: BaseException) -> BaseException:
    """Mark ``err`` as raised by every rank at one point of the step (returns it, to raise)."""
    setattr(err, _MARK, True)
    return err


class StepState:
    """Whether this rank's program can run another step."""

    __slots__ = ("_failure",)

    def __init__(self) -> None:
        self._failure: str | None = None

    def check(self, step: int) -> None:
        """Raise :class:`StepRefused` if an earlier step broke the program on this rank."""
        if self._failure is not None:
            raise StepRefused(
                f"program.step call {step} refused: {self._failure}. The other ranks are still in "
                "that step, waiting for this rank; a step cannot be resumed after such an error. "
                "Let the exception end this process so the launcher (torchrun --max-restarts) "
                "restarts the job from its last checkpoint; the peers' watchdog ends them"
            )

    def failed(self, step: int, err: BaseException) -> None:
        """Record ``err``, raised in step ``step`` after its communication began on this rank."""
        if not getattr(err, _MARK, False) and self._failure is None:
            self._failure = f"step {step} raised on this rank after its communication began ({type(err).__name__}: {err})"
