"""Mixed precision's loss scaling (``torch.amp.GradScaler``), as the Monitor sees it.

A float16 loop multiplies its loss by the scaler's scale before ``backward()``, so the gradients
the Monitor finds at ``after_backward`` are scaled, unless the loop already called
``scaler.unscale_(optimizer)`` (clipping loops do). The Monitor records the gradients the
optimizer applies: it divides what it measures by the scale when the gradients still carry it,
and never when ``unscale_`` already removed it. The scale is read from the scaler's own tensor,
packed with the step's other values (``scaler.get_scale()`` would synchronise the device).

A step whose gradients are not finite under an enabled scaler is skipped by ``scaler.step()``,
which then halves the scale: that is the scaler at work (its first steps calibrate the scale
this way), recorded as a scaler skip, not as a non-finite fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vaediag.errors import UserError


@dataclass(frozen=True)
class GradScale:
    """The loss scale at a step: its tensor on the device, and whether the gradients still
    carry it (``scaler.unscale_(optimizer)`` not called yet)."""

    value: torch.Tensor
    applied: bool


class LossScaling:
    """A loop's GradScaler and the optimizer whose gradients it scales."""

    def __init__(self, scaler: Any, optimizer: torch.optim.Optimizer | None):
        if not all(hasattr(scaler, name) for name in ("scale", "unscale_", "step", "update",
                                                      "is_enabled")):
            raise UserError(f"scaler= must be a torch.amp.GradScaler, got "
                            f"{type(scaler).__name__}")
        if optimizer is None:
            raise UserError("scaler= needs the optimizer too: pass Monitor(run_dir, model, "
                            "optimizer, scaler=scaler)")
        self.scaler, self.optimizer = scaler, optimizer

    @property
    def enabled(self) -> bool:
        return bool(self.scaler.is_enabled())

    def now(self) -> GradScale | None:
        """The scale at this step, or None when there is none (a disabled scaler, or one whose
        ``scale()`` was never called)."""
        value = getattr(self.scaler, "_scale", None) if self.enabled else None
        if value is None:
            return None
        state = self.scaler._per_optimizer_states.get(id(self.optimizer), {})
        unscaled = getattr(state.get("stage"), "name", "READY") == "UNSCALED"
        return GradScale(value.reshape(()), applied=not unscaled)
