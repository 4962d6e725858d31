"""Where everything lives in a run directory, and the small-file rules: names, step files,
atomic writes, and the check that a path is a readable run directory."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vaediag.errors import RunDirError

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

_STEP_FILE_RE = re.compile(r"^step-(\d{8})\.(png|pt)$")


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


def remove_temporaries(path: Path) -> int:
    """Remove what :func:`atomic_write` leaves when its process is killed mid-write (hidden
    ``.NAME.*.tmp`` files, as large as what they were replacing) from a run directory; returns
    how many. Only for the process about to write the run (it holds the lock)."""
    removed = 0
    for directory in (path, *(p for p in path.iterdir() if p.is_dir())):
        for stale in directory.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
            removed += 1
    return removed


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
    for key, kind, what in (("format", int, "an integer"), ("step", int, "an integer"),
                            ("status", str, "a string")):
        value = info.get(key)
        if key in info and (not isinstance(value, kind) or isinstance(value, bool)):
            raise RunDirError(f"{info_path} is corrupt: {key} must be {what}, got "
                              f"{json.dumps(value)[:40]}")
    if info["format"] > FORMAT_VERSION:
        raise RunDirError(f"{path} was written by a newer vaediag (run format {info['format']}); "
                          f"upgrade vaediag to read it")
    return info
