"""Loss spikes in the reconstruction term, the KL term and the total, with their recovery.

Statistic: robust z-score of each step's log loss against the median and MAD of the
``WINDOW`` steps before it (:func:`~vaediag.analysis.stats.trailing_robust_z`). A spike is a run
of steps with z >= ``Z_SPIKE`` after the burn-in; it has recovered at the first step after its
peak that is back within 2 robust standard deviations of the level before it. Spikes in several
terms within a few steps are one finding.

Severity: ``high`` when the peak is at least ``HIGH_RATIO`` times the level before it or the loss
never came back within ``RECOVERY_LIMIT`` steps (a level shift, not a spike); else ``warning``.
A term that is not always positive (a Gaussian negative log-likelihood can be below zero) is
scored on its raw values, and its spikes are described by how much they rose, not by a ratio.
"""

from __future__ import annotations

import math

import numpy as np

from vaediag.analysis.data import RunData, Skip
from vaediag.analysis.findings import Finding, Signal
from vaediag.analysis.stats import episodes, to_log, trailing_robust_z

NAME = "loss_spikes"
TERMS = ("recon", "kl", "total")
WINDOW = 100
Z_SPIKE = 6.0
HIGH_RATIO = 10.0
RECOVERY_LIMIT = 500
MAX_FINDINGS = 10


def term_spikes(data: RunData, term: str) -> list[dict]:
    """Spikes of one loss term as dicts (onset, peak, end, recovery, baseline, ratio, z)."""
    x_raw = data.series(term)
    x, logged = to_log(x_raw)
    rz = trailing_robust_z(x, WINDOW)
    steps = data.steps
    valid = np.isfinite(rz.z) & (steps >= data.burn_in_step)
    out = []
    for start, end in episodes(valid & (rz.z >= Z_SPIKE), merge_gap=5):
        peak = start + int(np.nanargmax(rz.z[start:end + 1]))
        base, scale = rz.median[start], rz.scale[start]
        back = np.flatnonzero(x[peak + 1:] <= base + 2 * scale)
        recovered = int(steps[peak + 1 + back[0]]) if back.size else None
        ratio = math.exp(x[peak] - base) if logged else None
        out.append({
            "term": term, "onset": int(steps[start]), "peak": int(steps[peak]),
            "end": int(steps[end]), "peak_value": float(x_raw[peak]),
            "baseline": float(math.exp(base) if logged else base),
            "ratio": None if ratio is None else float(ratio),
            "z": float(rz.z[peak]), "recovered_at": recovered,
            "recovery_steps": None if recovered is None else recovered - int(steps[start]),
        })
    return out


def _rise(spike: dict) -> str:
    """'3.2x' for a positive series, 'by 930' for one that can be negative."""
    if spike["ratio"] is not None:
        return f"{spike['ratio']:.3g}x"
    return f"by {spike['peak_value'] - spike['baseline']:.4g}"


def _size(spike: dict) -> float:
    """How big a spike is, comparable across terms: its ratio, else its robust z."""
    return spike["ratio"] if spike["ratio"] is not None else spike["z"]


def clip_suggestion(data: RunData, before_step: int) -> float | None:
    """The 99th percentile of the global gradient norm in the stable phase before a step."""
    if not data.has("grad_norm"):
        return None
    steps = data.steps
    g = data.series("grad_norm")
    ok = (steps >= data.burn_in_step) & (steps < before_step) & np.isfinite(g)
    return float(np.percentile(g[ok], 99)) if ok.sum() >= 20 else None


def detect(data: RunData) -> tuple[list[Finding], list[Signal]]:
    terms = [t for t in TERMS if data.has(t)]
    if not terms:
        raise Skip("no loss terms recorded")
    if data.n_steps < data.burn_in_step - int(data.steps[0]) + 20:
        raise Skip(f"too short: spikes are looked for after the first "
                   f"{data.burn_in_step - int(data.steps[0])} steps")
    spikes = sorted((s for t in terms for s in term_spikes(data, t)), key=lambda s: s["onset"])
    signals = [Signal(s["onset"], s["term"], "", s["peak_value"], s["baseline"],
                      f"{s['term']} rose {_rise(s)} (robust z {s['z']:.0f})")
               for s in spikes]
    groups: list[list[dict]] = []
    for s in spikes:  # spikes of different terms within 5 steps are one event
        if groups and s["onset"] - max(g["end"] for g in groups[-1]) <= 5:
            groups[-1].append(s)
        else:
            groups.append([s])
    groups.sort(key=lambda g: -max(s["z"] for s in g))
    findings = []
    for group in groups[:MAX_FINDINGS]:
        main = max((s for s in group if s["term"] != "total"), key=_size, default=group[0])
        onset = min(s["onset"] for s in group)
        unrecovered = [s for s in group if s["recovered_at"] is None
                       or s["recovery_steps"] > RECOVERY_LIMIT]
        high = (main["ratio"] or 0.0) >= HIGH_RATIO or bool(unrecovered)
        names = "/".join(sorted({s["term"] for s in group}))
        recovery = ("did not recover" if main["recovered_at"] is None
                    else f"recovered in {main['recovery_steps']:,} steps")
        summary = (f"{names} spike at step {onset:,}: {main['term']} rose {_rise(main)} "
                   f"({main['baseline']:.4g} -> {main['peak_value']:.4g}) and {recovery}")
        clip = clip_suggestion(data, onset)
        remedies = [f"clip gradients at {clip:.3g} (the 99th percentile of the gradient norm "
                    f"before the spike): --set optim.grad_clip={clip:.3g}"] if clip else []
        remedies += ["lower the learning rate (optim.lr), or add a warm-up (optim.warmup_steps)"]
        if main["term"] == "kl":
            remedies.append("clamp the log-variance (loss.logvar_clamp = [-30.0, 20.0]) and "
                            "warm the KL weight up (loss.beta_schedule = 'warmup')")
        findings.append(Finding(
            kind="loss_spike", severity="high" if high else "warning", first_step=onset,
            last_step=max(s["end"] if s["recovered_at"] is None else s["recovered_at"]
                          for s in group),
            summary=summary, evidence={"spikes": group, "main_term": main["term"],
                                       "recovered": main["recovered_at"] is not None
                                       and main["recovery_steps"] <= RECOVERY_LIMIT,
                                       "threshold_z": Z_SPIKE, "window": WINDOW,
                                       "suggested_clip": clip},
            cause="a sudden rise of the loss; the signals that preceded it (if any) are listed",
            remedies=remedies, detector=NAME))
    if len(groups) > MAX_FINDINGS:
        findings[-1].evidence["more_spikes_not_listed"] = len(groups) - MAX_FINDINGS
    return findings, signals
