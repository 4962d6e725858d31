"""The Monitor: records a VAE's training into a run directory, one instrumented code path.

The built-in trainer and a user's own loop call the same methods::

    mon = vaediag.Monitor("runs/mine", model, optimizer, eval_images=val_batch,
                          encode=model.encode, decode=model.decode, eval_loss=eval_loss)
    for step, x in enumerate(loader):
        recon, kl, mu, logvar = ...                      # your forward pass and loss terms
        loss = recon + beta * kl
        optimizer.zero_grad()
        loss.backward(retain_graph=mon.wants_graph(step))  # retain only for the recon/KL split
        mon.after_backward(step, recon=recon, kl=kl, beta=beta, mu=mu, logvar=logvar)
        optimizer.step()
        mon.after_step(step)
    mon.close()

``step`` counts optimizer updates made before this batch (0-based): a per-step row with step s
describes the model after s updates, and an evaluation at step S shows it after S updates.
What is recorded beyond the losses is decided by probes (:mod:`vaediag.probes`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vaediag import grid
from vaediag import probes as probe_library
from vaediag.errors import UserError
from vaediag.metrics import lpips as lpips_metric
from vaediag.probes.base import (
    EvalContext,
    LayerIndex,
    Probe,
    ProbeSetup,
    StepContext,
    read_floats,
    to_floats,
)
from vaediag.rundir import RunWriter, load_run

EncodeFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
DecodeFn = Callable[[torch.Tensor], torch.Tensor]
#: (x, z, mu, logvar) -> (per-image reconstruction loss, per-image KL), each of shape (B,)
EvalLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                      tuple[torch.Tensor, torch.Tensor]]

GRID_IMAGES = grid.COLS
_SET_CHUNK = 64

#: A step is unusual when its gradient norm exceeds this many times the recent level (an
#: exponential average with weight ``GRAD_LEVEL_ALPHA`` per step) ...
GRAD_JUMP = 2.0
GRAD_LEVEL_ALPHA = 0.1
#: ... or when one of these optimizer settings changed by more than ``SETTING_JUMP`` times (either
#: way) since the previous step: a step decay or a spike, not a smooth schedule (a cosine decay
#: moves the lr by far less per step; a linear warm-up by more only in its first 10 steps).
WATCHED_SETTINGS = ("lr", "eps")
SETTING_JUMP = 1.1


@dataclass
class StepCheck:
    """What :meth:`Monitor.after_backward` saw: the trainer applies its non-finite policy to it."""

    grad_norm: float
    nonfinite: list[str] = field(default_factory=list)  # e.g. ["kl", "grad:decoder.fc.weight"]


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 100:
        return f"{value:,.1f}"
    return f"{value:.3g}" if abs(value) < 0.01 and value != 0 else f"{value:.3f}"


def _as_images(images: torch.Tensor | np.ndarray, what: str, minimum: int,
               value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """The images as float tensors in ``value_range`` (uint8 0..255 is mapped onto it)."""
    x = torch.as_tensor(images)
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[0] < minimum:
        raise UserError(f"{what} must be a batch of at least {minimum} RGB images shaped "
                        f"(N, 3, H, W), got {tuple(x.shape)}")
    lo, hi = value_range
    x = x.float() / 255.0 * (hi - lo) + lo if x.dtype == torch.uint8 else x.float()
    if not torch.isfinite(x).all() or x.min() < lo or x.max() > hi:
        raise UserError(f"{what} must lie in [{lo:g}, {hi:g}] (value_range), or be uint8 0..255; "
                        f"got values in [{float(x.min()):.3g}, {float(x.max()):.3g}]")
    return x


def _jumped(before: float | None, now: float | None) -> bool:
    """Whether a setting moved by more than ``SETTING_JUMP`` times (or changed sign)."""
    if before is None or now is None or before == now:
        return False
    if before <= 0 or now <= 0:
        return True
    return max(now / before, before / now) > SETTING_JUMP


def _held(values: dict[Any, Any]) -> dict[Any, Any]:
    """Probe values to read later, copied into one vector per device (so buffers a probe
    reuses may change in the meantime): the 0-d tensors stacked, then every vector appended,
    in as few operations as there are kinds of value, not values."""
    out: dict[Any, Any] = {}
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[str], list[torch.Tensor],
                                                         list[tuple[str, ...]],
                                                         list[torch.Tensor]]] = {}
    for key, value in values.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
            continue
        scalars, scalar_values, vector_names, vectors = groups.setdefault(
            (value.device, value.dtype), ([], [], [], []))
        if value.dim() == 0:
            scalars.append(key)
            scalar_values.append(value.detach())
        else:
            vector_names.append(key if isinstance(key, tuple) else (key,))
            vectors.append(value.detach().reshape(-1))
    for scalars, scalar_values, vector_names, vectors in groups.values():
        parts = ([torch.stack(scalar_values)] if scalar_values else []) + vectors
        flat = (torch.cat(parts) if len(parts) > 1 else parts[0].clone()).float()
        out[(*scalars, *(n for names in vector_names for n in names))] = flat
    return out


def forward_order(model: nn.Module, run: Callable[[], Any]) -> dict[str, int]:
    """The order in which ``run()`` (a forward pass) first calls each module that owns
    parameters: {parameter name: rank}. The backward pass reaches the highest rank first."""
    order: dict[str, int] = {}
    owners = {name: m for name, m in model.named_modules()
              if any(True for _ in m.parameters(recurse=False))}

    def hook(name: str):
        def record(module, inputs):
            order.setdefault(name, len(order))
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in owners.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    ranks = {}
    for pname, _ in model.named_parameters():
        module = pname.rpartition(".")[0]
        ranks[pname] = order.get(module, -1)
    return ranks


class Monitor:
    """Record losses, gradients, optimizer state and image quality; evaluate the 4x8 grid.

    Parameters
    ----------
    run_dir
        A path for a new run directory, or an open :class:`~vaediag.rundir.RunWriter`.
    model, optimizer
        The model (parameter names, gradients) and its optimizer (learning rate, Adam state).
    eval_images
        The fixed validation batch of the grid: at least 8 RGB images (N, 3, H, W) in [0, 1]
        (uint8 0..255 is accepted too); the first 8 are used.
    encode, decode
        ``encode(x) -> (mu, logvar)`` and ``decode(z) -> image in [0, 1]``; default: the
        model's own ``encode`` / ``decode`` methods.
    eval_loss
        Optional ``(x, z, mu, logvar) -> (recon per image, kl per image)``; without it the
        grid shows no losses of its own images.
    eval_every
        Steps between evaluations (grid, eval losses, image-quality probes). An evaluation
        costs about as much as a few training steps; the loss-quality analysis needs at least
        six after the first few hundred steps.
    value_range
        The range of the images ``eval_images`` holds and ``decode`` returns: ``(0, 1)``
        (default) or e.g. ``(-1, 1)`` for a tanh decoder. Images are mapped from it onto [0, 1]
        for the grid and the quality metrics; a decoder output outside it is clamped, with one
        warning and an event.
    probes
        A preset name (``off``, ``cheap``, ``standard``, ``full``) or a list of probes.
    extra_probes
        More probes (instances) to run besides the preset.
    metric_images
        Optional larger fixed set of validation images scored at each evaluation (active units,
        set-level quality).
    lpips_weights, lpips_download
        Where LPIPS' AlexNet weights are, and whether torchvision may download them.
    """

    def __init__(
        self,
        run_dir: str | Path | RunWriter,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        eval_images: torch.Tensor | np.ndarray,
        encode: EncodeFn | None = None,
        decode: DecodeFn | None = None,
        eval_loss: EvalLossFn | None = None,
        eval_every: int = 100,
        value_range: tuple[float, float] = (0.0, 1.0),
        probes: str | Sequence[Probe] = "standard",
        extra_probes: Sequence[Probe] = (),
        metric_images: torch.Tensor | np.ndarray | None = None,
        lpips_weights: str | None = None,
        lpips_download: bool = False,
        recon_mode: str = "mean",
        seed: int = 0,
        steps_per_epoch: int | None = None,
        eval_factors: dict[str, np.ndarray] | None = None,
        config: dict[str, Any] | None = None,
        overwrite: bool = False,
        resume: bool = False,
    ):
        if eval_every < 1:
            raise UserError(f"eval_every must be >= 1, got {eval_every}")
        if recon_mode not in ("mean", "sample"):
            raise UserError(f"recon_mode must be 'mean' or 'sample', got {recon_mode!r}")
        try:
            lo, hi = (float(v) for v in value_range)
        except (TypeError, ValueError):
            raise UserError(f"value_range must be (low, high), got {value_range!r}") from None
        if not hi > lo:
            raise UserError(f"value_range must have low < high, got {value_range!r}")
        self.value_range = (lo, hi)
        self.model = model
        self.optimizer = optimizer
        self.encode = encode or getattr(model, "encode", None)
        self.decode = decode or getattr(model, "decode", None)
        if self.encode is None or self.decode is None:
            raise UserError("Monitor needs encode(x) -> (mu, logvar) and decode(z) -> image: "
                            "pass encode= and decode=, or give the model those methods")
        self.eval_loss = eval_loss
        self.eval_every = eval_every
        self.recon_mode = recon_mode
        self.steps_per_epoch = steps_per_epoch
        self.device = next(iter(model.parameters())).device
        self._params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.layers = LayerIndex.from_params(self._params)
        self._eval_x = _as_images(eval_images, "eval_images", GRID_IMAGES,
                                  self.value_range)[:GRID_IMAGES]
        self._eval_x = self._eval_x.to(self.device)
        self._set_x = None if metric_images is None else \
            _as_images(metric_images, "metric_images", 2, self.value_range)
        self._factors = {k: np.asarray(v)[:GRID_IMAGES] for k, v in (eval_factors or {}).items()}

        if isinstance(run_dir, RunWriter):
            self.writer = run_dir
        else:
            import tomli_w

            from vaediag import environment
            settings = {"monitor": {"eval_every": eval_every, "recon_mode": recon_mode,
                                    "value_range": list(self.value_range),
                                    "probes": probes if isinstance(probes, str) else "custom"}}
            self.writer = RunWriter.create(
                run_dir, config_toml=tomli_w.dumps({**settings, **(config or {})}),
                environment=environment.collect(self.device, seed), overwrite=overwrite)
        if resume:
            fixed = load_run(self.writer.path).fixed
            self.fixed_z = torch.from_numpy(fixed["fixed_z"]).to(self.device)
            self.recon_noise = torch.from_numpy(fixed["recon_noise"]).to(self.device)
        # One forward pass in eval mode (batch norm's running statistics stay as they are) tells
        # the latent size and the order in which layers run.
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                probe_x = self._eval_x[:2]
                latent = self.encode(probe_x)[0].shape[1]
                self._rank = forward_order(model, lambda: self.decode(self.encode(probe_x)[0]))
        finally:
            self.model.train(was_training)
        if not resume:
            g = torch.Generator().manual_seed(seed + 20_231)
            self.fixed_z = torch.randn(GRID_IMAGES, latent, generator=g).to(self.device)
            self.recon_noise = torch.randn(GRID_IMAGES, latent, generator=g).to(self.device)
            self.writer.save_fixed(
                eval_images=(self._to_unit(self._eval_x).cpu().numpy() * 255).round()
                .astype(np.uint8),
                fixed_z=self.fixed_z.cpu().numpy(), recon_noise=self.recon_noise.cpu().numpy(),
                **{f"factor_{k}": v for k, v in self._factors.items()},
            )

        self.probes: list[Probe] = [*self._choose(probes), *extra_probes]
        self.lpips = self._load_lpips(lpips_weights, lpips_download) \
            if any(p.on_eval for p in self.probes) else None
        self._setup_probes(resume)

        self._pending: tuple[StepContext, dict[str, Any], dict[str, Any]] | None = None
        #: the last step's row and its probe values still on the device (see after_step)
        self._unread: tuple[dict[str, Any], dict[Any, Any]] | None = None
        #: whether the current step is unusual (see _judge), and what that is judged from
        self.unusual = False
        self._grad_level: float | None = None
        self._settings: tuple | None = None
        self._before: list[torch.Tensor] | None = None
        self._sums = np.zeros(3)  # recon, kl, count since the last evaluation
        self._elapsed_before = 0.0
        self._t0 = time.monotonic()
        self.last_step_row: dict[str, Any] = {}
        self.last_eval_row: dict[str, Any] = {}
        self._evaluated = resume  # a resumed run has its evaluation at the checkpoint's step
        self._warned: set[str] = set()
        if self.eval_loss is None and not resume:
            self._warn("no_eval_loss", 0, "no eval_loss given: the grid shows no losses of its "
                       "own images and the loss-quality analysis cannot run (pass eval_loss=)")

    def _warn(self, what: str, step: int, message: str, **fields: Any) -> None:
        """Say something about the user's input once per run, and record it as an event."""
        if what in self._warned:
            return
        self._warned.add(what)
        self.writer.event("monitor_warning", step, what=what, message=message, **fields)
        print(f"vaediag: warning: {message}", file=sys.stderr)

    def _to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Images from ``value_range`` onto [0, 1]."""
        lo, hi = self.value_range
        return x if (lo, hi) == (0.0, 1.0) else (x - lo) / (hi - lo)

    # -- probes -------------------------------------------------------------------------------

    @staticmethod
    def _choose(spec: str | Sequence[Probe]) -> list[Probe]:
        return probe_library.build(spec) if isinstance(spec, str) else list(spec)

    def _load_lpips(self, weights: str | None, download: bool):
        metric, status = lpips_metric.load(weights, download, self.device)
        fields = {"metric": "lpips", "available": status.available, "reason": status.reason,
                  "weights": status.weights, "sha256": status.sha256, "verified": status.verified}
        self.writer.event("metric_status", 0, **fields)
        if not status.available:
            print(f"vaediag: warning: {status.describe()}; the other metrics are recorded",
                  file=sys.stderr)
        elif not status.verified:
            print(f"vaediag: warning: {status.describe()}", file=sys.stderr)
        return metric

    def _setup_probes(self, resume: bool) -> None:
        info = ProbeSetup(self.model, self.optimizer, self.layers,
                          int(self.fixed_z.shape[1]), bool(self._factors), self.lpips)
        active = []
        for probe in self.probes:
            reason = probe.setup(info)
            if reason:
                if not resume:
                    self.writer.event("probe_not_applicable", 0, probe=probe.name, reason=reason)
                print(f"vaediag: note: probe '{probe.name}' is not applicable: {reason}",
                      file=sys.stderr)
            else:
                active.append(probe)
        self.probes = active
        if not resume:
            self.writer.event("probes", 0, active=[p.name for p in active])

    def _run(self, probe: Probe, ctx: Any, step: int) -> dict[str, Any]:
        """Run one probe; a probe that raises is disabled with one warning and an event."""
        try:
            return probe.compute(ctx)
        except Exception as exc:  # noqa: BLE001 - a broken probe must never stop training
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.probes = [p for p in self.probes if p is not probe]
            self.writer.event("probe_failed", step, probe=probe.name, error=message)
            print(f"vaediag: warning: probe '{probe.name}' failed at step {step} and is "
                  f"disabled: {message}", file=sys.stderr)
            return {}

    def _due(self, step: int, *, after_step: bool) -> list[Probe]:
        return [p for p in self.probes
                if not p.on_eval and p.after_step == after_step
                and (p.schedule(step) or (p.when_unusual and self.unusual))]

    def wants_graph(self, step: int) -> bool:
        """Whether ``loss.backward`` should keep the graph at ``step`` (for the gradient split)."""
        return any("graph" in p.needs for p in self._due(step, after_step=False))

    # -- per step -----------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self._elapsed_before + time.monotonic() - self._t0

    def after_backward(
        self,
        step: int,
        *,
        recon: torch.Tensor | float,
        kl: torch.Tensor | float,
        total: torch.Tensor | float | None = None,
        beta: float | None = None,
        epoch: int | None = None,
        mu: torch.Tensor | None = None,
        logvar: torch.Tensor | None = None,
        kl_term: torch.Tensor | None = None,
        extra: dict[str, Any] | None = None,
    ) -> StepCheck:
        """Call after ``loss.backward()`` and before ``optimizer.step()``.

        ``kl_term`` is the KL part of the loss as differentiated (default ``beta * kl``); give
        it, still attached to the graph, for the recon/KL gradient split.

        This is the step's one read from the device: the losses, the gradient norm and the
        previous step's probe values come back together (see :meth:`_read`).
        """
        if step == 0 and not self._evaluated:
            self.evaluate(0)
        norms = self._grad_norms()
        core: dict[str, Any] = {"recon": recon, "kl": kl}
        if total is not None:
            core["total"] = total
        if norms is not None:
            core["grad_norm"] = norms.double().square().sum().sqrt()
        row: dict[str, Any] = {"step": int(step), "time": self.elapsed(), **self._read(core)}
        if epoch is not None:
            row["epoch"] = epoch
        if beta is not None:
            row["beta"] = float(beta)
        if self.optimizer is not None:
            group = self.optimizer.param_groups[0]
            if isinstance(group["lr"], (int, float)):
                row["lr"] = float(group["lr"])
            if isinstance(group.get("eps"), (int, float)):
                row["eps"] = float(group["eps"])
        check = StepCheck(grad_norm=row.get("grad_norm", math.nan))
        for term in ("recon", "kl", "total"):
            if term in row and not math.isfinite(row[term]):
                check.nonfinite.append(term)
        grads_finite = norms is None or math.isfinite(check.grad_norm)
        if check.nonfinite or not grads_finite:
            check.nonfinite += self._nonfinite_origin(norms) or ["grad"]
        for term in check.nonfinite:
            self.writer.event("nonfinite", step, term=term, recon=row["recon"], kl=row["kl"],
                              grad_norm=check.grad_norm)
        if math.isfinite(row["kl"]) and row["kl"] < -1e-3 * max(1.0, abs(row["recon"])):
            self._warn("negative_kl", step, f"the KL given at step {step} is negative "
                       f"({row['kl']:.4g}): an analytic KL never is (check its sign and "
                       f"reduction); a single-sample Monte Carlo estimate can be", kl=row["kl"])
        if math.isfinite(row["recon"]) and math.isfinite(row["kl"]):
            self._sums += (row["recon"], row["kl"], 1)
        self.unusual = self._judge(row, check)

        if kl_term is None and isinstance(kl, torch.Tensor) and kl.requires_grad:
            kl_term = kl * (1.0 if beta is None else beta)
        if norms is None:
            norms = torch.zeros(len(self._params), device=self.device)
        ctx = StepContext(step, self._params, self.layers, self.optimizer,
                          {"recon": row["recon"], "kl": row["kl"], "total": row.get("total"),
                           "beta": beta, "mu": None if mu is None else mu.detach(),
                           "logvar": None if logvar is None else logvar.detach(),
                           "kl_term": kl_term,
                           "param_grad_norms": norms,
                           "grads_finite": grads_finite})
        values: dict[str, Any] = dict(extra or {})
        for probe in self._due(step, after_step=False):
            values.update(self._run(probe, ctx, step))
        ctx.kl_term = None  # release the graph
        after = self._due(step, after_step=True)
        if any("update" in p.needs for p in after):
            ctx.before = self._snapshot()
        for probe in after:
            probe.before_step(ctx)
        self._pending = (ctx, row, values)
        return check

    def _judge(self, row: dict[str, Any], check: StepCheck) -> bool:
        """Whether this step is unusual: its gradient norm jumped (``GRAD_JUMP`` times the
        recent level), lr or eps jumped (``SETTING_JUMP``), or a value went non-finite. Probes
        made with ``when_unusual=True`` then run whatever their schedule. From host values
        alone."""
        settings = tuple(row.get(k) for k in WATCHED_SETTINGS)
        changed = self._settings is not None and any(
            _jumped(before, now) for before, now in zip(self._settings, settings, strict=True))
        self._settings = settings
        norm = check.grad_norm
        if not math.isfinite(norm):
            return True
        jumped = self._grad_level is not None and norm > GRAD_JUMP * self._grad_level
        self._grad_level = norm if self._grad_level is None else \
            (1 - GRAD_LEVEL_ALPHA) * self._grad_level + GRAD_LEVEL_ALPHA * norm
        return bool(check.nonfinite) or changed or jumped

    def _grad_norms(self) -> torch.Tensor | None:
        """(P,) L2 norm of each parameter's gradient (0 where it has none), on the device, in
        one list-wide operation; None when no parameter has a gradient."""
        grads = [p.grad for _, p in self._params]
        present = [g.detach() for g in grads if g is not None]
        if not present:
            return None
        norms = torch.stack(torch._foreach_norm(present))
        if len(present) == len(grads):
            return norms
        full = torch.zeros(len(grads), device=norms.device, dtype=norms.dtype)
        full[[i for i, g in enumerate(grads) if g is not None]] = norms
        return full

    def _read(self, values: dict[str, Any]) -> dict[str, float]:
        """Read ``values`` from the device together with the probe values of the step before
        (held back by :meth:`after_step`), in one transfer per device: one synchronisation
        per step on a GPU. Completes and writes that previous row."""
        unread, self._unread = self._unread, None
        if unread is None:
            return to_floats(values)
        row, held = unread
        now, before = read_floats([values, held])
        row.update(before)
        self.writer.log_step(row)
        return now

    def _nonfinite_origin(self, norms: torch.Tensor | None) -> list[str]:
        """Where non-finite values started: parameters that are themselves non-finite
        (``weight:NAME``, a corrupted weight), else the layer whose gradient the backward pass
        reached first among those that went non-finite (``grad:NAME``, the one latest in the
        forward pass). Scans the parameters, so it runs only on steps that went wrong."""
        out = []
        with torch.no_grad():
            bad_weights = [n for n, p in self._params if not bool(torch.isfinite(p).all())]
        out += [f"weight:{n}" for n in bad_weights[:3]]
        if norms is not None:
            values = norms.tolist()
            bad = [n for (n, _), v in zip(self._params, values, strict=True)
                   if not math.isfinite(v)]
            if bad:
                origin = max(bad, key=lambda n: self._rank.get(n, -1))
                out.append(f"grad:{origin}")
        return out

    def _snapshot(self) -> list[torch.Tensor]:
        """Copy the parameters into buffers kept for the run (no allocation per step)."""
        if self._before is None:
            self._before = [torch.empty(p.numel(), device=p.device, dtype=p.dtype)
                            for _, p in self._params]
        torch._foreach_copy_(self._before, [p.detach().reshape(-1) for _, p in self._params])
        return self._before

    def after_step(self, step: int, *, skipped: bool = False, evaluate: bool = True) -> None:
        """Call after ``optimizer.step()`` (or instead of it, with ``skipped=True``).

        Evaluates when one is due, unless ``evaluate`` is False (a loop that is about to stop).
        The step's probe values stay on the device until the next step's read (or the next
        evaluation, checkpoint or :meth:`close`), so they cost no synchronisation of their own.
        """
        if self._pending is None or self._pending[1]["step"] != step:
            raise UserError(f"after_step({step}) without after_backward({step}) before it")
        ctx, row, values = self._pending
        self._pending = None
        if skipped:
            self.writer.event("skipped_step", step)
        else:
            for probe in self._due(step, after_step=True):
                values.update(self._run(probe, ctx, step))
        self.last_step_row = row
        self._unread = (row, _held(values))
        if evaluate and (step + 1) % self.eval_every == 0:
            self.evaluate(step + 1)

    def flush(self) -> None:
        """Read the last step's held-back probe values and write its row (done by itself at
        every evaluation, checkpoint and at :meth:`close`)."""
        self._read({})

    # -- evaluation ---------------------------------------------------------------------------

    def _encode_set(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        xs, recons, mus, logvars = [], [], [], []
        lo, hi = self.value_range
        for start in range(0, len(self._set_x), _SET_CHUNK):
            x = self._set_x[start:start + _SET_CHUNK].to(self.device)
            mu, logvar = self.encode(x)
            xs.append(self._to_unit(x).cpu())
            recons.append(self._to_unit(self.decode(mu).clamp(lo, hi)).cpu())
            mus.append(mu.cpu())
            logvars.append(logvar.cpu())
        return torch.cat(xs), torch.cat(recons), torch.cat(mus), torch.cat(logvars)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, Any]:
        """Evaluate the model as it is now (after ``step`` updates): grid PNG and eval row."""
        self.flush()
        was_training = self.model.training
        self.model.eval()
        try:
            x = self._eval_x
            mu, logvar = self.encode(x)
            z = mu if self.recon_mode == "mean" else mu + self.recon_noise * torch.exp(0.5 * logvar)
            recon_img = self.decode(z)
            zero_img = self.decode(torch.zeros_like(self.fixed_z[:1]))
            fixed_img = self.decode(self.fixed_z)
            per_image = self.eval_loss(x, z, mu, logvar) if self.eval_loss else None
            recon_img, zero_img, fixed_img = (self._decoded(t, step)
                                              for t in (recon_img, zero_img, fixed_img))
            x = self._to_unit(x)
            ctx = EvalContext(step, x, recon_img, zero_img, fixed_img, mu, logvar,
                              self._factors or None, self.lpips,
                              self._encode_set if self._set_x is not None else None)
            values: dict[str, Any] = {}
            for probe in [p for p in self.probes if p.on_eval]:
                values.update(self._run(probe, ctx, step))
        finally:
            self.model.train(was_training)

        row: dict[str, Any] = {"step": int(step), "time": self.elapsed()}
        if self.steps_per_epoch:
            row["epoch"] = step / self.steps_per_epoch
        if per_image is not None:
            recon_each, kl_each = per_image[0].float().cpu(), per_image[1].float().cpu()
            values["eval_recon"] = recon_each.mean()
            values["eval_kl"] = kl_each.mean()
            values.update(probe_library.per_index("img", "recon", recon_each))
            values.update(probe_library.per_index("img", "kl", kl_each))
        recon_sum, kl_sum, count = self._sums
        if count:
            row["train_recon_avg"] = recon_sum / count
            row["train_kl_avg"] = kl_sum / count
            row["train_avg_steps"] = int(count)
        self._sums[:] = 0
        row.update(to_floats(values))

        tiles = torch.stack([x, recon_img, zero_img.expand(GRID_IMAGES, -1, -1, -1),
                             fixed_img]).clamp(0, 1)
        tiles = (tiles * 255).round().to(torch.uint8).cpu().numpy()
        png = grid.to_png(grid.render(tiles, self._header(row), self._row_labels(),
                                      self._captions(row)))
        self.writer.save_grid(step, png)
        self.writer.log_eval(row)
        self.last_eval_row = row
        self._evaluated = True
        return row

    def _decoded(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """Decoder output mapped onto [0, 1]; values outside ``value_range`` are clamped, and
        said once."""
        lo, hi = self.value_range
        tolerance = 1e-3 * (hi - lo)
        outside = (images < lo - tolerance) | (images > hi + tolerance)
        if bool(outside.any()):
            share = float(outside.float().mean())
            self._warn("decoder_range", step, f"the decoder's output leaves value_range "
                       f"[{lo:g}, {hi:g}] (values in [{float(images.min()):.3g}, "
                       f"{float(images.max()):.3g}], {share:.1%} of pixels at step {step}); "
                       f"they are clamped for the grid and the metrics: pass "
                       f"value_range=(-1, 1) for a tanh decoder", share=share)
        return self._to_unit(images.clamp(lo, hi))

    def _header(self, row: dict[str, Any]) -> list[str]:
        where = f"step {row['step']:,}"
        if "epoch" in row:
            where = f"epoch {row['epoch']:.2f}  ·  " + where
        lines = [where]
        if "eval_recon" in row:
            lines.append(f"these 8 images, model as shown: recon {_fmt(row['eval_recon'])}  ·  "
                         f"KL {_fmt(row['eval_kl'])}")
        else:
            lines.append("these 8 images: no eval loss function given")
        if "train_recon_avg" in row:
            lines.append(f"training average of the last {row['train_avg_steps']:,} steps: "
                         f"recon {_fmt(row['train_recon_avg'])}  ·  KL "
                         f"{_fmt(row['train_kl_avg'])}")
        else:
            lines.append("training average: no steps yet")
        return lines

    def _row_labels(self) -> list[str]:
        second = "posterior mean" if self.recon_mode == "mean" else "sample of q(z|x)"
        return ["validation\n8 fixed images", f"reconstruction\n{second}",
                "decode(z=0)\nthe average face", "decode(fixed z)\n8 fixed z~N(0,I)"]

    @staticmethod
    def _captions(row: dict[str, Any]) -> list[list[str]]:
        """Under each reconstruction: its own loss, SSIM and LPIPS (or 'n/a')."""
        captions = []
        for i in range(GRID_IMAGES):
            lines = []
            for stat, label, digits in (("recon", "rec", None), ("ssim", "SSIM", 3),
                                        ("lpips", "LPIPS", 3)):
                value = row.get(f"img.{stat}/{i}")
                if value is None:
                    lines.append(f"{label} n/a")
                elif digits is None:
                    lines.append(f"{label} {_fmt(value)}")
                else:
                    lines.append(f"{label} {value:.{digits}f}")
            captions.append(lines)
        return captions

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs so a resumed run continues averages, clock and probes."""
        self.flush()
        return {"sums": self._sums.tolist(), "elapsed": self.elapsed(),
                "grad_level": self._grad_level, "settings": list(self._settings or []),
                "probes": {p.name: p.state_dict() for p in self.probes}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sums = np.asarray(state["sums"], dtype=np.float64)
        self._elapsed_before = float(state["elapsed"])
        self._t0 = time.monotonic()
        self._grad_level = state.get("grad_level")
        self._settings = tuple(state["settings"]) if state.get("settings") else None
        for probe in self.probes:
            if probe.name in state.get("probes", {}):
                probe.load_state_dict(state["probes"][probe.name])

    def close(self, status: str = "finished", step: int | None = None, message: str = "") -> None:
        """Flush everything and mark the run's status; the run directory is complete.

        A finished run whose last grid is older than its last step gets a final evaluation, so
        the last grid always shows the final model.
        """
        self.flush()
        last = step if step is not None else int(self.last_step_row.get("step", -1)) + 1
        if status == "finished" and last > 0 and self.last_eval_row.get("step") != last:
            self.evaluate(last)
        self.writer.close(status, max(last, 0), message)
