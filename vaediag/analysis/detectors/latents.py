"""Posterior collapse and latent health; KL growth explained by a shrinking decoder scale.

- Collapse during training: active units (evaluations) falling to at most half their peak.
  Severity from harm: ``high`` when none is left; ``warning`` when the grid's reconstruction
  loss or an image-quality metric is worse at the collapse than at its best since the peak
  (by 4 of its noise units: quality the model had and lost); else ``info``: the model stopped
  using dimensions it did not need (common with many latents and a small KL weight). The
  cause is read off the recorded columns: a learning-rate jump, a rising KL weight, else the
  KL term's pressure.
  Dimensions whose per-step KL averages below ``COLLAPSED_KL`` nats over the last tenth of
  the run are listed (some unused dimensions are normal: ``info``).
- Log-variance saturation: ``logvar_min`` <= ``LOGVAR_LOW`` or ``logvar_max`` >= ``LOGVAR_HIGH``
  (exp() of them becomes useless in float32); ``high`` beyond -30 / +20.
- Decoder scale: with a learned Gaussian decoder scale, the KL's effective weight is
  proportional to sigma^2. If sigma fell at least ``SCALE_FACTOR`` times while the KL rose at
  least 1.5 times, the KL growth is explained by it (``warning``).
"""

from __future__ import annotations

import numpy as np

from vaediag.analysis.causes import (
    best_heldout_step,
    first_change,
    knob,
    memorisation,
    quality_lost,
)
from vaediag.analysis.data import RunData, Skip
from vaediag.analysis.findings import Finding, Signal
from vaediag.analysis.kinds import Kind
from vaediag.analysis.stats import badness
from vaediag.columns import (
    ACTIVE_UNITS,
    BETA,
    DECODER_SCALE,
    EVAL_RECON,
    KL,
    LOGVAR_MAX,
    LOGVAR_MIN,
    LR,
    STEP,
)

NAME = "latents"
#: its place among the detectors: they run, and are listed, in this order
ORDER = 60
#: the kinds of finding this detector emits (see :mod:`vaediag.analysis.kinds`)
KINDS = (
    Kind("posterior_collapse", "latents", instability=5, stage="latents", harm=True),
    Kind("unused_dimensions", "latents", stage="latents"),
    Kind("logvar_saturation", "latents", instability=9, stage="latents", risk=True),
    Kind("decoder_scale_shrinking", "latents", instability=10, stage="latents",
         risk=True),
)
#: nats: a latent dimension below this carries no information
COLLAPSED_KL = 0.01
LOGVAR_LOW, LOGVAR_HIGH = -20.0, 10.0
LOGVAR_BREAK_LOW, LOGVAR_BREAK_HIGH = -30.0, 20.0
#: the learned decoder scale falling by this factor (with the KL rising 1.5x) is shrinking
SCALE_FACTOR = 2.0


def _collapse_cause(data: RunData, peak_step: int, at: int) -> tuple[str, list[str]]:
    """Why the units died, from the recorded learning rate and KL weight, and what to do."""
    lr_jump = first_change(data, (LR,), peak_step, at)
    if lr_jump is not None and lr_jump.rose:
        return (f"{lr_jump.describe()}: the oversized steps that followed pushed the encoder's "
                f"means to the prior and the units did not come back",
                ["keep the learning rate steady or warm it up" + knob(data, "optim.warmup_steps"),
                 "clip gradients" + knob(data, "optim.grad_clip"),
                 "free bits keep units from being pushed to 0" + knob(data, "loss.free_bits",
                                                                      0.5)])
    beta_rose = False
    if data.has(BETA):
        beta, steps = data.series(BETA), data.steps
        before, after = beta[steps <= peak_step], beta[steps <= at]
        beta_rose = bool(before.size and after.size and after[-1] > 1.5 * max(before[-1], 1e-12))
    if beta_rose:
        return ("the KL weight rose while the units died: the KL term outweighed what they "
                "added to the reconstruction",
                ["stop the KL weight lower, or lengthen its warm-up"
                 + knob(data, "loss.beta_warmup_steps"),
                 "free bits" + knob(data, "loss.free_bits", 0.5)])
    return ("the encoder stopped using latent dimensions: the KL term outweighs what they add "
            "to the reconstruction",
            ["warm the KL weight up or use cyclical annealing"
             + knob(data, "loss.beta_schedule", "warmup"),
             "free bits" + knob(data, "loss.free_bits", 0.1), "a lower KL weight"])


def _unused_or_memorised(data: RunData, peak_step: int, last: int,
                         final: float) -> tuple[str, str, list[str]]:
    """For a collapse that did not harm the pictures when it happened: (summary tail, cause,
    remedies), saying whether the held-out reconstructions got worse later and, if they did
    while the training images' did not, that the model memorises (never 'the
    reconstructions held' when the held-out ones got worse)."""
    remedies = ["fewer latent dimensions, or free bits if all should be used"
                + knob(data, "loss.free_bits", 0.1)]
    later = {k: v for k, v in quality_lost(data, peak_step, last, from_best=True).items()
             if k != EVAL_RECON}
    if not later:
        return (f"; the held-out reconstructions did not get worse: the model uses {final:.0f} "
                f"dimensions and left the rest unused",
                "dimensions the model did not need went unused (common with many latents or "
                "a small KL weight); harmless while the reconstructions hold", remedies)
    worse = "; ".join(f"{k} {a:.3g} -> {b:.3g}" for k, (a, b) in list(later.items())[:2])
    mem = memorisation(data, best_heldout_step(data, peak_step, last), last,
                       metrics=list(later))
    if mem is not None:
        return (f"; the held-out reconstructions got worse ({worse}) while the training "
                f"images' did not: memorisation (see the overfitting finding), not the unused "
                f"dimensions",
                f"the model memorises its training images: {mem.describe()}; with a decoder "
                f"that recalls them it needs fewer latent dimensions", remedies)
    return (f"; the held-out reconstructions got worse later ({worse})",
            "the encoder stopped using latent dimensions; the held-out reconstructions got "
            "worse too, by the run's end", remedies)


def detect(data: RunData) -> tuple[list[Finding], list[Signal]]:
    """The latents' health, one kind at a time."""
    has_any = (data.has(ACTIVE_UNITS, "evals") or not data.matrix("dim", KL).empty
               or data.has(LOGVAR_MIN) or data.has(DECODER_SCALE))
    if not has_any:
        raise Skip("no latent statistics recorded (probes.preset 'off')")
    collapse = _posterior_collapse(data)
    findings = [*collapse, *([] if collapse else _unused_dimensions(data)),
                *_logvar_saturation(data), *_decoder_scale_shrinking(data)]
    return findings, []


def _posterior_collapse(data: RunData) -> list[Finding]:
    """Active units (evaluations) fell to half their peak or less; severity from the pictures."""
    if not data.has(ACTIVE_UNITS, "evals"):
        return []
    au = data.series(ACTIVE_UNITS, "evals")
    ev_steps = data.evals[STEP].to_numpy()
    ok = np.isfinite(au)
    if ok.sum() < 2:
        return []
    peak_i = int(np.nanargmax(au))
    peak, final = au[peak_i], au[ok][-1]
    if not (peak >= 2 and final <= peak / 2 and ev_steps[ok][-1] > ev_steps[peak_i]):
        return []
    fell = ev_steps[(np.arange(len(au)) > peak_i) & ok & (au <= peak / 2)]
    at = int(fell[0]) if fell.size else int(ev_steps[ok][-1])
    peak_step = int(ev_steps[peak_i])
    lost = quality_lost(data, peak_step, at, from_best=True)
    cause, remedies = _collapse_cause(data, peak_step, at)
    summary = (f"posterior collapse: active units fell from {peak:.0f} (step "
               f"{peak_step:,}) to {final:.0f}")
    # pictures that got worse while the training images' did not were lost to
    # memorisation, not to the collapse
    memorised = lost and memorisation(
        data, best_heldout_step(data, peak_step, at), at,
        metrics=[k for k in lost if k != EVAL_RECON])
    if final == 0:
        severity = "high"
    elif lost and not memorised:
        severity = "warning"
        summary += "; the pictures lost quality they had: " + "; ".join(
            f"{k} {a:.3g} -> {b:.3g}" for k, (a, b) in list(lost.items())[:3])
    else:
        severity = "info"
        tail, cause, remedies = _unused_or_memorised(data, peak_step,
                                                     int(ev_steps[ok][-1]), final)
        summary += tail
    # the grids to compare: the pictures at their best before the collapse, not the peak of
    # active units (often an early, still blurry model), against the collapse
    best = _best_before(data, lost, peak_step, at)
    return [Finding(
        kind="posterior_collapse", severity=severity,
        first_step=at, last_step=int(ev_steps[ok][-1]), summary=summary,
        evidence={"peak_active_units": float(peak), "final_active_units":
                  float(final), "peak_step": peak_step, "quality_lost": lost,
                  "best_step": best},
        cause=cause, remedies=remedies,
        detector=NAME, compare_steps=[best, at] if best < at else [peak_step, at])]


def _best_before(data: RunData, lost: dict[str, tuple[float, float]], start: int,
                 end: int) -> int:
    """The evaluation in [start, end) where the quality the collapse lost was best (its first
    image-quality metric, else the grid's loss); ``start`` when none was lost."""
    metric = next((m for m in lost if m != EVAL_RECON), EVAL_RECON if lost else None)
    if metric is None:
        return start
    steps = data.evals[STEP].to_numpy()
    raw = data.series(metric, "evals")
    b = raw if metric == EVAL_RECON else badness(metric, raw)
    span = (steps >= start) & (steps < end) & np.isfinite(b)
    return int(steps[span][np.argmin(b[span])]) if span.any() else start


def _unused_dimensions(data: RunData) -> list[Finding]:
    """Latent dimensions whose KL stayed below ``COLLAPSED_KL`` over the last tenth."""
    steps = data.steps
    dims = data.matrix("dim", KL)
    if dims.empty or len(dims) < 10:
        return []
    tail = dims.iloc[-max(1, len(dims) // 10):].mean()
    dead = [int(c) for c in tail.index[tail < COLLAPSED_KL]]
    if not dead:
        return []
    since = int(steps[-max(1, len(dims) // 10)])
    # encoding nothing is the harm itself, once training is past its first steps (a
    # fresh model's KL starts near 0)
    nothing = len(dead) == len(tail) and since >= data.burn_in_step
    return [Finding(
        kind="unused_dimensions", severity="high" if nothing else "info",
        first_step=since, last_step=int(steps[-1]),
        summary=f"{len(dead)} of {len(tail)} latent dimensions carry no information "
                f"(KL < {COLLAPSED_KL} nats)"
                + ("; too early to judge (the first steps of training)"
                   if len(dead) == len(tail) and not nothing else ""),
        evidence={"dimensions": dead, "threshold": COLLAPSED_KL},
        cause="normal for a VAE with more dimensions than it needs; a problem when all "
              "or most are unused",
        remedies=["fewer latent dimensions, or free bits if they should be used"],
        detector=NAME)]


def _logvar_saturation(data: RunData) -> list[Finding]:
    """The encoder's log-variance outside [LOGVAR_LOW, LOGVAR_HIGH] (a risk: harm grades it)."""
    steps = data.steps
    if not (data.has(LOGVAR_MIN) and data.has(LOGVAR_MAX)):
        return []
    lo, hi = data.series(LOGVAR_MIN), data.series(LOGVAR_MAX)
    bad = (lo <= LOGVAR_LOW) | (hi >= LOGVAR_HIGH)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        worst_lo, worst_hi = float(np.nanmin(lo)), float(np.nanmax(hi))
        breaking = worst_lo <= LOGVAR_BREAK_LOW or worst_hi >= LOGVAR_BREAK_HIGH
        return [Finding(
            kind="logvar_saturation", severity="high" if breaking else "warning",
            first_step=int(steps[i]), last_step=int(steps[np.flatnonzero(bad)[-1]]),
            summary=f"log-variance reached [{worst_lo:.3g}, {worst_hi:.3g}] (from step "
                    f"{int(steps[i]):,})",
            evidence={LOGVAR_MIN: worst_lo, LOGVAR_MAX: worst_hi,
                      "warn_range": [LOGVAR_LOW, LOGVAR_HIGH],
                      "float32_limits": [LOGVAR_BREAK_LOW, LOGVAR_BREAK_HIGH]},
            cause="the encoder pushes variances toward 0 or infinity; exp(logvar) then "
                  "loses precision or overflows in float32",
            remedies=["clamp the log-variance to [-30, 20]"
                      + knob(data, "loss.logvar_clamp", "[-30.0,20.0]"),
                      "lower the learning rate"], detector=NAME)]
    return []


def _decoder_scale_shrinking(data: RunData) -> list[Finding]:
    """A learned decoder scale falling while the KL rises: the KL's effective weight fell."""
    steps = data.steps
    last = int(steps[-1]) if len(steps) else 0
    if not (data.has(DECODER_SCALE) and data.has(KL)):
        return []
    sigma, kl = data.series(DECODER_SCALE), data.series(KL)
    after = steps >= data.burn_in_step
    if after.sum() >= 20:
        n = max(5, after.sum() // 10)
        s0, s1 = np.nanmedian(sigma[after][:n]), np.nanmedian(sigma[after][-n:])
        k0, k1 = np.nanmedian(kl[after][:n]), np.nanmedian(kl[after][-n:])
        if s0 > 0 and s1 > 0 and s0 / s1 >= SCALE_FACTOR and k0 > 0 and k1 / k0 >= 1.5:
            weight = (s1 / s0) ** 2
            return [Finding(
                kind="decoder_scale_shrinking", severity="warning",
                first_step=data.burn_in_step, last_step=last,
                summary=(f"the learned decoder scale fell {s0 / s1:.3g}x ({s0:.3g} -> "
                         f"{s1:.3g}) while the KL rose {k1 / k0:.3g}x: the KL's effective "
                         f"weight fell to {weight:.3g} of its start"),
                evidence={"sigma_start": s0, "sigma_end": s1, "kl_start": k0,
                          "kl_end": k1, "effective_kl_weight": weight},
                cause="with a Gaussian decoder the reconstruction term scales as 1/sigma^2, "
                      "so as sigma shrinks the KL matters less and grows",
                remedies=["fix the decoder scale or bound it from below"
                          + knob(data, "loss.learn_decoder_scale", "false"),
                          "raise the KL weight to compensate" + knob(data, "loss.beta")],
                detector=NAME)]
    return []
