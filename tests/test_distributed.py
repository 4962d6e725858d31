"""The Monitor under torch.distributed, for real: two processes, the gloo backend, a model in
DistributedDataParallel, every rank creating its Monitor with the same arguments."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import vaediag
from vaediag.rundir import load_run

WORLD = 2
STEPS = 60
NAN_AT = 30  # rank 1's loss is NaN at this step


class SmallVAE(nn.Module):
    def __init__(self, latent: int = 4):
        super().__init__()
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 64), nn.ReLU(),
                                 nn.Linear(64, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent, 64), nn.ReLU(), nn.Linear(64, 3 * 16 * 16))

    def encode(self, x):
        return self.enc(x).chunk(2, dim=1)

    def decode_logits(self, z):
        return self.dec(z).view(-1, 3, 16, 16)

    def decode(self, z):
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x, noise):
        mu, logvar = self.encode(x)
        return self.decode_logits(mu + noise * torch.exp(0.5 * logvar)), mu, logvar


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, out: str, port: int, fail_rank0: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = SmallVAE()
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-3)
        images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        run = Path(out) / "run"
        try:
            mon = vaediag.Monitor(run, ddp, optimizer, eval_images=images, eval_every=20,
                                  online=False, overwrite=not fail_rank0)
        except vaediag.UserError as exc:
            (Path(out) / f"rank{rank}.error").write_text(str(exc))
            return
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own share of the batch
        data = torch.rand(64, 3, 16, 16, generator=g)
        seen = {"recon": [], "kl": [], "skipped": []}
        for step in range(STEPS):
            x = data[torch.randint(0, 64, (16,), generator=g)]
            logits, mu, logvar = ddp(x, torch.randn(16, 4, generator=g))
            recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(
                (1, 2, 3)).mean()
            if rank == 1 and step == NAN_AT:
                recon = recon * float("nan")
            kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
            optimizer.zero_grad()
            (recon + kl).backward(retain_graph=mon.wants_graph(step))
            check = mon.after_backward(step, recon=recon, kl=kl, mu=mu, logvar=logvar)
            seen["recon"].append(recon.item())
            seen["kl"].append(kl.item())
            seen["skipped"].append(bool(check.nonfinite))
            if check.nonfinite:  # every rank takes the same decision
                optimizer.zero_grad()
                mon.after_step(step, skipped=True)
                continue
            optimizer.step()
            mon.after_step(step)
        mon.close()
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.barrier()  # both ranks alive until both are done: a clean teardown
        dist.destroy_process_group()


def _fsdp_worker(rank: int, out: str, port: int, _: bool) -> None:
    """FSDP (fully_shard) on gloo: every rank is refused alike, none waits."""
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = SmallVAE()
        fully_shard(model)
        images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        try:
            vaediag.Monitor(Path(out) / "run", model, eval_images=images, online=False,
                            encode=model.encode, decode=model.decode)
        except vaediag.UserError as exc:
            (Path(out) / f"rank{rank}.error").write_text(str(exc))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _spawn(out: Path, fail_rank0: bool = False, worker=_worker) -> None:
    ctx = mp.start_processes(worker, args=(str(out), _free_port(), fail_rank0),
                             nprocs=WORLD, join=False, start_method="spawn")
    for _ in range(120):  # a deadlock fails the test instead of hanging it
        if ctx.join(timeout=1):
            return
    for p in ctx.processes:
        p.kill()
    pytest.fail("the ranks did not finish within 120 s")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    _spawn(out)
    return out


def test_one_run_directory_written_by_rank_0_with_every_step_once(ddp_run):
    assert sorted(p.name for p in ddp_run.iterdir()) == ["rank0.json", "rank1.json", "run"]
    run = load_run(ddp_run / "run")
    assert run.status == "finished"
    assert run.scalars["step"].tolist() == list(range(STEPS))
    assert run.evals["step"].tolist() == [0, 20, 40, 60]


def test_losses_are_the_mean_over_ranks_with_their_spread(ddp_run):
    ranks = [json.loads((ddp_run / f"rank{r}.json").read_text()) for r in range(WORLD)]
    rows = load_run(ddp_run / "run").scalars
    for term in ("recon", "kl"):
        per_rank = np.array([r[term] for r in ranks])  # (world, steps)
        ok = np.isfinite(per_rank).all(axis=0)
        np.testing.assert_allclose(rows[term].to_numpy()[ok], per_rank.mean(axis=0)[ok],
                                   rtol=1e-5)
        np.testing.assert_allclose(rows[f"{term}_rank_spread"].to_numpy()[ok],
                                   np.ptp(per_rank, axis=0)[ok], rtol=1e-4, atol=1e-6)
    assert ranks[0]["recon"] != ranks[1]["recon"]  # the ranks did see different batches


def test_a_nonfinite_loss_on_one_rank_is_seen_by_every_rank_and_named(ddp_run):
    ranks = [json.loads((ddp_run / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r in ranks:  # the same decision everywhere: the step was skipped on both
        assert [s for s, skipped in enumerate(r["skipped"]) if skipped] == [NAN_AT]
    events = load_run(ddp_run / "run").events
    (bad,) = [dict(e) for _, e in events[events["kind"] == "nonfinite"].iterrows()
              if e["term"] == "recon"]
    assert bad["step"] == NAN_AT and list(bad["ranks"]) == [1]
    (f,) = [f for f in vaediag.analyze(ddp_run / "run").findings if f.kind == "nonfinite"]
    assert f.first_step == NAN_AT and "rank 1" in f.summary


def test_when_rank_0_cannot_set_up_every_rank_stops_and_none_hangs(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mine.txt").write_text("a user's file")  # not empty: refused
    _spawn(tmp_path, fail_rank0=True)
    assert "not empty" in (tmp_path / "rank0.error").read_text() or \
        "exists" in (tmp_path / "rank0.error").read_text()
    assert "rank 0 could not set up its Monitor" in (tmp_path / "rank1.error").read_text()
    assert (tmp_path / "run" / "mine.txt").read_text() == "a user's file"


def test_fsdp_is_refused_on_every_rank_with_the_reason(tmp_path):
    _spawn(tmp_path, worker=_fsdp_worker)
    for rank in range(WORLD):
        assert "sharded (FSDP)" in (tmp_path / f"rank{rank}.error").read_text()
    assert not (tmp_path / "run").exists()
