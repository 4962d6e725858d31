"""A collapsing loss scale (mixed precision with a ``torch.amp.GradScaler``).

The scaler skips a step whose gradients overflowed float16 and halves its scale; after enough
good steps it doubles it. Its first steps calibrate the scale this way (from 65,536 down to
what the gradients fit), and an isolated skip later is the scaler trying a larger scale: both
are the scaler at work, and nothing is reported for them. A value that overflows at every step
is not: the skips keep coming, the scale falls step after step, and no update is made while it
does.

Statistic: after the calibration (the skips before the first step the scaler kept), any
``WINDOW`` steps of which at least ``SKIP_SHARE`` were skipped. The gradient that overflowed
first is the most frequent ``origin`` of the Monitor's ``scaler_skip`` events over those steps.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from vaediag.analysis.causes import knob
from vaediag.analysis.data import RunData
from vaediag.analysis.findings import Finding, Signal
from vaediag.analysis.kinds import Kind
from vaediag.columns import LOSS_SCALE, SCALER_SKIPPED

NAME = "loss_scale"
#: its place among the detectors: they run, and are listed, in this order
ORDER = 12
#: the kinds of finding this detector emits (see :mod:`vaediag.analysis.kinds`)
KINDS = (
    Kind("loss_scale_collapse", "optimizer", instability=12, stage="backward", harm=True,
         own_channels=frozenset({SCALER_SKIPPED})),
)
#: steps over which the share of skipped steps is counted
WINDOW = 50
#: share of a window's steps the scaler skipped: no longer its calibration or an isolated try
SKIP_SHARE = 0.5


def _episodes(skipped: np.ndarray, start: int) -> list[tuple[int, int]]:
    """(first, last) row of each stretch, after ``start``, whose trailing windows of WINDOW
    rows are at least SKIP_SHARE skipped; the stretch runs from its first skipped row."""
    counts = np.convolve(skipped[start:].astype(float), np.ones(WINDOW), "full")
    dense = np.flatnonzero(counts[:len(skipped) - start] >= SKIP_SHARE * WINDOW) + start
    out: list[tuple[int, int]] = []
    for end in dense.tolist():
        first = max(start, end - WINDOW + 1)
        first += int(np.argmax(skipped[first:end + 1]))  # its first skipped row
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], int(end))
        else:
            out.append((first, int(end)))
    return [(a, a + int(np.flatnonzero(skipped[a:b + 1])[-1])) for a, b in out]


def _origin(data: RunData, first: int, last: int) -> str:
    """The gradient that overflowed first, most often, over ``first..last`` (steps)."""
    events = data.events_of("scaler_skip")
    if events.empty or "origin" not in events.columns:
        return ""
    within = events[(events["step"] >= first) & (events["step"] <= last)]
    origins = Counter(str(o) for o in within["origin"] if isinstance(o, str) and o != "grad")
    return origins.most_common(1)[0][0] if origins else ""


def detect(data: RunData) -> tuple[list[Finding], list[Signal]]:
    if not data.has(SCALER_SKIPPED):  # float32, bfloat16, or no scaler: no scale to collapse
        return [], []
    skipped = data.series(SCALER_SKIPPED) == 1
    kept = np.flatnonzero(~skipped)  # the calibration ends at the first step kept
    steps = data.steps
    scale = data.series(LOSS_SCALE) if data.has(LOSS_SCALE) else np.full(len(steps), np.nan)
    findings, signals = [], []
    for a, b in _episodes(skipped, int(kept[0]) if len(kept) else 0):
        first, last = int(steps[a]), int(steps[b])
        n = int(skipped[a:b + 1].sum())
        origin = _origin(data, first, last)
        layer = origin.split(":", 1)[1] if ":" in origin else ""
        where = f"; the gradient of {layer} overflowed first" if layer else ""
        signals.append(Signal(first, SCALER_SKIPPED, layer, float(n), float(WINDOW * SKIP_SHARE),
                              f"the loss scaler skipped {n} of {b - a + 1} steps"))
        keep = f"keep {layer}'s computation" if layer else "keep the overflowing computation"
        findings.append(Finding(
            kind="loss_scale_collapse", severity="high", first_step=first, last_step=last,
            summary=(f"the loss scaler skipped {n:,} of {b - a + 1:,} steps from step {first:,} "
                     f"(the scale fell from {scale[a]:.3g} to {np.nanmin(scale[a:b + 1]):.3g}): "
                     f"a value overflows float16 at nearly every step, and no update is made"
                     f"{where}"),
            evidence={"skipped": n, "steps": b - a + 1, "scale_before": float(scale[a]),
                      "scale_lowest": float(np.nanmin(scale[a:b + 1])), "origin": origin,
                      "window": WINDOW, "skip_share": SKIP_SHARE},
            cause="a value overflows float16 (65,504) at nearly every step, whatever the loss "
                  "scale: the scaler can only skip the step and lower the scale",
            remedies=[f"{keep} in float32 (torch.autocast(..., enabled=False) around it)",
                      "train in bfloat16, whose range is float32's"
                      + knob(data, "train.precision", "bf16"),
                      "lower the learning rate"],
            detector=NAME))
    return findings, signals
