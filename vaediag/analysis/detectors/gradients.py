"""Gradient explosion and vanishing, per layer.

Explosion: z-score of each layer's log gradient norm against an exponential moving mean and
variance (alpha 0.03, outliers capped at 4 sigma when they enter the average, as ZClip does):
z >= ``Z_EXPLODE`` and the norm at least ``MIN_RATIO`` times its moving mean. Layers exploding
within a few steps of each other are one finding, led by the layer that went furthest.
Severity ``high`` from ``HIGH_RATIO`` times, else ``warning``.

Vanishing: a layer whose gradient norm (median over a ``WINDOW``-step window) has fallen below
1/``VANISH_FACTOR`` of its level in the early stable phase, for at least ``WINDOW`` steps; and
the ratio of the first layer's norm to the last layer's falling by the same factor (the early
layers stop learning). Severity ``warning``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from vaediag.analysis.causes import knob
from vaediag.analysis.data import RunData, Skip
from vaediag.analysis.findings import Finding, Signal
from vaediag.analysis.kinds import Kind
from vaediag.analysis.stats import episodes, ewm_z, share_at_least
from vaediag.columns import GRAD_NORM

NAME = "gradients"
#: its place among the detectors: they run, and are listed, in this order
ORDER = 40
#: the kinds of finding this detector emits (see :mod:`vaediag.analysis.kinds`)
KINDS = (
    Kind("grad_explosion", "optimizer", instability=4, own_channels=frozenset({GRAD_NORM}),
         stage="backward", risk=True, aftermath=True),
    Kind("grad_vanishing", "optimizer", stage="backward", risk=True),
)
#: z of a layer's log gradient norm against its moving mean and variance
Z_EXPLODE = 6.0
#: ... and the norm at least this many times its moving mean
MIN_RATIO = 5.0
#: a gradient this many times its moving mean is high (when harm follows)
HIGH_RATIO = 100.0
#: a layer's gradient norm below 1/this of its early level has vanished
VANISH_FACTOR = 1000.0
#: recorded steps of the running median (and the least a vanishing must last)
WINDOW = 50


def _log_norms(data: RunData) -> pd.DataFrame:
    layers = data.matrix("layer", GRAD_NORM)
    if layers.empty and data.has(GRAD_NORM):
        layers = pd.DataFrame({"(all)": data.series(GRAD_NORM)})
    if layers.empty:
        raise Skip("no gradient norms recorded")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(layers.where(layers > 0))


def _jumps(data: RunData, logs: pd.DataFrame, after: np.ndarray
           ) -> tuple[list[tuple[int, str, float, float]], list[Signal]]:
    """Each layer's gradient norm far above its moving mean after the burn-in: the hits
    (row index, layer, robust z, ratio to the mean) and their signals."""
    steps = data.steps
    signals: list[Signal] = []
    hits = []
    for layer in logs.columns:
        x = logs[layer].to_numpy()
        recorded = np.isfinite(x)
        if recorded.sum() < 50:
            continue
        # Probes may record layers every N steps: score the recorded rows only.
        idx = np.flatnonzero(recorded)
        z = ewm_z(x[idx])
        mean = pd.Series(x[idx]).ewm(alpha=0.03, adjust=False).mean().shift(1).to_numpy()
        ratio = np.exp(x[idx] - mean)
        mask = (z >= Z_EXPLODE) & (ratio >= MIN_RATIO) & after[idx]
        for k in np.flatnonzero(mask):
            hits.append((int(idx[k]), layer, float(z[k]), float(ratio[k])))
            signals.append(Signal(int(steps[idx[k]]), GRAD_NORM, layer,
                                  float(math.exp(x[idx[k]])), float(math.exp(mean[k])),
                                  f"gradient norm {ratio[k]:.3g}x its moving mean"))
    return hits, signals


def _explosion(data: RunData, group: list[tuple[int, str, float, float]], start: int,
               end: int) -> Finding:
    """One episode of jumps (within 3 steps of one another), led by the largest."""
    steps = data.steps
    lead = max(group, key=lambda h: h[3])
    layers = sorted({h[1] for h in group}, key=lambda n: -max(h[3] for h in group
                                                               if h[1] == n))
    first_step = int(steps[start])
    return Finding(
        kind="grad_explosion", severity="high" if lead[3] >= HIGH_RATIO else "warning",
        first_step=first_step, last_step=int(steps[end]),
        summary=(f"gradient explosion at step {first_step:,}: {lead[1]} {lead[3]:.3g}x its "
                 f"moving mean" + (f", with {len(layers) - 1} more layer(s)"
                                   if len(layers) > 1 else "")),
        evidence={"layers": layers, "max_ratio": lead[3], "max_z": lead[2],
                  "threshold_z": Z_EXPLODE, "min_ratio": MIN_RATIO},
        cause="one or a few steps with far larger gradients than usual: an outlier batch, an "
              "oversized previous update, or a loss term blowing up",
        remedies=["clip gradients near the 99th percentile of the stable phase's norm, or use "
                  "an adaptive clip (ZClip)" + knob(data, "optim.grad_clip"),
                  "lower the learning rate" + knob(data, "optim.lr")],
        detector=NAME)


def detect(data: RunData) -> tuple[list[Finding], list[Signal]]:
    logs = _log_norms(data)
    after = data.steps >= data.burn_in_step
    hits, signals = _jumps(data, logs, after)
    findings: list[Finding] = []
    if hits:
        mask = np.zeros(len(data.steps), dtype=bool)
        mask[[h[0] for h in hits]] = True
        findings = [_explosion(data, [h for h in hits if start <= h[0] <= end], start, end)
                    for start, end in episodes(mask, merge_gap=3)]
    findings += _vanishing(data, logs, after)
    return findings, signals


def _vanishing(data: RunData, logs: pd.DataFrame, after: np.ndarray) -> list[Finding]:
    steps = data.steps
    out = []
    early_end = data.burn_in_step + max(WINDOW, (int(steps[-1]) - data.burn_in_step) // 5)
    early = logs[(steps >= data.burn_in_step) & (steps < early_end)].median()
    gone = []
    for layer in logs.columns:
        if not np.isfinite(early[layer]):
            continue
        x = logs[layer].to_numpy()
        idx = np.flatnonzero(np.isfinite(x) & after)
        if idx.size < 2 * WINDOW:
            continue
        # the running median below the level: at least half the window is (O(n))
        level = early[layer] - math.log(VANISH_FACTOR)
        low = share_at_least(-x[idx], -level, WINDOW) >= 0.5
        runs = [r for r in episodes(low, merge_gap=0) if r[1] - r[0] + 1 >= WINDOW]
        if runs:  # it began where the values first fell below, in that first window
            start = runs[0][0]
            first = start - WINDOW + 1 + int(np.argmax(x[idx[start - WINDOW + 1:start + 1]]
                                                        <= level))
            gone.append((layer, int(steps[idx[first]])))
    if gone:
        first = min(s for _, s in gone)
        out.append(Finding(
            kind="grad_vanishing", severity="warning", first_step=first,
            last_step=int(steps[-1]),
            summary=(f"vanishing gradients from step {first:,} in {len(gone)} layer(s): "
                     + ", ".join(n for n, _ in gone[:4])),
            evidence={"layers": dict(gone), "factor": VANISH_FACTOR},
            cause=f"their gradient norms fell below 1/{VANISH_FACTOR:g} of their early level",
            remedies=["check for dead units (ReLU) or saturated outputs; try leaky_relu or "
                      "silu" + knob(data, "model.activation", "leaky_relu"),
                      "add normalisation" + knob(data, "model.norm", "group")],
            detector=NAME))
    return out
