"""Probe overhead: the default model trained with probes off, cheap, standard and full, at
32 and 64 px.

One training run per resolution, interleaved step by step: the loop is the trainer's (batch,
forward, loss, backward, Monitor.after_backward, optimizer step, Monitor.after_step), and each
step is taken by the next entry in rotation: a plain step (no Monitor), a step that logs what
``off`` records by hand in the fewest operations (``by hand``: one fused gradient norm, one
stack, one read; the floor under ``off``), then a step recorded by the Monitor of each preset
(off, cheap, standard, full). Each Monitor sees steps 0, 1, 2, ... of its own, so its probes
run on their own cadence. Every entry thus sees the same training work under the same machine
conditions, one step apart; on a shared machine whose speed drifts by tens of percent over
seconds, that is the only way to measure a percent. Each step releases its own tensors (and
any retained graph) before its time is taken, so no preset pays for the previous one's
cleanup.

Reported per entry: the mean wall time of a whole step (what a run's length is made of) and
its ratio to the plain step and to probes off, the same for the median step, the Monitor's
own CPU time per step (inside ``after_backward`` and ``after_step``: median, mean and 99th
percentile; and each probe's share, its ``compute`` and ``before_step`` summed over the steps
and divided by them), the cost of one evaluation (the grid's 8 held-out images and 8 fixed
training images, as the trainer evaluates them), the amortisation-gap probe's share of it, and
the process's resident memory over the run (probes must hold no per-step state). On a GPU
(used when CUDA is available, or with --device), the number of device synchronisations per
step (torch.cuda.set_sync_debug_mode) is counted too.

Then the Monitor's calls alone (``--warm-calls``, 2,000 per entry): ``after_backward`` and
``after_step`` of each preset in turn, and ``by hand``, repeated on one step's gradients with
no training between them. A backward pass leaves the CPU's caches cold, so inside the loop the
same Python and the same small operations take several times as long; warm, the figure is the
Monitor's own work as a host that only launches kernels would see it (on a CPU the probes'
arithmetic is still in it). ``--set`` overrides the config, e.g. a narrow model whose
arithmetic costs next to nothing, which leaves the Monitor's fixed cost per step:
``--set 'model.channels=[8,8,8,8]' model.group_norm_groups=1 model.latent_dim=8``.

    python benchmarks/overhead.py [--steps 2400] [--resolutions 32 64] [--device cpu]
                                  [--read-after-step] [--warm-calls 2000] [--keep DIR]
                                  [--set KEY=VALUE ...]

``--read-after-step``: every Monitor with ``read_before_step=False`` (nothing read from the
device during a step: what ``vaediag train`` does with ``train.on_nonfinite = "continue"``).

Targets: cheap <= 1.01x, standard <= 1.03x and full <= 1.2x the mean step of off, and
standard <= 1.02x the plain step; the Monitor's own time per step in the loop, at 32 px, as a
multiple of ``by hand``'s measured in the same run (the floor): off <= 1.5x, standard <= 3x
(``FLOOR_TARGETS``; median and mean both reported).

``--keep DIR`` keeps the timed runs (``DIR/<resolution>px/<preset>``), to compare what two
versions of vaediag record on the same steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from vaediag.config import build_config
from vaediag.data import load_dataset, train_sample
from vaediag.losses import loss_terms
from vaediag.model import ConvVAE
from vaediag.monitor import Monitor
from vaediag.monitor.evaluation import Evaluator
from vaediag.probes import PRESETS as PROBE_PRESETS
from vaediag.probes import build
from vaediag.probes.amortisation import AmortisationGap
from vaediag.trainer import EpochOrder, _eval_loss_fn, build_optimizer

PRESETS = tuple(PROBE_PRESETS)
#: what the steps rotate through: no Monitor, the same statistics as ``off`` logged by hand in
#: the fewest operations (the floor of what ``off`` records), and each preset
ROTATION = ("plain", "by hand", *PRESETS)
TARGETS = {"cheap": 1.01, "standard": 1.03, "full": 1.2}
#: the mean step of a preset against the plain loop
PLAIN_TARGETS = {"standard": 1.02}
#: the Monitor's own time per step in the loop, as a multiple of ``by hand``'s (the floor)
FLOOR_TARGETS = {"off": 1.5, "standard": 3.0}
_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE_MB


def trimmed_mean(values: list[float], cut: float = 0.01) -> float:
    """The mean without the slowest ``cut`` of steps: a pause of the shared machine lands on
    one preset's step by chance, and a handful of them would decide a 1% comparison; the
    periodic costs (a gradient split every 100 steps, a flush every 50) stay in."""
    kept = sorted(values)[:max(1, round(len(values) * (1 - cut)))]
    return statistics.fmean(kept)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def by_hand(terms, params: list[torch.nn.Parameter]) -> list[float]:
    """What ``off`` records, written by hand in the fewest operations, as a loop that logs
    its losses and gradient norm itself would: one fused norm over every gradient, one
    stack, one read (a synchronisation on a GPU). The floor under the Monitor's ``off``."""
    with torch.no_grad():
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        return torch.stack([terms.recon, terms.kl, terms.total, norm]).tolist()


def time_probes(monitor: Monitor, spent: dict[str, float]) -> None:
    """Wrap each step probe's ``compute`` and ``before_step`` to add its time to ``spent``
    (evaluation probes are timed with the evaluation)."""
    for probe in monitor.probes:
        if probe.on_eval:
            continue
        for method in ("compute", "before_step"):
            original = getattr(probe, method)

            def timed(*args, _original=original, _name=probe.name, **kwargs):
                t0 = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - t0

            setattr(probe, method, timed)


def warm_cost(config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              images: torch.Tensor, make: Callable[[Path, str], Monitor],
              calls: int) -> dict[str, list[float]]:
    """The Monitor's calls alone: ``after_backward`` and ``after_step`` repeated on one
    step's gradients and losses, with no training between them, each preset's Monitor in
    turn. Its caches stay warm, as on a host whose arithmetic runs on an accelerator; on a
    CPU the probes' arithmetic is still in it. Per preset, the seconds of each call pair
    (without the gradient split: no graph is kept)."""
    out: dict[str, list[float]] = {p: [] for p in ("by hand", *PRESETS)}
    x = images[:config.train.batch_size].to(next(model.parameters()).device).float().div(255.0)
    model_out = model(x)
    terms = loss_terms(model_out.logits, x, model_out.mu, model_out.logvar, model_out.z,
                       config.loss, 1.0)
    optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    optimizer.step()  # Adam's state, for its probe
    recon, kl, total = terms.recon.detach(), terms.kl.detach(), terms.total.detach()
    mu, logvar = model_out.mu.detach(), model_out.logvar.detach()
    params = [p for p in model.parameters() if p.requires_grad]
    with tempfile.TemporaryDirectory() as tmp:
        monitors = {p: make(Path(tmp), p) for p in PRESETS}
        for call in range(calls):
            for preset in out:
                mon = monitors.get(preset)
                t0 = time.perf_counter()
                if mon is None:
                    by_hand(terms, params)
                else:
                    mon.after_backward(call, recon=recon, kl=kl, total=total, beta=1.0,
                                       mu=mu, logvar=logvar)
                    mon.after_step(call)
                out[preset].append(time.perf_counter() - t0)
        for mon in monitors.values():
            mon.close()
    return out


def measure(resolution: int, steps: int, evals: int, device: torch.device,
            read_before_step: bool = True, overrides: tuple[str, ...] = (),
            warm_calls: int = 2000, keep: Path | None = None) -> None:
    config = build_config(overrides=["data.toyfaces_size=2048",
                                     f"data.resolution={resolution}", *overrides])
    data = load_dataset(config.data)
    torch.manual_seed(0)
    model = ConvVAE.from_config(config).to(device)
    optimizer = build_optimizer(model, config)
    order = EpochOrder(len(data.train), config.train.batch_size, seed=0)
    images = torch.from_numpy(data.train)
    sampler = torch.Generator(device=device).manual_seed(1)
    cuda = device.type == "cuda"
    syncs = {p: 0 for p in ROTATION}
    train_images, train_factors = train_sample(data, config.data.seed)

    def make(root: Path, preset: str) -> Monitor:
        return Monitor(root / preset, model, optimizer, eval_images=data.val[:8],
                       metric_images=data.val[:64], eval_every=10**9, probes=build(preset),
                       eval_factors=data.val_factors, eval_loss=_eval_loss_fn(model, config),
                       train_images=train_images, train_factors=train_factors,
                       online=False, read_before_step=read_before_step)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) if keep is None else keep / f"{resolution}px"
        monitors = {p: make(root, p) for p in PRESETS}
        times: dict[str, list[float]] = {p: [] for p in ROTATION}
        monitor_times: dict[str, list[float]] = {p: [] for p in ROTATION}
        probe_times: dict[str, dict[str, float]] = {p: {} for p in PRESETS}
        for p in PRESETS:
            time_probes(monitors[p], probe_times[p])
        params = [p for p in model.parameters() if p.requires_grad]
        memory = []
        for step in range(steps):
            preset = ROTATION[step % len(ROTATION)]
            mon = monitors.get(preset)
            own_step = step // len(ROTATION)  # each Monitor sees steps 0, 1, 2, ... of its own
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            x = images[order.batch(step)].to(device).float().div_(255.0)
            out = model(x, generator=sampler)
            terms = loss_terms(out.logits, x, out.mu, out.logvar, out.z, config.loss, 1.0)
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward(retain_graph=mon is not None and mon.wants_graph(own_step))
            with warnings.catch_warnings(record=True) as caught:
                if cuda:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                tm = time.perf_counter()
                if mon is not None:
                    mon.after_backward(own_step, recon=terms.recon, kl=terms.kl,
                                       total=terms.total, beta=1.0, mu=out.mu,
                                       logvar=out.logvar, kl_term=terms.kl_penalty)
                elif preset == "by hand":
                    by_hand(terms, params)
                own = time.perf_counter() - tm
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
                optimizer.step()
                if cuda:
                    torch.cuda.set_sync_debug_mode("warn")
                tm = time.perf_counter()
                if mon is not None:
                    mon.after_step(own_step)
                monitor_times[preset].append(own + time.perf_counter() - tm)
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
            syncs[preset] += sum("synchroniz" in str(w.message) for w in caught)
            del x, out, terms  # each step frees its own graph, inside its own timing
            if cuda:
                torch.cuda.synchronize()
            times[preset].append(time.perf_counter() - t0)
            memory.append(rss_mb())
            if step and step % 400 == 0:
                print(f"  step {step}/{steps}", flush=True)
        eval_times = {p: [] for p in PRESETS}
        for i in range(evals * len(PRESETS)):
            preset = PRESETS[i % len(PRESETS)]
            t0 = time.perf_counter()
            monitors[preset].evaluate(steps + i)
            eval_times[preset].append(time.perf_counter() - t0)
        # the amortisation-gap probe alone: refining q(z|x) for the held-out and training 8
        evaluator = Evaluator(model, model.encode, model.decode, eval_images=data.val[:8],
                              eval_loss=_eval_loss_fn(model, config), value_range=(0.0, 1.0),
                              recon_mode="mean", metric_images=data.val[:64],
                              factors=data.val_factors, warn=lambda *args, **kw: None,
                              train_images=train_images, train_factors=train_factors)
        evaluator.make_fixed(0, config.model.latent_dim)
        with evaluator.eval_mode(), torch.no_grad():
            context = evaluator.run(steps, None).context
        amortisation = []
        for _ in range(3):
            t0 = time.perf_counter()
            AmortisationGap().compute(context)
            amortisation.append(time.perf_counter() - t0)
        for mon in monitors.values():
            mon.close()

    warm = 10
    per = len(times["off"]) - warm
    mean = {p: trimmed_mean(v[warm:]) for p, v in times.items()}
    median = {p: statistics.median(v[warm:]) for p, v in times.items()}
    model_name = f"model {' '.join(overrides)}" if overrides else "default model"
    print(f"\n{resolution}x{resolution}, batch {config.train.batch_size}, {model_name} "
          f"({sum(p.numel() for p in model.parameters()):,} parameters), {device}, "
          f"{torch.get_num_threads()} threads, {steps} steps interleaved ({per} timed per "
          f"entry), the step's values read "
          f"{'before optimizer.step()' if read_before_step else 'a step later'}")
    print(f"{'':<10}{'mean step (ms)':>15}{'/plain':>8}{'/off':>7}{'target':>22}"
          f"{'median step (ms)':>18}{'/plain':>8}{'Monitor/step (ms)':>19}"
          f"{'evaluation (ms)':>17}" + (f"{'syncs/step':>12}" if cuda else ""))
    for p in ROTATION:
        own = statistics.fmean(monitor_times[p][warm:])
        target = " ".join(([f"{TARGETS[p]:.2f} /off"] if p in TARGETS else [])
                          + ([f"{PLAIN_TARGETS[p]:.2f} /plain"] if p in PLAIN_TARGETS else []))
        evaluation = f"{statistics.median(eval_times[p]) * 1e3:>17.0f}" if p in eval_times \
            else f"{'':>17}"
        print(f"{p:<10}{mean[p] * 1e3:>15.2f}{mean[p] / mean['plain']:>8.3f}"
              f"{mean[p] / mean['off']:>7.3f}{target:>22}"
              f"{median[p] * 1e3:>18.2f}{median[p] / median['plain']:>8.3f}{own * 1e3:>19.3f}"
              + evaluation + (f"{syncs[p] / len(times[p]):>12.2f}" if cuda else ""))
    print("\nthe Monitor's own CPU time per step (ms): median / mean / 99th percentile; "
          "median and mean as multiples of by hand's (target); each step probe's mean share")
    floor = [t * 1e3 for t in monitor_times["by hand"][warm:]]
    for p in ROTATION[1:]:
        own = [t * 1e3 for t in monitor_times[p][warm:]]
        ratios = (f" = {statistics.median(own) / statistics.median(floor):.2f}x / "
                  f"{statistics.fmean(own) / statistics.fmean(floor):.2f}x by hand"
                  if p != "by hand" else "")
        target = ratios + (f" (target {FLOOR_TARGETS[p]}x)" if p in FLOOR_TARGETS else "")
        shares = ", ".join(f"{name} {total / len(monitor_times[p]) * 1e3:.3f}"
                           for name, total in sorted(probe_times.get(p, {}).items(),
                                                     key=lambda kv: -kv[1]))
        print(f"  {p:<9}{statistics.median(own):.3f} / {statistics.fmean(own):.3f} / "
              f"{percentile(own, 0.99):.3f}{target}" + (f"; {shares}" if shares else ""))
    amortised = statistics.median(amortisation)
    print(f"amortisation-gap probe (in every preset's evaluations but off): "
          f"{amortised * 1e3:.0f} ms per evaluation, {amortised / mean['standard']:.1f} "
          f"training steps' time; at one evaluation per epoch of 8,192 images at batch 64 "
          f"(128 steps) {amortised / mean['standard'] / 128:.1%} of training time")
    warm_times = warm_cost(config, model, optimizer, images, make, warm_calls)
    print(f"the Monitor's calls alone, {warm_calls} times on one step's gradients with no "
          f"training between (caches warm), median / mean (ms):")
    for p, spent in warm_times.items():
        kept = [t * 1e3 for t in spent[warm:]]
        print(f"  {p:<9}{statistics.median(kept):.3f} / {statistics.fmean(kept):.3f}")
    marks = [len(memory) // 4, len(memory) // 2, 3 * len(memory) // 4, len(memory) - 1]
    print("resident memory: " + ", ".join(f"{memory[i]:.1f} MB at step {i}" for i in marks)
          + f" ({memory[-1] - memory[marks[0]]:+.1f} MB over the last three quarters)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2400, help="steps per resolution, all "
                        "presets together")
    parser.add_argument("--evals", type=int, default=3, help="evaluations timed per preset")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--read-after-step", action="store_true",
                        help="Monitors that read nothing during a step (read_before_step=False)")
    parser.add_argument("--warm-calls", type=int, default=2000,
                        help="the Monitor's calls alone, repeated with warm caches, per preset")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="keep the timed runs in DIR/<resolution>px/<preset> (to compare "
                             "what two versions of vaediag record)")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. a narrow model whose arithmetic costs "
                        "next to nothing, to see the Monitor's fixed cost per step: --set "
                        "'model.channels=[8,8,8,8]' model.group_norm_groups=1")
    args = parser.parse_args()
    for resolution in args.resolutions:
        measure(resolution, args.steps, args.evals, torch.device(args.device),
                read_before_step=not args.read_after_step, overrides=tuple(args.overrides),
                warm_calls=args.warm_calls, keep=args.keep)


if __name__ == "__main__":
    main()
