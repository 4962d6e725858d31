"""Findings while training: the detectors at each evaluation in a child process, each new
warning or high finding printed and recorded once, stop_on, and ``analyze --follow``."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import vaediag
from tests.conftest import TINY_ONLINE, run_cli
from vaediag.analysis import follow
from vaediag.analysis.findings import severity_rank
from vaediag.cli import main
from vaediag.errors import TrainingStopped
from vaediag.rundir import CHECKPOINTS_DIR, RunWriter, load_run, step_file
from vaediag.testing import standard_evals, standard_scalars


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A tiny run whose learning rate jumps 100x at step 140, stopped on the first high
    finding of its online analysis."""
    out = tmp_path_factory.mktemp("online") / "run"
    code = main(["train", "--out", str(out), "--steps", "300", *TINY_ONLINE,
                 "--set", "eval.every_steps=20", "--set", "probes.metric_images=0",
                 "--set", "train.stop_on=high", "--inject", "lr_spike@140:factor=100,steps=5"])
    return code, out


def reported(run) -> list[dict]:
    events = run.events
    return [dict(e) for _, e in events[events["kind"] == "finding"].iterrows()]


def test_training_stops_with_a_checkpoint_on_a_high_finding(stopped):
    code, out = stopped
    run = load_run(out)
    assert code == 3 and run.status == "stopped"
    found = reported(run)
    high = [e for e in found if e["severity"] == "high"]
    assert high and all(e["first_step"] >= 140 for e in high)
    stop = int(run.info["step"])
    assert (out / CHECKPOINTS_DIR / step_file(stop, "pt")).exists()
    assert min(e["step"] for e in high) <= stop < 300  # stopped after it was found, early
    assert "train.stop_on" in run.info["message"]
    # the stop names the root of what it stopped on, as vaediag analyze does: the learning rate
    assert "the learning rate rose 100x" in run.info["message"], run.info["message"]


def test_online_findings_are_the_offline_findings_of_the_same_prefix(stopped):
    """Each finding printed while training is what ``vaediag analyze`` finds in the run cut
    at that evaluation, and nothing found there at warning or above went unreported."""
    _, out = stopped
    run = load_run(out)
    found = reported(run)
    assert found
    def key(e):
        return e["finding_kind"], e["severity"], int(e["first_step"]), int(e["last_step"])

    keys = [key(e) for e in found]
    assert not any(follow.same(a, b) for i, a in enumerate(keys) for b in keys[:i])  # once
    for at in sorted({int(e["step"]) for e in found}):
        offline = [follow.key(f) for f in vaediag.analyze(run.until(at)).findings
                   if severity_rank(f.severity) >= 1]
        assert {key(e) for e in found if int(e["step"]) == at} <= set(offline)
        earlier = [key(e) for e in found if int(e["step"]) <= at]
        assert all(any(follow.same(k, r) for r in earlier) for k in offline)


def test_analyze_follow_prints_each_finding_once_then_the_analysis(stopped, capsys):
    _, out = stopped
    code, stdout, stderr = run_cli(capsys, "analyze", "--follow", str(out), "--no-write",
                                   "--no-html", "--no-pdf")
    lines = [line for line in stderr.splitlines() if line.startswith("finding at step")]
    assert code == 0 and lines and len(lines) == len(set(lines))
    assert any("HIGH" in line for line in lines)
    assert "verdict:" in stdout and "incident 1" in stdout


def test_follow_reports_a_run_as_it_is_written_and_ends_with_it(tmp_path):
    """A writer appends rows and evaluations in another thread (a KL explosion at step 1,000);
    follow() echoes the explosion while the run is written and returns once it is closed."""
    cols = standard_scalars(1500)
    cols["kl"][1000:] *= 10
    cols["total"] = cols["recon"] + cols["kl"]
    ev = standard_evals(cols["step"][::50])
    path = tmp_path / "live"
    writer = RunWriter.create(path, config_toml="", environment={})
    lines: list[str] = []
    done = threading.Event()

    def write() -> None:
        for start in range(0, 1500, 250):
            writer.log_columns({k: v[start:start + 250] for k, v in cols.items()})
            writer.flush()
            for i in range(start // 50, (start + 250) // 50):
                writer.log_eval({k: v[i].item() for k, v in ev.items()})
            time.sleep(0.05)
        done.wait(10)  # until follow has seen the explosion
        writer.close("finished", 1500)

    thread = threading.Thread(target=write)
    thread.start()

    def echo(text: str) -> None:
        lines.append(text)
        if "kl_explosion" in text:
            done.set()

    follow.follow(path, echo, interval=0.05, timeout=60)
    thread.join()
    assert any("kl_explosion" in line and "HIGH" in line for line in lines)
    assert load_run(path).status == "finished"


def test_a_monitor_stops_an_own_loop_on_a_high_finding(tmp_path):
    import sys

    sys.path.insert(0, "examples")
    from own_loop import TinyVAE

    torch.manual_seed(0)
    model = TinyVAE(16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mon = vaediag.Monitor(tmp_path / "run", model, optimizer, eval_images=images, eval_every=10,
                          stop_on="high")
    g = torch.Generator().manual_seed(0)
    data = torch.rand(64, 3, 16, 16, generator=g)
    with pytest.raises(TrainingStopped) as stopped:
        for step in range(3000):
            x = data[torch.randint(0, 64, (16,), generator=g)]
            mu, logvar = model.encode(x)
            z = mu + torch.randn(mu.shape, generator=g) * torch.exp(0.5 * logvar)
            recon = torch.nn.functional.binary_cross_entropy_with_logits(
                model.decode_logits(z), x, reduction="none").sum((1, 2, 3)).mean()
            kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
            optimizer.zero_grad()
            (recon + kl).backward()
            if step == 150:  # a bug makes one step's gradient non-finite
                next(model.parameters()).grad.view(-1)[0] = float("nan")
            check = mon.after_backward(step, recon=recon, kl=kl, mu=mu, logvar=logvar)
            if check.nonfinite:
                mon.after_step(step, skipped=True)
                continue
            optimizer.step()
            mon.after_step(step)
        mon.close()
    run = load_run(tmp_path / "run")
    assert run.status == "stopped" and stopped.value.step > 150
    state = torch.load(next((tmp_path / "run" / "checkpoints").iterdir()), weights_only=False)
    assert set(state) >= {"model", "optimizer"}
    assert any(e["finding_kind"] == "nonfinite" for e in reported(run))


def test_stop_on_needs_the_online_analysis(tmp_path):
    from own_loop import TinyVAE

    images = torch.rand(8, 3, 16, 16)
    model = TinyVAE(16)
    with pytest.raises(vaediag.UserError, match="stop_on='high' needs online=True"):
        vaediag.Monitor(tmp_path / "r", model, eval_images=images, online=False, stop_on="high")
    with pytest.raises(vaediag.UserError, match="stop_on must be one of"):
        vaediag.Monitor(tmp_path / "r", model, eval_images=images, stop_on="sometimes")
    assert not (tmp_path / "r").exists()
