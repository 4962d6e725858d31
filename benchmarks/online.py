"""The cost of findings while training (:class:`vaediag.monitor.online.OnlineAnalysis`).

A synthetic run of ``--steps`` steps (default 100,000) with the ``standard`` columns and an
evaluation every 500 steps, written as the trainer writes it. Measured:

- in the training process: what asking for an analysis costs at an evaluation
  (``evaluated``), and what looking for replies costs at every step (``poll``), idle and while
  the child works;
- in the child process: the wall time of one analysis of the run cut at an evaluation, at a
  quarter, half, three quarters and all of the run (the first also starts the child), and
  whether the planted KL explosion is reported.

    python benchmarks/online.py [--steps 100000]

Target: the training process pays microseconds per step and per evaluation; the analysis takes
its own core and never blocks a step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from vaediag.monitor.online import OnlineAnalysis
from vaediag.testing import standard_evals, standard_scalars, write_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--eval-every", type=int, default=500)
    args = parser.parse_args()
    n = args.steps
    with tempfile.TemporaryDirectory() as tmp:
        cols = standard_scalars(n, optimizer_every=4)
        cols["kl"][int(0.7 * n):] *= 10
        cols["total"] = cols["recon"] + cols["kl"]
        path = write_run(Path(tmp) / "run", cols,
                         standard_evals(cols["step"][::args.eval_every]), chunk=10_000)
        found: list[str] = []
        online = OnlineAnalysis(path, lambda text, f, at: found.append(f["kind"]))

        calls = 100_000
        started = time.perf_counter()
        for _ in range(calls):
            online.poll()
        idle_us = (time.perf_counter() - started) / calls * 1e6

        walls, asks, busy = [], [], []
        for fraction in (0.25, 0.5, 0.75, 1.0):
            step = int(fraction * n) // args.eval_every * args.eval_every
            started = time.perf_counter()
            online.evaluated(step)
            asks.append((time.perf_counter() - started) * 1e6)
            polls = 0
            poll_time = 0.0
            while online.analysed_to != step and online.failed is None:
                t = time.perf_counter()
                online.poll()
                poll_time += time.perf_counter() - t
                polls += 1
                time.sleep(0.001)
            walls.append(time.perf_counter() - started)
            busy.append(poll_time / max(polls, 1) * 1e6)
        online.close()
        if online.failed:
            raise SystemExit(f"the analysis failed: {online.failed}")
        print(f"{n:,} steps, an evaluation every {args.eval_every}:")
        print(f"  training process: evaluated() {statistics.median(asks):.0f} us per "
              f"evaluation (first, starting the child: {asks[0]:.0f} us); poll() "
              f"{idle_us:.2f} us per step idle, {statistics.median(busy):.1f} us while the "
              f"child works")
        print("  child: one analysis of the run cut at "
              + ", ".join(f"{int(f * n):,} steps {w:.2f} s" for f, w in
                          zip((0.25, 0.5, 0.75, 1.0), walls, strict=True))
              + " (the first includes starting the child)")
        print(f"  the planted KL explosion reported: {'kl_explosion' in found} "
              f"(findings reported: {', '.join(sorted(set(found))) or 'none'})")


if __name__ == "__main__":
    main()
