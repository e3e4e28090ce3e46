"""forked.both: the second computation runs in a forked child, its answer comes back as if it
had run here (values, shared objects by identity, exceptions), and no child outlives the call."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from whale.planner import forked
from whale.planner.search.explore import NoPlanError

needs_fork = pytest.mark.skipif(not forked.can_fork(), reason="needs Linux and two cores to fork beside")


@pytest.fixture
def forks(monkeypatch):
    """The pids of the children forked during the test."""
    pids, fork = [], os.fork

    def recording_fork():
        pid = fork()
        if pid:
            pids.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", recording_fork)
    return pids


def _reaped(pids) -> bool:
    """Every child was waited for (none runs on, none is a zombie)."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        return False
    return True


@needs_fork
def test_the_answer_comes_back_and_shared_objects_keep_their_identity(forks):
    layouts = [("layout", k) for k in range(3)]
    seen = []

    def there():
        seen.append(os.getpid())  # in the child's copy of the list: the parent's stays empty
        return {"pid": os.getpid(), "layout": layouts[1], "rows": (3, 5)}

    first, second = forked.both(lambda: os.getpid(), there, shared=layouts)
    assert first == os.getpid()
    assert second["pid"] != os.getpid()  # it ran in another process
    assert second["layout"] is layouts[1]  # the parent's own object, not a copy
    assert second["rows"] == (3, 5)
    assert seen == []
    assert len(forks) == 1 and _reaped(forks)


@needs_fork
def test_an_exception_of_the_child_is_raised_here(forks):
    def there():
        raise NoPlanError("nothing fits: needs 3.0 GiB more on rank 1")

    with pytest.raises(NoPlanError, match="needs 3.0 GiB more on rank 1"):
        forked.both(lambda: 1, there)
    assert len(forks) == 1 and _reaped(forks)


@needs_fork
def test_an_answer_that_does_not_pickle_is_computed_here(forks):
    pids = []

    def there():
        pids.append(os.getpid())
        return lambda: "a closure"  # pickle refuses it: the parent runs `there` itself

    first, second = forked.both(lambda: "here", there)
    assert first == "here" and second() == "a closure"
    assert pids == [os.getpid()]
    assert len(forks) == 1 and _reaped(forks)


@needs_fork
def test_a_killed_child_is_computed_here(forks):
    def there():
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return "computed here"

    parent = os.getpid()
    assert forked.both(lambda: 0, there) == (0, "computed here")
    assert len(forks) == 1 and _reaped(forks)


@needs_fork
def test_when_here_fails_the_child_is_killed_and_reaped(forks):
    started = time.monotonic()

    def here():
        raise KeyError("here failed")

    with pytest.raises(KeyError, match="here failed"):
        forked.both(here, lambda: time.sleep(60))
    assert time.monotonic() - started < 30  # not waited for
    assert len(forks) == 1 and _reaped(forks)


def test_without_fork_both_run_here_in_order(monkeypatch):
    monkeypatch.setattr(forked, "can_fork", lambda: False)
    order = []
    first, second = forked.both(lambda: order.append("here") or 1, lambda: order.append("there") or os.getpid())
    assert (first, second, order) == (1, os.getpid(), ["here", "there"])


@needs_fork
def test_a_large_answer_passes_the_pipe(forks):
    # Larger than a pipe's buffer (64 KiB): the child writes while the parent still computes.
    big = list(range(200_000))
    first, second = forked.both(lambda: sum(big), lambda: [x * 2 for x in big])
    assert first == sum(big) and second[-1] == 399_998 and len(second) == 200_000
    assert len(forks) == 1 and _reaped(forks)


@needs_fork
def test_the_child_ends_with_its_parent(tmp_path):
    # A parent killed while the child computes (no chance to reap it): the kernel ends the child.
    script = tmp_path / "parent.py"
    pid_file = tmp_path / "child.pid"
    script.write_text(
        "import os, signal, time\n"
        "from whale.planner import forked\n"
        "def there():\n"
        f"    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "    time.sleep(60)\n"
        "def here():\n"
        f"    while not os.path.exists({str(pid_file)!r}):\n"
        "        time.sleep(0.01)\n"
        "    time.sleep(0.1)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "forked.both(here, there)\n"
    )
    done = subprocess.run([sys.executable, str(script)], check=False, timeout=60)
    assert done.returncode == -signal.SIGKILL
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (reaped by init soon) has ended too
        return f.read().split(") ")[-1][0] != "Z"
