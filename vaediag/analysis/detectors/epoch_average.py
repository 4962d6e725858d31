"""The epoch-average trap: the averaged training loss and the loss of the model shown disagree.

What most training loops print per epoch is the *average* of the per-step training losses since
the last print: many weight states, sampled z, every batch. The grid shows *one* model, the
last, on 8 fixed images with the posterior mean. The two can move in opposite directions.

Statistic: for consecutive evaluations after the burn-in, the change of ``train_recon_avg`` and
of ``eval_recon``, each in its own noise unit. Opposite signs with both at least ``Z_CHANGE``
units is a disagreement (``info``): comparing epochs by the printed average would have said the
opposite of what the snapshots show. When the fixed training images were scored too and their
snapshot moved with the average while the held-out images parted from them, the cause named is
memorisation, not the averaging.
"""

from __future__ import annotations

import numpy as np

from vaediag.analysis.causes import TRAIN_LOSS, memorisation, memorisation_remedies
from vaediag.analysis.data import RunData, Skip
from vaediag.analysis.findings import Finding, Signal
from vaediag.analysis.kinds import Kind
from vaediag.analysis.stats import noise_scale
from vaediag.columns import EVAL_RECON, STEP, TRAIN_RECON_AVG

NAME = "epoch_average"
#: its place among the detectors: they run, and are listed, in this order
ORDER = 90
#: the kinds of finding this detector emits (see :mod:`vaediag.analysis.kinds`)
KINDS = (
    Kind("epoch_average_trap", "timelines", stage="evaluation"),
)
#: noise units the per-step loss moved within an epoch while its epoch average hid it
Z_CHANGE = 2.0
#: evaluations with a training average after the burn-in needed
MIN_EVALS = 4


def _cause(data: RunData, s: np.ndarray, keep: np.ndarray, k: int, da: np.ndarray,
           evidence: dict) -> tuple[str, list[str]]:
    """The averaging, unless the snapshot of the fixed training images moved with the
    average: then the average was right about the training images, and the held-out images
    parted from them (memorisation). Adds that snapshot to ``evidence``."""
    cause = ("the printed epoch loss averages many weight states, sampled latents and every "
             "batch; the grid shows the last model on 8 fixed images with the posterior mean")
    remedies = ["compare epochs by the loss of a fixed evaluation set under the model as it "
                "is (eval_recon), never by the running training average"]
    mem = memorisation(data, int(s[k]), int(s[k + 1]))
    if mem is not None and data.has(TRAIN_LOSS, "evals"):
        train = data.series(TRAIN_LOSS, "evals")[keep]
        evidence["train_snapshot"] = [float(train[k]), float(train[k + 1])]
        if np.sign(train[k + 1] - train[k]) == np.sign(da[k]):
            cause = ("not the averaging: the loss of the 8 training images under the model "
                     "shown moved with the average; " + mem.describe())
            remedies = [*memorisation_remedies(data, int(s[k])), *remedies]
    return cause, remedies


def detect(data: RunData) -> tuple[list[Finding], list[Signal]]:
    data.require(EVAL_RECON, TRAIN_RECON_AVG, table="evals")
    steps = data.evals[STEP].to_numpy()
    keep = (steps >= data.burn_in_step) & np.isfinite(data.series(TRAIN_RECON_AVG, "evals"))
    if keep.sum() < MIN_EVALS:
        raise Skip(f"needs {MIN_EVALS} evaluations with a training average after the burn-in "
                   f"(step {data.burn_in_step:,}), has {int(keep.sum())}")
    s = steps[keep]
    avg = data.series(TRAIN_RECON_AVG, "evals")[keep]
    snap = data.series(EVAL_RECON, "evals")[keep]
    da, ds = np.diff(avg), np.diff(snap)
    ua, us = noise_scale(avg), noise_scale(snap)
    if not (ua > 0 and us > 0):
        return [], []
    clash = (np.sign(da) != np.sign(ds)) & (np.abs(da) >= Z_CHANGE * ua) & \
        (np.abs(ds) >= Z_CHANGE * us)
    if not clash.any():
        return [], []
    k = int(np.argmax(np.where(clash, np.abs(da) / ua + np.abs(ds) / us, -np.inf)))
    word = lambda d: "improved" if d < 0 else "got worse"  # noqa: E731
    gap = float(np.median(avg - snap))
    evidence = {"disagreements": int(clash.sum()), "of_intervals": len(da),
                "median_gap_average_minus_snapshot": gap, "z_change": Z_CHANGE}
    cause, remedies = _cause(data, s, keep, k, da, evidence)
    finding = Finding(
        kind="epoch_average_trap", severity="info", first_step=int(s[k]),
        last_step=int(s[k + 1]),
        summary=(f"between steps {int(s[k]):,} and {int(s[k + 1]):,} the averaged training loss "
                 f"{word(da[k])} ({avg[k]:.5g} -> {avg[k + 1]:.5g}) while the loss of the model "
                 f"shown {word(ds[k])} ({snap[k]:.5g} -> {snap[k + 1]:.5g}); "
                 f"{int(clash.sum())} such disagreement(s)"),
        evidence=evidence, cause=cause, remedies=remedies,
        detector=NAME, compare_steps=[int(s[k]), int(s[k + 1])])
    return [finding], []
