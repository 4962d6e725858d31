"""Reliability as a user meets it: kill -9 at many moments then --resume, corrupted run files,
checkpoints that do not fit, hostile data folders and a full disk. Real subprocesses and real
files throughout."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY, run_cli
from vaediag.data.images import list_folder
from vaediag.rundir import load_run

#: 60 steps, an evaluation and a checkpoint every 20, rows flushed every 7: a checkpoint is
#: newer than the last flush unless rows are flushed before it
RUN = ["--steps", "60", *TINY, "--set", "eval.every_steps=20", "--set", "log.flush_steps=7",
       "--set", "log.flush_seconds=1000", "--set", "probes.metric_images=0"]

#: The child trains with one write of the run directory patched to kill the process (SIGKILL,
#: no clean-up) at the n-th time it happens: after it, or halfway through it.
KILLER = textwrap.dedent('''
    import os, signal, sys, tempfile
    from vaediag.rundir import segments, writer
    moment, nth, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    seen = {"n": 0}

    def due():
        seen["n"] += 1
        return seen["n"] == nth

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def half_written(path, data):
        fd, _ = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.write(fd, data[:len(data) // 2])
        die()

    if moment in ("after-checkpoint", "after-flush", "after-grid"):
        name = {"after-checkpoint": "save_checkpoint", "after-flush": "flush",
                "after-grid": "save_grid"}[moment]
        original = getattr(writer.RunWriter, name)
        def patched(self, *a, **k):
            out = original(self, *a, **k)
            if due():
                die()
            return out
        setattr(writer.RunWriter, name, patched)
    elif moment in ("checkpoint-write", "status-write"):
        suffix = ".pt" if moment == "checkpoint-write" else ".json"
        original = writer.atomic_write
        def patched(path, data):
            if path.suffix == suffix and path.name != "environment.json" and due():
                half_written(path, data)
            return original(path, data)
        writer.atomic_write = patched
    elif moment == "mid-flush":
        original = segments.TableWriter._write
        def patched(self, segment, batch):
            if self.directory.name == "scalars" and due():
                import pyarrow as pa, pyarrow.ipc as ipc
                sink = pa.BufferOutputStream()
                with ipc.new_stream(sink, batch.schema) as w:
                    w.write_batch(batch)
                data = sink.getvalue().to_pybytes()
                segment.sink.write(data[len(data) // 2:len(data) // 2 + len(data) // 4])
                segment.sink.flush()
                die()
            return original(self, segment, batch)
        segments.TableWriter._write = patched
    from vaediag.cli import main
    sys.exit(main(args))
''')


def _table(run, name):
    frame = getattr(run, name).drop(columns=["time"])
    return list(frame.columns), frame.to_numpy(np.float64)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run, never interrupted."""
    from vaediag.cli import main

    out = tmp_path_factory.mktemp("reliability") / "reference"
    assert main(["train", "--out", str(out), *RUN]) == 0
    return load_run(out)


@pytest.mark.parametrize(("moment", "nth"), [
    ("after-flush", 2),        # step 7: the resume starts from the step-0 checkpoint
    ("after-checkpoint", 2),   # just after the step-20 checkpoint, rows 14-19 buffered
    ("after-checkpoint", 3),   # ... and after the step-40 one
    ("checkpoint-write", 3),   # halfway through writing the step-40 checkpoint
    ("mid-flush", 4),          # a torn record batch
    ("after-grid", 2),         # the step-20 grid written, its evaluation row not
    ("status-write", 2),       # halfway through the final run.json
])
def test_kill_9_at_any_moment_then_resume_equals_an_uninterrupted_run(
        reference, tmp_path, capsys, moment, nth):
    run_dir = tmp_path / "run"
    child = subprocess.run([sys.executable, "-c", KILLER, moment, str(nth), "train", "--out",
                            str(run_dir), *RUN], capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert load_run(run_dir).status == "killed"  # readable as it was left
    code, _, err = run_cli(capsys, "train", "--out", run_dir, "--resume")
    assert code == 0, err
    resumed = load_run(run_dir)
    assert resumed.status == "finished" and resumed.problems == []
    for name in ("scalars", "evals"):
        columns, rows = _table(resumed, name)
        ref_columns, ref_rows = _table(reference, name)
        assert columns == ref_columns
        np.testing.assert_array_equal(rows, ref_rows)  # none missing, none twice, same values
    assert list(resumed.scalars["step"]) == list(range(60))
    assert list(resumed.evals["step"]) == [0, 20, 40, 60]
    assert [s for s, _ in resumed.grids] == [0, 20, 40, 60]
    assert not [p for p in run_dir.rglob("*.tmp")], "a killed write's temporary file is left"


def test_a_checkpoint_of_another_model_is_refused_and_nothing_changes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_cli(capsys, "train", "--out", run_dir, *RUN)[0] == 0
    other = tmp_path / "other"
    assert run_cli(capsys, "train", "--out", other, *RUN, "--set",
                   "model.channels=[8,32]")[0] == 0
    last = sorted((run_dir / "checkpoints").iterdir())[-1]
    theirs = sorted((other / "checkpoints").iterdir())[-1]
    last.write_bytes(theirs.read_bytes())
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, "train", "--out", run_dir, "--resume", "--steps", "80")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "does not fit this run's model" in err and "nothing was changed" in err
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()
             and p.name != ".lock"}
    assert after == {k: v for k, v in before.items() if k.name != ".lock"}

    state = torch.load(last, weights_only=True)
    del state["monitor"]
    torch.save(state, last)
    code, _, err = run_cli(capsys, "train", "--out", run_dir, "--resume", "--steps", "80")
    assert code == 2 and "lacks monitor" in err and len(err.strip().splitlines()) == 1


def test_garbage_checkpoints_are_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_cli(capsys, "train", "--out", run_dir, *RUN)[0] == 0
    for checkpoint in (run_dir / "checkpoints").iterdir():
        checkpoint.write_bytes(b"not a checkpoint at all" * 10)
    code, _, err = run_cli(capsys, "train", "--out", run_dir, "--resume", "--steps", "80")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "no readable checkpoint to resume from (step-00000060.pt:" in err
    assert "and 3 more" in err


@pytest.mark.parametrize(("content", "message"), [
    ('{"format": "one", "status": "finished"}', "format must be an integer"),
    ('{"format": 1, "status": 3}', "status must be a string"),
    ('{"format": 1, "step": "sixty"}', "step must be an integer"),
])
def test_a_wrong_typed_run_json_is_one_line(tmp_path, capsys, content, message):
    run_dir = tmp_path / "run"
    assert run_cli(capsys, "train", "--out", run_dir, *RUN, "--steps", "5")[0] == 0
    (run_dir / "run.json").write_text(content)
    code, _, err = run_cli(capsys, "analyze", run_dir, "--no-html", "--no-pdf")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_damaged_events_and_grids_are_skipped_and_named(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_cli(capsys, "train", "--out", run_dir, *RUN)[0] == 0
    with open(run_dir / "events.jsonl", "a") as events:
        events.write('[1, 2, 3]\n"just a string"\n')
    grid = run_dir / "grids" / "step-00000040.png"
    grid.write_bytes(grid.read_bytes()[:3000])  # a torn PNG
    code, out, err = run_cli(capsys, "analyze", run_dir)
    assert code == 0, err
    assert "events.jsonl: 2 line(s) skipped" in out
    (warning,) = [line for line in err.splitlines() if "step-00000040.png" in line]
    assert warning.startswith("vaediag: warning: grids/step-00000040.png is unreadable")
    html = (run_dir / "report.html").read_text()
    assert "grids/step-00000040.png is unreadable" in html
    assert (run_dir / "report.pdf").read_bytes().startswith(b"%PDF")


def test_symlink_loops_in_a_data_folder_are_followed_once(tmp_path):
    root = tmp_path / "faces"
    (root / "a").mkdir(parents=True)
    for i in range(40):
        Image.new("RGB", (8, 8), (i, 2 * i, 3 * i)).save(root / ("a" if i % 2 else ".") /
                                                         f"{i:02d}.png")
    (root / "a" / "up").symlink_to("..")          # a loop back to the root
    (root / "loop").symlink_to(".")               # a loop onto itself
    (root / "a" / "again").symlink_to(root / "a")  # a second way into a
    images, _ = list_folder(root)
    assert len(images) == 40
    assert len({p.resolve() for p in images}) == 40


def _limited_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_is_one_line_and_the_run_stays_readable(tmp_path):
    """Files may grow to 80 kB: the first checkpoint with Adam's state is larger, so writing it
    fails as a full disk would (the file-size limit gives EFBIG where a full disk gives
    ENOSPC; both are the same failed write)."""
    run_dir = tmp_path / "run"
    child = subprocess.run([sys.executable, "-m", "vaediag", "train", "--out", str(run_dir),
                            *RUN], capture_output=True, text=True, timeout=300,
                           preexec_fn=_limited_file_size(80_000))
    assert child.returncode == 2, child.stderr[-2000:]
    assert "Traceback" not in child.stderr
    errors = [line for line in child.stderr.splitlines() if line.startswith("vaediag: error")]
    assert len(errors) == 1 and "cannot write checkpoints/step-00000020.pt" in errors[0]
    assert "File too large" in errors[0] and "--resume" in errors[0]
    run = load_run(run_dir)
    assert run.status == "failed"
    assert list(run.scalars["step"]) == list(range(20))  # flushed before the checkpoint
    assert not [p for p in run_dir.rglob("*.tmp")]


def test_a_huge_image_is_skipped_in_vaediags_own_words(tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(24):
        Image.new("RGB", (20, 20), (10 * i, 100, 200)).save(folder / f"{i:02d}.png")
    Image.new("1", (10_000, 10_000)).save(folder / "huge.png")  # 100 M pixels, a small file
    child = subprocess.run([sys.executable, "-m", "vaediag", "train", "--data", str(folder),
                            "--out", str(tmp_path / "run"), "--steps", "2",
                            *TINY, "--set", "data.val_size=8", "--set", "train.batch_size=8"],
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONWARNINGS": "default"})
    assert child.returncode == 0, child.stderr[-2000:]
    assert "DecompressionBomb" not in child.stderr
    warnings = [line for line in child.stderr.splitlines() if "huge.png" in line]
    assert len(warnings) == 1 and warnings[0].startswith("vaediag: warning:")
    assert "too large to decode safely (10000x10000 pixels" in warnings[0]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "finished"


def test_stale_temporary_files_are_removed_when_a_run_is_reopened(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_cli(capsys, "train", "--out", run_dir, *RUN, "--steps", "20")[0] == 0
    stale = [run_dir / "checkpoints" / ".step-00000020.pt.abc123.tmp",
             run_dir / ".run.json.xyz.tmp"]
    for path in stale:
        path.write_bytes(b"x" * 1000)
    assert run_cli(capsys, "train", "--out", run_dir, "--resume", "--steps", "40")[0] == 0
    assert not any(p.exists() for p in stale)
    assert Path(run_dir / "checkpoints" / "step-00000040.pt").exists()


def test_a_crash_keeps_every_row_up_to_it(tmp_path, monkeypatch):
    """An exception in the forward pass of step 10 (the Monitor still holds step 9's row):
    the run closes as failed with rows 0-9, the last one included."""
    import vaediag.trainer as trainer_module
    from vaediag.config import build_config

    real = trainer_module.loss_terms
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 11:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "loss_terms", failing)
    config = build_config(overrides=[a for a in TINY if "=" in a] + ["train.steps=30"])
    with pytest.raises(RuntimeError, match="simulated"):
        trainer_module.train(config, tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    assert run.status == "failed" and "RuntimeError: out of memory" in run.info["message"]
    assert list(run.scalars["step"]) == list(range(10))
    assert run.info["step"] == 10
