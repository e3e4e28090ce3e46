"""No hang without a word (issue 16, item 5): a silent peer ends its waiting ranks within the
configured timeout, with an error naming the rank, the step and the action it waited for.

Each case starts its own two ranks (a stopped rank would spoil the shared pool), with a 3 s
step timeout (the watchdog ends the process, exit code 75, for torchrun to restart) or an 8 s
process-group timeout (the wait raises ``PeerWaitError``). Nothing may be left in /dev/shm.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from whale.runtime.guard.watchdog import EXIT_CODE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Imports and parallelize take a while on a loaded host; the waits themselves are 3 s.
_LIMIT_S = 150


def _run_ranks(case: str, timeouts: str) -> list[tuple[int | None, str, int]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=ROOT)  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.watchdog_procs", case, timeouts],
                                      cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True))  # fmt: skip
    began = time.monotonic()
    out = []
    try:
        for rank, p in enumerate(procs):
            if case == "stopped_peer" and rank == 1:
                # Stopped, it never ends: wait until rank 0 has, then kill it.
                p.send_signal(signal.SIGKILL)
            try:
                _, err = p.communicate(timeout=max(1, _LIMIT_S - (time.monotonic() - began)))
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
                err += "\n[the test killed this rank: it did not end]"
            out.append((p.returncode, err, p.pid))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def _no_segments_left(pids) -> None:
    left = [f for f in os.listdir("/dev/shm") for pid in pids if f.startswith(f"whale-{pid}-")]
    assert left == []


def test_a_stopped_peer_ends_the_waiting_rank_by_the_watchdog():
    (code, err, pid), (_, err1, pid1) = _run_ranks("stopped_peer", "watchdog")
    assert code == EXIT_CODE, err
    assert "rank 1 stops" in err1
    assert "whale watchdog: rank 0 waited" in err and "in step 2" in err, err
    assert "for the loss all-reduce from every rank" in err or "for the gradient all-reduce" in err, err
    assert "step_timeout=3" in err and f"exit code {EXIT_CODE}" in err
    assert "the step finished" not in err
    _no_segments_left([pid, pid1])


def test_a_stopped_peer_with_the_group_timeout_raises_a_named_error():
    (code, err, pid), (_, _, pid1) = _run_ranks("stopped_peer", "group")
    assert code not in (0, EXIT_CODE), err
    assert "PeerWaitError: rank 0 waited" in err and "in step 2" in err, err
    assert "the wait failed" in err
    _no_segments_left([pid, pid1])


@pytest.mark.parametrize("timeouts", ["watchdog"])
def test_a_rank_going_on_after_its_loss_raised_ends_both(timeouts):
    (code0, err0, _), (code1, err1, _) = _run_ranks("loss_error_caught", timeouts)
    assert "rank 1 caught a bad value in the loss and goes on" in err1
    # Rank 1's third step is refused at once, saying why; rank 0 (stage 0) waits in step 2
    # for the gradients rank 1 never sends, and ends named: by PeerWaitError when rank 1's exit
    # closes their connection, or by its watchdog if rank 1 lingers.
    assert code1 == 1 and "StepRefused: program.step call 3 refused: step 2 raised on this rank" in err1, err1
    assert "(RuntimeError: a bad value in the loss)" in err1
    assert code0 not in (0, None), err0
    assert "PeerWaitError: rank 0 waited" in err0 or "whale watchdog: rank 0 waited" in err0, err0
    assert "in step 2" in err0
    assert "for the gradients into stage 0, micro-batch 0 (action 0RG0) from rank 1" in err0, err0
    assert "all steps finished" not in err0 + err1
