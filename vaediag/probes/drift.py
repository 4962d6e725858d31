"""Generation drift: how much decode(0) and decode(fixed z) changed since the last evaluation.

The same z decoded by a model that is slowly learning changes a little from one evaluation to
the next; a sharp change means the decoder moved a lot in between. Pixel distance: RMSE in
[0, 1] units. Perceptual distance: LPIPS when available, and 1 - SSIM always. The previous
evaluation's images are compared as the grid stores them (8-bit), and kept in checkpoints so a
resumed run continues the series.
"""

from __future__ import annotations

from typing import Any

import torch

from vaediag.metrics import image
from vaediag.probes.base import Probe, ProbeSetup, Schedule
from vaediag.probes.context import EvalContext


def _u8(x: torch.Tensor) -> torch.Tensor:
    return (x.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)


class GenerationDrift(Probe[EvalContext]):
    name = "drift"
    needs = frozenset({"eval"})

    def __init__(self, schedule: Schedule | None = None) -> None:
        super().__init__(schedule)
        self.previous: dict[str, torch.Tensor] = {}

    def setup(self, info: ProbeSetup) -> str | None:
        info.load_lpips()  # the perceptual distance when LPIPS is available (ctx.lpips)
        return None

    def compute(self, ctx: EvalContext) -> dict[str, Any]:
        now = {"zero": _u8(ctx.zero), "fixed": _u8(ctx.fixed)}
        out: dict[str, Any] = {}
        for key, current in now.items():
            before = self.previous.get(key)
            if before is None or before.shape != current.shape:
                continue
            a, b = before.float() / 255, current.float() / 255
            out[f"drift_{key}_rmse"] = (a - b).pow(2).flatten(1).mean(1).sqrt().mean()
            out[f"drift_{key}_ssim_dist"] = (1 - image.ssim(a, b)).mean()
            if ctx.lpips is not None:
                out[f"drift_{key}_lpips"] = ctx.lpips(a, b).mean()
        self.previous = now
        return out

    def state_dict(self) -> dict[str, Any]:
        return dict(self.previous)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
