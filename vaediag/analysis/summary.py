"""The short, readable summary ``vaediag analyze`` prints."""

from __future__ import annotations

import textwrap

from vaediag.analysis.findings import Analysis

WIDTH = 100


def _wrap(text: str, indent: int) -> str:
    return textwrap.fill(text, WIDTH, initial_indent=" " * indent,
                         subsequent_indent=" " * indent)


def render(analysis: Analysis, verdict: str, written: list[str] | None = None) -> str:
    run = analysis.run
    lines = [f"{run['name']}: {run['steps']:,} steps ({run['status']}), "
             f"{run['evaluations']:,} evaluations",
             _wrap(f"verdict: {verdict}", 0), ""]
    findings = analysis.sorted_findings()
    if not findings:
        lines.append("no findings")
    for f in findings:
        span = f"step {f.first_step:,}" if f.first_step == f.last_step else \
            f"steps {f.first_step:,}-{f.last_step:,}"
        lines.append(f"{f.severity.upper():<8} {f.kind}  ({span})")
        lines.append(_wrap(f.summary, 9))
        if f.preceded_by:
            lines.append(_wrap(f"preceded by: {f.precursors_text()}", 9))
        if f.cause and f.severity != "info":
            lines.append(_wrap(f"cause: {f.cause}", 9))
        if f.remedies:
            lines.append(_wrap(f"remedy: {f.remedies[0]}", 9))
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
