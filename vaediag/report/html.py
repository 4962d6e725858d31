"""The HTML report: one self-contained file (images as data URIs, CSS inline, no script, nothing
from the network), rendered with Jinja2 with autoescaping on, so every string from a config, a
path or a run name is escaped."""

from __future__ import annotations

import json

from jinja2 import Environment, PackageLoader, select_autoescape

from vaediag.report.content import SECTION_OF, Report

MAX_EVIDENCE_CHARS = 2000


def evidence_text(evidence: dict) -> str:
    text = json.dumps(evidence, indent=1, default=str)
    if len(text) > MAX_EVIDENCE_CHARS:
        text = text[:MAX_EVIDENCE_CHARS] + "\n... (the rest in findings.json)"
    return text


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("vaediag.report", "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["evidence"] = evidence_text
    env.filters["thousands"] = lambda n: f"{n:,}"
    return env


def render_html(report: Report) -> str:
    template = _environment().get_template("report.html.j2")
    return template.render(report=report, section_of=SECTION_OF)
