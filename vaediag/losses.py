"""The VAE's loss terms as pure functions of tensors, shared by the trainer and the probes.

All per-sample quantities are summed over pixels (or latent dimensions) and then averaged over
the batch, the convention of the TensorFlow CVAE tutorial and of most VAE code. ``mse_mean`` is
the one exception: it averages over pixels too, as ``F.mse_loss`` does by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # config imports nothing that imports it back
    from vaediag.config import LossConfig


_LOG_2PI = math.log(2.0 * math.pi)


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Closed-form KL(N(mu, exp(logvar)) || N(0, 1)) per sample and dimension, shape (B, D)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_mc_per_dim(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Single-sample Monte Carlo KL, log q(z|x) - log p(z), per sample and dimension, (B, D).

    Unbiased but noisy (it can be negative for one sample); this is what the TensorFlow CVAE
    tutorial optimises.
    """
    log_q = -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + _LOG_2PI)
    log_p = -0.5 * (z.pow(2) + _LOG_2PI)
    return log_q - log_p


def recon_per_sample(
    logits: torch.Tensor, x: torch.Tensor, kind: str, log_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Reconstruction loss per sample, shape (B,). ``logits`` are the decoder's raw outputs.

    ``bce``: binary cross-entropy with logits on [0, 1] targets, summed over pixels. On targets
    that are not 0 or 1 its minimum is the targets' entropy, not 0: the loss has a floor that
    depends on the image, which is one reason it tracks quality poorly.
    ``mse_sum`` / ``mse_mean``: squared error of sigmoid(logits), summed / averaged over pixels.
    ``gaussian``: negative log-likelihood under N(sigmoid(logits), exp(log_scale)^2), summed.
    """
    dims = tuple(range(1, x.dim()))
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dims)
    mean = torch.sigmoid(logits)
    if kind == "mse_sum":
        return (mean - x).pow(2).sum(dims)
    if kind == "mse_mean":
        return (mean - x).pow(2).mean(dims)
    if kind == "gaussian":
        if log_scale is None:
            raise ValueError("gaussian reconstruction needs the decoder's log_scale")
        nll = 0.5 * ((x - mean) * torch.exp(-log_scale)).pow(2) + log_scale + 0.5 * _LOG_2PI
        return nll.sum(dims)
    raise ValueError(f"unknown reconstruction loss {kind!r}")


@dataclass
class LossTerms:
    """One step's loss terms. Scalars are batch means; ``kl_dims`` is per latent dimension."""

    recon: torch.Tensor  # reconstruction term
    kl: torch.Tensor  # the KL estimate (analytic or single-sample MC), before free bits
    kl_penalty: torch.Tensor  # the KL term that enters the loss (free bits applied)
    kl_dims: torch.Tensor  # (D,) batch-mean KL estimate per dimension
    beta: float
    total: torch.Tensor  # recon + beta * kl_penalty: what is differentiated


def loss_terms(
    logits: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    z: torch.Tensor,
    cfg: LossConfig,
    beta: float,
    log_scale: torch.Tensor | None = None,
) -> LossTerms:
    """Compute the loss of one batch as configured in ``cfg`` with KL weight ``beta``."""
    recon = recon_per_sample(logits, x, cfg.recon, log_scale).mean()
    per_dim = kl_per_dim(mu, logvar) if cfg.kl == "analytic" else kl_mc_per_dim(z, mu, logvar)
    kl_dims = per_dim.mean(0)
    kl = kl_dims.sum()
    # Free bits: a dimension's batch-mean KL below the threshold costs the threshold, no gradient.
    kl_penalty = torch.clamp(kl_dims, min=cfg.free_bits).sum() if cfg.free_bits > 0 else kl
    return LossTerms(recon=recon, kl=kl, kl_penalty=kl_penalty, kl_dims=kl_dims.detach(),
                     beta=beta, total=recon + beta * kl_penalty)
