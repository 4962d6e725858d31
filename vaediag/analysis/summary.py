"""The short, readable summary ``vaediag analyze`` prints."""

from __future__ import annotations

import textwrap

from vaediag.analysis.findings import Analysis, Finding

WIDTH = 100


def _finding(f: Finding, indent: int, full: bool, after: int | None = None) -> list[str]:
    """One finding: severity, kind and steps, its summary; a root also its precursors, cause
    and first remedy (a consequence's remedy is its root's)."""
    span = f"step {f.first_step:,}" if f.first_step == f.last_step else \
        f"steps {f.first_step:,}-{f.last_step:,}"
    then = "" if after is None else f"{'+' + format(after, ','):<6} "
    lines = [" " * indent + f"{then}{f.severity.upper():<8} {f.kind}  ({span})",
             _wrap(f.summary, indent + 9)]
    if f.preceded_by and full:
        lines.append(_wrap(f"preceded by: {f.precursors_text()}", indent + 9))
    if f.cause and f.severity != "info" and full:
        lines.append(_wrap(f"cause: {f.cause}", indent + 9))
    if f.remedies and full:
        lines.append(_wrap(f"remedy: {f.remedies[0]}", indent + 9))
    return lines


def _wrap(text: str, indent: int) -> str:
    return textwrap.fill(text, WIDTH, initial_indent=" " * indent,
                         subsequent_indent=" " * indent)


def render(analysis: Analysis, verdict: str, written: list[str] | None = None) -> str:
    """The verdict, then the incidents (warning and high ones first, each root cause with its
    consequences inside, in time order), then what was not checked."""
    run = analysis.run
    lines = [f"{run['name']}: {run['steps']:,} steps ({run['status']}), "
             f"{run['evaluations']:,} evaluations",
             _wrap(f"verdict: {verdict}", 0), ""]
    if not analysis.findings:
        lines.append("no findings")
    for n, incident in enumerate(analysis.sorted_incidents(), 1):
        size = len(incident.members)
        lines.append(f"incident {n}: {incident.severity.upper()} from step "
                     f"{incident.first_step:,}"
                     + (f" ({size} findings, one root cause)" if size > 1 else ""))
        lines += _finding(incident.root, 2, full=True)
        for f in incident.consequences:
            lines += _finding(f, 4, full=False, after=incident.after_steps(f))
    if analysis.verification:
        lines += ["", "verified by replay (analyze --verify):"]
        lines += [_wrap(v["text"], 2) for v in analysis.verification]
    skipped = analysis.not_checked()
    if skipped:
        lines += ["", "not checked:"]
        lines += [_wrap(f"{c.detector}: {c.reason}", 2) for c in skipped]
    if analysis.problems:
        lines += ["", "run directory notes:"] + [_wrap(p, 2) for p in analysis.problems]
    if written:
        lines += [""] + [f"wrote {path}" for path in written]
    return "\n".join(lines)
