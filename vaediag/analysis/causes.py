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
from vaediag.columns import BETA, EPS, EVAL_RECON, LR, QUALITY_METRICS, STEP, TRAIN_EVAL_RECON
from vaediag.rundir import CHECKPOINTS_DIR, step_file

#: a recorded setting changed when it moved by at least this factor from one step to the next
CHANGE_FACTOR = 1.5
#: a metric got worse when it moved by this many of its noise units
Z_HARM = 4.0
#: what each recorded setting is called in findings
SETTING_NAMES = {LR: "the learning rate", BETA: "the KL weight", EPS: "Adam's eps"}


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
    if change.column == LR:
        return (f"check the learning-rate schedule: it jumped {change.factor:.3g}x; warm the "
                f"rate up instead of jumping it{knob(data, 'optim.warmup_steps')}")
    if change.column == EPS:
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
    steps = ev[STEP].to_numpy()
    if before not in steps or after not in steps:
        return {}
    i, j = np.flatnonzero(steps == before)[0], np.flatnonzero(steps == after)[0]
    out = {}
    judged = [m for m, facts in QUALITY_METRICS.items() if not facts.pixel]
    for col in [EVAL_RECON, *judged]:
        if not data.has(col, "evals"):
            continue
        raw = data.series(col, "evals")
        b = raw if col == EVAL_RECON else badness(col, raw)
        seen = b[(steps <= after) & np.isfinite(b)]
        unit = noise_scale(seen) if seen.size >= 4 else np.nan
        ref = i
        if from_best and np.isfinite(b[i:j + 1]).any():
            ref = i + int(np.nanargmin(b[i:j + 1]))
        if unit > 0 and b[j] - b[ref] >= Z_HARM * unit:
            out[col] = (float(raw[ref]), float(raw[j]))
    return out


#: held-out and training images parted: the held-out-minus-training gap of their losses widened
#: by at least this many of its noise units (eval-to-eval changes)
Z_GAP = 2.0
#: columns of the fixed training images' losses, beside the grid's held-out ``eval_recon``
TRAIN_LOSS = TRAIN_EVAL_RECON


@dataclass
class Memorisation:
    """Held-out and training images parted between two evaluations: the model memorises."""

    before: int
    after: int
    heldout: tuple[float, float]  # the held-out images' loss at the two evaluations
    train: tuple[float, float]  # the training images' loss
    #: quality metrics the held-out images lost and the training images kept:
    #: {metric: (held-out before, after, training before, after)}
    kept_on_train: dict[str, tuple[float, float, float, float]]
    train_images: int | None  # the training set's size, when the run recorded it
    epochs: float | None  # epochs seen at ``after``

    def describe(self) -> str:
        """'the 8 training images' loss fell 1,850 -> 1,830 while the held-out images' rose
        1,876 -> 1,888 ...'"""
        (h0, h1), (t0, t1) = self.heldout, self.train
        text = (f"from step {self.before:,} to {self.after:,} the 8 training images' loss "
                f"{'fell' if t1 < t0 else 'held'} "
                f"({t0:,.5g} -> {t1:,.5g}) while the held-out images' "
                f"{'rose' if h1 > h0 else 'fell less'} ({h0:,.5g} -> {h1:,.5g})")
        if self.kept_on_train:
            text += "; the training images kept what the held-out ones lost (" + "; ".join(
                f"{m} {a:.3g} -> {b:.3g} held-out, {c:.3g} -> {d:.3g} training"
                for m, (a, b, c, d) in list(self.kept_on_train.items())[:2]) + ")"
        size = f"its {self.train_images:,} training images" if self.train_images else \
            "its training images"
        seen = f" (seen {self.epochs:,.0f} times each)" if self.epochs else ""
        return f"{text}: the model memorises {size}{seen}"


def training_set(data: RunData) -> tuple[int | None, int | None]:
    """(training images, steps per epoch) as the run's ``start`` event recorded them."""
    start = data.events_of("start")
    if start.empty:
        return None, None
    row = start.iloc[0]

    def whole(key: str) -> int | None:
        value = row.get(key)
        return int(value) if value is not None and np.isfinite(value) else None
    return whole("train_images"), whole("steps_per_epoch")


def memorisation(data: RunData, before: int, after: int,
                 metrics: tuple[str, ...] | list[str] = (),
                 parted: bool = False) -> Memorisation | None:
    """Whether held-out and training images parted between evaluations ``before`` and
    ``after``: the gap between the held-out images' loss and the fixed training images' loss
    widened by ``Z_GAP`` of its noise units (``parted``: the caller has judged that already),
    the training images' loss did not rise, and, of ``metrics`` (quality metrics the held-out
    images lost), the training images did not lose every one. None when they did not part, or
    the run scored no training images."""
    if not (data.has(TRAIN_LOSS, "evals") and data.has(EVAL_RECON, "evals")):
        return None
    steps = data.evals[STEP].to_numpy()
    if before not in steps or after not in steps or after <= before:
        return None
    i, j = np.flatnonzero(steps == before)[0], np.flatnonzero(steps == after)[0]
    held, train = data.series(EVAL_RECON, "evals"), data.series(TRAIN_LOSS, "evals")
    gap = held - train
    seen = (steps <= after) & (steps >= data.burn_in_step) & np.isfinite(gap)
    unit = noise_scale(gap[seen]) if seen.sum() >= 4 else math.nan
    widened = parted or (unit > 0 and gap[j] - gap[i] >= Z_GAP * unit)
    if not widened or train[j] > train[i]:
        return None
    kept: dict[str, tuple[float, float, float, float]] = {}
    lost_on_train = 0
    for metric in metrics:
        column = f"train_{metric}"
        if metric not in QUALITY_METRICS or not data.has(column, "evals") \
                or not data.has(metric, "evals"):
            continue
        raw_h, raw_t = data.series(metric, "evals"), data.series(column, "evals")
        b_t = badness(metric, raw_t)
        scale = noise_scale(b_t[seen]) if seen.sum() >= 4 else math.nan
        if scale > 0 and b_t[j] - b_t[i] >= Z_HARM * scale:
            lost_on_train += 1
        else:
            kept[metric] = (float(raw_h[i]), float(raw_h[j]), float(raw_t[i]), float(raw_t[j]))
    if metrics and lost_on_train and not kept:
        return None  # the training images lost the same qualities: not memorisation
    images, per_epoch = training_set(data)
    return Memorisation(before, after, (float(held[i]), float(held[j])),
                        (float(train[i]), float(train[j])), kept, images,
                        after / per_epoch if per_epoch else None)


def best_heldout_step(data: RunData, start: int, end: int) -> int:
    """The evaluation in [start, end] with the lowest held-out loss (``eval_recon``): where to
    compare from when asking whether the model memorised since (``start`` if none)."""
    if not data.has(EVAL_RECON, "evals"):
        return start
    steps = data.evals[STEP].to_numpy()
    held = data.series(EVAL_RECON, "evals")
    span = (steps >= max(start, data.burn_in_step)) & (steps <= end) & np.isfinite(held)
    return int(steps[span][np.argmin(held[span])]) if span.any() else start


def memorisation_remedies(data: RunData, best_step: int) -> list[str]:
    """What to do about memorisation, as actions; none the run already applies."""
    out = []
    checkpoint = data.run.path / CHECKPOINTS_DIR / step_file(best_step, "pt")
    if checkpoint.exists():
        out.append(f"keep the model of step {best_step:,}, the best on held-out images "
                   f"(early stopping): {CHECKPOINTS_DIR}/{checkpoint.name} holds it; vaediag "
                   f"replay --from {best_step} continues from there with a remedy")
    else:
        out.append(f"stop at step {best_step:,}, the best on held-out images (early stopping), "
                   f"and keep that model")
    if data.setting("train", "augment", "none") in ("none", None):
        out.append("augment the training images: random left-right flips and small shifts"
                   + knob(data, "train.augment", "flip_shift"))
    out.append("more training images: the model has seen each of them many times")
    weight_decay = data.setting("optim", "weight_decay", 0.0) or 0.0
    if not weight_decay:
        out.append("weight decay" + knob(data, "optim.weight_decay", "0.05")
                   + ", decoupled from the gradient with AdamW"
                   + knob(data, "optim.name", "adamw"))
    out.append("a smaller model or latent space" + knob(data, "model.latent_dim"))
    return out
