"""vaediag for PyTorch Lightning (2.x): one callback, the LightningModule unchanged.

    from vaediag.integrations.lightning import VaediagCallback

    trainer = Trainer(callbacks=[VaediagCallback("runs/mine", eval_images=val_batch[:8])])

The module logs its loss terms as it already does (``self.log("recon", ...)``,
``self.log("kl", ...)``; other names with ``recon_key=`` and ``kl_key=``); the callback reads
them from ``trainer.callback_metrics`` after each backward pass and feeds the same
:class:`vaediag.Monitor` that ``vaediag train`` uses, with the module's parameters and the
trainer's optimizer. The grid needs ``encode(x) -> (mu, logvar)`` and ``decode(z) -> image``:
found on the module or on its ``model`` attribute, or passed as ``encode=`` and ``decode=``.
The latent statistics need the batch's posterior: set ``self.vaediag_latents = (mu, logvar)``
in ``training_step`` (the attribute is named by ``latents_attr``). Under
``strategy="ddp"`` every rank runs the callback and rank 0 records (as the Monitor does under
torch.distributed). Every other keyword argument goes to the Monitor (``eval_every``,
``eval_loss``, ``train_images``, ``probes``, ``stop_on``, ``overwrite``, ...).

The step is ``trainer.global_step`` (optimizer updates so far). Gradient accumulation is not
supported: the Monitor expects one backward pass per optimizer step.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl

from vaediag.errors import UserError

if TYPE_CHECKING:
    from vaediag.monitor import Monitor


class VaediagCallback(pl.Callback):
    """Records a Lightning run into a vaediag run directory (see the module's docstring)."""

    def __init__(self, run_dir: str | Path, *, eval_images: Any, recon_key: str = "recon",
                 kl_key: str = "kl", beta_key: str | None = None,
                 latents_attr: str = "vaediag_latents", **monitor_args: Any):
        super().__init__()
        self.run_dir = run_dir
        self.eval_images = eval_images
        self.recon_key, self.kl_key, self.beta_key = recon_key, kl_key, beta_key
        self.latents_attr = latents_attr
        self.monitor_args = monitor_args
        self.monitor: Monitor | None = None
        self._step: int | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from vaediag.monitor import Monitor

        if trainer.accumulate_grad_batches != 1:
            raise UserError("VaediagCallback: accumulate_grad_batches must be 1 (the Monitor "
                            "expects one backward pass per optimizer step)")
        inner = getattr(pl_module, "model", None)
        args = dict(self.monitor_args)
        for name in ("encode", "decode"):
            if name not in args:
                found = getattr(pl_module, name, None) or getattr(inner, name, None)
                if found is None:
                    raise UserError(f"VaediagCallback: the module has no {name}() (nor its "
                                    f"'model' attribute): pass {name}= to the callback")
                args[name] = found
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        args.setdefault("config", {"lightning": {"max_steps": trainer.max_steps,
                                                 "world_size": trainer.world_size}})
        self.monitor = Monitor(self.run_dir, pl_module, optimizer,
                               eval_images=self.eval_images, **args)

    def _metric(self, trainer: pl.Trainer, key: str) -> Any:
        metrics = trainer.callback_metrics
        for name in (key, f"{key}_step"):
            if name in metrics:
                return metrics[name]
        raise UserError(f"VaediagCallback: the module logged no '{key}' this step "
                        f"(self.log('{key}', ...) in training_step, or pass "
                        f"{'recon' if key == self.recon_key else 'kl'}_key=); logged: "
                        f"{', '.join(sorted(metrics)) or 'nothing'}")

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is None:
            return
        self._step = trainer.global_step
        latents = getattr(pl_module, self.latents_attr, None)
        mu, logvar = latents if isinstance(latents, (tuple, list)) else (None, None)
        beta = self._metric(trainer, self.beta_key) if self.beta_key else None
        self.monitor.after_backward(
            self._step, recon=self._metric(trainer, self.recon_key),
            kl=self._metric(trainer, self.kl_key),
            beta=None if beta is None else float(beta), mu=mu, logvar=logvar)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.monitor is not None and self._step is not None:
            step, self._step = self._step, None
            self.monitor.after_step(step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.close("finished", trainer.global_step)
            self.monitor = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if self.monitor is not None:
            status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
            self.monitor.close(status, trainer.global_step,
                               f"{type(exception).__name__}: {exception}")
            self.monitor = None
