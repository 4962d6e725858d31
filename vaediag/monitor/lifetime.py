"""How a Monitor's run ends when the loop around it does not close it.

A user's loop that raises, or a script that forgets ``close()``, must not leave a run that says
``running`` with its last rows unwritten. Three ways in, one ending each:

- ``with vaediag.Monitor(...) as mon:``: the block's end closes the run, ``finished``; an
  exception leaving it closes it ``failed`` with that exception (``interrupted`` for Ctrl-C);
- a process that ends by an uncaught exception: the run is closed ``failed`` with it at exit;
- a process that ends normally without ``close()``: the last rows are written, one warning says
  ``close()`` was never called, and the run is closed ``finished`` as ``close()`` would.

Only runs a Monitor created itself are closed here; a run handed to it (``vaediag train``'s
session) is closed by its owner.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import weakref
from types import TracebackType
from typing import Any, Protocol


class Closable(Protocol):
    """What this module needs of a Monitor."""

    @property
    def closed(self) -> bool: ...

    def close(self, status: str = "finished", step: int | None = None,
              message: str = "") -> None: ...

    def abort(self, exc: BaseException) -> None: ...


#: Monitors whose run is open and their own (weakly: a Monitor dropped is no longer watched)
_OPEN: weakref.WeakSet[Any] = weakref.WeakSet()
#: the exception that is ending the process, seen by :func:`_note_uncaught`
_ENDING: list[BaseException] = []
_installed = False


def watch(monitor: Closable) -> None:
    """Close ``monitor``'s run at exit if its loop never does (see the module's docstring)."""
    global _installed
    _OPEN.add(monitor)
    if not _installed:
        _installed = True
        previous = sys.excepthook

        def _note_uncaught(kind: type[BaseException], exc: BaseException,
                           tb: TracebackType | None) -> None:
            _ENDING.append(exc)
            previous(kind, exc, tb)

        sys.excepthook = _note_uncaught
        atexit.register(_close_at_exit)


def forget(monitor: Closable) -> None:
    _OPEN.discard(monitor)


def _close_at_exit() -> None:
    for monitor in list(_OPEN):
        if monitor.closed:
            continue
        try:
            if _ENDING:
                monitor.abort(_ENDING[-1])
            else:
                print("vaediag: warning: the Monitor's close() was never called: its run is "
                      "closed at exit (call mon.close() after training, or use "
                      "'with vaediag.Monitor(...) as mon:')", file=sys.stderr)
                monitor.close("finished", message="close() was never called: closed at exit")
        except Exception as exc:  # noqa: BLE001 - at exit: say it, never raise
            with contextlib.suppress(Exception):
                print(f"vaediag: warning: the run could not be closed at exit: "
                      f"{type(exc).__name__}: {exc}", file=sys.stderr)
    _OPEN.clear()


__all__ = ["Closable", "forget", "watch"]
