"""Analysis: read a run directory, find where training went unstable and where the loss
stopped tracking image quality. Never imports torch or matplotlib.

    >>> import vaediag
    >>> result = vaediag.analyze("runs/demo")    # findings, checks, signals
    >>> for f in result.sorted_findings(): print(f.severity, f.summary)
"""

from __future__ import annotations

import json
from pathlib import Path

from vaediag.analysis import incidents, remedies
from vaediag.analysis.data import RunData, Skip
from vaediag.analysis.detectors import DETECTORS, KINDS
from vaediag.analysis.findings import Analysis, Check, Finding, Incident, Signal, severity_rank
from vaediag.analysis.timeline import fold_consequences, link
from vaediag.columns import STEP
from vaediag.rundir import Run, atomic_write, load_run

FINDINGS_JSON = "findings.json"


def run_summary(data: RunData) -> dict:
    run = data.run
    steps = data.steps
    return {
        "name": run.path.name, "status": run.status,
        "steps": len(steps), "first_step": int(steps[0]) if len(steps) else None,
        "last_step": int(steps[-1]) if len(steps) else None,
        "evaluations": len(data.evals), "data": data.setting("data", "source"),
        "resolution": data.setting("data", "resolution"),
        "loss": data.setting("loss", "recon"), "kl": data.setting("loss", "kl"),
        "beta": data.setting("loss", "beta"), "optimizer": data.setting("optim", "name"),
        "lr": data.setting("optim", "lr"), "betas": data.setting("optim", "betas"),
        "eps": data.setting("optim", "eps"), "burn_in_step": data.burn_in_step,
        "faults": [f.get("fault") for f in data.faults()],
    }


def analyze(path: str | Path | Run) -> Analysis:
    """Run every detector on a run directory; return the findings (does not write files)."""
    run = path if isinstance(path, Run) else load_run(path)
    data = RunData(run)
    findings: list[Finding] = []
    signals: list[Signal] = []
    checks: list[Check] = []
    if data.n_steps == 0:
        checks = [Check(d.NAME, "skipped", "the run has no steps recorded") for d in DETECTORS]
        return Analysis(run_summary(data), [], checks, [], run.problems)
    for detector in DETECTORS:
        try:
            found, sig = detector.detect(data)
        except Skip as skip:
            checks.append(Check(detector.NAME, "skipped", skip.reason))
            continue
        except Exception as exc:  # noqa: BLE001 - one detector's failure must not stop analysis
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            checks.append(Check(detector.NAME, "failed", f"the detector failed ({message})"))
            continue
        undeclared = sorted({f.kind for f in found} - {k.name for k in detector.KINDS})
        if undeclared:  # a detector's bug: the reports would not know where to show them
            checks.append(Check(detector.NAME, "failed", f"the detector emitted finding kinds "
                                f"its KINDS do not declare: {', '.join(undeclared)}"))
            continue
        checks.append(Check(detector.NAME, "ok"))
        findings += found
        signals += sig
    for _, row in data.events_of("metric_status").iterrows():  # e.g. LPIPS without weights
        if not row.get("available", True):
            checks.append(Check(str(row.get("metric")), "skipped",
                                f"{row.get('metric')} unavailable: {row.get('reason')}"))
    for _, row in data.events_of("probe_failed").iterrows():  # what it measured stops there
        checks.append(Check(f"probe {row.get('probe')}", "failed",
                            f"the probe failed at step {int(row['step']):,} and was disabled "
                            f"for the rest of the run ({row.get('error')}): its columns end "
                            f"there"))
    remedies.check_all(findings, data)
    findings = fold_consequences(findings)
    eval_steps = [int(s) for s in data.evals[STEP]] if len(data.evals) else []
    grouped = incidents.group(findings, eval_steps)
    incidents.grade(grouped, eval_steps)
    link(findings, signals)
    return Analysis(run_summary(data), findings, checks, signals, run.problems, data.derived,
                    incidents=grouped)


def write_findings(analysis: Analysis, path: Path) -> None:
    """``findings.json``: the analysis, its verdict and what was not checked."""
    atomic_write(path, json.dumps(findings_json(analysis), indent=2).encode())


def findings_json(analysis: Analysis) -> dict:
    """The JSON of ``findings.json`` (and of ``analyze --json``)."""
    return {**analysis.to_json(), "verdict": verdict(analysis),
            "not_checked": [{"detector": name, "reason": reason}
                            for name, reason in unchecked_detectors(analysis)]}


#: instabilities, most important first (as their detectors rank them: at one step and stage,
#: an incident's root is the one ranked first); then the loss-quality kinds
INSTABILITIES = tuple(sorted((k.name for k in KINDS.values() if k.instability is not None),
                             key=lambda name: KINDS[name].instability or 0))
DECOUPLING = tuple(k.name for k in KINDS.values() if k.decoupling)


def verdict(analysis: Analysis) -> str:
    """One line: the root of the most severe incident (the earliest of equally severe ones),
    what it set off; then the earliest root and where the loss stopped tracking quality, when
    those are other incidents; or that nothing was found. Always says what was not
    checked."""
    serious = [i for i in analysis.sorted_incidents() if severity_rank(i.severity) >= 1]
    parts = []
    worst = lead_incident(analysis)
    if worst is not None:
        # the root of the most severe harm first (the earliest of equals), then the earliest
        # root and where the loss stopped tracking quality, when those are other incidents
        shown = [worst]
        if serious[0] is not worst:
            shown.append(serious[0])
        decoupled = next((i for i in serious if _decoupling(i)), None)
        if decoupled is not None and not any(_decoupling(i) for i in shown):
            shown.append(decoupled)
        parts.append(_incident_text(worst, analysis))
        parts += [("earlier, " if i.first_step < worst.first_step else "later, ")
                  + _incident_text(i, analysis)
                  for i in sorted(shown[1:], key=lambda i: i.first_step)]
        others = len(serious) - len(shown)
        if others:
            parts.append(f"{others} more incident{'s' if others > 1 else ''} below")
    unchecked = unchecked_detectors(analysis)
    if not parts:
        parts.append("no instability or loss-quality decoupling found"
                     + (" in what could be checked" if unchecked else ""))
        if analysis.findings:  # never above them as if they were not there
            n = len(analysis.findings)
            parts.append(f"{n} info finding{'s' if n > 1 else ''} below: worth knowing, no "
                         f"harm measured")
    if unchecked:  # the reasons are listed under "not checked"
        parts.append("not checked: " + ", ".join(name for name, _ in unchecked))
    return "; ".join(parts)


def lead_incident(analysis: Analysis) -> Incident | None:
    """The incident the verdict opens with: the most severe of warning or above, the earliest
    of equally severe ones; None when there is none."""
    serious = [i for i in analysis.sorted_incidents() if severity_rank(i.severity) >= 1]
    return min(serious, key=lambda i: (-severity_rank(i.severity), i.first_step), default=None)


def _decoupling(incident: Incident) -> bool:
    return any(KINDS[f.kind].decoupling and severity_rank(f.severity) >= 1
               for f in incident.members)


def _incident_text(incident: Incident, analysis: Analysis) -> str:
    """The root's summary (what preceded it), then what it set off."""
    root = incident.root
    if "memorisation" in root.evidence:
        # the loss stopped tracking quality because the model memorises: name that finding
        root = next((f for f in analysis.findings if f.kind == "overfitting"
                     and severity_rank(f.severity) >= 1), root)
    text = root.summary
    if root.preceded_by:
        text += f" (after {root.precursors_text(1)})"
    chain = incident.chain_text(3)
    if chain:
        text += f"; then {chain}"
    return text


def unchecked_detectors(analysis: Analysis) -> list[tuple[str, str]]:
    """(detector, reason) of every detector that was skipped or failed, and every probe that
    failed and was disabled: a verdict never reads as "all clear" about what was not looked
    at."""
    names = {d.NAME for d in DETECTORS}
    return [(c.detector, c.reason) for c in analysis.not_checked()
            if c.detector in names or c.detector.startswith("probe ")]


__all__ = ["FINDINGS_JSON", "Analysis", "Check", "Finding", "Incident", "Signal", "analyze",
           "findings_json", "lead_incident", "unchecked_detectors", "verdict",
           "write_findings"]
