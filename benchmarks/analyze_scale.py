"""Analysis and reports at scale: ``vaediag analyze`` on a synthetic run of 1,000,000 steps.

The run is laid out as ``vaediag train`` writes it: per-step rows flushed 50 at a time (and
compacted every 10,000), with the columns the ``standard`` probe preset records (losses,
gradient norms of 8 layers every step, Adam's state and update ratios every 4 steps, 16 latent
dimensions: about 100 columns), an evaluation with its grid image every 500 steps, and three
planted events (a loss spike at 30%, a gradient explosion at 50%, a KL explosion at 70% of the
run). Each command runs in a child process, ``--repeats`` times; reported are the median wall
time and the largest peak resident memory of:

- the analysis alone (``--no-html --no-pdf --no-write``),
- the whole command (analysis, findings.json, HTML and PDF reports), and the reports' share
  (whole minus analysis),

and whether the three planted events were found.

    python benchmarks/analyze_scale.py [--steps 1000000] [--repeats 3]

Targets on 2 CPU cores: analysis < 5 s and < 1 GB; reports < 10 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vaediag.testing import standard_evals, standard_scalars, write_run

#: runs the CLI in the child and prints its own peak resident memory last, on stderr
CHILD = ("import resource, sys\n"
         "from vaediag.cli import main\n"
         "code = main(sys.argv[1:])\n"
         "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
         "sys.exit(code)\n")


def timed(args: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak GB, stdout) of ``vaediag ARGS`` in a fresh interpreter."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"vaediag {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    peak_kb = int(proc.stderr.strip().splitlines()[-1].split()[1])
    return wall, peak_kb / 2**20, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = args.steps
    spike, burst, shift = int(0.3 * n), int(0.5 * n), int(0.7 * n)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        cols = standard_scalars(n, seed=0, optimizer_every=4)
        cols["recon"][spike:spike + 5] *= 3
        cols["layer.grad_norm/decoder.out"][burst] *= 1000
        cols["kl"][shift:] *= 8
        cols["total"] = cols["recon"] + cols["kl"]
        eval_steps = cols["step"][::args.eval_every]
        run = write_run(Path(tmp) / "big", cols, standard_evals(eval_steps, seed=0),
                        grids=eval_steps, chunk=50)
        columns = len(cols)
        del cols
        size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
        print(f"wrote {n:,} steps x {columns} columns and {len(eval_steps):,} evaluations "
              f"with grids ({size / 2**20:.0f} MB on disk) in "
              f"{time.perf_counter() - started:.0f} s")

        analysis, whole = [], []
        for _ in range(args.repeats):
            analysis.append(timed(["analyze", str(run), "--no-html", "--no-pdf", "--no-write",
                                   "--json"]))
            whole.append(timed(["analyze", str(run)]))
        a_wall = statistics.median(w for w, _, _ in analysis)
        w_wall = statistics.median(w for w, _, _ in whole)
        a_peak = max(p for _, p, _ in analysis)
        w_peak = max(p for _, p, _ in whole)
        html, pdf = run / "report.html", run / "report.pdf"
        print(f"median of {args.repeats} runs, each in a fresh process:")
        print(f"  analysis alone:              {a_wall:5.1f} s, peak {a_peak:.2f} GB   "
              f"(targets < 5 s, < 1 GB)   all: "
              + ", ".join(f"{w:.1f}" for w, _, _ in analysis))
        print(f"  analysis, HTML and PDF:      {w_wall:5.1f} s, peak {w_peak:.2f} GB   all: "
              + ", ".join(f"{w:.1f}" for w, _, _ in whole))
        print(f"  the reports (the difference): {w_wall - a_wall:4.1f} s   (target < 10 s); "
              f"report.html {html.stat().st_size / 2**20:.1f} MB, "
              f"report.pdf {pdf.stat().st_size / 2**20:.1f} MB")
        found = json.loads(analysis[0][2])["findings"]
        for kind, at in (("loss_spike", spike), ("grad_explosion", burst),
                         ("kl_explosion", shift)):
            hits = [f["first_step"] for f in found if f["kind"] == kind
                    and abs(f["first_step"] - at) <= 50]
            print(f"  {kind} planted at {at:,}: "
                  + (f"found at {hits[0]:,}" if hits else "NOT FOUND"))
        others = [f"{f['severity']}:{f['kind']}@{f['first_step']}" for f in found
                  if not any(abs(f["first_step"] - at) <= 50 for at in (spike, burst, shift))]
        print(f"  other findings: {', '.join(others) or 'none'}")


if __name__ == "__main__":
    main()
