"""KL explosion: a sustained upward level shift of the KL after a stable phase.

Statistic: change points of the log KL after the burn-in (PELT with an l2 cost on a series
decimated to at most 2,000 block medians; the penalty is BIC-like, scaled by the series' own
step-to-step noise) propose where a shift may start. A shift may take up to ``RAMP`` steps to
reach its new level (the model adapts), so each proposed step ``t`` is judged on medians, not on
its neighbouring segments: the level of the ``MIN_STABLE`` steps before ``t`` (which drifted by
less than half the jump over them) against that of the ``MIN_PERSIST`` steps after ``t + RAMP``.
An explosion is a jump of at least log(``MIN_FACTOR``), to at least ``KL_FLOOR`` nats, that then
holds for at least ``MIN_PERSIST`` steps (a spike that comes back is the loss-spike detector's);
its onset is the best single split of that stretch into the two levels.

Severity: ``high`` from a factor of ``HIGH_FACTOR``, else ``warning``.

Cause, from the recorded columns: a fall of the KL weight (``beta``) within ``LOOKBACK`` steps
before the shift makes the KL cheaper, and the model spends more of it (a change of the
objective, not an instability); a jump of the learning rate; else what preceded it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vaediag.analysis.causes import first_change, knob
from vaediag.analysis.data import RunData, Skip
from vaediag.analysis.findings import Finding, Signal
from vaediag.analysis.kinds import Kind
from vaediag.analysis.stats import best_split, change_points, to_log
from vaediag.columns import BETA, KL, LR, TOTAL

NAME = "kl_explosion"
#: its place among the detectors: they run, and are listed, in this order
ORDER = 30
#: the kinds of finding this detector emits (see :mod:`vaediag.analysis.kinds`)
KINDS = (
    Kind("kl_explosion", "timelines", instability=2,
         own_channels=frozenset({"kl_level", KL, TOTAL}), harm=True),
)
#: rise of the KL's level (after / before) that is an explosion
MIN_FACTOR = 2.0
#: rise from which an explosion is high
HIGH_FACTOR = 5.0
#: steps the new level must last
MIN_PERSIST = 100
#: steps the level before must have lasted
MIN_STABLE = 200
#: steps before the shift searched for a fall of the KL weight or a learning-rate jump
LOOKBACK = 100
KL_FLOOR = 0.1  # nats: a collapsed KL moving between thousandths of a nat is not a shift
RAMP = 50  # steps a shift may take to reach its new level (the model adapts over a few steps)


@dataclass
class Shift:
    """A level shift of log KL: where it began and ended, the level before and the jump."""

    at: int  # the onset step
    end: int  # index (into the kept steps) one past the last step at the new level
    before_log: float
    after_log: float
    stable_len: int
    persist: int
    settled: int  # index where the new level is measured from (onset + RAMP)


def detect(data: RunData) -> tuple[list[Finding], list[Signal]]:
    """Change points of log KL (candidates), each judged as a shift (onset, stability,
    persistence), explained by what changed before it, and reported."""
    s, x = _log_kl(data)
    segments = change_points(x)
    findings, signals = [], []
    last_at = -math.inf
    for k in range(1, len(segments)):
        shift = _shift(s, x, segments, k, last_at)
        if shift is None:
            continue
        last_at = shift.at
        findings.append(_finding(data, s, x, shift))
        factor = math.exp(shift.after_log - shift.before_log)
        signals.append(Signal(shift.at, "kl_level", "", math.exp(shift.after_log),
                              math.exp(shift.before_log), f"KL level shift {factor:.3g}x"))
    return findings, signals


def _log_kl(data: RunData) -> tuple[np.ndarray, np.ndarray]:
    """(steps, log KL) after the burn-in; non-finite values are the nonfinite detector's."""
    data.require(KL)
    steps = data.steps
    keep = steps >= data.burn_in_step
    if keep.sum() < MIN_STABLE + MIN_PERSIST:
        raise Skip(f"too short: needs {MIN_STABLE + MIN_PERSIST} steps after the burn-in")
    kl = data.series(KL)[keep]
    x, logged = to_log(np.where((kl > 0) & np.isfinite(kl), kl, np.nan))
    if not logged:
        raise Skip("the KL is never positive")
    return steps[keep], x


def _shift(s: np.ndarray, x: np.ndarray, segments: list, k: int,
           last_at: float) -> Shift | None:
    """The change point starting segment ``k`` as a shift, or None: a jump of at least
    ``MIN_FACTOR`` from a level that held ``MIN_STABLE`` steps without drifting, placed on the
    full series, that lasted ``MIN_PERSIST`` steps."""
    b = segments[k].start
    at = int(s[b])
    if at - last_at < RAMP or at - MIN_STABLE < s[0] or at + RAMP + MIN_PERSIST > s[-1] + 1:
        return None  # inside a shift already found, or too near either end to judge
    lo, r0, r1 = np.searchsorted(s, [at - MIN_STABLE, at + RAMP, at + RAMP + MIN_PERSIST])
    left, right = x[lo:b], x[r0:r1]
    if np.isfinite(left).sum() < MIN_STABLE // 2 or np.isfinite(right).sum() < MIN_PERSIST // 2:
        return None  # mostly non-finite or missing: nothing to judge a level on
    before_log, after_log = float(np.nanmedian(left)), float(np.nanmedian(right))
    jump = after_log - before_log
    t = s[lo:b] - s[lo]
    ok = np.isfinite(left)
    drift = abs(float(np.polyfit(t[ok], left[ok], 1)[0])) * MIN_STABLE if ok.sum() > 2 \
        else math.inf
    if jump < math.log(MIN_FACTOR) or drift > jump / 2 or math.exp(after_log) < KL_FLOOR:
        return None
    # the onset: the best single split of the stretch into the two levels
    filled = pd.Series(x[lo:r1]).ffill().bfill().to_numpy()
    b = lo + best_split(filled, 0, len(filled), 1, len(filled) - 1)
    at = int(s[b])
    if at - last_at < RAMP:
        return None
    # how long it was stable before (segments within half the jump of the level before)
    first = next(i for i, g in enumerate(segments) if g.end > b)
    while first > 0 and abs(segments[first - 1].mean - before_log) < jump / 2:
        first -= 1
    stable_len = at - int(s[segments[first].start])
    # how long the new level held: until the KL fell back below halfway
    fell = np.flatnonzero(pd.Series(x[r0:]).rolling(MIN_PERSIST // 2, min_periods=1)
                          .median().to_numpy() < before_log + jump / 2)
    end = r0 + int(fell[0]) if fell.size else len(s)
    persist = int(s[end - 1]) - at
    if stable_len < MIN_STABLE // 2 or persist < MIN_PERSIST:
        return None
    return Shift(at, end, before_log, after_log, stable_len, persist, int(r0))


def _explanation(data: RunData, change) -> tuple[str, str, list[str], bool]:
    """(what, cause, remedies, whether the objective changed), from the KL weight or learning
    rate change recorded just before the shift (``change``, or None)."""
    if change is not None and change.column == BETA and not change.rose:
        return ("KL level shift",
                f"{change.describe()}: the KL became cheaper and the model spends more of it. "
                f"A change of the objective, not an instability",
                [f"if the KL weight was meant to stay, keep it at {change.before:.3g}"
                 f"{knob(data, 'loss.beta', change.before)}; otherwise this is the expected "
                 f"response to the new weight"], True)
    if change is not None and change.column == LR and change.rose:
        return ("KL exploded",
                f"{change.describe()}, just before: the larger steps moved the posterior",
                ["keep the learning rate where it was, or warm it up" + knob(data, "optim.lr"),
                 "clamp the log-variance" + knob(data, "loss.logvar_clamp", "[-30.0,20.0]")],
                False)
    return ("KL exploded",
            "the KL term left its stable level for good with no change of KL weight or "
            "learning rate recorded; see what preceded it (Adam signals, gradients) and "
            "whether the decoder scale fell at the same time",
            ["lower the learning rate from here or add a decay"
             + knob(data, "optim.schedule", "cosine"),
             "clamp the log-variance" + knob(data, "loss.logvar_clamp", "[-30.0,20.0]"),
             "raise Adam's eps (e.g. 1e-6) if Adam signals preceded it"
             + knob(data, "optim.eps", "1e-6"),
             "with a learned decoder scale: fix it or bound it from below"], False)


def _finding(data: RunData, s: np.ndarray, x: np.ndarray, shift: Shift) -> Finding:
    """The finding: high from ``HIGH_FACTOR``, a warning when the KL weight fell before it."""
    factor = math.exp(shift.after_log - shift.before_log)
    before, after = math.exp(shift.before_log), math.exp(shift.after_log)
    tail = x[shift.settled:shift.end]
    ok = np.isfinite(tail)
    rising = ok.sum() > 2 and float(np.polyfit(np.arange(len(tail))[ok], tail[ok], 1)[0]) \
        * len(tail) > math.log(1.5)
    change = first_change(data, (BETA, LR), shift.at - LOOKBACK, shift.at + 5)
    what, cause, remedies, objective = _explanation(data, change)
    severity = "warning" if objective or factor < HIGH_FACTOR else "high"
    return Finding(
        kind="kl_explosion", severity=severity,
        first_step=shift.at, last_step=int(s[shift.end - 1]),
        summary=(f"{what} at step {shift.at:,}: {before:.4g} -> {after:.4g} ({factor:.3g}x) "
                 f"after {shift.stable_len:,} stable steps"
                 + ("; still rising" if rising else "")),
        evidence={"kl_before": before, "kl_after": after, "factor": factor,
                  "stable_steps": shift.stable_len, "persisted_steps": shift.persist,
                  "still_rising": rising, "min_factor": MIN_FACTOR,
                  "setting_change": change.__dict__ if change else None},
        cause=cause, remedies=remedies, detector=NAME)
