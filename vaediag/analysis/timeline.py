"""The cross-channel timeline: which signals came before each loss spike, KL explosion,
gradient explosion or non-finite value, in which layer, and by how many steps.

Each detector contributes signals (single threshold crossings). For a finding of a linked kind,
the signals of *other* channels within ``LOOKBACK`` steps before its first step (or at it) are
its precursors: the first occurrence of each (channel, where), in time order.
"""

from __future__ import annotations

from vaediag.analysis.detectors import KINDS
from vaediag.analysis.findings import Finding, Signal
from vaediag.columns import KL

LOOKBACK = 50
MAX_PRECURSORS = 8
#: What a detector declares of its kinds (:class:`~vaediag.analysis.kinds.Kind`), by role:
#: a linked finding's own channels (its own signals are not its precursors) ...
OWN_CHANNELS = {k.name: k.own_channels for k in KINDS.values() if k.own_channels is not None}
#: ... kinds that, once training has gone non-finite, are consequences rather than new events
AFTERMATH = {k.name for k in KINDS.values() if k.aftermath}


def fold_consequences(findings: list[Finding]) -> list[Finding]:
    """Report each event once.

    - A KL "spike" that never recovered, starting within ``LOOKBACK`` steps of a KL explosion,
      is that explosion's onset seen step by step: it is folded into the explosion (whose
      change point is located on a decimated series).
    - Spikes and gradient explosions that start after the first non-finite value, inside the
      span where values kept going non-finite, are its aftermath: they are counted in the
      non-finite finding's evidence (``aftermath``) instead of listed one by one.
    """
    explosions = [f for f in findings if f.kind == "kl_explosion"]
    broken = [f for f in findings if f.kind == "nonfinite"]
    keep = []
    for f in findings:
        failure = next((b for b in broken if f.kind in AFTERMATH
                        and b.first_step < f.first_step <= b.last_step), None)
        if failure is not None:
            counts = failure.evidence.setdefault("aftermath", {})
            counts[f.kind] = counts.get(f.kind, 0) + 1
            continue
        main = f.evidence.get("main_term") if f.kind == "loss_spike" else None
        near = [e for e in explosions if abs(e.first_step - f.first_step) <= LOOKBACK]
        if main == KL and f.evidence.get("recovered") is False and near:
            explosion = near[0]
            explosion.first_step = min(explosion.first_step, f.first_step)
            explosion.evidence["onset_spike"] = f.summary
            continue
        keep.append(f)
    for b in broken:
        if b.evidence.get("aftermath"):
            b.summary += "; after it " + ", ".join(
                f"{n} more {kind.replace('_', ' ')}{'s' if n > 1 else ''}"
                for kind, n in sorted(b.evidence["aftermath"].items()))
    return keep


def link(findings: list[Finding], signals: list[Signal]) -> None:
    """Fill ``preceded_by`` of linked findings, in place."""
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
