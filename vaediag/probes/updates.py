"""The update the optimizer actually made: ||dW|| / ||W|| per layer, for any optimizer.

Measured, not predicted: the parameters are copied before the step and compared after it, so
weight decay, clipping and the optimizer's own quirks are all included. Around 1e-3 per step is
the usual healthy order of magnitude for Adam; 1e-2 and above changes a layer quickly, 1e-5 and
below means it has practically stopped learning.
"""

from __future__ import annotations

from typing import Any

import torch

from vaediag.probes.base import LayerIndex, Probe, StepContext, per_index, safe_div


def update_ratios(before: list[torch.Tensor], after: list[torch.Tensor],
                  layers: LayerIndex) -> dict[str, Any]:
    """Per-layer and global ||after - before|| / ||before||. Overwrites ``before``.

    Three list-wide (foreach) operations, whatever the number of tensors.
    """
    weight = torch.stack(torch._foreach_norm(before)).double()
    torch._foreach_sub_(before, after)  # the snapshot becomes the update
    delta = torch.stack(torch._foreach_norm(before)).double()
    per_layer = layers.per_layer_sum(torch.stack([delta, weight], 1).pow(2).cpu())  # (L, 2)
    ratio = safe_div(per_layer[:, 0].sqrt(), per_layer[:, 1].sqrt()).float()
    total = per_layer.sum(0)
    out: dict[str, Any] = per_index("layer", "update_ratio", ratio, layers.layers)
    out["update_ratio"] = safe_div(total[0].sqrt(), total[1].sqrt()).float()
    return out


class UpdateRatio(Probe):
    name = "updates"
    needs = frozenset({"update"})

    def compute(self, ctx: StepContext) -> dict[str, Any]:
        if ctx.before is None:
            return {}
        after = [p.detach().reshape(-1) for _, p in ctx.params]
        return update_ratios(ctx.before, after, ctx.layers)
