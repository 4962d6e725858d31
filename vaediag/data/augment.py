"""Data augmentation for faces, as people train face VAEs: horizontal flips and small shifts.

Applied to each training batch on its device. The random choices of step s are a function of
(seed, s) alone, so a resumed or replayed run augments exactly as an uninterrupted one would,
with nothing to checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: the choices of ``train.augment``
AUGMENTATIONS = ("none", "flip", "flip_shift")
#: the largest shift, as a fraction of the image size (2 px at 32 px, 4 px at 64 px)
MAX_SHIFT = 1 / 16


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step ``step``'s augmentation (a function of the seed and step)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 91)


def augment(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """``x`` (B, C, H, W) with each image flipped left-right with probability 1/2 (``flip``),
    and then shifted by up to ``MAX_SHIFT`` of its size in each direction, the border repeated
    (``flip_shift``). ``none`` returns ``x`` itself."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; choose from {', '.join(AUGMENTATIONS)}")
    if kind == "none":
        return x
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    if kind == "flip_shift":
        pad = max(1, round(MAX_SHIFT * min(h, w)))
        offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator).tolist()
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        x = torch.stack([padded[i, :, dy:dy + h, dx:dx + w]
                         for i, (dy, dx) in enumerate(offsets)])
    return x
