"""The Probe API: a probe says what it needs and when it runs, then computes named values.

A probe is a small class::

    class GradNorms(Probe):
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
``grads``      ``ctx.flat_grad``, ``ctx.param_grad_norms``, ``ctx.layer_grad_norms()``
``graph``      ``ctx.kl_term`` still attached to the autograd graph (the recon/KL split)
``optimizer``  ``ctx.optimizer`` after its step (runs after ``optimizer.step()``)
``update``     ``ctx.flat_update()``: the parameter change made by the step (after the step)
``eval``       an :class:`EvalContext` at every evaluation instead of a StepContext
=============  =================================================================================

``compute`` returns plain floats or 0-d tensors (the Monitor syncs every tensor of a step with
the device once), named with :mod:`vaediag.columns`. Probes run at the steps their ``schedule``
says; a probe that raises is disabled with one warning and an event, and training goes on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from vaediag.metrics.lpips import LPIPSMetric

NEEDS = frozenset({"losses", "latents", "grads", "graph", "optimizer", "update", "eval"})
AFTER_STEP_NEEDS = frozenset({"optimizer", "update"})

Schedule = Callable[[int], bool]


def every(n: int) -> Schedule:
    """Run at steps 0, n, 2n, ..."""
    if n < 1:
        raise ValueError(f"every(n) needs n >= 1, got {n}")
    return lambda step: step % n == 0


def log_spaced(start: int = 1, per_decade: int = 10) -> Schedule:
    """Run densely early and sparsely later: about ``per_decade`` times per factor of ten."""
    marks: set[int] = {0}
    x = float(max(1, start))
    while x < 1e12:
        marks.add(round(x))
        x *= 10 ** (1 / per_decade)
    return lambda step: step in marks


class Probe:
    """Base class of probes. Subclasses set ``name``, ``needs`` and implement ``compute``."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset({"losses"})

    def __init__(self, schedule: Schedule | None = None):
        unknown = set(self.needs) - NEEDS
        if unknown:
            raise ValueError(f"probe {self.name!r} needs unknown inputs {sorted(unknown)}")
        if not self.name:
            raise ValueError(f"{type(self).__name__} must set a name")
        self.schedule: Schedule = schedule or every(1)

    @property
    def on_eval(self) -> bool:
        return "eval" in self.needs

    @property
    def after_step(self) -> bool:
        return bool(self.needs & AFTER_STEP_NEEDS)

    def setup(self, info: ProbeSetup) -> str | None:
        """Called once before the first step. Return a reason to decline ('not applicable')."""
        return None

    def compute(self, ctx: Any) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep for the probe to continue exactly after a resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


@dataclass
class LayerIndex:
    """Parameters grouped into layers (a module's own parameters) and parts (top-level modules).

    ``decoder.fc.weight`` and ``decoder.fc.bias`` form layer ``decoder.fc`` in part ``decoder``;
    a parameter not named weight/bias is a layer of its own (``decoder.log_scale``).
    """

    param_names: list[str]
    layers: list[str]
    parts: list[str]
    param_layer: torch.Tensor  # (P,) layer index of each parameter
    layer_part: torch.Tensor  # (L,) part index of each layer
    param_numel: torch.Tensor  # (P,)

    @classmethod
    def from_params(cls, named: list[tuple[str, nn.Parameter]]) -> LayerIndex:
        layers: dict[str, int] = {}
        parts: dict[str, int] = {}
        param_layer, layer_part = [], []
        for pname, _ in named:
            head, _, last = pname.rpartition(".")
            layer = head if last in ("weight", "bias") and head else pname
            if layer not in layers:
                layers[layer] = len(layers)
                part = layer.split(".", 1)[0]
                parts.setdefault(part, len(parts))
                layer_part.append(parts[part])
            param_layer.append(layers[layer])
        return cls(
            param_names=[n for n, _ in named], layers=list(layers), parts=list(parts),
            param_layer=torch.tensor(param_layer, dtype=torch.long),
            layer_part=torch.tensor(layer_part, dtype=torch.long),
            param_numel=torch.tensor([p.numel() for _, p in named], dtype=torch.float64),
        )

    @cached_property
    def layer_numel(self) -> torch.Tensor:
        return self.per_layer_sum(self.param_numel)

    @staticmethod
    def _group_sum(values: torch.Tensor, index: torch.Tensor, groups: int) -> torch.Tensor:
        out = torch.zeros((groups, *values.shape[1:]), dtype=values.dtype, device=values.device)
        return out.index_add_(0, index.to(values.device), values)

    def per_layer_sum(self, per_param: torch.Tensor) -> torch.Tensor:
        """Sum a (P, ...) per-parameter quantity into (L, ...) per-layer totals."""
        return self._group_sum(per_param, self.param_layer, len(self.layers))

    def per_part_sum(self, per_layer: torch.Tensor) -> torch.Tensor:
        """Sum a (L, ...) per-layer quantity into (parts, ...) per-part totals."""
        return self._group_sum(per_layer, self.layer_part, len(self.parts))


@dataclass
class ProbeSetup:
    """What a probe may look at once, before training: the model, optimizer and layout."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    layers: LayerIndex
    latent_dim: int
    has_factors: bool
    lpips: LPIPSMetric | None


#: Parameter tensors with fewer entries than this are processed together in one batch: on a CPU
#: the fixed cost of a tensor operation, not arithmetic, dominates for biases and small layers.
SMALL_TENSOR = 1 << 15


def param_batches(numels: list[int], keys: list[object] | None = None) -> list[list[int]]:
    """Parameter indices to process together: each large tensor alone, small ones batched.

    Small tensors are batched only with others of the same ``key`` (e.g. optimizer group).
    """
    keys = keys if keys is not None else [None] * len(numels)
    batches: list[list[int]] = []
    small: dict[object, list[int]] = {}
    for i, (n, key) in enumerate(zip(numels, keys, strict=True)):
        if n >= SMALL_TENSOR:
            batches.append([i])
        else:
            small.setdefault(key, []).append(i)
    return batches + list(small.values())


def concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One flat tensor: a view for a single tensor, a concatenation for several."""
    if len(tensors) == 1:
        return tensors[0].reshape(-1)
    return torch.cat([t.reshape(-1) for t in tensors])


def segment_sums(values: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Sums of consecutive segments of a flat tensor, (len(sizes),)."""
    if len(sizes) == 1:
        return values.sum().reshape(1)
    return torch.stack([s.sum() for s in values.split(sizes)])


class StepContext:
    """Inputs of one training step, each computed at most once and only when asked for.

    Everything is per parameter tensor (in ``params`` order): probes reduce each tensor and
    then sum the few per-parameter results into layers, which is far cheaper than working on
    one concatenated vector of every entry.
    """

    def __init__(self, step: int, params: list[tuple[str, nn.Parameter]], layers: LayerIndex,
                 optimizer: torch.optim.Optimizer | None, values: dict[str, Any]):
        self.step = step
        self.params = params
        self.layers = layers
        self.optimizer = optimizer
        self.recon: float = values["recon"]
        self.kl: float = values["kl"]
        self.total: float | None = values.get("total")
        self.beta: float | None = values.get("beta")
        self.mu: torch.Tensor | None = values.get("mu")
        self.logvar: torch.Tensor | None = values.get("logvar")
        self.kl_term: torch.Tensor | None = values.get("kl_term")
        self.param_grad_norms: torch.Tensor = values["param_grad_norms"]  # (P,), zeros if no grad
        #: Flat copies of the parameters taken before the optimizer step ("update" need);
        #: a probe may overwrite them (they are refreshed at every snapshot).
        self.before: list[torch.Tensor] | None = None

    @cached_property
    def grads(self) -> list[torch.Tensor]:
        """Each parameter's gradient, flattened (zeros where it has none), detached."""
        return [p.grad.detach().reshape(-1) if p.grad is not None
                else torch.zeros(p.numel(), device=p.device) for _, p in self.params]

    def layer_grad_norms(self) -> torch.Tensor:
        """(L,) L2 norm of each layer's gradient."""
        return self.layers.per_layer_sum(self.param_grad_norms.double().pow(2)).sqrt()

    def nonfinite_grad_entries(self) -> torch.Tensor:
        """Count of NaN/Inf gradient entries (0 without looking, when every norm is finite)."""
        if bool(torch.isfinite(self.param_grad_norms).all()):
            return torch.tensor(0.0)
        return sum((~torch.isfinite(g)).sum().double() for g in self.grads)


@dataclass
class EvalContext:
    """Inputs of one evaluation: the grid's images as the model is now, and a larger set."""

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
    _set: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)

    def eval_set(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(x, recon, mu, logvar) of the larger fixed evaluation set, encoded once on demand."""
        if self.encode_set is None:
            return None
        if self._set is None:
            self._set = self.encode_set()
        return self._set


def per_index(kind: str, stat: str, values: torch.Tensor | np.ndarray,
              labels: list[str] | None = None) -> dict[Any, Any]:
    """The columns ``KIND.STAT/LABEL`` of a 1-D vector of values, as one probe-result entry.

    The entry's key is the tuple of column names and its value the whole vector, so the Monitor
    reads all of a step's values from the device at once (see :func:`to_floats`).
    """
    from vaediag.columns import name

    labels = labels if labels is not None else [str(i) for i in range(len(values))]
    names = tuple(name(kind, stat, label) for label in labels)
    if len(names) != len(values):
        raise ValueError(f"{len(names)} labels for {len(values)} values of {kind}.{stat}")
    vector = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    return {names: vector}


def to_floats(values: dict[Any, Any]) -> dict[str, float]:
    """Probe results as ``{column: float}``, reading tensors with one transfer per device.

    A key is a column name (value: a float or a 0-d tensor) or a tuple of column names (value:
    a 1-D tensor or array of as many values).
    """
    from collections import defaultdict

    out: dict[str, float] = {}
    pending: dict[torch.device, list[tuple[tuple[str, ...], torch.Tensor]]] = defaultdict(list)
    for key, value in values.items():
        names = key if isinstance(key, tuple) else (key,)
        if isinstance(value, torch.Tensor):
            pending[value.device].append((names, value.detach().reshape(-1).float()))
        elif isinstance(key, tuple):
            out.update(zip(names, (float(v) for v in value), strict=True))
        else:
            out[key] = float(value)
    for items in pending.values():
        flat = torch.cat([v for _, v in items]).tolist()
        names = [n for ns, _ in items for n in ns]
        out.update(zip(names, flat, strict=True))
    return out


def safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)),
                       torch.full_like(a, math.nan))
