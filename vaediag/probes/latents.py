"""Latent statistics of the training batch, per step: per-dimension KL, mu and logvar ranges.

``logvar`` near -30 or +20 is where exp() under- or overflows usefully in float32: an encoder
drifting there is about to produce zero or infinite variances.
"""

from __future__ import annotations

from typing import Any

import torch

from vaediag.losses import kl_per_dim
from vaediag.probes.base import Probe, StepContext, per_index

RANGES = ("mu_min", "logvar_min", "mu_max", "logvar_max", "mu_mean", "logvar_mean")


def latent_stats(mu: torch.Tensor, logvar: torch.Tensor) -> dict[str, Any]:
    """Per-dimension batch-mean analytic KL, and min/max/mean of mu and logvar."""
    mu, logvar = mu.detach().float(), logvar.detach().float()
    out: dict[str, Any] = per_index("dim", "kl", kl_per_dim(mu, logvar).mean(0))
    both = torch.stack([mu, logvar]).flatten(1)  # (2, B * D)
    low, high = torch.aminmax(both, dim=1)
    out[RANGES] = torch.cat([low, high, both.mean(1)])
    return out


class LatentStats(Probe):
    name = "latents"
    needs = frozenset({"latents"})

    def compute(self, ctx: StepContext) -> dict[str, Any]:
        if ctx.mu is None or ctx.logvar is None:
            return {}
        return latent_stats(ctx.mu, ctx.logvar)
