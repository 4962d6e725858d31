"""What analysis produces: findings, the signals behind them, and what could not be checked.

The JSON form (``findings.json``) is documented in docs/detectors.md and built only here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from vaediag.severities import SEVERITIES, severity_rank  # noqa: F401 - re-exported

FORMAT_VERSION = 1


@dataclass
class Signal:
    """One threshold crossing in one channel at one step: the atoms of the cross-channel timeline.

    ``channel`` names the statistic (``grad_norm``, ``adam_rms_t``, ``kl``, ...), ``where`` the
    layer, part or loss term it was seen in ("" for global), ``value`` and ``threshold`` say how
    far it went.
    """

    step: int
    channel: str
    where: str
    value: float
    threshold: float
    description: str

    def label(self) -> str:
        return f"{self.channel}{f' in {self.where}' if self.where else ''}"


@dataclass
class Finding:
    """One diagnosed problem, with the evidence for it and what to do about it."""

    kind: str
    severity: str
    first_step: int
    last_step: int
    summary: str  # one line
    evidence: dict[str, Any] = field(default_factory=dict)
    cause: str = ""
    remedies: list[str] = field(default_factory=list)
    detector: str = ""
    #: signals that came before the finding's first step, in time order (filled by the timeline)
    preceded_by: list[dict[str, Any]] = field(default_factory=list)
    #: evaluation steps a reader should look at side by side (grids before, at, after)
    compare_steps: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return _clean(asdict(self))

    def precursors_text(self, limit: int = 4) -> str:
        """``preceded_by`` for people: one entry per channel and step, its layers named."""
        groups: dict[tuple[str, int], list[str]] = {}
        for p in self.preceded_by:
            groups.setdefault((p["channel"], p["steps_before"]), []).append(p["where"])
        parts = []
        for (channel, before), wheres in list(groups.items())[:limit]:
            wheres = [w for w in wheres if w]
            where = ""
            if wheres:
                shown = ", ".join(wheres[:2])
                where = f" in {shown}" + (f" and {len(wheres) - 2} more" if len(wheres) > 2
                                          else "")
            ago = "at the same step" if before == 0 else \
                f"{before} step{'s' if before != 1 else ''} before"
            parts.append(f"{channel}{where} ({ago})")
        return ", ".join(parts)


@dataclass
class Incident:
    """Findings that share a root cause: the root (the earliest of the chain) and its
    consequences in time order (:mod:`vaediag.analysis.incidents`)."""

    root: Finding
    consequences: list[Finding] = field(default_factory=list)
    #: ``id(finding)`` -> the step each consequence could first be seen (for one seen by
    #: comparing evaluations, the evaluation after its first step)
    seen_at: dict[int, int] = field(default_factory=dict)

    def after_steps(self, f: Finding) -> int:
        """How many steps after the root a consequence was seen."""
        return max(0, self.seen_at.get(id(f), f.first_step) - self.root.first_step)

    @property
    def members(self) -> list[Finding]:
        return [self.root, *self.consequences]

    @property
    def severity(self) -> str:
        return max((f.severity for f in self.members), key=severity_rank)

    @property
    def first_step(self) -> int:
        return self.root.first_step

    @property
    def last_step(self) -> int:
        return max(f.last_step for f in self.members)

    @property
    def remedies(self) -> list[str]:
        return self.root.remedies

    def chain_text(self, limit: int = 4) -> str:
        """The consequences of warning or above for people, in the order they were seen:
        "loss spike at step 701 (+1), ...", each kind once; "" when there are none."""
        seen: dict[str, Finding] = {}
        for f in sorted(self.consequences, key=self.after_steps):
            if severity_rank(f.severity) >= 1:
                seen.setdefault(f.kind, f)
        parts = [f"{f.kind.replace('_', ' ')} at step "
                 f"{self.seen_at.get(id(f), f.first_step):,} (+{self.after_steps(f):,})"
                 for f in seen.values()]
        more = len(parts) - limit
        return ", ".join(parts[:limit]) + (f" and {more} more" if more > 0 else "")

    def to_json(self, index: dict[int, int]) -> dict[str, Any]:
        """``index``: ``id(finding)`` -> its position in findings.json's ``findings``."""
        return _clean({
            "severity": self.severity, "first_step": self.first_step,
            "last_step": self.last_step, "root": index[id(self.root)],
            "root_kind": self.root.kind, "summary": self.root.summary,
            "cause": self.root.cause,
            "consequences": [{"finding": index[id(f)], "kind": f.kind,
                              "seen_at_step": self.seen_at.get(id(f), f.first_step),
                              "after_steps": self.after_steps(f)}
                             for f in self.consequences],
            "remedies": list(self.remedies)})


@dataclass
class Check:
    """Whether a detector could run, and if not, why."""

    detector: str
    status: str  # "ok" | "skipped" | "partial"
    reason: str = ""


@dataclass
class Analysis:
    """Everything ``vaediag analyze`` produced for one run."""

    run: dict[str, Any]
    findings: list[Finding]
    checks: list[Check]
    signals: list[Signal]
    problems: list[str]  # of the run dir itself: torn writes, a killed writer, ...
    derived: dict[str, Any] = field(default_factory=dict)  # series detectors derived
    #: what replaying each warning or high finding's remedy showed (``analyze --verify``;
    #: JSON of :class:`vaediag.verify.Verification`), empty otherwise
    verification: list[dict[str, Any]] = field(default_factory=list)
    #: the findings grouped by root cause, in time order of their roots
    incidents: list[Incident] = field(default_factory=list)

    def sorted_findings(self) -> list[Finding]:
        """Most severe first, then in time order."""
        return sorted(self.findings, key=lambda f: (-severity_rank(f.severity), f.first_step))

    def sorted_incidents(self) -> list[Incident]:
        """Warning and high incidents in time order (the earliest root cause first), then the
        info ones in time order."""
        return sorted(self.incidents, key=lambda i: (i.severity == "info", i.first_step))

    @property
    def worst(self) -> str | None:
        return max((f.severity for f in self.findings), key=severity_rank, default=None)

    def not_checked(self) -> list[Check]:
        return [c for c in self.checks if c.status != "ok"]

    def to_json(self) -> dict[str, Any]:
        findings = self.sorted_findings()
        index = {id(f): i for i, f in enumerate(findings)}
        return {
            "format": FORMAT_VERSION,
            "run": _clean(self.run),
            "findings": [f.to_json() for f in findings],
            "incidents": [i.to_json(index) for i in self.sorted_incidents()],
            "checks": [asdict(c) for c in self.checks],
            "problems": list(self.problems),
            "timeline": [_clean(asdict(s)) for s in sorted(self.signals, key=lambda s: s.step)],
            "derived": _clean(self.derived),
            **({"verification": _clean(self.verification)} if self.verification else {}),
        }


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/Inf to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            value = value.tolist()
            return _clean(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
