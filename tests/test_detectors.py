"""Each detector on small synthetic runs: a planted event is found where it was planted, and a
calm run stays clean (over several seeds, so thresholds are not tuned to one)."""

from __future__ import annotations

import numpy as np
import pytest

import vaediag
from vaediag.analysis.data import RunData
from vaediag.analysis.detectors import (
    DETECTORS,
    adam,
    decoupling,
    drift,
    epoch_average,
    gradients,
    kl_explosion,
    latents,
    loss_spikes,
    nonfinite,
)
from vaediag.rundir import load_run
from vaediag.testing import standard_evals, standard_scalars, write_run

N = 1500
EVAL_EVERY = 50


def run_data(tmp_path, scalars=None, evals=None, seed=0, **kwargs) -> RunData:
    cols = scalars if scalars is not None else standard_scalars(N, seed=seed)
    ev = evals if evals is not None else standard_evals(cols["step"][::EVAL_EVERY], seed=seed)
    return RunData(load_run(write_run(tmp_path / f"run{seed}", cols, ev, **kwargs)))


def kinds(findings) -> list[str]:
    return [f.kind for f in findings]


@pytest.mark.parametrize("seed", range(4))
def test_calm_runs_stay_clean(tmp_path, seed):
    ev = standard_evals(standard_scalars(N, seed=seed)["step"][::EVAL_EVERY], seed=seed,
                        train_images=True)
    data = run_data(tmp_path, evals=ev, seed=seed)
    for detector in DETECTORS:
        if detector is epoch_average:  # its info findings are expected on calm noise
            continue
        findings, _ = detector.detect(data)
        assert findings == [], (detector.NAME, [f.summary for f in findings])


def test_calm_run_has_no_finding_above_info(tmp_path):
    ev = standard_evals(standard_scalars(N, seed=7)["step"][::EVAL_EVERY], seed=7,
                        train_images=True)
    result = vaediag.analyze(run_data(tmp_path, evals=ev, seed=7).run)
    assert all(f.severity == "info" for f in result.findings), result.findings
    assert all(c.status == "ok" for c in result.checks if c.detector != "lpips")


# -- non-finite ---------------------------------------------------------------------------------

def test_nonfinite_names_first_step_term_layer_and_what_was_extreme(tmp_path):
    cols = standard_scalars(N)
    cols["kl"][900] = np.nan
    cols["grad_norm"][890:900] = 5e4  # extreme just before
    events = [{"kind": "nonfinite", "step": 900, "term": "grad:decoder.fc.weight"}]
    findings, signals = nonfinite.detect(run_data(tmp_path, cols, events=events))
    (f,) = findings
    assert (f.kind, f.severity, f.first_step) == ("nonfinite", "high", 900)
    assert f.evidence["layer"] == "decoder.fc"
    assert "kl" in f.evidence["terms"]
    assert f.evidence["extreme_before"][0]["column"] == "grad_norm"
    assert "decoder.fc" in f.summary and signals[0].step == 900


def test_nonfinite_episodes_apart_are_separate_findings_with_their_own_causes(tmp_path):
    """A NaN in one batch at step 400, then, after a learning-rate jump at 900, NaN gradients
    at 902-997: two findings, the second with the learning rate before it and not folded
    into the first."""
    cols = standard_scalars(N)
    cols["recon"][400] = np.nan  # one bad batch: the forward pass
    cols["lr"][900:] = cols["lr"][0] * 30
    cols["kl"][902:998] = np.nan
    events = [{"kind": "nonfinite", "step": 400, "term": "recon"},
              {"kind": "nonfinite", "step": 400, "term": "grad:decoder.fc.weight"},
              *({"kind": "nonfinite", "step": s, "term": "grad:encoder.fc.weight"}
                for s in range(902, 998))]
    findings, signals = nonfinite.detect(run_data(tmp_path, cols, events=events))
    first, second = findings
    assert (first.first_step, first.last_step, first.evidence["steps_affected"]) == \
        (400, 400, 1)
    assert (second.first_step, second.last_step, second.evidence["steps_affected"]) == \
        (902, 997, 96)
    assert "episode 2 of 2; an earlier one at step 400" in second.summary
    assert second.cause.startswith("the learning rate rose 30x")
    assert "2 step(s) before" in second.cause
    assert "jumped 30x" in second.remedies[0]
    assert [s.step for s in signals] == [400, 902]
    # the first: a loss made non-finite by the forward pass, from finite weights
    assert "forward pass" in first.cause
    assert not any("clip gradients" in r for r in first.remedies)
    assert "NaN/Inf pixels" in first.remedies[0]
    # close together, one episode
    assert nonfinite.episodes([10, 30, 80, 131]) == [[10, 30, 80], [131]]


# -- loss spikes --------------------------------------------------------------------------------

def test_loss_spike_found_with_its_recovery(tmp_path):
    cols = standard_scalars(N)
    cols["recon"][1000:1005] *= 3
    cols["total"] = cols["recon"] + cols["kl"]
    (f,) = loss_spikes.detect(run_data(tmp_path, cols))[0]
    assert f.first_step == 1000 and f.severity == "warning"
    spike = next(s for s in f.evidence["spikes"] if s["term"] == "recon")
    assert spike["ratio"] == pytest.approx(3, rel=0.15)
    assert 4 <= spike["recovery_steps"] <= 8


def test_severity_is_the_harm_to_the_objective(tmp_path):
    cols = standard_scalars(N)
    cols["recon"][700] *= 20  # one step that cost 19 steps' worth of loss
    cols["recon"][1200:] *= 1.5  # never comes back
    cols["total"] = cols["recon"] + cols["kl"]
    cols["kl"][1000] *= 20  # a 20x KL blip: the objective (recorded total) does not move
    findings = loss_spikes.detect(run_data(tmp_path, cols))[0]
    by_step = {f.first_step: f for f in findings}
    assert by_step[700].severity == "high"
    assert by_step[700].evidence["harm_steps"] == pytest.approx(19, rel=0.1)
    assert by_step[1200].severity == "high" and "did not recover" in by_step[1200].summary
    blip = by_step[1000]
    assert blip.severity == "info" and blip.evidence["harm_steps"] == 0
    assert "not an instability" in blip.cause and blip.remedies == []


def test_small_one_step_blip_of_a_smooth_loss_is_info(tmp_path):
    """A mean-reduced loss is so smooth that a 1.19x blip has a huge z: still no harm."""
    cols = standard_scalars(N)
    cols["recon"] = (cols["recon"] / 1900 * 0.02).astype(np.float32)
    cols["recon"] = 0.02 + (cols["recon"] - 0.02) * 0.05  # noise 0.1%
    cols["kl"] = cols["kl"] / 1000
    cols["recon"][900] *= 1.19
    cols["total"] = cols["recon"] + 2.5e-4 * cols["kl"]
    (f,) = loss_spikes.detect(run_data(tmp_path, cols))[0]
    assert f.first_step == 900 and f.evidence["spikes"][0]["z"] > 50
    assert f.severity == "info" and f.evidence["harm_steps"] < 1


def test_kl_that_collapses_after_a_spike_has_not_recovered(tmp_path):
    cols = standard_scalars(N)
    cols["kl"][800:803] *= 30
    cols["kl"][803:] = 1e-6
    (f,) = loss_spikes.detect(run_data(tmp_path, cols))[0]
    assert f.first_step == 800 and "then collapsed to" in f.summary
    assert f.evidence["recovered"] is False
    assert any("free bits" in r for r in f.remedies)


@pytest.mark.parametrize(("column", "value", "cause"), [
    ("lr", 3e-2, "the learning rate rose 30x"), ("eps", 1e-16, "Adam's eps fell"),
    ("grad_norm", 1e5, "the gradient norm jumped"), (None, None, "the batch at step 1,000")])
def test_spike_cause_is_read_off_the_recorded_columns(tmp_path, column, value, cause):
    cols = standard_scalars(N)
    if column == "eps":
        cols["eps"] = np.full(N, 1e-8, np.float32)
    if column is not None:
        cols[column][999:1010] = value
    cols["recon"][1000:1010] *= 4
    cols["total"] = cols["recon"] + cols["kl"]
    (f,) = loss_spikes.detect(run_data(tmp_path, cols))[0]
    assert f.first_step == 1000 and cause in f.cause, f.cause


def test_spike_of_a_loss_that_can_be_negative_is_described_by_its_rise(tmp_path):
    cols = standard_scalars(N)
    cols["recon"] = cols["recon"] - 6000.0  # a Gaussian NLL: about -4100, never positive
    cols["recon"][1000:1010] += 900.0
    cols["total"] = cols["recon"] + cols["kl"]
    (f,) = loss_spikes.detect(run_data(tmp_path, cols))[0]
    assert f.first_step == 1000 and f.severity == "warning"
    assert "recon rose by 9" in f.summary and "x (" not in f.summary
    spike = next(s for s in f.evidence["spikes"] if s["term"] == "recon")
    assert spike["ratio"] is None
    assert spike["peak_value"] - spike["baseline"] == pytest.approx(900, rel=0.2)


def test_spike_in_the_burn_in_is_ignored(tmp_path):
    cols = standard_scalars(N)
    cols["recon"][50] *= 5
    assert loss_spikes.detect(run_data(tmp_path, cols))[0] == []


# -- KL explosion -------------------------------------------------------------------------------

@pytest.mark.parametrize(("factor", "severity"), [(8.0, "high"), (3.0, "warning")])
def test_kl_level_shift_is_an_explosion(tmp_path, factor, severity):
    cols = standard_scalars(N)
    cols["kl"][1000:] *= factor
    (f,) = kl_explosion.detect(run_data(tmp_path, cols))[0]
    assert abs(f.first_step - 1000) <= 3
    assert f.severity == severity
    assert f.evidence["factor"] == pytest.approx(factor, rel=0.1)


def test_kl_spike_that_comes_back_is_not_an_explosion(tmp_path):
    cols = standard_scalars(N)
    cols["kl"][1000:1030] *= 8
    assert kl_explosion.detect(run_data(tmp_path, cols))[0] == []


def test_kl_that_drifts_up_slowly_is_not_an_explosion(tmp_path):
    cols = standard_scalars(N)
    cols["kl"] *= np.linspace(1, 3, N).astype(np.float32)  # steady growth, no level shift
    assert kl_explosion.detect(run_data(tmp_path, cols))[0] == []


# -- gradients ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("factor", "severity"), [(1000.0, "high"), (20.0, "warning")])
def test_gradient_explosion_per_layer(tmp_path, factor, severity):
    cols = standard_scalars(N)
    cols["layer.grad_norm/decoder.out"][1000] *= factor
    findings, signals = gradients.detect(run_data(tmp_path, cols))
    (f,) = findings
    assert (f.kind, f.first_step, f.severity) == ("grad_explosion", 1000, severity)
    assert f.evidence["layers"] == ["decoder.out"]
    assert [s.where for s in signals] == ["decoder.out"]


def test_vanishing_gradients(tmp_path):
    cols = standard_scalars(N)
    cols["layer.grad_norm/encoder.blocks.0.conv"][800:] /= 1e4
    findings = gradients.detect(run_data(tmp_path, cols))[0]
    (f,) = [f for f in findings if f.kind == "grad_vanishing"]
    assert "encoder.blocks.0.conv" in f.evidence["layers"]
    assert 800 <= f.first_step <= 850


# -- Adam ---------------------------------------------------------------------------------------

def test_adam_sustained_conditions(tmp_path):
    cols = standard_scalars(N)
    cols["layer.adam_eps_frac/encoder.fc"][800:] = 0.9
    cols["layer.update_ratio/encoder.fc"][800:] /= 20  # the harm: that layer stopped learning
    cols["layer.adam_update_rms/decoder.fc"][800:] = 0.9
    cols["layer.adam_rms_t/decoder.out"][800:] = 2.5
    findings = adam.detect(run_data(tmp_path, cols, settings=["optim.eps=1e-8"]))[0]
    by_kind = {f.kind: f for f in findings}
    assert set(by_kind) == {"adam_eps_dominated", "adam_update_rms_high", "adam_rms_t_high"}
    assert list(by_kind["adam_eps_dominated"].evidence["layers"]) == ["encoder.fc"]
    # eps-dominance that began during training and stopped a layer learning is a warning;
    # agreeing gradients and a lagging v^ are info until harm follows them (incidents.grade)
    assert by_kind["adam_eps_dominated"].severity == "warning"
    assert 15 < by_kind["adam_eps_dominated"].evidence["updates_shrank"] < 25
    assert "dead units" in " ".join(by_kind["adam_eps_dominated"].remedies)
    assert by_kind["adam_update_rms_high"].severity == "info"
    assert by_kind["adam_rms_t_high"].severity == "info"
    for f in findings:
        assert 800 <= f.first_step <= 800 + adam.WINDOW


def test_eps_dominance_from_a_recorded_eps_change_names_it(tmp_path):
    cols = standard_scalars(N)
    cols["eps"] = np.full(N, 1e-8, np.float32)
    cols["eps"][700:] = 1.0
    frac = np.full(N, np.nan, np.float32)
    frac[::10] = 0.01
    frac[700::10] = 0.997
    cols["layer.adam_eps_frac/encoder.fc"] = frac
    cols["layer.update_ratio/encoder.fc"][700:] /= 1e4
    (f,) = [f for f in adam.detect(run_data(tmp_path, cols))[0]
            if f.kind == "adam_eps_dominated"]
    assert f.severity == "warning" and 700 <= f.first_step <= 710
    assert "Adam's eps rose" in f.cause and "set eps back to 1e-08" in f.remedies[0]


def test_eps_dominance_whose_updates_did_not_shrink_is_a_risk_only(tmp_path):
    cols = standard_scalars(N)
    cols["layer.adam_eps_frac/encoder.fc"][800:] = 0.9
    (f,) = [f for f in adam.detect(run_data(tmp_path, cols))[0]
            if f.kind == "adam_eps_dominated"]
    assert f.severity == "info" and "a risk only: their updates did not shrink" in f.summary
    assert f.evidence["updates_shrank"] < adam.EPS_SHRINK


def test_eps_dominance_from_the_start_is_info(tmp_path):
    cols = standard_scalars(N)
    cols["layer.adam_eps_frac/encoder.fc"][:] = 0.8
    (f,) = [f for f in adam.detect(run_data(tmp_path, cols))[0]
            if f.kind == "adam_eps_dominated"]
    assert f.severity == "info" and "throughout" in f.summary


@pytest.mark.parametrize("onset, linked", [(970, True), (940, False), (800, False)])
def test_conditions_become_warnings_when_a_spike_follows_closely(tmp_path, onset, linked):
    """A condition is linked to harm that starts within 50 steps of its onset (an effect of
    Adam's state shows within a few of its memory lengths), never across hundreds of steps."""
    cols = standard_scalars(N)
    cols["layer.adam_rms_t/decoder.out"][onset:] = 2.5
    cols["recon"][1000:1010] *= 4
    cols["total"] = cols["recon"] + cols["kl"]
    result = vaediag.analyze(run_data(tmp_path, cols).run)
    (f,) = [f for f in result.findings if f.kind == "adam_rms_t_high"]
    assert f.first_step == onset
    assert (f.severity == "warning") is linked
    assert ("followed by a loss spike at step 1,000" in f.summary) is linked


def test_low_learning_rate_explains_agreeing_gradients(tmp_path):
    cols = standard_scalars(N)
    cols["lr"][:] = 1e-4
    cols["layer.adam_update_rms/decoder.fc"][:] = 0.9
    (f,) = adam.detect(run_data(tmp_path, cols, settings=["optim.lr=1e-4"]))[0]
    assert f.severity == "info" and "low learning rate" in f.cause
    assert not any("lower the learning rate" in r for r in f.remedies)


def test_adam_single_step_signals(tmp_path):
    cols = standard_scalars(N)
    cols["layer.update_ratio/decoder.fc"][1000] = 0.5
    cols["layer.adam_eff_lr/encoder.fc"][1100] *= 100
    findings, signals = adam.detect(run_data(tmp_path, cols))
    by_kind = {f.kind: f for f in findings}
    assert by_kind["oversized_update"].first_step == 1000
    assert by_kind["adam_step_size_jump"].first_step == 1100
    assert {(s.channel, s.where, s.step) for s in signals} == {
        ("update_ratio", "decoder.fc", 1000), ("adam_eff_lr", "encoder.fc", 1100)}


def test_timeline_names_what_preceded_a_spike(tmp_path):
    cols = standard_scalars(N)
    cols["layer.update_ratio/decoder.fc"][995] = 0.5
    cols["layer.grad_norm/decoder.out"][998] *= 500
    cols["recon"][1000:1003] *= 4
    cols["total"] = cols["recon"] + cols["kl"]
    result = vaediag.analyze(run_data(tmp_path, cols).run)
    (spike,) = [f for f in result.findings if f.kind == "loss_spike"]
    chain = [(p["channel"], p["where"], p["steps_before"]) for p in spike.preceded_by]
    assert chain == [("update_ratio", "decoder.fc", 5), ("grad_norm", "decoder.out", 2)]
    assert spike.precursors_text() == ("update_ratio in decoder.fc (5 steps before), "
                                       "grad_norm in decoder.out (2 steps before)")


# -- latents ------------------------------------------------------------------------------------

def test_posterior_collapse_under_a_rising_kl_weight_does_not_suggest_a_warm_up(tmp_path):
    cols = standard_scalars(N)
    cols["beta"] = np.clip(cols["step"] / 1000, 0.05, 1.0).astype(np.float32) * 16
    ev = standard_evals(cols["step"][::EVAL_EVERY])
    ev["active_units"][20:] = 4
    ev["eval_recon"][20:] += 40  # the pictures got worse
    (f,) = [f for f in latents.detect(run_data(tmp_path, cols, ev))[0]
            if f.kind == "posterior_collapse"]
    assert "KL weight rose" in f.cause and f.severity == "warning"
    assert not any("warm" in r and "up" in r and "beta_schedule" in r for r in f.remedies)


@pytest.mark.parametrize(("final", "worse", "severity"),
                         [(4, True, "warning"), (4, False, "info"), (0, False, "high")])
def test_posterior_collapse_severity_is_its_harm(tmp_path, final, worse, severity):
    cols = standard_scalars(N)
    ev = standard_evals(cols["step"][::EVAL_EVERY])
    ev["active_units"][20:] = final
    if worse:
        ev["ssim"][20:] -= 0.1
    (f,) = [f for f in latents.detect(run_data(tmp_path, cols, ev))[0]
            if f.kind == "posterior_collapse"]
    assert f.severity == severity and f.first_step == 20 * EVAL_EVERY
    if severity == "info":
        assert "did not get worse" in f.summary and "unused" in f.cause


def test_collapse_after_a_learning_rate_jump_blames_the_learning_rate(tmp_path):
    cols = standard_scalars(N)
    cols["lr"][950:960] = 3e-2
    ev = standard_evals(cols["step"][::EVAL_EVERY])
    ev["active_units"][20:] = 4
    ev["ssim"][20:] -= 0.1
    (f,) = [f for f in latents.detect(run_data(tmp_path, cols, ev))[0]
            if f.kind == "posterior_collapse"]
    assert "the learning rate rose 30x" in f.cause and "KL" not in f.remedies[0]


def test_logvar_saturation_and_unused_dims(tmp_path):
    cols = standard_scalars(N)
    cols["logvar_min"][1200] = -35.0
    cols["dim.kl/3"][:] = 0.001
    by_kind = {f.kind: f for f in latents.detect(run_data(tmp_path, cols))[0]}
    assert by_kind["logvar_saturation"].severity == "high"
    assert by_kind["logvar_saturation"].first_step == 1200
    assert by_kind["unused_dimensions"].evidence["dimensions"] == [3]
    assert by_kind["unused_dimensions"].severity == "info"


def test_kl_growth_explained_by_a_shrinking_decoder_scale(tmp_path):
    cols = standard_scalars(N)
    cols["decoder_scale"] = np.geomspace(0.2, 0.02, N).astype(np.float32)
    cols["kl"] *= np.linspace(1, 4, N).astype(np.float32)
    (f,) = [f for f in latents.detect(run_data(tmp_path, cols))[0]
            if f.kind == "decoder_scale_shrinking"]
    assert f.evidence["effective_kl_weight"] == pytest.approx(
        (f.evidence["sigma_end"] / f.evidence["sigma_start"]) ** 2)


# -- loss-quality decoupling --------------------------------------------------------------------

def _evals_with_decoupling(metrics: dict[str, float], loss_change: float = -6.0):
    cols = standard_scalars(N)
    ev = standard_evals(cols["step"][::EVAL_EVERY])
    ev["eval_recon"] += np.linspace(0, loss_change, len(ev["step"])).astype(np.float32)
    for metric, worse in metrics.items():
        ev[metric][18:] += worse  # from step 900 on
    return cols, ev


def test_decoupling_names_the_evaluations_to_compare(tmp_path):
    cols, ev = _evals_with_decoupling({"colour_de": 6.0, "sat_ratio": -0.3})
    (f,) = decoupling.detect(run_data(tmp_path, cols, ev))[0]
    assert (f.kind, f.severity) == ("loss_quality_decoupling", "warning")
    before, after = f.compare_steps
    assert before < 900 <= after
    assert f.evidence["loss_after"] <= f.evidence["loss_before"] + f.evidence["loss_noise_unit"]
    assert set(f.evidence["metrics"]) == {"colour_de", "sat_ratio"}
    assert f"step {after:,}" in f.summary and "colour_de" in f.summary


def test_one_family_by_a_small_margin_is_info(tmp_path):
    cols, ev = _evals_with_decoupling({"colour_de": 2.5})  # 18%: past 4 units and 15%, not 2x
    (f,) = decoupling.detect(run_data(tmp_path, cols, ev))[0]
    assert f.severity == "info" and f.evidence["families"] == ["colour"]


def test_one_family_by_a_wide_margin_is_a_warning(tmp_path):
    cols, ev = _evals_with_decoupling({"sat_ratio": -0.25})  # colour fading: 0.70 -> 0.45
    (f,) = decoupling.detect(run_data(tmp_path, cols, ev))[0]
    assert f.severity == "warning" and "by a wide margin" in f.evidence["severity_because"]


def test_one_family_contradicted_by_another_is_info(tmp_path):
    cols, ev = _evals_with_decoupling({"orient_err": 3.0, "centroid_err": 0.3, "ssim": 0.15})
    (f,) = decoupling.detect(run_data(tmp_path, cols, ev))[0]
    assert f.severity == "info" and f.evidence["families"] == ["pose"]


def test_orientation_estimates_give_way_to_the_known_pose(tmp_path):
    cols, ev = _evals_with_decoupling({"orient_err": 3.0, "centroid_err": 0.3})
    ev["factor_angle_err"] = (10.0 - np.linspace(0, 3, len(ev["step"]))).astype(np.float32)
    assert decoupling.detect(run_data(tmp_path, cols, ev))[0] == []


def test_a_pair_is_judged_the_same_whatever_comes_later(tmp_path):
    cols, ev = _evals_with_decoupling({"colour_de": 6.0, "sat_ratio": -0.3})
    (early,) = decoupling.detect(RunData(run_data(tmp_path / "a", cols, ev).run.until(950)))[0]
    n = len(ev["step"])
    ev["colour_de"][20:] += 40 * np.random.default_rng(3).random(n - 20)  # wild later on
    later = decoupling.detect(run_data(tmp_path / "b", cols, ev))[0]
    first = min(later, key=lambda f: f.compare_steps[1])
    assert (early.compare_steps, early.severity) == (first.compare_steps, first.severity)
    assert early.evidence["metrics"]["sat_ratio"] == first.evidence["metrics"]["sat_ratio"]


def test_loss_that_rises_a_little_while_pictures_get_much_worse(tmp_path):
    cols = standard_scalars(N)
    ev = standard_evals(cols["step"][::EVAL_EVERY])
    ev["eval_recon"][18:] += 40.0  # +2%: far above its noise, small to a reader
    ev["ssim"][18:] -= 0.2
    ev["colour_de"][18:] += 8.0
    (f,) = decoupling.detect(run_data(tmp_path, cols, ev))[0]
    assert f.kind == "loss_understates_quality"
    assert f.compare_steps[1] == 900


def test_decoupling_names_a_rising_kl_weight_and_a_falling_kl(tmp_path):
    cols = standard_scalars(N)
    cols["beta"] = np.clip(cols["step"] / 1000, 0.05, 1.0).astype(np.float32) * 16  # warm-up
    ev = standard_evals(cols["step"][::EVAL_EVERY])
    ev["eval_recon"][18:] += 20.0  # +1%
    ev["eval_kl"][18:] *= 0.4  # the model encodes less
    ev["orient_err"][18:] += 8.0
    ev["colour_de"][18:] += 6.0
    (f,) = decoupling.detect(run_data(tmp_path, cols, ev))[0]
    before, after = f.compare_steps
    between = f.evidence["between"]
    assert between["beta_before"] == pytest.approx(16 * before / 1000, rel=0.02)
    assert between["beta_after"] == pytest.approx(16 * min(after, 1000) / 1000, rel=0.02)
    assert between["kl_after"] < 0.5 * between["kl_before"]
    assert "KL weight rose" in f.cause and "KL of these images fell" in f.cause
    assert f.remedies[0].startswith("stop the KL weight") and "free_bits" in f.remedies[0]


def test_decoupling_without_a_trade_names_none(tmp_path):
    cols, ev = _evals_with_decoupling({"colour_de": 6.0, "sat_ratio": -0.3})
    (f,) = decoupling.detect(run_data(tmp_path, cols, ev))[0]
    assert "KL weight" not in f.cause and f.remedies[0].startswith("judge runs")


def test_quality_that_tracks_the_loss_is_not_decoupling(tmp_path):
    cols = standard_scalars(N)
    ev = standard_evals(cols["step"][::EVAL_EVERY])
    ev["eval_recon"][18:] += 200.0  # the loss says worse, and the pictures are worse
    ev["ssim"][18:] -= 0.2
    ev["colour_de"][18:] += 8.0
    assert decoupling.detect(run_data(tmp_path, cols, ev))[0] == []


def test_epoch_average_disagreeing_with_the_snapshot(tmp_path):
    cols = standard_scalars(N)
    ev = standard_evals(cols["step"][::EVAL_EVERY])
    ev["train_recon_avg"][20] -= 30.0
    ev["eval_recon"][20] += 30.0
    (f,) = epoch_average.detect(run_data(tmp_path, cols, ev))[0]
    assert f.compare_steps in ([950, 1000], [1000, 1050]) and f.severity == "info"
    assert f.evidence["disagreements"] == 2  # into the bump and out of it


def test_generation_drift(tmp_path):
    cols = standard_scalars(N)
    ev = standard_evals(cols["step"][::EVAL_EVERY])
    ev["drift_fixed_rmse"][20] = 0.2
    ev["ssim"][20:] -= 0.1
    findings, signals = drift.detect(run_data(tmp_path, cols, ev))
    (f,) = findings
    assert f.compare_steps == [950, 1000] and "fixed z" in f.summary
    assert f.severity == "warning" and "ssim" in f.evidence["quality_lost"]
    assert [s.step for s in signals] == [1000]


def test_drift_while_the_pictures_improve_is_info(tmp_path):
    cols = standard_scalars(N)
    ev = standard_evals(cols["step"][::EVAL_EVERY])
    ev["drift_fixed_rmse"][4] = 0.2  # early: the decoder is still learning fast
    ev["ssim"][4:] += 0.1
    (f,) = drift.detect(run_data(tmp_path, cols, ev))[0]
    assert f.severity == "info" and "did not get worse" in f.summary


def test_kl_level_shift_from_a_falling_kl_weight_names_it(tmp_path):
    cols = standard_scalars(N)
    cols["beta"][1000:] = 0.02
    ramp = np.clip((cols["step"] - 1000) / 30, 0, 1).astype(np.float32)  # adapts over 30 steps
    cols["kl"] *= 1 + 2 * ramp
    (f,) = kl_explosion.detect(run_data(tmp_path, cols))[0]
    assert 1000 <= f.first_step <= 1030 and f.severity == "warning"
    assert f.summary.startswith("KL level shift") and "the KL weight fell 50x" in f.cause
    assert "not an instability" in f.cause


def test_a_collapsed_kl_moving_in_thousandths_is_not_a_shift(tmp_path):
    cols = standard_scalars(N)
    cols["kl"] = (cols["kl"] / 18 * 2e-4).astype(np.float32)
    cols["kl"][1000:] *= 6
    assert kl_explosion.detect(run_data(tmp_path, cols))[0] == []


@pytest.mark.parametrize(("ratio", "severity"), [(0.5, "warning"), (0.03, "info")])
def test_oversized_update_severity(tmp_path, ratio, severity):
    cols = standard_scalars(N)
    cols["layer.update_ratio/decoder.fc"][1000] = ratio  # usual: 2e-3
    (f,) = [f for f in adam.detect(run_data(tmp_path, cols))[0] if f.kind == "oversized_update"]
    assert f.severity == severity and f.first_step == 1000


def test_a_regional_metric_alone_is_info(tmp_path):
    """The eyes' colour (a few pixels at 32 px) moving 40% on its own is not a warning."""
    cols, ev = _evals_with_decoupling({})
    n = len(ev["step"])
    rng = np.random.default_rng(5)
    ev["factor_eye_de"] = (28 + 0.5 * rng.standard_normal(n)).astype(np.float32)
    ev["factor_eye_de"][18:] += 11
    (f,) = decoupling.detect(run_data(tmp_path, cols, ev))[0]
    assert f.severity == "info" and list(f.evidence["metrics"]) == ["factor_eye_de"]


def test_a_trade_of_one_quality_for_another_is_info(tmp_path):
    """Pose 60% worse while colour gets 40% better one evaluation later: a trade, not a fault."""
    cols, ev = _evals_with_decoupling({"orient_err": 3.0})
    ev["colour_de"][19:] -= 6.0
    (f,) = decoupling.detect(run_data(tmp_path, cols, ev))[0]
    assert f.severity == "info" and f.evidence["families"] == ["pose"]
    cols, ev = _evals_with_decoupling({"orient_err": 3.0})  # the same without the trade
    assert decoupling.detect(run_data(tmp_path / "b", cols, ev))[0][0].severity == "warning"


def test_kl_going_infinite_is_not_a_level_shift(tmp_path):
    """Inf KLs after a failure belong to the non-finite finding, not to a KL 'explosion'."""
    cols = standard_scalars(N)
    cols["kl"][1200:] = np.inf
    assert kl_explosion.detect(run_data(tmp_path, cols))[0] == []


def test_the_docs_hold_every_threshold_as_the_detectors_define_it():
    """docs/detectors.md's threshold tables are generated from the detectors' constants; a
    constant without a meaning fails (as docs/configuration.md holds every config key)."""
    from pathlib import Path

    from vaediag.analysis.thresholds import markdown, thresholds

    rows = [(d.NAME, name, meaning) for d in DETECTORS for name, _, meaning in thresholds(d)]
    assert len(rows) >= 60
    assert [r for r in rows if not r[2]] == [], "document each threshold where it is defined"
    assert ("gradients", "Z_EXPLODE") in {(d, n) for d, n, _ in rows}
    doc = (Path(__file__).parents[1] / "docs" / "detectors.md").read_text()
    assert markdown() in doc, \
        "update the tables: python -m vaediag.analysis.thresholds --write docs/detectors.md"


# -- the KL's sign ------------------------------------------------------------------------------

@pytest.mark.parametrize(("total_sign", "severity"), [(1, "high"), (-1, "warning"), (0, "warning")])
def test_a_kl_with_the_wrong_sign_is_a_finding_that_says_whether_the_loss_has_it(
        tmp_path, total_sign, severity):
    """A KL logged as 0.5 * sum(1 + logvar - mu^2 - exp(logvar)): negative on every step. The
    recorded total tells whether the loss adds it so (training maximises the true KL) or only
    the log is negated; without a total it says the sign is wrong."""
    from vaediag.analysis.detectors import kl_sign

    cols = standard_scalars(N)
    cols["kl"] = -cols["kl"]
    if total_sign:
        cols["total"] = cols["recon"] + total_sign * cols["kl"]
    else:
        del cols["total"]
    (f,), _ = kl_sign.detect(run_data(tmp_path, cols))
    assert (f.kind, f.severity, f.first_step) == ("negative_kl", severity, 0)
    assert "negative on 100% of steps" in f.summary and "wrong sign" in f.cause
    assert f.evidence["loss_adds_negative_kl"] == {1: True, -1: False, 0: None}[total_sign]
    assert ("maximises" in f.cause) is (total_sign == 1)
    result = vaediag.analyze(run_data(tmp_path, cols, seed=1).run)
    assert "negative_kl" in vaediag.analysis.verdict(result) or \
        "the KL is negative" in vaediag.analysis.verdict(result)


def test_a_monte_carlo_kl_near_zero_is_not_a_wrong_sign(tmp_path):
    """A collapsed posterior's single-sample KL estimate: about half its steps negative."""
    from vaediag.analysis.detectors import kl_sign

    cols = standard_scalars(N)
    cols["kl"] = np.random.default_rng(0).normal(0.0, 0.05, N)
    assert kl_sign.detect(run_data(tmp_path, cols)) == ([], [])


def test_two_loss_quality_findings_advise_one_kl_weight(tmp_path):
    """A KL warm-up: the pictures get worse from step 300 to 700 with the loss flat, and worse
    again from 1,100 while the loss rises 2%: two findings over different pairs (from 100 and
    from 150), one weight to stop at (where the run's pictures were last right), never two."""
    cols = standard_scalars(N)
    cols["beta"] = np.clip(cols["step"] / 1400, 0.05, 1.0).astype(np.float32) * 16
    ev = standard_evals(cols["step"][::EVAL_EVERY])
    ramp = np.clip((np.arange(len(ev["step"])) - 6) / 8, 0, 1).astype(np.float32)
    ev["orient_err"] += 8.0 * ramp
    ev["colour_de"] += 6.0 * ramp
    ev["eval_recon"][22:] += 40.0
    ev["ssim"][22:] -= 0.2
    ev["colour_de"][22:] += 8.0
    findings = decoupling.detect(run_data(tmp_path, cols, ev))[0]
    assert {f.kind for f in findings} == {"loss_quality_decoupling", "loss_understates_quality"}
    advised = {r.split(" (--set")[0].split(", or")[0] for f in findings for r in f.remedies
               if r.startswith("stop the KL weight")}
    assert len(advised) == 1, advised
    earliest = min(f.compare_steps[0] for f in findings)
    assert {f.compare_steps[0] for f in findings} == {100, 150}
    assert advised == {f"stop the KL weight where the pictures were still right, at "
                       f"{16 * max(earliest / 1400, 0.05):.3g}"}


def test_a_loss_quality_finding_records_the_tightest_pair_that_shows_it(tmp_path):
    """The pictures change at once between the evaluations at 850 and 900: whatever pair the
    finding names, the tightest that shows the change is those two (incidents place it
    there)."""
    cols, ev = _evals_with_decoupling({"colour_de": 6.0, "sat_ratio": -0.3})
    (f,) = decoupling.detect(run_data(tmp_path, cols, ev))[0]
    assert f.evidence["tightest"] == {"before_step": 850, "after_step": 900}
    assert f.compare_steps[0] <= 850


def test_posterior_collapse_compares_the_pictures_at_their_best_before_it(tmp_path):
    """Active units peak early (an unfinished model) and the pictures keep improving until the
    collapse: the grids compared are the best pictures before it and the collapse, so the
    'before' grid is never the worse one."""
    cols = standard_scalars(N)
    ev = standard_evals(cols["step"][::EVAL_EVERY])
    ev["active_units"][:] = 8.0
    ev["active_units"][3] = 12.0  # the peak, at step 150
    ev["active_units"][20:] = 4.0
    ev["ssim"][:20] = np.linspace(0.3, 0.8, 20)  # better and better until the collapse
    ev["ssim"][20:] = 0.6
    (f,) = [f for f in latents.detect(run_data(tmp_path, cols, ev))[0]
            if f.kind == "posterior_collapse"]
    assert f.severity == "warning" and f.evidence["peak_step"] == 150
    assert f.compare_steps == [950, 1000]
    before, after = (ev["ssim"][list(ev["step"]).index(s)] for s in f.compare_steps)
    assert before > after


def test_quality_back_at_its_level_after_one_lucky_evaluation_is_not_lost(tmp_path):
    """vaediag's defaults, seed 20: colour error 14.8, 14.1, then a lucky 12.7, and at the next
    evaluations back to 15.2 while the loss rose 0.6%. Compared from the lucky evaluation it
    looked like quality lost; against the level the pictures held it is none. The same rise
    from a level the pictures held is still found."""
    cols = standard_scalars(N)
    ev = standard_evals(cols["step"][::EVAL_EVERY])
    n = len(ev["step"])
    ev["eval_recon"][n - 2:] += 12.0  # +0.6%, clearly above its noise, at the last two
    ev["colour_de"][n - 3] -= 6.0  # a lucky evaluation just before
    ev["sat_ratio"][n - 3] += 0.05
    assert [f for f in decoupling.detect(run_data(tmp_path, cols, ev, seed=0))[0]
            if f.severity != "info"] == []
    ev["colour_de"][n - 3] += 6.0
    ev["sat_ratio"][n - 3] -= 0.05
    ev["colour_de"][n - 2:] += 3.0
    ev["sat_ratio"][n - 2:] -= 0.3
    (f,) = [f for f in decoupling.detect(run_data(tmp_path / "b", cols, ev, seed=0))[0]
            if f.severity != "info"]
    assert f.kind == "loss_understates_quality"
    assert f.compare_steps[1] == int(ev["step"][n - 2])
