"""The case study's "is Adam to blame?" by experiment (docs/case-study.md): replays of the
``seed-decoupling`` run from before its decoupling, one remedy each, against the run itself.

Trains the preset (seed 0) unless ``--parent`` names a run, replays it from ``--from`` (the
checkpoint before the decoupling) for ``--steps`` steps with each of ``REPLAYS``, two at a time,
one thread each, analyses every branch, and prints a table: what was found in the replayed
steps, and the pictures' ground truth (the toyfaces pose error) and the evaluation loss and KL
at a few evaluations. ``--figures DIR`` writes the comparison's quality figure and the grids
side by side; ``--report PATH`` the whole comparison as HTML.

    python benchmarks/replays.py [--out DIR] [--parent RUN] [--from 300] [--steps 1700]
                                 [--reuse] [--figures DIR] [--report PATH]

Takes about 15 minutes on 2 CPU cores (about 2 of them the parent).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import vaediag
from vaediag.analysis.findings import severity_rank

#: name: the settings a replay changes ("same" changes nothing: the control)
REPLAYS = {
    "same": [],
    "sgd-1e-4": ["optim.name=sgd", "optim.lr=1e-4"],
    "sgd-1e-3": ["optim.name=sgd", "optim.lr=1e-3"],
    "lr-1e-4": ["optim.lr=1e-4"],
    "eps-1e-6": ["optim.eps=1e-6"],
    "free-bits": ["loss.free_bits=0.5"],
}
STEPS_SHOWN = (400, 800, 1500, 2000)
#: the runs whose grids are stacked in the figure
GRIDS_SHOWN = ("seed-decoupling", "sgd-1e-4", "free-bits")


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def parent_run(out: Path, given: str | None, reuse: bool) -> Path:
    if given:
        return Path(given)
    run_dir = out / "seed-decoupling"
    if reuse and (run_dir / "run.json").exists():
        return run_dir
    command = [sys.executable, "-m", "vaediag", "train", "--preset", "seed-decoupling", "--out",
               str(run_dir), "--overwrite", "--no-progress"]
    subprocess.run(command, check=True, capture_output=True, env=_env())
    return run_dir


def replay(parent: Path, name: str, settings: list[str], start: int, steps: int, out: Path,
           reuse: bool) -> Path:
    branch = out / name
    if reuse and (branch / "run.json").exists():
        return branch
    if branch.exists():
        sys.exit(f"{branch} exists: pass --reuse, or remove it")
    command = [sys.executable, "-m", "vaediag", "replay", str(parent), "--from", str(start),
               "--steps", str(steps), "--out", str(branch), "--no-progress"]
    for setting in settings:
        command += ["--set", setting]
    proc = subprocess.run(command, capture_output=True, text=True, env=_env())
    if proc.returncode not in (0, 3):  # 3: stopped by the non-finite policy, itself a result
        sys.exit(f"replay {name} failed ({proc.returncode}):\n{proc.stderr}")
    return branch


def row(name: str, run_dir: Path, start: int, end: int) -> list[str]:
    """What was found in the replayed steps (start, end], and the numbers at STEPS_SHOWN."""
    run = vaediag.load_run(run_dir)
    found = [f for f in vaediag.analyze(run).sorted_findings()
             if severity_rank(f.severity) >= 1 and f.last_step > start and f.first_step <= end]
    ev = run.evals.set_index("step")

    def at(step: int, column: str) -> str:
        return f"{ev.loc[step, column]:.4g}" if step in ev.index else "-"

    return [name, run.status,
            ", ".join(f"{f.kind} ({f.first_step}-{f.last_step})" for f in found) or "none",
            " / ".join(at(s, "factor_angle_err") for s in STEPS_SHOWN),
            " / ".join(at(s, "eval_kl") for s in STEPS_SHOWN),
            " / ".join(at(s, "eval_recon") for s in STEPS_SHOWN)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/replays"))
    parser.add_argument("--parent", help="an existing seed-decoupling run to replay")
    parser.add_argument("--from", dest="start", type=int, default=300)
    parser.add_argument("--steps", type=int, default=1700)
    parser.add_argument("--reuse", action="store_true", help="keep runs that already exist")
    parser.add_argument("--figures", type=Path, help="write the comparison's figures here")
    parser.add_argument("--report", type=Path, help="write the comparison as HTML here")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    parent = parent_run(args.out, args.parent, args.reuse)
    with ThreadPoolExecutor(2) as pool:
        branches = dict(zip(REPLAYS, pool.map(
            lambda item: replay(parent, item[0], item[1], args.start, args.steps, args.out,
                                args.reuse), REPLAYS.items()), strict=True))
    header = ["run", "status", "warning/high findings in the replayed steps",
              f"pose error at {' / '.join(map(str, STEPS_SHOWN))}", "eval KL", "eval recon"]
    end = args.start + args.steps
    rows = [row("the run itself", parent, args.start, end)]
    rows += [row(f"{name}: {', '.join(REPLAYS[name]) or 'no change'}", path, args.start, end)
             for name, path in branches.items()]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    shown = [parent, *(branches[n] for n in ("sgd-1e-4", "lr-1e-4", "eps-1e-6", "free-bits"))]
    if args.report:
        from vaediag.report.compare import write_comparison

        write_comparison(shown, html=args.report, pdf=None)
        print(f"wrote {args.report}")
    if args.figures:
        from PIL import Image, ImageDraw, ImageFont

        from vaediag.report.compare import build

        args.figures.mkdir(parents=True, exist_ok=True)
        comparison = build(shown)
        for (_, image), name in zip(comparison.figures, ("replays-losses.png",
                                                          "replays-quality.png"), strict=False):
            (args.figures / name).write_bytes(image.data)
            print(f"wrote {args.figures / name}")
        step, grids = comparison.grid_rows[-2] if len(comparison.grid_rows) > 1 else \
            comparison.grid_rows[-1]
        stacked = [(run.name, g) for run, g in zip(comparison.runs, grids, strict=True)
                   if g is not None and run.name in GRIDS_SHOWN]
        pictures = [(name, Image.open(io.BytesIO(g.image.data)).convert("RGB"))
                    for name, g in stacked]
        label, font = 26, ImageFont.load_default(size=16)
        width = max(p.width for _, p in pictures)
        strip = Image.new("RGB", (width, sum(p.height + label for _, p in pictures)), "white")
        draw = ImageDraw.Draw(strip)
        y = 0
        for name, p in pictures:
            draw.text((6, y + 4), f"{name}: {', '.join(REPLAYS.get(name, [])) or 'Adam'}",
                      fill="black", font=font)
            strip.paste(p, (0, y + label))
            y += p.height + label
        path = args.figures / f"replays-grids-{step}.png"
        strip.save(path)
        print(f"wrote {path} ({', '.join(name for name, _ in pictures)})")

if __name__ == "__main__":
    main()
