"""Probe overhead: the default 64x64 model trained with probes off, cheap, standard and full.

One training run, interleaved step by step: the loop is the trainer's (batch, forward, loss,
backward, Monitor.after_backward, optimizer step, Monitor.after_step), and each step is recorded
by the Monitor of the next preset in rotation (off, cheap, standard, full, off, ...). Every
preset thus sees the same training work under the same machine conditions, one step apart;
on a shared machine whose speed drifts by tens of percent over seconds, that is the only way to
measure a few percent. Each step releases its own tensors (and any retained graph) before its
time is taken, so no preset pays for the previous one's cleanup. Reported: the median wall time
of a whole step per preset and its ratio to probes off; the Monitor's own time per step; the
cost of one evaluation per preset (grid and evaluation probes, timed separately); and the
process's resident memory over the run, to check that probes hold no per-step state.

    python benchmarks/overhead.py [--steps 600]

Targets (docs/probes.md): standard <= 1.05x and cheap <= 1.02x the median step of off.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vaediag.config import build_config
from vaediag.data import load_dataset
from vaediag.losses import loss_terms
from vaediag.model import ConvVAE
from vaediag.monitor import Monitor
from vaediag.probes import build
from vaediag.trainer import EpochOrder, build_optimizer

PRESETS = ("off", "cheap", "standard", "full")
_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE_MB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="steps in all (all presets)")
    parser.add_argument("--evals", type=int, default=3, help="evaluations timed per preset")
    args = parser.parse_args()

    config = build_config(overrides=["data.toyfaces_size=2048"])
    data = load_dataset(config.data)
    torch.manual_seed(0)
    model = ConvVAE.from_config(config)
    optimizer = build_optimizer(model, config)
    order = EpochOrder(len(data.train), config.train.batch_size, seed=0)
    images = torch.from_numpy(data.train)
    sampler = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory() as tmp:
        monitors = {
            p: Monitor(Path(tmp) / p, model, optimizer, eval_images=data.val[:8],
                       metric_images=data.val[:64], eval_every=10**9, probes=build(p),
                       eval_factors=data.val_factors)
            for p in PRESETS
        }
        times: dict[str, list[float]] = {p: [] for p in PRESETS}
        monitor_times: dict[str, list[float]] = {p: [] for p in PRESETS}
        memory = []
        for step in range(args.steps):
            preset = PRESETS[step % len(PRESETS)]
            mon = monitors[preset]
            t0 = time.perf_counter()
            x = images[order.batch(step)].float().div_(255.0)
            out = model(x, generator=sampler)
            terms = loss_terms(out.logits, x, out.mu, out.logvar, out.z, config.loss, 1.0)
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward(retain_graph=mon.wants_graph(step))
            tm = time.perf_counter()
            mon.after_backward(step, recon=terms.recon, kl=terms.kl, total=terms.total,
                               beta=1.0, mu=out.mu, logvar=out.logvar,
                               kl_term=terms.kl_penalty)
            own = time.perf_counter() - tm
            optimizer.step()
            tm = time.perf_counter()
            mon.after_step(step)
            monitor_times[preset].append(own + time.perf_counter() - tm)
            del x, out, terms  # each step frees its own graph, inside its own timing
            times[preset].append(time.perf_counter() - t0)
            memory.append(rss_mb())
            if step and step % 100 == 0:
                print(f"step {step}/{args.steps}", flush=True)
        eval_times = {p: [] for p in PRESETS}
        for i in range(args.evals * len(PRESETS)):
            preset = PRESETS[i % len(PRESETS)]
            t0 = time.perf_counter()
            monitors[preset].evaluate(args.steps + i)
            eval_times[preset].append(time.perf_counter() - t0)
        for mon in monitors.values():
            mon.close()

    warm = 5
    median = {p: statistics.median(v[warm:]) for p, v in times.items()}
    print(f"\n64x64, batch 64, default model ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters), {torch.get_num_threads()} threads, {args.steps} steps interleaved "
          f"({len(times['off'])} per preset)")
    print(f"{'preset':<10}{'median step (ms)':>18}{'ratio vs off':>14}{'mean step (ms)':>16}"
          f"{'Monitor per step (ms)':>23}{'one evaluation (ms)':>21}")
    for p in PRESETS:
        mean = statistics.fmean(times[p][warm:])
        own = statistics.median(monitor_times[p][warm:])
        print(f"{p:<10}{median[p] * 1e3:>18.1f}{median[p] / median['off']:>14.3f}"
              f"{mean * 1e3:>16.1f}{own * 1e3:>23.2f}"
              f"{statistics.median(eval_times[p]) * 1e3:>21.0f}")
    marks = [len(memory) // 4, len(memory) // 2, 3 * len(memory) // 4, len(memory) - 1]
    print("\nresident memory: " + ", ".join(f"{memory[i]:.1f} MB at step {i}" for i in marks)
          + f" ({memory[-1] - memory[marks[0]]:+.1f} MB over the last three quarters)")


if __name__ == "__main__":
    main()
