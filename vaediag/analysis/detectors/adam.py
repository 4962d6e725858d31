"""Adam instability: epsilon-dominance, update RMS toward 1, RMS_t above 1, oversized updates.

Signals (single steps, for the cross-channel timeline), per layer:

- ``adam_rms_t`` >= ``RMS_T_SPIKE``: v^ far below the current squared gradient;
- ``adam_update_rms`` >= ``UPDATE_RMS_SPIKE``: Adam stepping by more than lr per entry on average;
- ``update_ratio`` >= ``RATIO_SPIKE``, or >= ``RATIO_JUMP`` times its running median and at
  least ``RATIO_FLOOR`` (a layer that stopped moving makes any step a "jump");
- ``adam_eff_lr`` (the geometric mean of lr / (sqrt(v^) + eps)) rising by ``EFF_LR_FACTOR`` or
  more between two recorded values, a change at least ``EFF_LR_Z`` robust standard deviations
  of its usual changes: v^ moves slowly (beta2 = 0.999), so an abrupt rise means eps, the
  learning rate or v^ itself changed at once. The fraction of eps-dominated entries before and
  after is reported with it (an eps change moves it abruptly too).

Findings (sustained conditions: the running median over ``WINDOW_STEPS`` steps, whatever
the cadence the statistic was recorded at, after the burn-in):

- epsilon-dominated layers: ``adam_eps_frac`` >= ``EPS_FRACTION``. A condition that *began*
  during training (under half that fraction before it) is a change of regime: ``warning``, and
  its cause is read off the recorded ``eps`` when eps changed. One that holds from the start
  (dead units, a mean-reduced loss with tiny gradients) is a property of the setup: ``info``;
- update RMS near 1: ``adam_update_rms`` >= ``UPDATE_RMS_HIGH`` (healthy is about 0.2-0.3);
- RMS_t persistently above 1: median ``adam_rms_t`` >= ``RMS_T_HIGH``.
  These two are ``info`` on their own: at a low learning rate successive gradients agree
  because the weights barely move, which is harmless. They become ``warning`` when a loss
  spike, KL explosion, gradient explosion or non-finite value follows while they hold
  (:func:`vaediag.analysis.timeline.grade`);
- oversized updates: any ``update_ratio`` signal; ``warning`` from ``RATIO_SPIKE`` (5% of a
  layer's weights in one step), ``info`` below it unless harm follows;
- a jump in Adam's effective step size: any ``adam_eff_lr`` signal.

The causes of the last two are read off the recorded learning rate and eps first.

Which of these came *before* a loss spike, KL explosion or non-finite value is worked out across
detectors by :mod:`vaediag.analysis.timeline`.
"""

from __future__ import annotations

import math

import numpy as np

from vaediag.analysis.causes import (
    SettingChange,
    first_change,
    knob,
    setting_changes,
    undo_remedy,
)
from vaediag.analysis.data import RunData, Skip
from vaediag.analysis.findings import Finding, Signal
from vaediag.analysis.kinds import Kind
from vaediag.analysis.stats import (
    episodes,
    robust_z_at,
    share_at_least,
    trailing_median_at,
    trailing_median_where,
)
from vaediag.columns import (
    ADAM_EFF_LR,
    ADAM_EPS_FRAC,
    ADAM_RMS_T,
    ADAM_UPDATE_RMS,
    EPS,
    LR,
    UPDATE_RATIO,
)

NAME = "adam"
#: its place among the detectors: they run, and are listed, in this order
ORDER = 50
#: the kinds of finding this detector emits (see :mod:`vaediag.analysis.kinds`)
KINDS = (
    Kind("oversized_update", "optimizer", instability=6, stage="update", condition=True,
         risk=True, aftermath=True),
    Kind("adam_step_size_jump", "optimizer", instability=7, stage="optimizer", risk=True),
    Kind("adam_eps_dominated", "optimizer", instability=8, stage="optimizer", condition=True),
    Kind("adam_update_rms_high", "optimizer", stage="optimizer", condition=True),
    Kind("adam_rms_t_high", "optimizer", stage="optimizer", condition=True),
)
#: recorded values in the running median of a sustained condition
WINDOW = 50
#: steps a condition must hold; steps before and after compared for eps-dominance's harm
WINDOW_STEPS = 50
#: eps-dominance that began during training did harm when the layers' updates shrank this much
EPS_SHRINK = 3.0
EFF_LR_SPAN = 20  # steps before an eff_lr jump searched for its cause (it is recorded every 10)
LOW_LR = 3e-4  # at or below this learning rate, agreeing gradients are expected
#: RMS_t at which a single step is a signal
RMS_T_SPIKE = 4.0
#: update RMS at which a single step is a signal
UPDATE_RMS_SPIKE = 1.0
#: a layer changed by this fraction of its norm in one step: an oversized update (warning when
#: harm follows)
RATIO_SPIKE = 0.05
#: ... or by this many times its own usual update
RATIO_JUMP = 10.0
RATIO_FLOOR = 1e-2  # ten times a healthy update: smaller "jumps" are from a layer at rest
#: effective step size rising at least this factor at once ...
EFF_LR_FACTOR = 1.5
#: ... and this many robust standard deviations: a step-size jump
EFF_LR_Z = 8.0
#: share of entries with sqrt(v^) < eps that makes a layer eps-dominated
EPS_FRACTION = 0.5
#: running median of the update RMS above this: successive gradients agree (healthy: 0.2-0.3)
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
        if jump is not None:  # a jump must also be a real step: RATIO_FLOOR or more
            jumped, _ = trailing_median_where(v, WINDOW, jump)
            hits |= {k for k in jumped if after[k] and v[k] >= RATIO_FLOOR}
        ks = np.array(sorted(hits), dtype=np.int64)
        running = trailing_median_at(v, ks, WINDOW)
        for k, r in zip(ks, running, strict=True):
            out.append(Signal(int(steps[idx[k]]), stat, layer, float(v[k]), float(r),
                              f"{stat} {v[k]:.3g}"))
    return out


def _sustained(data: RunData, stat: str, threshold: float) -> dict[str, tuple[int, float, int]]:
    """Layers where the running median of ``stat`` over ``WINDOW_STEPS`` steps (after the
    burn-in) is >= threshold for at least ``WINDOW_STEPS`` steps in a row: {layer: (first step
    of the condition, median value while it held, last step it held)}."""
    frame = data.matrix("layer", stat)
    steps = data.steps
    out = {}
    for layer in frame.columns:
        x = frame[layer].to_numpy()
        idx = np.flatnonzero(np.isfinite(x) & (steps >= data.burn_in_step))
        if idx.size < 10:
            continue
        cadence = max(1, int(np.median(np.diff(steps[idx]))))
        window = max(5, WINDOW_STEPS // cadence)
        if idx.size < window:
            continue
        v = x[idx]
        held = share_at_least(v, threshold, window) >= 0.5
        runs = [r for r in episodes(held, merge_gap=0) if r[1] - r[0] + 1 >= window]
        if runs:  # the condition began where the values first crossed in that window
            start, end = runs[0]
            first = start - window + 1 + int(np.argmax(v[start - window + 1:start + 1]
                                                      >= threshold))
            out[layer] = (int(steps[idx[first]]), float(np.median(v[first:end + 1])),
                          int(steps[idx[end]]))
    return out


def _began(data: RunData, stat: str, layer: str, step: int, threshold: float) -> bool:
    """Whether ``stat`` in ``layer`` was under half the threshold in the steps before ``step``
    (so the condition began then, rather than holding from the start)."""
    x = data.matrix("layer", stat)[layer].to_numpy()
    steps = data.steps
    before = x[(steps < step) & (steps >= step - 4 * WINDOW_STEPS) & np.isfinite(x)]
    return before.size >= 3 and float(np.median(before)) < threshold / 2


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


def _updates_shrank(data: RunData, layers: list[str], step: int) -> float | None:
    """How many times smaller the median update ratio of ``layers`` is over ``WINDOW_STEPS``
    steps from ``step`` than over as many steps before it (None when not recorded)."""
    frame = data.matrix("layer", UPDATE_RATIO)
    cols = [c for c in layers if c in frame.columns]
    if not cols:
        return None
    values = frame[cols].to_numpy()
    recorded = np.isfinite(values).any(axis=1)  # recorded every few steps
    x = np.full(len(values), np.nan)
    x[recorded] = np.nanmedian(values[recorded], axis=1)
    steps = data.steps
    before = x[(steps >= step - WINDOW_STEPS) & (steps < step) & np.isfinite(x)]
    after = x[(steps >= step) & (steps < step + WINDOW_STEPS) & np.isfinite(x)]
    if before.size < 3 or after.size < 3:
        return None
    b, a = float(np.median(before)), float(np.median(after))
    return b / a if a > 0 else math.inf


def _lr_note(data: RunData) -> tuple[str, bool]:
    """How the learning rate bears on agreeing gradients: (text, whether it is low)."""
    lr = data.setting("optim", "lr")
    if lr is None and data.has(LR):
        lr = float(np.nanmedian(data.series(LR)))
    if lr is not None and lr <= LOW_LR:
        return (f"at this low learning rate ({lr:.3g}) the weights barely move between steps, "
                f"so successive gradients agree: expected, and harmless unless spikes follow "
                f"while it holds", True)
    return ("the regime Molybog et al. (2023) link to Adam's instability: updates approach "
            "sign descent at full learning rate; harmful only if spikes follow", False)


def _setting_cause(data: RunData, start: int, end: int) -> tuple[str, list[str]] | None:
    """A jump of the recorded learning rate or eps in steps [start, end]."""
    change = first_change(data, (EPS, LR), start, end)
    if change is None:
        return None
    what = "eps changed" if change.column == EPS else "the learning rate itself changed"
    return f"{change.describe()}: {what}", [undo_remedy(data, change)]


def _held(kind: str, layers: dict[str, tuple[int, float, int]], summary: str, cause: str,
          remedies: list[str], severity: str = "warning",
          evidence: dict | None = None) -> Finding:
    """A finding of a condition held in ``layers`` ({layer: (from step, median, until step)},
    from :func:`_sustained`)."""
    return Finding(kind=kind, severity=severity,
                   first_step=min(v[0] for v in layers.values()),
                   last_step=max(v[2] for v in layers.values()), summary=summary,
                   evidence={"layers": {k: {"from_step": v[0], "median": v[1],
                                            "until_step": v[2]}
                                        for k, v in layers.items()}, **(evidence or {})},
                   cause=cause, remedies=remedies, detector=NAME)


def _eps_cause(data: RunData, change: SettingChange | None, began: bool) -> tuple[str, list[str]]:
    """Why the layers are epsilon-dominated: eps was raised, their gradients became tiny
    during training, or they were tiny from the start."""
    if change is not None:
        return (f"{change.describe()}: eps now exceeds sqrt(v^) for most entries, so steps "
                f"are lr*m^/eps, far smaller than Adam's normalised lr*m^/sqrt(v^): those "
                f"layers all but stopped learning",
                [f"set eps back to {change.before:.3g}{knob(data, 'optim.eps', change.before)}"])
    if began:
        return ("the gradients of these layers became tiny against eps during training (dying "
                "units, or a loss term that stopped reaching them): updates are lr*m^/eps "
                "there, no longer normalised; a sudden gradient then makes an outsized step",
                ["check for dead units (exactly zero gradients count here); lower eps if those "
                 "entries should still learn" + knob(data, "optim.eps")])
    return ("these layers' gradients are tiny against eps from the start (a mean-reduced "
            "loss, or dead units): a property of the setup, harmless unless a sudden gradient "
            "follows",
            ["nothing needs doing unless spikes follow; a smaller eps (e.g. 1e-12) restores "
             "Adam's normalisation there" + knob(data, "optim.eps")])


def _eps_dominated(data: RunData) -> Finding | None:
    """Layers where most entries have sqrt(v^) < eps; a warning only when their updates
    shrank ``EPS_SHRINK`` times or more (the harm: they stopped learning)."""
    dominated = _sustained(data, ADAM_EPS_FRAC, EPS_FRACTION)
    if not dominated:
        return None
    began = {k: v for k, v in dominated.items()
             if _began(data, ADAM_EPS_FRAC, k, v[0], EPS_FRACTION)}
    first = min(v[0] for v in (began or dominated).values())
    change = next((c for c in setting_changes(data, EPS, first - 4 * WINDOW_STEPS, first)
                   if c.rose), None)
    cause, remedies = _eps_cause(data, change, bool(began))
    shown = began or dominated
    shrank = _updates_shrank(data, sorted(began), first) if began else None
    harmed = shrank is not None and shrank >= EPS_SHRINK
    return _held(
        "adam_eps_dominated", shown,
        f"Adam is epsilon-dominated in {len(shown)} layer(s) (" + ", ".join(shown)
        + f"): over {EPS_FRACTION:.0%} of entries have sqrt(v^) < eps"
        + (f" from step {first:,}" if began else " throughout")
        + (f"; their updates shrank {shrank:.3g}x: they all but stopped learning"
           if harmed else "; a risk only: their updates did not shrink" if began else ""),
        cause, remedies, severity="warning" if harmed else "info",
        evidence={"eps": change.after if change else data.setting("optim", "eps"),
                  "threshold": EPS_FRACTION, "began_during_training": sorted(began),
                  "eps_change": change.__dict__ if change else None,
                  "updates_shrank": shrank, "shrink_threshold": EPS_SHRINK})


def _update_rms_high(data: RunData) -> Finding | None:
    """Layers whose update RMS stayed near 1: successive gradients agree."""
    near_one = _sustained(data, ADAM_UPDATE_RMS, UPDATE_RMS_HIGH)
    if not near_one:
        return None
    lr_text, low_lr = _lr_note(data)
    return _held(
        "adam_update_rms_high", near_one,
        f"Adam's update RMS stayed above {UPDATE_RMS_HIGH} in {len(near_one)} layer(s) ("
        + ", ".join(near_one) + "): successive gradients agree (time-correlated)",
        lr_text, ([] if low_lr else ["lower the learning rate" + knob(data, "optim.lr")])
        + ["raise beta2 or eps slightly" + knob(data, "optim.betas")], severity="info",
        evidence={"threshold": UPDATE_RMS_HIGH, "healthy": "about 0.2-0.3"})


def _rms_t_high(data: RunData) -> Finding | None:
    """Layers whose RMS_t stayed high: v^ lags the gradients."""
    stale = _sustained(data, ADAM_RMS_T, RMS_T_HIGH)
    if not stale:
        return None
    return _held(
        "adam_rms_t_high", stale,
        f"RMS_t stayed above {RMS_T_HIGH} in {len(stale)} layer(s) (" + ", ".join(stale)
        + "): Adam's second moment lags the gradients", "v^ underestimates the current "
        "gradient scale (gradients growing faster than v^ follows), so steps are larger than "
        "intended: StableAdamW's warning sign; harmful only if spikes follow",
        ["lower beta2 (e.g. 0.99) so v tracks faster" + knob(data, "optim.betas"),
         "or clip updates (StableAdamW)"], severity="info",
        evidence={"threshold": RMS_T_HIGH})


def _oversized_update(data: RunData, signals: list[Signal]) -> Finding | None:
    """Steps that changed a layer by far more than Adam's usual ~1e-3 of its weights; a jump
    to a few times a healthy step is info (harmless unless harm follows: timeline.grade)."""
    hits = [s for s in signals if s.channel == UPDATE_RATIO]
    if not hits:
        return None
    first, worst = min(hits, key=lambda s: s.step), max(hits, key=lambda s: s.value)
    layers = sorted({s.where for s in hits})
    setting = _setting_cause(data, first.step - 1, first.step)
    cause = (setting[0] if setting else
             "a step far larger than Adam's usual ~1e-3 of the weights, with no change of "
             "learning rate or eps recorded: an outlier gradient, v^ collapsing, or an edit of "
             "the weights")
    return Finding(
        kind="oversized_update", severity="warning" if worst.value >= RATIO_SPIKE else "info",
        first_step=first.step, last_step=max(s.step for s in hits),
        summary=(f"step {first.step:,}: an oversized update: {worst.where} changed by "
                 f"{worst.value:.3g} of its norm in one step"
                 + (f" ({len(hits)} times, {len(layers)} layer(s))" if len(hits) > 1 else "")),
        evidence={"layers": layers, "occurrences": len(hits), "max": worst.value,
                  "max_at": worst.step, "threshold": RATIO_SPIKE, "jump": RATIO_JUMP},
        cause=cause,
        remedies=(setting[1] if setting else [])
        + ["clip gradients" + knob(data, "optim.grad_clip"),
           "raise Adam's eps (e.g. 1e-6) so a small v^ cannot make huge steps"
           + knob(data, "optim.eps", "1e-6")],
        detector=NAME)


def _step_size_cause(data: RunData, step: int, at_first: list[Signal]
                     ) -> tuple[str, list[str], dict]:
    """Why Adam's effective step size jumped at ``step``: a recorded change of lr or eps, the
    eps-dominated fraction moving with it (eps changed unrecorded), else v^ collapsing.
    Returns the reason, its remedies and the eps-dominated fraction before and after."""
    eps_frac = {s.where: _before_after(data, ADAM_EPS_FRAC, s.where, s.step)
                for s in at_first}
    eps_moved = {k: v for k, v in eps_frac.items()
                 if v and abs(v["after"] - v["before"]) >= 0.01}
    # eff_lr is recorded every few steps: the change happened since the last recording
    setting = _setting_cause(data, step - EFF_LR_SPAN, step)
    if setting is not None:
        return (*setting, eps_frac)
    if eps_moved:
        return ("the fraction of eps-dominated entries moved at the same step ("
                + ", ".join(f"{k} {v['before']:.1%} -> {v['after']:.1%}"
                            for k, v in eps_moved.items()) + "): eps probably changed",
                ["if eps was lowered (e.g. to 1e-16), set it back: entries with tiny v^ now "
                 "take steps of lr * m^/sqrt(v^), close to lr in size whatever their gradient"],
                eps_frac)
    return ("v^ collapsed (gradients became much smaller at once)",
            ["lower the learning rate; clip gradients"], eps_frac)


def _step_size_jump(data: RunData, signals: list[Signal]) -> Finding | None:
    """Abrupt rises of lr / (sqrt(v^) + eps), which moves slowly in a healthy run."""
    hits = [s for s in signals if s.channel == ADAM_EFF_LR]
    if not hits:
        return None
    first = min(hits, key=lambda s: s.step)
    at_first = [s for s in hits if s.step == first.step]
    worst = max(at_first, key=lambda s: s.value)
    why, remedies, eps_frac = _step_size_cause(data, first.step, at_first)
    return Finding(
        kind="adam_step_size_jump", severity="warning", first_step=first.step,
        last_step=max(s.step for s in hits),
        summary=(f"step {first.step:,}: Adam's effective step size rose {worst.value:.3g}x at "
                 f"once in {worst.where}"
                 + (f" and {len(at_first) - 1} more layer(s)" if len(at_first) > 1 else "")
                 + f"; {why}"),
        evidence={"layers": sorted({s.where for s in hits}), "occurrences": len(hits),
                  "factor": worst.value, "threshold_factor": EFF_LR_FACTOR,
                  "threshold_z": EFF_LR_Z, "eps_dominated_fraction": eps_frac},
        cause=("lr / (sqrt(v^) + eps) moves slowly in a healthy run (v^ averages over ~1000 "
               "steps); " + why),
        remedies=remedies, detector=NAME)


def detect(data: RunData) -> tuple[list[Finding], list[Signal]]:
    if data.matrix("layer", ADAM_UPDATE_RMS).empty and data.matrix("layer",
                                                                      UPDATE_RATIO).empty:
        raise Skip("no Adam statistics recorded (probes.preset 'standard' or 'full' with Adam)")
    signals = (_spikes(data, ADAM_RMS_T, RMS_T_SPIKE)
               + _spikes(data, ADAM_UPDATE_RMS, UPDATE_RMS_SPIKE)
               + _spikes(data, UPDATE_RATIO, RATIO_SPIKE, jump=RATIO_JUMP)
               + _rises(data, ADAM_EFF_LR, EFF_LR_FACTOR, EFF_LR_Z))
    found = [_eps_dominated(data), _update_rms_high(data), _rms_t_high(data),
             _oversized_update(data, signals), _step_size_jump(data, signals)]
    return [f for f in found if f is not None], signals
