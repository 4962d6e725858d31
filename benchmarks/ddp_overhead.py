"""The Monitor's overhead under DistributedDataParallel (or FSDP2): 2 CPU processes, gloo.

One DDP training run of vaediag's default model at 64 px (``--resolution 32``: a small model),
batch 32 per rank, one thread per process, in blocks of
``--block`` steps alternating between the plain loop and the same loop with the Monitor
(``standard`` probes, every rank creating it, rank 0 recording), so both see the same machine
conditions. Evaluations are outside the timed steps (as in benchmarks/overhead.py: their cost
is per evaluation, not per step). Reported: rank 0's mean and median step with and without the
Monitor and their ratio, and the cost of the step's one extra collective alone.

    python benchmarks/ddp_overhead.py [--steps 1200] [--block 20] [--resolution 64] [--fsdp]

``--fsdp``: the encoder and decoder sharded with ``fully_shard`` instead of DDP (every rank then
runs the Monitor in step; Adam's statistics and update ratios add one all-reduce each on the
steps they run).

Target: ``standard`` within 1.05x of the plain DDP loop.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, steps: int, block: int, out: str, resolution: int,
          fsdp: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from vaediag import Monitor
    from vaediag.config import build_config
    from vaediag.data import load_dataset
    from vaediag.losses import loss_terms
    from vaediag.model import ConvVAE
    from vaediag.monitor.ranks import Ranks, Reduce, Shared
    from vaediag.probes import build

    small = ["model.channels=[16, 32, 64]"] if resolution == 32 else []
    config = build_config(overrides=[f"data.resolution={resolution}", "data.toyfaces_size=2048",
                                     "data.val_size=64", *small])
    data = load_dataset(config.data)
    torch.manual_seed(0)
    model = ConvVAE.from_config(config)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.encoder)
        fully_shard(model.decoder)
        ddp = model
    else:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    images = torch.from_numpy(data.train).float().div_(255.0)
    g = torch.Generator().manual_seed(rank)
    with tempfile.TemporaryDirectory() as tmp:
        mon = Monitor(Path(tmp) / "run", ddp, optimizer, eval_images=data.val[:8],
                      eval_every=10**9, probes=build("standard"), online=False)
        times: dict[str, list[float]] = {"off": [], "standard": []}
        monitored = 0
        for step in range(steps):
            preset = "standard" if (step // block) % 2 else "off"
            x = images[torch.randint(0, len(images), (32,), generator=g)]
            dist.barrier()  # every step starts together on both ranks
            t0 = time.perf_counter()
            result = ddp(x, generator=g)
            terms = loss_terms(result.logits, x, result.mu, result.logvar, result.z,
                               config.loss, 1.0)
            optimizer.zero_grad(set_to_none=True)
            use = preset == "standard"
            terms.total.backward(retain_graph=use and mon.wants_graph(monitored))
            if use:
                mon.after_backward(monitored, recon=terms.recon, kl=terms.kl,
                                   total=terms.total, beta=1.0, mu=result.mu,
                                   logvar=result.logvar)
            optimizer.step()
            if use:
                mon.after_step(monitored)
                monitored += 1
            del result, terms
            times[preset].append(time.perf_counter() - t0)
        mon.close()
        ranks = Ranks()
        t0 = time.perf_counter()
        for _ in range(200):
            ranks.exchange([Shared("losses", torch.tensor([1.0, 2.0, math.nan]), Reduce.EACH),
                            Shared("stop", 0.0, Reduce.MAX)], torch.device("cpu"))
        gather_ms = (time.perf_counter() - t0) / 200 * 1e3
    if rank == 0:
        skip = 2 * block  # warm-up
        lines = []
        mean = {p: statistics.fmean(t[skip // 2:]) * 1e3 for p, t in times.items()}
        median = {p: statistics.median(t[skip // 2:]) * 1e3 for p, t in times.items()}
        model_name = "a small model (channels 16-64)" if resolution == 32 else "the default model"
        lines.append(f"{WORLD} processes, gloo, {'FSDP2' if fsdp else 'DDP'}, 1 thread each, "
                     f"{model_name} at {resolution} px, "
                     f"batch 32 per rank, "
                     f"{steps} steps in blocks of {block}")
        for p in times:
            lines.append(f"  {p:<9} mean step {mean[p]:7.2f} ms ({mean[p] / mean['off']:.3f}x)"
                         f"   median {median[p]:7.2f} ms ({median[p] / median['off']:.3f}x)")
        lines.append(f"  the step's collective alone (all_gather of the loss terms): "
                     f"{gather_ms:.3f} ms")
        Path(out).write_text("\n".join(lines) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=64, choices=(32, 64),
                        help="64: vaediag's default model; 32: a small one (channels 16-64)")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard the encoder and decoder (FSDP2) instead of DDP")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.txt")
        mp.start_processes(_rank, args=(_free_port(), args.steps, args.block, out,
                                        args.resolution, args.fsdp),
                           nprocs=WORLD, start_method="spawn")
        print(Path(out).read_text(), end="")


if __name__ == "__main__":
    main()
