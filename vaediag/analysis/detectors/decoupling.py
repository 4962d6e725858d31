"""Loss-quality decoupling: where the reconstruction loss stopped tracking image quality.

Both the loss and the quality come from the same 8 grid images at each evaluation: the loss
as the model shown computes it (``eval_recon``), the quality as the probes measure it (LPIPS,
SSIM, HaarPSI, GMSD, CIEDE2000 colour error, saturation, orientation and, with toyfaces, the
known factors). Each metric is turned into a *badness* (higher is worse: 1 - SSIM, |1 -
saturation ratio|, ...) and measured in its own noise unit: the robust spread of its
evaluation-to-evaluation changes after the burn-in, up to the evaluation after the pair judged
(causal: what is said about a pair never changes with what the run does later). Where the
known factors are recorded, the moment-based orientation estimates they supersede are not used.

For every pair of evaluations i < j after the burn-in, at most ``MAX_GAP`` evaluations apart:

- **decoupling**: the loss at j is no worse than at i plus one noise unit, and a metric is worse
  by at least ``Z_QUALITY`` noise units and ``MIN_RELATIVE`` of its value, at j and at the next
  evaluation too (sustained). The loss says "as good or better", the pictures say otherwise.
- **loss understates**: the loss rose (by 2 noise units or more: clearly), but by less than
  ``LOSS_TOLERANCE`` of itself, while a metric worsened as above (no need to last). A few
  percent of loss is what a user watching the number reads as "about the same"; with a summed
  BCE most of the loss is the targets' entropy (a floor no model can go below), so small
  relative changes of the total hide large changes of the part above it. The floor is
  computed from the run's own grid images.

Evidence also carries the rolling Spearman correlation of the loss's and each metric's
changes (window ``CORRELATION_WINDOW`` evaluations): positive while they move together.
The finding names the two evaluations to compare side by side, and says what changed in
between that explains a trade: the KL weight (a beta schedule raising it makes the model give up
the information a pixel loss charges least for, colour and pose among the first) and the KL of
those evaluations (information the model stopped encoding). Metrics are grouped in families
(structure, colour, pose: ``family`` in :data:`vaediag.columns.QUALITY_METRICS`); a warning needs
``MIN_METRICS`` families to agree on the same pair, or one family worse by ``STRONG`` times the
relative threshold (30%: a change anyone sees) while no metric of another family got clearly
better on that pair (at j or at the evaluation after it: a trade of one quality for another)
and, for a metric of one region of the face, another metric of its family
agrees (one small region's colour, e.g. the eyes at 32 px, moves a lot on its own; an
orientation estimate from blurry early reconstructions swings while their structure improves).
Anything less is info.
The pair shown is the first evaluation at which a warning (else any flag) is visible.

Before the loss is blamed, the held-out images are set against the fixed training images
(:func:`~vaediag.analysis.causes.memorisation`): when the training images' loss fell, the gap
between the two widened and the training images kept the qualities the held-out ones lost,
the cause named is memorisation (see the ``generalisation`` detector), with its remedies.
"""

from __future__ import annotations

import numpy as np

from vaediag.analysis.causes import knob, memorisation, memorisation_remedies
from vaediag.analysis.data import RunData, Skip
from vaediag.analysis.findings import Finding, Signal
from vaediag.analysis.kinds import Kind
from vaediag.analysis.stats import (
    badness,
    bce_floor,
    expanding_noise_scale,
    rolling_spearman,
)
from vaediag.columns import QUALITY_METRICS

NAME = "decoupling"
#: the kinds of finding this detector emits (see :mod:`vaediag.analysis.kinds`)
KINDS = (
    Kind("loss_quality_decoupling", "quality", decoupling=True, stage="evaluation", harm=True),
    Kind("loss_understates_quality", "quality", decoupling=True, stage="evaluation",
         harm=True),
)
#: noise units a quality metric must get worse by ...
Z_QUALITY = 4.0
#: ... and at least this fraction of its range
MIN_RELATIVE = 0.15
#: the loss rose by at most this fraction (relative to its part above the floor) for it to be no
#: worse
LOSS_TOLERANCE = 0.05
#: evaluations in the rolling rank correlation of loss and quality
CORRELATION_WINDOW = 6
#: evaluations after the burn-in needed
MIN_EVALS = 6
MIN_METRICS = 2  # families of metrics (structure, colour, pose) that must agree for a warning
STRONG = 2.0  # ... or one family, by this many times the relative threshold, none of the others
# clearly better
#: evaluations at most between the two of a compared pair
MAX_GAP = 100
BETA_RISE = 1.5  # the KL weight rose by at least this factor between the two evaluations
KL_FALL = 0.75  # the evaluations' KL fell below this fraction of its earlier value

FAMILY = {m: facts.family for m, facts in QUALITY_METRICS.items()}


def _describe(metric: str, before: float, after: float) -> str:
    return f"{metric} {before:.3g} -> {after:.3g}"


def _between(data: RunData, before: int, after: int) -> dict[str, float]:
    """The KL weight (per-step ``beta``) and the evaluations' KL at two evaluation steps."""
    out: dict[str, float] = {}
    if data.has("beta"):
        steps, beta = data.steps, data.series("beta")
        for key, step in (("beta_before", before), ("beta_after", after)):
            at = np.flatnonzero(steps <= step)
            if at.size:
                out[key] = float(beta[at[-1]])
    if data.has("eval_kl", "evals"):
        ev_steps, kl = data.evals["step"].to_numpy(), data.series("eval_kl", "evals")
        out["kl_before"] = float(kl[ev_steps == before][0])
        out["kl_after"] = float(kl[ev_steps == after][0])
    return out


def _trade(data: RunData, ctx: dict[str, float], memorised: bool = False
           ) -> tuple[str, list[str]]:
    """Cause text and remedies when the KL weight rose or the KL fell between the evaluations
    (a KL that fell while the model memorised is part of the memorising: not named apart)."""
    b0, b1 = ctx.get("beta_before"), ctx.get("beta_after")
    k0, k1 = ctx.get("kl_before"), ctx.get("kl_after")
    beta_rose = b0 is not None and b1 is not None and b1 > 0 and b1 >= BETA_RISE * max(b0, 1e-12)
    kl_fell = not memorised and k0 is not None and k1 is not None and k0 > 0 and k1 < KL_FALL * k0
    if not (beta_rose or kl_fell):
        return "", []
    parts, remedies = [], []
    if beta_rose:
        parts.append(f"the KL weight rose from {b0:.3g} to {b1:.3g}")
        remedies.append(f"stop the KL weight where the pictures were still right, at {b0:.3g}"
                        f"{knob(data, 'loss.beta', f'{b0:.3g}')}, or warm it up longer; or keep "
                        f"it and protect a minimum of information per dimension with free bits, "
                        f"0.5 to 1 nats{knob(data, 'loss.free_bits', 0.5)}")
    if kl_fell:
        parts.append(f"the KL of these images fell from {k0:.3g} to {k1:.3g} nats")
        if not beta_rose:
            remedies.append("the model encodes less than before: lower the KL weight"
                            + knob(data, "loss.beta") + " or use free bits"
                            + knob(data, "loss.free_bits", 0.5))
    text = (f"; in between, {' and '.join(parts)}: the model gave up information, and the "
            f"pixel loss charged little for what these metrics show it dropped")
    return text, remedies


def detect(data: RunData) -> tuple[list[Finding], list[Signal]]:
    data.require("eval_recon", table="evals")
    steps = data.evals["step"].to_numpy()
    keep = steps >= data.burn_in_step
    if keep.sum() < MIN_EVALS:
        raise Skip(f"needs {MIN_EVALS} evaluations after the burn-in (step "
                   f"{data.burn_in_step:,}), has {int(keep.sum())}")
    metrics = data.judged_metrics()
    if not metrics:
        raise Skip("no image-quality metrics recorded (evaluation probes off)")
    s = steps[keep]
    loss = data.series("eval_recon", "evals")[keep]
    floor = None
    if data.setting("loss", "recon") == "bce" and "eval_images" in data.fixed:
        floor = bce_floor(data.fixed["eval_images"][:8])
    n = len(s)
    # Pairs (i, j = i + k) of evaluations up to MAX_GAP apart, as (k, i) arrays: O(n * MAX_GAP).
    horizon = min(n - 1, MAX_GAP)
    i_idx = np.arange(n)[None, :]
    j_idx = i_idx + np.arange(1, horizon + 1)[:, None]
    valid = j_idx < n
    j_idx = np.minimum(j_idx, n - 1)
    # Noise units are causal: a pair is judged on the evaluations up to the one after it (the
    # sustained check's), so what is said about it never changes with what comes later.
    seen = np.minimum(j_idx + 1, n - 1)
    loss_noise = expanding_noise_scale(loss, MIN_EVALS)
    with np.errstate(invalid="ignore"):
        loss_ok = loss[j_idx] <= loss[i_idx] + loss_noise[seen]
        rel_loss = (loss[j_idx] - loss[i_idx]) / np.abs(loss[i_idx])
        rose = loss[j_idx] >= loss[i_idx] + 2 * loss_noise[seen]  # clearly, not by noise
        understated = rose & (rel_loss < LOSS_TOLERANCE)
    masks: dict[str, dict[str, np.ndarray]] = {"loss_quality_decoupling": {},
                                               "loss_understates_quality": {}}
    units: dict[str, np.ndarray] = {}
    relative: dict[str, np.ndarray] = {}
    better_next: dict[str, np.ndarray] = {}
    raw_values: dict[str, np.ndarray] = {}
    correlations = {}
    for metric in metrics:
        raw = data.series(metric, "evals")[keep]
        b = badness(metric, raw)
        if not np.isfinite(b).sum() >= MIN_EVALS:
            continue
        unit = expanding_noise_scale(b, MIN_EVALS)[seen]
        with np.errstate(invalid="ignore", divide="ignore"):
            unit = np.where(unit > 0, unit, np.nan)
            worse = b[j_idx] - b[i_idx]
            scale = np.maximum(np.abs(b[i_idx]), 1e-9)
            bad = valid & (worse >= Z_QUALITY * unit) & (worse / scale >= MIN_RELATIVE)
            nxt = np.append(b[1:], np.inf)  # sustained: the evaluation after j is worse too
            sustained = (nxt[j_idx] - b[i_idx]) >= Z_QUALITY * unit
        masks["loss_quality_decoupling"][metric] = bad & loss_ok & sustained
        masks["loss_understates_quality"][metric] = bad & understated
        units[metric] = worse / unit
        relative[metric] = worse / scale
        # at the evaluation after j (the one the sustained check reads): better by as much?
        gain = b[i_idx] - np.append(b[1:], np.nan)[j_idx]
        better_next[metric] = valid & (gain >= Z_QUALITY * unit) & (gain / scale >= MIN_RELATIVE)
        raw_values[metric] = raw
        correlations[metric] = rolling_spearman(np.diff(loss), np.diff(b), CORRELATION_WINDOW)
    data.derived["loss_quality_correlation"] = {
        "steps": s[1:].tolist(), "window": CORRELATION_WINDOW,
        "metrics": {m: rho.tolist() for m, rho in correlations.items()}}
    # Evidence against a pair: a metric of another family clearly *better* than at i, at j or
    # at the evaluation after it: the pictures traded one quality for another.
    better = {m: valid & (((-units[m] >= Z_QUALITY) & (-relative[m] >= MIN_RELATIVE))
                          | better_next[m]) for m in units}
    candidates: dict[str, tuple[tuple[int, int], dict, int, str]] = {}
    for kind, by_metric in masks.items():
        if not by_metric:
            continue
        families = sorted({FAMILY[m] for m in by_metric})
        agree = sum(np.any([by_metric[m] for m in by_metric if FAMILY[m] == fam], 0)
                    .astype(np.int32) for fam in families)
        if not agree.any():
            continue
        strong = np.zeros_like(agree, dtype=bool)
        for m in by_metric:
            against = np.any([better[o] for o in better if FAMILY[o] !=
                              FAMILY[m]] or [np.zeros_like(strong)], 0)
            # a regional metric alone (the eyes' colour) is weak evidence: it needs another
            # metric of its family with it
            kin = np.any([by_metric[o] for o in by_metric if o != m
                          and FAMILY[o] == FAMILY[m]]
                         or [np.zeros_like(strong)], 0)
            alone_ok = kin if QUALITY_METRICS[m].regional else np.ones_like(strong)
            strong |= by_metric[m] & (relative[m] >= STRONG * MIN_RELATIVE) & ~against & alone_ok
        warn = (agree >= MIN_METRICS) | strong
        # The pair to show: the first evaluation j at which a warning (else any flag) is
        # visible; there, the most families agreeing, then the largest worsening. Nothing later
        # in the run changes which pair that is.
        level = warn if warn.any() else agree > 0
        first_j = np.where(level, j_idx, n).min()
        best = level & (j_idx == first_j)
        best &= agree == np.where(best, agree, 0).max()
        strength = np.max([np.where(by_metric[m], units[m], -np.inf) for m in by_metric], 0)
        k, i = np.unravel_index(np.argmax(np.where(best, strength, -np.inf)), best.shape)
        j = int(j_idx[k, i])
        entry = {"kind": kind, "metrics": {
            m: {"before": float(raw_values[m][i]), "after": float(raw_values[m][j]),
                "worse_by_noise_units": float(units[m][k, i]),
                "relative_change": float((raw_values[m][j] - raw_values[m][i])
                                         / max(abs(raw_values[m][i]), 1e-9))}
            for m in by_metric if by_metric[m][k, i]}}
        why = ("metrics of several families agree" if agree[k, i] >= MIN_METRICS else
               "one family of metrics, by a wide margin, with none of the others better"
               if warn[k, i] else "one family of metrics only")
        entry["families"] = sorted({FAMILY[m] for m in entry["metrics"]})
        candidates[kind] = ((int(i), j), entry, int((agree > 0).sum()),
                            "warning" if warn[k, i] else "info", why)
    findings = []
    for kind in ("loss_quality_decoupling", "loss_understates_quality"):
        if kind not in candidates:
            continue
        (i, j), entry, pairs_found, severity, why = candidates[kind]
        ranked = sorted(entry["metrics"].items(), key=lambda kv: -kv[1]["worse_by_noise_units"])
        change = loss[j] - loss[i]
        loss_text = (f"the loss {'fell' if change < 0 else 'rose'} {abs(change) / loss[i]:.1%} "
                     f"({loss[i]:.5g} -> {loss[j]:.5g})")
        detail = "; ".join(_describe(m, v["before"], v["after"]) for m, v in ranked[:3])
        first_bad = {m: int(s[np.flatnonzero(correlations[m][CORRELATION_WINDOW - 1:] < 0)[0]
                              + CORRELATION_WINDOW])
                     for m in entry["metrics"]
                     if (correlations[m][CORRELATION_WINDOW - 1:] < 0).any()}
        evidence = {
            "compare": {"before_step": int(s[i]), "after_step": int(s[j])},
            "loss_before": float(loss[i]), "loss_after": float(loss[j]),
            "loss_noise_unit": float(loss_noise[min(j + 1, n - 1)]), "metrics": dict(ranked),
            "pairs_found": pairs_found, "families": entry["families"], "severity_because": why,
            "loss_noise_unit_causal": True, "thresholds": {"z_quality": Z_QUALITY,
                                                      "min_relative": MIN_RELATIVE,
                                                      "loss_tolerance": LOSS_TOLERANCE,
                                                      "min_families": MIN_METRICS,
                                                      "strong": STRONG},
            "correlation_turns_negative_at": first_bad,
        }
        if floor is not None:
            excess_i, excess_j = loss[i] - floor, loss[j] - floor
            evidence["bce_floor"] = floor
            evidence["excess_before"] = float(excess_i)
            evidence["excess_after"] = float(excess_j)
        if kind == "loss_quality_decoupling":
            summary = (f"the loss stopped tracking quality: evaluation at step {int(s[j]):,} "
                       f"has a loss no worse than step {int(s[i]):,} but worse pictures "
                       f"({detail})")
            cause = ("the reconstruction loss does not weigh what these metrics measure: a "
                     "pixel loss barely sees colour or orientation, and it kept improving on "
                     "other pixels while these got worse")
        else:
            summary = (f"between the evaluations at steps {int(s[i]):,} and {int(s[j]):,} "
                       f"{loss_text} while the pictures changed much more ({detail})")
            cause = ("a few percent of the loss hid a large change in the pictures")
        # Memorisation first: held-out images losing what the training images keep is not
        # the loss's blindness, and no change of the loss would fix it.
        mem = memorisation(data, int(s[i]), int(s[j]), metrics=list(entry["metrics"]))
        if mem is not None:
            cause = f"memorisation, not the loss: {mem.describe()}"
            evidence["memorisation"] = {"heldout_loss": list(mem.heldout),
                                        "train_loss": list(mem.train),
                                        "kept_on_train": mem.kept_on_train}
        elif floor is not None:
            share = floor / loss[i]
            rel_excess = (loss[j] - floor) / (loss[i] - floor) - 1 if loss[i] > floor else 0
            cause += (f". With a summed BCE, {share:.0%} of this loss is the images' entropy "
                      f"({floor:,.1f}), a floor no reconstruction goes below: the part above it "
                      f"changed {rel_excess:+.0%}")
        ctx = _between(data, int(s[i]), int(s[j]))
        evidence["between"] = ctx
        trade, trade_remedies = _trade(data, ctx, memorised=mem is not None)
        cause += trade
        remedies = [*trade_remedies,
                    "judge runs by the quality metrics, not by the loss alone: compare "
                    "the two grids named here side by side",
                    "for colour and structure, a perceptual or colour-aware loss term "
                    "(e.g. an LPIPS or Lab-space term), or a Gaussian likelihood in place of "
                    "BCE on non-binary targets",
                    "report the loss above its floor (the BCE minus the targets' entropy)"]
        if mem is not None:
            # the model to keep: the best held-out loss up to the later evaluation
            best = int(s[int(np.argmin(loss[:j + 1]))])
            remedies = [*memorisation_remedies(data, best), *trade_remedies,
                        "judge runs by held-out images, never by the training loss: compare "
                        "the two grids named here side by side"]
        findings.append(Finding(
            kind=kind, severity=severity, first_step=int(s[i]), last_step=int(s[j]),
            summary=summary, evidence=evidence, cause=cause, remedies=remedies,
            detector=NAME, compare_steps=[int(s[i]), int(s[j])]))
    signals = [Signal(f.last_step, "quality", next(iter(f.evidence["metrics"])), 0.0, 0.0,
                      f.summary) for f in findings]
    return findings, signals
