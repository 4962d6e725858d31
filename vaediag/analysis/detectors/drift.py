"""Generation drift: decode(0) or decode(fixed z) changing sharply between evaluations.

Statistic: each evaluation's drift (RMSE since the previous evaluation) against the median of
the ``WINDOW`` previous ones: a drift at least ``FACTOR`` times that median and above
``MIN_RMSE`` is sharp. Drift shrinks as training settles, so a late jump stands out; early
evaluations (within the burn-in) are ignored.

Severity from harm: ``warning`` when the grid's loss or an image-quality metric got worse
across the same two evaluations (:func:`~vaediag.analysis.causes.quality_lost`); a decoder that
moves fast while its reconstructions get better is learning (``info``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vaediag.analysis.causes import quality_lost
from vaediag.analysis.data import RunData, Skip
from vaediag.analysis.findings import Finding, Signal
from vaediag.analysis.kinds import Kind
from vaediag.columns import DRIFT_FIXED_RMSE, DRIFT_ZERO_RMSE, STEP

NAME = "drift"
#: its place among the detectors: they run, and are listed, in this order
ORDER = 100
#: the kinds of finding this detector emits (see :mod:`vaediag.analysis.kinds`)
KINDS = (
    Kind("generation_drift", "grids", instability=11, stage="evaluation", harm=True),
)
#: evaluations whose changes give the usual change
WINDOW = 5
#: a decode of fixed inputs changing this many times its usual change is drift
FACTOR = 3.0
MIN_RMSE = 0.04  # about 10 grey levels of 255 over the whole image: visible


def detect(data: RunData) -> tuple[list[Finding], list[Signal]]:
    cols = [c for c in (DRIFT_FIXED_RMSE, DRIFT_ZERO_RMSE) if data.has(c, "evals")]
    if not cols:
        raise Skip("no generation drift recorded (evaluation probes off)")
    steps = data.evals[STEP].to_numpy()
    findings, signals = [], []
    for col in cols:
        x = data.series(col, "evals")
        prior = pd.Series(x).rolling(WINDOW, min_periods=3).median().shift(1).to_numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            sharp = (x >= FACTOR * prior) & (x >= MIN_RMSE) & (steps >= data.burn_in_step)
            ratio = np.where(sharp, x / prior, np.nan)
        which = "decode(fixed z)" if "fixed" in col else "decode(0)"
        for k in np.flatnonzero(sharp):
            signals.append(Signal(int(steps[k]), col, "", float(x[k]), float(prior[k]),
                                  f"{which} changed {x[k] / prior[k]:.3g}x more than usual"))
        if sharp.any():
            harmful = [k for k in np.flatnonzero(sharp)
                       if quality_lost(data, int(steps[k - 1]), int(steps[k]))]
            i = int(harmful[0]) if harmful else int(np.flatnonzero(sharp)[0])
            lost = quality_lost(data, int(steps[i - 1]), int(steps[i]))
            worst = int(np.nanargmax(ratio))
            findings.append(Finding(
                kind="generation_drift", severity="warning" if lost else "info",
                first_step=int(steps[i - 1]),
                last_step=int(steps[i]),
                summary=(f"{which} changed sharply between the evaluations at steps "
                         f"{int(steps[i - 1]):,} and {int(steps[i]):,} (RMSE {x[i]:.3g}, "
                         f"{x[i] / prior[i]:.3g}x the usual change)"
                         + ("; the pictures got worse: " + "; ".join(
                             f"{k} {a:.3g} -> {b:.3g}" for k, (a, b) in list(lost.items())[:3])
                            if lost else "; the reconstructions did not get worse")),
                evidence={"column": col, "rmse": float(x[i]), "usual": float(prior[i]),
                          "occurrences": int(sharp.sum()), "worst_at": int(steps[worst]),
                          "factor": FACTOR, "quality_lost": lost},
                cause="the decoder moved much more than in the evaluations before: a large "
                      "update, a loss spike, or a change of regime",
                remedies=["look at the signals around these steps; lower the learning rate"],
                detector=NAME, compare_steps=[int(steps[i - 1]), int(steps[i])]))
    return findings, signals
