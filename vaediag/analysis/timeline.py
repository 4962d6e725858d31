"""The cross-channel timeline: which signals came before each loss spike, KL explosion,
gradient explosion or non-finite value, in which layer, and by how many steps.

Each detector contributes signals (single threshold crossings). For a finding of a linked kind,
the signals of *other* channels within ``LOOKBACK`` steps before its first step (or at it) are
its precursors: the first occurrence of each (channel, where), in time order.
"""

from __future__ import annotations

from vaediag.analysis.findings import Finding, Signal

LOOKBACK = 50
MAX_PRECURSORS = 8
#: A finding's own channels: its own signals are not its precursors.
OWN_CHANNELS = {
    "loss_spike": {"recon", "kl", "total"},
    "kl_explosion": {"kl_level", "kl", "total"},
    "nonfinite": {"nonfinite"},
    "grad_explosion": {"grad_norm"},
}


def fold_level_shifts(findings: list[Finding]) -> list[Finding]:
    """A KL "spike" that never recovered, starting within ``LOOKBACK`` steps of a KL explosion,
    is that explosion's onset seen step by step: fold it into the explosion (whose change
    point is located on a decimated series) instead of reporting the event twice."""
    explosions = [f for f in findings if f.kind == "kl_explosion"]
    keep = []
    for f in findings:
        main = f.evidence.get("main_term") if f.kind == "loss_spike" else None
        near = [e for e in explosions if abs(e.first_step - f.first_step) <= LOOKBACK]
        if main == "kl" and f.evidence.get("recovered") is False and near:
            explosion = near[0]
            explosion.first_step = min(explosion.first_step, f.first_step)
            explosion.evidence["onset_spike"] = f.summary
            continue
        keep.append(f)
    return keep


def link(findings: list[Finding], signals: list[Signal]) -> None:
    """Fill ``preceded_by`` (and extend ``cause``) of linked findings, in place."""
    ordered = sorted(signals, key=lambda s: s.step)
    for finding in findings:
        own = OWN_CHANNELS.get(finding.kind)
        if own is None:
            continue
        start = finding.first_step - LOOKBACK
        seen: dict[tuple[str, str], Signal] = {}
        for s in ordered:
            if s.step > finding.first_step:
                break
            if s.step >= start and s.channel not in own:
                seen.setdefault((s.channel, s.where), s)
        chain = sorted(seen.values(), key=lambda s: s.step)[:MAX_PRECURSORS]
        finding.preceded_by = [
            {"step": s.step, "channel": s.channel, "where": s.where, "value": s.value,
             "threshold": s.threshold, "steps_before": finding.first_step - s.step,
             "description": s.description} for s in chain]
        if chain:
            text = ", then ".join(
                f"{s.label()} at step {s.step:,} ({_ago(finding.first_step - s.step)})"
                for s in chain[:4])
            finding.cause = f"preceded by {text}. " + finding.cause


def _ago(steps: int) -> str:
    if steps == 0:
        return "the same step"
    return f"{steps} step{'s' if steps != 1 else ''} before"
