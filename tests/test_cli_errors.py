"""``whale plan`` on bad input: a clear error and exit code 2, never a traceback or a hang.

In-process (``whale.cli.main``), as tests/test_cli.py: each case must end within seconds, before
the model is captured where the input alone is wrong.
"""

from __future__ import annotations

import json
import math
import os
import time

import pytest

import whale as wh
from whale.cli import main
from whale.ir.cluster_spec import MAX_DEVICES, load_cluster, parse_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CNN = os.path.join(ROOT, "examples", "cnn.py")


def _fails(capsys, argv: list[str]) -> str:
    began = time.monotonic()
    try:
        code = main(argv)
    except SystemExit as done:  # argparse's own errors
        code = done.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    # The input alone is wrong: refused before the model is captured or anything is allocated.
    assert time.monotonic() - began < 20
    return err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cluster", "node0=99999999xA100-80GB"], "node 'node0' asks for 99999999 devices, more than whale plans for (131,072)"),
        (["--cluster", "node0=" + "9" * 5000 + "xT4"], "asks for a 5000-digit number of devices"),
        (["--cluster", "a=100000xT4,b=100000xT4"], "the nodes up to 'b' hold 200,000 devices"),
        (["--world-size", "0"], "argument --world-size: 0 must be 1 or more"),
        (["--world-size", "99999999"], "--world-size asks for 99,999,999 devices"),
        (["--world-size", "9" * 5000], "is not a whole number"),
        (["--cluster", "@no_such_cluster.json"], "error: no_such_cluster.json: No such file or directory"),
        (["--cluster", "no_such_cluster.yaml"], "error: no_such_cluster.yaml: No such file or directory"),
        (["--global-batch", "0"], "argument --global-batch: 0 must be 1 or more"),
        (["--global-batch", "-3"], "argument --global-batch: -3 must be 1 or more"),
        (["--global-batch", "10000000000"], "10,000,000,000 rows is more than whale plans for"),
        (["--row-weights", "inf,1"], "--row-weights inf,1: give positive finite numbers"),
        (["--row-weights", "nan,1"], "--row-weights nan,1: give positive finite numbers"),
        (["--row-weights", "3,x"], "--row-weights 3,x: give positive finite numbers"),
        (["--row-weights", "0,1"], "--row-weights 0,1: give positive finite numbers"),
    ],
)
def test_bad_plan_input_is_a_clear_error(capsys, argv, message):
    err = _fails(capsys, ["plan", CNN, *argv])
    assert message in err, err


def test_a_cluster_file_with_an_absurd_count(capsys, tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"nodes": [{"device": "T4", "count": 99_999_999}]}))
    err = _fails(capsys, ["plan", CNN, "--cluster", f"@{path}"])
    assert "nodes[0]: the nodes so far hold 99,999,999 devices, more than whale plans for" in err
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps({"nodes": [{"devices": [{"device": "T4", "count": 70_000}]},
                                           {"devices": [{"device": "T4", "count": 70_000}]}]}))  # fmt: skip
    with pytest.raises(ValueError, match=r"nodes\[1\]: the nodes so far hold 140,000 devices"):
        load_cluster(mixed)


def test_the_device_limit_is_inclusive():
    assert parse_cluster(f"{MAX_DEVICES}xcpu").world_size == MAX_DEVICES
    with pytest.raises(ValueError, match="more than whale plans for"):
        parse_cluster(f"{MAX_DEVICES}xcpu,1xcpu")


@pytest.mark.parametrize("weights", [[math.inf, 1], [1, math.nan], [-math.inf, 1], [0, 1]])
def test_config_row_weights_must_be_finite(weights):
    with pytest.raises(ValueError, match="must be positive numbers, finite"):
        wh.Config(row_weights=weights)
