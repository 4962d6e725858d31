"""Shared fixtures: tiny real runs (16 px, a few dozen steps) made once per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from vaediag.cli import main

# Tests never see a real torch hub cache (LPIPS weights a developer may have downloaded): the
# LPIPS code path is tested with locally built backbone files, identically on every machine.
os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="vaediag-tests-torch-home-")

#: A 16 px model small enough that 40 steps take about a second on a laptop CPU ...
TINY_ONLINE = [
    "--set", "data.resolution=16", "--set", "data.toyfaces_size=256", "--set", "data.val_size=16",
    "--set", "model.channels=[8,16]", "--set", "model.latent_dim=4",
    "--set", "train.batch_size=16", "--no-progress",
]
#: ... without the online analysis's child process (tests/test_online.py tests it)
TINY = [*TINY_ONLINE, "--set", "train.online=false"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the vaediag command in-process; return (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 30-step toyfaces run (16 steps per epoch), shared read-only by tests."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    code = main(["train", "--out", str(out), "--steps", "30", *TINY])
    assert code == 0
    return out


@pytest.fixture(autouse=True)
def _close_the_runs_a_test_left_open():
    """A test that leaves a Monitor's run open (one that checks an error and stops there) has
    it closed here, as its process's exit would, without the exit's warning."""
    yield
    import sys

    lifetime = sys.modules.get("vaediag.monitor.lifetime")
    if lifetime is not None:
        for monitor in list(lifetime._OPEN):
            if not monitor.closed:
                monitor.close("interrupted", message="left open by the test")
            lifetime.forget(monitor)
