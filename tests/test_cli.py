"""The vaediag command, end to end on tiny real runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vaediag
from tests.conftest import TINY, run_cli
from vaediag.cli import cli
from vaediag.config import build_config
from vaediag.rundir import load_run

RUN_FILES = {".lock", "run.json", "config.toml", "environment.json", "fixed.npz",
             "events.jsonl", "scalars", "evals", "grids", "checkpoints"}


def test_train_writes_exactly_the_documented_run_dir(tiny_run):
    assert {p.name for p in tiny_run.iterdir()} == RUN_FILES
    assert sorted(p.name for p in (tiny_run / "grids").iterdir()) == [
        "step-00000000.png", "step-00000016.png", "step-00000030.png"]
    # one checkpoint per evaluation, all kept, so a replay can start near any step
    assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir()) == [
        "step-00000000.pt", "step-00000016.pt", "step-00000030.pt"]
    run = load_run(tiny_run)
    assert run.status == "finished" and run.info["step"] == 30
    s = run.scalars
    assert list(s["step"]) == list(range(30))
    assert {"step", "epoch", "time", "recon", "kl", "total", "beta", "lr",
            "grad_norm"} <= set(s.columns)
    assert list(s["epoch"][[0, 15, 16, 29]]) == [0, 0, 1, 1]
    assert s["time"].is_monotonic_increasing and s[["recon", "kl", "lr"]].notna().all().all()
    e = run.evals
    assert list(e["step"]) == [0, 16, 30]
    assert {"eval_recon", "eval_kl", "img.recon/0", "img.kl/7"} <= set(e.columns)
    # The running training average next to the grid's own loss: they differ, both recorded.
    assert np.isnan(e["train_recon_avg"][0]) and e["train_avg_steps"][1] == 16
    assert e["train_recon_avg"][1] == pytest.approx(s["recon"][:16].mean(), rel=1e-5)
    assert run.config["data"]["resolution"] == 16
    assert run.environment["versions"]["torch"]
    assert list(run.events["kind"]) == ["start", "metric_status", "probes", "checkpoint",
                                        "checkpoint", "checkpoint"]


def test_progress_lines_and_run_dir_on_stdout(tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", "--out", tmp_path / "r", "--steps", "4", *TINY)
    assert code == 0
    assert out.splitlines()[0] == f"run directory: {tmp_path / 'r'}"
    assert "trained to step 4" in out
    assert "step 4/4" in err


def test_default_run_dir_is_numbered(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "run-1").mkdir(parents=True)
    code, out, _ = run_cli(capsys, "train", "--steps", "2", *TINY)
    assert code == 0 and "run directory: runs/run-2" in out
    assert (tmp_path / "runs" / "run-2" / "run.json").exists()


def test_every_command_and_option_has_help(capsys):
    for name, command in cli.commands.items():
        assert command.help, name
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"{name} {param.name}"
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0
    for flag in ("--data", "--out", "--steps", "--epochs", "--config", "--set", "--resume",
                 "--overwrite", "--device", "--seed", "--preset", "--progress"):
        assert flag in out



def test_command_line_choices_come_from_the_registries():
    """--probes, --preset, --inject and --fail-on offer exactly what the library defines, and the
    config's help names every fault kind: one list each, nowhere copied."""
    from vaediag import inject, probes
    from vaediag.analysis.findings import SEVERITIES
    from vaediag.config import all_keys
    from vaediag.presets import PRESETS

    options = {p.name: p for p in cli.commands["train"].params}
    assert list(options["probe_preset"].type.choices) == list(probes.PRESETS)
    assert list(options["preset"].type.choices) == list(PRESETS)
    assert all(kind in options["faults"].help for kind in inject.KINDS)
    fail_on = next(p for p in cli.commands["analyze"].params if p.name == "fail_on")
    assert list(fail_on.type.choices) == list(SEVERITIES)
    helps = {key: text for key, _, text in all_keys()}
    assert all(kind in helps["train.inject"] for kind in inject.KINDS)
    assert all(f"'{name}'" in helps["probes.preset"] for name in probes.PRESETS)


def test_python_dash_m_works():
    result = subprocess.run([sys.executable, "-m", "vaediag", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "train" in result.stdout


def test_config_command_prints_resolved_toml(capsys):
    code, out, _ = run_cli(capsys, "config", "--preset", "tiny", "--set", "optim.lr=0.01")
    assert code == 0 and "lr = 0.01" in out and "resolution = 32" in out


@pytest.fixture
def bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"not a png")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "bad.toml").write_text("[optim\n")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "nockpt").mkdir()  # a run killed before its first checkpoint
    (tmp_path / "nockpt" / "run.json").write_text('{"format": 1, "status": "running"}')
    tiny_sets = [TINY[i + 1] for i, a in enumerate(TINY) if a == "--set"]
    (tmp_path / "nockpt" / "config.toml").write_text(build_config(overrides=tiny_sets).to_toml())
    return tmp_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{t}/missing"], "data source not found"),
        (["--data", "{t}/empty"], "no image files under"),
        (["--data", "{t}/junk"], "no usable image under"),
        (["--set", "optim.nope=1"], "unknown key 'optim.nope'"),
        (["--set", "optim.lr=fast"], "optim.lr must be a number, got 'fast'"),
        (["--set", "optim.lr"], "expected section.key=value"),
        (["--config", "{t}/bad.toml"], "is not valid TOML"),
        (["--config", "{t}/none.toml"], "config file not found"),
        (["--out", "{t}/full"], "is not empty; pass --resume"),
        (["--out", "{t}/full", "--overwrite"], "not a vaediag run directory"),
        (["--out", "{t}/afile/run"], "not writable"),
        (["--resume", "--out", "{t}/missing"], "no run directory at"),
        (["--resume", "--out", "{t}/full"], "not a vaediag run directory"),
        (["--resume", "--out", "{t}/nockpt"], "has no checkpoint to resume from"),
        (["--resume", "--overwrite", "--out", "{t}/x"], "--resume and --overwrite"),
        (["--steps", "3", "--epochs", "2"], "not both"),
        (["--steps", "0"], "0 is not in the range x>=1"),
        (["--nosuch"], "No such option '--nosuch'"),
        (["--device", "tpu"], "train.device must be"),
        (["--preset", "huge"], "'huge' is not one of"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(bad_inputs, capsys, args, message):
    args = [a.format(t=bad_inputs) for a in args]
    if "--out" not in args:
        args += ["--out", str(bad_inputs / "fresh")]
    before = sorted(str(p) for p in bad_inputs.rglob("*"))
    code, _, err = run_cli(capsys, "train", *args, *TINY)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaediag: error: "), err
    assert message in lines[0]
    assert "Traceback" not in err
    assert sorted(str(p) for p in bad_inputs.rglob("*")) == before  # nothing created or removed
    assert (bad_inputs / "full" / "notes.txt").read_text() == "mine"
    assert (bad_inputs / "nockpt" / "run.json").read_text() == '{"format": 1, "status": "running"}'



def test_bad_input_in_a_subprocess_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vaediag", "train", "--data", str(tmp_path / "nope"),
         "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "data source not found" in result.stderr


def test_folder_with_some_corrupt_images_trains_and_says_so_once(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
    (folder / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    (folder / "readme.md").write_text("hi")
    code, _, err = run_cli(capsys, "train", "--data", folder, "--out", tmp_path / "r",
                           "--steps", "3", *TINY)
    assert code == 0
    warnings = [line for line in err.splitlines() if "warning" in line and "skipped" in line]
    assert len(warnings) == 1
    assert "1 unreadable image file(s)" in warnings[0] and "1 non-image file(s)" in warnings[0]
    start = load_run(tmp_path / "r").events.iloc[0]
    assert start["kind"] == "start" and start["skipped_files"] == 2


def test_npz_data(tmp_path, capsys):
    np.savez(tmp_path / "faces.npz",
             images=np.random.default_rng(0).integers(0, 255, (40, 16, 16, 3), dtype=np.uint8))
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "faces.npz", "--out",
                           tmp_path / "r", "--steps", "2", *TINY)
    assert code == 0, err


def test_resume_extends_and_refuses_structural_changes(tmp_path, capsys):
    out = tmp_path / "r"
    assert run_cli(capsys, "train", "--out", out, "--steps", "10", *TINY)[0] == 0
    code, _, err = run_cli(capsys, "train", "--out", out, "--resume", "--steps", "20",
                           "--set", "model.latent_dim=8", "--no-progress")
    assert code == 2 and "cannot change model.latent_dim" in err
    code, _, err = run_cli(capsys, "train", "--out", out, "--resume", "--steps", "20",
                           "--set", "optim.lr=1e-4", "--no-progress")
    assert code == 0, err
    run = load_run(out)
    assert list(run.scalars["step"]) == list(range(20))
    assert run.scalars["lr"].iloc[-1] == pytest.approx(1e-4)
    resume = run.events[run.events["kind"] == "resume"].iloc[0]
    assert resume["step"] == 10
    assert resume["changes"] == {"optim.lr": [1e-3, 1e-4], "train.steps": [10, 20]}
    assert run.config["optim"]["lr"] == 1e-4
    # Resuming a finished run without extending it has nothing to do.
    assert run_cli(capsys, "train", "--out", out, "--resume", "--no-progress")[0] == 0
    assert len(load_run(out).scalars) == 20


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vaediag", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def _wait_for_rows(out: Path, rows: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if len(load_run(out).scalars) >= rows:
                return
        except Exception:  # noqa: BLE001 - not created yet
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("training did not get far enough in time")


def test_kill_9_leaves_a_readable_run_that_resumes(tmp_path):
    out = tmp_path / "r"
    args = ["--out", str(out), "--steps", "5000", *TINY, "--set", "log.flush_steps=5",
            "--set", "eval.every_steps=40"]
    proc = _spawn(args)
    _wait_for_rows(out, 60, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    run = load_run(out)
    assert run.status == "killed"
    steps = list(run.scalars["step"])
    assert len(steps) >= 60 and steps == list(range(len(steps)))  # a clean prefix
    analysis = vaediag.analyze(out)  # a killed run is analysed on what it has, and says so
    assert analysis.run["status"] == "killed" and analysis.run["steps"] == len(steps)
    assert "killed" in analysis.problems[0]
    assert not [c for c in analysis.checks if c.status == "failed"]
    last_checkpoint = run.checkpoints[-1][0]
    # Resume to a short total: it continues from the last checkpoint with continuous steps.
    target = last_checkpoint + 25
    resumed = subprocess.run([sys.executable, "-m", "vaediag", "train", "--out", str(out),
                              "--resume", "--steps", str(target), "--no-progress"],
                             capture_output=True, text=True, timeout=300,
                             stdin=subprocess.DEVNULL)
    assert resumed.returncode == 0, resumed.stderr
    run = load_run(out)
    assert run.status == "finished"
    assert list(run.scalars["step"]) == list(range(target))
    assert run.evals["step"].is_unique


def test_sigint_checkpoints_and_exits_130(tmp_path):
    out = tmp_path / "r"
    proc = _spawn(["--out", str(out), "--steps", "5000", *TINY, "--set", "log.flush_steps=5"])
    _wait_for_rows(out, 20, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "continue with: vaediag train --out" in err and "Traceback" not in err
    run = load_run(out)
    assert run.status == "interrupted"
    last = run.info["step"]
    assert run.checkpoints[-1][0] == last == len(run.scalars)


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_second_writer_is_refused_while_training(tmp_path):
    out = tmp_path / "r"
    proc = _spawn(["--out", str(out), "--steps", "5000", *TINY, "--set", "log.flush_steps=5"])
    try:
        _wait_for_rows(out, 5, proc)
        second = subprocess.run([sys.executable, "-m", "vaediag", "train", "--out", str(out),
                                 "--resume", "--no-progress"], capture_output=True, text=True,
                                timeout=120, stdin=subprocess.DEVNULL)
        assert second.returncode == 2 and "in use by another vaediag process" in second.stderr
    finally:
        proc.kill()
        proc.wait()


def test_toyfaces_export_then_train_on_the_folder(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "toyfaces", tmp_path / "faces", "-n", "40", "--resolution",
                           "16")
    assert code == 0 and "wrote 40 faces" in out
    assert len(list((tmp_path / "faces").glob("*.png"))) == 40
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "faces", "--out",
                           tmp_path / "r", "--steps", "2", *TINY)
    assert code == 0 and "warning" in err and "1 non-image file(s)" in err  # factors.csv
    code, _, err = run_cli(capsys, "toyfaces", tmp_path / "faces")
    assert code == 2 and "not an empty folder" in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_a_clear_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "r", "--device", "cuda", *TINY)
    assert code == 2 and "CUDA is not available" in err and not (tmp_path / "r").exists()


def test_probe_presets_and_extra_probes_from_the_command_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "off", "--steps", "3",
                           "--probes", "off", *TINY)
    assert code == 0, err
    off = load_run(tmp_path / "off")
    assert set(off.scalars.columns) == {"step", "time", "recon", "kl", "total", "grad_norm",
                                        "epoch", "beta", "lr", "eps"}
    assert "lpips unavailable" not in err  # no evaluation probes: LPIPS is not even looked for
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "sat", "--steps", "3",
                           "--probes", "cheap", "--probe",
                           "probes/decoder_saturation.py:DecoderSaturation", *TINY)
    assert code == 0, err
    evals = load_run(tmp_path / "sat").evals
    assert evals["sat_recon_frac"].notna().all() and "ssim" in evals
    assert load_run(tmp_path / "sat").config["probes"]["extra"] == [
        "probes/decoder_saturation.py:DecoderSaturation"]


@pytest.mark.parametrize(("args", "message"), [
    (["--probe", "probes/nope.py:X"], "no such file"),
    (["--probe", "probes/decoder_saturation.py:Nope"], "has no class Nope"),
    (["--lpips-weights", "missing.pth"], "--lpips-weights missing.pth: no such file"),
    (["--probes", "most"], "'most' is not one of"),
])
def test_bad_probe_options(tmp_path, capsys, args, message):
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "r", "--steps", "2", *args,
                           *TINY)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_lpips_with_a_locally_built_backbone_file(tmp_path, capsys):
    import torch
    import torchvision

    weights = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), weights)
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "r", "--steps", "3",
                           "--lpips-weights", weights, *TINY)
    assert code == 0, err
    assert err.count("UNVERIFIED weights") == 1  # said once, and not passed off as LPIPS
    run = load_run(tmp_path / "r")
    assert run.evals["lpips"].notna().all() and run.evals["img.lpips/7"].notna().all()
    status = run.events[run.events["kind"] == "metric_status"].iloc[0]
    assert status["available"] and not status["verified"] and status["weights"] == str(weights)


def test_lpips_unavailable_is_said_once_and_recorded(tiny_run):
    status = load_run(tiny_run).events.query("kind == 'metric_status'").iloc[0]
    assert not status["available"] and "backbone weights not found" in status["reason"]
    assert "lpips" not in load_run(tiny_run).evals


def test_an_input_error_comes_before_any_run_directory_line(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "--data", str(tmp_path / "missing"), "--out",
                             str(tmp_path / "run"), *TINY)
    assert code == 2 and "data source not found" in err
    assert "run directory" not in out and not (tmp_path / "run").exists()


def test_spike_costs_are_written_as_people_write_counts():
    from vaediag.analysis.detectors.loss_spikes import _steps

    assert [_steps(c) for c in (0.3247, 41.2, 1.67e5)] == ["0.32", "41", "167,000"]
