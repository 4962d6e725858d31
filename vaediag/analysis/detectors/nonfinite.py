"""Non-finite values: the first step, term and layer where NaN or Inf appeared, and what was
extreme just before it.

Statistic: the first row whose loss terms or gradient norm are NaN/Inf, and the Monitor's
``nonfinite`` events, which say where it started: a parameter that was itself non-finite
(``weight:NAME``, a corrupted weight, found by scanning the parameters on that step), else the
layer whose gradient the backward pass reached first among those that went non-finite
(``grad:NAME``). Then, over the
``LOOKBACK`` steps before it, each recorded per-step statistic is scored against its own
earlier history (robust z of its value against the median and MAD of the run up to the window):
the most extreme ones are reported as what preceded the failure.
"""

from __future__ import annotations

import math

import numpy as np

from vaediag.analysis.causes import knob
from vaediag.analysis.data import RunData, Skip
from vaediag.analysis.findings import Finding, Signal
from vaediag.analysis.kinds import Kind
from vaediag.analysis.stats import MAD_TO_SIGMA

NAME = "nonfinite"
#: the kinds of finding this detector emits (see :mod:`vaediag.analysis.kinds`)
KINDS = (
    Kind("nonfinite", "timelines", instability=1, own_channels=frozenset({"nonfinite"}),
         harm=True),
)
#: steps before the first non-finite value searched for what was extreme
LOOKBACK = 20

#: remedies by where it started: (text, config key of ``vaediag train``, value)
_REMEDIES = {
    "kl": [("clamp the encoder's log-variance (e.g. to [-30, 20])", "loss.logvar_clamp",
            "[-30.0,20.0]"),
           ("use the analytic KL if the Monte Carlo estimate is used", "loss.kl", "analytic"),
           ("lower the learning rate or clip gradients", "optim.grad_clip", None)],
    "recon": [("clip gradients and lower the learning rate", "optim.grad_clip", None),
              ("with a learned decoder scale, bound it from below or fix it", None, None)],
    "grad": [("clip gradients at the 99th percentile of the stable phase", "optim.grad_clip",
              None),
             ("lower the learning rate; raise Adam's eps if it is tiny", "optim.eps", None)],
    "weight": [("find what wrote that weight: the update before (clip gradients, lower the "
                "learning rate) or code that edits or loads weights", None, None),
               ("resume from the last checkpoint before the step, with the cause fixed", None,
                None)],
}


def _layer(term: str) -> str:
    """'grad:decoder.fc.weight' -> 'decoder.fc'."""
    name = term.split(":", 1)[1] if ":" in term else ""
    head, _, last = name.rpartition(".")
    return head if last in ("weight", "bias") else name


def extremes_before(data: RunData, index: int, top: int = 3) -> list[dict]:
    """The per-step columns most extreme in the LOOKBACK rows before row ``index``."""
    start = max(0, index - LOOKBACK)
    if start < 10:
        return []
    frame = data.scalars
    scored = []
    for col in frame.columns:
        if col in ("step", "time", "epoch") or frame[col].dtype.kind != "f":
            continue
        history = frame[col].to_numpy(dtype=np.float64)[:start]
        window = frame[col].to_numpy(dtype=np.float64)[start:index]
        history = history[np.isfinite(history)]
        window_ok = window[np.isfinite(window)]
        if history.size < 10 or window_ok.size == 0:
            continue
        med = np.median(history)
        scale = MAD_TO_SIGMA * np.median(np.abs(history - med))
        if scale <= 0:
            continue
        z = (window_ok - med) / scale
        k = int(np.argmax(np.abs(z)))
        scored.append((abs(float(z[k])), col, float(window_ok[k]), float(med)))
    scored.sort(reverse=True)
    return [{"column": c, "value": v, "typical": m, "robust_z": round(z, 1)}
            for z, c, v, m in scored[:top] if z >= 6]


def detect(data: RunData) -> tuple[list[Finding], list[Signal]]:
    """The Monitor's ``nonfinite`` events are authoritative (each names its term); rows add
    NaN/Inf in ``recon`` and ``kl``, which every step records."""
    if "recon" not in data.scalars.columns and data.events_of("nonfinite").empty:
        raise Skip("no loss terms recorded")
    steps = data.steps
    bad: dict[int, set[str]] = {}
    for term in ("recon", "kl"):
        if term in data.scalars.columns:
            for i in np.flatnonzero(~np.isfinite(data.series(term))):
                bad.setdefault(int(steps[i]), set()).add(term)
    ranks: dict[int, set[int]] = {}  # under torch.distributed: where a loss term broke
    for _, event in data.events_of("nonfinite").iterrows():
        bad.setdefault(int(event["step"]), set()).add(str(event["term"]))
        on = event.get("ranks")
        if isinstance(on, list):
            ranks.setdefault(int(event["step"]), set()).update(int(r) for r in on)
    if not bad:
        return [], []
    first, last = min(bad), max(bad)
    on_ranks = sorted(ranks.get(first, ()))
    terms = sorted(bad[first])
    weight_terms = [t for t in terms if t.startswith("weight:")]
    grad_terms = [t for t in terms if t.startswith("grad")]
    origin = weight_terms[0] if weight_terms else grad_terms[0] if grad_terms else ""
    layer = _layer(origin)
    loss_terms = [t for t in terms if t in ("recon", "kl", "total")]
    before = extremes_before(data, int(np.searchsorted(steps, first)))
    key = ("weight" if weight_terms else "kl" if "kl" in loss_terms
           else "recon" if "recon" in loss_terms else "grad")
    parts = ([", ".join(loss_terms)
              + (f" on rank{'s' if len(on_ranks) > 1 else ''} "
                 f"{', '.join(map(str, on_ranks))}" if on_ranks else "")]
             if loss_terms else [])
    if weight_terms:
        parts.append(f"the weight of {layer} ({origin.split(':', 1)[1]} was already "
                     f"non-finite: a corrupted parameter)")
    elif layer:
        parts.append(f"the gradient of {layer}")
    summary = (f"non-finite values first at step {first:,}"
               + (f" in {' and '.join(parts)}" if parts else "")
               + f"; {len(bad):,} step(s) affected")
    if weight_terms:
        cause = (f"a weight of {layer} was already Inf/NaN when step {first:,} began: it was "
                 f"written by the update before it, or by code that edits or loads weights; "
                 f"every value computed from it is non-finite")
    elif before:
        cause = (f"a loss term or gradient overflowed; just before, {before[0]['column']} "
                 f"reached {before[0]['value']:.4g} (typically {before[0]['typical']:.4g})")
    else:
        cause = ("a loss term or gradient overflowed with nothing recorded extreme just before "
                 "it: a sudden event (a bad batch, one huge step, a corrupted weight)")
    finding = Finding(
        kind="nonfinite", severity="high", first_step=first, last_step=last, summary=summary,
        evidence={"terms": terms, "layer": layer, "steps_affected": len(bad),
                  **({"ranks": on_ranks} if on_ranks else {}),
                  "skipped_updates": len(data.events_of("skipped_step")),
                  "extreme_before": before},
        cause=cause, detector=NAME,
        remedies=[text + (knob(data, k, v) if k else "") for text, k, v in _REMEDIES[key]])
    signals = [Signal(first, "nonfinite", layer or ",".join(loss_terms), math.nan, math.nan,
                      f"NaN/Inf in {', '.join(terms)}")]
    return [finding], signals
