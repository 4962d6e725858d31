"""The run's lifecycle (vaediag.session.RunSession): refusing before touching, closing with the
status an exception calls for, and resuming from a checkpoint with everything after it gone."""

from __future__ import annotations

import pytest

from vaediag.errors import RunDirError, TrainingStopped
from vaediag.rundir import load_run
from vaediag.session import CHECKPOINT_FORMAT, RunSession


def _open(path, **kw) -> RunSession:
    session = RunSession.new(path, **kw)
    session.open(config_toml="[train]\nsteps = 5\n", environment={"x": 1}, flush_steps=1)
    return session


def test_a_new_session_refuses_a_folder_it_may_not_use_and_touches_nothing(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="not empty"):
        RunSession.new(folder)
    with pytest.raises(RunDirError, match="not a vaediag run directory"):
        RunSession.new(folder, overwrite=True)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(("error", "status", "step", "message"), [
    (ValueError("boom"), "failed", 3, "ValueError: boom"),
    (TrainingStopped("non-finite kl at step 2", 2), "stopped", 2, "non-finite kl at step 2"),
    (KeyboardInterrupt(), "interrupted", 3, "aborted by a second signal"),
])
def test_an_exception_closes_the_run_with_its_status(tmp_path, error, status, step, message):
    session = _open(tmp_path / "r")
    with pytest.raises(type(error)), session:
        for s in range(3):
            session.writer.log_step({"step": s, "recon": 1.0})
        raise error
    run = load_run(tmp_path / "r")
    assert (run.status, run.info["step"], run.info["message"]) == (status, step, message)
    assert list(run.scalars["step"]) == [0, 1, 2]


def test_a_closed_session_is_left_as_it_was_closed(tmp_path):
    session = _open(tmp_path / "r")
    with session:
        session.close("finished", 7, "done")
    assert load_run(tmp_path / "r").status == "finished"


def test_resume_rewinds_to_the_checkpoint_and_records_what_it_dropped(tmp_path):
    session = _open(tmp_path / "r")
    writer = session.writer
    for s in range(5):
        writer.log_step({"step": s, "recon": float(s)})
        if s == 1:
            session.save_checkpoint(2, {"model": {}}, keep=2)
    writer.event("later", 4)
    session.close("interrupted", 5)

    resumed = RunSession.resume(tmp_path / "r")
    assert resumed.resumed and resumed.start_step == 2
    assert resumed.checkpoint["format"] == CHECKPOINT_FORMAT
    assert list(load_run(tmp_path / "r").scalars["step"]) == [0, 1, 2, 3, 4]  # nothing yet
    resumed.open(config_toml="[train]\nsteps = 9\n", environment={}, changes={"x": [1, 2]})
    resumed.close("finished", 2)
    run = load_run(tmp_path / "r")
    assert list(run.scalars["step"]) == [0, 1]
    assert list(run.events["kind"]) == ["checkpoint", "resume"]
    event = run.events.iloc[-1]
    assert event["dropped"]["scalars"] == 3 and event["dropped"]["events"] == 1
    assert event["changes"] == {"x": [1, 2]}
    assert "steps = 9" in (tmp_path / "r" / "config.toml").read_text()


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    _open(tmp_path / "r").close("finished", 0)
    with pytest.raises(RunDirError, match="no checkpoint to resume from"):
        RunSession.resume(tmp_path / "r")
