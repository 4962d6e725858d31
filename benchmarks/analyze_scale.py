"""Analysis at scale: ``vaediag analyze`` on a synthetic run of 1,000,000 steps.

The run has the columns the ``standard`` probe preset records at every step (losses, gradient
norms and Adam's state for 8 layers, 16 latent dimensions: about 100 columns) and an evaluation
every 500 steps, with three planted events (a loss spike at 300,000, a gradient explosion at
500,000 and a KL explosion at 700,000). The command runs in a child process; reported are its
wall time and peak resident memory, and whether the three events were found.

    python benchmarks/analyze_scale.py [--steps 1000000]

Targets: under 30 s and under 4 GB on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vaediag.testing import standard_evals, standard_scalars, write_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--eval-every", type=int, default=500)
    args = parser.parse_args()
    n = args.steps
    spike, burst, shift = int(0.3 * n), int(0.5 * n), int(0.7 * n)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        cols = standard_scalars(n, seed=0)
        cols["recon"][spike:spike + 5] *= 3
        cols["layer.grad_norm/decoder.out"][burst] *= 1000
        cols["kl"][shift:] *= 8
        cols["total"] = cols["recon"] + cols["kl"]
        run = write_run(Path(tmp) / "big", cols,
                        standard_evals(cols["step"][::args.eval_every], seed=0))
        columns = len(cols)
        del cols
        size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
        print(f"wrote {n:,} steps x {columns} columns ({size / 2**20:.0f} MB on disk) in "
              f"{time.perf_counter() - started:.0f} s")

        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "vaediag", "analyze", str(run), "--json"],
                              capture_output=True, text=True)
        wall = time.perf_counter() - started
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        if proc.returncode != 0:
            sys.exit(f"analyze failed ({proc.returncode}): {proc.stderr}")
        found = json.loads(proc.stdout)["findings"]
        print(f"vaediag analyze: {wall:.1f} s wall, peak RSS {peak_gb:.2f} GB "
              f"(targets: < 30 s, < 4 GB)")
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
