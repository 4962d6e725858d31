"""The gradients of the reconstruction term and of the KL term, separately, at a cadence.

The loss is ``recon + kl_term`` (``kl_term`` = beta * KL, free bits applied). After the user's
backward pass the parameters hold the total gradient g; one extra backward pass of ``kl_term``
alone (it reaches only the encoder, so it is cheap) gives the KL gradient k, and the
reconstruction gradient is r = g - k. Recorded: |r|, |k| and cos(r, k), overall and per part.
A cosine near -1 means the two terms pull the encoder in opposite directions.

It needs the autograd graph to survive the user's backward pass: call
``loss.backward(retain_graph=monitor.wants_graph(step))`` (the built-in trainer does).
"""

from __future__ import annotations

from typing import Any

import torch

from vaediag.probes.base import Probe, ProbeSetup, per_index, safe_div
from vaediag.probes.context import StepContext
from vaediag.probes.layers import LayerIndex


def split_stats(total: list[torch.Tensor], kl: list[torch.Tensor],
                layers: LayerIndex) -> dict[str, Any]:
    """|r|, |k| and cos(r, k) for r = total - kl, overall and per part.

    ``total`` and ``kl``: per-parameter flattened gradients of the loss and of the KL term.
    Uses |r|^2 = |g|^2 - 2 g.k + |k|^2 and r.k = g.k - |k|^2: three dot products per parameter.
    """
    sums = []
    for g, k in zip(total, kl, strict=True):
        g, k = g.float(), k.float()  # half-precision gradients: the dot products in float32
        gg, gk, kk = torch.dot(g, g), torch.dot(g, k), torch.dot(k, k)
        sums.append(torch.stack([gg - 2 * gk + kk, kk, gk - kk]))
    per_param = torch.stack(sums).double()  # (P, 3): |r|^2, |k|^2, r.k
    per_part = layers.per_part_sum(layers.per_layer_sum(per_param))

    def summarise(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rn, kn = s[..., 0].clamp_min(0).sqrt(), s[..., 1].sqrt()
        return rn.float(), kn.float(), safe_div(s[..., 2], rn * kn).float()

    rn, kn, cos = summarise(per_part.sum(0))
    out: dict[str, Any] = {"split_recon_norm": rn, "split_kl_norm": kn, "split_cos": cos}
    rn, kn, cos = summarise(per_part)
    for stat, values in (("split_recon_norm", rn), ("split_kl_norm", kn), ("split_cos", cos)):
        out.update(per_index("part", stat, values, layers.parts))
    return out


class GradSplit(Probe[StepContext]):
    name = "grad_split"
    needs = frozenset({"grads", "graph"})

    def setup(self, info: ProbeSetup) -> str | None:
        if info.sharded:  # a second backward pass through FSDP's hooks, on every rank
            return "the parameters are sharded (FSDP)"
        return None

    def compute(self, ctx: StepContext) -> dict[str, Any]:
        if ctx.kl_term is None or not ctx.kl_term.requires_grad:
            return {}
        params = [p for _, p in ctx.params]
        try:
            grads = torch.autograd.grad(ctx.kl_term, params, allow_unused=True)
        except RuntimeError as exc:
            if "backward through the graph a second time" in str(exc):
                raise RuntimeError(
                    "the autograd graph was freed by loss.backward(); call "
                    "loss.backward(retain_graph=monitor.wants_graph(step)) to record the "
                    "recon/KL gradient split") from None
            raise
        kl = [g.reshape(-1) if g is not None
              else torch.zeros(p.numel(), device=p.device, dtype=p.dtype)
              for g, p in zip(grads, params, strict=True)]
        return split_stats(ctx.grads, kl, ctx.layers)
