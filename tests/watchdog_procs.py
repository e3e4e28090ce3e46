"""One rank of a job whose peer goes silent: ``python -m tests.watchdog_procs CASE`` with
torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). tests/test_watchdog.py
starts the ranks and reads their exit codes and stderr."""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist

import whale as wh
from tests.dp_cases import _model_and_batches
from tests.pp_cases import _gpt, lm_loss
from whale.runtime.guard.step_state import StepRefused

_TIMEOUTS = {
    # The watchdog ends a step waiting 3 s on a silent peer, well before gloo's 60 s.
    "watchdog": {"timeout": 60, "step_timeout": 3},
    # No watchdog: the process group's own timeout ends the wait, with the same names (8 s:
    # both ranks set the program up side by side, seconds apart at most on a loaded host).
    "group": {"timeout": 8, "step_timeout": None},
}


def stopped_peer(timeouts: str) -> None:
    """Data parallel: after one step together, rank 1 stops (SIGSTOP) before the next."""
    torch.set_num_threads(1)
    wh.init("gloo", **_TIMEOUTS[timeouts])
    model, batches, loss_fn = _model_and_batches("gpt", 8)
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],))
    program.step(*batches[0])
    if dist.get_rank() == 1:
        print("rank 1 stops", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    program.step(*batches[1])
    print("the step finished", file=sys.stderr, flush=True)


def loss_error_caught(timeouts: str) -> None:
    """A pipeline whose last stage's loss raises in the second step on rank 1, which catches
    the error and goes on to the next step, as a careless training loop would."""
    torch.set_num_threads(1)
    wh.init("gloo", **_TIMEOUTS[timeouts])
    model, batches = _gpt(4, 8)
    calls = {"n": 0}

    def flaky_loss(out, y):
        calls["n"] += 1
        if calls["n"] == 3:  # the second step's first micro-batch
            raise RuntimeError("a bad value in the loss")
        return lm_loss(out, y)

    config = wh.Config(stage_boundaries=["blocks.2"], num_micro_batch=2)
    program = wh.parallelize(model, loss_fn=flaky_loss, example_inputs=(batches[0][0],), config=config)
    for step in range(3):
        try:
            program.step(*batches[step % len(batches)])
        except RuntimeError as err:
            if isinstance(err, StepRefused) or "a bad value" not in str(err):
                raise
            print(f"rank {dist.get_rank()} caught {err} and goes on", file=sys.stderr, flush=True)
    print("all steps finished", file=sys.stderr, flush=True)


if __name__ == "__main__":
    case, timeouts = sys.argv[1], sys.argv[2]
    {"stopped_peer": stopped_peer, "loss_error_caught": loss_error_caught}[case](timeouts)
