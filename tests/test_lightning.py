"""The Lightning callback on a real Trainer: one process, and strategy="ddp" on 2 processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("lightning")

from tests.lightning_vae import fit
from vaediag.rundir import load_run


def test_one_callback_records_a_lightning_run(tmp_path):
    fit(str(tmp_path / "run"), steps=40, devices=1)
    run = load_run(tmp_path / "run")
    assert run.status == "finished"
    assert run.scalars["step"].tolist() == list(range(40))
    assert {"recon", "kl", "grad_norm", "mu_max", "logvar_min"} <= set(run.scalars.columns)
    assert run.scalars["recon"].notna().all() and run.evals["step"].tolist() == [0, 10, 20, 30, 40]
    assert run.scalars["lr"].eq(1e-3).all()  # the trainer's optimizer


def test_the_callback_under_ddp_writes_one_run_from_rank_0(tmp_path):
    proc = subprocess.run([sys.executable, "tests/lightning_vae.py", str(tmp_path / "run"),
                           "ddp"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = load_run(tmp_path / "run")
    assert run.status == "finished"
    assert run.scalars["step"].tolist() == list(range(40))  # each step once
    assert run.scalars["recon_rank_spread"].gt(0).all()  # two ranks, two batches
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
