"""Report generation at scale: ``vaediag analyze`` with both reports on a synthetic run of
100,000 steps (the ``standard`` probe columns, an evaluation with its grid every 500 steps,
a loss spike and a KL explosion planted).

Reported: the wall time of the whole command (analysis, HTML and PDF) in a child process, the
time of the analysis alone (``--no-html --no-pdf``) measured the same way, and the size of the
two reports.

    python benchmarks/report_speed.py [--steps 100000]

Target: under 30 s on 2 CPU cores for the whole command.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vaediag.testing import standard_evals, standard_scalars, write_run


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {proc.stderr}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--eval-every", type=int, default=500)
    args = parser.parse_args()
    n = args.steps
    with tempfile.TemporaryDirectory() as tmp:
        cols = standard_scalars(n, seed=0)
        cols["recon"][n // 3:n // 3 + 5] *= 3
        cols["kl"][2 * n // 3:] *= 8
        cols["total"] = cols["recon"] + cols["kl"]
        eval_steps = cols["step"][::args.eval_every]
        run = write_run(Path(tmp) / "big", cols, standard_evals(eval_steps, seed=0),
                        grids=eval_steps)
        base = [sys.executable, "-m", "vaediag", "analyze", str(run)]
        analysis_only = timed([*base, "--no-html", "--no-pdf"])
        whole = timed(base)
        html, pdf = run / "report.html", run / "report.pdf"
        print(f"{n:,} steps, {len(eval_steps)} evaluations with grids")
        print(f"vaediag analyze, analysis only:        {analysis_only:5.1f} s")
        print(f"vaediag analyze, with HTML and PDF:    {whole:5.1f} s  (target < 30 s)")
        print(f"report.html {html.stat().st_size / 2**20:.1f} MB, "
              f"report.pdf {pdf.stat().st_size / 2**20:.1f} MB")


if __name__ == "__main__":
    main()
