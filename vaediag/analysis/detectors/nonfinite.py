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

Episodes: non-finite steps more than ``EPISODE_GAP`` steps apart are separate episodes, each a
finding of its own with its own origin and what preceded it (a NaN from one bad batch at step
150 and an overflow after a learning-rate jump at step 300 are two failures with two causes,
not one that "affected" everything between them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vaediag.analysis.causes import SettingChange, first_change, knob, undo_remedy
from vaediag.analysis.data import RunData, Skip
from vaediag.analysis.findings import Finding, Signal
from vaediag.analysis.kinds import Kind
from vaediag.analysis.stats import MAD_TO_SIGMA
from vaediag.columns import BETA, EPS, KL, LOGVAR_MAX, LOSS_SCALE, LOSS_TERMS, LR, RECON

NAME = "nonfinite"
#: its place among the detectors: they run, and are listed, in this order
ORDER = 10
#: the kinds of finding this detector emits (see :mod:`vaediag.analysis.kinds`)
KINDS = (
    Kind("nonfinite", "timelines", instability=1, own_channels=frozenset({"nonfinite"}),
         harm=True),
)
#: steps before the first non-finite value searched for what was extreme
LOOKBACK = 20
#: non-finite steps further apart than this are separate episodes (the incidents' window: a
#: cause inside training shows within it, so a later failure past it has a cause of its own)
EPISODE_GAP = 50

#: float16 (a loss scaler recorded): a log-variance above ln(65,504), float16's largest value,
#: makes exp(logvar) overflow where it is computed in float16 (under autocast on a CPU, or on
#: float16 tensors outside it; CUDA's autocast computes exp in float32)
FP16_LOGVAR = 11.09
#: ... and above twice that, the sample's scale exp(logvar / 2), so z itself (or the decoder's
#: input, cast to float16) overflows, whatever precision the KL is computed in
FP16_SAMPLE_LOGVAR = 2 * FP16_LOGVAR

#: remedies by where it started: (text, config key of ``vaediag train``, value)
_REMEDIES: dict[str, list[tuple[str, str | None, object]]] = {
    KL: [("clamp the encoder's log-variance (e.g. to [-30, 20])", "loss.logvar_clamp",
            "[-30.0,20.0]"),
           ("use the analytic KL if the Monte Carlo estimate is used", "loss.kl", "analytic"),
           ("lower the learning rate or clip gradients", "optim.grad_clip", None)],
    RECON: [("clip gradients and lower the learning rate", "optim.grad_clip", None),
              ("with a learned decoder scale, bound it from below or fix it", None, None)],
    "grad": [("clip gradients at the 99th percentile of the stable phase", "optim.grad_clip",
              None),
             ("lower the learning rate; raise Adam's eps if it is tiny", "optim.eps", None)],
    # a loss term non-finite from finite weights, nothing extreme before: the forward pass
    # made it (clipping gradients cannot help: the loss itself is NaN)
    # (then the term's own remedies that act on the forward pass, not the update)
    "forward": [("check the batch of that step for NaN/Inf pixels, and the loss for log(0), a "
                 "division by zero or exp() of a large value (add an eps, clamp)", None, None)],
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


def _bad_steps(data: RunData) -> tuple[dict[int, set[str]], dict[int, set[int]]]:
    """{step: the terms that went non-finite}, from the rows' ``recon`` and ``kl`` and the
    Monitor's ``nonfinite`` events, and {step: the ranks they went non-finite on} (under
    torch.distributed)."""
    bad: dict[int, set[str]] = {}
    for term in (RECON, KL):
        if term in data.scalars.columns:
            for i in np.flatnonzero(~np.isfinite(data.series(term))):
                bad.setdefault(int(data.steps[i]), set()).add(term)
    ranks: dict[int, set[int]] = {}
    for _, event in data.events_of("nonfinite").iterrows():
        bad.setdefault(int(event["step"]), set()).add(str(event["term"]))
        on = event.get("ranks")
        if isinstance(on, list):
            ranks.setdefault(int(event["step"]), set()).update(int(r) for r in on)
    return bad, ranks


@dataclass
class _Origin:
    """Where the first non-finite step's values started."""

    terms: list[str]  # every term named at that step
    loss_terms: list[str]  # of them, the loss terms
    weight: str  # ``weight:NAME`` when a weight was already non-finite, else ""
    origin: str  # that weight, else the first ``grad:NAME``, else ""
    layer: str
    ranks: list[int]

    @classmethod
    def of(cls, terms: set[str], ranks: set[int]) -> _Origin:
        ordered = sorted(terms)
        weights = [t for t in ordered if t.startswith("weight:")]
        grads = [t for t in ordered if t.startswith("grad")]
        origin = weights[0] if weights else grads[0] if grads else ""
        return cls(ordered, [t for t in ordered if t in LOSS_TERMS],
                   weights[0] if weights else "", origin, _layer(origin), sorted(ranks))

    def remedies(self, before: list[dict]) -> list[tuple[str, str | None, object]]:
        """What to do, by where it started; a loss term that went non-finite from finite
        weights with nothing extreme before was made by the forward pass: the batch or the
        loss's arithmetic first, and none of the term's remedies that act on the update."""
        if self.weight:
            return _REMEDIES["weight"]
        term = KL if KL in self.loss_terms else RECON if RECON in self.loss_terms \
            else "grad"
        if self.loss_terms and not before:
            return [*_REMEDIES["forward"],
                    *(r for r in _REMEDIES[term] if r[1] != "optim.grad_clip")]
        return _REMEDIES[term]

    def where(self) -> str:
        """' in recon on rank 1 and the gradient of decoder.fc', or ''."""
        on = self.ranks
        parts = ([", ".join(self.loss_terms)
                  + (f" on rank{'s' if len(on) > 1 else ''} {', '.join(map(str, on))}"
                     if on else "")] if self.loss_terms else [])
        if self.weight:
            parts.append(f"the weight of {self.layer} ({self.origin.split(':', 1)[1]} was "
                         f"already non-finite: a corrupted parameter)")
        elif self.layer:
            parts.append(f"the gradient of {self.layer}")
        return f" in {' and '.join(parts)}" if parts else ""


def _cause(origin: _Origin, first: int, before: list[dict],
           change: SettingChange | None) -> str:
    if change is not None:
        return (f"{change.describe()}, {first - change.step:,} step(s) before: the larger "
                f"updates overflowed ({origin.where().strip() or 'in the gradients'})")
    if origin.weight:
        return (f"a weight of {origin.layer} was already Inf/NaN when step {first:,} began: it "
                f"was written by the update before it, or by code that edits or loads "
                f"weights; every value computed from it is non-finite")
    if origin.loss_terms and not before:
        return (f"{', '.join(origin.loss_terms)} went non-finite in the forward pass of step "
                f"{first:,}, with every weight finite and nothing recorded extreme before it: "
                f"a bad batch (NaN/Inf pixels) or an operation such as log(0), a division by "
                f"zero or an exp() that overflowed; the gradients are non-finite because the "
                f"loss is")
    if before:
        return (f"a loss term or gradient overflowed; just before, {before[0]['column']} "
                f"reached {before[0]['value']:.4g} (typically {before[0]['typical']:.4g})")
    return ("a loss term or gradient overflowed with nothing recorded extreme just before it: "
            "a sudden event (a bad batch, one huge step, a corrupted weight)")


def _half_precision(data: RunData, origin: _Origin, first: int
                    ) -> tuple[str, list[tuple[str, str | None, object]]] | None:
    """A loss term that went non-finite in a float16 run (a loss scaler recorded) from finite
    weights: a forward overflow. The cause, with exp(logvar) named when the log-variance had
    passed ``FP16_LOGVAR``, and what to keep in float32; None for another run."""
    if not data.has(LOSS_SCALE) or not origin.loss_terms or origin.weight:
        return None
    at = int(np.searchsorted(data.steps, first))
    logvar = data.series(LOGVAR_MAX)[max(0, at - LOOKBACK):at + 1] if data.has(LOGVAR_MAX) \
        else np.zeros(0)
    high = float(np.nanmax(logvar)) if np.isfinite(logvar).any() else math.nan
    bf16 = ("train in bfloat16, whose range is float32's", "train.precision", "bf16")
    clamp = ("clamp the encoder's log-variance below 11", "loss.logvar_clamp", "[-30.0,11.0]")
    terms = ", ".join(origin.loss_terms)
    if high >= FP16_SAMPLE_LOGVAR:  # the sample itself
        return (f"{terms} overflowed float16 in the forward pass of step {first:,}: the "
                f"log-variance reached {high:.3g}, and the sample z = mu + eps * "
                f"exp(logvar/2) passes 65,504, float16's largest value, once logvar exceeds "
                f"{FP16_SAMPLE_LOGVAR:.3g} (exp(logvar) itself past {FP16_LOGVAR:g}); the "
                f"decoder's float16 input is then Inf, whatever precision the KL is in"), [
            clamp, ("sample z in float32 and keep the decoder's first layer in float32 "
                    "(torch.autocast(..., enabled=False) around it)", None, None), bf16]
    if high >= FP16_LOGVAR and KL in origin.loss_terms:
        return (f"{terms} overflowed float16 in the forward pass of step {first:,}: the "
                f"log-variance reached {high:.3g}, and exp(logvar) passes 65,504, float16's "
                f"largest value, once it exceeds {FP16_LOGVAR:g}"), [
            ("compute exp(logvar) and the KL in float32: mu.float(), logvar.float() before "
             "them, or outside autocast", None, None), clamp, bf16]
    return (f"{', '.join(origin.loss_terms)} overflowed float16 in the forward pass of step "
            f"{first:,}: a value computed in half precision under autocast passed 65,504 (a "
            f"loss summed over pixels, a decoder logit); the gradients are non-finite because "
            f"the loss is"), [
        ("keep the loss terms in float32: cast the decoder's output, mu and logvar with "
         ".float() before the loss", None, None), bf16]


def episodes(steps: list[int], gap: int = EPISODE_GAP) -> list[list[int]]:
    """Sorted non-finite steps split where more than ``gap`` steps lie between two."""
    out: list[list[int]] = []
    for step in sorted(steps):
        if out and step - out[-1][-1] <= gap:
            out[-1].append(step)
        else:
            out.append([step])
    return out


def detect(data: RunData) -> tuple[list[Finding], list[Signal]]:
    """The Monitor's ``nonfinite`` events are authoritative (each names its term); rows add
    NaN/Inf in ``recon`` and ``kl``, which every step records. One finding per episode."""
    if RECON not in data.scalars.columns and data.events_of("nonfinite").empty:
        raise Skip("no loss terms recorded")
    bad, ranks = _bad_steps(data)
    parts = episodes(list(bad))
    skipped = data.events_of("skipped_step")
    skipped_steps = skipped["step"].to_numpy() if len(skipped) else np.zeros(0)
    findings, signals = [], []
    for k, steps in enumerate(parts):
        first, last = steps[0], steps[-1]
        origin = _Origin.of(bad[first], ranks.get(first, set()))
        before = extremes_before(data, int(np.searchsorted(data.steps, first)))
        # a recorded setting that jumped just before (the learning rate, eps, the KL weight)
        change = first_change(data, (LR, EPS, BETA), first - LOOKBACK, first)
        remedies = [text + (knob(data, k_, v) if k_ else "")
                    for text, k_, v in origin.remedies(before)]
        if change is not None and not origin.weight:
            remedies = [undo_remedy(data, change), *remedies]
        half = _half_precision(data, origin, first) if change is None else None
        if half is not None:
            remedies = [text + (knob(data, k_, v) if k_ else "") for text, k_, v in half[1]]
        which = ""
        if len(parts) > 1:
            earlier = f"; an earlier one at step {parts[k - 1][0]:,}" if k else ""
            which = f" (episode {k + 1} of {len(parts)}{earlier})"
        findings.append(Finding(
            kind="nonfinite", severity="high", first_step=first, last_step=last,
            summary=(f"non-finite values first at step {first:,}{origin.where()}; "
                     f"{len(steps):,} step(s) affected{which}"),
            evidence={"terms": origin.terms, "layer": origin.layer,
                      "steps_affected": len(steps), "episode": k + 1, "episodes": len(parts),
                      **({"ranks": origin.ranks} if origin.ranks else {}),
                      "skipped_updates": int(((skipped_steps >= first)
                                              & (skipped_steps <= last)).sum()),
                      "extreme_before": before,
                      **({"setting_change": change.describe()} if change else {})},
            cause=half[0] if half is not None else
            _cause(origin, first, before, change if not origin.weight else None),
            detector=NAME, remedies=remedies))
        signals.append(Signal(first, "nonfinite", origin.layer or ",".join(origin.loss_terms),
                              math.nan, math.nan, f"NaN/Inf in {', '.join(origin.terms)}"))
    return findings, signals
