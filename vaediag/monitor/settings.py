"""The optimizer's settings, read from the optimizer itself, for a run recorded from a user's
loop: its class and hyperparameters go into the run's ``config.toml`` as an ``[optim]``
section (``name``, ``lr``, ``betas``, ``eps``, ``weight_decay``, ...), so reports and
``vaediag compare`` show and compare them as they do ``vaediag train``'s; a later change of a
hyperparameter that is not recorded at every step (the learning rate and eps are) is recorded
as an ``optimizer_settings`` event when the next evaluation sees it.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from vaediag.columns import EPS, LR

#: recorded at every step already (``lr``, ``eps`` columns): a schedule is no event
PER_STEP = frozenset({LR, EPS})


def _toml(value: Any) -> Any:
    """A TOML value for a hyperparameter, or None for one TOML cannot hold (None, objects)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Real):
        return float(value) if not isinstance(value, numbers.Integral) else int(value)
    if isinstance(value, (tuple, list)) and value and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    return None


def optimizer_settings(optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """``{"name": "Adam", "lr": 0.001, "betas": [0.9, 0.999], ...}`` of the first parameter
    group (with ``param_groups`` when there are several); {} without an optimizer."""
    if optimizer is None or not optimizer.param_groups:
        return {}
    out: dict[str, Any] = {"name": type(optimizer).__name__}
    for key, value in optimizer.param_groups[0].items():
        if key == "params":
            continue
        toml = _toml(value)
        if toml is not None:
            out[key] = toml
    if len(optimizer.param_groups) > 1:
        out["param_groups"] = len(optimizer.param_groups)
    return out


class SettingsWatch:
    """What changed in the optimizer's settings since they were last seen (beyond the
    per-step columns)."""

    def __init__(self, optimizer: torch.optim.Optimizer | None):
        self.optimizer = optimizer
        self.seen = optimizer_settings(optimizer)

    def changes(self) -> dict[str, list[Any]]:
        """{hyperparameter: [before, now]} for each that changed since the last call."""
        now = optimizer_settings(self.optimizer)
        changed = {key: [self.seen.get(key), value] for key, value in now.items()
                   if key not in PER_STEP and self.seen.get(key) != value}
        self.seen = now
        return changed


__all__ = ["SettingsWatch", "optimizer_settings"]
