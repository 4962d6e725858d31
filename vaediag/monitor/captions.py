"""The text around the 4x8 grid: its header (where the model is, the losses of its images and of
training), the row labels, and the caption under each reconstruction."""

from __future__ import annotations

import math
from typing import Any

from vaediag.columns import EVAL_RECON, QUALITY_METRICS, TRAIN_EVAL_RECON, TRAIN_RECON_AVG
from vaediag.grid import COLS

#: under each reconstruction: its own loss, then these metrics (with their digits)
CAPTIONED = (("ssim", 3), ("lpips", 3))


def fmt(value: float) -> str:
    """A loss for people: ``1,234.5``, ``0.123``, ``0.00123``."""
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 100:
        return f"{value:,.1f}"
    return f"{value:.3g}" if abs(value) < 0.01 and value != 0 else f"{value:.3f}"


def header(row: dict[str, Any]) -> list[str]:
    """The grid's header lines from an evaluation row."""
    where = f"step {row['step']:,}"
    if "epoch" in row:
        where = f"epoch {row['epoch']:.2f}  ·  " + where
    lines = [where]
    if EVAL_RECON in row:
        lines.append(f"these 8 held-out images, model as shown: recon {fmt(row['eval_recon'])}  ·  "
                     f"KL {fmt(row['eval_kl'])}")
    else:
        lines.append("these 8 images: no eval loss function given")
    if TRAIN_EVAL_RECON in row:
        lines.append(f"8 training images, model as shown: recon {fmt(row['train_eval_recon'])}"
                     f"  ·  KL {fmt(row['train_eval_kl'])}")
    if TRAIN_RECON_AVG in row:
        lines.append(f"training average of the last {row['train_avg_steps']:,} steps: "
                     f"recon {fmt(row['train_recon_avg'])}  ·  KL {fmt(row['train_kl_avg'])}")
    else:
        lines.append("training average: no steps yet")
    return lines


def row_labels(recon_mode: str) -> list[str]:
    second = "posterior mean" if recon_mode == "mean" else "sample of q(z|x)"
    return ["validation\n8 fixed images", f"reconstruction\n{second}",
            "decode(z=0)\nthe average face", "decode(fixed z)\n8 fixed z~N(0,I)"]


def image_captions(row: dict[str, Any]) -> list[list[str]]:
    """Under each reconstruction: its own loss and ``CAPTIONED`` metrics (or 'n/a')."""
    captions = []
    for i in range(COLS):
        value = row.get(f"img.recon/{i}")
        lines = [f"rec {'n/a' if value is None else fmt(value)}"]
        for metric, digits in CAPTIONED:
            label = QUALITY_METRICS[metric].short
            value = row.get(f"img.{metric}/{i}")
            lines.append(f"{label} n/a" if value is None else f"{label} {value:.{digits}f}")
        captions.append(lines)
    return captions
