"""Quality of the grid's reconstructions, per image, at every evaluation.

Pixel losses barely move when a reconstruction loses its colour or turns the face; these
numbers do. Per image (``img.<metric>/<i>``, printed under the grid) and averaged (``<metric>``):
SSIM, PSNR, GMSD, HaarPSI (32 px and up), LPIPS (when its weights are available), CIEDE2000
colour error, saturation ratio, foreground orientation and centroid errors. See
:mod:`vaediag.metrics.image` for the exact definitions. With a larger evaluation set
(``probes.metric_images``), set-level means are recorded as ``set_<metric>``; for the fixed
training images (``Monitor(train_images=...)``), means as ``train_<metric>``.
"""

from __future__ import annotations

from typing import Any

import torch

from vaediag.metrics import image
from vaediag.metrics.lpips import LPIPSMetric
from vaediag.probes.base import Probe, ProbeSetup, per_index
from vaediag.probes.context import EvalContext


def quality(x: torch.Tensor, y: torch.Tensor, lpips: LPIPSMetric | None) -> dict[str, torch.Tensor]:
    """Per-image quality metrics of reconstructions ``y`` of originals ``x``. An image with a
    NaN or Inf pixel (a model gone non-finite) has NaN metrics; the others are measured."""
    x, y = x.detach().float().cpu().clamp(0, 1), y.detach().float().cpu().clamp(0, 1)
    broken = ~(torch.isfinite(x).flatten(1).all(1) & torch.isfinite(y).flatten(1).all(1))
    if bool(broken.any()):
        out = quality(torch.nan_to_num(x), torch.nan_to_num(y), lpips)
        return {k: v.float().masked_fill(broken, float("nan")) for k, v in out.items()}
    orient, centroid = image.orientation_errors(x, y)
    out = {
        "ssim": image.ssim(x, y), "psnr": image.psnr(x, y), "gmsd": image.gmsd(x, y),
        "haarpsi": image.haarpsi(x, y), "colour_de": image.colour_de(x, y),
        "sat_ratio": image.sat_ratio(x, y), "orient_err": orient, "centroid_err": centroid,
    }
    if lpips is not None:
        out["lpips"] = lpips(x, y)
    return out


class ImageQuality(Probe[EvalContext]):
    name = "image_quality"
    needs = frozenset({"eval"})

    def setup(self, info: ProbeSetup) -> str | None:
        info.load_lpips()  # LPIPS when its weights are to be had (ctx.lpips); the rest always
        return None

    def compute(self, ctx: EvalContext) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for metric, values in quality(ctx.x, ctx.recon, ctx.lpips).items():
            out[metric] = values.mean()
            out.update(per_index("img", metric, values))
        if ctx.train is not None:  # the fixed training images, as means only
            for metric, values in quality(ctx.train.x, ctx.train.recon, ctx.lpips).items():
                out[f"train_{metric}"] = values.mean()
        extra = ctx.eval_set()
        if extra is not None:
            for metric, values in quality(extra[0], extra[1], ctx.lpips).items():
                out[f"set_{metric}"] = values.mean()
        return out
