"""The amortisation gap (Cremer et al. 2018): how much better q(z|x) could be than the encoder's.

At each evaluation, for the grid's 8 held-out images and the 8 fixed training images, the
encoder's posterior (mu, log-variance) is refined by ``STEPS`` Adam steps on the negative ELBO
(a fresh noise sample each step) with the decoder frozen, and the negative ELBO is scored before
and after on ``SCORE_SAMPLES`` fixed noise samples other than those it was refined on. Recorded, as
means over the images (the prefix ``train_`` for the training images):

- ``amort_gap``: negative ELBO of the encoder's q minus that of the refined q (>= 0: an image
  keeps the encoder's q when refining did not help it);
- ``amort_refined``: the negative ELBO after refining: the best this decoder can do on them.

Reading them: a gap that grows on held-out images but not on training images says the
*encoder* has overfitted (it maps training images well and others badly); a held-out negative
ELBO that stays bad after refining says the *decoder* memorises (no latent code makes it draw a
face it has not seen). Needs the Monitor's ``eval_loss`` (differentiable in z, mu, logvar).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vaediag.probes.base import Probe
from vaediag.probes.context import EvalContext

#: refinement steps, Adam's step size in latent units, and the noise samples used to refine and
#: to score (a few dozen small steps: about one training step's worth of decoder passes)
STEPS = 24
LR = 0.05
FIT_SAMPLES = 1
SCORE_SAMPLES = 4
_SEED = 1_234_567

LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def negative_elbo(loss: LossFn, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
    """Per image: the mean over ``noise`` (S, N, D) samples of recon + KL at
    z = mu + noise * exp(logvar / 2)."""
    s, n = noise.shape[:2]
    z = (mu + noise * torch.exp(0.5 * logvar)).reshape(s * n, -1)
    recon, kl = loss(x.repeat(s, *([1] * (x.dim() - 1))), z, mu.repeat(s, 1), logvar.repeat(s, 1))
    return (recon + kl).reshape(s, n).mean(0)


def refine(loss: LossFn, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
           steps: int = STEPS, lr: float = LR, seed: int = _SEED
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(negative ELBO of the encoder's q, of the refined q) per image, each scored on the same
    fixed noise; the refined one is never worse (an image keeps its q when refining did not
    help). Only mu and logvar are optimised: the decoder's parameters get no gradient."""
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(SCORE_SAMPLES, *mu.shape, generator=g, dtype=mu.dtype).to(mu.device)
    # fresh noise at every step (one fixed sample would be fitted, not the expectation); drawn
    # up front from the seeded generator, so an evaluation is repeatable
    fit = torch.randn(steps, FIT_SAMPLES, *mu.shape, generator=g, dtype=mu.dtype).to(mu.device)
    with torch.enable_grad():
        m = mu.detach().clone().requires_grad_(True)
        lv = logvar.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([m, lv], lr=lr)
        for k in range(steps):
            value = negative_elbo(loss, x, m, lv, fit[k]).sum()
            grad_m, grad_lv = torch.autograd.grad(value, [m, lv])
            m.grad, lv.grad = grad_m, grad_lv
            opt.step()
    with torch.no_grad():
        before = negative_elbo(loss, x, mu, logvar, score)
        after = negative_elbo(loss, x, m.detach(), lv.detach(), score)
    return before, torch.minimum(before, after)


class AmortisationGap(Probe[EvalContext]):
    name = "amortisation"
    needs = frozenset({"eval"})

    def compute(self, ctx: EvalContext) -> dict[str, Any]:
        if ctx.eval_loss is None:
            return {}
        sets = {prefix: images for prefix, images in ctx.image_sets().items()
                if images.inputs is not None}
        if not sets:
            return {}
        # both sets refined as one batch: images are refined independently, and one batch
        # costs about what one set alone does
        inputs = [images.inputs for images in sets.values() if images.inputs is not None]
        sizes = [len(x) for x in inputs]
        before, after = refine(ctx.eval_loss, torch.cat(inputs),
                               torch.cat([images.mu for images in sets.values()]),
                               torch.cat([images.logvar for images in sets.values()]))
        out: dict[str, Any] = {}
        for prefix, b, a in zip(sets, before.split(sizes), after.split(sizes), strict=True):
            out[f"{prefix}amort_gap"] = (b - a).mean()
            out[f"{prefix}amort_refined"] = a.mean()
        return out
