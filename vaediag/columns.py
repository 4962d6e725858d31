"""Names of recorded columns: how probes name what they record and how analysis finds it.

A column is either a plain name (``recon``, ``grad_norm``, ``ssim``) or an indexed one,
``KIND.STAT/INDEX``, where KIND says what the index is:

- ``layer.grad_norm/decoder.fc``  per layer (a module's own parameters, named as in the model)
- ``part.grad_norm/encoder``      per part (the model's top-level modules: encoder, decoder)
- ``dim.kl/3``                    per latent dimension
- ``img.ssim/5``                  per grid image (evaluation rows)

Pure Python, no torch: analysis and reports use it to pull a (steps x index) matrix out of a
DataFrame with :func:`matrix`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

# -- plain columns: the one place each name is spelled ------------------------------------

#: every row: the optimizer updates before it (per step), or the model evaluated after them
STEP = "step"
#: seconds of training since the run began (a resumed run's clock goes on)
TIME = "time"
#: the epoch (an int per step; step / steps_per_epoch per evaluation)
EPOCH = "epoch"
#: the loss terms of a training step, as given (under torch.distributed, the mean over ranks)
RECON = "recon"
KL = "kl"
TOTAL = "total"
LOSS_TERMS = (RECON, KL, TOTAL)
#: the global L2 norm of the gradients
GRAD_NORM = "grad_norm"
#: the gradients probe: how many gradient entries were NaN or Inf
GRAD_NONFINITE = "grad_nonfinite"
#: the KL weight, and the optimizer's learning rate and eps (of its first group)
BETA = "beta"
LR = "lr"
EPS = "eps"
#: mixed precision (a torch.amp.GradScaler): the loss scale at the step, and whether the scaler
#: skipped the step (its gradients overflowed float16: 1.0, else 0.0)
LOSS_SCALE = "loss_scale"
SCALER_SKIPPED = "scaler_skipped"
#: under torch.distributed: the largest minus the smallest rank's loss term
RECON_RANK_SPREAD = "recon_rank_spread"
KL_RANK_SPREAD = "kl_rank_spread"
#: evaluation rows: the losses of the grid's held-out images and of the fixed training images
EVAL_RECON = "eval_recon"
EVAL_KL = "eval_kl"
TRAIN_EVAL_RECON = "train_eval_recon"
TRAIN_EVAL_KL = "train_eval_kl"
#: evaluation rows: the training loss terms averaged over the steps since the last evaluation
TRAIN_RECON_AVG = "train_recon_avg"
TRAIN_KL_AVG = "train_kl_avg"
TRAIN_AVG_STEPS = "train_avg_steps"

# -- what probes record that a detector or a figure reads ----------------------------------

#: the latents probe: the batch's posterior ranges and means (per step)
MU_MIN = "mu_min"
MU_MAX = "mu_max"
MU_MEAN = "mu_mean"
LOGVAR_MIN = "logvar_min"
LOGVAR_MAX = "logvar_max"
LOGVAR_MEAN = "logvar_mean"
#: the latent-health probe: latent dimensions in use over the metric images (per evaluation)
ACTIVE_UNITS = "active_units"
#: the decoder's learned output scale, when it has one (per step)
DECODER_SCALE = "decoder_scale"
#: the Adam probe (whole model; per layer as ``layer.<stat>/<layer>``)
ADAM_UPDATE_RMS = "adam_update_rms"
ADAM_SIGN_FRAC = "adam_sign_frac"
ADAM_RMS_T = "adam_rms_t"
ADAM_EPS_FRAC = "adam_eps_frac"
ADAM_EFF_LR = "adam_eff_lr"
#: the update probe: |dW| / |W| (whole model; per layer)
UPDATE_RATIO = "update_ratio"
#: the update probe, for weights kept in half precision: the share of entries the optimizer
#: step left unchanged (updates smaller than half the weight's resolution round away)
UPDATE_LOST = "update_lost"
#: the drift probe: how far the decodes of the fixed z and of the zero vector moved
DRIFT_FIXED_RMSE = "drift_fixed_rmse"
DRIFT_ZERO_RMSE = "drift_zero_rmse"

# -- indexed columns ------------------------------------------------------------------------

KINDS = ("layer", "part", "dim", "img")
_INDEXED = re.compile(r"^(layer|part|dim|img)\.([A-Za-z0-9_]+)/(.+)$")

@dataclass(frozen=True)
class QualityMetric:
    """Everything vaediag knows about one image-quality metric, in one place: the probes that
    record it must keep these facts true; analysis, the reports and the grid read them here."""

    name: str
    #: +1 higher is better, -1 lower is better, 0 a ratio whose best value is 1.0
    direction: int
    #: what it looks at; metrics of one family move together (SSIM and HaarPSI both see
    #: structure), so agreement is counted in families, not metrics
    family: str
    #: for figures: a readable name, and which way is better
    label: str
    #: for captions under the grids, or "" for none
    short: str = ""
    #: in [0, 1] with 1 best (its badness is 1 - value)
    unit_interval: bool = False
    #: measured on one region of the face (a few pixels for the eyes at 32 px): alone it is
    #: weak evidence; it corroborates a whole-image metric of its family
    regional: bool = False
    #: an estimate from image moments that this exact metric (toyfaces' known factors)
    #: supersedes where it is recorded
    superseded_by: str | None = None
    #: a pixel metric, like the loss itself: no evidence that loss and pictures part
    pixel: bool = False
    #: drawn in the report's loss-against-quality figures
    shown: bool = True


def _metrics(*metrics: QualityMetric) -> dict[str, QualityMetric]:
    return {m.name: m for m in metrics}


#: The image-quality metrics, in the order analysis considers them. The probes that record
#: them (``image_quality``, ``factors``) are tested to record exactly these.
QUALITY_METRICS: dict[str, QualityMetric] = _metrics(
    QualityMetric("ssim", +1, "structure", "SSIM (higher is better)", "SSIM",
                  unit_interval=True),
    QualityMetric("psnr", +1, "structure", "PSNR (dB, higher is better)", pixel=True,
                  shown=False),
    QualityMetric("haarpsi", +1, "structure", "HaarPSI (higher is better)", unit_interval=True),
    QualityMetric("gmsd", -1, "structure", "GMSD (lower is better)"),
    QualityMetric("lpips", -1, "structure", "LPIPS (lower is better)", "LPIPS"),
    QualityMetric("colour_de", -1, "colour", "colour error, CIEDE2000", "colour err"),
    QualityMetric("sat_ratio", 0, "colour", "saturation ratio (1 = kept)", "saturation"),
    QualityMetric("orient_err", -1, "pose", "orientation error (deg)",
                  superseded_by="factor_angle_err"),
    QualityMetric("centroid_err", -1, "pose", "centroid error (px)",
                  superseded_by="factor_angle_err", shown=False),
    QualityMetric("factor_skin_de", -1, "colour", "skin colour error", regional=True),
    QualityMetric("factor_hair_de", -1, "colour", "hair colour error", regional=True),
    QualityMetric("factor_eye_de", -1, "colour", "eye colour error", regional=True,
                  shown=False),
    QualityMetric("factor_bg_de", -1, "colour", "background colour error", regional=True,
                  shown=False),
    QualityMetric("factor_angle_err", -1, "pose", "face angle error (deg)"),
    QualityMetric("factor_turn_err", -1, "pose", "face turn error"),
)


def gradient_columns(names: list[str] | pd.Index) -> list[str]:
    """The columns measured on a step's gradients (their norms, their non-finite entries,
    the recon/KL split): what a loss scaler's skipped step discards."""
    return [c for c in names if c in (GRAD_NORM, GRAD_NONFINITE) or c.startswith(
        (f"layer.{GRAD_NORM}/", f"part.{GRAD_NORM}/", "split_", "part.split_"))]


def name(kind: str, stat: str, index: object) -> str:
    """``name("layer", "grad_norm", "decoder.fc") == "layer.grad_norm/decoder.fc"``."""
    if kind not in KINDS:
        raise ValueError(f"unknown column kind {kind!r}")
    return f"{kind}.{stat}/{index}"


def split(column: str) -> tuple[str, str, str] | None:
    """``"layer.grad_norm/decoder.fc" -> ("layer", "grad_norm", "decoder.fc")``; None if plain."""
    m = _INDEXED.match(column)
    return (m.group(1), m.group(2), m.group(3)) if m else None


def indexed(columns: list[str] | pd.Index, kind: str, stat: str) -> list[str]:
    """The columns of one indexed statistic, in recorded order."""
    prefix = f"{kind}.{stat}/"
    return [c for c in columns if c.startswith(prefix)]


def matrix(frame: pd.DataFrame, kind: str, stat: str) -> pd.DataFrame:
    """A (rows x index) frame of one indexed statistic, columns renamed to their index."""
    cols = indexed(frame.columns, kind, stat)
    out = frame[cols]
    out.columns = [c.split("/", 1)[1] for c in cols]
    return out
