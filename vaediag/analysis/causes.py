"""Causes checked against what the run recorded, and harm to the pictures, shared by the
detectors.

A finding names a cause only when the recorded columns support it: the learning rate (``lr``),
the KL weight (``beta``) and Adam's epsilon (``eps``) are recorded at every step, so "the
learning rate rose 30x at step 700" is read off the run, not guessed. Remedies are phrased as
actions; a run made by ``vaediag train`` also gets the config key to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vaediag.analysis.data import RunData
from vaediag.analysis.stats import badness, noise_scale
from vaediag.columns import QUALITY_METRICS

#: a recorded setting changed when it moved by at least this factor from one step to the next
CHANGE_FACTOR = 1.5
#: a metric got worse when it moved by this many of its noise units
Z_HARM = 4.0
#: what each recorded setting is called in findings
SETTING_NAMES = {"lr": "the learning rate", "beta": "the KL weight", "eps": "Adam's eps"}


@dataclass
class SettingChange:
    column: str  # lr | beta | eps
    step: int  # the first step with the new value
    before: float
    after: float

    @property
    def factor(self) -> float:
        return self.after / self.before if self.before > 0 else math.inf

    @property
    def rose(self) -> bool:
        return self.after > self.before

    def describe(self) -> str:
        """'the learning rate rose 30x (0.001 -> 0.03) at step 700'."""
        size = self.factor if self.rose else 1 / self.factor
        return (f"{SETTING_NAMES[self.column]} {'rose' if self.rose else 'fell'} {size:.3g}x "
                f"({self.before:.3g} -> {self.after:.3g}) at step {self.step:,}")


def setting_changes(data: RunData, column: str, start: int, end: int) -> list[SettingChange]:
    """Steps in [start, end] at which a recorded setting jumped by ``CHANGE_FACTOR`` or more
    from the step before (a schedule's smooth change is never a jump of that size)."""
    if not data.has(column):
        return []
    steps, x = data.steps, data.series(column)
    lo, hi = np.searchsorted(steps, [start, end + 1])
    lo = max(int(lo), 1)
    out = []
    for i in range(lo, int(hi)):
        a, b = x[i - 1], x[i]
        if not (np.isfinite(a) and np.isfinite(b)) or a == b:
            continue
        if (a > 0 and b > 0 and max(a / b, b / a) >= CHANGE_FACTOR) or (a > 0) != (b > 0):
            out.append(SettingChange(column, int(steps[i]), float(a), float(b)))
    return out


def first_change(data: RunData, columns: tuple[str, ...], start: int,
                 end: int) -> SettingChange | None:
    """The first jump of any of ``columns`` in [start, end]; None if none was recorded."""
    found = [c for col in columns for c in setting_changes(data, col, start, end)]
    return min(found, key=lambda c: c.step) if found else None


def undo_remedy(data: RunData, change: SettingChange) -> str:
    """What to do about a jump of a recorded setting: make it gradually, or set it back."""
    if change.column == "lr":
        return (f"check the learning-rate schedule: it jumped {change.factor:.3g}x; warm the "
                f"rate up instead of jumping it{knob(data, 'optim.warmup_steps')}")
    if change.column == "eps":
        return (f"set Adam's eps back to {change.before:.3g}"
                f"{knob(data, 'optim.eps', f'{change.before:.3g}')}: a different eps changes "
                f"the step of every entry whose sqrt(v^) is near it, whatever its gradient")
    return ("change the KL weight gradually (a warm-up) rather than at once"
            + knob(data, "loss.beta_warmup_steps"))


def is_trainer_run(data: RunData) -> bool:
    """Made by ``vaediag train`` (its config keys apply), not by a user's own loop."""
    return "train" in data.config and "optim" in data.config


def knob(data: RunData, key: str, value: object | None = None) -> str:
    """' (--set optim.grad_clip=229)' for a ``vaediag train`` run, '' for a user's own loop,
    so a remedy reads as an action either way."""
    if not is_trainer_run(data):
        return ""
    return f" (--set {key}={value})" if value is not None else f" ({key})"


def quality_lost(data: RunData, before: int, after: int,
                 from_best: bool = False) -> dict[str, tuple[float, float]]:
    """Evaluation columns (the grid's loss and image-quality metrics) worse at ``after`` than
    at ``before`` by ``Z_HARM`` of their noise units: {column: (reference, after)}. With
    ``from_best`` the reference is the best value between the two steps (quality the model had
    and lost), not the value at ``before``."""
    ev = data.evals
    steps = ev["step"].to_numpy()
    if before not in steps or after not in steps:
        return {}
    i, j = np.flatnonzero(steps == before)[0], np.flatnonzero(steps == after)[0]
    out = {}
    judged = [m for m, facts in QUALITY_METRICS.items() if not facts.pixel]
    for col in ["eval_recon", *judged]:
        if not data.has(col, "evals"):
            continue
        raw = data.series(col, "evals")
        b = raw if col == "eval_recon" else badness(col, raw)
        seen = b[(steps <= after) & np.isfinite(b)]
        unit = noise_scale(seen) if seen.size >= 4 else np.nan
        ref = i
        if from_best and np.isfinite(b[i:j + 1]).any():
            ref = i + int(np.nanargmin(b[i:j + 1]))
        if unit > 0 and b[j] - b[ref] >= Z_HARM * unit:
            out[col] = (float(raw[ref]), float(raw[j]))
    return out
