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

from dataclasses import dataclass

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
from vaediag.columns import BETA, EVAL_KL, EVAL_RECON, QUALITY_METRICS, STEP

NAME = "decoupling"
#: its place among the detectors: they run, and are listed, in this order
ORDER = 80
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
#: evaluations whose median is the quality held at the first of a pair (with the one before:
#: a single lucky evaluation is not a level the pictures had)
HELD_EVALS = 3
#: pairs at most this many evaluations apart are compared from the level held up to their
#: first; pairs further apart from the value at the first
SHORT_PAIR = 2
BETA_RISE = 1.5  # the KL weight rose by at least this factor between the two evaluations
KL_FALL = 0.75  # the evaluations' KL fell below this fraction of its earlier value

FAMILY = {m: facts.family for m, facts in QUALITY_METRICS.items()}


def _describe(metric: str, before: float, after: float) -> str:
    return f"{metric} {before:.3g} -> {after:.3g}"


def _between(data: RunData, before: int, after: int) -> dict[str, float]:
    """The KL weight (per-step ``beta``) and the evaluations' KL at two evaluation steps."""
    out: dict[str, float] = {}
    if data.has(BETA):
        steps, beta = data.steps, data.series(BETA)
        for key, step in (("beta_before", before), ("beta_after", after)):
            at = np.flatnonzero(steps <= step)
            if at.size:
                out[key] = float(beta[at[-1]])
    if data.has(EVAL_KL, "evals"):
        ev_steps, kl = data.evals[STEP].to_numpy(), data.series(EVAL_KL, "evals")
        out["kl_before"] = float(kl[ev_steps == before][0])
        out["kl_after"] = float(kl[ev_steps == after][0])
    return out


def _trade(data: RunData, ctx: dict[str, float], memorised: bool = False,
           stop_at: float | None = None) -> tuple[str, list[str]]:
    """Cause text and remedies when the KL weight rose or the KL fell between the evaluations
    (a KL that fell while the model memorised is part of the memorising: not named apart).
    ``stop_at``: the KL weight to stop at, where the run's pictures were last right (the same
    for every loss-quality finding of the run); default the weight at the earlier evaluation."""
    b0, b1 = ctx.get("beta_before"), ctx.get("beta_after")
    k0, k1 = ctx.get("kl_before"), ctx.get("kl_after")
    beta_rose = b0 is not None and b1 is not None and b1 > 0 and b1 >= BETA_RISE * max(b0, 1e-12)
    kl_fell = not memorised and k0 is not None and k1 is not None and k0 > 0 and k1 < KL_FALL * k0
    if not (beta_rose or kl_fell):
        return "", []
    parts, remedies = [], []
    if beta_rose:
        parts.append(f"the KL weight rose from {b0:.3g} to {b1:.3g}")
        stop = b0 if stop_at is None or not 0 < stop_at <= b0 else stop_at  # type: ignore[operator]
        remedies.append(f"stop the KL weight where the pictures were still right, at {stop:.3g}"
                        f"{knob(data, 'loss.beta', f'{stop:.3g}')}, or warm it up longer; or keep "
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


@dataclass
class _Pairs:
    """Every pair (i, j = i + k) of evaluations after the burn-in up to ``MAX_GAP`` apart, as
    (k, i) index arrays: O(n * MAX_GAP)."""

    i: np.ndarray  # (1, n)
    j: np.ndarray  # (K, n), clipped to the last evaluation
    valid: np.ndarray  # (K, n): j is a real evaluation
    seen: np.ndarray  # (K, n): the last evaluation a pair is judged on (the one after j)
    n: int

    @classmethod
    def of(cls, n: int) -> _Pairs:
        horizon = min(n - 1, MAX_GAP)
        i = np.arange(n)[None, :]
        j = i + np.arange(1, horizon + 1)[:, None]
        valid = j < n
        j = np.minimum(j, n - 1)
        # Noise units are causal: a pair is judged on the evaluations up to the one after it
        # (the sustained check's), so what is said about it never changes with what comes later.
        return cls(i, j, valid, np.minimum(j + 1, n - 1), n)


@dataclass
class _LossTest:
    """What the loss did on every pair: no worse (within one noise unit), or clearly risen
    but by less than ``LOSS_TOLERANCE`` of itself."""

    values: np.ndarray
    noise: np.ndarray
    ok: np.ndarray
    understated: np.ndarray

    @classmethod
    def of(cls, loss: np.ndarray, pairs: _Pairs) -> _LossTest:
        noise = expanding_noise_scale(loss, MIN_EVALS)
        i, j = pairs.i, pairs.j
        with np.errstate(invalid="ignore"):
            ok = loss[j] <= loss[i] + noise[pairs.seen]
            rel_loss = (loss[j] - loss[i]) / np.abs(loss[i])
            rose = loss[j] >= loss[i] + 2 * noise[pairs.seen]  # clearly, not by noise
        return cls(loss, noise, ok, rose & (rel_loss < LOSS_TOLERANCE))


def _held(b: np.ndarray) -> np.ndarray:
    """The quality held at each evaluation: the worse of its own badness and the median of it
    and the ``HELD_EVALS - 1`` evaluations before it (causal). A pair of evaluations close
    together compared from one that was luckily better than its neighbours (colour error
    14.8, 14.1, 12.7, then back to 15.2) measures the luck going, not quality lost; from a
    steady or worsening level it is the value at that evaluation. Pairs further apart
    (``SHORT_PAIR``) compare from the value itself: over such spans the model was often
    still improving, and a level taken from before the first evaluation would hide
    a real, slow loss (measured: it delayed the case study's finding by 200-500 steps)."""
    out = b.copy()
    for k in range(len(b)):
        window = b[max(0, k - HELD_EVALS + 1):k + 1]
        window = window[np.isfinite(window)]
        if window.size:
            out[k] = max(b[k], float(np.median(window))) if np.isfinite(b[k]) else b[k]
    return out


@dataclass
class _MetricTest:
    """One quality metric on every pair: how much worse (in noise units and relative to its
    value), whether that is a flag of either kind, and whether it got clearly better."""

    raw: np.ndarray
    units: np.ndarray
    relative: np.ndarray
    flags: dict[str, np.ndarray]  # kind -> (K, n) flagged pairs
    better: np.ndarray  # (K, n): clearly better at j or at the evaluation after it
    correlation: np.ndarray

    @classmethod
    def of(cls, metric: str, raw: np.ndarray, loss: _LossTest, pairs: _Pairs
           ) -> _MetricTest | None:
        b = badness(metric, raw)
        if not np.isfinite(b).sum() >= MIN_EVALS:
            return None
        i, j, valid = pairs.i, pairs.j, pairs.valid
        unit = expanding_noise_scale(b, MIN_EVALS)[pairs.seen]
        # what the pictures had at i, for pairs close together: never one lucky evaluation
        # (a longer pair compares levels apart in time, where the value at i is the level)
        held = np.where(j - i <= SHORT_PAIR, _held(b)[i], b[i])
        with np.errstate(invalid="ignore", divide="ignore"):
            unit = np.where(unit > 0, unit, np.nan)
            worse = b[j] - b[i]
            scale = np.maximum(np.abs(b[i]), 1e-9)
            lost = b[j] - held  # worse than the level held, not only than the value at i
            bad = valid & (lost >= Z_QUALITY * unit) \
                & (lost / np.maximum(np.abs(held), 1e-9) >= MIN_RELATIVE)
            nxt = np.append(b[1:], np.inf)  # sustained: the evaluation after j is worse too
            sustained = (nxt[j] - held) >= Z_QUALITY * unit
        units, relative = worse / unit, worse / scale
        # at the evaluation after j (the one the sustained check reads): better by as much?
        gain = b[i] - np.append(b[1:], np.nan)[j]
        better_next = valid & (gain >= Z_QUALITY * unit) & (gain / scale >= MIN_RELATIVE)
        better = valid & (((-units >= Z_QUALITY) & (-relative >= MIN_RELATIVE)) | better_next)
        flags = {"loss_quality_decoupling": bad & loss.ok & sustained,
                 "loss_understates_quality": bad & loss.understated}
        return cls(raw, units, relative, flags, better,
                   rolling_spearman(np.diff(loss.values), np.diff(b), CORRELATION_WINDOW))


@dataclass
class _Pair:
    """The pair of evaluations a finding shows, and why it has its severity."""

    i: int
    j: int
    metrics: dict[str, dict[str, float]]  # flagged metric -> before, after, how much worse
    families: list[str]
    pairs_found: int
    severity: str
    why: str
    #: the latest evaluation i' that, with the same j, still shows the change at this level:
    #: the tightest pair, where the change happened (a sudden event between i' and j is its
    #: cause, ``incidents``)
    tight: int = -1


def _strong(kind: str, tests: dict[str, _MetricTest], shape: tuple[int, ...]) -> np.ndarray:
    """Pairs where one metric alone is worse by ``STRONG`` times the relative threshold, no
    metric of another family got clearly better (a trade of one quality for another), and, for
    a metric of one region of the face, another of its family agrees."""
    none = np.zeros(shape, dtype=bool)
    strong = none.copy()
    for m, t in tests.items():
        against = np.any([o.better for name, o in tests.items() if FAMILY[name] != FAMILY[m]]
                         or [none], 0)
        # a regional metric alone (the eyes' colour) is weak evidence: it needs another metric
        # of its family with it
        kin = np.any([o.flags[kind] for name, o in tests.items()
                      if name != m and FAMILY[name] == FAMILY[m]] or [none], 0)
        alone_ok = kin if QUALITY_METRICS[m].regional else np.ones(shape, dtype=bool)
        strong |= t.flags[kind] & (t.relative >= STRONG * MIN_RELATIVE) & ~against & alone_ok
    return strong


def _choose_pair(kind: str, tests: dict[str, _MetricTest], pairs: _Pairs) -> _Pair | None:
    """The first evaluation j at which a warning (else any flag) of ``kind`` is visible;
    there, the most families agreeing, then the largest worsening. Nothing later in the run
    changes which pair that is."""
    flags = {m: t.flags[kind] for m, t in tests.items()}
    families = sorted({FAMILY[m] for m in flags})
    agree = sum(np.any([flags[m] for m in flags if FAMILY[m] == fam], 0).astype(np.int32)
                for fam in families)
    if not agree.any():
        return None
    warn = (agree >= MIN_METRICS) | _strong(kind, tests, agree.shape)
    level = warn if warn.any() else agree > 0
    first_j = np.where(level, pairs.j, pairs.n).min()
    best = level & (pairs.j == first_j)
    best &= agree == np.where(best, agree, 0).max()
    strength = np.max([np.where(flags[m], tests[m].units, -np.inf) for m in flags], 0)
    k, i = np.unravel_index(np.argmax(np.where(best, strength, -np.inf)), best.shape)
    j = int(pairs.j[k, i])
    metrics = {m: {"before": float(t.raw[i]), "after": float(t.raw[j]),
                   "worse_by_noise_units": float(t.units[k, i]),
                   "relative_change": float((t.raw[j] - t.raw[i]) / max(abs(t.raw[i]), 1e-9))}
               for m, t in tests.items() if flags[m][k, i]}
    why = ("metrics of several families agree" if agree[k, i] >= MIN_METRICS else
           "one family of metrics, by a wide margin, with none of the others better"
           if warn[k, i] else "one family of metrics only")
    at_j = level & (pairs.j == first_j)  # the tightest pair that shows it at the same level
    tight = int(np.where(at_j, pairs.i, -1).max())
    return _Pair(int(i), j, metrics, sorted({FAMILY[m] for m in metrics}),
                 int((agree > 0).sum()), "warning" if warn[k, i] else "info", why, tight)


def _evidence(pair: _Pair, s: np.ndarray, loss: _LossTest, tests: dict[str, _MetricTest],
              floor: float | None) -> dict:
    i, j, values = pair.i, pair.j, loss.values
    ranked = sorted(pair.metrics.items(), key=lambda kv: -kv[1]["worse_by_noise_units"])
    turns = {m: tests[m].correlation[CORRELATION_WINDOW - 1:] < 0 for m in pair.metrics}
    evidence = {
        "compare": {"before_step": int(s[i]), "after_step": int(s[j])},
        "tightest": {"before_step": int(s[max(pair.tight, i)]), "after_step": int(s[j])},
        "loss_before": float(values[i]), "loss_after": float(values[j]),
        "loss_noise_unit": float(loss.noise[min(j + 1, len(s) - 1)]),
        "metrics": dict(ranked), "pairs_found": pair.pairs_found, "families": pair.families,
        "severity_because": pair.why, "loss_noise_unit_causal": True,
        "thresholds": {"z_quality": Z_QUALITY, "min_relative": MIN_RELATIVE,
                       "loss_tolerance": LOSS_TOLERANCE, "min_families": MIN_METRICS,
                       "strong": STRONG},
        "correlation_turns_negative_at": {m: int(s[np.flatnonzero(t)[0] + CORRELATION_WINDOW])
                                          for m, t in turns.items() if t.any()},
    }
    if floor is not None:
        evidence["bce_floor"] = floor
        evidence["excess_before"] = float(values[i] - floor)
        evidence["excess_after"] = float(values[j] - floor)
    return evidence


def _finding(data: RunData, kind: str, pair: _Pair, s: np.ndarray, loss: _LossTest,
             tests: dict[str, _MetricTest], floor: float | None,
             earliest: int | None = None) -> Finding:
    """The finding for the chosen pair: what the loss and the pictures did, and why: the
    loss's blindness, or memorisation (named first: held-out images losing what the training
    images keep is not the loss's fault, and no change of the loss would fix it)."""
    i, j, values = pair.i, pair.j, loss.values
    evidence = _evidence(pair, s, loss, tests, floor)
    detail = "; ".join(_describe(m, v["before"], v["after"])
                       for m, v in list(evidence["metrics"].items())[:3])
    if kind == "loss_quality_decoupling":
        summary = (f"the loss stopped tracking quality: evaluation at step {int(s[j]):,} has a "
                   f"loss no worse than step {int(s[i]):,} but worse pictures ({detail})")
        cause = ("the reconstruction loss does not weigh what these metrics measure: a pixel "
                 "loss barely sees colour or orientation, and it kept improving on other "
                 "pixels while these got worse")
    else:
        change = values[j] - values[i]
        loss_text = (f"the loss {'fell' if change < 0 else 'rose'} "
                     f"{abs(change) / values[i]:.1%} ({values[i]:.5g} -> {values[j]:.5g})")
        summary = (f"between the evaluations at steps {int(s[i]):,} and {int(s[j]):,} "
                   f"{loss_text} while the pictures changed much more ({detail})")
        cause = "a few percent of the loss hid a large change in the pictures"
    mem = memorisation(data, int(s[i]), int(s[j]), metrics=list(pair.metrics))
    if mem is not None:
        cause = f"memorisation, not the loss: {mem.describe()}"
        evidence["memorisation"] = {"heldout_loss": list(mem.heldout),
                                    "train_loss": list(mem.train),
                                    "kept_on_train": mem.kept_on_train}
    elif floor is not None:
        share = floor / values[i]
        rel_excess = (values[j] - floor) / (values[i] - floor) - 1 if values[i] > floor else 0
        cause += (f". With a summed BCE, {share:.0%} of this loss is the images' entropy "
                  f"({floor:,.1f}), a floor no reconstruction goes below: the part above it "
                  f"changed {rel_excess:+.0%}")
    between = _between(data, int(s[i]), int(s[j]))
    evidence["between"] = between
    stop_at = _between(data, earliest, earliest).get("beta_before") \
        if earliest is not None else None
    trade, trade_remedies = _trade(data, between, memorised=mem is not None, stop_at=stop_at)
    if mem is not None:  # the model to keep: the best held-out loss up to the later evaluation
        best = int(s[int(np.argmin(values[:j + 1]))])
        remedies = [*memorisation_remedies(data, best), *trade_remedies,
                    "judge runs by held-out images, never by the training loss: compare the "
                    "two grids named here side by side"]
    else:
        remedies = [*trade_remedies, *LOSS_REMEDIES]
    return Finding(kind=kind, severity=pair.severity, first_step=int(s[i]),
                   last_step=int(s[j]), summary=summary, evidence=evidence,
                   cause=cause + trade, remedies=remedies, detector=NAME,
                   compare_steps=[int(s[i]), int(s[j])])


#: what to do when the loss does not weigh what the pictures lost
LOSS_REMEDIES = (
    "judge runs by the quality metrics, not by the loss alone: compare the two grids named "
    "here side by side",
    "for colour and structure, a perceptual or colour-aware loss term (e.g. an LPIPS or "
    "Lab-space term), or a Gaussian likelihood in place of BCE on non-binary targets",
    "report the loss above its floor (the BCE minus the targets' entropy)",
)


def detect(data: RunData) -> tuple[list[Finding], list[Signal]]:
    data.require(EVAL_RECON, table="evals")
    keep = data.evals[STEP].to_numpy() >= data.burn_in_step
    if keep.sum() < MIN_EVALS:
        raise Skip(f"needs {MIN_EVALS} evaluations after the burn-in (step "
                   f"{data.burn_in_step:,}), has {int(keep.sum())}")
    metrics = data.judged_metrics()
    if not metrics:
        raise Skip("no image-quality metrics recorded (evaluation probes off)")
    s = data.evals[STEP].to_numpy()[keep]
    floor = None
    if data.setting("loss", "recon") == "bce" and "eval_images" in data.fixed:
        floor = bce_floor(data.fixed["eval_images"][:8])
    pairs = _Pairs.of(len(s))
    loss = _LossTest.of(data.series(EVAL_RECON, "evals")[keep], pairs)
    tests = {m: t for m in metrics
             if (t := _MetricTest.of(m, data.series(m, "evals")[keep], loss, pairs))}
    data.derived["loss_quality_correlation"] = {
        "steps": s[1:].tolist(), "window": CORRELATION_WINDOW,
        "metrics": {m: t.correlation.tolist() for m, t in tests.items()}}
    chosen = {kind: pair for kind in ("loss_quality_decoupling", "loss_understates_quality")
              if tests and (pair := _choose_pair(kind, tests, pairs)) is not None}
    # one KL weight to stop at for the run: where its pictures were last right, the earlier
    # evaluation of the earliest pair (two findings never advise two weights)
    earliest = int(s[min(p.i for p in chosen.values())]) if chosen else None
    findings = [_finding(data, kind, pair, s, loss, tests, floor, earliest)
                for kind, pair in chosen.items()]
    signals = [Signal(f.last_step, "quality", next(iter(f.evidence["metrics"])), 0.0, 0.0,
                      f.summary) for f in findings]
    return findings, signals
