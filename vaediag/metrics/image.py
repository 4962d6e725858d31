"""Per-image quality metrics of a reconstruction against its original, as pure functions.

Every function takes two batches of RGB images in [0, 1], shaped (N, 3, H, W) (torch tensors),
and returns one value per image. The conventions, so the numbers mean the same everywhere:

- ``ssim``: Gaussian-window SSIM (11x11, sigma 1.5, K1 0.01, K2 0.03), mean over the three
  channels; equal to ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, channel_axis=0, data_range=1)``.
- ``psnr``: 10 log10(1 / MSE) in dB over all pixels and channels.
- ``gmsd``: gradient magnitude similarity deviation (Xue et al. 2014), 0 = identical.
- ``haarpsi``: Haar wavelet perceptual similarity (Reisenhofer et al. 2018), 1 = identical.
- ``colour_de``: mean CIEDE2000 colour difference over pixels, in Lab (D65), as
  ``skimage.color.deltaE_ciede2000(rgb2lab(a), rgb2lab(b))``; about 1 is barely visible, 10+
  is a different colour.
- ``sat_ratio``: mean HSV saturation of the reconstruction over that of the original: below 1
  the reconstruction lost colour.
- ``orient_err``: difference in degrees (0..90) between the principal axes of the two images'
  foreground (pixels weighted by their colour distance from the image border's mean colour),
  from second-order central moments; ``centroid_err``: distance between the foregrounds'
  centroids, in pixels.
"""

from __future__ import annotations

import math

import piq
import torch


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # float32: agrees with float64 to ~1e-6, and float64 convolutions are slow on CPUs.
    return piq.ssim(x.float(), y.float(), data_range=1.0, reduction="none", downsample=False)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))).float()


def gmsd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return piq.gmsd(x, y, data_range=1.0, reduction="none")


def haarpsi(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """HaarPSI; its three wavelet scales need images of at least 32 px (NaN below)."""
    if min(x.shape[-2:]) < 32:
        return torch.full((x.shape[0],), math.nan)
    return piq.haarpsi(x, y, data_range=1.0, reduction="none")


_SRGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                             [0.212671, 0.715160, 0.072169],
                             [0.019334, 0.119193, 0.950227]])
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883])


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], (N, 3, H, W) -> CIE Lab under D65, (N, 3, H, W) (as skimage.rgb2lab)."""
    x = x.float().clamp(0, 1)
    linear = torch.where(x > 0.04045, ((x + 0.055) / 1.055).pow(2.4), x / 12.92)
    xyz = torch.einsum("ij,njhw->nihw", _SRGB_TO_XYZ.to(x.device), linear)
    xyz = xyz / _WHITE_D65.to(x.device).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12).pow(1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]),
                        200 * (f[:, 1] - f[:, 2])], 1)


def ciede2000(lab1: torch.Tensor, lab2: torch.Tensor) -> torch.Tensor:
    """CIEDE2000 colour difference of Lab colours along dim 1 (Sharma et al. 2005; kL=kC=kH=1)."""
    lab1, lab2 = lab1.float(), lab2.float()
    l1, a1, b1 = lab1.unbind(1)
    l2, a2, b2 = lab2.unbind(1)
    c_bar = (torch.hypot(a1, b1) + torch.hypot(a2, b2)) / 2
    g = 0.5 * (1 - torch.sqrt(c_bar**7 / (c_bar**7 + 25.0**7)))
    a1p, a2p = a1 * (1 + g), a2 * (1 + g)
    c1p, c2p = torch.hypot(a1p, b1), torch.hypot(a2p, b2)
    h1p = torch.remainder(torch.atan2(b1, a1p), 2 * math.pi)
    h2p = torch.remainder(torch.atan2(b2, a2p), 2 * math.pi)
    dl = l2 - l1
    dc = c2p - c1p
    dh = h2p - h1p
    dh = torch.where(dh > math.pi, dh - 2 * math.pi, torch.where(dh < -math.pi, dh + 2 * math.pi,
                                                                 dh))
    dh = torch.where(c1p * c2p == 0, torch.zeros_like(dh), dh)
    dH = 2 * torch.sqrt(c1p * c2p) * torch.sin(dh / 2)
    l_bar = (l1 + l2) / 2
    cp_bar = (c1p + c2p) / 2
    h_sum = h1p + h2p
    h_bar = torch.where(torch.abs(h1p - h2p) > math.pi, (h_sum + 2 * math.pi) / 2, h_sum / 2)
    h_bar = torch.where(c1p * c2p == 0, h_sum, h_bar)
    t = (1 - 0.17 * torch.cos(h_bar - math.radians(30)) + 0.24 * torch.cos(2 * h_bar)
         + 0.32 * torch.cos(3 * h_bar + math.radians(6))
         - 0.20 * torch.cos(4 * h_bar - math.radians(63)))
    d_theta = math.radians(30) * torch.exp(-(((torch.rad2deg(h_bar) - 275) / 25) ** 2))
    r_c = 2 * torch.sqrt(cp_bar**7 / (cp_bar**7 + 25.0**7))
    s_l = 1 + 0.015 * (l_bar - 50) ** 2 / torch.sqrt(20 + (l_bar - 50) ** 2)
    s_c = 1 + 0.045 * cp_bar
    s_h = 1 + 0.015 * cp_bar * t
    r_t = -torch.sin(2 * d_theta) * r_c
    return torch.sqrt((dl / s_l) ** 2 + (dc / s_c) ** 2 + (dH / s_h) ** 2
                      + r_t * (dc / s_c) * (dH / s_h))


def colour_de(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean CIEDE2000 difference over pixels, per image."""
    return ciede2000(rgb_to_lab(x), rgb_to_lab(y)).flatten(1).mean(1)


def saturation(x: torch.Tensor) -> torch.Tensor:
    """Mean HSV saturation, (max - min) / max over the channels, per image."""
    hi = x.amax(1)
    lo = x.amin(1)
    sat = torch.where(hi > 1e-6, (hi - lo) / hi.clamp_min(1e-6), torch.zeros_like(hi))
    return sat.flatten(1).mean(1)


def sat_ratio(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Saturation of the reconstruction ``y`` relative to the original ``x``."""
    return saturation(y) / saturation(x).clamp_min(1e-6)


def foreground_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(axis angle in degrees, centroid x, centroid y) of each image's foreground.

    Foreground weight = a pixel's RGB distance from the mean colour of the image's border,
    so the measure needs no segmentation and works for any subject on a plainer background.
    The angle is that of the principal axis of the weight's second central moments,
    0.5 * atan2(2 mu11, mu20 - mu02), in image coordinates (y down), in (-90, 90].
    """
    n, _, h, w = x.shape
    xd = x.double()
    border = torch.cat([xd[:, :, 0, :], xd[:, :, -1, :], xd[:, :, :, 0], xd[:, :, :, -1]], 2)
    weight = (xd - border.mean(2)[:, :, None, None]).pow(2).sum(1).sqrt()  # (N, H, W)
    total = weight.flatten(1).sum(1).clamp_min(1e-12)
    ys = torch.arange(h, dtype=torch.float64).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float64).view(1, 1, w)
    cx = (weight * xs).flatten(1).sum(1) / total
    cy = (weight * ys).flatten(1).sum(1) / total
    dx = xs - cx.view(n, 1, 1)
    dy = ys - cy.view(n, 1, 1)
    mu20 = (weight * dx * dx).flatten(1).sum(1) / total
    mu02 = (weight * dy * dy).flatten(1).sum(1) / total
    mu11 = (weight * dx * dy).flatten(1).sum(1) / total
    angle = torch.rad2deg(0.5 * torch.atan2(2 * mu11, mu20 - mu02))
    return angle.float(), cx.float(), cy.float()


def orientation_errors(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(axis angle difference in degrees, 0..90; centroid distance in pixels) per image."""
    ax, cxx, cyx = foreground_moments(x)
    ay, cxy, cyy = foreground_moments(y)
    diff = torch.remainder(ay - ax, 180.0)
    angle_err = torch.minimum(diff, 180.0 - diff)  # axes are undirected
    centroid_err = torch.sqrt((cxy - cxx) ** 2 + (cyy - cyx) ** 2)
    return angle_err, centroid_err
