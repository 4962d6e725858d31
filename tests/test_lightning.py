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
    # the KL weight from the module's beta attribute, the total from total_key="loss"
    assert run.scalars["beta"].eq(0.5).all()
    assert run.scalars["total"].to_numpy() == pytest.approx(
        (run.scalars["recon"] + 0.5 * run.scalars["kl"]).to_numpy(), rel=1e-5)


def test_the_callback_with_only_pytorch_lightning_installed(tmp_path):
    """``import lightning`` fails in the child: the callback comes from pytorch_lightning."""
    proc = subprocess.run([sys.executable, "tests/lightning_vae.py", str(tmp_path / "run"),
                           "pytorch_lightning"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = load_run(tmp_path / "run")
    assert run.status == "finished" and run.scalars["step"].tolist() == list(range(12))


def test_the_callback_under_ddp_writes_one_run_from_rank_0(tmp_path):
    proc = subprocess.run([sys.executable, "tests/lightning_vae.py", str(tmp_path / "run"),
                           "ddp"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = load_run(tmp_path / "run")
    assert run.status == "finished"
    assert run.scalars["step"].tolist() == list(range(40))  # each step once
    # two ranks, two batches: each rank's own values, though the module logs with sync_dist
    assert run.scalars["recon_rank_spread"].gt(0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_callback_in_lightnings_mixed_precision(tmp_path):
    """``precision="bf16-mixed"`` (no scaler) and float16's plugin with a GradScaler on the
    CPU, which the callback finds by itself: its scale recorded, its calibration skip not a
    fault."""
    import torch
    from lightning.pytorch.plugins import MixedPrecision

    fit(str(tmp_path / "bf16"), steps=20, devices=1, precision="bf16-mixed")
    bf16 = load_run(tmp_path / "bf16")
    assert bf16.status == "finished" and "loss_scale" not in bf16.scalars.columns
    assert bf16.scalars["recon"].notna().all()
    fit(str(tmp_path / "fp16"), steps=20, devices=1,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    fp16 = load_run(tmp_path / "fp16")
    assert fp16.status == "finished" and fp16.scalars["loss_scale"].iloc[0] == 65536.0
    skipped = fp16.scalars["scaler_skipped"].to_numpy() == 1
    assert skipped.sum() >= 1 and (fp16.events["kind"] == "nonfinite").sum() == 0
    assert (fp16.events["kind"] == "scaler_skip").sum() == skipped.sum()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_the_callback_in_float16_on_a_gpu(tmp_path):
    """``precision="16-mixed"`` on CUDA: Lightning's own GradScaler, found by the callback."""
    fit(str(tmp_path / "run"), steps=20, accelerator="gpu", devices=1, precision="16-mixed")
    run = load_run(tmp_path / "run")
    assert run.status == "finished" and run.scalars["loss_scale"].iloc[0] == 65536.0
    assert (run.events["kind"] == "nonfinite").sum() == 0
