from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from vaediag.errors import RunDirError
from vaediag.rundir import (
    RunWriter,
    TableWriter,
    is_locked,
    load_run,
    read_table,
    truncate_table,
)
from vaediag.rundir import segments as segments_module


def _writer(path, **kw) -> RunWriter:
    return RunWriter.create(path, config_toml="[train]\nsteps = 3\n", environment={"x": 1}, **kw)


def test_table_round_trip_with_growing_columns(tmp_path):
    t = TableWriter(tmp_path / "t")
    for s in range(5):
        t.append({"step": s, "epoch": 0, "time": 1000.0 + s / 3, "recon": 10.0 - s})
    t.flush()
    t.append({"step": 5, "epoch": 1, "time": 2000.0, "recon": 4.0, "late": 0.5})
    t.close()
    assert len(list((tmp_path / "t").iterdir())) == 2  # a new column starts a new segment
    frame, problems = read_table(tmp_path / "t")
    assert problems == []
    assert list(frame["step"]) == list(range(6))
    assert frame["step"].dtype == np.int64
    assert frame["recon"].dtype == np.float32
    assert frame["time"].dtype == np.float64 and frame["time"][1] == 1000.0 + 1 / 3
    assert frame["late"].isna().sum() == 5 and frame["late"].iloc[-1] == 0.5


def test_rows_missing_a_column_store_nulls(tmp_path):
    t = TableWriter(tmp_path / "t")
    t.append({"step": 0, "a": 1.0, "b": 2.0})
    t.append({"step": 1, "a": 3.0})
    t.close()
    frame, _ = read_table(tmp_path / "t")
    assert math.isnan(frame["b"][1]) and frame["a"][1] == 3.0


def test_a_torn_last_write_keeps_every_complete_batch(tmp_path):
    t = TableWriter(tmp_path / "t")
    for s in range(30):
        t.append({"step": s, "v": float(s)})
        if s % 10 == 9:
            t.flush()
    # the writer is killed here: never closed, so its segment is not compacted
    (segment,) = (tmp_path / "t").iterdir()
    data = segment.read_bytes()
    segment.write_bytes(data[: len(data) - 30])  # the end of the last batch is lost
    frame, problems = read_table(tmp_path / "t")
    assert list(frame["step"]) == list(range(20))
    assert len(problems) == 1 and "incomplete write" in problems[0]
    segment.write_bytes(data[:20])  # not even the schema is complete
    frame, problems = read_table(tmp_path / "t")
    assert len(frame) == 0 and "step" in frame.columns


def test_segments_are_compacted_into_one_batch(tmp_path, monkeypatch):
    """Rows flushed 5 at a time; a segment is closed and rewritten as one record batch every
    10 rows and at close, so readers decompress few large buffers."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    monkeypatch.setattr(segments_module, "COMPACT_ROWS", 10)
    t = TableWriter(tmp_path / "t")
    for s in range(25):
        t.append({"step": s, "v": float(s)})
        if s % 5 == 4:
            t.flush()
    t.close()
    segments = sorted((tmp_path / "t").iterdir())
    batches = [len(list(ipc.open_stream(pa.memory_map(str(p))))) for p in segments]
    assert batches == [1, 1, 1]
    frame, problems = read_table(tmp_path / "t")
    assert list(frame["step"]) == list(range(25)) and problems == []


def test_truncate_table(tmp_path):
    t = TableWriter(tmp_path / "t")
    for s in range(10):
        t.append({"step": s, "v": float(s)})
        if s == 4:  # a second segment from step 5 on (a writer opened again, as a resume does)
            t.close()
            t = TableWriter(tmp_path / "t")
    t.close()
    assert len(list((tmp_path / "t").glob("*"))) >= 2
    dropped = truncate_table(tmp_path / "t", lambda s: s < 3)
    assert dropped == 7
    frame, problems = read_table(tmp_path / "t")
    assert list(frame["step"]) == [0, 1, 2] and problems == []


def test_create_writes_the_documented_files(tmp_path):
    run = tmp_path / "run"
    w = _writer(run)
    w.log_step({"step": 0, "recon": 1.0})
    w.event("nonfinite", 0, term="kl", value=float("nan"))
    w.close("finished", 1)
    assert {p.name for p in run.iterdir()} == {
        ".lock", "run.json", "config.toml", "environment.json", "events.jsonl", "scalars",
        "evals", "grids", "checkpoints"}
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["step"] == 1 and info["format"] == 1
    loaded = load_run(run)
    assert loaded.status == "finished"
    assert loaded.config == {"train": {"steps": 3}}
    assert loaded.events["value"][0] == "nan"  # JSON has no NaN: stored as a string
    assert list(loaded.scalars["step"]) == [0]


def test_rows_are_flushed_by_count_and_by_time(tmp_path):
    w = _writer(tmp_path / "r", flush_steps=3, flush_seconds=3600)
    for s in range(4):
        w.log_step({"step": s, "v": 1.0})
    assert list(load_run(tmp_path / "r").scalars["step"]) == [0, 1, 2]  # 3 flushed, 1 buffered
    w.flush_seconds = 0.0
    w.log_step({"step": 4, "v": 1.0})
    assert len(load_run(tmp_path / "r").scalars) == 5
    w.close("finished", 5)


def test_refuses_to_clobber(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(RunDirError, match="is not empty; pass --resume"):
        _writer(tmp_path / "mine")
    with pytest.raises(RunDirError, match="not a vaediag run directory"):
        _writer(tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunDirError, match="not a directory"):
        _writer(tmp_path / "afile")
    with pytest.raises(RunDirError, match="not writable"):
        _writer(tmp_path / "afile" / "run")


def test_overwrite_replaces_a_finished_run(tmp_path):
    w = _writer(tmp_path / "r")
    w.log_step({"step": 0, "v": 1.0})
    w.close("finished", 1)
    w2 = _writer(tmp_path / "r", overwrite=True)
    assert len(load_run(tmp_path / "r").scalars) == 0
    w2.close("finished", 0)


def test_lock_excludes_a_second_writer(tmp_path):
    w = _writer(tmp_path / "r")
    assert is_locked(tmp_path / "r")
    assert load_run(tmp_path / "r").status == "running"
    with pytest.raises(RunDirError, match="in use by another vaediag process"):
        RunWriter.reopen(tmp_path / "r")
    with pytest.raises(RunDirError, match="in use"):
        _writer(tmp_path / "r", overwrite=True)
    w.close("finished", 0)
    assert not is_locked(tmp_path / "r")


def test_a_run_nobody_writes_but_marked_running_reads_as_killed(tmp_path):
    w = _writer(tmp_path / "r")
    w.log_step({"step": 0, "v": 1.0})
    w.flush()
    w._lock.release()  # what the kernel does when the writer dies
    run = load_run(tmp_path / "r")
    assert run.status == "killed"
    assert "killed or crashed" in run.problems[0]


def test_bad_run_dirs(tmp_path):
    with pytest.raises(RunDirError, match="no run directory at"):
        load_run(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(RunDirError, match=r"not a vaediag run directory \(no run.json\)"):
        load_run(tmp_path / "plain")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "run.json").write_text("{not json")
    with pytest.raises(RunDirError, match="is corrupt"):
        load_run(tmp_path / "corrupt")
    (tmp_path / "future").mkdir()
    (tmp_path / "future" / "run.json").write_text('{"format": 99}')
    with pytest.raises(RunDirError, match="newer vaediag"):
        load_run(tmp_path / "future")


def test_torn_event_line_is_skipped(tmp_path):
    w = _writer(tmp_path / "r")
    w.event("a", 0)
    w.event("b", 1)
    w.close("finished", 2)
    with open(tmp_path / "r" / "events.jsonl", "a") as f:
        f.write('{"seq": 2, "step": 2, "ki')
    assert list(load_run(tmp_path / "r").events["kind"]) == ["a", "b"]


def test_checkpoints_keep_the_newest(tmp_path):
    w = _writer(tmp_path / "r")
    for step in (0, 10, 20, 30):
        w.save_checkpoint(step, {"step": step}, keep=2)
    assert [s for s, _ in load_run(tmp_path / "r").checkpoints] == [20, 30]
    w.close("finished", 30)


def test_rewind_drops_everything_after_the_checkpoint(tmp_path):
    w = _writer(tmp_path / "r", flush_steps=4)
    for s in range(12):
        w.log_step({"step": s, "v": float(s)})
        if s % 4 == 3:
            w.log_eval({"step": s + 1, "e": 1.0})
            w.save_grid(s + 1, b"png")
        w.event("tick", s)
        if s == 7:  # the checkpoint at step 8 is taken after step 7's row and events
            events_at_checkpoint = w.events_written
    w.flush()
    dropped = w.rewind(8, events_at_checkpoint)
    assert dropped == {"scalars": 4, "evals": 1, "grids": 1, "events": 4}
    w.close("interrupted", 8)
    run = load_run(tmp_path / "r")
    assert list(run.scalars["step"]) == list(range(8))
    assert list(run.evals["step"]) == [4, 8]
    assert [s for s, _ in run.grids] == [4, 8]
    assert list(run.events["step"]) == list(range(8))


def test_atomic_files_leave_no_temporaries(tmp_path):
    w = _writer(tmp_path / "r")
    w.save_grid(0, b"png")
    w.save_fixed(fixed_z=np.zeros((8, 2), np.float32))
    w.close("finished", 0)
    leftovers = [p for p in (tmp_path / "r").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    assert load_run(tmp_path / "r").fixed["fixed_z"].shape == (8, 2)
    grid_png = tmp_path / "r" / "grids" / "step-00000000.png"
    assert os.path.getsize(grid_png) == 3
    # Same permissions as any other file the user creates (mkstemp alone would make them 0600).
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    for name in ("run.json", "config.toml", "fixed.npz", "grids/step-00000000.png"):
        assert (tmp_path / "r" / name).stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_until_shows_the_run_as_it_was_at_a_step(tmp_path):
    from vaediag.rundir import load_run
    from vaediag.testing import standard_evals, standard_scalars, write_run

    cols = standard_scalars(1000)
    ev = standard_evals(cols["step"][::100])
    path = write_run(tmp_path / "run", cols, ev, events=[{"kind": "note", "step": 300},
                                                         {"kind": "note", "step": 800}])
    run = load_run(path)
    cut = run.until(450)
    # the rows of the 450 steps before it: step 450's row comes after its evaluation
    assert cut.scalars["step"].max() == 449 and len(cut.scalars) == 450
    assert cut.evals["step"].tolist() == [0, 100, 200, 300, 400]
    assert cut.events["step"].max() == 300
    assert cut.info["step"] <= 450
    assert len(run.scalars) == 1000 and run.evals["step"].max() == 900  # the original is intact
    np.testing.assert_array_equal(cut.scalars["recon"], run.scalars["recon"][:450])


def test_a_table_cut_in_half_keeps_the_rows_before_the_cut(tmp_path):
    """A compacted segment is written in bounded record batches: cutting the file in the middle
    loses the batch it was cut in and what follows, never the rows before."""
    from vaediag.rundir.segments import BATCH_ROWS
    from vaediag.testing import standard_scalars, write_run

    cols = standard_scalars(2 * BATCH_ROWS - 500)  # one segment, two batches
    path = write_run(tmp_path / "run", cols)
    (segment,) = sorted((path / "scalars").iterdir())
    data = segment.read_bytes()
    segment.write_bytes(data[:len(data) * 3 // 4])  # cut inside the second batch
    run = load_run(path)
    kept = run.scalars
    assert len(kept) == BATCH_ROWS  # the whole first batch, nothing of the one that was cut
    assert (kept["step"].to_numpy() == cols["step"][:len(kept)]).all()
    assert np.allclose(kept["recon"].to_numpy(), cols["recon"][:len(kept)])
    assert any("scalars" in p for p in run.problems)


def test_remove_run_deletes_a_run_directory_and_refuses_anything_else(tmp_path):
    from vaediag.errors import RunDirError
    from vaediag.rundir import RunWriter, remove_run

    RunWriter.create(tmp_path / "run", config_toml="", environment={}).close("failed", 0)
    remove_run(tmp_path / "run")
    assert not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(RunDirError, match="not a vaediag run directory"):
        remove_run(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    remove_run(tmp_path / "absent")  # nothing there: nothing to do
