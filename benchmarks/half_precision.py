"""The case study's question in half precision (docs/case-study.md): is training in float16 or
bfloat16 a natural route to a late KL explosion?

Trains each attempt in ``ATTEMPTS`` in float32, bfloat16 and float16 (``train.precision``:
autocast, and float16's GradScaler) with the same seed, and prints one row per run in the case
study's KL-explosion table (the KL's median over steps 500-1,000 against the last 500 steps, the
largest ratio of consecutive 250-step KL medians after step 1,000, SSIM, the warning and high
findings), with what the loss scaler did: its skips after its calibration and its lowest scale.

    python benchmarks/half_precision.py [--out DIR] [--reuse] [--precisions fp32 bf16 fp16]

Takes about 2 hours on 2 CPU cores, nearly all of it the two float16 runs (float16
convolutions are slow on a CPU; bfloat16 and float32 take 2-3 minutes a run).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from memorisation import attempt_row

import vaediag

#: the case study's setup without a preset (presets.py's ``_CASE_STUDY``), beta 1
CASE = ["data.resolution=32", "data.toyfaces_size=4096", "data.val_size=128",
        "model.channels=[16,32,64]", "model.latent_dim=16", "train.steps=4000",
        "train.batch_size=32", "eval.every_steps=100"]
#: name -> (preset or None, settings): the case study's run, and the attempt that came closest
#: to a late KL explosion in float32 (a learned decoder scale: the KL's effective weight falls),
#: 2,500 steps (float16 on a CPU is slow)
ATTEMPTS: dict[str, tuple[str | None, list[str]]] = {
    "seed-decoupling": ("seed-decoupling", []),
    "learned-scale": (None, [*CASE, "loss.recon=gaussian", "loss.learn_decoder_scale=true",
                             "train.steps=2500"]),
}
SEED = 0


def train(name: str, precision: str, out: Path, reuse: bool) -> Path:
    run_dir = out / f"{name}-{precision}"
    if reuse and (run_dir / "run.json").exists():
        return run_dir
    preset, settings = ATTEMPTS[name]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, "-m", "vaediag", "train", "--seed", str(SEED), "--out",
               str(run_dir), "--overwrite", "--no-progress"]
    if preset:
        command += ["--preset", preset]
    for setting in [*settings, f"train.precision={precision}"]:
        command += ["--set", setting]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode not in (0, 3):
        sys.exit(f"{name} ({precision}): vaediag train failed ({proc.returncode}):\n"
                 f"{proc.stderr[-2000:]}")
    return run_dir


def scaler(run_dir: Path) -> str:
    """The loss scaler's skips after its calibration and its lowest scale after it."""
    s = vaediag.load_run(run_dir).scalars
    if "scaler_skipped" not in s.columns:
        return "-"
    skipped = s["scaler_skipped"].to_numpy() == 1
    kept = np.flatnonzero(~skipped)
    after = kept[0] if len(kept) else len(skipped)
    lowest = float(np.nanmin(s["loss_scale"].to_numpy()[after:])) if after < len(s) else np.nan
    return f"{int(skipped[:after].sum())} + {int(skipped[after:].sum())} / {lowest:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true", help="keep finished runs in --out")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"],
                        choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="vaediag-half-precision-"))
    jobs = [(name, p) for name in ATTEMPTS for p in args.precisions]
    with ThreadPoolExecutor(2) as pool:
        dirs = list(pool.map(lambda job: train(*job, out, args.reuse), jobs))
    print("| attempt | steps | KL | largest jump | SSIM | warning/high findings "
          "| scaler: calibration + later skips / lowest scale |")
    print("|---|---|---|---|---|---|---|")
    for (name, precision), run_dir in zip(jobs, dirs, strict=True):
        print(attempt_row(f"{name}, {precision}", run_dir) + f" {scaler(run_dir)} |")
    print(f"runs in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
