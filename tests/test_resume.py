"""examples/resume_training.py under torchrun: rank 1 dies at step 5 of the first attempt,
torchrun restarts the job, it resumes from its newest complete checkpoint and ends with exactly
the parameters of an uninterrupted run (bit for bit: the same plan sums in the same order, and
a checkpoint copies bytes, optimizer moments and step counts included), run on the shared pool.

``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: with the store torchrun's rendezvous shares with the
job, a restarted attempt can read the previous attempt's gloo addresses and fail to connect
(pytorch/pytorch#135712); a separate store per attempt avoids it. About 25-35 s on 2 cores (one launch,
restarted once).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(tmp, name: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           f"--log-dir={tmp / 'logs'}", "examples/resume_training.py", "--ckpt", str(tmp / name), "--steps", "6", "--save-every", "2",
           "--out", str(tmp / f"{name}.pt"), *extra]
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PYTHONPATH": ROOT}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_killed_rank_resumes_to_the_uninterrupted_parameters(tmp_path, world2):
    killed = _launch(tmp_path, "killed", "--die-at", "5")
    assert "attempt 0: rank 1 dies at step 5" in killed.stdout
    # The step-4 checkpoint is written behind step 4; whether it was complete when rank 1 died
    # decides where attempt 1 starts.
    resumed = re.search(r"attempt 1: resumed from step (\d+)", killed.stdout)
    assert resumed and int(resumed.group(1)) in (2, 4), killed.stdout
    assert "attempt 1: done, 6 steps" in killed.stdout
    # The uninterrupted run on the shared pool: the same plan, data and one thread per rank as
    # torchrun's, so the same bits, without a third launch.
    world2.run("tests.ckpt_cases:resume_example", ["--ckpt", str(tmp_path / "whole"), "--steps", "6", "--save-every", "2",
                                                  "--out", str(tmp_path / "whole.pt")])  # fmt: skip
    got = torch.load(tmp_path / "killed.pt")
    want = torch.load(tmp_path / "whole.pt")
    assert list(got) == list(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert sorted(os.listdir(tmp_path / "killed")) == ["step-00000002", "step-00000004", "step-00000006"]
