"""Reading a step's values from the device: every tensor of a step (and the step before's held
probe values) in one transfer per device."""

from __future__ import annotations

from typing import Any

import torch


def to_floats(values: dict[Any, Any]) -> dict[str, float]:
    """Probe results as ``{column: float}``, reading tensors with one transfer per device.

    A key is a column name (value: a float or a 0-d tensor) or a tuple of column names (value:
    a 1-D tensor or array of as many values).
    """
    return read_floats([values])[0]


def read_floats(groups: list[dict[Any, Any]]) -> list[dict[str, float]]:
    """:func:`to_floats` of several dicts at once: one transfer per device for all of them."""
    outs: list[dict[str, float]] = [{} for _ in groups]
    pending: dict[torch.device, list[tuple[int, tuple[str, ...], torch.Tensor]]] = {}
    for g, values in enumerate(groups):
        out = outs[g]
        for key, value in values.items():
            names = key if isinstance(key, tuple) else (key,)
            if isinstance(value, torch.Tensor):
                pending.setdefault(value.device, []).append(
                    (g, names, value.detach().reshape(-1).float()))
            elif isinstance(key, tuple):
                out.update(zip(names, (float(v) for v in value), strict=True))
            else:
                out[key] = float(value)
    for items in pending.values():
        flat = torch.cat([v for _, _, v in items]).tolist()
        at = 0
        for g, names, _ in items:
            outs[g].update(zip(names, flat[at:at + len(names)], strict=True))
            at += len(names)
    return outs
