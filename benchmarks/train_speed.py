"""Training speed: vaediag's trainer against a plain hand-written PyTorch loop of the same model.

Both run the default 64x64 model at batch 64 on toyfaces, interleaved in rounds in one process so
that machine noise hits both alike. The trainer's step time is read from its own per-step
``time`` column (so setup and data generation are excluded); the plain loop is timed with
perf_counter around each step. Prints the median step time of each, steps/s, and the ratio.

    python benchmarks/train_speed.py [--rounds 3] [--steps 60] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vaediag.config import build_config
from vaediag.data import toyfaces
from vaediag.losses import loss_terms
from vaediag.model import ConvVAE
from vaediag.rundir import load_run
from vaediag.trainer import build_optimizer, train


def plain_loop(config, images: torch.Tensor, steps: int) -> list[float]:
    """The loop a user would write by hand: no monitoring, no checks."""
    torch.manual_seed(0)
    model = ConvVAE.from_config(config)
    opt = build_optimizer(model, config)
    times = []
    b = config.train.batch_size
    for _ in range(steps):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(images), (b,))
        x = images[idx].float().div_(255.0)
        out = model(x)
        terms = loss_terms(out.logits, x, out.mu, out.logvar, out.z, config.loss, 1.0,
                           model.log_scale)
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def trainer_steps(config, out: Path) -> list[float]:
    train(config, out, overwrite=True, progress=False)
    t = load_run(out).scalars["time"].to_numpy(dtype=np.float64)
    return list(np.diff(t))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="steps per variant per round")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    config = build_config(overrides=[
        "data.toyfaces_size=2048", f"train.steps={args.steps}", "eval.every_steps=100000",
        "train.checkpoint_every=100000", *args.overrides])
    images = torch.from_numpy(toyfaces.generate(2048, config.data.resolution, 0)[0])
    warm = 5  # the first steps of each block pay for allocator and kernel warm-up
    plain, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            plain += plain_loop(config, images, args.steps)[warm:]
            ours += trainer_steps(config, Path(tmp) / "run")[warm:]
            print(f"round {r + 1}/{args.rounds}: plain {statistics.median(plain) * 1e3:.1f} ms, "
                  f"vaediag {statistics.median(ours) * 1e3:.1f} ms", flush=True)
    p, o = statistics.median(plain), statistics.median(ours)
    res, bs = config.data.resolution, config.train.batch_size
    print(f"\n{res}x{res}, batch {bs}, channels {list(config.model.channels)}, "
          f"{torch.get_num_threads()} threads, {len(plain)} steps each")
    print(f"{'loop':<22}{'median step (ms)':>18}{'steps/s':>10}")
    print(f"{'plain PyTorch':<22}{p * 1e3:>18.1f}{1 / p:>10.2f}")
    print(f"{'vaediag trainer':<22}{o * 1e3:>18.1f}{1 / o:>10.2f}")
    print(f"ratio vaediag / plain: {o / p:.3f}")


if __name__ == "__main__":
    main()
