"""Latent health at every evaluation: active units and per-dimension KL on a fixed image set.

A unit is *active* when the posterior mean moves with the input: Cov_x(E_q[z_i]) > 0.01
(Burda et al. 2016), estimated over the evaluation set (``probes.metric_images`` validation
images, or the grid's 8 when that is 0; 8 is few: prefer 64 or more). Posterior collapse shows
as active units falling and per-dimension KL going to zero.
"""

from __future__ import annotations

from typing import Any

from vaediag.columns import ACTIVE_UNITS, EVAL_KL
from vaediag.losses import kl_per_dim
from vaediag.probes.base import Probe, per_index
from vaediag.probes.context import EvalContext

ACTIVE_THRESHOLD = 0.01


class LatentHealth(Probe[EvalContext]):
    name = "latent_health"
    needs = frozenset({"eval"})

    def compute(self, ctx: EvalContext) -> dict[str, Any]:
        extra = ctx.eval_set()
        mu, logvar = (extra[2], extra[3]) if extra is not None else (ctx.mu, ctx.logvar)
        mu, logvar = mu.detach().double().cpu(), logvar.detach().double().cpu()
        variance = mu.var(0, unbiased=False) if len(mu) > 1 else mu.new_zeros(mu.shape[1])
        out: dict[str, Any] = {
            ACTIVE_UNITS: (variance > ACTIVE_THRESHOLD).sum().double(),
            "eval_set_size": float(len(mu)),
        }
        out.update(per_index("dim", "mu_var", variance.float()))
        out.update(per_index("dim", EVAL_KL, kl_per_dim(mu, logvar).mean(0).float()))
        return out
