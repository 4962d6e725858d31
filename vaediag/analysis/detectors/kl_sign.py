"""A KL with the wrong sign: negative on nearly every step.

An analytic KL divergence is never negative, and a single-sample Monte Carlo estimate averaged
over a batch is negative only while the true KL is near zero (then on about half the steps). A
KL negative on at least ``MIN_SHARE`` of the steps, with a negative median, is a sign
convention: ``0.5 * sum(1 + logvar - mu^2 - exp(logvar))`` written without its minus (as some
widely copied VAE code logs it). Every analysis of the KL then reads it backwards.

Whether the *loss* has it backwards too is read off the recorded total when there is one: a
total equal to ``recon + beta * kl`` with that negative ``kl`` subtracts the true KL, so
training maximises it (``high``); a total of ``recon - beta * kl`` minimises the true KL and
only the logged value is negated (``warning``).
"""

from __future__ import annotations

import numpy as np

from vaediag.analysis.data import RunData, Skip
from vaediag.analysis.findings import Finding, Signal
from vaediag.analysis.kinds import Kind
from vaediag.columns import BETA, KL, RECON, TOTAL

NAME = "kl_sign"
#: its place among the detectors: they run, and are listed, in this order
ORDER = 15
#: the kinds of finding this detector emits (see :mod:`vaediag.analysis.kinds`)
KINDS = (
    Kind("negative_kl", "timelines"),
)
#: share of the steps with a finite KL on which it is negative: a sign convention, not noise
MIN_SHARE = 0.9
#: relative tolerance when the recorded total is compared with recon +/- beta * kl
TOTAL_RTOL = 1e-3


def _loss_adds_it(data: RunData, kl: np.ndarray) -> bool | None:
    """Whether the recorded total is ``recon + beta * kl`` (True) or ``recon - beta * kl``
    (False) with the negative kl as recorded; None when no total says."""
    if not (data.has(TOTAL) and data.has(RECON)):
        return None
    beta = data.series(BETA) if data.has(BETA) else np.ones_like(kl)
    recon, total = data.series(RECON), data.series(TOTAL)
    ok = np.isfinite(recon) & np.isfinite(total) & np.isfinite(kl) & np.isfinite(beta) \
        & (np.abs(beta * kl) > TOTAL_RTOL * np.abs(total))
    if not ok.any():
        return None
    tol = TOTAL_RTOL * np.abs(total[ok])
    plus = np.abs(total[ok] - (recon[ok] + beta[ok] * kl[ok])) <= tol
    minus = np.abs(total[ok] - (recon[ok] - beta[ok] * kl[ok])) <= tol
    if plus.mean() >= MIN_SHARE:
        return True
    if minus.mean() >= MIN_SHARE:
        return False
    return None


def detect(data: RunData) -> tuple[list[Finding], list[Signal]]:
    if not data.has(KL):
        raise Skip("no KL recorded")
    kl = data.series(KL)
    finite = np.isfinite(kl)
    if not finite.any():
        return [], []
    negative = finite & (kl < 0)
    share = float(negative.sum() / finite.sum())
    median = float(np.median(kl[finite]))
    if share < MIN_SHARE or median >= 0:
        return [], []
    first = int(data.steps[np.flatnonzero(negative)[0]])
    last = int(data.steps[np.flatnonzero(finite)[-1]])
    adds = _loss_adds_it(data, kl)
    if adds:
        cause = ("the KL has the wrong sign, and the loss adds it so: the recorded total is "
                 "recon + beta * kl with this negative kl, so training subtracts the true KL "
                 "and maximises it (the posterior is pushed away from the prior)")
    else:
        cause = ("the KL is computed or logged with the wrong sign (0.5 * sum(1 + logvar - "
                 "mu^2 - exp(logvar)) without its minus): an analytic KL is never negative"
                 + ("; the recorded total subtracts it, so the loss itself minimises the true "
                    "KL and only the logged value is negated" if adds is False else ""))
    remedies = ["compute the KL as 0.5 * sum(mu^2 + exp(logvar) - 1 - logvar) (or -0.5 * "
                "sum(1 + logvar - mu^2 - exp(logvar))) and add beta * KL to the loss",
                "if only the logged value is negated, log (and pass to the Monitor) the KL "
                "itself, kl= the non-negative divergence: every KL analysis reads its sign"]
    finding = Finding(
        kind="negative_kl", severity="high" if adds else "warning", first_step=first,
        last_step=last,
        summary=(f"the KL is negative on {share:.0%} of steps (median {median:.4g}): it has "
                 f"the wrong sign" + (", and the loss maximises the true KL" if adds else "")),
        evidence={"negative_share": round(share, 4), "median_kl": median,
                  "loss_adds_negative_kl": adds},
        cause=cause, remedies=remedies, detector=NAME)
    return [finding], [Signal(first, KL, "", float(kl[np.flatnonzero(negative)[0]]), 0.0,
                              "the KL is negative")]
