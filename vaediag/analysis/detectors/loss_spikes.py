"""Loss spikes in the reconstruction term, the KL term and the total, with their recovery.

Statistic: robust z-score of each step's log loss against the median and MAD of the ``WINDOW``
steps before it (:func:`~vaediag.analysis.stats.trailing_robust_z`). A spike is a run of steps
with z >= ``Z_SPIKE`` after the burn-in; it has recovered at the first step after its peak that
is back within 2 robust standard deviations of the level before it; a KL that then sits far
*below* its level (a quarter or less) has collapsed, not recovered. Spikes in several terms
within a few steps are one finding.

Severity comes from harm, not from the size of one term: the *excess* of the objective (the
recorded ``total``, else recon + beta * KL) above its level before the spike plus 2 robust
standard deviations, relative to that level, summed from the onset until the objective is back
under it: how many steps' worth of loss the spike cost. Below ``HARM_WARNING`` (one step's
worth) it is ``info``: a blip, or a KL that rose while the reconstruction fell by as much (a
trade, e.g. the KL leaving ~0 at the start of training). From ``HARM_HIGH``, or when the
objective never came back, ``high``.

Cause, from what the run recorded: a jump of the learning rate, the KL weight or Adam's eps
within ``LOOKBACK`` steps before; else a gradient norm far above its usual in those steps; else
nothing before it moved: the batch of that step.

A term that is not always positive (a Gaussian negative log-likelihood can be below zero) is
scored on its raw values, and its spikes are described by how much they rose, not by a ratio.
"""

from __future__ import annotations

import math

import numpy as np

from vaediag.analysis.causes import SETTING_NAMES, first_change, knob, undo_remedy
from vaediag.analysis.data import RunData, Skip
from vaediag.analysis.findings import Finding, Signal
from vaediag.analysis.kinds import Kind
from vaediag.analysis.stats import MAD_TO_SIGMA, episodes, to_log, trailing_robust_z
from vaediag.columns import BETA, EPS, GRAD_NORM, KL, LOSS_TERMS, LR, RECON, TOTAL

NAME = "loss_spikes"
#: its place among the detectors: they run, and are listed, in this order
ORDER = 20
#: the kinds of finding this detector emits (see :mod:`vaediag.analysis.kinds`)
KINDS = (
    Kind("loss_spike", "timelines", instability=3,
         own_channels=frozenset(LOSS_TERMS), harm=True, aftermath=True),
)
#: steps before each step whose median and MAD score its log loss
WINDOW = 100
#: robust z of a step's log loss at which it is a spike
Z_SPIKE = 6.0
#: steps' worth of loss a spike must cost to be a warning (below: info)
HARM_WARNING = 1.0
#: steps' worth of loss from which a spike is high
HARM_HIGH = 10.0
#: steps after the peak searched for the recovery
RECOVERY_LIMIT = 500
#: a KL back at 1/this of its level or lower collapsed rather than recovered
COLLAPSE_FACTOR = 4.0
#: steps before the onset searched for a cause (a setting change, a gradient jump)
LOOKBACK = 50
#: a gradient norm this many times its usual level before a spike is its cause
GRAD_JUMP = 5.0
#: spikes reported at most, the costliest first
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
        collapsed = None
        if recovered is not None and term == KL and logged:
            k = peak + 1 + back[0]
            settled = np.nanmedian(x[k:k + 20])
            if settled < base - math.log(COLLAPSE_FACTOR):
                recovered, collapsed = None, float(math.exp(settled))
        ratio = math.exp(x[peak] - base) if logged else None
        out.append({
            "term": term, "onset": int(steps[start]), "peak": int(steps[peak]),
            "end": int(steps[end]), "peak_value": float(x_raw[peak]),
            "baseline": float(math.exp(base) if logged else base),
            "ratio": None if ratio is None else float(ratio),
            "z": float(rz.z[peak]), "recovered_at": recovered,
            "recovery_steps": None if recovered is None else recovered - int(steps[start]),
            "collapsed_to": collapsed,
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
    if not data.has(GRAD_NORM):
        return None
    steps = data.steps
    g = data.series(GRAD_NORM)
    ok = (steps >= data.burn_in_step) & (steps < before_step) & np.isfinite(g)
    return float(np.percentile(g[ok], 99)) if ok.sum() >= 20 else None


def objective(data: RunData) -> np.ndarray:
    """The loss that is minimised: the recorded ``total``, else recon + beta * KL."""
    if data.has(TOTAL):
        return data.series(TOTAL)
    value = data.series(RECON)
    if data.has(KL):
        beta = data.series(BETA) if data.has(BETA) else 1.0
        value = value + np.nan_to_num(beta, nan=1.0) * data.series(KL)
    return value


def harm(data: RunData, total: np.ndarray, onset: int, end: int) -> tuple[float, bool]:
    """(Steps' worth of excess objective from ``onset`` until the objective is back, whether
    it was still not back at ``end``.) The excess is what lies above the trailing median plus
    2 robust standard deviations of the ``WINDOW`` steps before, relative to that median."""
    steps = data.steps
    i, j = np.searchsorted(steps, [onset, end + 1])
    past = total[max(0, i - WINDOW):i]
    past = past[np.isfinite(past)]
    if past.size < 10:
        return 0.0, False
    base = float(np.median(past))
    band = 2 * MAD_TO_SIGMA * float(np.median(np.abs(past - base)))
    size = max(abs(base), band, 1e-12)
    span = total[i:j]
    excess = (span[np.isfinite(span)] - base - band) / size
    back = np.flatnonzero(excess <= 0)  # the objective's own excursion ends where it is back
    if back.size:
        return float(excess[:back[0]].sum()), False
    return float(excess.sum()), True


def _cause(data: RunData, onset: int, clip: float | None) -> tuple[str, list[str], dict]:
    """What the recorded columns say came before a spike, and what to do about it."""
    # The loss at step s is computed before update s: a learning rate or eps (or a gradient)
    # of step s cannot have caused it; a KL weight of step s weighs it directly.
    change = first_change(data, (LR, EPS), onset - LOOKBACK, onset - 1) \
        or first_change(data, (BETA,), onset - LOOKBACK, onset)
    if change is not None and (change.rose or change.column == EPS):
        return (f"{change.describe()}, just before the spike: {SETTING_NAMES[change.column]} "
                f"changed, and the loss followed", [undo_remedy(data, change)],
                {"setting_change": change.__dict__})
    clip_text = ([f"clip gradients at {clip:.3g} (the 99th percentile of the gradient norm "
                  f"before the spike){knob(data, 'optim.grad_clip', f'{clip:.3g}')}"]
                 if clip else [])
    if data.has(GRAD_NORM):
        g, steps = data.series(GRAD_NORM), data.steps
        i, j = np.searchsorted(steps, [onset - LOOKBACK, onset])
        history = g[max(0, i - WINDOW):i]
        history = history[np.isfinite(history)]
        if history.size >= 10:
            usual = float(np.median(history))
            window = g[i:j]
            k = int(np.nanargmax(window)) if np.isfinite(window).any() else -1
            if k >= 0 and usual > 0 and window[k] >= GRAD_JUMP * usual:
                at = int(steps[i + k])
                return (f"the gradient norm jumped {window[k] / usual:.3g}x its usual "
                        f"({usual:.3g} -> {window[k]:.3g}) at step {at:,}: an oversized gradient "
                        f"made an oversized update",
                        [*clip_text, "find what made that gradient (the batch, a loss term); "
                         "lower the learning rate" + knob(data, "optim.lr")],
                        {"gradient_jump": {"step": at, "factor": window[k] / usual}})
    return (f"nothing recorded moved before it (no change of learning rate, KL weight or eps, "
            f"no unusual gradient): the loss of the batch at step {onset:,} itself rose, so "
            f"that batch (out-of-distribution, corrupted or unlike the rest) is the likely "
            f"cause", ["look at the data of that step; drop or repair such batches",
                       *clip_text], {})


def _steps(count: float) -> str:
    """'0.32', '41', '167,000': a count of steps as people write it (never 1.67e+05)."""
    return f"{count:.2g}" if count < 10 else f"{float(f'{count:.3g}'):,.0f}"


def _events(spikes: list[dict]) -> list[list[dict]]:
    """Spikes of different terms within 5 steps of one another are one event."""
    groups: list[list[dict]] = []
    for s in spikes:
        if groups and s["onset"] - max(g["end"] for g in groups[-1]) <= 5:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def _graded(data: RunData, groups: list[list[dict]]) -> list[tuple[float, bool, list[dict]]]:
    """Each event with what it cost (steps' worth of the objective) and whether the objective
    stayed worse, the most costly first."""
    total = objective(data)
    last_step = int(data.steps[-1])
    graded = []
    for group in groups:
        onset = min(s["onset"] for s in group)
        ends = [s["recovered_at"] if s["recovered_at"] is not None
                else min(last_step, s["onset"] + RECOVERY_LIMIT) for s in group]
        cost, still_worse = harm(data, total, onset, max(ends))
        graded.append((cost, still_worse, group))
    graded.sort(key=lambda g: -g[0])
    return graded


def _summary(group: list[dict], main: dict, onset: int, cost: float) -> str:
    names = "/".join(sorted({s["term"] for s in group}))
    if main["collapsed_to"] is not None:
        recovery = f"then collapsed to {main['collapsed_to']:.3g}"
    elif main["recovered_at"] is None:
        recovery = "did not recover"
    else:
        recovery = f"recovered in {main['recovery_steps']:,} steps"
    return (f"{names} spike at step {onset:,}: {main['term']} rose {_rise(main)} "
            f"({main['baseline']:.4g} -> {main['peak_value']:.4g}) and {recovery}; it cost "
            f"{_steps(cost)} steps' worth of loss")


def _finding(data: RunData, cost: float, still_worse: bool, group: list[dict]) -> Finding:
    """One event: severity from what it cost, its cause and remedies."""
    main = max((s for s in group if s["term"] != TOTAL), key=_size, default=group[0])
    onset = min(s["onset"] for s in group)
    recovered = main["recovered_at"] is not None and main["recovery_steps"] <= RECOVERY_LIMIT
    if cost < HARM_WARNING:
        severity = "info"
    elif cost >= HARM_HIGH or (still_worse and not recovered):
        severity = "high"
    else:
        severity = "warning"
    clip = clip_suggestion(data, onset)
    cause, remedies, context = _cause(data, onset, clip)
    if cost < HARM_WARNING:
        cause = ("the objective (the loss minimised) barely moved: a short blip, or a rise of "
                 "one term paid for by the other (the KL leaving ~0 while the reconstruction "
                 "improves): not an instability")
        remedies = []
    if main["term"] == KL and main["collapsed_to"] is not None:
        remedies = ["free bits, so the KL cannot be pushed to 0 (e.g. 0.5 nats per "
                    "dimension)" + knob(data, "loss.free_bits", 0.5), *remedies]
    elif main["term"] == KL and cost >= HARM_WARNING:
        remedies.append("clamp the log-variance" + knob(data, "loss.logvar_clamp",
                                                        "[-30.0,20.0]"))
    return Finding(
        kind="loss_spike", severity=severity, first_step=onset,
        last_step=max(s["end"] if s["recovered_at"] is None else s["recovered_at"]
                      for s in group),
        summary=_summary(group, main, onset, cost),
        evidence={"spikes": group, "main_term": main["term"], "recovered": recovered,
                  "harm_steps": cost, "objective_still_worse": still_worse,
                  "threshold_z": Z_SPIKE, "window": WINDOW,
                  "harm_thresholds": [HARM_WARNING, HARM_HIGH], "suggested_clip": clip,
                  **context},
        cause=cause, remedies=remedies, detector=NAME)


def detect(data: RunData) -> tuple[list[Finding], list[Signal]]:
    terms = [t for t in LOSS_TERMS if data.has(t)]
    if not terms:
        raise Skip("no loss terms recorded")
    if data.n_steps < data.burn_in_step - int(data.steps[0]) + 20:
        raise Skip(f"too short: spikes are looked for after the first "
                   f"{data.burn_in_step - int(data.steps[0])} steps")
    spikes = sorted((s for t in terms for s in term_spikes(data, t)), key=lambda s: s["onset"])
    signals = [Signal(s["onset"], s["term"], "", s["peak_value"], s["baseline"],
                      f"{s['term']} rose {_rise(s)} (robust z {s['z']:.0f})")
               for s in spikes]
    groups = _events(spikes)
    findings = [_finding(data, *graded) for graded in _graded(data, groups)[:MAX_FINDINGS]]
    if len(groups) > MAX_FINDINGS:
        findings[-1].evidence["more_spikes_not_listed"] = len(groups) - MAX_FINDINGS
    return findings, signals
