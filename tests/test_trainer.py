from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import vaediag.trainer as trainer_module
from vaediag.config import build_config
from vaediag.errors import TrainingStopped
from vaediag.rundir import load_run
from vaediag.trainer import train

TINY = ["data.resolution=16", "data.toyfaces_size=256", "data.val_size=16",
        "model.channels=[8,16]", "model.latent_dim=4", "train.batch_size=16"]


def _config(*extra: str):
    return build_config(overrides=[*TINY, *extra])


def test_resume_continues_exactly(tmp_path):
    """20 steps + resume to 40 gives the same per-step rows as 40 steps in one go."""
    whole = train(_config("train.steps=40"), tmp_path / "whole", progress=False)
    assert whole.status == "finished" and whole.step == 40
    train(_config("train.steps=20"), tmp_path / "split", progress=False)
    resumed = train(_config("train.steps=40"), tmp_path / "split", resume=True, progress=False)
    assert resumed.step == 40
    a, b = load_run(tmp_path / "whole"), load_run(tmp_path / "split")
    assert list(b.scalars["step"]) == list(range(40))  # continuous, no duplicates
    # Every recorded column but the wall clock: losses and every probe's statistics.
    columns = [c for c in a.scalars.columns if c != "time"]
    assert len(columns) > 50 and "layer.adam_rms_t/decoder.out" in columns
    pd.testing.assert_frame_equal(a.scalars[columns], b.scalars[columns])
    # Both end on the same model: the final evaluations agree, drift included (probe state
    # is checkpointed), except the training averages, which restart at the resume.
    ea, eb = a.evals.set_index("step"), b.evals.set_index("step")
    same = [c for c in ea.columns if c not in ("time", "train_recon_avg", "train_kl_avg",
                                               "train_avg_steps")]
    pd.testing.assert_series_equal(ea.loc[40, same], eb.loc[40, same])
    kinds = list(b.events["kind"])
    assert kinds.count("resume") == 1 and b.status == "finished"


def test_checkpoints_load_with_weights_only(tmp_path):
    train(_config("train.steps=5"), tmp_path / "r", progress=False)
    (step, path), = load_run(tmp_path / "r").checkpoints[-1:]
    state = torch.load(path, weights_only=True)
    assert step == 5 and state["step"] == 5
    assert {"model", "optimizer", "sampler_rng", "torch_rng", "monitor"} <= set(state)
    assert "decoder.out.weight" in state["model"]


def _poison(monkeypatch, at_step: int, *, term: str = "kl", grad_of: str | None = None):
    """Make one loss term, or one parameter's gradient, NaN from ``at_step`` on."""
    real_terms = trainer_module.loss_terms
    real_build = trainer_module.ConvVAE.from_config
    seen = {"step": 0, "model": None}

    def build(config):
        seen["model"] = real_build(config)
        if grad_of is not None:
            param = dict(seen["model"].named_parameters())[grad_of]
            param.register_hook(lambda g: g * float("nan") if seen["step"] > at_step else g)
        return seen["model"]

    def poisoned(*args, **kwargs):
        terms = real_terms(*args, **kwargs)
        seen["step"] += 1
        if grad_of is None and seen["step"] > at_step:
            setattr(terms, term, getattr(terms, term) * float("nan"))
            terms.total = terms.recon + terms.beta * terms.kl
        return terms

    monkeypatch.setattr(trainer_module, "loss_terms", poisoned)
    monkeypatch.setattr(trainer_module.ConvVAE, "from_config", staticmethod(build))


def test_nonfinite_stop(tmp_path, monkeypatch):
    _poison(monkeypatch, at_step=7)
    # A NaN KL makes the encoder's gradients NaN too: the loss terms come first, then the layer
    # the backward pass met it in first (encoder.fc, where the KL enters), not the first layer.
    with pytest.raises(TrainingStopped, match=r"non-finite kl, total, "
                                              r"grad:encoder\.fc\.weight at step 7"):
        train(_config("train.steps=30", "train.on_nonfinite=stop"), tmp_path / "r",
              progress=False)
    run = load_run(tmp_path / "r")
    assert run.status == "stopped" and "step 7" in run.info["message"]
    assert list(run.scalars["step"]) == list(range(8))  # the bad row is kept as evidence
    assert np.isnan(run.scalars["kl"].iloc[-1])
    bad = run.events[run.events["kind"] == "nonfinite"]
    assert list(bad["term"]) == ["kl", "total", "grad:encoder.fc.weight"]
    assert set(bad["step"]) == {7}
    assert run.checkpoints[-1][0] == 7  # the state before the bad update, to resume from


def test_nonfinite_skip_keeps_the_weights_finite(tmp_path, monkeypatch):
    _poison(monkeypatch, at_step=3, grad_of="decoder.fc.weight")
    result = train(_config("train.steps=6", "train.on_nonfinite=skip"), tmp_path / "r",
                   progress=False)
    assert result.status == "finished"
    run = load_run(tmp_path / "r")
    bad = run.events[run.events["kind"] == "nonfinite"]
    assert list(bad["step"]) == [3, 4, 5]
    assert set(bad["term"]) == {"grad:decoder.fc.weight"}
    skipped = run.events[run.events["kind"] == "skipped_step"]
    assert list(skipped["step"]) == [3, 4, 5]
    state = torch.load(run.checkpoints[-1][1], weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_nonfinite_continue_records_every_occurrence(tmp_path, monkeypatch):
    _poison(monkeypatch, at_step=2, term="recon")
    result = train(_config("train.steps=5", "train.on_nonfinite=continue"), tmp_path / "r",
                   progress=False)
    assert result.status == "finished"
    run = load_run(tmp_path / "r")
    bad = run.events[(run.events["kind"] == "nonfinite") & (run.events["term"] == "recon")]
    assert list(bad["step"]) == [2, 3, 4]


def test_probes_do_not_change_training(tmp_path):
    """Recording is observation only: losses and gradients are the same with every preset."""
    columns = ["recon", "kl", "total", "grad_norm"]
    runs = {}
    for preset in ("off", "full"):
        train(_config("train.steps=12", f"probes.preset={preset}"), tmp_path / preset,
              progress=False)
        runs[preset] = load_run(tmp_path / preset).scalars[columns]
    pd.testing.assert_frame_equal(runs["off"], runs["full"])
