"""One process's session of writing a run directory, from start to end: the one owner of a run's
lifecycle, used by the trainer and by the Monitor alike.

A session is made in two moves, so that nothing is touched before the caller is ready (the data
loaded, the model built):

1. :meth:`RunSession.new` or :meth:`RunSession.resume` check the run directory and, for a resume,
   load its newest readable checkpoint, and change nothing;
2. :meth:`RunSession.open` creates the run (or reopens it and rewinds everything recorded after the
   checkpoint, so a resumed run has no duplicated or missing rows) and returns the writer.

Then :meth:`save_checkpoint` during training and :meth:`close` with the run's status at the end.
Used as a context manager, a session that an exception leaves unclosed records why the run ended
(``stopped``, ``interrupted`` or ``failed``). The resume rules (which settings a resumed run may
change) are :func:`vaediag.config.resume_changes`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from vaediag.errors import RunDirError, TrainingStopped, first_line
from vaediag.rundir import (
    CLI_HINT,
    RunWriter,
    check_can_create,
    check_can_resume,
    list_checkpoints,
    load_run,
    remove_run,
)

#: The version of what :meth:`RunSession.save_checkpoint` writes.
CHECKPOINT_FORMAT = 1


def load_latest_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The newest checkpoint that loads with ``weights_only=True``."""
    import torch

    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise RunDirError(f"{run_dir} has no checkpoint to resume from; start it again with "
                          f"--overwrite")
    unreadable: list[str] = []
    for step, path in reversed(checkpoints):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            ok = isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT \
                and state.get("step") == step
            reason = "" if ok else "not a vaediag checkpoint of this step"
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint: try an older one
            ok, reason = False, first_line(exc)
        if ok:
            if unreadable:
                print(f"vaediag: warning: {len(unreadable)} newer checkpoint(s) unreadable "
                      f"({unreadable[0]}); resuming from step {step}", file=sys.stderr)
            return state
        unreadable.append(f"{path.name}: {reason}")
    raise RunDirError(f"{run_dir}: no readable checkpoint to resume from ({unreadable[0]}"
                      + (f"; and {len(unreadable) - 1} more" if len(unreadable) > 1 else "")
                      + ")")



class RunSession:
    """Writing one run directory in this process: create or resume, checkpoint, close."""

    def __init__(self, path: str | Path, *, overwrite: bool = False,
                 checkpoint: dict[str, Any] | None = None):
        self.path = Path(path)
        self.overwrite = overwrite
        #: the checkpoint a resumed session continues from (None for a new run)
        self.checkpoint = checkpoint
        self.writer: RunWriter | None = None
        #: called, best effort, before an exception closes the run: whoever holds rows not yet
        #: handed to the writer (the Monitor's last step) hands them over
        self.before_abort: list[Callable[[], None]] = []

    # -- the two moves ------------------------------------------------------------------------

    @classmethod
    def new(cls, path: str | Path, *, overwrite: bool = False,
            hint: str = CLI_HINT) -> RunSession:
        """A session that will create a new run at ``path``; refuses a path it may not use (a
        non-empty folder without ``overwrite``, a run in use, ...). Changes nothing."""
        check_can_create(Path(path), overwrite, hint)
        return cls(path, overwrite=overwrite)

    @classmethod
    def resume(cls, path: str | Path) -> RunSession:
        """A session that will continue the run at ``path`` from its newest readable checkpoint;
        refuses a path that is no run directory or is in use. Changes nothing."""
        check_can_resume(Path(path))
        return cls(path, checkpoint=load_latest_checkpoint(Path(path)))

    @property
    def resumed(self) -> bool:
        return self.checkpoint is not None

    @property
    def start_step(self) -> int:
        """The step training starts from: the checkpoint's, or 0."""
        return int(self.checkpoint["step"]) if self.checkpoint is not None else 0

    def saved_config(self) -> dict[str, Any]:
        """The configuration the run was saved with (a resumed session continues it)."""
        return load_run(self.path).config

    def open(self, *, config_toml: str, environment: dict[str, Any], flush_steps: int = 50,
             flush_seconds: float = 5.0, **resume_fields: Any) -> RunWriter:
        """Create the run, or reopen it, record ``config_toml`` as the config it continues
        with, forget what came after the checkpoint and record a ``resume`` event (with
        ``resume_fields`` and what was dropped). Returns the writer."""
        if self.checkpoint is None:
            self.writer = RunWriter.create(self.path, config_toml=config_toml,
                                           environment=environment, overwrite=self.overwrite,
                                           flush_steps=flush_steps, flush_seconds=flush_seconds)
            return self.writer
        writer = self.writer = RunWriter.reopen(self.path, flush_steps=flush_steps,
                                                flush_seconds=flush_seconds)
        writer.save_config(config_toml)
        step = self.start_step
        dropped = writer.rewind(step, int(self.checkpoint["events_written"]))
        writer.event("resume", step, dropped=dropped, **resume_fields)
        return writer

    @property
    def _open(self) -> RunWriter:
        """The writer of an opened session."""
        if self.writer is None:
            raise RuntimeError("the run session is not open: call open() first")
        return self.writer

    # -- during and after ---------------------------------------------------------------------

    def save_checkpoint(self, step: int, state: dict[str, Any], keep: int) -> None:
        """Record a ``checkpoint`` event and save ``state`` (tensors and plain types) with what a
        resume needs to rewind the run to this moment; keep the newest ``keep`` (0: all)."""
        writer = self._open
        writer.event("checkpoint", step)
        # Rows reach the disk before the checkpoint does: a run killed after this checkpoint
        # resumes from it with every earlier row on disk, none missing.
        writer.flush()
        writer.save_checkpoint(step, {"format": CHECKPOINT_FORMAT, "step": step, **state,
                                      "events_written": writer.events_written}, keep=keep)

    @property
    def closed(self) -> bool:
        return self.writer is None or self.writer.closed

    def close(self, status: str, step: int, message: str = "") -> None:
        """Flush everything and mark the run's status; the run directory is complete."""
        if not self.closed:
            self._open.close(status, max(step, 0), message)

    def discard(self, message: str) -> None:
        """Close the run as ``failed`` and delete its directory: a run this process made and
        gave up before anything was recorded in it (a Monitor that could not be set up)."""
        self.close("failed", 0, message)
        remove_run(self.path)

    def __enter__(self) -> RunSession:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None or self.closed:
            return
        for hand_over in self.before_abort:
            with contextlib.suppress(Exception):  # the run's own error is the one to see
                hand_over()
        if isinstance(exc, TrainingStopped):
            status, step, message = "stopped", exc.step, str(exc)
        elif isinstance(exc, KeyboardInterrupt):
            status, step, message = ("interrupted", self._open.last_step + 1,
                                     "aborted by a second signal")
        else:
            status, step, message = ("failed", self._open.last_step + 1,
                                     f"{type(exc).__name__}: {exc}")
        # the disk that failed the run may fail this too: the run's own error is the one to see
        with contextlib.suppress(RunDirError):
            self.close(status, step, message)


__all__ = ["CHECKPOINT_FORMAT", "RunSession", "load_latest_checkpoint"]
