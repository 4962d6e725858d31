"""``analyze --verify``: test each warning or high finding's first remedy by experiment.

For each such finding of a ``vaediag train`` run, the first remedy that names a concrete setting
(``--set KEY=VALUE``, one a replay may change) is applied in a replay (:mod:`vaediag.replay`)
from the newest checkpoint before the finding started, for a bounded number of steps: through
the finding and one evaluation past it, at most ``max_steps``. The replay repeats the run's data
order and noise, so the run itself is the control. Reported, with the numbers:

- whether the finding is gone: the replay, analysed like any run, has no finding of that kind
  (warning or worse) in the replayed steps;
- whether the quality loss is gone: the quality the finding says was lost (the metrics its
  evidence names, between the evaluations it compares) and any evaluation column (the grid's
  loss and the quality metrics) the run lost by ``causes.Z_HARM`` noise units between those
  evaluations (``causes.quality_lost``); which of them the replay lost by the same rule; and
  every such column's values at both evaluations, in the run and in the replay.
"""

from __future__ import annotations

import itertools
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vaediag.analysis import analyze
from vaediag.analysis.causes import quality_lost
from vaediag.analysis.data import RunData
from vaediag.analysis.findings import Analysis, Finding, severity_rank
from vaediag.columns import EVAL_RECON, STEP
from vaediag.config import RESUME_LOCKED, parse_override
from vaediag.errors import ConfigError, RunDirError, TrainingStopped
from vaediag.rundir import Run, list_checkpoints, load_run, remove_run

#: at most this many steps are replayed per finding
MAX_STEPS = 1000
#: where the replays go inside the run directory
REPLAYS_DIR = "replays"
_SETTING = re.compile(r"\(--set ([A-Za-z_]+\.[A-Za-z_]+)=([^)]+)\)")


def remedy_settings(remedy: str) -> dict[str, Any]:
    """The setting a remedy names first (``... (--set optim.eps=1e-6)``; any later ones are
    alternatives, "... or ..."), as a typed value; {} when it names none, or one a replay may
    not change."""
    match = _SETTING.search(remedy)
    if match is None or match.group(1).startswith(RESUME_LOCKED):
        return {}
    section, key, value = parse_override(f"{match.group(1)}={match.group(2)}")
    return {f"{section}.{key}": value}


@dataclass
class Verification:
    """What replaying one finding's remedy showed."""

    kind: str
    first_step: int
    last_step: int
    severity: str
    status: str  # verified | not verifiable | not reached | replay stopped
    reason: str = ""
    remedy: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    from_step: int | None = None
    to_step: int | None = None
    branch: str = ""
    finding_gone: bool | None = None
    #: the two evaluations the quality is compared at (the finding's own, within the replay)
    compare: list[int] = field(default_factory=list)
    #: evaluation columns the run lost between them (named by the finding, or by Z_HARM) ...
    lost_in_run: list[str] = field(default_factory=list)
    #: ... and those of them the replay lost too
    lost_in_replay: list[str] = field(default_factory=list)
    #: {column: {"run": [before, after], "replay": [before, after]}}
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    replay_findings: list[str] = field(default_factory=list)
    #: remedies printed before the one tested, none of which names a setting to replay
    passed_over: list[str] = field(default_factory=list)
    #: the step where the finding is seen (:func:`_seen_by`)
    seen_step: int = 0

    @property
    def quality_loss_gone(self) -> bool | None:
        if self.status != "verified" or not self.lost_in_run:
            return None
        return not self.lost_in_replay

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "quality_loss_gone": self.quality_loss_gone,
                "text": self.describe()}

    def describe(self) -> str:
        """One paragraph for people."""
        head = f"{self.kind} (steps {self.first_step:,}-{self.last_step:,})"
        if self.status == "not verifiable":
            return f"{head}: not verified: {self.reason}"
        what = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        where = f"replayed with {what} from step {self.from_step:,} to {self.to_step:,}"
        if self.passed_over:
            first = self.passed_over[0]
            where += (f" (the remedy printed first, '{first[:70]}"
                      f"{'...' if len(first) > 70 else ''}', names no setting a replay can "
                      f"change{'; nor the next' if len(self.passed_over) > 1 else ''})")
        if self.status == "replay stopped":
            return f"{head}: {where}: the replay stopped ({self.reason})"
        if self.status == "not reached":
            return f"{head}: {where}: not verified: {self.reason}"
        gone = "the finding is gone" if self.finding_gone else "the finding is still there"
        before, after = self.compare or (self.from_step or 0, self.to_step or 0)
        if after < self.seen_step:
            quality = (f"the run has no evaluation after step {self.first_step:,} to compare "
                       f"the pictures with")
        elif not self.lost_in_run:
            quality = f"the run lost no quality between steps {before:,} and {after:,}"
        elif self.quality_loss_gone:
            quality = f"the quality loss is gone ({self._numbers(self.lost_in_run)})"
        else:
            quality = f"quality is still lost ({self._numbers(self.lost_in_replay)})"
        return f"{head}: {where}: {gone}; {quality}"

    def _numbers(self, columns: list[str]) -> str:
        """'factor_angle_err 6.46 -> 10.1 in the run, 6.2 -> 6.5 replayed'"""
        parts = []
        for c in columns:
            v = self.values.get(c)
            if v:
                parts.append(f"{c} {v['run'][0]:.3g} -> {v['run'][1]:.3g} in the run, "
                             f"{v['replay'][0]:.3g} -> {v['replay'][1]:.3g} replayed")
        return "; ".join(parts)


def _seen_by(finding: Finding) -> int:
    """The step a replay must reach for the finding's detector to see it there: the later of
    the evaluations a comparison names (the pictures are compared there), else one step past
    its first step (a step's row and the update after it)."""
    return finding.compare_steps[-1] if finding.compare_steps else finding.first_step + 1


def _window(run: Run, finding: Finding, max_steps: int) -> tuple[int, int] | str:
    """(checkpoint step, last step) of the replay, or why there is none.

    The replay starts at the newest checkpoint before the finding and runs through the
    finding's steps and one evaluation interval past them (what a detector needs to see
    whether the trouble came and went), ending on an evaluation step; it may train past the
    end of the run, which the replay's data order continues. Capped at ``max_steps``: a long
    finding (a collapse that lasts to the end) is replayed as far as the cap allows, but a cap
    that would end the replay before the step where the finding is seen (:func:`_seen_by`) is
    refused, not shortened."""
    before = [s for s, _ in list_checkpoints(run.path) if s < finding.first_step]
    if not before:
        return f"no checkpoint before step {finding.first_step:,}"
    start = before[-1]
    every = _eval_every(run)
    seen = _seen_by(finding)
    need = max(finding.last_step + 1, seen) + every  # through the finding, then one interval
    end = min(-(-need // every) * every, start + max_steps)  # on the evaluation cadence
    if end < seen:
        return (f"not reached: the finding is seen at step {seen:,}, more than "
                f"{max_steps:,} steps after the checkpoint at step {start:,} (raise "
                f"--verify-steps)")
    return start, end


def _eval_every(run: Run) -> int:
    """The run's evaluation interval in steps: its setting, else its evaluations' spacing."""
    every = run.config.get("eval", {}).get("every_steps")
    if isinstance(every, int) and every > 0:
        return every
    steps = sorted(int(s) for s in run.evals[STEP])
    gaps = [b - a for a, b in itertools.pairwise(steps) if b > a]
    return min(gaps) if gaps else 100


def verify_finding(run: Run, finding: Finding, directory: Path,
                   max_steps: int = MAX_STEPS) -> Verification:
    """Replay ``finding``'s first concrete remedy into ``directory`` and measure it."""
    from vaediag.replay import replay

    out = Verification(finding.kind, finding.first_step, finding.last_step, finding.severity,
                       "not verifiable", seen_step=_seen_by(finding))
    for i, remedy in enumerate(finding.remedies):
        settings = remedy_settings(remedy)
        if settings:
            out.remedy, out.settings = remedy, settings
            out.passed_over = list(finding.remedies[:i])
            break
    else:
        out.reason = "no remedy names a setting a replay can change"
        return out
    window = _window(run, finding, max_steps)
    if isinstance(window, str):
        out.reason = window
        return out
    out.from_step, out.to_step = window
    branch = directory / f"verify-{finding.kind}-{finding.first_step}"
    remove_run(branch)  # an earlier verification's replay: ours to replace
    out.branch = str(branch)
    try:
        replay(run.path, out.from_step, branch, values=settings,
               steps=out.to_step - out.from_step, quiet=True)
    except TrainingStopped as exc:
        out.status, out.reason = "replay stopped", str(exc)
        return out
    except (ConfigError, RunDirError) as exc:
        out.reason = str(exc)
        return out
    replayed = load_run(branch)
    reached = int(replayed.info.get("step", 0))
    if reached < _seen_by(finding):  # e.g. a replay the non-finite policy stopped
        out.status = "not reached"
        out.reason = (f"the replay ended at step {reached:,}, before step "
                      f"{_seen_by(finding):,} where the finding is seen"
                      + (f" ({replayed.info['message']})" if replayed.info.get("message")
                         else ""))
        return out
    found = analyze(replayed)
    out.replay_findings = [f"{f.severity} {f.kind} ({f.first_step}-{f.last_step})"
                           for f in found.sorted_findings()]
    out.finding_gone = not any(
        f.kind == finding.kind and severity_rank(f.severity) >= 1
        and f.last_step > out.from_step and f.first_step <= out.to_step
        for f in found.findings)
    before, after = _compared(finding, out.from_step, out.to_step,
                              [int(s) for s in run.evals[STEP]])
    out.compare = [before, after]
    named = set(finding.evidence.get("metrics", {})) | set(finding.evidence.get("quality_lost",
                                                                                 {}))
    lost_run = named | set(quality_lost(RunData(run), before, after))
    lost_replay = set(quality_lost(RunData(replayed), before, after)) & lost_run
    out.lost_in_run, out.lost_in_replay = sorted(lost_run), sorted(lost_replay)
    for column in sorted(lost_run | {EVAL_RECON}):
        values = {name: [_value(r, column, before), _value(r, column, after)]
                  for name, r in (("run", run), ("replay", replayed))}
        if all(v is not None for pair in values.values() for v in pair):
            out.values[column] = {name: [float(v) for v in pair if v is not None]
                                  for name, pair in values.items()}
    out.status = "verified"
    return out


def _compared(finding: Finding, start: int, end: int,
              evaluated: list[int]) -> tuple[int, int]:
    """The evaluations to compare quality at: the finding's own (``compare_steps``) where they
    lie in the replay, else its first evaluation and the run's last one within the replay
    (a replay may go on past the run's end)."""
    steps = finding.compare_steps
    before = steps[0] if steps and start <= steps[0] < end else start
    within = [s for s in evaluated if before < s <= end]
    after = steps[-1] if steps and before < steps[-1] <= end else \
        (max(within) if within else end)
    return before, after


def _value(run: Run, column: str, step: int) -> float | None:
    evals = run.evals
    if column not in evals.columns:
        return None
    rows = evals.loc[evals[STEP] == step, column]
    return float(rows.iloc[0]) if len(rows) else None


def verify(analysis: Analysis, run_dir: str | Path, *, write: bool = True,
           max_steps: int = MAX_STEPS) -> list[Verification]:
    """Verify every warning or high finding of ``analysis`` (of the run at ``run_dir``); the
    replays go to RUN_DIR/replays (or a temporary folder, removed after, when not ``write``)."""
    run = load_run(run_dir)
    if "train" not in run.config:
        raise RunDirError(f"{run.path} was not made by 'vaediag train': --verify replays "
                          f"training, which needs its config and checkpoints")
    findings = [f for f in analysis.sorted_findings() if severity_rank(f.severity) >= 1]
    if write:
        directory = run.path / REPLAYS_DIR
        directory.mkdir(exist_ok=True)
        return [verify_finding(run, f, directory, max_steps) for f in findings]
    with tempfile.TemporaryDirectory(prefix="vaediag-verify-") as tmp:
        results = [verify_finding(run, f, Path(tmp), max_steps) for f in findings]
        for r in results:
            r.branch = ""
        return results


__all__ = ["MAX_STEPS", "Verification", "remedy_settings", "verify", "verify_finding"]
