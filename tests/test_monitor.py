"""vaediag.Monitor in a user's own training loop."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

import vaediag
from vaediag.errors import UserError
from vaediag.probes import Probe

sys.path.insert(0, "examples")
from own_loop import TinyVAE


def _batch_losses(model, data, g):
    """A random batch of ``data``: (summed BCE, analytic KL, mu, logvar)."""
    x = data[torch.randint(0, 64, (16,), generator=g)]
    mu, logvar = model.encode(x)
    z = mu + torch.randn(mu.shape, generator=g) * torch.exp(0.5 * logvar)
    recon = F.binary_cross_entropy_with_logits(model.decode_logits(z), x,
                                               reduction="none").sum((1, 2, 3)).mean()
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
    return recon, kl, mu, logvar


def _loop(mon, model, optimizer, steps, retain=True, poison=None, jolt=None, lr_jump=None,
          lr_at=None):
    g = torch.Generator().manual_seed(0)
    data = torch.rand(64, 3, 16, 16, generator=g)
    for step in range(steps):
        recon, kl, mu, logvar = _batch_losses(model, data, g)
        optimizer.zero_grad()
        if lr_jump is not None and step == lr_jump:
            optimizer.param_groups[0]["lr"] *= 10
        if lr_at is not None:
            optimizer.param_groups[0]["lr"] = lr_at(step)
        scale = 100.0 if jolt is not None and step == jolt else 1.0
        (scale * (recon + kl)).backward(retain_graph=retain and mon.wants_graph(step))
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
    assert [s for s in range(250) if mon.wants_graph(s)] == [0, 100, 200]
    _loop(mon, model, opt, 23)
    run = vaediag.load_run(tmp_path / "run")
    assert run.status == "finished" and list(run.scalars["step"]) == list(range(23))
    s = run.scalars
    assert s["split_cos"].notna().tolist() == [i in (0,) for i in range(23)]
    assert s["layer.adam_update_rms/enc.1"].notna().tolist() == [i % 4 == 0 for i in range(23)]
    assert s["layer.update_ratio/enc.1"].notna().tolist() == [i % 4 == 0 for i in range(23)]
    assert s["dim.kl/7"].notna().all()
    assert list(run.evals["step"]) == [0, 10, 20, 23]  # close() adds the final model's grid
    assert [step for step, _ in run.grids] == [0, 10, 20, 23]
    assert "ssim" in run.evals and "eval_recon" not in run.evals  # no eval_loss given
    assert run.config["monitor"]["eval_every"] == 10


def test_optimizer_statistics_also_at_unusual_steps(tmp_path):
    """Adam's state and the update ratio run every 4 steps, and at once when the gradient norm
    jumps (step 9: the loss scaled 100 times) or the learning rate changes (step 14)."""
    torch.manual_seed(0)
    model = TinyVAE(16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _loop(_monitor(tmp_path, model, opt), model, opt, 18, jolt=9, lr_jump=14)
    s = vaediag.load_run(tmp_path / "run").scalars
    recorded = s["step"][s["adam_rms_t"].notna()].tolist()
    assert recorded == [0, 4, 8, 9, 12, 14, 16]
    assert s["update_ratio"].notna().tolist() == s["adam_rms_t"].notna().tolist()
    assert s["adam_rms_t"][9] > 3 * s["adam_rms_t"][8]  # the jolt, seen as it happened


def test_a_smooth_lr_schedule_is_not_unusual(tmp_path):
    """A cosine decay moves the lr a little every step: the optimizer statistics keep their
    cadence."""
    import math

    torch.manual_seed(0)
    model = TinyVAE(16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _loop(_monitor(tmp_path, model, opt), model, opt, 17,
          lr_at=lambda s: 1e-3 * 0.5 * (1 + math.cos(math.pi * s / 200)))
    s = vaediag.load_run(tmp_path / "run").scalars
    assert s["lr"].diff().iloc[1:].lt(0).all()  # the lr did move at every step
    assert s["step"][s["adam_rms_t"].notna()].tolist() == [0, 4, 8, 12, 16]


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
    assert "split_cos" not in run.scalars and run.scalars["adam_rms_t"][::4].notna().all()


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
    assert run.scalars["update_ratio"].notna().tolist() == [True, False, False]  # every 4
    note = run.events[run.events["kind"] == "probe_not_applicable"].iloc[0]
    assert note["probe"] == "adam"


def test_a_single_step(tmp_path):
    model = TinyVAE(16)
    opt = torch.optim.Adam(model.parameters())
    mon = _monitor(tmp_path, model, opt, eval_every=500)
    _loop(mon, model, opt, 1)
    run = vaediag.load_run(tmp_path / "run")
    assert list(run.scalars["step"]) == [0] and list(run.evals["step"]) == [0, 1]


def test_nonfinite_gradient_is_named_and_skipped(tmp_path, capsys):
    model = TinyVAE(16)
    opt = torch.optim.Adam(model.parameters())
    mon = _monitor(tmp_path, model, opt, probes="standard", eval_every=1000)
    lines = []
    mon.echo = lines.append  # where the Monitor says things as they happen
    _loop(mon, model, opt, 3, poison=2)
    # said at once, at the step (the next evaluation is 1,000 steps away), and once
    assert lines[0] == ("non-finite values at step 2: grad:enc.1.weight (recorded; vaediag "
                        "analyze names where it started and why)")
    assert sum("non-finite values at step" in line for line in lines) == 1
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
    assert run.scalars["split_cos"].notna().sum() == 1  # step 0 (then every 100 steps)
    assert run.config["example"]["beta"] == 1.0


def test_nonfinite_origin_is_where_the_backward_pass_met_it_first(tmp_path):
    """NaN gradients in two layers: the one nearer the output (reached first by backward) is
    named, not the first parameter in order."""
    model = TinyVAE(16)
    opt = torch.optim.Adam(model.parameters())
    mon = _monitor(tmp_path, model, opt)
    x = torch.rand(16, 3, 16, 16)
    mu, _ = model.encode(x)
    loss = model.decode(mu).sum()
    loss.backward()
    model.enc[1].weight.grad[0, 0] = float("nan")
    model.dec[2].weight.grad[0, 0] = float("nan")
    check = mon.after_backward(0, recon=loss, kl=0.0)
    assert check.nonfinite == ["grad:dec.2.weight"]


def test_a_nonfinite_weight_is_found_by_scanning_the_parameters(tmp_path):
    model = TinyVAE(16)
    opt = torch.optim.Adam(model.parameters())
    mon = _monitor(tmp_path, model, opt)
    with torch.no_grad():
        model.dec[0].weight[0, 0] = float("inf")
    mu, _ = model.encode(torch.rand(16, 3, 16, 16))
    loss = model.decode_logits(mu).sum()
    loss.backward()
    check = mon.after_backward(0, recon=loss, kl=0.0)
    assert check.nonfinite[0] == "recon" and "weight:dec.0.weight" in check.nonfinite
    mon.after_step(0, skipped=True)
    mon.close("stopped", 1)
    found = vaediag.analyze(tmp_path / "run")
    (f,) = [f for f in found.findings if f.kind == "nonfinite"]
    assert "the weight of dec.0" in f.summary and "already Inf/NaN" in f.cause


class _BatchNormVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.LeakyReLU(),
                                 nn.Flatten(), nn.Linear(4 * 8 * 8, 8))
        self.dec = nn.Sequential(nn.Linear(4, 3 * 16 * 16), nn.Tanh())

    def encode(self, x):
        return self.enc(x).chunk(2, dim=1)

    def decode(self, z):
        return self.dec(z).view(-1, 3, 16, 16)


def test_creating_a_monitor_leaves_batch_norm_statistics_alone(tmp_path):
    model = _BatchNormVAE()
    bn = model.enc[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    vaediag.Monitor(tmp_path / "run", model, eval_images=images, value_range=(-1, 1))
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2] and model.training


def test_a_tanh_decoder_with_value_range(tmp_path, capsys):
    """Images in [-1, 1] are scored on [0, 1]: a perfect reconstruction has SSIM 1."""
    class Identity(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def encode(self, x):
            return x.flatten(1) * self.w, torch.zeros_like(x.flatten(1))

        def decode(self, z):
            return torch.tanh(torch.atanh(z.clamp(-0.999, 0.999))).view(-1, 3, 16, 16)

    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 1.9 - 0.95
    with pytest.raises(UserError, match=r"must lie in \[0, 1\] \(value_range\)"):
        vaediag.Monitor(tmp_path / "bad", Identity(), eval_images=images)
    mon = vaediag.Monitor(tmp_path / "run", Identity(), eval_images=images, value_range=(-1, 1))
    row = mon.evaluate(0)
    assert row["ssim"] == pytest.approx(1.0, abs=1e-4) and row["sat_ratio"] == pytest.approx(1)
    fixed = vaediag.load_run(tmp_path / "run").fixed["eval_images"]
    assert fixed.min() >= 0 and abs(int(fixed.max()) - 250) <= 3  # 0.95 -> 248 of 255
    assert "decoder's output leaves" not in capsys.readouterr().err
    with pytest.raises(UserError, match=r"for images in \[-1, 1\] pass value_range=\(-1, 1\)"):
        vaediag.Monitor(tmp_path / "bad", Identity(), eval_images=images)


def test_images_in_0_1_declared_as_minus_1_1_are_said_to_be_off(tmp_path, capsys):
    """Following a tanh advice on [0, 1] data maps it to [0.5, 1]: said once, naming the
    images' range and what to do instead."""
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mon = vaediag.Monitor(tmp_path / "run", TinyVAE(16), eval_images=images,
                          value_range=(-1, 1), probes="off", online=False)
    mon.close()
    err = capsys.readouterr().err
    assert err.count("value_range=(-1, 1) but the images lie in [7.97e-05, 1], none below 0") == 1
    assert "leave value_range at (0, 1)" in err
    run = vaediag.load_run(tmp_path / "run")
    assert "value_range" in set(run.events["what"].dropna())


def test_user_input_problems_are_said_once_and_recorded(tmp_path, capsys):
    """A decoder leaving [0, 1], a negative KL, and no eval_loss: one warning each, as events."""
    model = _BatchNormVAE()  # tanh output in [-1, 1], but value_range left at (0, 1)
    opt = torch.optim.Adam(model.parameters())
    mon = _monitor(tmp_path, model, opt, eval_every=2)
    for step in range(4):
        mu, _ = model.encode(torch.rand(8, 3, 16, 16))
        loss = model.decode(mu).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        mon.after_backward(step, recon=loss, kl=-0.5)
        opt.step()
        mon.after_step(step)
    mon.close()
    err = capsys.readouterr().err
    assert err.count("no eval_loss given") == 1
    assert err.count("the KL given at step 0 is negative") == 1
    assert err.count("decoder's output leaves value_range [0, 1]") == 1
    # the images are in [0, 1]: the decoder is off, never the range (no advice to pass (-1, 1))
    assert "end the decoder in a sigmoid" in err and "pass value_range=(-1, 1)" not in err
    run = vaediag.load_run(tmp_path / "run")
    warned = run.events[run.events["kind"] == "monitor_warning"]
    assert sorted(warned["what"]) == ["decoder_range", "negative_kl", "no_eval_loss",
                                      "no_train_images"]
    assert err.count("no train_images given: ") == 1 and "overfitting cannot be checked" in err
    assert run.scalars["eps"].eq(1e-8).all()  # Adam's eps, recorded every step


class _HostReads(TorchFunctionMode):
    """Counts reads of tensor values into Python (each one a device synchronisation on a GPU),
    except of the optimizer's step counts, which torch keeps on the CPU."""

    READS = frozenset({"tolist", "item", "__bool__", "__float__", "__int__", "__index__",
                       "cpu", "numpy"})

    def __init__(self, exempt):
        super().__init__()
        self.exempt = exempt
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS and not any(a is e for a in args[:1] for e in self.exempt):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_one_read_from_the_device_per_step(tmp_path):
    """The standard preset reads a step's values once: losses and gradient norm together with
    the previous step's probe values (Adam, update ratio at steps 0, 4, 8; latents and layer
    gradient norms every step). Measured from the third step on (the first ones plan)."""
    torch.manual_seed(0)
    model = TinyVAE(16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = _monitor(tmp_path, model, opt, eval_every=10_000)
    g = torch.Generator().manual_seed(0)
    data = torch.rand(64, 3, 16, 16, generator=g)
    reads = []
    for step in range(14):
        recon, kl, mu, logvar = _batch_losses(model, data, g)
        opt.zero_grad()
        (recon + kl).backward(retain_graph=mon.wants_graph(step))
        exempt = [s["step"] for s in opt.state.values()]
        with _HostReads(exempt) as counter:
            mon.after_backward(step, recon=recon, kl=kl, beta=1.0, mu=mu, logvar=logvar)
            opt.step()
            mon.after_step(step)
        reads.append(counter.reads)
    mon.close()
    assert all(r == ["numpy"] for r in reads[2:]), reads
    s = vaediag.load_run(tmp_path / "run").scalars
    assert s["adam_rms_t"].notna().sum() >= 4 and s["dim.kl/0"].notna().all()


def _deferred_run(tmp_path, name, read_before_step, poison=None, steps=24):
    torch.manual_seed(0)
    model = TinyVAE(16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = _monitor(tmp_path / name, model, opt, eval_every=10, online=False,
                   read_before_step=read_before_step)
    _loop(mon, model, opt, steps, poison=poison)
    return vaediag.load_run(tmp_path / name / "run")


def test_without_reading_during_a_step_every_row_is_the_same(tmp_path, monkeypatch):
    """``read_before_step=False``: a step's values are copied to the host without waiting and
    read at the next step (the CPU stand-in of a GPU's pinned, non-blocking copy), and the
    blocking read is never used in a step; the rows are those of the blocking Monitor, but
    for the non-finite count it no longer measures (NaN) and the when_unusual probes (none
    fire in this calm run)."""
    from vaediag.monitor import readback

    now = _deferred_run(tmp_path, "now", True)
    blocking = []
    original = readback.read_arrays

    def counted(groups):
        blocking.append(len(groups))
        return original(groups)

    monkeypatch.setattr("vaediag.monitor.reading.read_arrays", counted)
    later = _deferred_run(tmp_path, "later", False)
    assert blocking == [], "a blocking read during the steps"
    a, b = now.scalars, later.scalars
    assert b["step"].tolist() == list(range(24)) and list(b.columns) != []
    assert set(a.columns) == set(b.columns)
    for column in a.columns:
        if column in ("time", "grad_nonfinite"):
            continue
        assert a[column].equals(b[column]) or (a[column] - b[column]).abs().max() == 0, column
    assert b["grad_nonfinite"].isna().all() and (a["grad_nonfinite"] == 0).all()
    assert now.evals.drop(columns="time").equals(later.evals.drop(columns="time"))


def test_without_reading_during_a_step_a_nonfinite_gradient_is_recorded_a_step_later(tmp_path):
    """The step with NaN gradients is not skipped (its check is pending), and the event and
    the finding name it when the next step reads it."""
    run = _deferred_run(tmp_path, "nan", False, poison=7, steps=12)
    events = run.events
    bad = events[events["kind"] == "nonfinite"]
    assert bad["step"].tolist()[0] == 7 and "skipped_step" not in set(events["kind"])
    (f,) = [f for f in vaediag.analyze(tmp_path / "nan" / "run").findings
            if f.kind == "nonfinite"]
    assert f.first_step == 7


def test_read_before_step_must_be_a_flag(tmp_path):
    with pytest.raises(UserError, match="read_before_step= must be True or False"):
        _monitor(tmp_path, TinyVAE(16), None, read_before_step="no")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("read_before_step", "per_step"), [(True, 1), (False, 0)])
def test_device_synchronisations_per_step_on_a_gpu(tmp_path, read_before_step, per_step):
    """One per step when the loop needs the step's check before optimizer.step(); none when
    the values are copied without waiting and read a step later."""
    import warnings

    model = TinyVAE(16).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = _monitor(tmp_path, model, opt, eval_every=10_000, read_before_step=read_before_step)
    data = torch.rand(64, 3, 16, 16, device="cuda")
    syncs = []
    for step in range(10):
        x = data[step:step + 16]
        mu, logvar = model.encode(x)
        recon = F.binary_cross_entropy_with_logits(model.decode_logits(mu), x)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
        opt.zero_grad()
        (recon + kl).backward(retain_graph=mon.wants_graph(step))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            mon.after_backward(step, recon=recon, kl=kl, beta=1.0, mu=mu, logvar=logvar)
            torch.cuda.set_sync_debug_mode("default")
            opt.step()
            torch.cuda.set_sync_debug_mode("warn")
            mon.after_step(step)
            torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(w.message) for w in caught))
    mon.close()
    assert all(n == per_step for n in syncs[2:]), syncs
