"""The one writer of a run directory: creating, reopening for a resume, rows, events, grids,
checkpoints, rewinding to a checkpoint, and closing with a status."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vaediag.errors import RunDirError
from vaediag.rundir.layout import (
    CHECKPOINTS_DIR,
    CONFIG_TOML,
    ENVIRONMENT_JSON,
    EVALS_DIR,
    EVENTS_JSONL,
    FIXED_NPZ,
    FORMAT_VERSION,
    GRIDS_DIR,
    RUN_JSON,
    SCALARS_DIR,
    _now,
    atomic_write,
    check_run_dir,
    list_checkpoints,
    list_grids,
    remove_temporaries,
    step_file,
)
from vaediag.rundir.lock import RunLock, is_locked
from vaediag.rundir.reader import read_events_lines
from vaediag.rundir.segments import TableWriter, truncate_table


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _jsonable(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so every line stays valid JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """Turn a failed write (a full disk, a quota, a file-size limit, a read-only mount) into
    one :class:`RunDirError` line: what could not be written, and that what was written before
    stays readable."""
    try:
        yield
    except OSError as exc:
        raise RunDirError(f"cannot write {what} in {path}: {exc.strerror or exc}; what was "
                          f"written before is intact and readable: free some space and "
                          f"continue with --resume") from None


#: what a non-empty run directory needs, in the command line's words (the Monitor says it in
#: Python's)
CLI_HINT = "pass --resume to continue that run or --overwrite to replace it"


def check_can_create(path: Path, overwrite: bool, hint: str = CLI_HINT) -> None:
    """Raise :class:`RunDirError` unless a new run may be created at ``path``. Changes nothing.

    ``overwrite`` allows replacing an existing *run directory* (one holding run.json), never an
    arbitrary non-empty folder: that is almost always a mistyped path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise RunDirError(f"{path} is not empty{_holding(path)}; {hint}")
        if not (path / RUN_JSON).exists():
            raise RunDirError(f"{path} is not empty and is not a vaediag run directory (no "
                              f"{RUN_JSON}); refusing to overwrite it")
        if is_locked(path):
            raise RunDirError(f"{path} is in use by another vaediag process")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot create run directory {path}: {existing} is not writable")


def remove_run(path: Path) -> None:
    """Delete a run directory (one a process made and gave up, or a replay being replaced);
    a folder that is not a vaediag run directory (no ``run.json``) is refused, never
    deleted."""
    path = Path(path)
    if not path.exists():
        return
    if not (path / RUN_JSON).exists():
        raise RunDirError(f"{path} is not a vaediag run directory (no {RUN_JSON}); refusing to "
                          f"delete it")
    shutil.rmtree(path, ignore_errors=True)


def _holding(path: Path) -> str:
    """' (it holds a failed run of 12 steps)' for a run directory, else ''."""
    try:
        info = json.loads((path / RUN_JSON).read_text())
        return f" (it holds a {info['status']} run of {int(info['step'])} steps)"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def check_can_resume(path: Path) -> None:
    """Raise :class:`RunDirError` unless ``path`` is a run directory nobody is writing."""
    check_run_dir(path)
    if is_locked(path):
        raise RunDirError(f"{path} is in use by another vaediag process")


def prepare_new(path: Path, overwrite: bool) -> None:
    """Make ``path`` an empty directory for a new run (see :func:`check_can_create`)."""
    check_can_create(path, overwrite)
    if path.is_dir() and any(path.iterdir()):
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create run directory {path}: {exc.strerror or exc}") from None


class RunWriter:
    """Writes one run directory. One writer per run at a time (enforced with a lock).

    Create with :meth:`create` (new run) or :meth:`reopen` (resume); then ``log_step``,
    ``log_eval``, ``event``, ``save_grid``, ``save_checkpoint``; ``close`` at the end.
    """

    def __init__(self, path: Path, lock: RunLock, flush_steps: int = 50,
                 flush_seconds: float = 5.0):
        self.path = path
        self._lock = lock
        self.flush_steps = flush_steps
        self.flush_seconds = flush_seconds
        self._scalars = TableWriter(path / SCALARS_DIR)
        self._evals = TableWriter(path / EVALS_DIR)
        (path / GRIDS_DIR).mkdir(exist_ok=True)
        (path / CHECKPOINTS_DIR).mkdir(exist_ok=True)
        self._events = open(path / EVENTS_JSONL, "a", encoding="utf-8")  # noqa: SIM115
        self.events_written = sum(1 for _ in read_events_lines(path / EVENTS_JSONL))
        self._last_flush = time.monotonic()
        self._run_info = json.loads((path / RUN_JSON).read_text())
        self.last_step = -1  # the step of the last per-step row logged in this session

    # -- creation -----------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, *, config_toml: str, environment: dict[str, Any],
               overwrite: bool = False, flush_steps: int = 50,
               flush_seconds: float = 5.0) -> RunWriter:
        path = Path(path)
        prepare_new(path, overwrite)
        lock = RunLock(path)
        atomic_write(path / CONFIG_TOML, config_toml.encode())
        atomic_write(path / ENVIRONMENT_JSON,
                     json.dumps(environment, indent=2, default=_json_default).encode())
        info = {"format": FORMAT_VERSION, "status": "running", "step": 0,
                "created": _now(), "updated": _now(), "message": ""}
        atomic_write(path / RUN_JSON, json.dumps(info, indent=2).encode())
        return cls(path, lock, flush_steps, flush_seconds)

    @classmethod
    def reopen(cls, path: str | Path, *, flush_steps: int = 50,
               flush_seconds: float = 5.0) -> RunWriter:
        """Open an existing run for appending (the caller rewinds it to a checkpoint first)."""
        path = Path(path)
        check_run_dir(path)
        lock = RunLock(path)
        remove_temporaries(path)  # what a killed writer was writing when it died
        return cls(path, lock, flush_steps, flush_seconds)

    # -- rows ---------------------------------------------------------------------------------

    def log_step(self, row: dict[str, Any]) -> None:
        """Buffer one per-step row; flushes when the step or time budget is reached."""
        self._scalars.append(row)
        self._logged(row["step"])

    def log_step_parts(self, step: int, parts: Sequence[tuple[tuple[str, ...], Any]]) -> None:
        """:meth:`log_step` of a row given in parts: ``(column names, values)`` pairs, each a
        sequence or array of as many numbers as names (``step`` among them); a few numpy
        assignments per row (see :meth:`TableWriter.append_parts`)."""
        self._scalars.append_parts(parts)
        self._logged(step)

    def _logged(self, step: int) -> None:
        self.last_step = step
        if (len(self._scalars) >= self.flush_steps
                or time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def log_columns(self, columns: dict[str, np.ndarray]) -> None:
        """Many per-step rows at once, column by column (see :meth:`TableWriter.write_columns`)."""
        self._scalars.write_columns(columns)
        self.last_step = int(columns["step"][-1])

    def log_eval(self, row: dict[str, Any]) -> None:
        """One per-evaluation row, written at once (evaluations are rare and precious)."""
        self._evals.append(row)
        with writing(self.path, f"the evaluation at step {row.get('step')}"):
            self._evals.flush()

    def event(self, kind: str, step: int, **fields: Any) -> None:
        """Append one event line and flush it at once."""
        record = {"seq": self.events_written, "step": int(step), "kind": kind,
                  "wall": _now(), **_jsonable(fields)}
        with writing(self.path, f"the {kind} event"):
            self._events.write(json.dumps(record, default=_json_default) + "\n")
            self._events.flush()
        self.events_written += 1

    def save_fixed(self, **arrays: np.ndarray) -> None:
        """The arrays that stay fixed for the whole run (grid images, fixed z, factors)."""
        import io

        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **arrays)
        with writing(self.path, FIXED_NPZ):
            atomic_write(self.path / FIXED_NPZ, buf.getvalue())

    def save_config(self, config_toml: str) -> None:
        """Replace the saved config (a resumed run records the config it continues with)."""
        with writing(self.path, CONFIG_TOML):
            atomic_write(self.path / CONFIG_TOML, config_toml.encode())

    def save_grid(self, step: int, png: bytes) -> Path:
        path = self.path / GRIDS_DIR / step_file(step, "png")
        with writing(self.path, f"{GRIDS_DIR}/{path.name}"):
            atomic_write(path, png)
        return path

    def save_checkpoint(self, step: int, state: dict[str, Any], keep: int) -> Path:
        """torch.save ``state`` atomically as checkpoints/step-N.pt; keep the newest ``keep``
        (0: keep all)."""
        import io

        import torch

        buf = io.BytesIO()
        torch.save(state, buf)
        path = self.path / CHECKPOINTS_DIR / step_file(step, "pt")
        with writing(self.path, f"{CHECKPOINTS_DIR}/{path.name}"):
            atomic_write(path, buf.getvalue())
        if keep:
            for old in list_checkpoints(self.path)[:-keep]:
                old[1].unlink(missing_ok=True)
        return path

    def flush(self) -> None:
        with writing(self.path, "per-step rows"):
            self._scalars.flush()
            self._evals.flush()
        self._last_flush = time.monotonic()

    def set_status(self, status: str, step: int, message: str = "") -> None:
        self._run_info.update(status=status, step=int(step), updated=_now(), message=message)
        with writing(self.path, RUN_JSON):
            atomic_write(self.path / RUN_JSON, json.dumps(self._run_info, indent=2).encode())

    @property
    def closed(self) -> bool:
        return self._events.closed

    def close(self, status: str, step: int, message: str = "") -> None:
        """Write what is buffered and the status; the lock is released even when that fails."""
        try:
            with writing(self.path, "the last rows"):
                self._scalars.close()
                self._evals.close()
            self.set_status(status, step, message)
        finally:
            self._events.close()
            self._lock.release()

    # -- resume -------------------------------------------------------------------------------

    def rewind(self, step: int, events_written: int) -> dict[str, int]:
        """Forget everything recorded after the checkpoint at ``step`` so a resumed run continues
        without duplicated or missing rows: per-step rows >= step, evaluations and grids > step,
        events after the first ``events_written``."""
        self._scalars.close()
        self._evals.close()
        dropped = {
            "scalars": truncate_table(self.path / SCALARS_DIR, lambda s: s < step),
            "evals": truncate_table(self.path / EVALS_DIR, lambda s: s <= step),
            "grids": 0,
            "events": 0,
        }
        self._scalars = TableWriter(self.path / SCALARS_DIR)
        self._evals = TableWriter(self.path / EVALS_DIR)
        for grid_step, grid in list_grids(self.path):
            if grid_step > step:
                grid.unlink()
                dropped["grids"] += 1
        for ckpt_step, ckpt in list_checkpoints(self.path):
            if ckpt_step > step:
                ckpt.unlink()
        lines = list(read_events_lines(self.path / EVENTS_JSONL))
        if len(lines) != events_written:
            dropped["events"] = max(0, len(lines) - events_written)
            self._events.close()
            atomic_write(self.path / EVENTS_JSONL,
                         "".join(line + "\n" for line in lines[:events_written]).encode())
            self._events = open(self.path / EVENTS_JSONL, "a", encoding="utf-8")  # noqa: SIM115
            self.events_written = min(len(lines), events_written)
        return dropped
