"""The generalisation gap: the model memorises its training images.

At every evaluation the grid's 8 held-out images and 8 fixed training images are scored alike
(``eval_recon`` and ``train_eval_recon``: the reconstruction loss under the model as it is).
Memorisation shows as the two parting: the held-out loss leaves its best level while the
training images' loss keeps falling.

Steps, each judged only on the evaluations up to the one after it (what is said about an
evaluation never changes with what the run does later):

1. **candidates**: evaluations j after the burn-in at which the held-out loss is at least
   ``Z_RISE`` of its noise units above its best so far (at evaluation b < j: it stopped
   improving, and its least-squares trend over the last ``TREND_EVALS`` evaluations up to the
   one after j no longer falls) and the gap between the held-out and the training images'
   losses is wider than at b by ``Z_GAP`` of its noise units, both at j and at the evaluation
   after it (sustained),
   while the training images' loss is at least ``Z_FALL`` of its noise units below its value
   at b. Noise units are the robust spread of each series' evaluation-to-evaluation changes
   (:func:`~vaediag.analysis.stats.expanding_noise_scale`), measured up to the evaluation
   after j.
2. **onset**: the first candidate; b is the evaluation to keep (early stopping).
3. **explanation**: harm to the held-out pictures (quality metrics worse at the last
   evaluation than at b by ``Z_HARM`` of their noise units, measured from b on), whether the
   training images kept those qualities, the KL of both sets, the training set's size and the
   epochs seen, and the amortisation gap (``amort_*`` columns): refining q(z|x) recovering
   most of the held-out rise says the *encoder* overfitted; little recovered says the
   *decoder* memorises.
4. **finding**: ``warning`` when the held-out pictures lost quality, else ``info`` (the loss
   parted but nothing visible was lost yet).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vaediag.analysis.causes import (
    TRAIN_LOSS,
    memorisation,
    memorisation_remedies,
    training_set,
)
from vaediag.analysis.data import RunData, Skip
from vaediag.analysis.findings import Finding, Signal
from vaediag.analysis.kinds import Kind
from vaediag.analysis.stats import badness, expanding_noise_scale, noise_scale
from vaediag.columns import EVAL_KL, EVAL_RECON, STEP, TRAIN_EVAL_KL

NAME = "generalisation"
#: its place among the detectors: they run, and are listed, in this order
ORDER = 70
#: the kinds of finding this detector emits (see :mod:`vaediag.analysis.kinds`)
KINDS = (
    Kind("overfitting", "quality", decoupling=True, stage="evaluation", harm=True),
)
#: the held-out loss above its best by this many noise units (it stopped improving) ...
Z_RISE = 1.0
#: ... and the gap between held-out and training images' losses wider than at that best by
#: this many of its noise units, both at two evaluations in a row ...
Z_GAP = 3.0
#: ... while its trend over this many evaluations (to the one after) no longer falls ...
TREND_EVALS = 5
#: ... while the training images' loss fell below its value at the best by this many units
Z_FALL = 2.0
#: a held-out quality metric worse than at the best by this many of its noise units (measured
#: from the best on) is harm: the finding is a warning
Z_HARM = 3.0
#: evaluations with training-image losses needed
MIN_EVALS = 6
#: refining q(z|x) recovers at least this share of the held-out negative ELBO's rise: the
#: encoder, not the decoder, is what overfitted
ENCODER_SHARE = 0.5


@dataclass
class Onset:
    best: int  # index of the evaluation with the best held-out loss before the parting
    at: int  # index of the first evaluation at which the parting is judged (sustained)


def _series(data: RunData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data.require(EVAL_RECON, table="evals")
    if not data.has(TRAIN_LOSS, "evals"):
        raise Skip("no training images were scored at evaluations (pass train_images= to the "
                   "Monitor): held-out cannot be compared with training images")
    steps = data.evals[STEP].to_numpy()
    held, train = data.series(EVAL_RECON, "evals"), data.series(TRAIN_LOSS, "evals")
    keep = (steps >= data.burn_in_step) & np.isfinite(held) & np.isfinite(train)
    if keep.sum() < MIN_EVALS:
        raise Skip(f"needs {MIN_EVALS} evaluations after the burn-in (step "
                   f"{data.burn_in_step:,}), has {int(keep.sum())}")
    return steps[keep], held[keep], train[keep]


def candidates(held: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flagged, best): per evaluation j, whether the two losses parted there (sustained at
    j + 1), and the index of the best held-out loss up to j."""
    n = len(held)
    best = np.array([int(np.argmin(held[:j + 1])) for j in range(n)])
    gap = held - train
    # causal noise units: a judgement at j reads the evaluations up to j + 1
    seen = np.minimum(np.arange(n) + 1, n - 1)
    unit_h = expanding_noise_scale(held, MIN_EVALS)[seen]
    unit_t = expanding_noise_scale(train, MIN_EVALS)[seen]
    unit_g = expanding_noise_scale(gap, MIN_EVALS)[seen]

    def both(x: np.ndarray, z: float, unit: np.ndarray) -> np.ndarray:
        """x above its value at the held-out best by z units, at j and at j + 1 (the last
        evaluation cannot be sustained yet)."""
        nxt = np.append(x[1:], -np.inf)
        return (x - x[best] >= z * unit) & (nxt - x[best] >= z * unit)

    with np.errstate(invalid="ignore"):
        risen = both(held, Z_RISE, unit_h) & (recent_slope(held) > 0)
        widened = both(gap, Z_GAP, unit_g)
        fell = train[best] - train >= Z_FALL * unit_t
    return risen & widened & fell & (best < np.arange(n)), best


def recent_slope(x: np.ndarray) -> np.ndarray:
    """Per evaluation j, the least-squares slope of x over the ``TREND_EVALS`` evaluations up
    to j + 1 (NaN where there are fewer): a loss still improving slowly under noise can sit a
    noise unit above its lowest value; its trend still falls."""
    n, w = len(x), TREND_EVALS
    out = np.full(n, np.nan)
    t = np.arange(w) - (w - 1) / 2
    for j in range(w - 2, n - 1):
        out[j] = float(t @ x[j + 2 - w:j + 2]) / float(t @ t)
    return out


def onset(held: np.ndarray, train: np.ndarray) -> Onset | None:
    flagged, best = candidates(held, train)
    if not flagged.any():
        return None
    at = int(np.flatnonzero(flagged)[0])
    return Onset(int(best[at]), at)


def harm(data: RunData, best: int, last: int) -> dict[str, tuple[float, float]]:
    """Held-out quality metrics worse at evaluation ``last`` than at ``best`` (the model to
    keep) by ``Z_HARM`` of their noise units, measured from ``best`` on (the phase the parting
    happens in, not the first steps' fast learning): {metric: (at best, at last)}."""
    steps = data.evals[STEP].to_numpy()
    span = (steps >= best) & (steps <= last)
    if span.sum() < 4:
        return {}
    out = {}
    for metric in data.judged_metrics():
        raw = data.series(metric, "evals")
        bad = badness(metric, raw)
        unit = noise_scale(bad[span])
        i, j = np.flatnonzero(steps == best)[0], np.flatnonzero(steps == last)[0]
        if unit > 0 and bad[j] - bad[i] >= Z_HARM * unit:
            out[metric] = (float(raw[i]), float(raw[j]))
    return out


def _at(data: RunData, column: str, step: int) -> float | None:
    if not data.has(column, "evals"):
        return None
    steps = data.evals[STEP].to_numpy()
    value = data.series(column, "evals")[steps == step]
    return float(value[0]) if value.size and np.isfinite(value[0]) else None


def amortisation(data: RunData, before: int, after: int) -> tuple[str, dict]:
    """Which part overfitted, from the amortisation gap recorded at the two evaluations:
    (a sentence, the numbers)."""
    known = {f"{prefix}{stat}_{when}": _at(data, f"{prefix}amort_{stat}", step)
             for prefix in ("", "train_") for stat in ("gap", "refined")
             for when, step in (("before", before), ("after", after))}
    if any(v is None for v in known.values()):
        return "", {}
    values: dict[str, Any] = dict(known)
    elbo_rise = (values["refined_after"] + values["gap_after"]) - \
        (values["refined_before"] + values["gap_before"])
    gap_growth = values["gap_after"] - values["gap_before"]
    values["heldout_elbo_rise"] = elbo_rise
    if elbo_rise <= 0:
        return ("the held-out negative ELBO did not rise (the KL fell as the reconstructions "
                "got worse), so the amortisation gap does not say which part overfitted"), values
    share = gap_growth / elbo_rise
    values["recovered_by_refining"] = share
    if share >= ENCODER_SHARE:
        recovered = "all" if share >= 1 else f"{share:.0%}"
        part = (f"refining q(z|x) for the held-out images recovers {recovered} of their rise "
                f"(gap {values['gap_before']:.3g} -> {values['gap_after']:.3g} nats, training "
                f"images {values['train_gap_before']:.3g} -> {values['train_gap_after']:.3g}): "
                f"the encoder has overfitted; the decoder can still draw them")
    else:
        part = (f"refining q(z|x) recovers only {max(share, 0):.0%} of the held-out images' "
                f"rise (their best negative ELBO {values['refined_before']:,.5g} -> "
                f"{values['refined_after']:,.5g}): the decoder memorises; no latent code makes "
                f"it draw faces it has not seen as well as before")
    values["overfitted"] = "encoder" if share >= ENCODER_SHARE else "decoder"
    return part, values


def explain(data: RunData, s: np.ndarray, held: np.ndarray, train: np.ndarray,
            found: Onset) -> tuple[str, dict, dict]:
    """(cause, evidence, quality lost by the held-out images) of a parting."""
    b, j = int(s[found.best]), int(s[found.at])
    # harm so far: by the last evaluation the analysis sees (what the user would keep is b)
    lost = harm(data, b, int(s[-1]))
    mem = memorisation(data, b, int(s[-1]), metrics=list(lost), parted=True)
    images, per_epoch = training_set(data)
    evidence: dict = {
        "best_step": b, "judged_at": j,
        "heldout_loss": [float(held[found.best]), float(held[found.at])],
        "train_loss": [float(train[found.best]), float(train[found.at])],
        "heldout_loss_last": float(held[-1]), "train_loss_last": float(train[-1]),
        "last_step": int(s[-1]), "train_images": images,
        "epochs_seen": j / per_epoch if per_epoch else None,
        "kl": {"heldout": [_at(data, EVAL_KL, b), _at(data, EVAL_KL, j)],
               "train": [_at(data, TRAIN_EVAL_KL, b), _at(data, TRAIN_EVAL_KL, j)]},
        "quality_lost": lost, "kept_on_train": mem.kept_on_train if mem else {},
        "thresholds": {"z_rise": Z_RISE, "z_gap": Z_GAP, "z_fall": Z_FALL},
    }
    cause = mem.describe() if mem else (
        f"the training images' loss fell ({train[found.best]:,.5g} -> "
        f"{train[found.at]:,.5g}) while the held-out images' rose ({held[found.best]:,.5g} -> "
        f"{held[found.at]:,.5g}): the model fits its training images better than others")
    kl = evidence["kl"]
    if None not in kl["heldout"] and None not in kl["train"]:
        cause += (f"; KL {kl['train'][1]:.3g} nats on the training images against "
                  f"{kl['heldout'][1]:.3g} on held-out ones")
    amortised, numbers = amortisation(data, b, j)
    if amortised:
        cause += f"; {amortised}"
        evidence["amortisation"] = numbers
    return cause, evidence, lost


def detect(data: RunData) -> tuple[list[Finding], list[Signal]]:
    s, held, train = _series(data)
    found = onset(held, train)
    if found is None:
        return [], []
    cause, evidence, lost = explain(data, s, held, train, found)
    b, j = int(s[found.best]), int(s[found.at])
    seen = evidence["epochs_seen"]
    images = evidence["train_images"]
    summary = (f"overfitting: after step {b:,} the held-out images' loss rose "
               f"({held[found.best]:,.5g} -> {held[found.at]:,.5g} at step {j:,}) while the "
               f"training images' fell ({train[found.best]:,.5g} -> {train[found.at]:,.5g})")
    if images:
        summary += f", on {images:,} training images" + \
            (f" seen {seen:,.0f} times each" if seen else "")
    if lost:
        summary += f"; by step {int(s[-1]):,} the held-out pictures lost " + "; ".join(
            f"{k} {a:.3g} -> {v:.3g}" for k, (a, v) in list(lost.items())[:2])
    finding = Finding(
        kind="overfitting", severity="warning" if lost else "info", first_step=b, last_step=j,
        summary=summary, evidence=evidence, cause=cause,
        remedies=memorisation_remedies(data, b), detector=NAME, compare_steps=[b, j])
    return [finding], [Signal(j, "generalisation_gap", "", float(held[found.at] - train[found.at]),
                              float(held[found.best] - train[found.best]), summary)]
