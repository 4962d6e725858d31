"""The numeric precision of ``vaediag train`` (``train.precision``): the forward pass under
``torch.autocast`` in bfloat16 or float16, the loss terms in float32, and for float16 a
``torch.amp.GradScaler`` that scales the loss before the backward pass, skips a step whose
gradients overflowed and adjusts its scale (its state is in every checkpoint, so a resumed run
continues exactly). ``fp32`` changes nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from vaediag.errors import UserError

#: ``train.precision``: the autocast dtype of each (None: no autocast)
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                         "fp16": torch.float16}


class Precision:
    """One run's precision on its device."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.device = name, device
        self.dtype = DTYPES[name]
        #: float16's loss scaler (None otherwise: bfloat16 has float32's range)
        self.scaler: torch.amp.GradScaler | None = None
        if name == "fp16":
            try:
                self.scaler = torch.amp.GradScaler(device.type)
            except (RuntimeError, ValueError) as exc:
                raise UserError(f"train.precision = 'fp16' needs a GradScaler on "
                                f"{device.type}: {exc}; use 'bf16' or 'fp32'") from None

    @contextmanager
    def forward(self) -> Iterator[None]:
        """The model's forward pass: under autocast, or as it is."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.dtype):
            yield

    def backward(self, loss: torch.Tensor, retain_graph: bool) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward(
            retain_graph=retain_graph)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The update: the scaler's (skipped when the gradients overflowed, then the scale
        adjusted), or the optimizer's own."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint's scaler state (a run resumed or replayed in float16; none when the
        checkpoint was saved in another precision: the scaler starts afresh)."""
        if self.scaler is not None and state.get("scaler"):
            with contextlib.suppress(KeyError):
                self.scaler.load_state_dict(state["scaler"])
