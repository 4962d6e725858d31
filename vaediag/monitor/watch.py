"""What a step's values say once they are read: whether a loss term or the gradients went
non-finite (and where it started), a negative KL, the running sums for the next evaluation's
averages, and whether the step is unusual (so its ``when_unusual`` probes run)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vaediag.columns import (
    GRAD_NORM,
    KL,
    LOSS_SCALE,
    LOSS_TERMS,
    RECON,
    SCALER_SKIPPED,
    TRAIN_AVG_STEPS,
    TRAIN_KL_AVG,
    TRAIN_RECON_AVG,
)
from vaediag.monitor.gradients import nonfinite_origin
from vaediag.monitor.probing import EventWriter, UnusualSteps


@dataclass
class StepCheck:
    """What :meth:`Monitor.after_backward` saw: the trainer applies its non-finite policy to it."""

    grad_norm: float
    nonfinite: list[str] = field(default_factory=list)  # e.g. ["kl", "grad:decoder.fc.weight"]
    #: the step's values are not known yet: the Monitor reads nothing during a step
    #: (``read_before_step=False``); they are checked and recorded when the next step reads them
    pending: bool = False
    #: mixed precision: the gradients overflowed the loss scale, so ``scaler.step()`` skips
    #: this step and ``scaler.update()`` lowers the scale. The scaler at work, not a fault:
    #: ``nonfinite`` stays empty (unless a loss term itself is not finite), so a loop that
    #: skips non-finite steps still calls ``scaler.step()`` and ``scaler.update()``
    scaler_skip: bool = False


class StepWatch:
    """Judges each step's row once it is read (see the module's docstring)."""

    def __init__(self, params: list[tuple[str, nn.Parameter]], order: dict[str, int],
                 writer: EventWriter, *, scan_weights: bool, say: Callable[[str], None],
                 warn: Callable[..., None]):
        self.params, self.order, self.writer = params, order, writer
        #: read a step late (``read_before_step=False``), the weights are already those after
        #: the update: not scanned
        self.scan_weights = scan_weights
        self.say, self.warn = say, warn
        #: whether the last step read was non-finite (a new episode is said at once)
        self.episode = False
        #: whether the current step is unusual (see probing.UnusualSteps)
        self.unusual = False
        self.unusual_steps = UnusualSteps()
        self.sums = [0.0, 0.0, 0]  # recon, kl, count since the last evaluation

    def check(self, step: int, row: dict[str, Any], norms: torch.Tensor | None,
              where: dict[str, list[int]], scaled: bool = False) -> StepCheck:
        """Whether a loss term or the gradients went non-finite, and where it started; each
        such term recorded as a ``nonfinite`` event (naming the ranks it appeared on).
        ``scaled``: a loss scaler is on, and gradients that overflowed are its skip
        (:meth:`_scaler_skip`), not a fault."""
        check = StepCheck(grad_norm=row.get(GRAD_NORM, math.nan))
        for term in LOSS_TERMS:
            if term in row and not math.isfinite(row[term]):
                check.nonfinite.append(term)
        if scaled and self._scaler_skip(step, row, norms, check) and not check.nonfinite:
            self._say_nonfinite(step, [])
            return check
        if check.nonfinite or not grads_finite(norms, check):
            check.nonfinite += nonfinite_origin(self.params, norms, self.order,
                                                weights=self.scan_weights) or ["grad"]
        for term in check.nonfinite:
            ranks = {"ranks": where[term]} if term in where else {}
            self.writer.event("nonfinite", step, term=term, recon=row[RECON], kl=row[KL],
                              grad_norm=check.grad_norm, **ranks)
        self._say_nonfinite(step, check.nonfinite)
        return check

    def _scaler_skip(self, step: int, row: dict[str, Any], norms: torch.Tensor | None,
                     check: StepCheck) -> bool:
        """Under a loss scaler: whether the scaler skips this step (its gradients are not
        finite), recorded in the row's ``scaler_skipped`` and, when it does, as a
        ``scaler_skip`` event naming the gradient that overflowed first."""
        skipped = not grads_finite(norms, check)
        row[SCALER_SKIPPED] = float(skipped)
        if skipped:
            check.scaler_skip = True
            origin = nonfinite_origin(self.params, norms, self.order, weights=False)
            self.writer.event("scaler_skip", step, loss_scale=row.get(LOSS_SCALE),
                              origin=origin[0] if origin else "grad")
        return skipped

    def _say_nonfinite(self, step: int, terms: list[str]) -> None:
        """A non-finite step is said at once, once per episode (the first step after finite
        ones), not at the next evaluation's analysis."""
        if terms and not self.episode:
            shown = ", ".join(terms[:3]) + (f" and {len(terms) - 3} more" if len(terms) > 3
                                            else "")
            self.say(f"non-finite values at step {step}: {shown} (recorded; vaediag analyze "
                     f"names where it started and why)")
        self.episode = bool(terms)

    def watch(self, step: int, row: dict[str, Any], check: StepCheck) -> None:
        """What the step's row says beyond itself: a negative KL (said once), the running
        sums for the next evaluation's averages, and whether the step is unusual."""
        recon, kl = row[RECON], row[KL]
        if math.isfinite(kl) and kl < -1e-3 * max(1.0, abs(recon)):
            self.warn("negative_kl", step, f"the KL given at step {step} is negative "
                      f"({kl:.4g}): an analytic KL never is (check its sign and reduction); a "
                      f"single-sample Monte Carlo estimate can be", kl=kl)
        if math.isfinite(recon) and math.isfinite(kl):
            sums = self.sums
            sums[0] += recon
            sums[1] += kl
            sums[2] += 1
        self.unusual = self.unusual_steps.judge(row, check.grad_norm, bool(check.nonfinite))

    def averages(self) -> dict[str, float | int]:
        """The training loss terms averaged since the last evaluation (none when no step was
        finite), and the sums started again."""
        recon_sum, kl_sum, count = self.sums
        self.sums = [0.0, 0.0, 0]
        if not count:
            return {}
        return {TRAIN_RECON_AVG: recon_sum / count, TRAIN_KL_AVG: kl_sum / count,
                TRAIN_AVG_STEPS: int(count)}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": list(self.sums), **self.unusual_steps.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        recon, kl, count = state["sums"]
        self.sums = [float(recon), float(kl), int(count)]
        self.unusual_steps.load_state_dict(state)


def grads_finite(norms: torch.Tensor | None, check: StepCheck) -> bool:
    """Whether the gradients were finite (True when there were none)."""
    return norms is None or math.isfinite(check.grad_norm)
