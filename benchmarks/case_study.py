"""The case study's numbers (docs/case-study.md): the seed presets over several training seeds.

Trains ``seed-decoupling`` and its remedy ``seed-decoupling-stable`` with each seed, analyses
every run, and prints one row per run: the loss and the pictures' ground truth (the toyfaces
factors: pose error, skin colour error) at an early evaluation (``EARLY``, before the KL weight
has risen far) and at the end, and what vaediag found. Two runs at a time, one thread each.

    python benchmarks/case_study.py [--out DIR] [--seeds 0 1 2] [--reuse] [--markdown]
                                    [--figures DIR]

``--figures DIR`` also writes the case study's pictures for the first seed: the two presets'
curves side by side (``curves.png``), the grids at ``EARLY`` and at the end
(``grid-PRESET-STEP.png``) and the report's loss-versus-quality figure for ``seed-decoupling``.

Takes about 8 minutes on 2 CPU cores with three seeds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib.pyplot as plt

import vaediag
from vaediag.report import figures

PRESETS = ("seed-decoupling", "seed-decoupling-stable")
EARLY = 700
COLUMNS = ("eval_recon", "eval_kl", "factor_angle_err", "factor_turn_err", "factor_skin_de",
           "ssim", "active_units")


def train(preset: str, seed: int, out: Path, reuse: bool) -> Path:
    run_dir = out / f"{preset}-seed{seed}"
    if reuse and (run_dir / "run.json").exists():
        return run_dir
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, "-m", "vaediag", "train", "--preset", preset, "--seed", str(seed),
               "--out", str(run_dir), "--overwrite", "--no-progress"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{preset} seed {seed}: vaediag train failed ({proc.returncode}):\n{proc.stderr}")
    return run_dir


def row(run_dir: Path) -> dict:
    run = vaediag.load_run(run_dir)
    analysis = vaediag.analyze(run)
    ev = run.evals.set_index("step")
    early, last = ev.loc[EARLY], ev.iloc[-1]
    out = {"run": run_dir.name}
    for col in COLUMNS:
        out[f"{col}@{EARLY}"] = float(early[col])
        out[f"{col}@end"] = float(last[col])
    flagged = [f for f in analysis.findings if f.severity in ("warning", "high")]
    out["findings"] = ", ".join(f"{f.kind} ({f.severity}, {f.first_step}-{f.last_step})"
                                for f in flagged) or "none"
    return out


CURVES = (("eval_recon", "eval reconstruction loss (8 grid images)"),
          ("eval_kl", "KL of the grid images (nats)"),
          ("factor_angle_err", "pose: angle error (degrees)"),
          ("factor_turn_err", "pose: turn error (range -1..1)"),
          ("factor_skin_de", "skin colour error (CIEDE2000)"),
          ("ssim", "SSIM"))


def write_figures(run_dirs: dict[str, Path], into: Path) -> None:
    """The case study's pictures from one run of each preset."""
    into.mkdir(parents=True, exist_ok=True)
    runs = {p: vaediag.load_run(d) for p, d in run_dirs.items()}
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.6), sharex=True)
    for ax, (col, title) in zip(axes.flat, CURVES, strict=True):
        for (preset, run), style in zip(runs.items(), ("-", "--"), strict=False):
            ev = run.evals
            ax.plot(ev["step"], ev[col], style, lw=1.2, label=preset)
        ax.set_title(title, fontsize=9)
        ax.axvline(EARLY, color="0.6", lw=0.8, ls=":")
    beta = next(iter(runs.values())).scalars[["step", "beta"]].iloc[::20]
    twin = axes.flat[1].twinx()
    twin.plot(beta["step"], beta["beta"], color="0.5", lw=0.8)
    twin.set_ylabel("KL weight (beta, grey)", fontsize=8)
    axes.flat[0].legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(into / "curves.png", dpi=110)
    plt.close(fig)
    for preset, run in runs.items():
        last = int(run.evals["step"].iloc[-1])
        for step in (EARLY, last):
            shutil.copyfile(Path(run_dirs[preset]) / "grids" / f"step-{step:08d}.png",
                            into / f"grid-{preset}-{step}.png")
    first = next(iter(runs))
    fig = figures.loss_vs_quality(runs[first].scalars, runs[first].evals,
                                  vaediag.analyze(runs[first]))
    fig.savefig(into / f"loss-vs-quality-{first}.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reuse", action="store_true", help="keep finished runs in --out")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--figures", type=Path, help="write the case study's pictures here")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="vaediag-case-study-"))
    jobs = [(p, s) for p in PRESETS for s in args.seeds]
    with ThreadPoolExecutor(2) as pool:
        run_dirs = list(pool.map(lambda job: train(*job, out, args.reuse), jobs))
    rows = [row(d) for d in run_dirs]
    if args.figures:
        write_figures({p: d for (p, s), d in zip(jobs, run_dirs, strict=True)
                       if s == args.seeds[0]}, args.figures)
    short = {"eval_recon": "loss", "eval_kl": "KL", "factor_angle_err": "angle err",
             "factor_turn_err": "turn err", "factor_skin_de": "skin dE", "ssim": "SSIM",
             "active_units": "active"}
    head = ["run"] + [f"{short[c]} {EARLY} -> end" for c in COLUMNS] + ["warning/high findings"]
    lines = []
    for r in rows:
        cells = [r["run"]] + [f"{r[f'{c}@{EARLY}']:.4g} -> {r[f'{c}@end']:.4g}" for c in COLUMNS]
        lines.append([*cells, r["findings"]])
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for cells in lines:
            print("| " + " | ".join(cells) + " |")
    else:
        for cells in lines:
            print("  ".join(cells))
    print(f"runs in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
