"""The Probe API: a probe says what it needs and when it runs, then computes named values.

A probe is a small class::

    class GradNorms(Probe[StepContext]):
        name = "gradients"
        needs = frozenset({"grads"})

        def compute(self, ctx: StepContext) -> dict[str, float | torch.Tensor]:
            return {"grad_nonfinite": ctx.nonfinite_grad_entries()}

``needs`` decides *when* in a step the probe runs and what the Monitor prepares for it, once,
for all probes due at that step:

=============  =================================================================================
need           available as
=============  =================================================================================
``losses``     ``ctx.recon``, ``ctx.kl``, ``ctx.total``, ``ctx.beta`` (always available)
``latents``    ``ctx.mu``, ``ctx.logvar``: the batch's posterior parameters (detached)
``grads``      ``ctx.grads`` (each parameter's gradient, flattened), ``ctx.param_grad_norms``,
               ``ctx.grads_finite``, ``ctx.layers``
``graph``      ``ctx.kl_term`` still attached to the autograd graph (the recon/KL split)
``optimizer``  ``ctx.optimizer`` after its step (runs after ``optimizer.step()``; the probe's
               ``before_step(ctx)`` runs before it)
``update``     ``ctx.before``: flat copies of the parameters before the step (runs after it;
               the update is ``p - before``)
``eval``       an :class:`EvalContext` at every evaluation instead of a StepContext
=============  =================================================================================

``compute`` returns plain floats, 0-d tensors or vectors (:func:`per_index`), named with
:mod:`vaediag.columns`; the Monitor reads every tensor of a step from the device at once, and
never in ``compute``. Probes run at the steps their ``schedule`` says; a probe that raises is
disabled with one warning and an event, and training goes on.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np
import torch
from torch import nn

# The types a probe is written against, defined by job in modules of their own and named here
# too (``from vaediag.probes.base import StepContext`` keeps working).
from vaediag.probes.context import EvalContext, ImageSet, StepContext
from vaediag.probes.layers import LayerIndex
from vaediag.probes.sampling import EntrySample, local

if TYPE_CHECKING:
    from vaediag.metrics.lpips import LPIPSMetric

__all__ = ["NEEDS", "EntrySample", "EvalContext", "Every", "ImageSet", "LayerIndex", "Probe",
           "ProbeSetup", "Schedule", "StepContext", "every", "local", "log_spaced", "per_index",
           "safe_div"]

NEEDS = frozenset({"losses", "latents", "grads", "graph", "optimizer", "update", "eval"})
AFTER_STEP_NEEDS = frozenset({"optimizer", "update"})

Schedule = Callable[[int], bool]


class Every:
    """The schedule of :func:`every`: a step is due when ``step % period == 0``. A schedule
    with a ``period`` lets the Monitor decide once, for a whole cycle of steps, which probes
    are due (no per-probe work on the steps where none runs)."""

    __slots__ = ("period",)

    def __init__(self, period: int):
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"every(n) needs an int n >= 1, got {period!r}")
        self.period = period

    def __call__(self, step: int) -> bool:
        return step % self.period == 0

    def __repr__(self) -> str:
        return f"every({self.period})"


def every(n: int) -> Schedule:
    """Run at steps 0, n, 2n, ..."""
    return Every(n)


def log_spaced(start: int = 1, per_decade: int = 10) -> Schedule:
    """Run densely early and sparsely later: about ``per_decade`` times per factor of ten."""
    marks: set[int] = {0}
    x = float(max(1, start))
    while x < 1e12:
        marks.add(round(x))
        x *= 10 ** (1 / per_decade)
    return lambda step: step in marks


#: what a probe's ``compute`` takes: a :class:`StepContext`, or an :class:`EvalContext` for a
#: probe that needs ``eval``
Context = TypeVar("Context", StepContext, EvalContext)


class Probe(Generic[Context]):
    """Base class of probes. Subclasses set ``name``, ``needs`` and implement ``compute``;
    ``class MyProbe(Probe[StepContext])`` (or ``Probe[EvalContext]``) types its ``ctx``."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset({"losses"})

    def __init__(self, schedule: Schedule | None = None, *, when_unusual: bool = False):
        """``when_unusual``: also run at every step the Monitor finds unusual (the gradient
        norm jumped, lr or eps jumped, a value went non-finite), whatever the schedule, so a
        sparse schedule still sees sudden events."""
        unknown = set(self.needs) - NEEDS
        if unknown:
            raise ValueError(f"probe {self.name!r} needs unknown inputs {sorted(unknown)}")
        if not self.name:
            raise ValueError(f"{type(self).__name__} must set a name")
        self.schedule: Schedule = schedule or every(1)
        self.when_unusual = when_unusual

    @property
    def on_eval(self) -> bool:
        return "eval" in self.needs

    @property
    def after_step(self) -> bool:
        return bool(self.needs & AFTER_STEP_NEEDS)

    def setup(self, info: ProbeSetup) -> str | None:
        """Called once before the first step. Return a reason to decline ('not applicable')."""
        return None

    def before_step(self, ctx: StepContext) -> None:
        """Called before ``optimizer.step()`` at the steps a probe that runs after the step is
        due (needs ``optimizer`` or ``update``): e.g. to copy what the step will change."""

    def compute(self, ctx: Context) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep for the probe to continue exactly after a resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


@dataclass
class ProbeSetup:
    """What a probe may look at once, before training: the model, optimizer and layout."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    layers: LayerIndex
    latent_dim: int
    has_factors: bool
    #: LPIPS for a probe that uses it: loaded on the first call (None when its weights are not
    #: to be had; the Monitor says so once), then shared by every evaluation's ``ctx.lpips``
    load_lpips: Callable[[], LPIPSMetric | None] = lambda: None
    #: whether the parameters are FSDP shards (every rank runs the probe on its own; see
    #: ``StepContext.reduce``)
    sharded: bool = False


@functools.lru_cache(maxsize=1024)
def _column_names(kind: str, stat: str, labels: tuple[str, ...]) -> tuple[str, ...]:
    from vaediag.columns import name

    return tuple(name(kind, stat, label) for label in labels)


@functools.lru_cache(maxsize=1024)
def _numbered_names(kind: str, stat: str, count: int) -> tuple[str, ...]:
    return _column_names(kind, stat, tuple(str(i) for i in range(count)))


def per_index(kind: str, stat: str, values: torch.Tensor | np.ndarray,
              labels: list[str] | None = None) -> dict[Any, Any]:
    """The columns ``KIND.STAT/LABEL`` of a 1-D vector of values, as one probe-result entry.

    The entry's key is the tuple of column names and its value the whole vector, so the Monitor
    reads all of a step's values from the device at once (see :func:`to_floats`).
    """
    array = isinstance(values, (torch.Tensor, np.ndarray))
    count = values.shape[0] if array else len(values)  # (Python's Tensor.__len__ is slow)
    names = _column_names(kind, stat, tuple(labels)) if labels is not None else \
        _numbered_names(kind, stat, count)
    if len(names) != count:
        raise ValueError(f"{len(names)} labels for {count} values of {kind}.{stat}")
    return {names: values if array else np.asarray(values)}


def safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)),
                       torch.full_like(a, math.nan))
