"""The detectors while training: a child process analyses the run at each evaluation
(:mod:`vaediag.analysis.follow`), so training never waits for it.

The child is a fresh interpreter (``python -m vaediag.analysis.follow RUN_DIR``), not a fork of
the training process: nothing of torch or of the user's script is copied or re-run, and it
takes its own core. The training process writes one line per evaluation to its stdin and, at
each step, looks (without waiting) whether a reply came back: a reader thread parks replies
in a queue. When an analysis is still running at the next evaluation, only the newest
evaluation waits its turn (each analysis covers everything before it).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from vaediag.severities import SEVERITIES

STOP_ON = ("never", "warning", "high")
#: how long close() waits for the last analysis
CLOSE_TIMEOUT = 120.0


class OnlineAnalysis:
    """Runs the detectors on ``path`` at each evaluation; reports each new warning or high
    finding once (``report(line, finding_json, analysed_step)``), and says when one at or above
    ``stop_on`` appeared."""

    def __init__(self, path: str | Path, report: Callable[[str, dict, int], None],
                 stop_on: str = "never"):
        if stop_on not in STOP_ON:
            raise ValueError(f"stop_on must be one of {', '.join(STOP_ON)}, got {stop_on!r}")
        self.path = Path(path)
        self.report = report
        self.stop_on = stop_on
        #: set when a finding at or above ``stop_on`` was reported: one line saying which
        self.stop_reason: str | None = None
        self.analysed_to = -1
        self._child: subprocess.Popen[str] | None = None
        self._stdin: IO[str] | None = None  # the child's: one evaluation step per line
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._busy = False
        self._waiting: int | None = None  # the newest evaluation not yet sent
        self.failed: str | None = None

    def _start(self) -> IO[str]:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        child = self._child = subprocess.Popen(
            [sys.executable, "-m", "vaediag.analysis.follow", str(self.path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, bufsize=1, env=env)
        threading.Thread(target=self._read, args=(child.stdout,), daemon=True,
                         name="vaediag-online-analysis").start()
        assert child.stdin is not None  # stdin=PIPE
        self._stdin = child.stdin
        return child.stdin

    def _read(self, stream: IO[str]) -> None:
        for text in stream:
            try:
                self._replies.put(json.loads(text))
            except json.JSONDecodeError:
                continue
        self._replies.put(None)  # the child ended

    def evaluated(self, step: int) -> None:
        """An evaluation at ``step`` was written: analyse the run up to it."""
        if self.failed is not None:
            return
        if self._busy:
            self._waiting = step
            return
        stdin = self._stdin if self._stdin is not None else self._start()
        try:
            stdin.write(f"{int(step)}\n")
            stdin.flush()
            self._busy = True
        except (BrokenPipeError, OSError) as exc:
            self.failed = f"the analysis process ended ({exc})"

    def poll(self) -> None:
        """Handle the replies that came back (never waits)."""
        while self._busy and not self._replies.empty():  # no exception on the common path
            self._handle(self._replies.get_nowait())

    def _handle(self, reply: dict[str, Any] | None) -> None:
        self._busy = False
        if reply is None:
            self.failed = "the analysis process ended"
            return
        if "error" in reply:
            self.failed = f"the analysis failed at step {reply['step']}: {reply['error']}"
            return
        self.analysed_to = int(reply["step"])
        for f in reply["findings"]:
            text = f.get("line") or (f"finding at step {self.analysed_to:,}: "
                                     f"{f['severity'].upper()} {f['kind']} from step "
                                     f"{f['first_step']:,}: {f['summary']}")
            self.report(text, f, self.analysed_to)
            if (self.stop_reason is None and self.stop_on != "never"
                    and SEVERITIES.index(f["severity"]) >= SEVERITIES.index(self.stop_on)):
                # the root of its incident first: what to change, not what it set off
                root = f.get("root")
                self.stop_reason = text if root is None else (
                    f"{root['text']}; it set off a {f['severity'].upper()} {f['kind']} "
                    f"from step {f['first_step']:,}")
        if self._waiting is not None:
            step, self._waiting = self._waiting, None
            self.evaluated(step)

    def close(self, wait: bool = True) -> None:
        """Finish: with ``wait``, analyse up to the last evaluation first (bounded by
        ``CLOSE_TIMEOUT``); then end the child process."""
        if self._child is None:
            return
        if wait:
            while self._busy and self.failed is None:
                try:
                    self._handle(self._replies.get(timeout=CLOSE_TIMEOUT))
                except queue.Empty:
                    self.failed = "the last analysis took too long"
        with contextlib.suppress(OSError):
            if self._stdin is not None:
                self._stdin.close()
        try:
            self._child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._child.kill()
        self._child = self._stdin = None
