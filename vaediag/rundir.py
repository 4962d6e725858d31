"""THE run-directory format: the one writer and the one reader. Documented in docs/run-format.md.

Layout::

    RUN_DIR/
      run.json          format version, status, last step, timestamps (rewritten atomically)
      config.toml       the resolved configuration
      environment.json  versions, device, seeds, git revision where known
      fixed.npz         the grid's validation images, fixed z (and toyfaces factors)
      events.jsonl      one JSON object per line: non-finite values, checkpoints, resumes, ...
      scalars/          per-step scalars: Arrow IPC stream segments 000000.arrows, 000001.arrows...
      evals/            per-evaluation scalars, same format
      grids/            step-00001234.png, the annotated 4x8 grid of each evaluation
      checkpoints/      step-00001234.pt (torch.save of tensors and plain types only)
      .lock             held (flock) by the process writing the run

Durability: rows are buffered in memory and written as one Arrow record batch per flush (every
``log.flush_steps`` steps or ``log.flush_seconds`` seconds, whichever comes first). Each batch is
flushed to the operating system at once, so a process killed with SIGKILL loses only the rows
since the last flush. Readers stop at the first incomplete batch, so a run that was killed, or is
still being written, always reads. Small files (run.json, grids, checkpoints) are written to a
temporary name and renamed, so they are either old or new, never half-written.

This module must not import torch at module level: analysis and reports read runs without it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc

from vaediag.errors import RunDirError

try:  # POSIX advisory locks; on other systems runs are simply not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

FORMAT_VERSION = 1

RUN_JSON = "run.json"
CONFIG_TOML = "config.toml"
ENVIRONMENT_JSON = "environment.json"
FIXED_NPZ = "fixed.npz"
EVENTS_JSONL = "events.jsonl"
SCALARS_DIR = "scalars"
EVALS_DIR = "evals"
GRIDS_DIR = "grids"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = ".lock"

#: Integer columns; every other column is float32, except those in DOUBLE_COLUMNS.
INT_COLUMNS = frozenset({"step", "epoch"})
DOUBLE_COLUMNS = frozenset({"time"})

_SEGMENT_RE = re.compile(r"^(\d{6})\.arrows$")
_STEP_FILE_RE = re.compile(r"^step-(\d{8})\.(png|pt)$")
_IPC_OPTIONS = ipc.IpcWriteOptions(compression="zstd")


def step_file(step: int, suffix: str) -> str:
    return f"step-{step:08d}.{suffix}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _default_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _default_file_mode()


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes private files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _column_type(name: str) -> pa.DataType:
    if name in INT_COLUMNS:
        return pa.int64()
    if name in DOUBLE_COLUMNS:
        return pa.float64()
    return pa.float32()


def _segments(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _SEGMENT_RE.match(p.name))


def _read_segment(path: Path, fields: list[str] | None = None) -> tuple[pa.Table | None, bool]:
    """All complete record batches of one segment (only ``fields`` of them, when given: the
    others are not even decompressed), and whether it ended cleanly."""
    batches: list[pa.RecordBatch] = []
    schema = None
    complete = True
    try:
        with pa.memory_map(str(path)) as source:
            reader = ipc.open_stream(source)
            schema = reader.schema
            if fields is not None:
                source.seek(0)
                included = [schema.get_field_index(f) for f in fields if f in schema.names]
                reader = ipc.open_stream(source, options=ipc.IpcReadOptions(
                    included_fields=included))
                schema = reader.schema
            for batch in reader:
                batches.append(batch)
    except (pa.ArrowInvalid, OSError, EOFError):
        complete = False  # a truncated last batch (killed writer) or one still being written
    if schema is None:
        return None, complete
    return pa.Table.from_batches(batches, schema=schema), complete


#: A segment that has reached this many rows is closed and rewritten as a single record batch
#: (compacted), as is every segment when it is closed: rows are flushed in small batches for
#: durability, but a million steps in batches of 50 would take a reader tens of seconds to
#: decompress one tiny buffer at a time. A killed run leaves at most one segment uncompacted.
COMPACT_ROWS = 10_000


def compact_segment(path: Path) -> None:
    """Rewrite a segment's complete record batches as one batch, atomically."""
    table, _ = _read_segment(path)
    if table is None or table.num_rows == 0:
        return
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema, options=_IPC_OPTIONS) as writer:
        writer.write_table(table.combine_chunks())
    atomic_write(path, sink.getvalue().to_pybytes())


class TableWriter:
    """Append-only writer of one table (per-step or per-eval rows) as Arrow IPC segments.

    A segment's columns are all the columns seen so far in this session; a row that lacks one
    stores a null. When a row brings a new column, the writer starts a new segment, so wide or
    late-appearing statistics never force a rewrite of what is on disk. A segment is compacted
    into one record batch when it is closed, and closed every ``COMPACT_ROWS`` rows.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        existing = _segments(directory)
        self._next_index = int(_SEGMENT_RE.match(existing[-1].name).group(1)) + 1 if existing else 0
        self._rows: list[dict[str, Any]] = []
        self._columns: dict[str, None] = {}  # ordered set
        self._schema: pa.Schema | None = None
        self._sink: pa.OSFile | None = None
        self._writer: ipc.RecordBatchStreamWriter | None = None
        self._path: Path | None = None
        self._segment_rows = 0

    def append(self, row: dict[str, Any]) -> None:
        self._rows.append(row)

    def __len__(self) -> int:
        return len(self._rows)

    def flush(self) -> None:
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        for row in rows:
            for key in row:
                if key not in self._columns:
                    self._columns[key] = None
        if self._writer is None or len(self._columns) != len(self._schema):
            self._open_segment()
        arrays = [pa.array([r.get(f.name) for r in rows], type=f.type) for f in self._schema]
        self._write(pa.RecordBatch.from_arrays(arrays, schema=self._schema))

    def _write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        self._sink.flush()
        self._segment_rows += batch.num_rows
        if self._segment_rows >= COMPACT_ROWS:  # the next rows open a new segment
            self._close_segment()

    def write_columns(self, columns: dict[str, np.ndarray]) -> None:
        """Write many rows at once, given column by column (for tools that convert or
        synthesise runs; the trainer writes row by row). Buffered rows are written first."""
        self.flush()
        for key in columns:
            self._columns.setdefault(key, None)
        if self._writer is None or len(self._columns) != len(self._schema):
            self._open_segment()
        n = len(next(iter(columns.values())))
        arrays = [pa.array(np.asarray(columns[f.name], dtype=f.type.to_pandas_dtype()),
                           type=f.type) if f.name in columns else pa.nulls(n, f.type)
                  for f in self._schema]
        self._write(pa.RecordBatch.from_arrays(arrays, schema=self._schema))

    def _open_segment(self) -> None:
        self._close_segment()
        self._schema = pa.schema([(name, _column_type(name)) for name in self._columns])
        self._path = self.directory / f"{self._next_index:06d}.arrows"
        self._next_index += 1
        self._sink = pa.OSFile(str(self._path), "wb")
        self._writer = ipc.new_stream(self._sink, self._schema, options=_IPC_OPTIONS)
        self._segment_rows = 0

    def _close_segment(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            compact_segment(self._path)
        self._writer = self._sink = None

    def close(self) -> None:
        self.flush()
        self._close_segment()


def read_table(directory: Path) -> tuple[pd.DataFrame, list[str]]:
    """Read every segment of a table into one DataFrame sorted by step; and problems found.

    Two passes, so that a million rows never sit in memory twice: the first reads each
    segment's schema and its step column alone (which gives its row count), the second fills
    preallocated columns one segment at a time. A column some segment lacks reads as NaN
    there (an integer column then becomes float).
    """
    problems: list[str] = []
    segments = _segments(directory)
    sizes: list[int] = []
    schemas: list[pa.Schema] = []
    for i, path in enumerate(segments):
        table, complete = _read_segment(path, fields=["step"])
        if not complete:
            what = "last" if i == len(segments) - 1 else "a"
            problems.append(f"{directory.name}/{path.name}: {what} segment ends in an incomplete "
                            f"write; its complete rows were read")
        schemas.append(_schema_of(path))
        sizes.append(0 if table is None else table.num_rows)
    total = sum(sizes)
    if not total:
        return pd.DataFrame({"step": pd.Series(dtype="int64")}), problems
    present = [schema for schema, size in zip(schemas, sizes, strict=True) if size and schema]
    types: dict[str, pa.DataType] = {}
    for schema in present:
        for f in schema:
            types.setdefault(f.name, f.type)
    columns: dict[str, np.ndarray] = {}
    for name, kind in types.items():
        if pa.types.is_integer(kind) and all(name in schema.names for schema in present):
            columns[name] = np.zeros(total, dtype=np.int64)
        else:
            dtype = np.float32 if kind == pa.float32() else np.float64
            columns[name] = np.full(total, np.nan, dtype=dtype)
    at = 0
    for path, size in zip(segments, sizes, strict=True):
        if not size:
            continue
        table, _ = _read_segment(path)
        rows = min(size, table.num_rows)
        for name in table.column_names:
            values = table.column(name).slice(0, rows)
            if values.null_count:
                values = values.cast(pa.float64())
            target = columns[name]
            target[at:at + rows] = values.to_numpy()
        del table
        at += size
    frame = pd.DataFrame(columns, copy=False)
    if not frame["step"].is_monotonic_increasing:
        frame = frame.sort_values("step", kind="stable", ignore_index=True)
    return frame, problems


def _schema_of(path: Path) -> pa.Schema | None:
    try:
        with pa.memory_map(str(path)) as source:
            return ipc.open_stream(source).schema
    except (pa.ArrowInvalid, OSError, EOFError):
        return None


def truncate_table(directory: Path, keep: Any) -> int:
    """Drop rows for which ``keep(step_array)`` is False; returns how many were dropped.

    Each affected segment is rewritten atomically; empty ones are removed.
    """
    dropped = 0
    for path in _segments(directory):
        table, complete = _read_segment(path)
        if table is None:
            path.unlink()
            continue
        mask = keep(table.column("step").to_numpy())
        if mask.all() and complete:
            continue
        dropped += int((~mask).sum())
        kept = table.filter(pa.array(mask))
        if kept.num_rows == 0:
            path.unlink()
            continue
        sink = pa.BufferOutputStream()
        with ipc.new_stream(sink, kept.schema, options=_IPC_OPTIONS) as writer:
            writer.write_table(kept.combine_chunks())  # compacted, as closed segments are
        atomic_write(path, sink.getvalue().to_pybytes())
    return dropped


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


class RunLock:
    """An exclusive advisory lock on RUN_DIR/.lock, released when the process dies."""

    def __init__(self, path: Path):
        self._file = open(path / LOCK_FILE, "a+")  # noqa: SIM115 - held for the run's life
        if fcntl is not None:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._file.close()
                raise RunDirError(f"{path} is in use by another vaediag process") from None

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing the file releases the flock


def is_locked(path: Path) -> bool:
    """True while some process holds the run's lock (i.e. it is being written)."""
    lock = Path(path) / LOCK_FILE
    if fcntl is None or not lock.exists():
        return False
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def check_can_create(path: Path, overwrite: bool) -> None:
    """Raise :class:`RunDirError` unless a new run may be created at ``path``. Changes nothing.

    ``overwrite`` allows replacing an existing *run directory* (one holding run.json), never an
    arbitrary non-empty folder: that is almost always a mistyped path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise RunDirError(f"{path} is not empty; pass --resume to continue that run or "
                              f"--overwrite to replace it")
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
        return cls(path, lock, flush_steps, flush_seconds)

    # -- rows ---------------------------------------------------------------------------------

    def log_step(self, row: dict[str, Any]) -> None:
        """Buffer one per-step row; flushes when the step or time budget is reached."""
        self._scalars.append(row)
        self.last_step = row["step"]
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
        self._evals.flush()

    def event(self, kind: str, step: int, **fields: Any) -> None:
        """Append one event line and flush it at once."""
        record = {"seq": self.events_written, "step": int(step), "kind": kind,
                  "wall": _now(), **_jsonable(fields)}
        self._events.write(json.dumps(record, default=_json_default) + "\n")
        self._events.flush()
        self.events_written += 1

    def save_fixed(self, **arrays: np.ndarray) -> None:
        """The arrays that stay fixed for the whole run (grid images, fixed z, factors)."""
        import io

        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write(self.path / FIXED_NPZ, buf.getvalue())

    def save_config(self, config_toml: str) -> None:
        """Replace the saved config (a resumed run records the config it continues with)."""
        atomic_write(self.path / CONFIG_TOML, config_toml.encode())

    def save_grid(self, step: int, png: bytes) -> Path:
        path = self.path / GRIDS_DIR / step_file(step, "png")
        atomic_write(path, png)
        return path

    def save_checkpoint(self, step: int, state: dict[str, Any], keep: int) -> Path:
        """torch.save ``state`` atomically as checkpoints/step-N.pt; keep the newest ``keep``."""
        import io

        import torch

        buf = io.BytesIO()
        torch.save(state, buf)
        path = self.path / CHECKPOINTS_DIR / step_file(step, "pt")
        atomic_write(path, buf.getvalue())
        for old in list_checkpoints(self.path)[:-keep]:
            old[1].unlink(missing_ok=True)
        return path

    def flush(self) -> None:
        self._scalars.flush()
        self._evals.flush()
        self._last_flush = time.monotonic()

    def set_status(self, status: str, step: int, message: str = "") -> None:
        self._run_info.update(status=status, step=int(step), updated=_now(), message=message)
        atomic_write(self.path / RUN_JSON, json.dumps(self._run_info, indent=2).encode())

    @property
    def closed(self) -> bool:
        return self._events.closed

    def close(self, status: str, step: int, message: str = "") -> None:
        self._scalars.close()
        self._evals.close()
        self.set_status(status, step, message)
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


def read_events_lines(path: Path) -> Iterator[str]:
    """Complete, valid JSON lines of an events file (a torn last line is skipped)."""
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError:
                continue
            yield line


def list_grids(path: Path) -> list[tuple[int, Path]]:
    return _list_step_files(Path(path) / GRIDS_DIR, "png")


def list_checkpoints(path: Path) -> list[tuple[int, Path]]:
    return _list_step_files(Path(path) / CHECKPOINTS_DIR, "pt")


def _list_step_files(directory: Path, suffix: str) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    out = []
    for p in directory.iterdir():
        m = _STEP_FILE_RE.match(p.name)
        if m and m.group(2) == suffix:
            out.append((int(m.group(1)), p))
    return sorted(out)


def check_run_dir(path: Path) -> dict[str, Any]:
    """Raise :class:`RunDirError` unless ``path`` is a readable run directory; return run.json."""
    path = Path(path)
    if not path.exists():
        raise RunDirError(f"no run directory at {path}")
    if not path.is_dir():
        raise RunDirError(f"{path} is not a directory")
    info_path = path / RUN_JSON
    if not info_path.exists():
        raise RunDirError(f"{path} is not a vaediag run directory (no {RUN_JSON})")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise RunDirError(f"{info_path} is corrupt: {exc}") from None
    if not isinstance(info, dict) or "format" not in info:
        raise RunDirError(f"{info_path} is corrupt: no format version")
    if info["format"] > FORMAT_VERSION:
        raise RunDirError(f"{path} was written by a newer vaediag (run format {info['format']}); "
                          f"upgrade vaediag to read it")
    return info


@dataclass
class Run:
    """A run directory, read lazily. Use :func:`load_run`.

    ``scalars`` and ``evals`` are DataFrames with a ``step`` column; ``events`` is a DataFrame
    with ``seq``, ``step``, ``kind``, ``wall`` and the event's own fields; ``problems`` lists
    anything that could not be read (a torn last write, a corrupt line).
    """

    path: Path
    info: dict[str, Any]

    @property
    def status(self) -> str:
        """'running', 'finished', 'stopped', 'interrupted', 'failed', or 'killed' (status says
        running but no process holds the run's lock)."""
        status = self.info.get("status", "unknown")
        if status == "running" and not is_locked(self.path):
            return "killed"
        return status

    @cached_property
    def config(self) -> dict[str, Any]:
        import tomllib

        try:
            return tomllib.loads((self.path / CONFIG_TOML).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunDirError(f"{self.path} has no {CONFIG_TOML}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise RunDirError(f"{self.path / CONFIG_TOML} is corrupt: {exc}") from None

    @cached_property
    def environment(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / ENVIRONMENT_JSON).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    @cached_property
    def _scalars_and_problems(self) -> tuple[pd.DataFrame, list[str]]:
        return read_table(self.path / SCALARS_DIR)

    @cached_property
    def _evals_and_problems(self) -> tuple[pd.DataFrame, list[str]]:
        return read_table(self.path / EVALS_DIR)

    @property
    def scalars(self) -> pd.DataFrame:
        return self._scalars_and_problems[0]

    @property
    def evals(self) -> pd.DataFrame:
        return self._evals_and_problems[0]

    @cached_property
    def events(self) -> pd.DataFrame:
        records = [json.loads(line) for line in read_events_lines(self.path / EVENTS_JSONL)]
        if not records:
            return pd.DataFrame({"seq": pd.Series(dtype="int64"),
                                 "step": pd.Series(dtype="int64"),
                                 "kind": pd.Series(dtype="object")})
        return pd.DataFrame.from_records(records)

    @cached_property
    def fixed(self) -> dict[str, np.ndarray]:
        """Arrays fixed for the whole run: ``eval_images`` (uint8), ``fixed_z``, factors."""
        try:
            with np.load(self.path / FIXED_NPZ, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except FileNotFoundError:
            return {}
        except (ValueError, OSError, EOFError) as exc:
            raise RunDirError(f"{self.path / FIXED_NPZ} is corrupt: {exc}") from None

    @property
    def grids(self) -> list[tuple[int, Path]]:
        """(step, png path) of every evaluation's grid, in step order."""
        return list_grids(self.path)

    @property
    def checkpoints(self) -> list[tuple[int, Path]]:
        return list_checkpoints(self.path)

    @property
    def problems(self) -> list[str]:
        problems = self._scalars_and_problems[1] + self._evals_and_problems[1]
        if self.status == "killed":
            problems.insert(0, "the run was killed or crashed while training (its status says "
                               "running but no process holds it); data up to the last flush "
                               "is intact")
        return problems

    def until(self, step: int) -> Run:
        """The run as it was at ``step``: its per-step rows, evaluations and events up to and
        including that step (what analysis would have seen then). Files are not touched."""
        cut = copy.copy(self)  # shares what was read so far; the tables below are replaced
        cut.info = {**self.info, "step": min(int(self.info.get("step", step)), step)}

        def upto(frame: pd.DataFrame) -> pd.DataFrame:
            return frame[frame["step"] <= step].reset_index(drop=True)

        scalars, s_problems = self._scalars_and_problems
        evals, e_problems = self._evals_and_problems
        cut.__dict__["_scalars_and_problems"] = (upto(scalars), list(s_problems))
        cut.__dict__["_evals_and_problems"] = (upto(evals), list(e_problems))
        cut.__dict__["events"] = upto(self.events)
        return cut

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.status!r})"


def load_run(path: str | Path) -> Run:
    """Open a run directory for reading: ``load_run(p).scalars`` is the per-step DataFrame."""
    path = Path(path)
    return Run(path, check_run_dir(path))
