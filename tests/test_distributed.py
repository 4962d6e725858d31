"""The Monitor under torch.distributed, for real: two processes, the gloo backend, a model in
DistributedDataParallel or sharded with FSDP (``fully_shard``), every rank creating its Monitor
with the same arguments."""

from __future__ import annotations

import json
import os
import socket
import sys
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


def _wrap(model: SmallVAE, mode: str) -> nn.Module:
    """The model as the ranks train it: in DDP, or its encoder and decoder sharded (FSDP2)."""
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.enc)
    fully_shard(model.dec)
    return model


def _eval_loss(model):
    def loss(x, z, mu, logvar):
        logits = model.decode_logits(z)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum((1, 2, 3))
        return recon, 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
    return loss


def _worker(rank: int, out: str, port: int, options: dict) -> None:
    """A DDP or FSDP training loop on 2 ranks, identical data and seeds in either mode; rank 1's
    loss is NaN at step ``NAN_AT``. ``options``: mode, probes, fail_rank0 (rank 0 is refused),
    stop_at (rank 0 asks every rank to stop at that step), read_before_step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    fail_rank0, stop_at = options.get("fail_rank0", False), options.get("stop_at")
    try:
        torch.manual_seed(0)
        model = SmallVAE()
        ddp = _wrap(model, options.get("mode", "ddp"))
        optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-3)
        images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        run = Path(out) / "run"
        try:
            mon = vaediag.Monitor(run, ddp, optimizer, eval_images=images, eval_every=20,
                                  encode=model.encode, decode=model.decode,
                                  eval_loss=_eval_loss(model), online=False,
                                  probes=options.get("probes", "standard"),
                                  overwrite=not fail_rank0,
                                  read_before_step=options.get("read_before_step", True))
        except vaediag.UserError as exc:
            (Path(out) / f"rank{rank}.error").write_text(str(exc))
            return
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own share of the batch
        data = torch.rand(64, 3, 16, 16, generator=g)
        seen = {"recon": [], "kl": [], "skipped": [], "mu_min": [], "logvar_mean": []}
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
            seen["mu_min"].append(mu.min().item())
            seen["logvar_mean"].append(logvar.mean().item())
            seen["recon"].append(recon.item())
            seen["kl"].append(kl.item())
            seen["skipped"].append(bool(check.nonfinite))
            if check.nonfinite:  # every rank takes the same decision
                optimizer.zero_grad()
                mon.after_step(step, skipped=True)
                continue
            optimizer.step()
            if step == stop_at and rank == 0:
                mon.request_stop()
            try:
                mon.after_step(step)
            except vaediag.TrainingStopped as stopped:
                seen["stopped"] = stopped.step
                if options.get("mode") == "fsdp":
                    seen["params"] = {n: p.full_tensor().tolist()
                                      for n, p in ddp.named_parameters()}
                break
            if mon.stop_agreed:  # rank 0 of a DDP loop stops itself on what the ranks agreed
                seen["stopped"] = step + 1
                break
        mon.close()
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.barrier()  # both ranks alive until both are done: a clean teardown
        dist.destroy_process_group()
        if sys.exc_info()[0] is None:  # finished (or refused, as asked): no exception
            _exit_now()


def _unready_fsdp_worker(rank: int, out: str, port: int, _: dict) -> None:
    """The whole model sharded and never run: every rank is refused alike, none waits."""
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = SmallVAE()
        fully_shard(model.enc)
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
        if sys.exc_info()[0] is None:
            _exit_now()


def _exit_now() -> None:
    """End a rank that finished (its results written, its process group destroyed) without the
    interpreter's own teardown: after FSDP2 on gloo that teardown has now and then (twice in
    some twenty runs of this file) aborted the process with "terminate called without an
    active exception" from one of torch's C++ threads, after every assertion's input was
    written. A rank that raised never calls it, so its error still fails the test."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(out: Path, worker=_worker, **options) -> None:
    ctx = mp.start_processes(worker, args=(str(out), _free_port(), options),
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
    _spawn(out, probes="full")
    return out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    _spawn(out, mode="fsdp", probes="full")
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
    # the latent statistics of the global batch: each rank's share combined
    np.testing.assert_allclose(rows["mu_min"], np.min([r["mu_min"] for r in ranks], axis=0),
                               rtol=1e-6)
    np.testing.assert_allclose(rows["logvar_mean"],
                               np.mean([r["logvar_mean"] for r in ranks], axis=0), rtol=1e-5,
                               atol=1e-7)
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


def test_without_reading_during_a_step_ddp_records_the_same_and_the_ranks_stop_together(
        ddp_run, tmp_path):
    """``read_before_step=False`` on 2 ranks (what ``vaediag train`` does under torchrun with
    ``on_nonfinite = "continue"``): every step's values are read a step later, on every rank
    at the same step. Before the NaN the rows and evaluations are those of the blocking run;
    the NaN on rank 1 is recorded at its own step and named; nothing was skipped (no check
    was known in time); a stop asked for at step 40 reaches both ranks after the same step,
    one step later than a blocking Monitor's."""
    _spawn(tmp_path, probes="full", read_before_step=False, stop_at=40)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0]["stopped"] == ranks[1]["stopped"] == 43  # blocking: 42
    assert not any(ranks[0]["skipped"]) and not any(ranks[1]["skipped"])
    now, later = load_run(ddp_run / "run"), load_run(tmp_path / "run")
    a = now.scalars[now.scalars["step"] < NAN_AT]
    b = later.scalars[later.scalars["step"] < NAN_AT]
    assert b["step"].tolist() == list(range(NAN_AT))
    assert set(a.columns) == set(later.scalars.columns)
    for column in a.columns:
        if column not in ("time", "grad_nonfinite"):
            np.testing.assert_array_equal(a[column].to_numpy(), b[column].to_numpy(), column)
    assert b["grad_nonfinite"].isna().all()
    evals = [run.evals[run.evals["step"] < NAN_AT].drop(columns="time") for run in (now, later)]
    assert evals[0].equals(evals[1]) and len(evals[0]) == 2
    events = later.events
    bad = events[(events["kind"] == "nonfinite") & (events["term"] == "recon")]
    assert bad["step"].iloc[0] == NAN_AT and list(bad["ranks"].iloc[0]) == [1]
    assert later.scalars["step"].max() == 42


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_when_rank_0_cannot_set_up_every_rank_stops_and_none_hangs(tmp_path, mode):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mine.txt").write_text("a user's file")  # not empty: refused
    _spawn(tmp_path, fail_rank0=True, mode=mode)
    assert "not empty" in (tmp_path / "rank0.error").read_text() or \
        "exists" in (tmp_path / "rank0.error").read_text()
    assert "rank 0 could not set up its Monitor" in (tmp_path / "rank1.error").read_text()
    assert (tmp_path / "run" / "mine.txt").read_text() == "a user's file"


def test_fsdp_records_what_ddp_records_from_the_combined_shards(ddp_run, fsdp_run):
    """The same training on the same data, in DDP and sharded (FSDP2): every rank runs the
    Monitor in step and rank 0 writes; gradient norms, Adam's statistics (every entry:
    ``full``), update ratios and evaluations agree with DDP's, which sees whole tensors."""
    assert sorted(p.name for p in fsdp_run.iterdir()) == ["rank0.json", "rank1.json", "run"]
    ddp, fsdp = load_run(ddp_run / "run"), load_run(fsdp_run / "run")
    assert fsdp.status == "finished"
    assert fsdp.scalars["step"].tolist() == list(range(STEPS))
    assert fsdp.evals["step"].tolist() == [0, 20, 40, 60]
    measured = [c for c in ddp.scalars.columns if c in fsdp.scalars.columns
                and c not in ("time",) and not c.startswith("split_")]
    for column in ("grad_norm", "layer.grad_norm/enc.1", "part.grad_norm/dec",
                   "adam_update_rms", "adam_rms_t", "adam_eps_frac", "adam_eff_lr",
                   "layer.adam_sign_frac/dec.2", "update_ratio", "layer.update_ratio/enc.3",
                   "grad_nonfinite", "recon_rank_spread", "mu_mean", "dim.kl/3"):
        assert column in measured, column
    ok = np.isfinite(ddp.scalars["recon"].to_numpy())
    for column in measured:
        a, b = ddp.scalars[column].to_numpy()[ok], fsdp.scalars[column].to_numpy()[ok]
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-7, equal_nan=True, err_msg=column)
    for column in ("eval_recon", "eval_kl", "ssim", "img.recon/3", "amort_gap",
                   "drift_fixed_rmse"):
        assert column in fsdp.evals.columns, column
        np.testing.assert_allclose(fsdp.evals[column], ddp.evals[column], rtol=2e-4,
                                   err_msg=column)
    assert len(list((fsdp_run / "run" / "grids").iterdir())) == 4
    # the planted NaN on rank 1: skipped on both ranks and named
    for r in range(WORLD):
        skipped = json.loads((fsdp_run / f"rank{r}.json").read_text())["skipped"]
        assert [s for s, bad in enumerate(skipped) if bad] == [NAN_AT]
    events = fsdp.events
    assert [list(e) for e in events[(events["kind"] == "nonfinite")
                                    & (events["term"] == "recon")]["ranks"]] == [[1]]
    # what a sharded run cannot record is said, not recorded wrong
    declined = events[events["kind"] == "probe_not_applicable"]
    assert dict(zip(declined["probe"], declined["reason"], strict=True))["grad_split"] == \
        "the parameters are sharded (FSDP)"


def test_under_fsdp_a_stop_saves_the_whole_model_and_every_rank_stops(tmp_path):
    _spawn(tmp_path, mode="fsdp", stop_at=10)  # asked after step 10, agreed at step 11's gather
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["stopped"] for r in ranks] == [12, 12]
    (path,) = (tmp_path / "run" / "checkpoints").iterdir()
    saved = torch.load(path, weights_only=False)
    assert saved["step"] == 12
    for name, value in ranks[0]["params"].items():  # whole tensors, not rank 0's shard
        np.testing.assert_array_equal(saved["model"][name].numpy(), np.array(value,
                                                                            dtype=np.float32))
    assert load_run(tmp_path / "run").status == "stopped"


def test_a_whole_sharded_model_not_yet_run_is_refused_on_every_rank(tmp_path):
    _spawn(tmp_path, worker=_unready_fsdp_worker)
    for rank in range(WORLD):
        assert "first forward pass" in (tmp_path / f"rank{rank}.error").read_text()
    assert not (tmp_path / "run").exists()


def _exchange_worker(rank: int, out: str, port: int, _: dict) -> None:
    """Each rank contributes values of its own; every rank writes what the exchange gave."""
    from vaediag.monitor.ranks import Ranks, Reduce, Shared

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        got = Ranks().exchange([
            Shared("losses", torch.tensor([1.0 + rank, -2.0 * rank, 0.5]), Reduce.EACH),
            Shared("stop", float(rank == 1), Reduce.MAX),
            Shared("squares", torch.arange(4, dtype=torch.float32).reshape(2, 2) * (rank + 1),
                   Reduce.SUM),
        ], torch.device("cpu"))
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(
            {name: value.tolist() for name, value in got.items()}))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_each_shared_value_is_combined_over_ranks_as_it_declares(tmp_path):
    """The step's one collective: every rank's values (EACH: a row per rank), the largest
    (MAX: a request to stop from any rank), the sum (SUM: shards' sums of squares), all in one
    all-gather, and every rank gets the same."""
    _spawn(tmp_path, worker=_exchange_worker)
    expected = {"losses": [[1.0, 0.0, 0.5], [2.0, -2.0, 0.5]], "stop": [1.0],
                "squares": [0.0, 3.0, 6.0, 9.0]}
    for rank in range(WORLD):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected
