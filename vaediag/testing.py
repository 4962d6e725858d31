"""Synthetic run directories, for tests and benchmarks of the analysis.

They have the columns the ``standard`` probe preset records (losses, gradient norms, Adam's
state and update ratios per layer, per-dimension KL, evaluation metrics), with steady,
noisy values around typical levels; a test plants the event it needs (a spike, a level shift,
NaN) in the arrays before writing them. No torch needed.

    >>> cols = standard_scalars(2_000, seed=0)
    >>> cols["kl"][1_500:] *= 8                        # a KL explosion at step 1,500
    >>> write_run(tmp / "run", cols, standard_evals(cols["step"][::100], seed=0))
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from vaediag.columns import (
    ACTIVE_UNITS,
    ADAM_EFF_LR,
    ADAM_EPS_FRAC,
    ADAM_RMS_T,
    ADAM_SIGN_FRAC,
    ADAM_UPDATE_RMS,
    BETA,
    DRIFT_FIXED_RMSE,
    DRIFT_ZERO_RMSE,
    EPOCH,
    EVAL_KL,
    EVAL_RECON,
    GRAD_NONFINITE,
    GRAD_NORM,
    KL,
    LOGVAR_MAX,
    LOGVAR_MEAN,
    LOGVAR_MIN,
    LR,
    MU_MAX,
    MU_MEAN,
    MU_MIN,
    RECON,
    STEP,
    TIME,
    TOTAL,
    TRAIN_EVAL_KL,
    TRAIN_EVAL_RECON,
    TRAIN_KL_AVG,
    TRAIN_RECON_AVG,
    UPDATE_RATIO,
)
from vaediag.config import build_config
from vaediag.rundir import RunWriter

LAYERS = ("encoder.blocks.0.conv", "encoder.blocks.1.conv", "encoder.blocks.2.conv",
          "encoder.fc", "decoder.fc", "decoder.blocks.0.conv", "decoder.blocks.1.conv",
          "decoder.out")
PARTS = ("encoder", "decoder")
QUALITY = {  # metric: (level, noise) at every evaluation
    "ssim": (0.55, 0.005), "psnr": (20.0, 0.1), "gmsd": (0.15, 0.002),
    "haarpsi": (0.55, 0.005), "colour_de": (14.0, 0.2), "sat_ratio": (0.7, 0.01),
    "orient_err": (5.0, 0.2), "centroid_err": (0.5, 0.02),
}


def standard_scalars(n: int, *, seed: int = 0, layers: Iterable[str] = LAYERS,
                     latent_dim: int = 16, split_every: int = 100, v_every: int = 10,
                     optimizer_every: int = 1, first_step: int = 0) -> dict[str, np.ndarray]:
    """Per-step columns of a calm run of ``n`` steps (float32 noise around steady levels).

    Adam's state and the update ratios are recorded every ``optimizer_every`` steps (the
    ``standard`` preset: 4; 1 gives every step, for tests that plant events in them)."""
    rng = np.random.default_rng(seed)
    step = np.arange(first_step, first_step + n, dtype=np.int64)

    def around(level: float, rel: float) -> np.ndarray:
        return (level * np.exp(rel * rng.standard_normal(n))).astype(np.float32)

    recon = around(1900.0, 0.02)
    kl = around(18.0, 0.05)
    cols: dict[str, np.ndarray] = {
        STEP: step, TIME: step * 0.13, EPOCH: step // 128, RECON: recon, KL: kl,
        TOTAL: recon + kl, BETA: np.ones(n, np.float32),
        LR: np.full(n, 1e-3, np.float32), GRAD_NORM: around(100.0, 0.25),
        GRAD_NONFINITE: np.zeros(n, np.float32),
        MU_MIN: around(3.0, 0.05) * -1, MU_MAX: around(3.0, 0.05),
        MU_MEAN: (0.01 * rng.standard_normal(n)).astype(np.float32),
        LOGVAR_MIN: -around(6.0, 0.05), LOGVAR_MAX: around(0.5, 0.1) - 0.5,
        LOGVAR_MEAN: -around(3.0, 0.03),
    }
    for d in range(latent_dim):
        cols[f"dim.kl/{d}"] = around(18.0 / latent_dim, 0.05)
    split = np.full(n, np.nan, np.float32)
    split[::split_every] = 1.0
    for name in ("split_recon_norm", "split_kl_norm", "split_cos"):
        level = {"split_recon_norm": 100.0, "split_kl_norm": 5.0, "split_cos": 0.1}[name]
        cols[name] = split * around(level, 0.1)
        for part in PARTS:
            cols[f"part.{name}/{part}"] = split * around(level, 0.1)
    for i, layer in enumerate(layers):
        scale = 10.0 * (i + 1)
        cols[f"layer.grad_norm/{layer}"] = around(scale, 0.25)
        cols[f"layer.adam_update_rms/{layer}"] = around(0.22, 0.08)
        cols[f"layer.adam_eps_frac/{layer}"] = np.zeros(n, np.float32)
        cols[f"layer.adam_sign_frac/{layer}"] = around(0.05, 0.1)
        cols[f"layer.adam_rms_t/{layer}"] = around(1.0, 0.15)
        cols[f"layer.adam_eff_lr/{layer}"] = around(0.01, 0.05)
        cols[f"layer.update_ratio/{layer}"] = around(2e-3, 0.1)
    v_rows = np.arange(n) % v_every != 0  # statistics of v alone: every v_every steps
    off_cadence = np.arange(n) % optimizer_every != 0
    for name in list(cols):
        if name.split("/")[0] in ("layer.adam_eps_frac", "layer.adam_eff_lr"):
            cols[name][v_rows] = np.nan
        if name.startswith(("layer.adam", "layer.update_ratio")):
            cols[name][off_cadence] = np.nan
    for stat in (ADAM_UPDATE_RMS, ADAM_EPS_FRAC, ADAM_SIGN_FRAC, ADAM_RMS_T,
                 ADAM_EFF_LR, UPDATE_RATIO):
        cols[stat] = np.median([cols[f"layer.{stat}/{la}"] for la in layers], axis=0)
    for part in PARTS:
        cols[f"part.grad_norm/{part}"] = around(70.0, 0.25)
    return cols


def standard_evals(steps: np.ndarray, *, seed: int = 0, latent_dim: int = 16,
                   train_images: bool = False) -> dict[str, np.ndarray]:
    """Per-evaluation columns at ``steps``: losses, image-quality metrics, drift, latents; with
    ``train_images``, the same losses and metrics of fixed training images (``train_*``), at
    the same levels with noise of their own."""
    rng = np.random.default_rng(seed + 1)
    steps = np.asarray(steps, dtype=np.int64)
    n = len(steps)

    def noisy(level: float, noise: float) -> np.ndarray:
        return (level + noise * rng.standard_normal(n)).astype(np.float32)

    cols: dict[str, np.ndarray] = {
        "step": steps, "time": steps * 0.13, "epoch": steps // 128,
        EVAL_RECON: noisy(1870.0, 2.0), EVAL_KL: noisy(18.0, 0.3),
        TRAIN_RECON_AVG: noisy(1900.0, 2.0), TRAIN_KL_AVG: noisy(18.0, 0.3),
        DRIFT_ZERO_RMSE: np.abs(noisy(0.01, 0.002)),
        DRIFT_FIXED_RMSE: np.abs(noisy(0.02, 0.003)),
        ACTIVE_UNITS: np.full(n, float(latent_dim), np.float32),
    }
    for metric, (level, noise) in QUALITY.items():
        cols[metric] = noisy(level, noise)
    if train_images:
        cols[TRAIN_EVAL_RECON] = noisy(1850.0, 2.0)
        cols[TRAIN_EVAL_KL] = noisy(18.0, 0.3)
        for metric, (level, noise) in QUALITY.items():
            cols[f"train_{metric}"] = noisy(level, noise)
    return cols


def grid_png(step: int, size: tuple[int, int] = (560, 300)) -> bytes:
    """A placeholder grid image (a seeded colour field, the size of a 64 px grid)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(step)
    small = rng.integers(0, 256, size=(4, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_run(path: str | Path, scalars: dict[str, np.ndarray] | None,
              evals: dict[str, np.ndarray] | None = None, *, events: Iterable[dict] = (),
              settings: Iterable[str] = (), fixed: dict[str, np.ndarray] | None = None,
              grids: Iterable[int] = (), status: str = "finished",
              chunk: int = 100_000) -> Path:
    """Write a run directory from columns. ``settings`` are ``key=value`` config overrides
    (as ``--set`` takes them); ``events`` are dicts with ``kind``, ``step`` and fields;
    ``grids`` the steps to write a placeholder grid image for."""
    path = Path(path)
    config = build_config(overrides=list(settings))
    writer = RunWriter.create(path, config_toml=config.to_toml(),
                              environment={"synthetic": True}, overwrite=True)
    last = 0
    if scalars:
        n = len(scalars["step"])
        for start in range(0, n, chunk):
            writer.log_columns({k: v[start:start + chunk] for k, v in scalars.items()})
        last = int(scalars["step"][-1]) if n else 0
    if evals:
        for i in range(len(evals["step"])):
            writer.log_eval({k: v[i].item() for k, v in evals.items()})
    for event in events:
        fields = {k: v for k, v in event.items() if k not in ("kind", "step")}
        writer.event(event["kind"], event["step"], **fields)
    if fixed:
        writer.save_fixed(**fixed)
    for step in grids:
        writer.save_grid(int(step), grid_png(int(step)))
    writer.close(status, last)
    return path
