"""``vaediag train`` under torchrun, for real: 2 processes, gloo on CPU, the data sharded (each
rank its share of the global batch), one run directory from rank 0, resume from one rank."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import TINY
from vaediag.rundir import load_run

ARGS = [*TINY, "--set", "train.batch_size=8", "--set", "eval.every_steps=10"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "vaediag", "train", *args],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    whole = torchrun("--out", str(root / "whole"), "--steps", "40", *ARGS)
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = torchrun("--out", str(root / "resumed"), "--steps", "20", *ARGS)
    assert first.returncode == 0, first.stderr[-3000:]
    again = torchrun("--out", str(root / "resumed"), "--resume", "--steps", "40",
                     "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    return root, whole


def test_one_run_directory_with_every_step_once(runs):
    root, whole = runs
    assert sorted(p.name for p in root.iterdir()) == ["resumed", "whole"]
    run = load_run(root / "whole")
    assert run.status == "finished" and run.scalars["step"].tolist() == list(range(40))
    assert run.evals["step"].tolist() == [0, 10, 20, 30, 40]
    assert run.scalars["recon_rank_spread"].gt(0).all()  # two shares of the global batch
    assert whole.stdout.count("trained to step 40") == 1  # rank 0 speaks for the run
    (start,) = [e for _, e in run.events.iterrows() if e["kind"] == "start"]
    assert start["world_size"] == 2 and start["steps_per_epoch"] == 256 // 16


def test_a_resumed_distributed_run_continues_exactly(runs):
    root, _ = runs
    whole, resumed = load_run(root / "whole").scalars, load_run(root / "resumed").scalars
    assert resumed["step"].tolist() == list(range(40))
    for column in ("recon", "kl", "grad_norm", "recon_rank_spread"):
        np.testing.assert_array_equal(resumed[column].to_numpy(), whole[column].to_numpy())
