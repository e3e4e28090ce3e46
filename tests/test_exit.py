"""A gloo job exits cleanly after its last backward (``process_group._at_exit``).

A gloo collective issued during backward holds a Python object (torch keeps the autograd
engine's context in thread-local state for the backward, and the collective copies it), so
destroying it takes the GIL. When gloo's worker thread drops the last reference while the main
thread is already finalizing the interpreter, the process aborts ("terminate called without an
active exception", exit code -6), a job's last step then fails under ``torchrun``. Here rank 0's
last collective finishes after its backward has returned (rank 1 comes 0.1 s late), and rank 0
keeps the GIL until it exits: plain torch aborts, and a process that joined through ``wh.init``
must not.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import torch, torch.distributed as dist

    class Sum(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            grad = grad.clone()
            dist.all_reduce(grad, async_op=True)  # gloo's worker thread holds the last reference
            return grad

    joined_by, rank = sys.argv[1], int(sys.argv[2])
    if joined_by == "whale":
        import whale as wh
        wh.init("gloo")
    else:
        dist.init_process_group("gloo")
    w = torch.randn(64, 64, requires_grad=True)
    if rank == 1:
        time.sleep(0.1)  # rank 0's collective finishes after its backward has returned
    Sum.apply(w @ w).sum().backward()
    sys.setswitchinterval(30.0)  # rank 0 keeps the GIL until the interpreter finalizes
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:
        pass
    """
)


def _exit_codes(script, joined_by: str) -> list[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen([sys.executable, str(script), joined_by, str(r)], env={**env, "RANK": str(r)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for r in range(2)
    ]  # fmt: skip
    codes = []
    for p in ranks:
        try:
            p.communicate(timeout=120)
        finally:
            p.kill()
        codes.append(p.returncode)
    return codes


def test_a_rank_whose_last_collective_ends_after_backward_exits_cleanly(tmp_path):
    script = tmp_path / "exit_race.py"
    script.write_text(_SCRIPT)
    if _exit_codes(script, "torch")[0] == 0:
        pytest.skip("this torch no longer aborts at exit here: nothing for whale to prevent")
    assert _exit_codes(script, "whale") == [0, 0]
