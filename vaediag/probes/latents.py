"""Latent statistics of the training batch, per step: per-dimension KL, mu and logvar ranges.

Under torch.distributed, of the global batch: each rank's :func:`rank_summary` rides in the
step's one collective and :func:`combined_stats` combines them.

``logvar`` near -30 or +20 is where exp() under- or overflows usefully in float32: an encoder
drifting there is about to produce zero or infinite variances.
"""

from __future__ import annotations

from typing import Any

import torch

from vaediag.columns import KL, LOGVAR_MAX, LOGVAR_MEAN, LOGVAR_MIN, MU_MAX, MU_MEAN, MU_MIN
from vaediag.losses import kl_per_dim
from vaediag.probes.base import Probe, per_index
from vaediag.probes.context import StepContext

RANGES = (MU_MIN, LOGVAR_MIN, MU_MAX, LOGVAR_MAX, MU_MEAN, LOGVAR_MEAN)


def rank_summary(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """What :func:`combined_stats` needs of one rank's share of the batch, as one float64
    vector (it rides in the step's collective under torch.distributed): [B, the KL per
    dimension summed over the batch (D), min mu, min logvar, max mu, max logvar, sum mu, sum
    logvar]."""
    mu, logvar = mu.detach().double(), logvar.detach().double()
    both = torch.stack([mu, logvar]).flatten(1)
    low, high = both.amin(1), both.amax(1)  # exact either way; aminmax(dim=) is 3x slower
    count = torch.tensor([float(len(mu))], dtype=torch.float64, device=mu.device)
    return torch.cat([count, kl_per_dim(mu, logvar).sum(0), low, high, both.sum(1)])


def combined_stats(summaries: torch.Tensor) -> dict[str, Any]:
    """:func:`latent_stats` of the global batch from every rank's :func:`rank_summary`
    ((ranks, D + 7)): the KL and means weighted by each rank's batch, the extremes of all."""
    count = summaries[:, 0].sum()
    dims = summaries.shape[1] - 7
    out: dict[Any, Any] = per_index("dim", KL,
                                    (summaries[:, 1:1 + dims].sum(0) / count).float())
    rest = summaries[:, 1 + dims:]
    out[RANGES] = torch.cat([rest[:, 0:2].amin(0), rest[:, 2:4].amax(0),
                             rest[:, 4:6].sum(0) / (count * dims)]).float()
    return out


def latent_stats(mu: torch.Tensor, logvar: torch.Tensor) -> dict[str, Any]:
    """Per-dimension batch-mean analytic KL, and min/max/mean of mu and logvar."""
    mu, logvar = mu.detach().float(), logvar.detach().float()
    out: dict[Any, Any] = per_index("dim", KL, kl_per_dim(mu, logvar).mean(0))
    both = torch.stack([mu, logvar]).flatten(1)  # (2, B * D)
    low, high = both.amin(1), both.amax(1)  # exact either way; aminmax(dim=) is 3x slower
    out[RANGES] = torch.cat([low, high, both.mean(1)])
    return out


class LatentStats(Probe[StepContext]):
    name = "latents"
    needs = frozenset({"latents"})

    def compute(self, ctx: StepContext) -> dict[str, Any]:
        if ctx.latent_ranks is not None:  # under torch.distributed: the global batch
            return combined_stats(ctx.latent_ranks)
        if ctx.mu is None or ctx.logvar is None:
            return {}
        return latent_stats(ctx.mu, ctx.logvar)
