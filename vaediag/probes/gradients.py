"""Gradient norms per layer and per part (encoder, decoder), and non-finite gradient entries.

The global norm is always recorded by the Monitor itself (``grad_norm``); this probe splits it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vaediag.columns import GRAD_NONFINITE, GRAD_NORM
from vaediag.probes.base import Probe, per_index
from vaediag.probes.context import StepContext


class GradientNorms(Probe[StepContext]):
    name = "gradients"
    needs = frozenset({"grads"})

    def compute(self, ctx: StepContext) -> dict[str, Any]:
        if ctx.host_grad_norms is not None:  # read already: a few numpy sums on the host
            host_sq = ctx.layers.per_layer_sum_host(np.square(ctx.host_grad_norms))
            out = per_index("layer", GRAD_NORM, np.sqrt(host_sq), ctx.layers.layers)
            out.update(per_index("part", GRAD_NORM,
                                 np.sqrt(ctx.layers.per_part_sum_host(host_sq)),
                                 ctx.layers.parts))
        else:
            layer_sq = ctx.layers.per_layer_sum(ctx.param_grad_norms.double().pow(2))
            out = per_index("layer", GRAD_NORM, layer_sq.sqrt().float(), ctx.layers.layers)
            out.update(per_index("part", GRAD_NORM,
                                 ctx.layers.per_part_sum(layer_sq).sqrt().float(),
                                 ctx.layers.parts))
        out[GRAD_NONFINITE] = ctx.nonfinite_grad_entries()
        return out
