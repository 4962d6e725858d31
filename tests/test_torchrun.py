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


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds rank 1's process in /proc")
def test_a_rank_killed_with_sigkill_leaves_a_readable_run(tmp_path):
    """kill -9 of rank 1 mid-run: torchrun ends rank 0 too; the run directory reads, every row
    flushed before is there once, and analysis runs on it."""
    import signal
    import time

    import vaediag

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", "-m", "vaediag", "train", "--out",
                             str(out), "--steps", "100000", *ARGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until rows are on disk
            if (out / "run.json").exists() and len(load_run(out).scalars) >= 100:
                break
            time.sleep(0.5)
        rank1 = next(int(p) for p in os.listdir("/proc") if p.isdigit() and _is_rank1(p, out))
        os.kill(rank1, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    run = load_run(out)
    steps = run.scalars["step"].tolist()
    assert steps == list(range(len(steps))) and len(steps) >= 100  # each once, none missing
    assert run.status in ("killed", "failed")
    assert vaediag.analyze(run).run["steps"] == len(steps)


def _is_rank1(pid: str, out) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"RANK=1" in environ and str(out).encode() in cmdline


def test_a_distributed_run_replays_under_torchrun_exactly(runs, capsys):
    """A replay with no changes, on as many ranks as the run, repeats it step for step; in one
    process it is refused with the command to use."""
    from tests.conftest import run_cli

    root, _ = runs
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "vaediag", "replay", str(root / "whole"),
                           "--from", "20", "--out", str(root / "branch"), "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole, branch = load_run(root / "whole").scalars, load_run(root / "branch").scalars
    assert branch["step"].tolist() == list(range(40))
    for column in ("recon", "kl", "grad_norm"):
        np.testing.assert_array_equal(branch[column].to_numpy(), whole[column].to_numpy())
    code, _, err = run_cli(capsys, "replay", str(root / "whole"), "--from", "20", "--out",
                           str(root / "alone"))
    assert code == 2 and "trained on 2 rank(s)" in err and "--nproc_per_node 2" in err
    assert not (root / "alone").exists()


def test_a_planted_fault_is_diagnosed_alike_on_two_ranks_and_in_one_process(tmp_path):
    """A 30x learning-rate jump at step 150: the 2-rank run (batch 8 per rank) and one process
    with the same global batch of 16 get the same incident, rooted at the same step and kind
    (on this tiny run the one-process run's latents then collapsed within the window, which the
    2-rank run's did not: the sampling noise differs)."""
    import vaediag

    fault = ["--steps", "200", "--set", "data.toyfaces_size=512", "--set",
             "eval.every_steps=25", "--inject", "lr_spike@150:factor=30,steps=5"]
    two = torchrun("--out", str(tmp_path / "two"), *ARGS, *fault)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "vaediag", "train", "--out",
                          str(tmp_path / "one"), *ARGS, *fault, "--set",
                          "train.batch_size=16"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    roots = {}
    for name in ("two", "one"):
        analysis = vaediag.analyze(tmp_path / name)
        (incident,) = [i for i in analysis.incidents
                       if i.severity != "info" and 145 <= i.first_step <= 155]
        roots[name] = (incident.root.kind, incident.first_step,
                       sorted({f.kind for f in incident.members if f.severity != "info"}))
    assert roots["two"][:2] == roots["one"][:2] == ("oversized_update", 150), roots
    for name in roots:  # the fault's own consequences alike; what came after may differ
        assert {"oversized_update", "generation_drift"} <= set(roots[name][2]), roots
