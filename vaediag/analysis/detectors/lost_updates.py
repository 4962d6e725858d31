"""Updates lost to the weights' precision: weights kept in bfloat16 (or float16) themselves.

bfloat16 keeps 8 bits of mantissa: a weight moves only when its update is at least half of
its resolution, about 1/512 of the weight. An Adam step of lr 1e-4 on weights of order 0.1 is
smaller, and rounds away: the optimizer runs, the loss barely moves, and nothing says why.
Mixed precision under ``torch.autocast`` keeps float32 weights and loses nothing; a model moved
to ``bfloat16`` with ``.to()`` does.

Statistic: the update probe's share of sampled entries the optimizer step left unchanged
(``update_lost``, recorded only for weights in half precision), its median over the steps
after the burn-in; at least ``LOST_SHARE`` is a finding naming the layers that lose most.
"""

from __future__ import annotations

import numpy as np

from vaediag.analysis.causes import knob
from vaediag.analysis.data import RunData
from vaediag.analysis.findings import Finding, Signal
from vaediag.analysis.kinds import Kind
from vaediag.columns import UPDATE_LOST

NAME = "lost_updates"
#: its place among the detectors: they run, and are listed, in this order
ORDER = 55
#: the kinds of finding this detector emits (see :mod:`vaediag.analysis.kinds`)
KINDS = (
    Kind("lost_updates", "optimizer", instability=13, stage="update"),
)
#: median share of entries an optimizer step leaves unchanged: most updates round away
LOST_SHARE = 0.5


def detect(data: RunData) -> tuple[list[Finding], list[Signal]]:
    if not data.has(UPDATE_LOST):  # float32 weights (autocast included): nothing is lost
        return [], []
    after = data.steps >= data.burn_in_step
    lost = data.series(UPDATE_LOST)
    measured = after & np.isfinite(lost)
    if not measured.any():
        measured = np.isfinite(lost)  # a short run: every step measured
    share = float(np.median(lost[measured]))
    if share < LOST_SHARE:
        return [], []
    layers = data.matrix("layer", UPDATE_LOST)
    per_layer = layers.to_numpy()[measured]
    medians = {name: float(np.nanmedian(per_layer[:, j]))
               for j, name in enumerate(layers.columns) if np.isfinite(per_layer[:, j]).any()}
    worst = sorted((n for n, v in medians.items() if v >= LOST_SHARE),
                   key=lambda n: -medians[n])
    steps = data.steps[measured]
    named = ", ".join(worst[:3]) + (f" and {len(worst) - 3} more" if len(worst) > 3 else "")
    return [Finding(
        kind="lost_updates", severity="warning", first_step=int(steps[0]),
        last_step=int(steps[-1]),
        summary=(f"the optimizer steps left {share:.0%} of the weights' entries unchanged "
                 f"(median over {int(measured.sum()):,} measured steps)"
                 + (f"; most in {named}" if named else "")
                 + ": updates smaller than the half-precision weights' resolution round away"),
        evidence={"lost_share": share, "layers": {n: medians[n] for n in worst},
                  "threshold": LOST_SHARE},
        cause="the weights themselves are kept in half precision: an update under about 1/512 "
              "of a bfloat16 weight (1/4,096 in float16) changes nothing",
        remedies=["keep the weights in float32 and train under torch.autocast (model.float(); "
                  "autocast computes in bfloat16 and updates float32 weights)"
                  + knob(data, "train.precision", "bf16"),
                  "if the weights must stay in half precision, use stochastic rounding or "
                  "Kahan-compensated updates (an optimizer that keeps float32 state)"],
        detector=NAME)], []
