"""toyfaces only: how faithfully the reconstructions keep the faces' known factors.

Colour: the generator knows which pixels show skin, hair, eyes and background
(:func:`vaediag.data.toyfaces.render_parts`); the mean colour of the reconstruction over each
part is compared with the original's, as a CIEDE2000 difference (``factor_skin_de``,
``factor_hair_de``, ``factor_eye_de``, ``factor_bg_de``; NaN for a part too small to see).

Orientation: the in-plane angle and the left/right turn are recovered from the reconstruction by
analysis by synthesis: faces with the true colours, position and size are rendered over a grid
of (angle, turn), refined twice around the best match, and the one closest to the
reconstruction (least squared error) is the estimate. ``factor_angle_err`` (degrees) and
``factor_turn_err`` (turn units, the range is -1..1) are the mean absolute errors; on the
original images themselves the estimator was measured within 2.1 degrees and 0.07 turn.
The fixed training images, when the Monitor has them with their factors, are scored the same
way (means as ``train_factor_*``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from skimage.color import deltaE_ciede2000, rgb2lab

from vaediag.data import toyfaces
from vaediag.data.toyfaces import PARTS, FaceFactors
from vaediag.probes.base import Probe, ProbeSetup, per_index
from vaediag.probes.context import EvalContext

_COLOUR_PARTS = {"skin": "skin", "hair": "hair", "eye": "eye", "bg": "background"}
_MASK_MIN = 0.95  # a pixel counts for a part when the part covers at least this much of it


def part_colour_errors(x: np.ndarray, y: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """Per image CIEDE2000 between the mean colours of ``x`` and ``y`` over each part.

    x, y: (N, 3, H, W) in [0, 1]; masks: (N, len(PARTS), H, W). Returns {short name: (N,)}.
    """
    out = {}
    for short, part in _COLOUR_PARTS.items():
        m = masks[:, PARTS.index(part)] >= _MASK_MIN  # (N, H, W)
        count = m.sum((1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_x = (x * m[:, None]).sum((2, 3)) / count[:, None]
            mean_y = (y * m[:, None]).sum((2, 3)) / count[:, None]
        de = deltaE_ciede2000(rgb2lab(np.clip(mean_x, 0, 1)), rgb2lab(np.clip(mean_y, 0, 1)))
        out[short] = np.where(count > 0, de, np.nan)
    return out


def estimate_pose(target: np.ndarray, factors: FaceFactors) -> tuple[np.ndarray, np.ndarray]:
    """(angle, turn) per image that best explain ``target`` (N, 3, H, W) given the other factors.

    Coarse grid (10 degrees x 0.5 turn), then two refinements halving the steps around the best.
    """
    n, res = len(factors), target.shape[-1]
    coarse_a, coarse_t = np.meshgrid(np.arange(-30.0, 30.01, 10.0), np.arange(-1.0, 1.01, 0.5),
                                     indexing="ij")
    cand_a = np.tile(coarse_a.ravel(), (n, 1))  # (N, K) candidate angles per image
    cand_t = np.tile(coarse_t.ravel(), (n, 1))
    step_a, step_t = 10.0, 0.5
    best_angle, best_turn = np.zeros(n), np.zeros(n)
    for refinement in range(3):
        if refinement:  # a 3x3 neighbourhood around the best so far, at half the step
            step_a, step_t = step_a / 2, step_t / 2
            da, dt = np.meshgrid([-step_a, 0.0, step_a], [-step_t, 0.0, step_t], indexing="ij")
            cand_a = np.clip(best_angle[:, None] + da.ravel(), *toyfaces.ANGLE_RANGE)
            cand_t = np.clip(best_turn[:, None] + dt.ravel(), *toyfaces.TURN_RANGE)
        k = cand_a.shape[1]
        repeat = factors.subset(np.repeat(np.arange(n), k))
        candidates = FaceFactors(**{**repeat.__dict__, "angle": cand_a.ravel(),
                                    "turn": cand_t.ravel()})
        images = toyfaces.render(candidates, res).reshape(n, k, 3, res, res)
        diff = images.astype(np.float32) / np.float32(255.0) - target[:, None].astype(np.float32)
        err = np.einsum("nkchw,nkchw->nk", diff, diff)  # (N, K) sum of squared errors
        pick = err.argmin(1)
        best_angle = cand_a[np.arange(n), pick]
        best_turn = cand_t[np.arange(n), pick]
    return best_angle, best_turn


def _nanmean(values: np.ndarray) -> float:
    """Mean of the finite values; NaN when there are none (a part too small to see)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def factor_errors(x: torch.Tensor, recon: torch.Tensor,
                  table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per image: each part's colour error, their mean (``colour_de``), and the pose errors
    (``angle_err``, ``turn_err``) of reconstructions ``recon`` of faces ``x`` (both in [0, 1])
    with known factors ``table``."""
    factors = FaceFactors.from_table(table)
    x_np = x.detach().double().cpu().numpy()
    y = recon.detach().double().cpu().clamp(0, 1).numpy()
    masks = toyfaces.render_parts(factors, x_np.shape[-1])
    out = {f"{short}_de": de for short, de in part_colour_errors(x_np, y, masks).items()}
    out["colour_de"] = np.array([_nanmean(v) for v in
                                 np.stack([out[f"{s}_de"] for s in _COLOUR_PARTS], 1)])
    angle, turn = estimate_pose(y, factors)
    out["angle_err"] = np.abs(angle - factors.angle)
    out["turn_err"] = np.abs(turn - factors.turn)
    return out


class FactorFidelity(Probe[EvalContext]):
    name = "factors"
    needs = frozenset({"eval"})

    def setup(self, info: ProbeSetup) -> str | None:
        if not info.has_factors:
            return "the data has no known factors (toyfaces only)"
        return None

    def compute(self, ctx: EvalContext) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if ctx.factors:
            errors = factor_errors(ctx.x, ctx.recon, ctx.factors)
            for short in _COLOUR_PARTS:
                out[f"factor_{short}_de"] = _nanmean(errors[f"{short}_de"])
            for stat in ("angle_err", "turn_err"):
                out[f"factor_{stat}"] = float(errors[stat].mean())
            for stat in ("colour_de", "angle_err", "turn_err"):
                out.update(per_index("img", f"factor_{stat}",
                                     torch.from_numpy(errors[stat]).float()))
        if ctx.train is not None and ctx.train.factors:  # the training images: means only
            errors = factor_errors(ctx.train.x, ctx.train.recon, ctx.train.factors)
            for short in _COLOUR_PARTS:
                out[f"train_factor_{short}_de"] = _nanmean(errors[f"{short}_de"])
            for stat in ("angle_err", "turn_err"):
                out[f"train_factor_{stat}"] = float(errors[stat].mean())
        return out
