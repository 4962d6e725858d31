"""vaediag for PyTorch Lightning (2.x): one callback, the LightningModule unchanged.

    from vaediag.integrations.lightning import VaediagCallback

    trainer = Trainer(callbacks=[VaediagCallback("runs/mine", eval_images=val_batch[:8])])

It works with either package, ``lightning`` (``lightning.pytorch``) or ``pytorch_lightning``
(the callback subclasses the ``Callback`` of the one installed, ``lightning`` first).

The module logs its loss terms as it already does (``self.log("recon", ...)``,
``self.log("kl", ...)``; other names with ``recon_key=`` and ``kl_key=``; the KL weight with
``beta_key=``, else the module's ``beta`` attribute when it is a number; the total loss with
``total_key=``). The callback reads each value as the module logs it, on its own rank, before
Lightning reduces it over ranks (``sync_dist=True`` would make every rank's value the mean:
no spread between ranks, no rank named for a NaN), and feeds the same
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

try:
    import lightning.pytorch as pl
except ImportError:  # only the older package installed
    import pytorch_lightning as pl  # type: ignore[no-redef]

import torch

from vaediag.errors import UserError

if TYPE_CHECKING:
    from vaediag.monitor import Monitor


class VaediagCallback(pl.Callback):
    """Records a Lightning run into a vaediag run directory (see the module's docstring)."""

    def __init__(self, run_dir: str | Path, *, eval_images: Any, recon_key: str = "recon",
                 kl_key: str = "kl", beta_key: str | None = None, total_key: str | None = None,
                 beta_attr: str = "beta", latents_attr: str = "vaediag_latents",
                 **monitor_args: Any):
        super().__init__()
        self.run_dir = run_dir
        self.eval_images = eval_images
        self.recon_key, self.kl_key, self.beta_key = recon_key, kl_key, beta_key
        self.total_key, self.beta_attr = total_key, beta_attr
        self.latents_attr = latents_attr
        self.monitor_args = monitor_args
        self.monitor: Monitor | None = None
        self._step: int | None = None
        #: this step's values as the module logged them, on this rank (see :meth:`_capture`)
        self._logged: dict[str, Any] = {}
        self._wrapped: Any = None

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
        # float16 ("16-mixed"): the precision plugin's GradScaler (bfloat16 has none)
        args.setdefault("scaler", getattr(trainer.precision_plugin, "scaler", None))
        args.setdefault("config", {"lightning": {"max_steps": trainer.max_steps,
                                                 "world_size": trainer.world_size}})
        self.monitor = Monitor(self.run_dir, pl_module, optimizer,
                               eval_images=self.eval_images, **args)
        self._capture(pl_module)

    def _capture(self, pl_module: pl.LightningModule) -> None:
        """See what the module logs, as it logs it: ``self.log`` (which ``log_dict`` calls)
        is wrapped on this module instance for the fit, and undone at its end."""
        keys = {k for k in (self.recon_key, self.kl_key, self.beta_key, self.total_key) if k}
        log = pl_module.log
        logged = self._logged

        def seen(name: str, value: Any, *args: Any, **kwargs: Any) -> Any:
            if name in keys:
                logged[name] = value.detach() if hasattr(value, "detach") else value
            return log(name, value, *args, **kwargs)

        pl_module.log = seen  # type: ignore[method-assign]
        self._wrapped = pl_module

    def _release(self) -> None:
        if self._wrapped is not None and "log" in vars(self._wrapped):
            del self._wrapped.log
        self._wrapped = None

    def _metric(self, trainer: pl.Trainer, key: str) -> Any:
        if key in self._logged:
            return self._logged[key]
        metrics = trainer.callback_metrics
        for name in (key, f"{key}_step"):
            if name in metrics:
                return metrics[name]
        which = {self.recon_key: "recon", self.kl_key: "kl", self.beta_key: "beta",
                 self.total_key: "total"}.get(key, key)
        raise UserError(f"VaediagCallback: the module logged no '{key}' this step "
                        f"(self.log('{key}', ...) in training_step, or pass {which}_key=); "
                        f"logged: {', '.join(sorted(metrics)) or 'nothing'}")

    def _beta(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        """The KL weight: logged under ``beta_key``, else the module's ``beta`` attribute."""
        if self.beta_key:
            value = self._metric(trainer, self.beta_key)
        else:
            value = getattr(pl_module, self.beta_attr, None)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.detach()
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                return None
        return None if value is None else float(value)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is None:
            return
        self._step = trainer.global_step
        latents = getattr(pl_module, self.latents_attr, None)
        mu, logvar = latents if isinstance(latents, (tuple, list)) else (None, None)
        self.monitor.after_backward(
            self._step, recon=self._metric(trainer, self.recon_key),
            kl=self._metric(trainer, self.kl_key),
            total=self._metric(trainer, self.total_key) if self.total_key else None,
            beta=self._beta(trainer, pl_module), mu=mu, logvar=logvar)
        self._logged.clear()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.monitor is not None and self._step is not None:
            step, self._step = self._step, None
            self.monitor.after_step(step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()
        if self.monitor is not None:
            self.monitor.close("finished", trainer.global_step)
            self.monitor = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._release()
        if self.monitor is not None:
            status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
            self.monitor.close(status, trainer.global_step,
                               f"{type(exception).__name__}: {exception}")
            self.monitor = None
