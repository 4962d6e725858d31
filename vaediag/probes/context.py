"""What a probe computes from: a training step's inputs (:class:`StepContext`) and an
evaluation's (:class:`EvalContext`, with its :class:`ImageSet` of held-out and training
images)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from vaediag.probes.layers import LayerIndex
from vaediag.probes.sampling import local

if TYPE_CHECKING:
    from vaediag.metrics.lpips import LPIPSMetric


def no_reduce(sums: torch.Tensor) -> torch.Tensor:
    return sums


@dataclass
class StepContext:
    """Inputs of one training step, each computed at most once and only when asked for.

    What is per parameter is in ``params`` order; ``layers`` sums it into layers and parts.
    Work on many tensors at once (list-wide ``torch._foreach_*`` operations, or a fixed
    sample gathered into one vector with :class:`EntrySample`): on a CPU an operation's fixed
    cost, not its arithmetic, is what makes per-tensor statistics slow.
    """

    step: int
    params: list[tuple[str, nn.Parameter]]
    layers: LayerIndex
    optimizer: torch.optim.Optimizer | None
    recon: float
    kl: float
    #: (P,) each parameter's gradient norm, zeros where it has none (under FSDP, of the
    #: whole parameter)
    param_grad_norms: torch.Tensor
    total: float | None = None
    beta: float | None = None
    mu: torch.Tensor | None = None  # the batch's posterior parameters, detached
    logvar: torch.Tensor | None = None
    #: the KL part of the loss, still attached to the graph (the recon/KL split), else None
    kl_term: torch.Tensor | None = None
    #: under torch.distributed: every rank's summary of its mu and logvar ((ranks, D + 7),
    #: ``probes.latents.rank_summary``), for statistics of the global batch
    latent_ranks: torch.Tensor | None = None
    #: whether every gradient entry is finite, known on the host (the Monitor has read the
    #: global gradient norm), so probes need not read the device to ask (None: look)
    grads_finite: bool | None = None
    #: sums over this rank's entries -> sums over every rank's, in place. The identity in one
    #: process or under DDP; under FSDP (``params`` are shards: measure ``local(p)``) an
    #: all-reduce that every rank joins, so call it on every rank, on every step the probe
    #: runs, with a tensor of the same shape.
    reduce: Callable[[torch.Tensor], torch.Tensor] = no_reduce
    #: ``param_grad_norms`` already read to the host (float64), when the Monitor read them
    #: with the losses before the probes ran (None: use the tensor)
    host_grad_norms: np.ndarray | None = None
    #: Flat copies of the parameters taken before the optimizer step ("update" need); a probe
    #: may overwrite them (they are refreshed at every snapshot).
    before: list[torch.Tensor] | None = None
    #: whether the Monitor read the step's values before the probes ran (False with
    #: ``read_before_step=False``: ``recon``, ``kl`` and ``grads_finite`` are not known, and
    #: ``nonfinite_grad_entries`` is NaN rather than a count that would scan every gradient)
    values_read: bool = True
    #: mixed precision: the loss scale the gradients carry before the optimizer step (a 0-d
    #: tensor; None when they carry none). ``grads`` are divided by it; ``param_grad_norms``
    #: are of the unscaled gradients already
    grad_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.grads_finite is None:
            self.grads_finite = bool(torch.isfinite(self.param_grad_norms).all())

    @functools.cached_property
    def grads(self) -> list[torch.Tensor]:
        """Each parameter's gradient, flattened (zeros where it has none), detached; unscaled
        (divided by ``grad_scale``) under a loss scaler."""
        grads = [local(p.grad).detach().reshape(-1) if p.grad is not None
                 else torch.zeros(local(p).numel(), device=p.device, dtype=p.dtype)
                 for _, p in self.params]
        if self.grad_scale is not None:
            grads = list(torch._foreach_div(grads, self.grad_scale))
        return grads

    def optimizer_stepped(self) -> None:
        """After the optimizer step: a loss scaler's ``step()`` has unscaled the gradients in
        place, so the scale is forgotten (and the gradients read before it)."""
        if self.grad_scale is not None:
            self.grad_scale = None
            self.__dict__.pop("grads", None)

    def nonfinite_grad_entries(self) -> torch.Tensor | float:
        """Count of NaN/Inf gradient entries (0 without looking, when every norm is finite; NaN
        when the step's values are not read yet)."""
        if not self.values_read:
            return math.nan
        if self.grads_finite:
            return 0.0
        count = torch.stack([(~torch.isfinite(g)).sum().double() for g in self.grads]).sum()
        return self.reduce(count.reshape(1))[0]


@dataclass
class ImageSet:
    """A fixed set of images scored at an evaluation, and what the model made of them."""

    x: torch.Tensor  # (N, 3, H, W) the images in [0, 1]
    recon: torch.Tensor  # (N, 3, H, W) their reconstructions in [0, 1]
    mu: torch.Tensor  # (N, D)
    logvar: torch.Tensor  # (N, D)
    factors: dict[str, np.ndarray] | None  # toyfaces' true factors of the images
    #: the images as the model takes them (its ``value_range``), for ``EvalContext.eval_loss``
    inputs: torch.Tensor | None = None


@dataclass
class EvalContext:
    """Inputs of one evaluation: the grid's images as the model is now, a larger set, and a
    fixed set of *training* images scored the same way (``train``: held-out against training
    images tells memorisation from a loss that trades quality away)."""

    step: int
    x: torch.Tensor  # (8, 3, H, W) the grid's validation images in [0, 1]
    recon: torch.Tensor  # (8, 3, H, W) grid row 2
    zero: torch.Tensor  # (1, 3, H, W) decode(z = 0)
    fixed: torch.Tensor  # (8, 3, H, W) decode(fixed z)
    mu: torch.Tensor  # (8, D)
    logvar: torch.Tensor  # (8, D)
    factors: dict[str, np.ndarray] | None  # toyfaces' true factors of the 8 images
    lpips: LPIPSMetric | None
    encode_set: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] | None
    #: the fixed training images, scored like the grid's (None: the Monitor was given none)
    train: ImageSet | None = None
    #: ``(inputs, z, mu, logvar) -> (recon per image, kl per image)``, differentiable in z, mu
    #: and logvar (None without the Monitor's ``eval_loss``)
    eval_loss: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    #: the grid's images as the model takes them (its ``value_range``)
    inputs: torch.Tensor | None = None
    _set: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = field(
        default=None, repr=False)

    def heldout(self) -> ImageSet:
        """The grid's held-out images as an :class:`ImageSet`, like ``train``."""
        return ImageSet(self.x, self.recon, self.mu, self.logvar, self.factors, self.inputs)

    def image_sets(self) -> dict[str, ImageSet]:
        """``{"": held-out, "train_": training}``: column prefix -> images, for probes that
        score both sets alike."""
        return {"": self.heldout(), **({"train_": self.train} if self.train is not None else {})}

    def eval_set(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(x, recon, mu, logvar) of the larger fixed evaluation set, encoded once on demand."""
        if self.encode_set is None:
            return None
        if self._set is None:
            self._set = self.encode_set()
        return self._set
