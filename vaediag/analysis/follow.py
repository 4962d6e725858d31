"""Findings while training: the detectors run on a run in progress, at each evaluation, and each
new warning or high finding is reported once.

The analysis of a run in progress is the offline analysis of the run cut at the evaluation
(:meth:`vaediag.rundir.Run.until`): the findings are those ``vaediag analyze`` gives for the
same prefix, by construction. It runs outside the training process (``vaediag analyze --follow``
in another terminal, or the child process :class:`vaediag.monitor.online.OnlineAnalysis`
starts), so training never waits for it.

    python -m vaediag.analysis.follow RUN_DIR    # reads evaluation steps on stdin, writes one
                                                 # JSON line of new findings per step
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vaediag.analysis import analyze
from vaediag.analysis.findings import Finding, severity_rank
from vaediag.columns import STEP
from vaediag.rundir import load_run


def key(f: Finding) -> tuple[str, str, int, int]:
    """What a finding is about: its kind and severity (a warning that becomes high is news)
    and the steps it covers."""
    return f.kind, f.severity, f.first_step, f.last_step


def same(a: tuple[str, str, int, int], b: tuple[str, str, int, int]) -> bool:
    """One thing seen twice: the same kind and severity over overlapping steps (a decoupling
    whose best pair of evaluations moved, a level shift located a step earlier with more data,
    decode(0) and decode(fixed z) drifting together)."""
    return a[:2] == b[:2] and a[2] <= b[3] and b[2] <= a[3]


def line(f: Finding, at: int, root: Finding | None = None) -> str:
    """One line for a terminal or a log: what, where, and when it became visible; for a
    consequence, the root of its incident (what set it off, and why)."""
    text = (f"finding at step {at:,}: {f.severity.upper()} {f.kind} from step "
            f"{f.first_step:,}: {f.summary}")
    if root is not None and root is not f:
        text += f" (set off by the {root_text(root)})"
    return text


def root_text(root: Finding) -> str:
    """'oversized_update at step 300: ...; cause: the learning rate rose 50x ...' (the cause's
    first sentence)"""
    first = root.cause.split(". ")[0] if root.cause else ""
    cause = f"; cause: {first[:200]}{'...' if len(first) > 200 else ''}" if first else ""
    return f"{root.kind} at step {root.first_step:,}: {root.summary}{cause}"


class Follower:
    """Analyses a run in progress at given steps; returns each warning or high finding once."""

    def __init__(self, path: str | Path, known_from_events: bool = False):
        self.path = Path(path)
        #: what was reported already (:func:`key`); with ``known_from_events``, the run's
        #: ``finding`` events (a resumed run's reports are not news to the process training it)
        self.reported: list[tuple[str, str, int, int]] = []
        self.roots: dict[int, Finding] = {}
        events = load_run(self.path).events if known_from_events else None
        if events is not None and len(events) and "kind" in events:
            for _, e in events[events["kind"] == "finding"].iterrows():
                self.reported.append((e["finding_kind"], e["severity"], int(e["first_step"]),
                                      int(e["last_step"])))

    def new_findings(self, step: int | None = None) -> tuple[int, list[Finding]]:
        """(the step analysed to, the new findings): the run as written, cut at ``step`` (the
        newest evaluation when None). :attr:`roots` then gives each new finding's incident
        root, grouped as ``vaediag analyze`` groups them."""
        run = load_run(self.path)
        if step is None:
            step = int(run.evals[STEP].iloc[-1]) if len(run.evals) else 0
        analysis = analyze(run.until(step))
        #: id(finding) -> the root of its incident, for the findings of the last analysis
        self.roots = {id(f): incident.root for incident in analysis.incidents
                      for f in incident.members}
        new = []
        for f in sorted(analysis.findings, key=lambda f: f.first_step):
            if severity_rank(f.severity) >= 1 and not any(same(key(f), k)
                                                          for k in self.reported):
                self.reported.append(key(f))
                new.append(f)
        return step, new


def follow(path: str | Path, echo: Callable[[str], None], interval: float = 2.0,
           timeout: float | None = None) -> int:
    """``vaediag analyze --follow``: analyse each new evaluation of a run as it is written and
    echo each new warning or high finding; return when the run is no longer running (its last
    evaluation analysed), or after ``timeout`` seconds. Returns the number of findings echoed."""
    follower = Follower(path)
    done_to, echoed = -1, 0
    started = time.monotonic()
    while True:
        run = load_run(path)
        status = run.status
        steps = run.evals[STEP].to_numpy() if len(run.evals) else []
        for step in (int(s) for s in steps if s > done_to):
            at, new = follower.new_findings(step)
            for f in new:
                echo(line(f, at, follower.roots.get(id(f))))
            echoed += len(new)
            done_to = step
        if status != "running":  # finished, stopped, failed, interrupted or killed
            return echoed
        if timeout is not None and time.monotonic() - started >= timeout:
            return echoed
        time.sleep(interval)


def _with_root(f: Finding, at: int, root: Finding | None) -> dict:
    """A new finding's JSON with its line and, for a consequence, its incident's root."""
    out = {**f.to_json(), "line": line(f, at, root)}
    if root is not None and root is not f:
        out["root"] = {"kind": root.kind, "severity": root.severity,
                       "first_step": root.first_step, "text": root_text(root)}
    return out


def serve(path: str, stdin=sys.stdin, stdout=sys.stdout) -> None:
    """The child process of :class:`~vaediag.monitor.online.OnlineAnalysis`: one evaluation
    step per input line, one JSON line out per step: ``{"step": N, "findings": [...]}`` (the
    new ones, as in findings.json), or ``{"step": N, "error": "..."}``."""
    follower = Follower(path, known_from_events=True)
    for text in stdin:
        step = int(text)
        try:
            at, new = follower.new_findings(step)
            reply = {"step": at, "findings": [_with_root(f, at, follower.roots.get(id(f)))
                                              for f in new]}
        except Exception as exc:  # noqa: BLE001 - reported to the training process, not fatal
            reply = {"step": step, "error": f"{type(exc).__name__}: {exc}"}
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()


if __name__ == "__main__":
    serve(sys.argv[1])
