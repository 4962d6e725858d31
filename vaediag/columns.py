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

import pandas as pd

KINDS = ("layer", "part", "dim", "img")
_INDEXED = re.compile(r"^(layer|part|dim|img)\.([A-Za-z0-9_]+)/(.+)$")

#: Which way is better for each quality metric: +1 higher is better, -1 lower is better, 0 means
#: 1.0 is best (a ratio). Analysis reads this; probes must keep it true.
METRIC_DIRECTION: dict[str, int] = {
    "ssim": +1, "psnr": +1, "haarpsi": +1, "gmsd": -1, "lpips": -1,
    "colour_de": -1, "sat_ratio": 0, "orient_err": -1, "centroid_err": -1,
    "factor_skin_de": -1, "factor_hair_de": -1, "factor_eye_de": -1, "factor_bg_de": -1,
    "factor_angle_err": -1, "factor_turn_err": -1,
}

#: What each quality metric looks at. Metrics of one family move together (SSIM and HaarPSI both
#: see structure), so agreement is counted in families, not metrics.
METRIC_FAMILY: dict[str, str] = {
    "ssim": "structure", "psnr": "structure", "haarpsi": "structure", "gmsd": "structure",
    "lpips": "structure", "colour_de": "colour", "sat_ratio": "colour", "orient_err": "pose",
    "centroid_err": "pose", "factor_skin_de": "colour", "factor_hair_de": "colour",
    "factor_eye_de": "colour", "factor_bg_de": "colour", "factor_angle_err": "pose",
    "factor_turn_err": "pose",
}

#: Metrics measured on one region of the face (a few pixels for the eyes at 32 px): alone they
#: are weak evidence; they corroborate a whole-image metric of their family.
METRIC_REGIONAL: frozenset[str] = frozenset({"factor_skin_de", "factor_hair_de", "factor_eye_de",
                                             "factor_bg_de"})

#: Estimates from image moments that the known factors (toyfaces) measure exactly: where the
#: exact metric is recorded, the estimate is not used.
METRIC_SUPERSEDED_BY: dict[str, str] = {"orient_err": "factor_angle_err",
                                        "centroid_err": "factor_angle_err"}


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
