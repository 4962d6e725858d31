"""Learning-rate and KL-weight schedules as pure functions of the step.

Being functions of the step alone, they need no state in checkpoints: a resumed run computes the
same values as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config imports nothing that imports it back
    from vaediag.config import LossConfig, OptimConfig


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for the update made at ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.step_gamma ** ((step - cfg.warmup_steps) // cfg.step_every)
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        floor = cfg.lr * cfg.min_lr_ratio
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {cfg.schedule!r}")


def beta_at(step: int, cfg: LossConfig) -> float:
    """KL weight for ``step``: constant, a linear warm-up from 0, or cyclical annealing."""
    if cfg.beta_schedule == "constant":
        return cfg.beta
    if cfg.beta_schedule == "warmup":
        return cfg.beta * min(1.0, step / cfg.beta_warmup_steps)
    if cfg.beta_schedule == "cyclical":  # Fu et al. 2019: ramp for a fraction, then hold
        phase = (step % cfg.beta_cycle_steps) / cfg.beta_cycle_steps
        return cfg.beta * min(1.0, phase / cfg.beta_cycle_ratio)
    raise ValueError(f"unknown beta schedule {cfg.beta_schedule!r}")
