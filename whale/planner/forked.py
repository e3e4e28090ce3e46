"""Two computations at once where the machine has a core to spare: one in this process, the
other in a forked child whose answer comes back pickled through a pipe.

The planner's searches under two memory options are independent (each reads the shared
structures and memos, and returns a plain result), and on two cores they take the time of the
longer one instead of the sum. The child starts from this process's state (no import, no copy
of the model: the fork shares its memory copy-on-write), so it costs milliseconds; it takes no
part in the parent's later memos, so only what it returns may matter to the caller.

Where no second core is available, or ``fork`` is not (Windows, macOS with its frameworks), the
two run one after the other here. The answer is the same either way: callers use this only for
computations whose results do not depend on which ran first.
"""

from __future__ import annotations

import ctypes
import io
import os
import pickle
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["both", "can_fork"]

A = TypeVar("A")
B = TypeVar("B")


def can_fork() -> bool:
    """A child may run beside this process: Linux (fork is safe there with torch loaded, as
    its DataLoader workers do) and at least two cores this process may use."""
    return sys.platform.startswith("linux") and len(os.sched_getaffinity(0)) >= 2


def both(here: Callable[[], A], there: Callable[[], B], shared: Sequence[object] = ()) -> tuple[A, B]:
    """``(here(), there())``, ``there`` in a forked child while ``here`` runs in this process.

    ``shared``: objects that exist before the call and that the child's answer may hold; they
    come back as this process's own objects (by position, not copied), so that identity and
    memos keyed by ``id`` still hold for them.

    An exception of ``there`` is raised here, as if it had run here. Where the child cannot
    answer (its answer does not pickle, or it was killed), ``there`` runs here after ``here``.
    Where ``here`` raises or is interrupted, the child is killed and reaped before the
    exception leaves; where this process is killed, the kernel ends the child with it: no
    process is left behind.
    """
    if not can_fork():
        return here(), there()
    read_end, write_end = os.pipe()
    parent = os.getpid()
    with warnings.catch_warnings():
        # Python 3.12+ warns at every fork of a process with several threads (torch starts
        # one): the child runs planner code only (Python and numpy), never torch's threads'
        # work, and ends with os._exit.
        warnings.filterwarnings("ignore", message=".*multi-threaded.*", category=DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: answer through the pipe, never return into the caller's code
        try:
            os.close(read_end)
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C stops the child at once
            _die_with(parent)
            _answer(write_end, there, shared)
        finally:
            os._exit(0)  # no atexit handlers, no flush of stdio buffers copied from the parent
    os.close(write_end)
    reaped = False
    try:
        first = here()
        data = _read_all(read_end)
        status = os.waitpid(pid, 0)[1]
        reaped = True
    finally:
        os.close(read_end)
        if not reaped:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    try:
        ok, value = _Unpickler(io.BytesIO(data), shared).load() if data and status == 0 else (None, None)
    except Exception:  # noqa: BLE001 -- a cut answer: as no answer
        ok = None
    if ok is None:  # no answer (killed, or it did not pickle): run it here
        return first, there()
    if not ok:
        raise value
    return first, value


def _die_with(parent: int) -> None:
    """The kernel kills this child when its parent ends (killed, or ended without reaping it),
    rather than the child computing on for nothing (Linux's PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl: the child still ends at its answer's write
        return
    if os.getppid() != parent:  # the parent ended before prctl took effect
        os._exit(0)


def _answer(fd: int, there: Callable[[], object], shared: Sequence[object]) -> None:
    try:
        payload = (True, there())
    except Exception as err:  # noqa: BLE001 -- raised again in the parent
        payload = (False, err)
    buffer = io.BytesIO()
    try:
        _Pickler(buffer, shared).dump(payload)
    except Exception:  # noqa: BLE001 -- no answer: the parent runs `there` itself
        return
    view = memoryview(buffer.getbuffer())
    while view:
        view = view[os.write(fd, view) :]


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


class _Pickler(pickle.Pickler):
    def __init__(self, file, shared: Sequence[object]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._position = {id(x): k for k, x in enumerate(shared)}

    def persistent_id(self, obj):
        return self._position.get(id(obj))


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, shared: Sequence[object]) -> None:
        super().__init__(file)
        self._shared = shared

    def persistent_load(self, pid):
        return self._shared[pid]
