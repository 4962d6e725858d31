"""Mixed precision in a user's loop: float16 under ``torch.autocast`` with a
``torch.amp.GradScaler`` (on the CPU, as on a GPU), the Monitor given the scaler."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import vaediag
from vaediag.rundir import load_run

sys.path.insert(0, "examples")
from own_loop import TinyVAE

RES = 16
STEPS = 40


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, RES, RES, generator=torch.Generator().manual_seed(seed))


def _fp16_run(path, *, unscale_first: bool = False, read_before_step: bool = True,
              tell_monitor: bool = True) -> dict:
    """A float16 loop with a GradScaler; returns what the loop saw at each step: the norm of
    the unscaled gradients (float64, computed here), the scale, and the StepCheck."""
    torch.manual_seed(0)
    model = TinyVAE(RES)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    data = _images(64, 2)
    seen: dict[str, list] = {"norm": [], "scale": [], "check": []}
    with vaediag.Monitor(path, model, optimizer, eval_images=_images(8, 1), eval_every=20,
                         probes="standard", online=False,
                         scaler=scaler if tell_monitor else None,
                         read_before_step=read_before_step) as mon:
        for step in range(STEPS):
            x = data[(step * 16) % 64:(step * 16) % 64 + 16]
            with torch.autocast("cpu", dtype=torch.float16):
                mu, logvar = model.encode(x)
                z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
                logits = model.decode_logits(z)
            recon = F.binary_cross_entropy_with_logits(logits.float(), x,
                                                       reduction="none").sum((1, 2, 3)).mean()
            kl = 0.5 * (mu.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).sum(1).mean()
            optimizer.zero_grad()
            scaler.scale(recon + kl).backward(retain_graph=mon.wants_graph(step))
            scale = scaler.get_scale()
            if unscale_first:  # a clipping loop: the gradients are unscaled before it looks
                scaler.unscale_(optimizer)
                divide = 1.0
            else:
                divide = scale
            grads = [p.grad.double() / divide for p in model.parameters()]
            seen["norm"].append(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
            seen["scale"].append(scale)
            check = mon.after_backward(step, recon=recon, kl=kl, mu=mu.float(),
                                       logvar=logvar.float())
            seen["check"].append(check)
            scaler.step(optimizer)
            scaler.update()
            mon.after_step(step)
    return seen


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("amp") / "run"
    return path, _fp16_run(path)


def test_gradient_norms_are_of_the_unscaled_gradients_and_the_scale_is_recorded(fp16_run):
    path, seen = fp16_run
    rows = load_run(path).scalars
    finite = np.isfinite(seen["norm"])
    assert finite.sum() >= STEPS // 2
    np.testing.assert_allclose(rows["grad_norm"].to_numpy()[finite],
                               np.asarray(seen["norm"])[finite], rtol=1e-5)
    assert rows["loss_scale"].tolist() == seen["scale"]
    assert seen["scale"][0] == 65536.0  # the scaler's first scale, before it calibrates


def test_the_scalers_skips_are_recorded_as_skips_not_as_faults(fp16_run):
    path, seen = fp16_run
    run = load_run(path)
    skipped = [s for s, c in enumerate(seen["check"]) if c.scaler_skip]
    lowered = [s for s in range(STEPS - 1) if seen["scale"][s + 1] < seen["scale"][s]]
    assert skipped and skipped == lowered  # each skip halved the scale; nothing else did
    assert all(not c.nonfinite for c in seen["check"])
    assert np.flatnonzero(run.scalars["scaler_skipped"].to_numpy() == 1).tolist() == skipped
    events = run.events
    assert (events["kind"] == "nonfinite").sum() == 0
    skips = events[events["kind"] == "scaler_skip"]
    assert skips["step"].tolist() == skipped
    assert all(str(origin).startswith("grad:") for origin in skips["origin"])


def test_a_loop_that_unscales_first_is_not_divided_twice(tmp_path):
    seen = _fp16_run(tmp_path / "run", unscale_first=True)
    rows = load_run(tmp_path / "run").scalars
    finite = np.isfinite(seen["norm"])
    np.testing.assert_allclose(rows["grad_norm"].to_numpy()[finite],
                               np.asarray(seen["norm"])[finite], rtol=1e-5)


def test_read_a_step_later_the_same_values_are_recorded(fp16_run, tmp_path):
    path, _ = fp16_run
    later = _fp16_run(tmp_path / "later", read_before_step=False)
    assert all(c.pending and not c.scaler_skip for c in later["check"])
    a, b = load_run(path).scalars, load_run(tmp_path / "later").scalars
    for column in ("grad_norm", "loss_scale", "scaler_skipped", "recon", "kl"):
        np.testing.assert_array_equal(a[column].to_numpy(), b[column].to_numpy(),
                                      err_msg=column)
    assert math.isnan(b["grad_nonfinite"].iloc[0])


def _scaled_run(tmp_path, name: str, mark_skips: bool):
    """A calm synthetic run under a GradScaler: nine calibration skips at the start (the
    scale halving from 65,536) and two isolated skips later, each with overflowed (Inf)
    gradients; ``mark_skips``: recorded as the Monitor records them (``scaler_skipped``)."""
    from vaediag.testing import LAYERS, standard_evals, standard_scalars, write_run

    n = 3000
    cols = standard_scalars(n)
    skips = [*range(9), 1200, 2400]
    scale = np.full(n, 65536.0 / 2 ** 9, np.float32)
    scale[:9] = 65536.0 / 2 ** np.arange(9)
    for at in skips:
        cols["grad_norm"][at] = np.inf
        cols["grad_nonfinite"][at] = 12.0
        for layer in LAYERS:
            cols[f"layer.grad_norm/{layer}"][at] = np.inf
    cols["loss_scale"] = scale
    if mark_skips:
        cols["scaler_skipped"] = np.isin(np.arange(n), skips).astype(np.float32)
    return vaediag.analyze(load_run(write_run(tmp_path / name, cols,
                                              standard_evals(cols["step"][::100]))))


def test_a_healthy_scaled_run_has_no_finding_above_info(tmp_path):
    """The scaler's calibration and its isolated skips are the scaler at work: nothing above
    info, and the analysis reads no gradient of a step the scaler skipped."""
    from vaediag.analysis.data import RunData

    calm = _scaled_run(tmp_path, "marked", mark_skips=True)
    assert [f for f in calm.findings if f.severity != "info"] == []
    data = RunData(load_run(tmp_path / "marked"))
    assert np.isnan(data.series("grad_norm")[[0, 8, 1200, 2400]]).all()
    assert np.isfinite(data.series("grad_norm")[[9, 1199, 1201]]).all()
    assert np.isnan(data.matrix("layer", "grad_norm").to_numpy()[1200]).all()
    assert not np.isnan(data.series("recon")[[0, 1200]]).any()  # only the gradients


def test_without_the_scaler_the_calibration_is_a_false_high_and_with_it_none(fp16_run,
                                                                           tmp_path):
    """The loop the issue reported: the same float16 loop with the Monitor not told of the
    scaler records the scaler's first skip as a non-finite fault (HIGH); told, nothing."""
    path, _ = fp16_run
    _fp16_run(tmp_path / "untold", tell_monitor=False)
    untold = vaediag.analyze(load_run(tmp_path / "untold"))
    assert [(f.kind, f.severity, f.first_step) for f in untold.findings
            if f.severity != "info"] == [("nonfinite", "high", 0)]
    told = vaediag.analyze(load_run(path))
    assert [f for f in told.findings if f.severity != "info"] == []


TINY = ["data.resolution=16", "data.toyfaces_size=256", "data.val_size=16",
        "model.channels=[8,16]", "model.latent_dim=4", "train.batch_size=16", "train.online=false",
        "eval.every_steps=10"]


def _train(path, *extra: str, resume: bool = False):
    from vaediag.config import build_config
    from vaediag.trainer import train

    return train(build_config(overrides=[*TINY, *extra]), path, resume=resume, progress=False,
                 quiet=True)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_vaediag_train_in_half_precision_resumes_exactly(tmp_path, precision):
    """``train.precision``: the forward pass under autocast (and float16's GradScaler, its
    scale and skips recorded, its state checkpointed): 10 steps and a resume to 20 record what
    20 steps in one go do."""
    import pandas as pd

    whole = _train(tmp_path / "whole", "train.steps=20", f"train.precision={precision}")
    assert whole.status == "finished" and whole.step == 20
    _train(tmp_path / "split", "train.steps=10", f"train.precision={precision}")
    _train(tmp_path / "split", "train.steps=20", f"train.precision={precision}", resume=True)
    a, b = load_run(tmp_path / "whole"), load_run(tmp_path / "split")
    columns = [c for c in a.scalars.columns if c != "time"]
    pd.testing.assert_frame_equal(a.scalars[columns], b.scalars[columns])
    assert ("loss_scale" in columns) == (precision == "fp16")
    assert np.isfinite(a.scalars["recon"]).all()
    assert (a.events["kind"] == "nonfinite").sum() == 0
    if precision == "fp16":  # the scaler calibrates from 65,536: its skips are not faults
        scale = a.scalars["loss_scale"].to_numpy()
        skipped = a.scalars["scaler_skipped"].to_numpy() == 1
        assert scale[0] == 65536.0 and skipped.sum() >= 1 and (np.diff(scale) <= 0).all()
        assert (np.flatnonzero(np.diff(scale) < 0) == np.flatnonzero(skipped[:-1])).all()
    fp32 = _train(tmp_path / "fp32", "train.steps=20")
    c = load_run(fp32.run_dir).scalars
    assert "loss_scale" not in c.columns
    # the same model and data: half precision trains close to float32 at the first step
    assert a.scalars["recon"].iloc[0] == pytest.approx(c["recon"].iloc[0], rel=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("read_before_step", "per_step"), [(True, 1), (False, 0)])
def test_the_scaler_adds_no_device_synchronisation_on_a_gpu(tmp_path, read_before_step,
                                                            per_step):
    """float16 on CUDA with a GradScaler: the Monitor's calls synchronise as often as without
    one (the scale is read with the step's values; ``get_scale()`` would synchronise)."""
    import warnings

    model = TinyVAE(RES).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    mon = vaediag.Monitor(tmp_path / "run", model, optimizer, eval_images=_images(8, 1),
                          eval_every=10_000, probes="off", online=False, scaler=scaler,
                          read_before_step=read_before_step)
    data = torch.rand(64, 3, RES, RES, device="cuda")
    syncs = []
    for step in range(10):
        x = data[step:step + 16]
        with torch.autocast("cuda", dtype=torch.float16):
            mu, logvar = model.encode(x)
            logits = model.decode_logits(mu)
        recon = F.binary_cross_entropy_with_logits(logits.float(), x)
        kl = 0.5 * (mu.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).sum(1).mean()
        optimizer.zero_grad()
        scaler.scale(recon + kl).backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            mon.after_backward(step, recon=recon, kl=kl, beta=1.0, mu=mu, logvar=logvar)
            torch.cuda.set_sync_debug_mode("default")
            scaler.step(optimizer)
            scaler.update()
            torch.cuda.set_sync_debug_mode("warn")
            mon.after_step(step)
            torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(w.message) for w in caught))
    mon.close()
    assert all(n == per_step for n in syncs[2:]), syncs
    assert "loss_scale" in load_run(tmp_path / "run").scalars.columns


def test_a_loss_scale_that_keeps_collapsing_is_high_and_names_the_gradient(tmp_path):
    """Past its calibration, the scaler skipping step after step (a value overflowing float16
    at every step): one high finding from the first of those skips, naming the gradient the
    Monitor saw overflow first; the calibration and an isolated skip before it are not in it."""
    from vaediag.testing import standard_evals, standard_scalars, write_run

    n = 3000
    cols = standard_scalars(n)
    skips = np.zeros(n, np.float32)
    skips[:6] = 1  # calibration
    skips[900] = 1  # the scaler trying a larger scale
    skips[2000:2120] = 1  # every step: the scale falls and falls
    scale = 65536.0 / 2 ** np.cumsum(skips)
    cols["loss_scale"], cols["scaler_skipped"] = scale.astype(np.float32), skips
    cols["grad_norm"][skips == 1] = np.inf
    events = [{"kind": "scaler_skip", "step": int(s), "loss_scale": float(scale[s]),
               "origin": "grad:decoder.out.weight" if s >= 2000 else "grad:encoder.fc.weight"}
              for s in np.flatnonzero(skips)]
    run = load_run(write_run(tmp_path / "run", cols, standard_evals(cols["step"][::100]),
                             events=events))
    analysis = vaediag.analyze(run)
    (f,) = [f for f in analysis.findings if f.kind == "loss_scale_collapse"]
    assert f.severity == "high" and (f.first_step, f.last_step) == (2000, 2119)
    assert f.evidence["skipped"] == 120 and f.evidence["origin"] == "grad:decoder.out.weight"
    assert "decoder.out.weight overflowed first" in f.summary
    assert any("bfloat16" in r for r in f.remedies)
    # the healthy twin: calibration and the isolated skip only
    skips[2000:2120] = 0
    cols["scaler_skipped"] = skips
    cols["grad_norm"] = standard_scalars(n)["grad_norm"]
    twin = vaediag.analyze(load_run(write_run(tmp_path / "twin", cols,
                                              standard_evals(cols["step"][::100]))))
    assert [f for f in twin.findings if f.severity != "info"] == []


def _overflow_run(path, kl_in_float32: bool) -> vaediag.Analysis:
    """A float16 loop whose encoder's log-variance sits near 12 (its bias planted at step 30),
    with the KL computed under autocast (exp(logvar) overflows float16) or in float32."""
    torch.manual_seed(0)
    model = TinyVAE(RES)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cpu")
    data = _images(64, 2)
    with vaediag.Monitor(path, model, optimizer, eval_images=_images(8, 1), eval_every=20,
                         probes="cheap", online=False, scaler=scaler) as mon:
        for step in range(60):
            if step == 30:
                with torch.no_grad():
                    model.to_stats.bias[8:] = 12.0
            x = data[(step * 16) % 64:(step * 16) % 64 + 16]
            with torch.autocast("cpu", dtype=torch.float16):
                mu, logvar = model.encode(x)
                logits = model.decode_logits(mu)
                if not kl_in_float32:
                    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
            if kl_in_float32:
                kl = 0.5 * (mu.float().pow(2) + logvar.float().exp() - 1
                            - logvar.float()).sum(1).mean()
            recon = F.binary_cross_entropy_with_logits(logits.float(), x,
                                                       reduction="none").sum((1, 2, 3)).mean()
            optimizer.zero_grad()
            scaler.scale(recon + kl.float()).backward()
            check = mon.after_backward(step, recon=recon, kl=kl.float(), mu=mu.float(),
                                       logvar=logvar.float())
            if check.nonfinite:  # the loop's policy: skip the step, keep the scaler's state
                optimizer.zero_grad()
                mon.after_step(step, skipped=True)
                continue
            scaler.step(optimizer)
            scaler.update()
            mon.after_step(step)
    return vaediag.analyze(load_run(path))


def test_a_forward_overflow_in_float16_names_exp_logvar_and_its_float32_twin_is_calm(tmp_path):
    """The KL under autocast: exp(logvar) passes 65,504 once logvar exceeds 11, the KL is Inf
    from the planted step on; the finding says so and says what to keep in float32. The same
    loop with the KL in float32 has no non-finite value."""
    overflow = _overflow_run(tmp_path / "half", kl_in_float32=False)
    (f,) = [f for f in overflow.findings if f.kind == "nonfinite"]
    assert f.first_step == 30 and f.severity == "high"
    assert "exp(logvar) passes 65,504" in f.cause and "overflowed float16" in f.cause
    assert any("float32" in r for r in f.remedies) and any("bfloat16" in r for r in f.remedies)
    twin = _overflow_run(tmp_path / "float32", kl_in_float32=True)
    assert not [f for f in twin.findings if f.kind == "nonfinite"]


def _bf16_weights_run(path, half_weights: bool) -> vaediag.Analysis:
    """A loop whose model (weights and all) is moved to bfloat16 with ``.to()``, Adam at lr
    1e-4; or the same model in float32. The Monitor's encode and decode take float32 images."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if half_weights else torch.float32
    model = TinyVAE(RES).to(dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = _images(64, 2)
    with vaediag.Monitor(path, model, optimizer, eval_images=_images(8, 1), eval_every=40,
                         probes="standard", online=False,
                         encode=lambda x: tuple(t.float() for t in model.encode(x.to(dtype))),
                         decode=lambda z: model.decode(z.to(dtype)).float()) as mon:
        for step in range(80):
            x = data[(step * 16) % 64:(step * 16) % 64 + 16]
            mu, logvar = (t.float() for t in model.encode(x.to(dtype)))
            logits = model.decode_logits(mu.to(dtype)).float()
            recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(
                (1, 2, 3)).mean()
            kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
            optimizer.zero_grad()
            (recon + kl).backward()
            mon.after_backward(step, recon=recon, kl=kl, mu=mu, logvar=logvar)
            optimizer.step()
            mon.after_step(step)
    return vaediag.analyze(load_run(path))


def test_updates_lost_to_bfloat16_weights_are_a_finding_and_float32_weights_lose_none(tmp_path):
    """Weights kept in bfloat16: most of Adam's small steps round away, which the update probe
    measures (entries left unchanged) and the analysis names, with float32 weights under
    autocast as the remedy. The same model in float32 records no such column."""
    half = _bf16_weights_run(tmp_path / "bf16", half_weights=True)
    (f,) = [f for f in half.findings if f.kind == "lost_updates"]
    assert f.severity == "warning" and f.evidence["lost_share"] >= 0.5
    assert "autocast" in f.remedies[0]
    lost = load_run(tmp_path / "bf16").scalars["update_lost"].dropna()
    assert len(lost) >= 10 and ((lost >= 0) & (lost <= 1)).all()
    full = _bf16_weights_run(tmp_path / "fp32", half_weights=False)
    assert not [f for f in full.findings if f.kind == "lost_updates"]
    assert "update_lost" not in load_run(tmp_path / "fp32").scalars.columns


def test_a_model_moved_to_bfloat16_mid_run_keeps_every_probe(tmp_path, capsys):
    """A checkpoint loaded into a model moved to bfloat16 halfway: the probes follow the new
    dtype (none fails), the update probe starts counting lost updates from then on, and the
    recon/KL gradient split is still recorded."""
    torch.manual_seed(0)
    model = TinyVAE(RES)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = _images(64, 2)
    dtype = lambda: next(model.parameters()).dtype  # noqa: E731
    with vaediag.Monitor(tmp_path / "run", model, optimizer, eval_images=_images(8, 1),
                         eval_every=10, probes="full", online=False,
                         encode=lambda x: tuple(t.float() for t in model.encode(x.to(dtype()))),
                         decode=lambda z: model.decode(z.to(dtype())).float()) as mon:
        for step in range(40):
            x = data[(step * 16) % 64:(step * 16) % 64 + 16].to(dtype())
            mu, logvar = (t.float() for t in model.encode(x))
            logits = model.decode_logits(mu.to(dtype())).float()
            recon = F.binary_cross_entropy_with_logits(logits, x.float(), reduction="none").sum(
                (1, 2, 3)).mean()
            kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
            optimizer.zero_grad()
            (recon + kl).backward(retain_graph=mon.wants_graph(step))
            mon.after_backward(step, recon=recon, kl=kl, mu=mu, logvar=logvar, kl_term=kl)
            optimizer.step()
            if step == 19:  # the model after 20 updates, its optimizer state following
                state = optimizer.state_dict()
                model.to(torch.bfloat16)
                optimizer.load_state_dict(state)
            mon.after_step(step)
    assert "failed" not in capsys.readouterr().err
    s = load_run(tmp_path / "run").scalars.set_index("step")
    lost = s["update_lost"]
    assert lost.loc[:19].isna().all() and lost.loc[20:].notna().sum() >= 3
    assert lost.loc[20:].dropna().between(0, 1).all()
    assert s["update_ratio"].loc[:18].notna().any() and s["update_ratio"].loc[21:].notna().any()
    assert np.isfinite(s["split_cos"].loc[21:].dropna()).sum() >= 1


def test_a_sample_overflowing_float16_is_named_and_a_kl_in_float32_does_not_overflow(tmp_path):
    """``vaediag train`` keeps the KL in float32, but the sample z = mu + eps * exp(logvar/2)
    is computed under autocast: the log-variance lifted past 22.2 (``logvar_jump``) overflows
    it, and the finding names the sample, not the KL, with the clamp as the first remedy.
    Lifted by 12 only, exp(logvar) would overflow a float16 KL; in float32 nothing does."""
    from vaediag.errors import TrainingStopped

    with pytest.raises(TrainingStopped, match="at step 10"):
        _train(tmp_path / "z", "train.steps=20", "train.precision=fp16",
               "train.on_nonfinite=stop", "train.inject=['logvar_jump@10:shift=24']")
    (f,) = [f for f in vaediag.analyze(load_run(tmp_path / "z")).findings
            if f.kind == "nonfinite"]
    assert f.first_step == 10 and "exp(logvar/2)" in f.cause and "recon" in f.cause
    assert "loss.logvar_clamp=[-30.0,11.0]" in f.remedies[0]
    _train(tmp_path / "kl", "train.steps=20", "train.precision=fp16",
           "train.inject=['logvar_jump@10:shift=12']")
    run = load_run(tmp_path / "kl")
    assert np.isfinite(run.scalars["kl"]).all() and run.scalars["kl"].iloc[12] > 1e3
    assert not [f for f in vaediag.analyze(run).findings if f.kind == "nonfinite"]
