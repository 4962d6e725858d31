"""Detector accuracy on runs the detectors were not tuned on: healthy runs of three model styles
at learning rates from 1e-4 to 5e-3, and planted faults, sudden and gradual, through both
``vaediag train`` and the Monitor in loops of their own.

Model styles (32x32 toyfaces, 1,200 steps, an evaluation every 50 steps):

- ``vaediag``: ``vaediag train`` with vaediag's conv VAE; the loss varies with the seed
  (summed BCE, Gaussian with group norm, summed MSE, BCE with the Monte Carlo KL and a KL
  warm-up); faults planted with ``--inject``.
- ``foreign``: a widely copied PyTorch VAE layout (batch norm, LeakyReLU, tanh output on
  [-1, 1] images, mean-reduced MSE, 128 latents, KL weight 2.5e-4) in its own loop with the
  Monitor attached (benchmarks/own_loops.py); faults planted in the loop's code.
- ``tfcvae``: the TensorFlow CVAE tutorial's model (summed BCE, single-sample MC KL) likewise.

Healthy runs: every style with seeds 0-4, seed k at learning rate ``LRS[k]`` (the TensorFlow
model at ``TFCVAE_LRS[k]``: at 5e-3 it never learns to encode, a natural failure scored as
such); and again in mixed precision (``MIXED``: every style's seeds 0 and 2 in bfloat16,
vaediag's 0 and 2 and the own loops' 2 in float16 with a GradScaler, whose calibration skips
must not be findings). Fault runs plant one fault at step 700 in every style, and half
precision's own in the styles where it can happen: a log-variance lifted past what float16
holds (``logvar_jump``) and the weights moved to bfloat16 (``half_weights``). Seeds 0 and 1
are the *tuning* seeds: thresholds were set looking at those runs only; seeds 2-4 are held
out, and the scores are printed for both.

A fault counts as *found* when a detector meant to catch it raises a warning or high finding
visible within ``WINDOW`` steps of the onset (sudden faults; the window opens one step early: a
weight edit that makes the model's 700th state is recorded with the update of step 699), or,
for gradual faults, within 2 evaluations of the step at which the fault became visible in the
pictures (the grid's saturation ratio 10% below its level before the onset), as a user watching
the run would have seen it: the analysis is run on the run cut at each evaluation in turn.
The *cause is right* when that finding's summary or cause names what was planted (a pattern per
fault: the learning rate, eps, the KL weight, the layer, the batch, colour).

Natural cases (case-study presets, nothing planted) are labelled from the run's ground truth by
a rule written before looking at what the detectors say (:func:`pose_lost_at`,
:func:`memorised_at`). The overfitting case (preset ``seed-overfit``: 128 or 64 faces, three
seeds, once at 64 px with the default model, once with its remedy) must be found within
``OVERFIT_EVALS`` evaluations of its label, its cause naming memorisation and the checkpoint to
keep; the same preset on 4,096 faces is a healthy run; the seed-decoupling case must not be
blamed on memorisation.

    python benchmarks/detectors.py [--out DIR] [--reuse] [--only NAME ...] [--jobs 2]

Takes about 1 hour 45 minutes on 2 CPU cores (training; float16 convolutions are 20-40x slower
than float32 on a CPU: its seven runs take 70 minutes of it; ``--reuse`` analyses kept runs in
3 minutes).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import vaediag
from vaediag.analysis import lead_incident
from vaediag.analysis.findings import severity_rank

HERE = Path(__file__).resolve().parent
ONSET = 700
WINDOW = 50
GRADUAL_EVALS = 2
NATURAL_WINDOW = 500
#: the overfitting case is found when a warning is visible within this many evaluations after
#: its label
OVERFIT_EVALS = 2
TUNING_SEEDS = (0, 1)
LRS = (1e-4, 3e-4, 1e-3, 2e-3, 5e-3)
#: the TensorFlow tutorial's model collapses at 5e-3 (its KL stays ~0 from the first steps):
#: that run is a natural failure (scenario collapse-tfcvae-lr5e-3), not a healthy run
TFCVAE_LRS = (1e-4, 3e-4, 5e-4, 1e-3, 2e-3)
BASE = [
    "data.resolution=32", "data.toyfaces_size=4096", "data.val_size=128",
    "model.channels=[16, 32, 64]", "model.latent_dim=16",
    "train.steps=1200", "train.batch_size=32", "eval.every_steps=50",
]
#: vaediag-style healthy runs: the loss and model settings of seed k
VAEDIAG_VARIANTS = (
    ["loss.recon=bce"],
    ["loss.recon=gaussian", "model.norm=group"],
    ["loss.recon=mse_sum", "model.latent_dim=8"],
    ["loss.recon=bce", "loss.kl=mc", "loss.beta_schedule=warmup", "loss.beta_warmup_steps=300"],
    ["loss.recon=bce", "model.activation=leaky_relu"],
)
#: the layer a fault that needs one is planted in, per style
LAYER = {"vaediag": "decoder.fc", "foreign": "decoder_input", "tfcvae": "dense"}
#: each style's own learning rate for fault runs (the TensorFlow tutorial uses 1e-4)
FAULT_LR = {"vaediag": 1e-3, "foreign": 1e-3, "tfcvae": 1e-4}


@dataclass
class Fault:
    kind: str
    spec: str  # KIND@STEP[:k=v]; {layer} is filled per style
    expected: tuple[str, ...]  # detectors meant to catch it (any one counts)
    cause: str  # a regex the finding's summary or cause must match; {layer} filled per style
    gradual: bool = False
    settings: tuple[str, ...] = ()  # vaediag style only
    styles: tuple[str, ...] = ("vaediag", "foreign", "tfcvae")
    #: a planted change that may do no harm: right is no warning when none was measured (the
    #: loss and the pictures no worse after it), a warning naming the cause when some was
    may_be_harmless: bool = False
    #: the run's precision (``train.precision``; own loops' ``--precision``)
    precision: str = "fp32"
    #: a learning rate of its own (None: the style's ``FAULT_LR``)
    lr: float | None = None


FAULTS = [
    Fault("lr_spike", f"lr_spike@{ONSET}:factor=30,steps=10",
          ("loss_spikes", "gradients", "adam"), r"learning rate"),
    Fault("grad_scale", f"grad_scale@{ONSET}:factor=1000,steps=3",
          ("gradients", "loss_spikes"), r"gradient"),
    Fault("ood_batch", f"ood_batch@{ONSET}:steps=30", ("loss_spikes",), r"batch"),
    Fault("nan_grad", f"nan_grad@{ONSET}:layer={{layer}}", ("nonfinite",),
          r"gradient of {layer}\b", settings=("train.on_nonfinite=skip",)),
    Fault("inf_weight", f"inf_weight@{ONSET}:layer={{layer}}", ("nonfinite",),
          r"weight.*{layer}\b|{layer}\.weight", settings=("train.on_nonfinite=stop",)),
    Fault("beta_scale", f"beta_scale@{ONSET}:factor=0.02", ("kl_explosion",), r"KL weight"),
    Fault("adam_eps", f"adam_eps@{ONSET}:eps=1.0,steps=600", ("adam",), r"\beps\b"),
    Fault("adam_eps_drop", f"adam_eps@{ONSET}", ("adam",), r"\beps\b",
          settings=("optim.eps=1e-3",), styles=("vaediag",), may_be_harmless=True),
    Fault("desaturate", f"desaturate@{ONSET}:amount=0.7", ("decoupling",),
          r"colour|sat_ratio|skin|hair|_de\b", styles=("vaediag",)),
    Fault("fade", f"fade@{ONSET}:amount=0.8,steps=400", ("decoupling",),
          r"colour|sat_ratio|skin|hair|_de\b", gradual=True),
    # half precision's own, in float16: the log-variance lifted by a weight edit; exp(logvar)
    # overflows in the KL of the loop that computes it under autocast (vaediag's trainer and
    # the TensorFlow model's MC KL never compute it), and the sample exp(logvar/2) past 22.2
    Fault("logvar_jump", f"logvar_jump@{ONSET}:shift=12", ("nonfinite", "loss_scale"),
          r"exp\(logvar\) passes", styles=("foreign",), precision="fp16"),
    Fault("logvar_jump_z", f"logvar_jump@{ONSET}:shift=24", ("nonfinite", "loss_scale"),
          r"exp\(logvar/2\)", settings=("train.on_nonfinite=stop",),
          styles=("vaediag", "tfcvae"), precision="fp16"),
    # updates lost to weights kept in bfloat16 (vaediag's trainer keeps float32 weights)
    Fault("half_weights", f"half_weights@{ONSET}", ("lost_updates",), r"half precision",
          styles=("foreign", "tfcvae"), precision="bf16", lr=1e-4),
]
#: healthy mixed-precision twins: (precision, seeds) per style; float16 on a CPU is 20-40x
#: slower than float32, so the loops of their own get one float16 seed (a held-out one)
MIXED = {"vaediag": (("bf16", (0, 2)), ("fp16", (0, 2))),
         "foreign": (("bf16", (0, 2)), ("fp16", (2,))),
         "tfcvae": (("bf16", (0, 2)), ("fp16", (2,)))}


@dataclass
class Scenario:
    name: str
    style: str  # vaediag | foreign | tfcvae | preset
    seed: int
    lr: float | None = None
    settings: list[str] = field(default_factory=list)
    fault: Fault | None = None
    preset: str | None = None
    label: Callable[[vaediag.Run], int | None] | None = None
    expected: tuple[str, ...] = ()
    pattern: str | None = None  # natural cases: what the right cause says
    #: natural cases: what the cause must not say (another mechanism's name)
    not_pattern: str | None = None
    #: natural cases: how many steps after the label a finding still counts as found
    after_window: int = NATURAL_WINDOW
    #: a healthy run at the style's own published settings (``PUBLISHED``), not the shared
    #: 32 px setup
    published: bool = False
    #: fp32, or mixed precision: bf16 (autocast) or fp16 (autocast and a GradScaler)
    precision: str = "fp32"

    @property
    def stable(self) -> bool:
        return self.fault is None and self.label is None

    @property
    def held_out(self) -> bool:
        """Tuning seeds: 0 and 1, and their fault-run counterparts 10 and 11."""
        return self.seed not in TUNING_SEEDS and self.seed - 10 not in TUNING_SEEDS

    @property
    def spec(self) -> str | None:
        return self.fault.spec.format(layer=LAYER[self.style]) if self.fault else None

    @property
    def cause(self) -> str | None:
        return self.fault.cause.format(layer=re.escape(LAYER[self.style])) if self.fault \
            else self.pattern


#: healthy runs at each style's own published settings: vaediag's defaults (64 px, its default
#: model and batch), the widely copied VAE's CelebA configuration (64 px, conv blocks 32-512,
#: batch 64, Adam at 5e-3; own_loops.PUBLISHED) and the TensorFlow tutorial's (a 2-dimensional
#: latent, Adam at 1e-4): severity from harm is measured on these
PUBLISHED = {
    "vaediag": ["train.steps=1200", "eval.every_steps=50"],
    "foreign": ["--steps", "600"],
    "tfcvae": ["--steps", "1200"],
}


def pose_lost_at(run: vaediag.Run) -> int | None:
    """Label of the decoupling preset: where the reconstructions lost the faces' pose.

    Ground truth, not a detector: ``factor_angle_err`` is the mean in-plane angle error of the
    grid's reconstructions, measured against the angles toyfaces drew. The onset is the first
    evaluation after the first 500 steps at which it is at least 1.5x its best value so far and
    stays at least 1.5x that best at the next two evaluations.
    """
    ev = run.evals
    steps, err = ev["step"].to_numpy(), ev["factor_angle_err"].to_numpy()
    best = np.fmin.accumulate(err)
    lost = err >= 1.5 * best
    for i in range(len(err) - 2):
        if steps[i] >= 500 and lost[i] and (err[i + 1:i + 3] >= 1.5 * best[i]).all():
            return int(steps[i])
    return None


def memorised_at(run: vaediag.Run) -> int | None:
    """Label of the overfitting preset: where the held-out pictures got worse while the
    training images' kept improving.

    Measured on the pictures, not by a detector: ``ssim`` compares the grid's 8 held-out
    reconstructions with the true images, ``train_ssim`` the 8 fixed training images'. The
    onset is the first evaluation after the first 500 steps at which the held-out SSIM is at
    least 5% below its best so far and stays so at the next two evaluations, while the training
    images' SSIM is above its value at the evaluation of that best (they kept improving).
    """
    ev = run.evals
    steps, ssim, train = (ev[c].to_numpy() for c in ("step", "ssim", "train_ssim"))
    for i in range(len(ssim) - 2):
        best = int(np.nanargmax(ssim[:i + 1]))
        low = 0.95 * ssim[best]
        if steps[i] >= 500 and (ssim[i:i + 3] <= low).all() and train[i] > train[best]:
            return int(steps[i])
    return None


def encodes_nothing(run: vaediag.Run) -> int | None:
    """Label of a run that never learned to encode: the first evaluation after the first 100
    steps, if the grid's images have a KL below 0.1 nats at every evaluation from there on."""
    ev = run.evals
    steps, kl = ev["step"].to_numpy(), ev["eval_kl"].to_numpy()
    after = steps >= 100
    return int(steps[after][0]) if after.any() and (kl[after] < 0.1).all() else None


def colour_visible_at(run: vaediag.Run) -> int | None:
    """Ground truth of a gradual colour fault: the first evaluation after the onset at which
    the grid's saturation ratio is 10% below its median over the evaluations before it."""
    ev = run.evals
    steps, sat = ev["step"].to_numpy(), ev["sat_ratio"].to_numpy()
    before = np.nanmedian(sat[(steps < ONSET) & (steps >= ONSET - 300)])
    hit = np.flatnonzero((steps >= ONSET) & (sat <= 0.9 * before))
    return int(steps[hit[0]]) if hit.size else None


def scenarios(offset: int = 0) -> list[Scenario]:
    """The scenarios; ``offset`` shifts every seed (a fresh set of held-out runs)."""
    out = []
    for k, lr in enumerate(LRS):
        seed = k + offset
        out.append(Scenario(f"stable-vaediag-s{seed}", "vaediag", seed, lr,
                            [*VAEDIAG_VARIANTS[k]]))
        out.append(Scenario(f"stable-foreign-s{seed}", "foreign", seed, lr))
        out.append(Scenario(f"stable-tfcvae-s{seed}", "tfcvae", seed, TFCVAE_LRS[k]))
    for style, mixed in MIXED.items():  # mixed precision: healthy twins
        for precision, seeds in mixed:
            for k in seeds:
                lr = TFCVAE_LRS[k] if style == "tfcvae" else LRS[k]
                out.append(Scenario(f"stable-{style}-{precision}-s{k + offset}", style,
                                    k + offset, lr,
                                    [*VAEDIAG_VARIANTS[k]] if style == "vaediag" else [],
                                    precision=precision))
    for style in PUBLISHED:
        out.append(Scenario(f"published-{style}-s{offset}", style, offset, published=True))
    k = 0
    for fault in FAULTS:
        for style in fault.styles:
            seed = 10 + k % 5 + offset  # fault runs: seeds 10-14 (see held_out)
            k += 1
            out.append(Scenario(f"{fault.kind}-{style}", style, seed,
                                fault.lr or FAULT_LR[style],
                                list(fault.settings) if style == "vaediag" else [], fault,
                                expected=fault.expected, precision=fault.precision))
    out.append(Scenario("collapse-tfcvae-lr5e-3", "tfcvae", 4 + offset, 5e-3, label=encodes_nothing,
                        expected=("latents",), pattern=r"unused|collapse"))
    out.append(Scenario("seed-decoupling", "preset", offset, preset="seed-decoupling",
                        label=pose_lost_at, expected=("decoupling",),
                        pattern=r"KL weight|angle|pose|turn", not_pattern=r"memoris"))
    out.append(Scenario("seed-decoupling-stable", "preset", offset,
                        preset="seed-decoupling-stable"))
    # Memorisation (nothing planted): seed-overfit on 128 and 64 faces, three seeds of the data
    # and of training; the same on 4,096 faces is healthy. The right cause names memorisation
    # and the checkpoint of the best held-out evaluation; found within 2 evaluations of the
    # label. Once at 64 px with the default model, and once with the remedy (augmentation).
    overfit = dict(label=memorised_at, expected=("generalisation",),
                   pattern=r"memoris.*checkpoints/step-", after_window=OVERFIT_EVALS * 200)
    for k in range(3):
        seed = offset + k
        for size in (128, 64):
            out.append(Scenario(f"seed-overfit-n{size}-s{seed}", "preset", seed,
                                preset="seed-overfit", settings=[
                                    f"data.toyfaces_size={size}", f"data.seed={seed}"], **overfit))
        out.append(Scenario(f"seed-overfit-n4096-s{seed}", "preset", seed, preset="seed-overfit",
                            settings=["data.toyfaces_size=4096", f"data.seed={seed}"]))
    out.append(Scenario(f"seed-overfit-64px-s{offset}", "preset", offset, preset="seed-overfit",
                        settings=["data.resolution=64", "model.channels=[32, 48, 64, 128]",
                                  "model.latent_dim=32", f"data.seed={offset}"], **overfit))
    out.append(Scenario("seed-overfit-stable", "preset", offset, preset="seed-overfit-stable",
                        **overfit))
    return out


def train(s: Scenario, run_dir: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if s.style in ("vaediag", "preset"):
        command = [sys.executable, "-m", "vaediag", "train", "--out", str(run_dir),
                   "--overwrite", "--no-progress"]
        if s.preset:
            command += ["--preset", s.preset]
        settings = ([f"train.seed={s.seed}"] if s.preset else
                    [f"train.seed={s.seed}", f"data.seed={s.seed}", *PUBLISHED["vaediag"]]
                    if s.published else
                    [*BASE, f"train.seed={s.seed}", f"data.seed={s.seed}", f"optim.lr={s.lr}"]
                    ) + s.settings
        if s.precision != "fp32":
            settings.append(f"train.precision={s.precision}")
        for setting in settings:
            command += ["--set", setting]
        if s.spec:
            command += ["--inject", s.spec]
    else:
        command = [sys.executable, str(HERE / "own_loops.py"), s.style, "--out", str(run_dir),
                   "--seed", str(s.seed)]
        command += ["--published", *PUBLISHED[s.style]] if s.published else ["--lr", str(s.lr)]
        if s.spec:
            command += ["--fault", s.spec]
        if s.precision != "fp32":
            command += ["--precision", s.precision]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode not in (0, 3):  # 3: stopped by the non-finite policy, still a run
        sys.exit(f"{s.name}: training failed ({proc.returncode}):\n{proc.stderr[-2000:]}")


def visible_at(finding) -> int:
    """The step at which a finding could first have been seen."""
    return finding.compare_steps[-1] if finding.compare_steps else finding.first_step


def online(run_dir: Path, start: int) -> dict[str, tuple[int, object]]:
    """Per detector, the first evaluation step from ``start`` at which analysing the run cut
    there raises a warning or high finding, and that finding."""
    run = vaediag.load_run(run_dir)
    first: dict[str, tuple[int, object]] = {}
    for cut in run.evals["step"]:
        if cut < start:
            continue
        for f in vaediag.analyze(run.until(int(cut))).findings:
            if severity_rank(f.severity) >= 1 and f.detector not in first:
                first[f.detector] = (int(cut), f)
    return first


@dataclass
class Result:
    scenario: Scenario
    analysis: object
    onset: int | None  # fault onset, natural label, or None (stable / not reproduced)
    window: tuple[int, int] = (-1, WINDOW)
    #: detector -> (step seen, finding); from the finished run or, online, from cuts
    seen: dict[str, tuple[int, object]] = field(default_factory=dict)
    path: Path | None = None

    @property
    def healthy(self) -> bool:
        """A stable run, or a natural case whose phenomenon did not appear (no onset)."""
        return self.scenario.stable or (self.scenario.label is not None and self.onset is None)


def evaluate(s: Scenario, run_dir: Path) -> Result:
    analysis = vaediag.analyze(run_dir)
    if s.stable:
        return Result(s, analysis, None, path=run_dir)
    run = vaediag.load_run(run_dir)
    if s.label is not None:
        onset = s.label(run)
        seen = online(run_dir, onset - NATURAL_WINDOW) if onset is not None else {}
        return Result(s, analysis, onset, (-NATURAL_WINDOW, s.after_window), seen, run_dir)
    if s.fault.gradual:
        onset = colour_visible_at(run)
        every = int(np.median(np.diff(run.evals["step"].to_numpy())))
        seen = online(run_dir, ONSET) if onset is not None else {}
        return Result(s, analysis, onset, (ONSET - (onset or ONSET), GRADUAL_EVALS * every),
                      seen, run_dir)
    seen = {}
    for f in sorted(analysis.findings, key=visible_at):
        if severity_rank(f.severity) >= 1 and f.detector not in seen \
                and visible_at(f) - ONSET >= -1:
            seen[f.detector] = (visible_at(f), f)
    return Result(s, analysis, ONSET, (-1, WINDOW), seen, run_dir)


def outcome(r: Result) -> dict:
    """Found or not, by whom, how late, and whether the cause named is the planted one."""
    lo, hi = r.window
    found = {d: (t - r.onset, f) for d, (t, f) in r.seen.items()
             if d in r.scenario.expected and r.onset is not None and lo <= t - r.onset <= hi}
    late = {d: t - r.onset for d, (t, _) in r.seen.items()
            if d in r.scenario.expected and r.onset is not None and t - r.onset > hi}
    pattern = r.scenario.cause

    def names_cause(f) -> bool:
        text = f"{f.summary} {f.cause} {' '.join(f.remedies)}"
        return bool(re.search(pattern, text, re.IGNORECASE | re.DOTALL)) and not (
            r.scenario.not_pattern and re.search(r.scenario.not_pattern, text, re.IGNORECASE))

    cause_ok = None
    if found and pattern:
        cause_ok = any(names_cause(f) for _, f in found.values())
    # planted sudden faults: the incidents of warning or above whose root could be seen in the
    # window (one per fault is the target), and whether the root of the incident holding the
    # finding that found the fault names the planted cause
    sudden = r.scenario.fault is not None and not r.scenario.fault.gradual
    incidents = [] if not sudden else sorted(
        (i for i in r.analysis.incidents if severity_rank(i.severity) >= 1
         and lo <= visible_at(i.root) - r.onset <= hi), key=lambda i: i.first_step)
    holding = [i for i in r.analysis.incidents
               if any(m is f for _, f in found.values() for m in i.members)]
    root_ok = bool(holding) and bool(pattern) and any(names_cause(i.root) for i in holding)
    harm = None
    if r.scenario.fault is not None and r.scenario.fault.may_be_harmless and r.onset is not None:
        harm = measured_harm(r)
        if not harm and not any(severity_rank(f.severity) >= 1 and visible_at(f) >= r.onset - 1
                                for f in r.analysis.findings):
            found = {"(none: no harm)": (0, None)}
            cause_ok = True
    # the verdict's first words: the root of the incident it opens with names the planted cause
    lead = lead_incident(r.analysis)
    verdict_ok = bool(pattern) and lead is not None and names_cause(lead.root)
    if harm is not None and not harm and found:  # right to stay quiet: no incident to score
        root_ok = verdict_ok = True
    return {"found": found, "late": late, "cause_ok": cause_ok, "incidents": incidents,
            "root_ok": root_ok, "verdict_ok": verdict_ok, "harm": harm}


def measured_harm(r: Result) -> dict:
    """What got worse after the onset of a change that may be harmless: the grid's loss and
    quality between the evaluation at the onset and the last (``causes.quality_lost``), and
    the per-step total loss (median of the 100 steps after the onset against the 100
    before, worse by 1% or more)."""
    from vaediag.analysis.causes import quality_lost
    from vaediag.analysis.data import RunData

    data = RunData(vaediag.load_run(r.path))
    steps = data.evals["step"].to_numpy()
    at = int(steps[steps <= r.onset][-1])
    harm = {k: list(v) for k, v in quality_lost(data, at, int(steps[-1])).items()}
    total = data.series("total") if data.has("total") else data.series("recon")
    before = np.nanmedian(total[(data.steps >= r.onset - 100) & (data.steps < r.onset)])
    after = np.nanmedian(total[(data.steps >= r.onset) & (data.steps < r.onset + 100)])
    if after > 1.01 * before:
        harm["total (median of 100 steps)"] = [float(before), float(after)]
    return harm


def early_alarms(r: Result) -> list:
    """Warning/high findings of a fault run visible before the fault began: false alarms."""
    return [f for f in r.analysis.findings
            if severity_rank(f.severity) >= 1 and visible_at(f) < ONSET - 1]


def report(results: list[Result]) -> str:
    lines = []
    for subset, pick in (("tuning seeds", lambda r: not r.scenario.held_out),
                         ("held-out seeds", lambda r: r.scenario.held_out),
                         ("all", lambda r: True)):
        rs = [r for r in results if pick(r)]
        stable = [r for r in rs if r.healthy]
        planted = [r for r in rs if r.scenario.fault is not None]
        # the steps of fault runs before the onset are healthy steps too
        steps = sum(r.analysis.run["steps"] for r in stable) + ONSET * len(planted)
        alarms = [f for r in stable for f in r.analysis.findings if severity_rank(f.severity) >= 1]
        alarms += [f for r in planted for f in early_alarms(r)]
        infos = sum(f.severity == "info" for r in stable for f in r.analysis.findings)
        faulty = [r for r in rs if not r.healthy]
        outs = [outcome(r) for r in faulty]
        found = sum(bool(o["found"]) for o in outs)
        causes = sum(bool(o["cause_ok"]) for o in outs)
        delays = [min(abs(d) for d, _ in o["found"].values()) for o in outs if o["found"]]
        sudden = [o for r, o in zip(faulty, outs, strict=True)
                  if o["found"] and r.scenario.fault and not r.scenario.fault.gradual]
        counts = [len(o["incidents"]) for o in sudden]
        roots = sum(o["root_ok"] for o in sudden)
        leads = sum(o["verdict_ok"] for o in sudden)
        lines.append(
            f"{subset}: {len(stable)} healthy runs + {len(planted)} before their fault, {steps:,} "
            f"healthy steps: {len(alarms)} warning/high "
            f"findings ({len(alarms) / steps * 1e4 if steps else 0:.1f} per 10k steps), "
            f"{infos} info; {len(faulty)} faults: {found} found, {causes} with the right cause"
            + (f", median delay {statistics.median(delays):g} steps" if delays else "")
            + (f"; {len(counts)} sudden planted faults found: {counts.count(1)} as 1 incident, "
               f"{sum(c > 1 for c in counts)} as more (at most {max(counts)}), the root of the "
               f"finding's incident naming the cause in {roots}, the verdict opening with it "
               f"in {leads}" if counts else ""))
    lines.append("")
    lines.append("healthy runs (and fault runs before the onset) with warning/high findings:")
    bad = [(r.scenario.name, f) for r in results if r.healthy
           for f in r.analysis.findings if severity_rank(f.severity) >= 1]
    bad += [(r.scenario.name, f) for r in results if r.scenario.fault is not None
            for f in early_alarms(r)]
    lines += [f"  {n}: {f.severity} {f.kind}@{f.first_step}: {f.summary[:150]}" for n, f in bad]
    lines.append("  (none)" if not bad else "")
    lines.append("faults:")
    for r in results:
        if r.healthy:
            if r.scenario.label is not None:
                lines.append(f"  {r.scenario.name:<34} not reproduced (no onset by its rule): "
                             f"counted as a healthy run")
            continue
        o = outcome(r)
        name = f"{r.scenario.name}{' (held out)' if r.scenario.held_out else ''}"
        if r.onset is None:  # a planted gradual fault that never became visible
            lines.append(f"  {name:<34} NOT REPRODUCED (never visible by its rule)")
            continue
        if o.get("harm") is not None and "(none: no harm)" in o["found"]:
            lines.append(f"  {name:<34} no harm measured after it (the grid's loss and quality "
                         f"no worse, the loss no higher) and no warning: right")
            continue
        if o["found"]:
            d, (delay, f) = min(o["found"].items(), key=lambda kv: abs(kv[1][0]))
            verdict = "cause right" if o["cause_ok"] else f"CAUSE WRONG ({f.cause[:80]})"
            roots = ", ".join(f"{i.root.kind}@{i.first_step}" for i in o["incidents"])
            sudden = r.scenario.fault is not None and not r.scenario.fault.gradual
            lines.append(f"  {name:<34} found by {d} ({f.severity} {f.kind}, {delay:+d} "
                         f"steps from step {r.onset}); {verdict}"
                         + (f"; {len(o['incidents'])} incident(s): {roots}"
                            + ("" if o["root_ok"] else " (ROOT DOES NOT NAME THE CAUSE)")
                            + ("" if o["verdict_ok"] else " (THE VERDICT OPENS WITH ANOTHER "
                               "CAUSE)")
                            if sudden else ""))
        else:
            late = ", ".join(f"{d} ({t:+d})" for d, t in o["late"].items())
            seen = ", ".join(f"{d}@{t}" for d, (t, _) in r.seen.items())
            lines.append(f"  {name:<34} NOT FOUND" + (f"; late: {late}" if late else "")
                         + (f"; other warnings: {seen}" if seen and not late else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--only", nargs="*", help="scenario names (or prefixes) to run")
    parser.add_argument("--reuse", action="store_true",
                        help="analyse runs already in --out instead of training them again")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    parser.add_argument("--seed-offset", type=int, default=0,
                        help="shift every seed: 5 gives a fresh set of held-out runs (seeds 5-9 "
                             "and 15-19), none of them a tuning seed")
    args = parser.parse_args()
    chosen = [s for s in scenarios(args.seed_offset)
              if not args.only or any(s.name.startswith(p) for p in args.only)]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()

        def one(s: Scenario) -> Result:
            run_dir = out / s.name
            if not (args.reuse and (run_dir / "run.json").exists()):
                train(s, run_dir)
            result = evaluate(s, run_dir)
            flagged = [f"{f.severity}:{f.kind}@{visible_at(f)}"
                       for f in result.analysis.sorted_findings() if severity_rank(f.severity) >= 1]
            print(f"{s.name:<30} {time.perf_counter() - started:6.0f} s  "
                  f"{', '.join(flagged) or 'no warnings'}", flush=True)
            return result

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(one, chosen))
        print()
        print(report(results))


if __name__ == "__main__":
    main()
