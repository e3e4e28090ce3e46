"""No rank waits forever without a word: each wait on a peer inside a step is watched.

A peer that has gone silent (stopped, hung, or out of step after catching an error of its own
and carrying on) leaves the others blocked in a collective or a receive. The step marks each
blocking wait (:func:`waiting`: the step, the action, the peers); a daemon thread started by
``wh.init(step_timeout=...)`` checks it every second and, once a wait has lasted past the
timeout, writes which rank waited in which step for what and from whom, removes this process's
shared-memory names, and ends the process with :data:`EXIT_CODE`, so ``torchrun
--max-restarts`` restarts the job (from its last checkpoint). Where the process group's own
timeout (``wh.init(timeout=...)``) or a peer's death ends the wait first, the error raised
names the same things (:class:`PeerWaitError`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Self

__all__ = ["EXIT_CODE", "PeerWaitError", "Watchdog", "start_watchdog", "waiting"]

EXIT_CODE = 75
"""The exit status of a process the watchdog ends (``EX_TEMPFAIL``: try again)."""


class PeerWaitError(RuntimeError):
    """A wait on a peer inside a step failed (the process group's timeout, a peer's death)."""


class _Wait:
    """One blocking wait of a step, as the watchdog and the errors name it."""

    __slots__ = ("action", "peers", "rank", "since", "step")

    def __init__(self, rank: int, step: int, action: str, peers: str) -> None:
        self.rank, self.step, self.action, self.peers = rank, step, action, peers
        self.since = time.monotonic()

    def describe(self, waited: float) -> str:
        return (
            f"rank {self.rank} waited {waited:.1f} s in step {self.step} (its call number "
            f"{self.step} of program.step) for {self.action} from {self.peers}"
        )

    def __enter__(self) -> Self:
        dog = _watchdog
        if dog is not None:
            dog.current = self
        return self

    def __exit__(self, kind, err, tb) -> bool:
        dog = _watchdog
        if dog is not None and dog.current is self:
            dog.current = None
        if err is not None and isinstance(err, RuntimeError) and not isinstance(err, PeerWaitError):
            # gloo's "Timed out waiting", "Connection reset by peer", NCCL's aborts
            raise PeerWaitError(
                f"{self.describe(time.monotonic() - self.since)}, and the wait failed: {err}. "
                "That peer is stopped, dead, or out of step with this rank (an error it caught and "
                "went on from); end the job so the launcher restarts it from its last checkpoint"
            ) from err
        return False


class Watchdog:
    """The thread that ends a process whose wait on a peer lasts past ``timeout_s``."""

    def __init__(self, timeout_s: float, *, poll_s: float | None = None) -> None:
        self.timeout_s = timeout_s
        self.current: _Wait | None = None
        self._poll_s = poll_s if poll_s is not None else min(1.0, timeout_s / 4)
        self._thread = threading.Thread(target=self._watch, name="whale-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while True:
            time.sleep(self._poll_s)
            wait = self.current
            if wait is None:
                continue
            waited = time.monotonic() - wait.since
            if waited > self.timeout_s and self.current is wait:
                self._end(wait, waited)

    def _end(self, wait: _Wait, waited: float) -> None:
        from ..host_reduce import remove_named_segments

        sys.stderr.write(
            f"whale watchdog: {wait.describe(waited)}, past wh.init(step_timeout={self.timeout_s:g}). "
            "That peer is silent: stopped, hung, or out of step (an error it caught and went on "
            f"from). Ending this process with exit code {EXIT_CODE} so the launcher (torchrun "
            "--max-restarts) restarts the job from its last checkpoint.\n"
        )
        sys.stderr.flush()
        remove_named_segments()
        os._exit(EXIT_CODE)


_watchdog: Watchdog | None = None


def start_watchdog(timeout_s: float | None) -> None:
    """Watch this process's step waits with ``timeout_s`` (None: stop watching)."""
    global _watchdog
    if timeout_s is None:
        _watchdog = None
    elif _watchdog is None or _watchdog.timeout_s != timeout_s:
        _watchdog = Watchdog(timeout_s)


def waiting(rank: int, step: int, action: str, peers: str) -> _Wait:
    """A context around one blocking wait of a step on ``peers`` (e.g. ``"rank 1"``,
    ``"every rank"``), for ``action`` (e.g. ``"the activations of stage 1, micro-batch 0"``).

    Example::

        with waiting(rank, step, "the gradient all-reduce", "every data-parallel rank"):
            reducer.finish()
    """
    return _Wait(rank, step, action, peers)
