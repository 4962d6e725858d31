"""KL explosion: a sustained upward level shift of the KL after a stable phase.

Statistic: change points of the log KL after the burn-in (PELT with an l2 cost on a series
decimated to at most 2,000 block medians; the penalty is BIC-like, scaled by the series' own
step-to-step noise). An explosion is a change point where the mean log KL jumps up by at least
log(``MIN_FACTOR``) into a segment that lasts at least ``MIN_PERSIST`` steps (a spike that comes
back is the loss-spike detector's), coming from a segment that was stable: at least
``MIN_STABLE`` steps long and drifting by less than half the jump over its length.

Severity: ``high`` from a factor of ``HIGH_FACTOR``, else ``warning``.

Cause, from the recorded columns: a fall of the KL weight (``beta``) within ``LOOKBACK`` steps
before the shift makes the KL cheaper, and the model spends more of it (a change of the
objective, not an instability); a jump of the learning rate; else what preceded it.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from vaediag.analysis.causes import first_change, knob
from vaediag.analysis.data import RunData, Skip
from vaediag.analysis.findings import Finding, Signal
from vaediag.analysis.stats import change_points, to_log

NAME = "kl_explosion"
MIN_FACTOR = 2.0
HIGH_FACTOR = 5.0
MIN_PERSIST = 100
MIN_STABLE = 200
LOOKBACK = 100


def detect(data: RunData) -> tuple[list[Finding], list[Signal]]:
    data.require("kl")
    steps = data.steps
    keep = steps >= data.burn_in_step
    if keep.sum() < MIN_STABLE + MIN_PERSIST:
        raise Skip(f"too short: needs {MIN_STABLE + MIN_PERSIST} steps after the burn-in")
    kl = data.series("kl")[keep]
    x, logged = to_log(np.where(kl > 0, kl, np.nan))
    if not logged:
        raise Skip("the KL is never positive")
    s = steps[keep]
    segments = change_points(x)
    findings, signals = [], []
    for left, right in itertools.pairwise(segments):
        jump = right.mean - left.mean
        stable_len = int(s[left.end - 1] - s[left.start])
        persist = int(s[right.end - 1] - s[right.start])
        drift = abs(left.slope) * (left.end - left.start)
        if (jump < math.log(MIN_FACTOR) or stable_len < MIN_STABLE or persist < MIN_PERSIST
                or drift > jump / 2):
            continue
        factor = math.exp(jump)
        at = int(s[right.start])
        before, after = math.exp(left.mean), math.exp(right.mean)
        rising = right.slope * (right.end - right.start) > math.log(1.5)
        change = first_change(data, ("beta", "lr"), at - LOOKBACK, at + 5)
        severity = "high" if factor >= HIGH_FACTOR else "warning"
        if change is not None and change.column == "beta" and not change.rose:
            what = "KL level shift"
            cause = (f"{change.describe()}: the KL became cheaper and the model spends more of "
                     f"it. A change of the objective, not an instability")
            remedies = [f"if the KL weight was meant to stay, keep it at {change.before:.3g}"
                        f"{knob(data, 'loss.beta', change.before)}; otherwise this is the "
                        f"expected response to the new weight"]
            severity = "warning"
        elif change is not None and change.column == "lr" and change.rose:
            what = "KL exploded"
            cause = f"{change.describe()}, just before: the larger steps moved the posterior"
            remedies = ["keep the learning rate where it was, or warm it up"
                        + knob(data, "optim.lr"),
                        "clamp the log-variance" + knob(data, "loss.logvar_clamp",
                                                        "[-30.0,20.0]")]
        else:
            what = "KL exploded"
            cause = ("the KL term left its stable level for good with no change of KL weight "
                     "or learning rate recorded; see what preceded it (Adam signals, "
                     "gradients) and whether the decoder scale fell at the same time")
            remedies = ["lower the learning rate from here or add a decay"
                        + knob(data, "optim.schedule", "cosine"),
                        "clamp the log-variance" + knob(data, "loss.logvar_clamp",
                                                        "[-30.0,20.0]"),
                        "raise Adam's eps (e.g. 1e-6) if Adam signals preceded it"
                        + knob(data, "optim.eps", "1e-6"),
                        "with a learned decoder scale: fix it or bound it from below"]
        summary = (f"{what} at step {at:,}: {before:.4g} -> {after:.4g} ({factor:.3g}x) "
                   f"after {stable_len:,} stable steps" + ("; still rising" if rising else ""))
        findings.append(Finding(
            kind="kl_explosion", severity=severity,
            first_step=at, last_step=int(s[right.end - 1]), summary=summary,
            evidence={"kl_before": before, "kl_after": after, "factor": factor,
                      "stable_steps": stable_len, "persisted_steps": persist,
                      "still_rising": rising, "min_factor": MIN_FACTOR,
                      "setting_change": change.__dict__ if change else None},
            cause=cause, remedies=remedies, detector=NAME))
        signals.append(Signal(at, "kl_level", "", after, before,
                              f"KL level shift {factor:.3g}x"))
    return findings, signals
