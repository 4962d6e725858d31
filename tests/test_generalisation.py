"""Held-out against training images: the generalisation detector on synthetic runs, the causes
other detectors name when a model memorises, the amortisation-gap probe against a model whose
best posterior is known in closed form, augmentation, and the training images' evaluation in a
real tiny run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vaediag
from vaediag.analysis.data import RunData, Skip
from vaediag.analysis.detectors import DETECTORS, decoupling, epoch_average, generalisation, latents
from vaediag.data.augment import augment, step_generator
from vaediag.monitor import captions
from vaediag.probes.amortisation import AmortisationGap, negative_elbo, refine
from vaediag.probes.context import EvalContext, ImageSet
from vaediag.rundir import load_run
from vaediag.testing import standard_evals, standard_scalars, write_run

N = 1500
EVAL_EVERY = 50
START = [{"kind": "start", "step": 0, "train_images": 128, "steps_per_epoch": 4}]


def run_data(tmp_path, evals, name="run", settings=(), events=START) -> RunData:
    cols = standard_scalars(N)
    return RunData(load_run(write_run(tmp_path / name, cols, evals, events=events,
                                      settings=settings)))


def memorising(seed: int = 0, heldout_rise: float = 20.0, ssim_loss: float = 0.06,
               train_fall: float = 40.0, learning: float = 30.0) -> dict[str, np.ndarray]:
    """Evaluations of a model that learns until step 600 (evaluation 12), then memorises: the
    held-out loss rises and its SSIM falls; the training images' loss keeps falling and their SSIM
    keeps rising."""
    ev = standard_evals(np.arange(0, N, EVAL_EVERY), seed=seed, train_images=True)
    n = len(ev["step"])
    after = np.clip(np.arange(n) - 12, 0, None) / (n - 13)
    falling = np.clip(12 - np.arange(n), 0, None) / 12  # both losses fall until step 600
    ev["eval_recon"] += (learning * falling + heldout_rise * after).astype(np.float32)
    ev["ssim"] -= (ssim_loss * after).astype(np.float32)
    ev["train_eval_recon"] -= (train_fall * np.arange(n) / n).astype(np.float32)
    ev["train_ssim"] += (0.1 * np.arange(n) / n).astype(np.float32)
    return ev


# -- the detector -------------------------------------------------------------------------------

def test_memorisation_found_with_the_model_to_keep(tmp_path):
    (f,) = generalisation.detect(run_data(tmp_path, memorising()))[0]
    assert (f.kind, f.severity) == ("overfitting", "warning")
    best, judged = f.compare_steps
    assert 450 <= best <= 700 < judged <= 1000, (best, judged)
    assert f.first_step == best == f.evidence["best_step"]
    assert "ssim" in f.evidence["quality_lost"]
    assert f.evidence["train_images"] == 128 and f.evidence["epochs_seen"] == judged / 4
    assert "memorises its 128 training images" in f.cause
    assert f"stop at step {best:,}" in f.remedies[0]  # no checkpoint in a synthetic run
    assert any("train.augment=flip_shift" in r for r in f.remedies)
    assert "seen" in f.summary and "128 training images" in f.summary


def test_only_the_loss_parting_is_info(tmp_path):
    (f,) = generalisation.detect(run_data(tmp_path, memorising(ssim_loss=0.0)))[0]
    assert f.severity == "info" and f.evidence["quality_lost"] == {}


@pytest.mark.parametrize("seed", range(4))
def test_calm_runs_with_training_images_stay_clean(tmp_path, seed):
    ev = standard_evals(np.arange(0, N, EVAL_EVERY), seed=seed, train_images=True)
    data = run_data(tmp_path, ev)
    for detector in DETECTORS:
        if detector is epoch_average:  # its info findings are expected on calm noise
            continue
        assert detector.detect(data)[0] == [], detector.NAME


def test_a_held_out_loss_still_improving_is_not_overfitting(tmp_path):
    ev = standard_evals(np.arange(0, N, EVAL_EVERY), train_images=True)
    n = len(ev["step"])
    ev["eval_recon"] -= (60 * np.arange(n) / n).astype(np.float32)  # slower than training
    ev["train_eval_recon"] -= (120 * np.arange(n) / n).astype(np.float32)
    assert generalisation.detect(run_data(tmp_path, ev))[0] == []


def test_both_sets_getting_worse_is_not_memorisation(tmp_path):
    ev = standard_evals(np.arange(0, N, EVAL_EVERY), train_images=True)
    n = len(ev["step"])
    worse = (30 * np.clip(np.arange(n) - 12, 0, None) / n).astype(np.float32)
    ev["eval_recon"] += worse
    ev["train_eval_recon"] += worse
    assert generalisation.detect(run_data(tmp_path, ev))[0] == []


def test_without_training_images_it_says_what_to_pass(tmp_path):
    ev = standard_evals(np.arange(0, N, EVAL_EVERY))
    with pytest.raises(Skip, match="train_images="):
        generalisation.detect(run_data(tmp_path, ev))
    checks = {c.detector: c for c in vaediag.analyze(run_data(tmp_path, ev, "b").run).checks}
    assert checks["generalisation"].status == "skipped"


def test_an_evaluation_is_judged_the_same_whatever_comes_later(tmp_path):
    ev = memorising()
    full = run_data(tmp_path, ev)
    (f,) = generalisation.detect(full)[0]
    cut = RunData(full.run.until(f.compare_steps[1] + EVAL_EVERY))
    (early,) = generalisation.detect(cut)[0]
    assert early.compare_steps == f.compare_steps


def _with_amortisation(ev: dict, held_gap_growth: float, held_refined_rise: float) -> dict:
    n = len(ev["step"])
    after = np.clip(np.arange(n) - 12, 0, None) / (n - 13)
    ev["amort_gap"] = (2.0 + held_gap_growth * after).astype(np.float32)
    ev["amort_refined"] = (1900.0 + held_refined_rise * after).astype(np.float32)
    ev["train_amort_gap"] = np.full(n, 0.5, np.float32)
    ev["train_amort_refined"] = (1880.0 - 30 * np.arange(n) / n).astype(np.float32)
    return ev


@pytest.mark.parametrize(("growth", "rise", "part"), [(18.0, 2.0, "encoder"),
                                                      (2.0, 18.0, "decoder")])
def test_the_amortisation_gap_tells_encoder_from_decoder(tmp_path, growth, rise, part):
    ev = _with_amortisation(memorising(), growth, rise)
    (f,) = generalisation.detect(run_data(tmp_path, ev))[0]
    assert f.evidence["amortisation"]["overfitted"] == part
    assert f"the {part}" in f.cause


# -- the right cause in the other detectors -----------------------------------------------------

def test_decoupling_blames_memorisation_when_the_training_images_kept_their_quality(tmp_path):
    ev = memorising(heldout_rise=8.0, ssim_loss=0.0, learning=0.0)
    ev["colour_de"][18:] += 6.0  # the held-out pictures lose colour, the training ones do not
    ev["sat_ratio"][18:] -= 0.3
    (f, *_) = decoupling.detect(run_data(tmp_path, ev))[0]
    assert f.cause.startswith("memorisation, not the loss")
    assert "entropy" not in f.cause  # not the BCE floor
    assert f.remedies[0].startswith("stop at step") and "memorisation" in f.evidence


def test_decoupling_under_a_rising_kl_weight_stays_the_trade(tmp_path):
    """Held-out and training images lose the same qualities: the objective traded them away,
    and the cause says so (the seed-decoupling case, told apart from memorisation)."""
    cols = standard_scalars(N)
    cols["beta"] = np.clip(cols["step"] / 1000, 0.05, 1.0).astype(np.float32) * 16
    ev = standard_evals(cols["step"][::EVAL_EVERY], train_images=True)
    for prefix in ("", "train_"):
        ev[f"{prefix}eval_recon"][18:] += 20.0
        ev[f"{prefix}eval_kl"][18:] *= 0.4
        ev[f"{prefix}orient_err"][18:] += 8.0
        ev[f"{prefix}colour_de"][18:] += 6.0
    data = RunData(load_run(write_run(tmp_path / "trade", cols, ev)))
    (f,) = decoupling.detect(data)[0]
    assert "memoris" not in f.cause and "KL weight rose" in f.cause
    assert f.remedies[0].startswith("stop the KL weight")
    assert generalisation.detect(data)[0] == []


def test_collapse_never_says_the_reconstructions_held_when_held_out_ones_got_worse(tmp_path):
    ev = memorising()
    ev["active_units"][15:] = 4.0  # 16 -> 4 units, from step 750
    (f,) = latents.detect(run_data(tmp_path, ev))[0]
    assert f.kind == "posterior_collapse" and f.severity == "info"
    assert "did not get worse" not in f.summary
    assert "memorisation" in f.summary and "memorises" in f.cause


def test_epoch_average_agreeing_with_the_training_snapshot_is_memorisation(tmp_path):
    ev = memorising()
    ev["train_recon_avg"] = (ev["train_eval_recon"] + 50).astype(np.float32)
    ev["train_recon_avg"][20] -= 30.0  # the average and the training snapshot fall together
    ev["train_eval_recon"][20] -= 30.0
    ev["eval_recon"][20] += 30.0  # ... while the held-out images' loss rises
    findings = epoch_average.detect(run_data(tmp_path, ev))[0]
    (f,) = [f for f in findings if f.compare_steps == [950, 1000]] or findings
    assert "not the averaging" in f.cause and "memorises" in f.cause


def test_remedies_the_run_already_applies_are_not_named(tmp_path):
    data = run_data(tmp_path, memorising(), settings=["train.augment=flip",
                                                      "optim.weight_decay=0.01"])
    (f,) = generalisation.detect(data)[0]
    assert not any("augment" in r for r in f.remedies)
    assert not any("weight decay" in r for r in f.remedies)


# -- the amortisation-gap probe -----------------------------------------------------------------

class LinearGaussian:
    """decode(z) = W z + b with unit Gaussian noise, W's columns orthogonal: the best Gaussian
    posterior is diagonal and known, sigma_i^2 = 1 / (1 + |w_i|^2), mu = Sigma W^T (x - b)."""

    def __init__(self, pixels: int = 12, latent: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(pixels, latent, generator=g, dtype=torch.float64))
        self.w = q * torch.tensor([0.5, 1.5, 3.0], dtype=torch.float64)
        self.b = torch.randn(pixels, generator=g, dtype=torch.float64)
        self.w.requires_grad_(True)  # a "decoder parameter": must get no gradient

    def loss(self, x, z, mu, logvar):
        recon = 0.5 * (x - z @ self.w.T - self.b).pow(2).sum(1)
        return recon, 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)

    def best(self, x):
        w = self.w.detach()
        var = 1 / (1 + (w * w).sum(0))
        return (x - self.b) @ w * var, var.log().expand(len(x), -1)

    def exact_negative_elbo(self, x, mu, logvar):
        """E_q[recon] + KL in closed form."""
        w = self.w.detach()
        recon = 0.5 * ((x - mu @ w.T - self.b).pow(2).sum(1)
                       + (logvar.exp() * (w * w).sum(0)).sum(1))
        return recon + 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)


def test_refining_reaches_the_best_posterior_and_the_gap_is_what_was_missing():
    model = LinearGaussian()
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    best_mu, best_logvar = model.best(x)
    mu, logvar = best_mu + 1.0, best_logvar  # an encoder whose means are off by one
    before, after = refine(model.loss, x, mu, logvar, steps=400, lr=0.05)
    optimum = model.exact_negative_elbo(x, best_mu, best_logvar)
    start = model.exact_negative_elbo(x, mu, logvar)
    # scored on 4 noise samples: within their spread of the closed-form values
    assert after.numpy() == pytest.approx(optimum.numpy(), abs=3.0)
    assert before.numpy() == pytest.approx(start.numpy(), abs=3.0)
    assert float(after.mean()) == pytest.approx(float(optimum.mean()), abs=1.0)
    assert float(before.mean()) == pytest.approx(float(start.mean()), abs=1.0)
    assert float((before - after).mean()) == pytest.approx(float((start - optimum).mean()),
                                                           rel=0.15)
    assert model.w.grad is None  # the decoder was frozen
    # an encoder that already gives the best posterior leaves nothing to gain
    before, after = refine(model.loss, x, best_mu, best_logvar)
    assert (before - after).max() < 0.5


def test_the_refined_loss_is_never_worse_and_is_scored_on_fixed_noise():
    model = LinearGaussian()
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mu, logvar = model.best(x)
    a = refine(model.loss, x, mu + 0.3, logvar, steps=3)
    b = refine(model.loss, x, mu + 0.3, logvar, steps=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (a[1] <= a[0]).all()
    noise = torch.zeros(1, 4, 3, dtype=torch.float64)  # z = mu: the loss at the mean
    recon, kl = model.loss(x, mu, mu, logvar)
    assert torch.allclose(negative_elbo(model.loss, x, mu, logvar, noise), recon + kl)


def test_the_probe_records_both_sets_and_nothing_without_an_eval_loss():
    model = LinearGaussian()
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mu, logvar = model.best(x)
    images = torch.zeros(8, 3, 2, 2)
    ctx = EvalContext(0, images, images, images[:1], images, mu + 1.0, logvar, None, None, None,
                      train=ImageSet(images, images, mu, logvar, None, x),
                      eval_loss=model.loss, inputs=x)
    out = {k: float(v) for k, v in AmortisationGap().compute(ctx).items()}
    assert set(out) == {"amort_gap", "amort_refined", "train_amort_gap", "train_amort_refined"}
    assert out["amort_gap"] > 5 * max(out["train_amort_gap"], 0.1)  # the worse encoding
    ctx.eval_loss = None
    assert AmortisationGap().compute(ctx) == {}


# -- augmentation -------------------------------------------------------------------------------

def test_augmentation_is_a_function_of_seed_and_step():
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert augment(x, "none", step_generator(0, 5)) is x
    a = augment(x, "flip_shift", step_generator(0, 5))
    assert torch.equal(a, augment(x, "flip_shift", step_generator(0, 5)))
    assert not torch.equal(a, augment(x, "flip_shift", step_generator(0, 6)))
    flipped = augment(x, "flip", step_generator(0, 5))
    for i in range(16):  # each image as it was or mirrored, exactly
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    assert 0 < sum(torch.equal(flipped[i], x[i]) for i in range(16)) < 16
    assert a.shape == x.shape
    with pytest.raises(ValueError, match="flip_shift"):
        augment(x, "rotate", step_generator(0, 0))


def test_shifts_move_the_image_and_repeat_its_border():
    x = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8).expand(64, 3, 8, 8).clone()
    shifted = augment(x, "flip_shift", step_generator(1, 0))
    moved = [i for i in range(64) if not (torch.equal(shifted[i], x[i])
                                          or torch.equal(shifted[i], x[i].flip(-1)))]
    assert moved  # some images moved by up to 1 px (1/16 of 8 px, at least 1)
    for i in moved:
        assert set(shifted[i].unique().tolist()) <= set(x[i].unique().tolist())


# -- in a real run ------------------------------------------------------------------------------

def test_a_trained_run_scores_fixed_training_images_like_the_grid(tiny_run):
    from vaediag.config import from_dict
    from vaediag.data import load_dataset, train_sample

    run = load_run(tiny_run)
    ev = run.evals
    for column in ("train_eval_recon", "train_eval_kl", "train_ssim", "train_factor_angle_err",
                   "amort_gap", "amort_refined", "train_amort_gap", "train_amort_refined"):
        assert ev[column].notna().all(), column
    assert (ev["amort_gap"] >= 0).all() and (ev["train_amort_gap"] >= 0).all()
    config = from_dict(run.config)
    images, _ = train_sample(load_dataset(config.data), config.data.seed)
    assert np.array_equal(run.fixed["train_images"], images)  # drawn from the training set
    assert "train_factor_angle" in run.fixed


def test_the_grid_header_shows_the_training_images():
    row = {"step": 400, "epoch": 3.0, "eval_recon": 1880.0, "eval_kl": 20.0,
           "train_eval_recon": 1830.5, "train_eval_kl": 21.0, "train_recon_avg": 1850.0,
           "train_kl_avg": 20.0, "train_avg_steps": 100}
    lines = captions.header(row)
    assert len(lines) == 4
    assert lines[1].startswith("these 8 held-out images") and "1,880.0" in lines[1]
    assert lines[2] == "8 training images, model as shown: recon 1,830.5  ·  KL 21.000"


def test_the_verdict_names_memorisation_when_it_is_why_the_loss_stopped_tracking(tmp_path):
    ev = memorising(learning=0.0, train_fall=120.0)
    ev["colour_de"][18:] += 6.0  # the held-out images lose colour too, the training ones not
    ev["sat_ratio"][18:] -= 0.3
    result = vaediag.analyze(run_data(tmp_path, ev).run)
    decoupled = [f for f in result.findings if f.kind == "loss_quality_decoupling"]
    assert decoupled and "memorisation" in decoupled[0].evidence
    assert vaediag.analysis.verdict(result).startswith("overfitting: ")
