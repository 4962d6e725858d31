"""Adam instability: epsilon-dominance, update RMS toward 1, RMS_t above 1, oversized updates.

Signals (single steps, for the cross-channel timeline), per layer:

- ``adam_rms_t`` >= ``RMS_T_SPIKE``: v^ far below the current squared gradient;
- ``adam_update_rms`` >= ``UPDATE_RMS_SPIKE``: Adam stepping by more than lr per entry on average;
- ``update_ratio`` >= ``RATIO_SPIKE`` or >= ``RATIO_JUMP`` times its running median;
- ``adam_eff_lr`` (the geometric mean of lr / (sqrt(v^) + eps)) rising by ``EFF_LR_FACTOR`` or
  more between two recorded values, a change at least ``EFF_LR_Z`` robust standard deviations
  of its usual changes: v^ moves slowly (beta2 = 0.999), so an abrupt rise means eps, the
  learning rate or v^ itself changed at once. The fraction of eps-dominated entries before and
  after is reported with it (an eps change moves it abruptly too).

Findings (sustained conditions, median over ``WINDOW`` recorded steps, after the burn-in):

- epsilon-dominated layers: ``adam_eps_frac`` >= ``EPS_FRACTION``;
- update RMS near 1: ``adam_update_rms`` >= ``UPDATE_RMS_HIGH`` (healthy is about 0.2-0.3);
- RMS_t persistently above 1: median ``adam_rms_t`` >= ``RMS_T_HIGH``;
- oversized updates: any ``update_ratio`` signal;
- a jump in Adam's effective step size: any ``adam_eff_lr`` signal.

Which of these came *before* a loss spike, KL explosion or non-finite value is worked out across
detectors by :mod:`vaediag.analysis.timeline`.
"""

from __future__ import annotations

import numpy as np

from vaediag.analysis.data import RunData, Skip
from vaediag.analysis.findings import Finding, Signal
from vaediag.analysis.stats import (
    episodes,
    robust_z_at,
    share_at_least,
    trailing_median_at,
    trailing_median_where,
)

NAME = "adam"
WINDOW = 50
RMS_T_SPIKE = 4.0
UPDATE_RMS_SPIKE = 1.0
RATIO_SPIKE = 0.05
RATIO_JUMP = 10.0
EFF_LR_FACTOR = 1.5
EFF_LR_Z = 8.0
EPS_FRACTION = 0.5
UPDATE_RMS_HIGH = 0.6
RMS_T_HIGH = 2.0  # v^ underestimating g^2 four times over, for WINDOW steps


def _spikes(data: RunData, stat: str, threshold: float | None,
            jump: float | None = None) -> list[Signal]:
    """Single recorded values >= threshold, or >= jump times the median of the WINDOW before."""
    frame = data.matrix("layer", stat)
    steps = data.steps
    out = []
    for layer in frame.columns:
        x = frame[layer].to_numpy()
        idx = np.flatnonzero(np.isfinite(x))
        if idx.size < 10:
            continue
        v = x[idx]
        after = steps[idx] >= data.burn_in_step
        hits = set(np.flatnonzero((v >= threshold) & after)) if threshold is not None else set()
        if jump is not None:
            jumped, _ = trailing_median_where(v, WINDOW, jump)
            hits |= {k for k in jumped if after[k]}
        ks = np.array(sorted(hits), dtype=np.int64)
        running = trailing_median_at(v, ks, WINDOW)
        for k, r in zip(ks, running, strict=True):
            out.append(Signal(int(steps[idx[k]]), stat, layer, float(v[k]), float(r),
                              f"{stat} {v[k]:.3g}"))
    return out


def _sustained(data: RunData, stat: str, threshold: float) -> dict[str, tuple[int, float]]:
    """Layers where at least half of the last WINDOW recorded values of ``stat`` (after the
    burn-in) are >= threshold (the running median is), for at least WINDOW recorded steps in
    a row: {layer: (first step of the condition, median value while it held)}."""
    frame = data.matrix("layer", stat)
    steps = data.steps
    out = {}
    for layer in frame.columns:
        x = frame[layer].to_numpy()
        idx = np.flatnonzero(np.isfinite(x) & (steps >= data.burn_in_step))
        if idx.size < 2 * WINDOW:
            continue
        v = x[idx]
        held = share_at_least(v, threshold, WINDOW) >= 0.5
        runs = [r for r in episodes(held, merge_gap=0) if r[1] - r[0] + 1 >= WINDOW]
        if runs:  # the condition began where the values first crossed in that window
            start, end = runs[0]
            window = v[start - WINDOW + 1:start + 1]
            first = start - WINDOW + 1 + int(np.argmax(window >= threshold))
            out[layer] = (int(steps[idx[first]]), float(np.median(v[first:end + 1])))
    return out


def _rises(data: RunData, stat: str, factor: float, z_min: float) -> list[Signal]:
    """Abrupt rises of a slowly moving positive statistic between consecutive recorded
    values."""
    frame = data.matrix("layer", stat)
    steps = data.steps
    out = []
    for layer in frame.columns:
        x = frame[layer].to_numpy()
        idx = np.flatnonzero(np.isfinite(x) & (x > 0))
        if idx.size < 20:
            continue
        change = np.diff(np.log(x[idx]))
        candidates = np.flatnonzero((change >= np.log(factor))
                                    & (steps[idx[1:]] >= data.burn_in_step))
        z = robust_z_at(change, candidates, WINDOW)
        for k in candidates[z >= z_min]:
            out.append(Signal(int(steps[idx[k + 1]]), stat, layer, float(np.exp(change[k])),
                              factor, f"{stat} rose {np.exp(change[k]):.3g}x at once"))
    return out


def _before_after(data: RunData, stat: str, layer: str, step: int) -> dict | None:
    frame = data.matrix("layer", stat)
    if layer not in frame.columns:
        return None
    x = frame[layer].to_numpy()
    before = x[(data.steps < step) & np.isfinite(x)]
    after = x[(data.steps >= step) & np.isfinite(x)]
    if not before.size or not after.size:
        return None
    return {"before": float(before[-1]), "after": float(after[0])}


def detect(data: RunData) -> tuple[list[Finding], list[Signal]]:
    if data.matrix("layer", "adam_update_rms").empty and data.matrix("layer",
                                                                      "update_ratio").empty:
        raise Skip("no Adam statistics recorded (probes.preset 'standard' or 'full' with Adam)")
    signals = (_spikes(data, "adam_rms_t", RMS_T_SPIKE)
               + _spikes(data, "adam_update_rms", UPDATE_RMS_SPIKE)
               + _spikes(data, "update_ratio", RATIO_SPIKE, jump=RATIO_JUMP)
               + _rises(data, "adam_eff_lr", EFF_LR_FACTOR, EFF_LR_Z))
    eps = data.setting("optim", "eps")
    findings = []

    def add(kind, layers, summary, cause, remedies, severity="warning", evidence=None):
        first = min(v[0] for v in layers.values())
        findings.append(Finding(kind=kind, severity=severity, first_step=first,
                                last_step=int(data.steps[-1]), summary=summary,
                                evidence={"layers": {k: {"from_step": v[0], "median": v[1]}
                                                     for k, v in layers.items()},
                                          **(evidence or {})},
                                cause=cause, remedies=remedies, detector=NAME))

    dominated = _sustained(data, "adam_eps_frac", EPS_FRACTION)
    if dominated:
        new_eps = f"{eps * 100:.0e}" if eps else "1e-6"
        add("adam_eps_dominated", dominated,
            f"Adam is epsilon-dominated in {len(dominated)} layer(s) ("
            + ", ".join(dominated) + f"): over {EPS_FRACTION:.0%} of entries have "
            f"sqrt(v^) < eps", "gradients there are tiny against eps: updates are lr*m^/eps, no "
            "longer normalised; a sudden gradient then makes an outsized step",
            [f"raise eps to reduce the effect consistently (e.g. --set optim.eps={new_eps}) or "
             "lower it only if those entries should learn faster",
             "check for dead units (exactly zero gradients also count here)"],
            evidence={"eps": eps, "threshold": EPS_FRACTION})
    near_one = _sustained(data, "adam_update_rms", UPDATE_RMS_HIGH)
    if near_one:
        add("adam_update_rms_high", near_one,
            f"Adam's update RMS stayed above {UPDATE_RMS_HIGH} in {len(near_one)} layer(s) ("
            + ", ".join(near_one) + "): successive gradients agree (time-correlated)",
            "the regime Molybog et al. (2023) link to Adam's instability: updates approach "
            "sign descent at full learning rate", ["lower the learning rate",
                                                   "raise beta2 or eps slightly"],
            evidence={"threshold": UPDATE_RMS_HIGH, "healthy": "about 0.2-0.3"})
    stale = _sustained(data, "adam_rms_t", RMS_T_HIGH)
    if stale:
        add("adam_rms_t_high", stale,
            f"RMS_t stayed above {RMS_T_HIGH} in {len(stale)} layer(s) (" + ", ".join(stale)
            + "): Adam's second moment lags the gradients", "v^ underestimates the current "
            "gradient scale, so steps are larger than intended (StableAdamW's warning sign)",
            ["lower beta2 (e.g. 0.99) so v tracks faster, or clip updates (StableAdamW)",
             "lower the learning rate"], evidence={"threshold": RMS_T_HIGH})
    hits = [s for s in signals if s.channel == "update_ratio"]
    if hits:
        first, worst = min(hits, key=lambda s: s.step), max(hits, key=lambda s: s.value)
        layers = sorted({s.where for s in hits})
        findings.append(Finding(
            kind="oversized_update", severity="warning", first_step=first.step,
            last_step=max(s.step for s in hits),
            summary=(f"step {first.step:,}: an oversized update: {worst.where} changed by "
                     f"{worst.value:.3g} of its norm in one step"
                     + (f" ({len(hits)} times, {len(layers)} layer(s))" if len(hits) > 1
                        else "")),
            evidence={"layers": layers, "occurrences": len(hits), "max": worst.value,
                      "max_at": worst.step, "threshold": RATIO_SPIKE, "jump": RATIO_JUMP},
            cause="a step far larger than Adam's usual ~1e-3 of the weights: a learning-rate "
                  "spike, an outlier gradient, v^ collapsing, or an edit of the weights",
            remedies=["lower the learning rate or warm it up; clip gradients",
                      "raise Adam's eps (e.g. 1e-6) so small v^ cannot make huge steps"],
            detector=NAME))
    hits = [s for s in signals if s.channel == "adam_eff_lr"]
    if hits:
        first = min(hits, key=lambda s: s.step)
        at_first = [s for s in hits if s.step == first.step]
        worst = max(at_first, key=lambda s: s.value)
        layers = sorted({s.where for s in hits})
        eps_frac = {s.where: _before_after(data, "adam_eps_frac", s.where, s.step)
                    for s in at_first}
        eps_moved = {k: v for k, v in eps_frac.items()
                     if v and abs(v["after"] - v["before"]) >= 0.01}
        lr_jump = None
        if data.has("lr"):
            lr = data.series("lr")
            i = int(np.searchsorted(data.steps, first.step))
            lr_jump = float(lr[i] / lr[i - 1]) if 0 < i < len(lr) and lr[i - 1] > 0 else None
        if lr_jump and lr_jump >= EFF_LR_FACTOR:
            why = f"the learning rate itself rose {lr_jump:.3g}x at that step"
        elif eps_moved:
            why = ("the fraction of eps-dominated entries moved at the same step ("
                   + ", ".join(f"{k} {v['before']:.1%} -> {v['after']:.1%}"
                               for k, v in eps_moved.items()) + "): eps changed")
        else:
            why = "v^ collapsed (gradients became much smaller at once)"
        findings.append(Finding(
            kind="adam_step_size_jump", severity="warning", first_step=first.step,
            last_step=max(s.step for s in hits),
            summary=(f"step {first.step:,}: Adam's effective step size rose {worst.value:.3g}x "
                     f"at once in {worst.where}"
                     + (f" and {len(at_first) - 1} more layer(s)" if len(at_first) > 1 else "")
                     + f"; {why}"),
            evidence={"layers": layers, "occurrences": len(hits), "factor": worst.value,
                      "threshold_factor": EFF_LR_FACTOR, "threshold_z": EFF_LR_Z,
                      "eps_dominated_fraction": eps_frac, "lr_factor": lr_jump},
            cause=("lr / (sqrt(v^) + eps) moves slowly in a healthy run (v^ averages over ~1000 "
                   "steps); " + why),
            remedies=(["if eps was lowered (e.g. to 1e-16), set it back: entries with tiny v^ "
                       "now take steps of lr * m^/sqrt(v^), close to lr in size whatever "
                       "their gradient"] if eps_moved else [])
                     + ["check the learning-rate schedule for jumps; warm the rate up"
                        if lr_jump and lr_jump >= EFF_LR_FACTOR else
                        "lower the learning rate; clip gradients"],
            detector=NAME))
    return findings, signals
