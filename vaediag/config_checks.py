"""The range and cross-field checks of a run's configuration that its types alone cannot
express (:func:`validate`, run by :func:`vaediag.config.from_dict` on every config built)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vaediag.errors import ConfigError

if TYPE_CHECKING:
    from vaediag.config import Config


def validate(c: Config) -> None:
    """Range and cross-field checks that types alone cannot express."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"config: {message}")

    need(8 <= c.data.resolution <= 512, f"data.resolution must be within 8..512, got "
         f"{c.data.resolution}")
    need(len(c.model.channels) >= 1 and all(w >= 1 for w in c.model.channels),
         "model.channels must list at least one positive width")
    factor = 2 ** len(c.model.channels)
    need(c.data.resolution % factor == 0 and c.data.resolution // factor >= 1,
         f"data.resolution ({c.data.resolution}) must be divisible by 2**len(model.channels) "
         f"= {factor}")
    need(c.data.toyfaces_size >= 1, "data.toyfaces_size must be at least 1")
    need(c.data.max_images >= 0, "data.max_images must be >= 0 (0 = all)")
    need(c.data.val_size >= 8, f"data.val_size must be at least 8 (the grid shows 8 validation "
         f"images), got {c.data.val_size}")
    need(c.model.latent_dim >= 1, "model.latent_dim must be at least 1")
    if c.model.norm == "group":
        g = c.model.group_norm_groups
        need(g >= 1 and all(w % g == 0 for w in c.model.channels),
             f"model.group_norm_groups ({g}) must divide every width in model.channels")
    need(c.loss.decoder_scale > 0, "loss.decoder_scale must be > 0")
    need(c.loss.beta >= 0, "loss.beta must be >= 0")
    need(c.loss.beta_schedule != "warmup" or c.loss.beta_warmup_steps >= 1,
         "loss.beta_warmup_steps must be >= 1 with beta_schedule = 'warmup'")
    need(c.loss.beta_cycle_steps >= 1, "loss.beta_cycle_steps must be >= 1")
    need(0 < c.loss.beta_cycle_ratio <= 1, "loss.beta_cycle_ratio must be in (0, 1]")
    need(c.loss.free_bits >= 0, "loss.free_bits must be >= 0")
    need(len(c.loss.logvar_clamp) in (0, 2) and (not c.loss.logvar_clamp
                                                or c.loss.logvar_clamp[0] < c.loss.logvar_clamp[1]),
         f"loss.logvar_clamp must be [] or [min, max] with min < max, got "
         f"{list(c.loss.logvar_clamp)}")
    need(c.optim.lr > 0, f"optim.lr must be > 0, got {c.optim.lr}")
    need(len(c.optim.betas) == 2 and all(0 <= b < 1 for b in c.optim.betas),
         f"optim.betas must be [beta1, beta2] within [0, 1), got {list(c.optim.betas)}")
    need(c.optim.eps > 0, f"optim.eps must be > 0, got {c.optim.eps}")
    need(c.optim.weight_decay >= 0, "optim.weight_decay must be >= 0")
    need(c.optim.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 = off)")
    need(c.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    need(0 <= c.optim.min_lr_ratio <= 1, "optim.min_lr_ratio must be within [0, 1]")
    need(c.optim.step_every >= 1, "optim.step_every must be >= 1")
    need(c.optim.step_gamma > 0, "optim.step_gamma must be > 0")
    need(c.train.steps >= 0 and c.train.epochs >= 0, "train.steps and train.epochs must be >= 0")
    need(c.train.steps > 0 or c.train.epochs > 0, "set train.steps or train.epochs to train")
    need(c.train.batch_size >= 1, "train.batch_size must be at least 1")
    need(c.train.device == "auto" or c.train.device in ("cpu", "mps", "cuda")
         or (c.train.device.startswith("cuda:") and c.train.device[5:].isdigit()),
         f"train.device must be auto, cpu, cuda, cuda:N or mps, got {c.train.device!r}")
    need(c.train.checkpoint_every >= 0, "train.checkpoint_every must be >= 0")
    need(c.train.keep_checkpoints >= 0, "train.keep_checkpoints must be >= 0 (0 = all)")
    need(0 <= c.optim.momentum < 1, "optim.momentum must be within [0, 1)")
    need(c.eval.every_steps >= 0, "eval.every_steps must be >= 0")
    from vaediag.inject import parse_all

    parse_all(c.train.inject)  # raises ConfigError on a bad fault
    need(c.probes.split_every >= 1, "probes.split_every must be >= 1")
    need(c.probes.layer_every >= 1, "probes.layer_every must be >= 1")
    need(c.probes.optimizer_every >= 1, "probes.optimizer_every must be >= 1")
    need(c.probes.metric_images >= 0, "probes.metric_images must be >= 0")
    need(all(":" in spec for spec in c.probes.extra),
         "probes.extra entries must be FILE.py:ClassName")
    need(c.log.flush_steps >= 1, "log.flush_steps must be >= 1")
    need(c.log.flush_seconds > 0, "log.flush_seconds must be > 0")
