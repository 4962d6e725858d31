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

    def on(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``index`` on ``device``, copied there once (a copy per step would cost a device
        synchronisation on a GPU)."""
        key = (id(index), device)
        cache = self.__dict__.setdefault("_on_device", {})
        if key not in cache:
            cache[key] = index.to(device)
        return cache[key]

    def _group_sum(self, values: torch.Tensor, index: torch.Tensor, groups: int) -> torch.Tensor:
        out = torch.zeros((groups, *values.shape[1:]), dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.on(index, values.device), values)

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
    #: LPIPS for a probe that uses it: loaded on the first call (None when its weights are not
    #: to be had; the Monitor says so once), then shared by every evaluation's ``ctx.lpips``
    load_lpips: Callable[[], LPIPSMetric | None] = lambda: None
    #: whether the parameters are FSDP shards (every rank runs the probe on its own; see
    #: ``StepContext.reduce``)
    sharded: bool = False


_ALL = slice(None)


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (an FSDP shard of a parameter, its gradient or its state)."""
    return type(t).__name__ == "DTensor"


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor sharing its storage); ``t`` otherwise.
    Probes measure the shards; ``ctx.reduce`` adds up their sums over the ranks."""
    return t.to_local() if is_dtensor(t) else t


def no_reduce(sums: torch.Tensor) -> torch.Tensor:
    return sums


def _prime_at_least(n: int) -> int:
    """The smallest prime >= n (n >= 2)."""
    while any(n % d == 0 for d in range(2, int(n ** 0.5) + 1)):
        n += 1
    return n


def sample_slice(numel: int, count: int) -> slice:
    """At most ``count`` entries of a flattened tensor of ``numel`` entries, fixed for the run:
    all of them, or every k-th over the whole tensor for the smallest prime k that keeps to
    ``count``. A prime stride shares no factor with a tensor's shape (4x4 kernels, 64
    channels, ...), so the sample visits every filter, row and kernel tap; and it is a plain
    strided view (no gather)."""
    if count >= numel:
        return _ALL
    return slice(0, None, _prime_at_least(max(2, -(-numel // count))))


def _quotas(numels: list[int], cap: int) -> list[int]:
    """Split ``cap`` sampled entries over a layer's tensors in proportion to their sizes (at
    least one entry each)."""
    total = sum(numels)
    quotas = [min(n, max(1, cap * n // total)) for n in numels]
    largest = max(range(len(numels)), key=numels.__getitem__)
    quotas[largest] = min(numels[largest], quotas[largest] + cap - sum(quotas))
    return quotas


class EntrySample:
    """A fixed sample of the entries of a list of tensors (parameters or their optimizer
    state), gathered into one flat vector layer by layer, and reduced per layer.

    Every statistic of a step is then a few operations over one vector, whatever the number of
    tensors: on a CPU the fixed cost of an operation, not its arithmetic, is what makes
    per-tensor statistics slow. A layer with more than ``cap`` entries is measured on exactly
    ``cap`` of them (split over its weight and bias in proportion), each standing for
    ``numel / sampled`` entries of its tensor, so per-layer sums estimate those over every
    entry; smaller layers (and every layer when ``cap`` is None) are measured whole. The
    sampled layers come first, as one (layers x cap) block reduced in a single operation.
    """

    def __init__(self, members: list[int], numels: list[int], layers: LayerIndex,
                 cap: int | None, device: torch.device):
        layer_of = layers.param_layer.tolist()
        by_layer: dict[int, list[int]] = {}
        for i in members:
            by_layer.setdefault(layer_of[i], []).append(i)
        sampled = [la for la, ps in by_layer.items()
                   if cap is not None and sum(numels[i] for i in ps) > cap]
        whole = [la for la in by_layer if la not in sampled]
        self.cap = cap or 0
        self.n_sampled = len(sampled)
        self.order: list[int] = []
        self.slices: dict[int, slice] = {}
        counts: dict[int, int] = {}
        self._pads: dict[int, torch.Tensor] = {}  # after position: zeros completing a layer
        zeros = torch.zeros(self.cap, device=device)
        for la in sampled:
            ps = by_layer[la]
            for i, q in zip(ps, _quotas([numels[i] for i in ps], self.cap), strict=True):
                self.order.append(i)
                self.slices[i] = sample_slice(numels[i], q) if q else slice(0, 0)
                counts[i] = len(range(numels[i])[self.slices[i]])
            pad = self.cap - sum(counts[i] for i in ps)
            if pad:
                self._pads[len(self.order) - 1] = zeros[:pad]
        self.whole_sizes = []
        for la in whole:
            for i in by_layer[la]:
                self.order.append(i)
                self.slices[i] = _ALL
                counts[i] = numels[i]
            self.whole_sizes.append(sum(numels[i] for i in by_layer[la]))
        self.numels = numels
        self.size = sum(counts.values()) + sum(len(z) for z in self._pads.values())
        #: the layers measured (indices into ``layers.layers``), in the order of the vector
        self.layer_ids = torch.tensor(sampled + whole, dtype=torch.long)
        #: per entry of the sampled block: how many entries of its tensor it stands for
        weights = []
        for position, i in enumerate(self.order[:sum(len(by_layer[la]) for la in sampled)]):
            weights.append(torch.full((counts[i],), numels[i] / max(counts[i], 1)))
            if position in self._pads:
                weights.append(torch.zeros(len(self._pads[position])))
        self.weight = torch.cat(weights or [torch.zeros(0)]).to(device)

    def views(self, tensors: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """The sampled entries of ``tensors`` (indexed like the parameters; None reads as
        zeros, e.g. a parameter without a gradient at this step), as flat views."""
        out = []
        for position, i in enumerate(self.order):
            t = tensors[i]
            if t is None:
                t = torch.zeros(self.numels[i], device=self.weight.device)
            t = local(t)
            flat = t.detach().view(-1) if t.is_contiguous() else t.detach().reshape(-1)
            out.append(flat if self.slices[i] == _ALL else flat[self.slices[i]])
            if position in self._pads:
                out.append(self._pads[position])
        return out

    def gather(self, tensors: list[torch.Tensor | None], out: torch.Tensor) -> torch.Tensor:
        """Copy the sampled entries of ``tensors`` into ``out`` (one vector of ``size``)."""
        return torch.cat(self.views(tensors), out=out)

    def layer_sums(self, rows: torch.Tensor) -> torch.Tensor:
        """(R, N) per-entry values -> (R, layers) sums over each layer's entries (estimated
        for sampled layers)."""
        parts = []
        block = self.n_sampled * self.cap
        if self.n_sampled:
            sampled = rows[:, :block] * self.weight
            parts.append(sampled.view(len(rows), self.n_sampled, self.cap).sum(-1))
        if self.whole_sizes:
            parts.append(torch.stack([s.sum(1) for s in
                                      rows[:, block:].split(self.whole_sizes, 1)], 1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


class StepContext:
    """Inputs of one training step, each computed at most once and only when asked for.

    What is per parameter is in ``params`` order; ``layers`` sums it into layers and parts.
    Work on many tensors at once (list-wide ``torch._foreach_*`` operations, or a fixed
    sample gathered into one vector with :class:`EntrySample`): on a CPU an operation's fixed
    cost, not its arithmetic, is what makes per-tensor statistics slow.
    """

    def __init__(self, step: int, params: list[tuple[str, nn.Parameter]], layers: LayerIndex,
                 optimizer: torch.optim.Optimizer | None, values: dict[str, Any],
                 reduce: Callable[[torch.Tensor], torch.Tensor] = no_reduce):
        self.step = step
        #: sums over this rank's entries -> sums over every rank's, in place. The identity in
        #: one process or under DDP; under FSDP (``params`` are shards: measure ``local(p)``)
        #: an all-reduce that every rank joins, so call it on every rank, on every step the
        #: probe runs, with a tensor of the same shape.
        self.reduce = reduce
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
        #: under torch.distributed: every rank's summary of its mu and logvar ((ranks, D + 7),
        #: ``probes.latents.rank_summary``), for statistics of the global batch
        self.latent_ranks: torch.Tensor | None = values.get("latent_ranks")
        self.param_grad_norms: torch.Tensor = values["param_grad_norms"]  # (P,), zeros if no grad
        #: whether every gradient entry is finite, known on the host (the Monitor has read the
        #: global gradient norm), so probes need not read the device to ask
        finite = values.get("grads_finite")
        self.grads_finite: bool = bool(torch.isfinite(self.param_grad_norms).all()) \
            if finite is None else finite
        #: Flat copies of the parameters taken before the optimizer step ("update" need);
        #: a probe may overwrite them (they are refreshed at every snapshot).
        self.before: list[torch.Tensor] | None = None

    @cached_property
    def grads(self) -> list[torch.Tensor]:
        """Each parameter's gradient, flattened (zeros where it has none), detached."""
        return [local(p.grad).detach().reshape(-1) if p.grad is not None
                else torch.zeros(local(p).numel(), device=p.device) for _, p in self.params]

    def nonfinite_grad_entries(self) -> torch.Tensor | float:
        """Count of NaN/Inf gradient entries (0 without looking, when every norm is finite)."""
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
    _set: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)

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


@functools.lru_cache(maxsize=1024)
def _column_names(kind: str, stat: str, labels: tuple[str, ...]) -> tuple[str, ...]:
    from vaediag.columns import name

    return tuple(name(kind, stat, label) for label in labels)


def per_index(kind: str, stat: str, values: torch.Tensor | np.ndarray,
              labels: list[str] | None = None) -> dict[Any, Any]:
    """The columns ``KIND.STAT/LABEL`` of a 1-D vector of values, as one probe-result entry.

    The entry's key is the tuple of column names and its value the whole vector, so the Monitor
    reads all of a step's values from the device at once (see :func:`to_floats`).
    """
    labels = labels if labels is not None else [str(i) for i in range(len(values))]
    names = _column_names(kind, stat, tuple(labels))
    if len(names) != len(values):
        raise ValueError(f"{len(names)} labels for {len(values)} values of {kind}.{stat}")
    vector = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    return {names: vector}


def to_floats(values: dict[Any, Any]) -> dict[str, float]:
    """Probe results as ``{column: float}``, reading tensors with one transfer per device.

    A key is a column name (value: a float or a 0-d tensor) or a tuple of column names (value:
    a 1-D tensor or array of as many values).
    """
    return read_floats([values])[0]


def read_floats(groups: list[dict[Any, Any]]) -> list[dict[str, float]]:
    """:func:`to_floats` of several dicts at once: one transfer per device for all of them."""
    outs: list[dict[str, float]] = [{} for _ in groups]
    pending: dict[torch.device, list[tuple[int, tuple[str, ...], torch.Tensor]]] = {}
    for g, values in enumerate(groups):
        out = outs[g]
        for key, value in values.items():
            names = key if isinstance(key, tuple) else (key,)
            if isinstance(value, torch.Tensor):
                pending.setdefault(value.device, []).append(
                    (g, names, value.detach().reshape(-1).float()))
            elif isinstance(key, tuple):
                out.update(zip(names, (float(v) for v in value), strict=True))
            else:
                out[key] = float(value)
    for items in pending.values():
        flat = torch.cat([v for _, _, v in items]).tolist()
        at = 0
        for g, names, _ in items:
            outs[g].update(zip(names, flat[at:at + len(names)], strict=True))
            at += len(names)
    return outs


def safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)),
                       torch.full_like(a, math.nan))
