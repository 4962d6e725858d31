"""The Monitor: records a VAE's training into a run directory, one instrumented code path.

The built-in trainer and a user's own loop call the same three methods::

    mon = Monitor("runs/mine", model, optimizer, eval_images=val_batch,
                  encode=model.encode, decode=model.decode)
    for step, x in enumerate(loader):
        ...forward pass, loss = recon + beta * kl...
        optimizer.zero_grad(); loss.backward()
        mon.after_backward(step, recon=recon, kl=kl)
        optimizer.step()
        mon.after_step(step)
    mon.close()

``step`` counts optimizer updates made before this batch (0-based). A per-step row with step s
describes the model after s updates; an evaluation at step S shows the model after S updates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vaediag import grid
from vaediag.errors import UserError
from vaediag.rundir import RunWriter, load_run

EncodeFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
DecodeFn = Callable[[torch.Tensor], torch.Tensor]
#: (x, z, mu, logvar) -> (per-image reconstruction loss, per-image KL), each of shape (B,)
EvalLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                      tuple[torch.Tensor, torch.Tensor]]

GRID_IMAGES = grid.COLS


@dataclass
class StepCheck:
    """What :meth:`Monitor.after_backward` saw: the trainer applies its non-finite policy to it."""

    grad_norm: float
    nonfinite: list[str] = field(default_factory=list)  # e.g. ["kl", "grad:decoder.fc.weight"]


def _as_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach())
    return float(value)


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 100:
        return f"{value:,.1f}"
    return f"{value:.3g}" if abs(value) < 0.01 and value != 0 else f"{value:.3f}"


class Monitor:
    """Record per-step losses and gradient health, and evaluate the 4x8 grid at a cadence.

    Parameters
    ----------
    run_dir
        A path for a new run directory, or an open :class:`~vaediag.rundir.RunWriter`.
    model, optimizer
        The model (for parameter names and gradients) and its optimizer (for the learning rate).
    eval_images
        The fixed validation batch shown on the grid: at least 8 images, (N, 3, H, W) in [0, 1]
        (uint8 0..255 is accepted too); the first 8 are used.
    encode, decode
        ``encode(x) -> (mu, logvar)`` and ``decode(z) -> image in [0, 1]``.
    eval_loss
        Optional ``(x, z, mu, logvar) -> (recon per image, kl per image)``: without it the
        grid shows no losses of its own images.
    eval_every
        Steps between evaluations (the grid, eval losses).
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
        eval_every: int = 500,
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
        self._eval_x = self._check_eval_images(eval_images)

        if isinstance(run_dir, RunWriter):
            self.writer = run_dir
        else:
            import tomli_w

            from vaediag import environment
            toml = tomli_w.dumps(config or {})
            self.writer = RunWriter.create(run_dir, config_toml=toml,
                                           environment=environment.collect(self.device, seed),
                                           overwrite=overwrite)
        if resume:
            fixed = load_run(self.writer.path).fixed
            self.fixed_z = torch.from_numpy(fixed["fixed_z"]).to(self.device)
            self.recon_noise = torch.from_numpy(fixed["recon_noise"]).to(self.device)
        else:
            with torch.no_grad():
                latent = self.encode(self._eval_x[:1])[0].shape[1]
            g = torch.Generator().manual_seed(seed + 20_231)
            self.fixed_z = torch.randn(GRID_IMAGES, latent, generator=g).to(self.device)
            self.recon_noise = torch.randn(GRID_IMAGES, latent, generator=g).to(self.device)
            factors = {f"factor_{k}": np.asarray(v)[:GRID_IMAGES]
                       for k, v in (eval_factors or {}).items()}
            self.writer.save_fixed(
                eval_images=(self._eval_x.cpu().numpy() * 255).round().astype(np.uint8),
                fixed_z=self.fixed_z.cpu().numpy(), recon_noise=self.recon_noise.cpu().numpy(),
                **factors,
            )
        self._row: dict[str, Any] | None = None
        self._sums = np.zeros(3)  # recon, kl, count since the last evaluation
        self._elapsed_before = 0.0
        self._t0 = time.monotonic()
        self.last_step_row: dict[str, Any] = {}
        self.last_eval_row: dict[str, Any] = {}
        self._evaluated = resume  # a resumed run has its evaluation at the checkpoint's step

    # -- inputs -------------------------------------------------------------------------------

    def _check_eval_images(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(images)
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[0] < GRID_IMAGES:
            raise UserError(f"eval_images must be a batch of at least {GRID_IMAGES} RGB images "
                            f"shaped (N, 3, H, W), got {tuple(x.shape)}")
        x = x[:GRID_IMAGES]
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = x.float()
        if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise UserError("eval_images must lie in [0, 1] (or be uint8 0..255)")
        return x.to(self.device)

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
    ) -> StepCheck:
        """Call after ``loss.backward()`` and before ``optimizer.step()``."""
        if step == 0 and not self._evaluated:
            self.evaluate(0)
        grads = [p.grad for _, p in self._params if p.grad is not None]
        values = [recon, kl] + ([total] if total is not None else [])
        tensors = [v.detach().float().reshape(()) if isinstance(v, torch.Tensor)
                   else torch.tensor(float(v)) for v in values]
        if grads:
            norms = torch.stack([g.detach().norm() for g in grads])
            tensors.append(norms.norm().to(tensors[0].device))
        scalars = torch.stack([t.to(self.device) for t in tensors]).tolist()  # one sync per step
        recon_f, kl_f = scalars[0], scalars[1]
        row: dict[str, Any] = {"step": int(step), "time": self.elapsed(),
                               "recon": recon_f, "kl": kl_f}
        if epoch is not None:
            row["epoch"] = epoch
        if total is not None:
            row["total"] = scalars[2]
        if beta is not None:
            row["beta"] = float(beta)
        if self.optimizer is not None:
            row["lr"] = float(self.optimizer.param_groups[0]["lr"])
        grad_norm = scalars[-1] if grads else float("nan")
        if grads:
            row["grad_norm"] = grad_norm
        check = StepCheck(grad_norm=grad_norm)
        for name, value in (("recon", recon_f), ("kl", kl_f), ("total", row.get("total", 0.0))):
            if not math.isfinite(value):
                check.nonfinite.append(name)
        if grads and not math.isfinite(grad_norm):
            first = self._first_nonfinite_grad()
            check.nonfinite.append(f"grad:{first}" if first else "grad")
        for term in check.nonfinite:
            self.writer.event("nonfinite", step, term=term, recon=recon_f, kl=kl_f,
                              grad_norm=grad_norm)
        if math.isfinite(recon_f) and math.isfinite(kl_f):
            self._sums += (recon_f, kl_f, 1)
        self._row = row
        return check

    def _first_nonfinite_grad(self) -> str | None:
        for name, p in self._params:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return name
        return None

    def after_step(self, step: int, *, skipped: bool = False, evaluate: bool = True) -> None:
        """Call after ``optimizer.step()`` (or instead of it, with ``skipped=True``).

        Evaluates when one is due, unless ``evaluate`` is False (a loop that is about to stop).
        """
        if self._row is None or self._row["step"] != step:
            raise UserError(f"after_step({step}) without after_backward({step}) before it")
        row, self._row = self._row, None
        if skipped:
            self.writer.event("skipped_step", step)
        self.writer.log_step(row)
        self.last_step_row = row
        if evaluate and (step + 1) % self.eval_every == 0:
            self.evaluate(step + 1)

    # -- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, Any]:
        """Evaluate the model as it is now (after ``step`` updates): grid PNG and eval row."""
        was_training = self.model.training
        self.model.eval()
        try:
            x = self._eval_x
            mu, logvar = self.encode(x)
            z = mu if self.recon_mode == "mean" else mu + self.recon_noise * torch.exp(0.5 * logvar)
            recon_img = self.decode(z)
            zero_img = self.decode(torch.zeros_like(self.fixed_z[:1])).expand(GRID_IMAGES, -1, -1,
                                                                             -1)
            fixed_img = self.decode(self.fixed_z)
            per_image = self.eval_loss(x, z, mu, logvar) if self.eval_loss else None
        finally:
            self.model.train(was_training)

        row: dict[str, Any] = {"step": int(step), "time": self.elapsed()}
        if self.steps_per_epoch:
            row["epoch"] = step / self.steps_per_epoch
        recon_each = kl_each = None
        if per_image is not None:
            recon_each = per_image[0].float().cpu().numpy()
            kl_each = per_image[1].float().cpu().numpy()
            row["eval_recon"] = float(recon_each.mean())
            row["eval_kl"] = float(kl_each.mean())
            for i in range(GRID_IMAGES):
                row[f"eval_recon_{i}"] = float(recon_each[i])
                row[f"eval_kl_{i}"] = float(kl_each[i])
        recon_sum, kl_sum, count = self._sums
        if count:
            row["train_recon_avg"] = recon_sum / count
            row["train_kl_avg"] = kl_sum / count
            row["train_avg_steps"] = int(count)
        self._sums[:] = 0

        tiles = torch.stack([x, recon_img, zero_img, fixed_img]).clamp(0, 1)
        tiles = (tiles * 255).round().to(torch.uint8).cpu().numpy()
        png = grid.to_png(grid.render(tiles, self._header(row),
                                      self._row_labels(), self._captions(recon_each, kl_each)))
        self.writer.save_grid(step, png)
        self.writer.log_eval(row)
        self.last_eval_row = row
        self._evaluated = True
        return row

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
    def _captions(recon: np.ndarray | None, kl: np.ndarray | None) -> list[list[str]] | None:
        if recon is None or kl is None:
            return None
        return [[f"rec {_fmt(float(r))}", f"KL {_fmt(float(k))}"]
                for r, k in zip(recon, kl, strict=True)]

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs so a resumed run continues the averages and the clock."""
        return {"sums": self._sums.tolist(), "elapsed": self.elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sums = np.asarray(state["sums"], dtype=np.float64)
        self._elapsed_before = float(state["elapsed"])
        self._t0 = time.monotonic()

    def close(self, status: str = "finished", step: int | None = None, message: str = "") -> None:
        """Flush everything and mark the run's status; the run directory is complete."""
        last = step if step is not None else int(self.last_step_row.get("step", -1)) + 1
        self.writer.close(status, max(last, 0), message)

