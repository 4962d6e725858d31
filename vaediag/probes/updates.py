"""The update the optimizer actually made: ||dW|| / ||W|| per layer, for any optimizer.

Measured, not predicted: the parameters are copied before the step and compared after it, so
weight decay, clipping and the optimizer's own quirks are all included. Around 1e-3 per step is
the usual healthy order of magnitude for Adam; 1e-2 and above changes a layer quickly, 1e-5 and
below means it has practically stopped learning.

Tensors larger than ``max_entries`` are measured on the same kind of fixed sample as Adam's
state (:class:`~vaediag.probes.base.EntrySample`); ``None`` measures every entry.
"""

from __future__ import annotations

from typing import Any

import torch

from vaediag.probes.adam import MAX_ENTRIES
from vaediag.probes.base import Probe, per_index, safe_div
from vaediag.probes.context import StepContext
from vaediag.probes.sampling import EntrySample, local


class UpdateRatio(Probe[StepContext]):
    name = "updates"
    needs = frozenset({"optimizer"})

    def __init__(self, schedule=None, max_entries: int | None = MAX_ENTRIES, *,
                 when_unusual: bool = False):
        """``max_entries``: measure larger layers on a sample of this many entries (None:
        every entry)."""
        super().__init__(schedule, when_unusual=when_unusual)
        self.max_entries = max_entries
        self._sample: EntrySample | None = None
        self._names: list[str] = []
        self._order: torch.Tensor | None = None
        self._flat: torch.Tensor | None = None  # (2, N): before, then after the step
        self._taken = False

    def _prepare(self, ctx: StepContext) -> EntrySample:
        if self._sample is None:
            params = [p for _, p in ctx.params]
            device = params[0].device
            self._sample = EntrySample(list(range(len(params))), [local(p).numel() for p in params],
                                       ctx.layers, self.max_entries, device)
            ids = self._sample.layer_ids.tolist()  # sampled layers first: put back in model order
            self._order = torch.tensor(sorted(range(len(ids)), key=ids.__getitem__),
                                       device=device)
            self._names = [ctx.layers.layers[ids[k]] for k in self._order.tolist()]
            self._flat = torch.empty(2, self._sample.size, device=device,
                                     dtype=params[0].dtype)
        return self._sample

    def before_step(self, ctx: StepContext) -> None:
        self._prepare(ctx).gather([p for _, p in ctx.params], self._flat[0])
        self._taken = True

    def compute(self, ctx: StepContext) -> dict[str, Any]:
        if not self._taken:
            return {}
        self._taken = False
        sample = self._prepare(ctx)
        before, after = self._flat[0], self._flat[1]
        sample.gather([p for _, p in ctx.params], after)
        after.sub_(before).square_()  # the update, squared
        before.square_()
        sums = ctx.reduce(sample.layer_sums(self._flat))  # (2, L): |W|^2, |dW|^2
        ratio = safe_div(sums[1].sqrt(), sums[0].sqrt())[self._order]
        total = sums.sum(1)
        out: dict[str, Any] = per_index("layer", "update_ratio", ratio, self._names)
        out["update_ratio"] = safe_div(total[1].sqrt(), total[0].sqrt())
        return out
