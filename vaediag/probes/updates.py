"""The update the optimizer actually made: ||dW|| / ||W|| per layer, for any optimizer.

Measured, not predicted: the parameters are copied before the step and compared after it, so
weight decay, clipping and the optimizer's own quirks are all included. Around 1e-3 per step is
the usual healthy order of magnitude for Adam; 1e-2 and above changes a layer quickly, 1e-5 and
below means it has practically stopped learning.

Tensors larger than ``max_entries`` are measured on the same kind of fixed sample as Adam's
state (:class:`~vaediag.probes.base.EntrySample`); ``None`` measures every entry.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from vaediag.columns import UPDATE_LOST, UPDATE_RATIO
from vaediag.probes.adam import MAX_ENTRIES
from vaediag.probes.base import Probe, per_index, safe_div
from vaediag.probes.context import StepContext
from vaediag.probes.sampling import EntrySample, local


@dataclass
class _Plan:
    """The entries measured, made once: the sample, the order that puts its layers back in
    the model's order, their names, and the (2, N) buffer of before and after the step; and
    the sampled views of the parameters, kept while the parameters keep their storage (the
    optimizer updates them in place), so a step gathers them without slicing each again."""

    sample: EntrySample
    order: torch.Tensor
    names: list[str]
    flat: torch.Tensor
    views: list[torch.Tensor] | None = None
    storage: tuple[int, ...] = ()

    @functools.cached_property
    def columns(self) -> tuple[str, ...]:
        """The names of the probe's vector: each layer's ratio, then the whole model's."""
        (names,) = per_index("layer", UPDATE_RATIO, torch.zeros(len(self.names)), self.names)
        return (*names, UPDATE_RATIO)

    @functools.cached_property
    def lost_columns(self) -> tuple[str, ...]:
        """Weights in half precision: each layer's share of unchanged entries, then the
        whole model's."""
        (names,) = per_index("layer", UPDATE_LOST, torch.zeros(len(self.names)), self.names)
        return (*names, UPDATE_LOST)

    @property
    def half(self) -> bool:
        """Whether the weights are kept in half precision (their updates can round away)."""
        return self.flat.dtype in (torch.bfloat16, torch.float16)

    def gather(self, params: list[torch.Tensor], out: torch.Tensor) -> None:
        """The sampled entries of ``params`` into ``out``."""
        storage = tuple(p.data_ptr() for p in params)
        if self.views is None or storage != self.storage:  # first, or a parameter replaced
            self.views, self.storage = self.sample.views(list(params)), storage
        torch.cat(self.views, out=out)

    @classmethod
    def of(cls, ctx: StepContext, max_entries: int | None) -> _Plan:
        params = [p for _, p in ctx.params]
        device = params[0].device
        sample = EntrySample(list(range(len(params))), [local(p).numel() for p in params],
                             ctx.layers, max_entries, device)
        ids = sample.layer_ids.tolist()  # sampled layers first: put back in model order
        order = torch.tensor(sorted(range(len(ids)), key=ids.__getitem__), device=device)
        return cls(sample, order, [ctx.layers.layers[ids[k]] for k in order.tolist()],
                   torch.empty(2, sample.size, device=device, dtype=params[0].dtype))


class UpdateRatio(Probe[StepContext]):
    name = "updates"
    needs = frozenset({"optimizer"})

    def __init__(self, schedule=None, max_entries: int | None = MAX_ENTRIES, *,
                 when_unusual: bool = False):
        """``max_entries``: measure larger layers on a sample of this many entries (None:
        every entry)."""
        super().__init__(schedule, when_unusual=when_unusual)
        self.max_entries = max_entries
        self._plan: _Plan | None = None
        self._taken = False

    def _prepare(self, ctx: StepContext) -> _Plan:
        if self._plan is None or self._plan.flat.dtype != ctx.params[0][1].dtype:
            self._plan = _Plan.of(ctx, self.max_entries)  # first, or the model moved with .to()
        return self._plan

    def before_step(self, ctx: StepContext) -> None:
        plan = self._prepare(ctx)
        plan.gather([local(p) for _, p in ctx.params], plan.flat[0])
        self._taken = True

    def compute(self, ctx: StepContext) -> dict[str, Any]:
        if not self._taken:
            return {}
        self._taken = False
        plan = self._plan
        if plan is None or plan.flat.dtype != ctx.params[0][1].dtype:
            return {}  # the weights changed dtype since before the step: no update to compare
        before, after = plan.flat[0], plan.flat[1]
        plan.gather([local(p) for _, p in ctx.params], after)
        after.sub_(before)
        lost = (after == 0) if plan.half else None  # measured in the weights' own dtype
        after.square_()  # the update, squared
        before.square_()
        sums = ctx.reduce(plan.sample.layer_sums(plan.flat))  # (2, L): |W|^2, |dW|^2
        # each layer in the model's order, then all of them: one ratio vector (L + 1)
        both = torch.cat([sums[:, plan.order], sums.sum(1, keepdim=True)], 1).sqrt_()
        out: dict[Any, Any] = {plan.columns: safe_div(both[1], both[0])}
        if lost is not None:
            out[plan.lost_columns] = _shares(plan, lost, ctx)
        return out


def _shares(plan: _Plan, flags: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """Each layer's (then the whole model's) share of entries flagged, in float32."""
    rows = torch.stack([flags.float(), torch.ones_like(flags, dtype=torch.float32)])
    counts = ctx.reduce(plan.sample.layer_sums(rows))  # (2, L): flagged, all
    counts = torch.cat([counts[:, plan.order], counts.sum(1, keepdim=True)], 1)
    return safe_div(counts[0], counts[1])
