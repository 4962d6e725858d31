"""The part this process plays in recording a run, chosen once when the Monitor is made.

- :class:`Single`: one process; records; a step's values need no collective.
- :class:`Leader`: rank 0 under torch.distributed (DDP or FSDP); records the global batch from
  the step's one collective (:meth:`~vaediag.monitor.ranks.Ranks.exchange`).
- :class:`Shadow`: a rank other than 0 under FSDP; runs the recording in step with rank 0 (a
  forward pass needs every rank) on its own shards, and writes nothing.
- a rank other than 0 under DDP records nothing and runs none of this: it is a
  :class:`~vaediag.monitor.follower.Follower`.

A role turns a step's inputs into its values on the device (:class:`Core`), packed for the
step's one read, and takes back what the read says about the other ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from vaediag import columns
from vaediag.monitor.checks import StepInputs
from vaediag.monitor.gradients import grad_norms
from vaediag.monitor.ranks import Ranks, Reduce, Shared, is_sharded, nonfinite_ranks
from vaediag.monitor.readback import Packed
from vaediag.monitor.scaling import GradScale
from vaediag.probes.context import no_reduce
from vaediag.probes.latents import rank_summary

Params = list[tuple[str, nn.Parameter]]


@dataclass
class Core:
    """A step's own values on the device, packed for one read: the losses and the gradient
    norm (under torch.distributed, of the global batch, with every rank's loss terms and
    request to stop); with the gradient norms of whole parameters and every rank's latent
    summary, for the step's probes."""

    packed: Packed
    #: (P,) each parameter's gradient norm on the device, or None (no gradients)
    norms: torch.Tensor | None = None
    #: every rank's summary of mu and logvar (ranks, S), under torch.distributed
    latent_ranks: torch.Tensor | None = None
    #: ``packed`` is one vector: every parameter's gradient norm, then the loss terms (the
    #: global norm is made on the host from them)
    fused: bool = False

    def values(self, arrays: list[np.ndarray], params: int
               ) -> tuple[dict[str, float], np.ndarray | None]:
        """``{column: float}`` from ``packed`` read; and, for a fused core, the per-parameter
        gradient norms on the host (float64)."""
        if not self.fused:
            return self.packed.floats(arrays), None
        values = arrays[0]
        norms = values[:params].astype(np.float64)
        out = dict(zip(self.packed.names[1], values[len(norms):].tolist(), strict=True))
        out[columns.GRAD_NORM] = math.sqrt(norms @ norms)
        return out, norms


def choose(model: nn.Module, ranks: Ranks) -> Role | None:
    """This process's role; None for a rank other than 0 under DDP (a Follower's)."""
    sharded = is_sharded(model)  # (refuses FSDP1's wrapper, in any world)
    if not ranks.active:
        return Single(sharded)
    if ranks.records:
        return Leader(ranks, sharded)
    return Shadow(ranks) if sharded else None


class Role:
    """What every role knows: the recorded parameters and the model's device."""

    records: bool
    distributed: bool
    sharded: bool
    params: Params
    device: torch.device

    def bind(self, params: Params, device: torch.device) -> None:
        self.params, self.device = params, device
        #: the parameters without their names (the per-step gradient read)
        self.tensors = [p for _, p in params]

    def core(self, given: StepInputs, stop: bool, scale: GradScale | None = None) -> Core:
        """The step's values on the device, packed for its one read; with a loss ``scale``,
        the gradient norms of the unscaled gradients and the scale itself."""
        raise NotImplementedError

    def after_read(self, row: dict[str, Any]) -> tuple[dict[str, list[int]], bool]:
        """Take what the other ranks sent out of the row read: on which ranks each loss term
        was non-finite, and whether some rank asked to stop."""
        raise NotImplementedError

    def reduce(self, sums: torch.Tensor) -> torch.Tensor:
        """A probe's sums over this rank's entries -> over every rank's."""
        raise NotImplementedError


class Single(Role):
    """One process: it records, and a step's values need no collective (``sharded``: a model
    sharded by FSDP2 in a job of one)."""

    records = True
    distributed = False

    def __init__(self, sharded: bool = False):
        self.sharded = sharded

    def reduce(self, sums: torch.Tensor) -> torch.Tensor:
        return no_reduce(sums)

    def core(self, given: StepInputs, stop: bool, scale: GradScale | None = None) -> Core:
        """In the usual case (every parameter's gradient there, the losses tensors on its
        device) two operations: one fused norm over the gradients and one stack of those
        norms with the losses (and the loss scale, which divides the norms in place while the
        gradients carry it: one more)."""
        recon, kl, total = given.recon, given.kl, given.total
        grads: list[Any] = [p.grad for p in self.tensors]
        if grads and all(g is not None for g in grads):  # ("None in" compares tensors)
            device = grads[0].device
            if _on(device, recon, kl, total) and (scale is None
                                                  or scale.value.device == device):
                losses = [v.detach() for v in (recon, kl, total)  # type: ignore[union-attr]
                          if v is not None]
                names = columns.LOSS_TERMS if total is not None else columns.LOSS_TERMS[:2]
                if scale is None:
                    stacked = torch.stack([*torch._foreach_norm(grads), *losses])
                else:
                    stacked = torch.stack([*torch._foreach_norm(grads), *losses,
                                           scale.value.to(losses[0].dtype)])
                    if scale.applied:
                        stacked[:len(grads)].div_(stacked[-1])
                    names = (*names, columns.LOSS_SCALE)
                return Core(Packed.vectors([(), names], [stacked]), stacked[:len(grads)],
                            fused=True)
        norms = unscaled(grad_norms(self.params, self.sharded), scale)
        return _packed(_scale_column(scale), recon, kl, total, norms)

    def after_read(self, row: dict[str, Any]) -> tuple[dict[str, list[int]], bool]:
        """Nothing of other ranks to take out of the row."""
        return {}, False


class Leader(Role):
    """Rank 0 under torch.distributed: records the global batch, which the step's one
    collective brings (each value declared with how the ranks' values combine)."""

    records = True
    distributed = True

    def __init__(self, ranks: Ranks, sharded: bool):
        self.ranks, self.sharded = ranks, sharded
        #: names under which every rank's loss terms are read with the step's other values,
        #: then taken out of the row (:meth:`after_read`)
        self.rank_names = tuple(f"_rank/{r}/{term}" for r in range(ranks.world)
                                for term in columns.LOSS_TERMS)

    def reduce(self, sums: torch.Tensor) -> torch.Tensor:
        """A probe's sums over this rank's shards -> over every rank's (FSDP; unchanged under
        DDP, where every rank holds whole tensors)."""
        return self.ranks.reduce(sums) if self.sharded else sums

    def core(self, given: StepInputs, stop: bool, scale: GradScale | None = None) -> Core:
        norms = unscaled(grad_norms(self.params, self.sharded), scale)
        with torch.no_grad():  # the losses are attached to the graph: read, not differentiated
            shared = shared_values(given, stop, self.device, sharded=self.sharded, norms=norms,
                                   params=len(self.params))
            got = self.ranks.exchange(shared, gather_device(given, self.device))
            losses = got["losses"]
            if self.sharded:
                norms = got["shard_norms"].sqrt().float()
            recon, kl = losses[:, 0].mean(), losses[:, 1].mean()
            total = losses[:, 2].mean() if given.total is not None else None
            extra: dict[Any, Any] = {
                columns.RECON_RANK_SPREAD: losses[:, 0].max() - losses[:, 0].min(),
                columns.KL_RANK_SPREAD: losses[:, 1].max() - losses[:, 1].min(),
                self.rank_names: losses.reshape(-1), "_stop": got["stop"][0],
                **_scale_column(scale)}
            core = _packed(extra, recon, kl, total, norms)
        core.latent_ranks = got.get("latents")
        return core

    def after_read(self, row: dict[str, Any]) -> tuple[dict[str, list[int]], bool]:
        """Take every rank's loss terms out of ``row``: on which ranks each term was
        non-finite, and whether some rank asked to stop."""
        world = self.ranks.world
        values = [[row.pop(f"_rank/{r}/{term}") for term in columns.LOSS_TERMS]
                  for r in range(world)]
        return nonfinite_ranks(values), row.pop("_stop") > 0


class Shadow(Leader):
    """A rank other than 0 under FSDP: in step with rank 0, on its own shards, writing
    nothing."""

    records = False

    def __init__(self, ranks: Ranks):
        super().__init__(ranks, sharded=True)


def shared_values(given: StepInputs, stop: bool, device: torch.device, *,
                  sharded: bool = False, norms: torch.Tensor | None = None,
                  params: int = 0) -> list[Shared]:
    """What each rank contributes to the step's collective, and how it combines: its loss
    terms (every rank's: the recorded mean and spread, and the ranks a term went non-finite
    on, are taken from them), its request to stop (any rank's), its summary of mu and logvar
    (every rank's: the latent probes combine them) and, under FSDP, its sums of squares of
    each parameter's gradient shard (summed: the whole parameters' norms; zeros when no
    parameter has a gradient). ``device``: the model's (where the collective runs when the
    losses are numbers)."""
    gather = gather_device(given, device)
    parts = [v.detach().reshape(()).to(gather, torch.float64) if isinstance(v, torch.Tensor)
             else torch.tensor(float(v), dtype=torch.float64, device=gather)
             for v in (given.recon, given.kl, math.nan if given.total is None else given.total)]
    shared = [Shared("losses", torch.stack(parts), Reduce.EACH),
              Shared("stop", float(stop), Reduce.MAX)]
    if given.mu is not None and given.logvar is not None:
        shared.append(Shared("latents", rank_summary(given.mu, given.logvar), Reduce.EACH))
    if sharded:
        shared.append(Shared("shard_norms", norms.double().square() if norms is not None else
                             torch.zeros(params, dtype=torch.float64, device=device),
                             Reduce.SUM))
    return shared


def unscaled(norms: torch.Tensor | None, scale: GradScale | None) -> torch.Tensor | None:
    """Gradient norms of the gradients the optimizer applies: divided by the loss scale while
    the gradients carry it."""
    if norms is None or scale is None or not scale.applied:
        return norms
    return norms / scale.value.to(norms.device, norms.dtype)


def _scale_column(scale: GradScale | None) -> dict[str, torch.Tensor]:
    return {} if scale is None else {columns.LOSS_SCALE: scale.value}


def gather_device(given: StepInputs, device: torch.device) -> torch.device:
    """Where the step's collective runs: the loss's device (NCCL needs the GPU), else the
    model's."""
    return given.recon.device if isinstance(given.recon, torch.Tensor) else device


def _packed(extra: dict[Any, Any], recon: Any, kl: Any, total: Any,
            norms: torch.Tensor | None) -> Core:
    """The step's values as one packed read: ``extra``, the loss terms and, in float64 (a sum
    of squares that overflows float32), the global gradient norm."""
    values: dict[Any, Any] = dict(extra)
    with torch.no_grad():
        values[columns.RECON] = recon
        values[columns.KL] = kl
        if total is not None:
            values[columns.TOTAL] = total
        if norms is not None:
            values[columns.GRAD_NORM] = torch.linalg.vector_norm(norms, dtype=torch.float64)
        return Core(Packed(values), norms)


def _on(device: torch.device, recon: Any, kl: Any, total: Any) -> bool:
    """Whether the loss terms are tensors on ``device`` (``total`` may be None)."""
    return (isinstance(recon, torch.Tensor) and recon.device == device
            and isinstance(kl, torch.Tensor) and kl.device == device
            and (total is None or (isinstance(total, torch.Tensor) and total.device == device)))


def checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int,
               sharded: bool) -> dict[str, Any]:
    """The model's and optimizer's state for a checkpoint; under FSDP the whole of it,
    gathered to rank 0 (a collective every rank joins)."""
    if not sharded:
        state = {"model": model.state_dict(), "step": step}
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        return state
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {"model": get_model_state_dict(model, options=whole), "step": step}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=whole)
    return state
