"""The run's lock: one writing process per run directory, and how readers tell a live run from
a killed one."""

from __future__ import annotations

from pathlib import Path

from vaediag.errors import RunDirError
from vaediag.rundir.layout import LOCK_FILE

try:  # POSIX advisory locks; on other systems runs are simply not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


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
