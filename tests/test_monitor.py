"""vaediag.Monitor in a user's own training loop."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import vaediag
from vaediag.errors import UserError
from vaediag.probes import Probe

sys.path.insert(0, "examples")
from own_loop import TinyVAE


def _loop(mon, model, optimizer, steps, retain=True, poison=None):
    g = torch.Generator().manual_seed(0)
    data = torch.rand(64, 3, 16, 16, generator=g)
    for step in range(steps):
        x = data[torch.randint(0, 64, (16,), generator=g)]
        mu, logvar = model.encode(x)
        z = mu + torch.randn(mu.shape, generator=g) * torch.exp(0.5 * logvar)
        recon = F.binary_cross_entropy_with_logits(model.decode_logits(z), x,
                                                   reduction="none").sum((1, 2, 3)).mean()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
        optimizer.zero_grad()
        (recon + kl).backward(retain_graph=retain and mon.wants_graph(step))
        if poison is not None and step == poison:
            next(model.parameters()).grad[0, 0] = float("nan")
        check = mon.after_backward(step, recon=recon, kl=kl, beta=1.0, mu=mu, logvar=logvar)
        if check.nonfinite:
            optimizer.zero_grad()
            mon.after_step(step, skipped=True)
            continue
        optimizer.step()
        mon.after_step(step)
    mon.close()


def _monitor(tmp_path, model, optimizer, **kw):
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return vaediag.Monitor(tmp_path / "run", model, optimizer, eval_images=images,
                           eval_every=kw.pop("eval_every", 10), **kw)


def test_user_loop_records_probes_and_a_final_grid(tmp_path, capsys):
    torch.manual_seed(0)
    model = TinyVAE(16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = _monitor(tmp_path, model, opt)
    assert [s for s in range(60) if mon.wants_graph(s)] == [0, 25, 50]
    _loop(mon, model, opt, 23)
    run = vaediag.load_run(tmp_path / "run")
    assert run.status == "finished" and list(run.scalars["step"]) == list(range(23))
    s = run.scalars
    assert s["split_cos"].notna().tolist() == [i in (0,) for i in range(23)]
    assert s["layer.adam_update_rms/enc.1"].notna().all()
    assert s["dim.kl/7"].notna().all()
    assert list(run.evals["step"]) == [0, 10, 20, 23]  # close() adds the final model's grid
    assert [step for step, _ in run.grids] == [0, 10, 20, 23]
    assert "ssim" in run.evals and "eval_recon" not in run.evals  # no eval_loss given
    assert run.config["monitor"]["eval_every"] == 10


def test_freed_graph_disables_only_the_split_with_one_clear_warning(tmp_path, capsys):
    model = TinyVAE(16)
    opt = torch.optim.Adam(model.parameters())
    mon = _monitor(tmp_path, model, opt)
    _loop(mon, model, opt, 30, retain=False)
    err = capsys.readouterr().err
    assert err.count("probe 'grad_split' failed") == 1 and "retain_graph" in err
    run = vaediag.load_run(tmp_path / "run")
    failed = run.events[run.events["kind"] == "probe_failed"]
    assert list(failed["probe"]) == ["grad_split"] and list(failed["step"]) == [0]
    assert "split_cos" not in run.scalars and run.scalars["adam_rms_t"].notna().all()


class Exploding(Probe):
    name = "exploding"
    needs = frozenset({"losses"})

    def compute(self, ctx):
        if ctx.step == 3:
            raise ZeroDivisionError("boom")
        return {"fine": 1.0}


def test_a_raising_probe_is_disabled_and_training_goes_on(tmp_path, capsys):
    model = TinyVAE(16)
    opt = torch.optim.Adam(model.parameters())
    mon = _monitor(tmp_path, model, opt, probes="cheap", extra_probes=[Exploding()])
    _loop(mon, model, opt, 8)
    err = capsys.readouterr().err
    assert err.count("probe 'exploding' failed at step 3 and is disabled: ZeroDivisionError: "
                     "boom") == 1
    run = vaediag.load_run(tmp_path / "run")
    assert run.scalars["fine"].notna().tolist() == [True] * 3 + [False] * 5
    assert len(run.scalars) == 8 and run.status == "finished"


def test_sgd_makes_adam_probes_not_applicable(tmp_path, capsys):
    model = TinyVAE(16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = _monitor(tmp_path, model, opt)
    _loop(mon, model, opt, 3)
    assert "probe 'adam' is not applicable: the optimizer is SGD" in capsys.readouterr().err
    run = vaediag.load_run(tmp_path / "run")
    assert not any(c.startswith(("adam", "layer.adam")) for c in run.scalars.columns)
    assert run.scalars["update_ratio"].notna().all()
    note = run.events[run.events["kind"] == "probe_not_applicable"].iloc[0]
    assert note["probe"] == "adam"


def test_a_single_step(tmp_path):
    model = TinyVAE(16)
    opt = torch.optim.Adam(model.parameters())
    mon = _monitor(tmp_path, model, opt, eval_every=500)
    _loop(mon, model, opt, 1)
    run = vaediag.load_run(tmp_path / "run")
    assert list(run.scalars["step"]) == [0] and list(run.evals["step"]) == [0, 1]


def test_nonfinite_gradient_is_named_and_skipped(tmp_path):
    model = TinyVAE(16)
    opt = torch.optim.Adam(model.parameters())
    mon = _monitor(tmp_path, model, opt, probes="standard")
    _loop(mon, model, opt, 5, poison=2)
    run = vaediag.load_run(tmp_path / "run")
    bad = run.events[run.events["kind"] == "nonfinite"].iloc[0]
    assert bad["step"] == 2 and bad["term"] == "grad:enc.1.weight"
    assert run.scalars.loc[2, "grad_nonfinite"] == 1
    assert run.scalars.loc[2, "layer.grad_norm/enc.1"] != run.scalars.loc[2,
                                                                        "layer.grad_norm/enc.1"]
    assert list(run.events[run.events["kind"] == "skipped_step"]["step"]) == [2]


@pytest.mark.parametrize(("images", "message"), [
    (torch.rand(4, 3, 16, 16), "at least 8 RGB images"),
    (torch.rand(8, 1, 16, 16), r"shaped \(N, 3, H, W\)"),
    (torch.rand(8, 3, 16, 16) * 2, r"must lie in \[0, 1\]"),
])
def test_bad_eval_batches(tmp_path, images, message):
    model = TinyVAE(16)
    with pytest.raises(UserError, match=message):
        vaediag.Monitor(tmp_path / "r", model, eval_images=images)


def test_encode_and_decode_are_required(tmp_path):
    with pytest.raises(UserError, match="needs encode"):
        vaediag.Monitor(tmp_path / "r", nn.Linear(2, 2), eval_images=torch.rand(8, 3, 4, 4))


def test_after_step_without_after_backward(tmp_path):
    model = TinyVAE(16)
    mon = _monitor(tmp_path, model, torch.optim.Adam(model.parameters()))
    with pytest.raises(UserError, match=r"after_step\(0\) without after_backward\(0\)"):
        mon.after_step(0)


def test_the_own_loop_example_runs(tmp_path):
    result = subprocess.run([sys.executable, "examples/own_loop.py", "--out",
                             str(tmp_path / "own"), "--steps", "30", "--resolution", "16"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "30 steps, 2 evaluations recorded" in result.stdout
    run = vaediag.load_run(tmp_path / "own")
    assert run.scalars["split_cos"].notna().sum() == 2  # steps 0 and 25
    assert run.config["example"]["beta"] == 1.0
