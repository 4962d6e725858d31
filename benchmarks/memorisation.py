"""The case study's second mechanism (docs/case-study.md): memorisation, set beside the KL
weight's trade, and the attempts at a late KL explosion on a memorised set.

Trains ``seed-overfit`` and its remedy ``seed-overfit-stable`` with each seed, and
``seed-decoupling`` with the first, analyses every run, and prints one row per run: the
held-out and the training images' loss and SSIM at the best held-out evaluation and at the end,
and what vaediag found (the overfitting finding, the part that overfitted, and the cause every
other warning names). ``--attempts`` also trains the KL-explosion attempts listed in
``ATTEMPTS`` and prints the case study's table row for each. Two runs at a time, one thread
each.

    python benchmarks/memorisation.py [--out DIR] [--seeds 0 1 2] [--reuse] [--attempts]
                                      [--figures DIR]

``--figures DIR`` writes, for the first seed, the two mechanisms side by side
(``mechanisms.png``: held-out against training images, loss, SSIM and colour error, for
``seed-decoupling`` and ``seed-overfit``) and the grids of ``seed-overfit`` at its best
held-out evaluation and at the end, and of its remedy at the end.

Takes about 12 minutes on 2 CPU cores with three seeds, 25 more with ``--attempts``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import vaediag

#: attempts at a late KL explosion on a memorised set: name -> (preset, settings)
ATTEMPTS: dict[str, tuple[str, list[str]]] = {
    "128 faces, 20,000 steps (5,000 epochs)": ("seed-overfit", ["train.steps=20000"]),
    "128 faces, batch norm, batch 16": ("seed-overfit", ["model.norm=batch",
                                                         "train.batch_size=16"]),
    "128 faces, learned decoder scale (Gaussian)": ("seed-overfit", [
        "loss.recon=gaussian", "loss.learn_decoder_scale=true"]),
    "64 faces, learned decoder scale, lr 2e-3": ("seed-overfit", [
        "data.toyfaces_size=64", "loss.recon=gaussian", "loss.learn_decoder_scale=true",
        "optim.lr=2e-3"]),
}


def train(name: str, preset: str, settings: list[str], seed: int, out: Path,
          reuse: bool) -> Path:
    run_dir = out / name
    if reuse and (run_dir / "run.json").exists():
        return run_dir
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, "-m", "vaediag", "train", "--preset", preset, "--seed", str(seed),
               "--out", str(run_dir), "--overwrite", "--no-progress"]
    for setting in settings:
        command += ["--set", setting]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{name}: vaediag train failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return run_dir


def _colour(frame, prefix: str = "") -> np.ndarray:
    """The mean of the skin, hair and background colour errors (toyfaces' ground truth)."""
    cols = [f"{prefix}factor_{p}_de" for p in ("skin", "hair", "bg")]
    return frame[cols].to_numpy(dtype=float).mean(1)


def row(run_dir: Path) -> dict:
    run = vaediag.load_run(run_dir)
    analysis = vaediag.analyze(run)
    ev = run.evals[run.evals["step"] >= 100].reset_index(drop=True)
    best = int(ev["eval_recon"].idxmin())
    out = {"run": run_dir.name, "best": int(ev["step"][best])}
    for col in ("eval_recon", "train_eval_recon", "ssim", "train_ssim"):
        out[col] = (float(ev[col][best]), float(ev[col].iloc[-1]))
    colour, train_colour = _colour(ev), _colour(ev, "train_")
    out["colour"] = (float(colour[best]), float(colour[-1]))
    out["train_colour"] = (float(train_colour[best]), float(train_colour[-1]))
    overfit = [f for f in analysis.findings if f.kind == "overfitting"]
    out["overfitting"] = (f"{overfit[0].severity} {overfit[0].first_step}-{overfit[0].last_step}"
                          + (f", {overfit[0].evidence['amortisation'].get('overfitted', '?')}"
                             if "amortisation" in overfit[0].evidence else "")
                          if overfit else "none")
    others = [f for f in analysis.findings
              if f.kind != "overfitting" and f.severity in ("warning", "high")]
    out["others"] = "; ".join(
        f"{f.kind} ({f.severity}): " + ("memorisation" if "memoris" in f.cause else
                                        "KL weight" if "KL weight" in f.cause else f.cause[:50])
        for f in others) or "none"
    return out


def attempt_row(name: str, run_dir: Path) -> str:
    """The case study's KL-explosion table row of one attempt."""
    run = vaediag.load_run(run_dir)
    steps, kl = run.scalars["step"].to_numpy(), run.scalars["kl"].to_numpy()
    early = np.median(kl[(steps >= 500) & (steps < 1000)])
    late = np.median(kl[steps >= steps[-1] - 500])
    blocks = [np.median(kl[(steps >= a) & (steps < a + 250)])
              for a in range(1000, int(steps[-1]) - 249, 250)]
    jump = max((b / a for a, b in itertools.pairwise(blocks) if a > 0), default=1.0)
    ev = run.evals.set_index("step")
    ssim0 = ev["ssim"].loc[ev.index[ev.index >= 500][0]]
    flagged = sorted({f.kind for f in vaediag.analyze(run).findings
                      if f.severity in ("warning", "high")})
    return (f"| {name} | {int(steps[-1]) + 1:,} | {early:.3g} -> {late:.3g} | {jump:.2f} | "
            f"{ssim0:.2f} -> {ev['ssim'].iloc[-1]:.2f} | {', '.join(flagged) or 'none'} |")


MECHANISMS = (("eval_recon", "train_eval_recon", "reconstruction loss"),
              ("ssim", "train_ssim", "SSIM"),
              ("colour", "train_colour", "colour error (CIEDE2000)"))


def write_figures(runs: dict[str, Path], into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.6), sharex="row")
    for r, (title, run_dir) in enumerate((("seed-decoupling: the KL weight's trade",
                                           runs["seed-decoupling"]),
                                          ("seed-overfit: memorisation", runs["seed-overfit"]))):
        ev = vaediag.load_run(run_dir).evals
        ev = ev[ev["step"] >= 100]
        series = {"colour": _colour(ev), "train_colour": _colour(ev, "train_")}
        for ax, (held, train, label) in zip(axes[r], MECHANISMS, strict=True):
            ax.plot(ev["step"], series.get(held, ev.get(held)), "-", lw=1.2, label="held-out 8")
            ax.plot(ev["step"], series.get(train, ev.get(train)), "--", lw=1.2,
                    label="training 8")
            ax.set_title(f"{title}\n{label}" if ax is axes[r][0] else label, fontsize=9)
        axes[r][0].legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(into / "mechanisms.png", dpi=110)
    plt.close(fig)
    for preset in ("seed-overfit", "seed-overfit-stable"):
        run = vaediag.load_run(runs[preset])
        ev = run.evals[run.evals["step"] >= 100].reset_index(drop=True)
        picks = [int(ev["step"].iloc[-1])]
        if preset == "seed-overfit":
            picks.insert(0, int(ev["step"][int(ev["eval_recon"].idxmin())]))
        for step in picks:
            shutil.copyfile(runs[preset] / "grids" / f"step-{step:08d}.png",
                            into / f"grid-{preset}-{step}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reuse", action="store_true", help="keep finished runs in --out")
    parser.add_argument("--attempts", action="store_true", help="also the KL attempts")
    parser.add_argument("--figures", type=Path, help="write the case study's pictures here")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="vaediag-memorisation-"))
    first = args.seeds[0]
    jobs = [(f"{p}-seed{s}", p, [], s) for p in ("seed-overfit", "seed-overfit-stable")
            for s in args.seeds]
    jobs.append((f"seed-decoupling-seed{first}", "seed-decoupling", [], first))
    if args.attempts:
        jobs += [(f"attempt-{i}", preset, settings, first)
                 for i, (preset, settings) in enumerate(ATTEMPTS.values())]
    with ThreadPoolExecutor(2) as pool:
        dirs = dict(zip([j[0] for j in jobs],
                        pool.map(lambda j: train(*j, out, args.reuse), jobs), strict=True))
    head = ("run", "best held-out step", "held-out loss best -> end",
            "training loss best -> end", "held-out SSIM", "training SSIM",
            "held-out colour err", "training colour err", "overfitting", "other warnings")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, run_dir in dirs.items():
        if name.startswith("attempt-"):
            continue
        r = row(run_dir)
        pair = lambda v, d=4: f"{v[0]:.{d}g} -> {v[1]:.{d}g}"  # noqa: E731
        print(f"| {r['run']} | {r['best']:,} | {pair(r['eval_recon'], 5)} | "
              f"{pair(r['train_eval_recon'], 5)} | {pair(r['ssim'], 3)} | "
              f"{pair(r['train_ssim'], 3)} | {pair(r['colour'], 3)} | "
              f"{pair(r['train_colour'], 3)} | {r['overfitting']} | {r['others']} |")
    if args.attempts:
        print()
        print("| attempt | steps | KL | largest jump | SSIM | warning/high findings |")
        print("|---|---|---|---|---|---|")
        for i, name in enumerate(ATTEMPTS):
            print(attempt_row(name, dirs[f"attempt-{i}"]))
    if args.figures:
        write_figures({"seed-decoupling": dirs[f"seed-decoupling-seed{first}"],
                       "seed-overfit": dirs[f"seed-overfit-seed{first}"],
                       "seed-overfit-stable": dirs[f"seed-overfit-stable-seed{first}"]},
                      args.figures)
    print(f"runs in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
