"""Each probe's statistics against a slow, obvious reference, and the edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from vaediag import columns
from vaediag.data import toyfaces
from vaediag.errors import UserError
from vaediag.monitor.readback import to_floats
from vaediag.probes import (
    AdamState,
    EvalContext,
    FactorFidelity,
    GenerationDrift,
    GradientNorms,
    GradSplit,
    ImageQuality,
    LatentHealth,
    LayerIndex,
    ProbeSetup,
    StepContext,
    UpdateRatio,
    every,
    load_from_path,
    log_spaced,
)
from vaediag.probes import adam as adam_module
from vaediag.probes.context import ImageSet
from vaediag.probes.latents import combined_stats, latent_stats, rank_summary
from vaediag.probes.sampling import EntrySample, sample_slice


def _floats(values: dict) -> dict:
    return to_floats(values)


class TinyVAE(nn.Module):
    """Two-part model with named encoder/decoder layers, small enough for numpy references."""

    def __init__(self, d_in: int = 6, latent: int = 2):
        super().__init__()
        self.encoder = nn.ModuleDict({"fc": nn.Linear(d_in, 4), "head": nn.Linear(4, 2 * latent)})
        self.decoder = nn.ModuleDict({"fc": nn.Linear(latent, 4), "out": nn.Linear(4, d_in)})

    def encode(self, x):
        h = torch.tanh(self.encoder["fc"](x))
        return self.encoder["head"](h).chunk(2, dim=1)

    def decode_logits(self, z):
        return self.decoder["out"](torch.tanh(self.decoder["fc"](z)))


def _losses(model, x, eps, beta=0.7):
    mu, logvar = model.encode(x)
    z = mu + eps * torch.exp(0.5 * logvar)
    recon = nn.functional.binary_cross_entropy_with_logits(model.decode_logits(z), x,
                                                           reduction="sum") / len(x)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
    return recon, beta * kl, mu, logvar


def _context(model, optimizer=None, **values) -> StepContext:
    params = [(n, p) for n, p in model.named_parameters()]
    norms = torch.stack([p.grad.norm() if p.grad is not None else torch.tensor(0.0)
                         for _, p in params])
    base = {"recon": 0.0, "kl": 0.0, "param_grad_norms": norms}
    return StepContext(0, params, LayerIndex.from_params(params), optimizer, **{**base, **values})


# -- layout and schedules -----------------------------------------------------------------------

def test_layer_index_groups_weights_and_biases():
    model = TinyVAE()
    idx = LayerIndex.from_params(list(model.named_parameters()))
    assert idx.layers == ["encoder.fc", "encoder.head", "decoder.fc", "decoder.out"]
    assert idx.parts == ["encoder", "decoder"]
    assert idx.param_layer.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert idx.per_layer_sum(idx.param_numel).tolist() == [28, 20, 12, 30]
    special = LayerIndex.from_params([("decoder.log_scale", nn.Parameter(torch.zeros(())))])
    assert special.layers == ["decoder.log_scale"] and special.parts == ["decoder"]


def test_schedules():
    assert [s for s in range(12) if every(5)(s)] == [0, 5, 10]
    marks = [s for s in range(1001) if log_spaced(1, 4)(s)]
    assert marks[:5] == [0, 1, 2, 3, 6] and 1000 in marks and len(marks) < 20
    with pytest.raises(ValueError):
        every(0)


def test_probes_due_are_looked_up_in_the_cycle_of_their_periods():
    """The runner's lookup table gives, at every step, unusual or not, the probes that asking
    each schedule gives; a schedule without a period (log_spaced) is asked step by step."""
    from vaediag.monitor.probing import ProbeRunner

    class Writer:
        def event(self, *args, **kwargs):
            pass

    def asked(probes, step, after, unusual):
        return [p for p in probes if not p.on_eval and p.after_step == after
                and (p.schedule(step) or (p.when_unusual and unusual))]

    for probes in ([GradientNorms(every(3)), AdamState(every(4), when_unusual=True),
                    UpdateRatio(every(6)), GradSplit(every(10))],
                   [GradientNorms(log_spaced(1, 4)), AdamState(every(4), when_unusual=True)]):
        runner = ProbeRunner(probes, Writer(), speak=False)
        periodic = all(hasattr(p.schedule, "period") for p in probes)
        assert (runner._cycle[False] is not None) == periodic
        for step in range(130):
            for after in (False, True):
                for unusual in (False, True):
                    due = runner.due(step, after_step=after, unusual=unusual)
                    assert list(due) == asked(probes, step, after, unusual), (step, after)


def test_rows_given_in_parts_read_back_as_rows(tmp_path):
    """TableWriter.append_parts: a row's values in parts (names and numbers, arrays or lists);
    a column a row lacks reads as missing (NaN; null in an integer column); a new column
    starts a new segment."""
    from vaediag.rundir import TableWriter, read_table

    t = TableWriter(tmp_path / "t")
    for s in range(3):
        t.append_parts([(("step", "time"), [s, 0.5 * s]),
                        (("a", "b"), np.array([s, 10.0 * s], dtype=np.float32))])
    t.append_parts([(("step",), [3]), (("b",), [7.0]), (("epoch",), [2])])
    t.append({"step": 4, "epoch": 1, "a": math.nan, "late": 1.25})
    t.close()
    frame, problems = read_table(tmp_path / "t")
    assert problems == [] and list(frame["step"]) == [0, 1, 2, 3, 4]
    assert frame["a"].tolist()[:3] == [0.0, 1.0, 2.0] and frame["a"].isna().tolist()[3:] == [
        True, True]
    assert frame["b"].tolist()[:4] == [0.0, 10.0, 20.0, 7.0]
    assert frame["time"].tolist()[:3] == [0.0, 0.5, 1.0] and frame["time"].dtype == np.float64
    assert frame["epoch"].isna().tolist() == [True, True, True, False, False]
    assert frame["epoch"].tolist()[3:] == [2.0, 1.0]
    assert frame["late"].isna().sum() == 4 and frame["late"].iloc[-1] == 1.25


def test_column_names_round_trip():
    name = columns.name("layer", "grad_norm", "decoder.fc")
    assert name == "layer.grad_norm/decoder.fc"
    assert columns.split(name) == ("layer", "grad_norm", "decoder.fc")
    assert columns.split("grad_norm") is None
    import pandas as pd

    frame = pd.DataFrame({"step": [0, 1], "dim.kl/0": [1.0, 2.0], "dim.kl/1": [3.0, 4.0]})
    m = columns.matrix(frame, "dim", "kl")
    assert list(m.columns) == ["0", "1"] and m.loc[1, "1"] == 4.0


# -- latents ------------------------------------------------------------------------------------

def test_latent_stats_per_dim_kl_matches_closed_form_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(256, 5, generator=g, dtype=torch.float64)
    logvar = torch.randn(256, 5, generator=g, dtype=torch.float64) * 0.5
    out = _floats(latent_stats(mu, logvar))
    closed = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).mean(0)
    q = Normal(mu, (0.5 * logvar).exp())
    z = q.sample((4000,))
    monte_carlo = (q.log_prob(z) - Normal(0.0, 1.0).log_prob(z)).mean((0, 1))
    for i in range(5):
        assert out[f"dim.kl/{i}"] == pytest.approx(closed[i].item(), rel=1e-5)
        assert out[f"dim.kl/{i}"] == pytest.approx(monte_carlo[i].item(), abs=0.03)
    assert out["mu_min"] == pytest.approx(mu.min().item(), rel=1e-6)
    assert out["logvar_max"] == pytest.approx(logvar.max().item(), rel=1e-6)
    assert out["logvar_mean"] == pytest.approx(logvar.mean().item(), abs=1e-6)


def test_latent_stats_of_ranks_with_unequal_batches_combine_into_the_global_batch():
    """Under torch.distributed each rank summarises its share; the combination is what one
    process would compute on the whole batch."""
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(50, 6, generator=g) * 2
    logvar = torch.randn(50, 6, generator=g)
    shares = [(0, 10), (10, 35), (35, 50)]  # three ranks, batches of 10, 25 and 15
    summaries = torch.stack([rank_summary(mu[a:b], logvar[a:b]) for a, b in shares])
    whole, combined = _floats(latent_stats(mu, logvar)), _floats(combined_stats(summaries))
    assert set(combined) == set(whole)
    for name, value in whole.items():
        assert combined[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    alone = _floats(latent_stats(mu[:10], logvar[:10]))  # one rank's share is not the batch
    assert alone["mu_min"] != pytest.approx(whole["mu_min"])


def test_collapsed_posterior_gives_zero_kl_and_no_active_units():
    zeros = torch.zeros(64, 3)
    out = _floats(latent_stats(zeros, zeros))
    assert all(out[f"dim.kl/{i}"] == 0.0 for i in range(3))
    ctx = EvalContext(0, torch.rand(8, 3, 8, 8), torch.rand(8, 3, 8, 8), torch.rand(1, 3, 8, 8),
                      torch.rand(8, 3, 8, 8), torch.zeros(8, 3), torch.zeros(8, 3), None, None,
                      None)
    health = _floats(LatentHealth().compute(ctx))
    assert health["active_units"] == 0
    assert all(health[f"dim.eval_kl/{i}"] == 0.0 for i in range(3))
    assert not any(math.isnan(v) for v in health.values())


def test_active_units_count_dimensions_that_move_with_the_input():
    g = torch.Generator().manual_seed(1)
    mu = torch.zeros(100, 4)
    mu[:, 0] = torch.randn(100, generator=g)  # variance ~1: active
    mu[:, 1] = 0.05 * torch.randn(100, generator=g)  # variance ~0.0025: inactive
    mu[:, 2] = 0.5 * torch.randn(100, generator=g)  # variance ~0.25: active
    ctx = EvalContext(0, *[torch.rand(8, 3, 8, 8)] * 2, torch.rand(1, 3, 8, 8),
                      torch.rand(8, 3, 8, 8), torch.zeros(8, 4), torch.zeros(8, 4), None, None,
                      lambda: (torch.rand(100, 3, 8, 8), torch.rand(100, 3, 8, 8), mu,
                               torch.zeros(100, 4)))
    out = _floats(LatentHealth().compute(ctx))
    assert out["active_units"] == 2 and out["eval_set_size"] == 100
    assert out["dim.mu_var/0"] == pytest.approx(mu[:, 0].var(unbiased=False).item(), rel=1e-5)


# -- gradients ----------------------------------------------------------------------------------

def test_gradient_norms_per_layer_and_part_and_a_nan_layer():
    model = TinyVAE()
    x = torch.rand(5, 6)
    recon, kl_term, _, _ = _losses(model, x, torch.zeros(5, 2))
    (recon + kl_term).backward()
    model.decoder["fc"].weight.grad[0, 0] = float("nan")
    model.decoder["fc"].bias.grad[1] = float("inf")
    out = _floats(GradientNorms().compute(_context(model)))
    enc = torch.cat([p.grad.flatten() for n, p in model.named_parameters()
                     if n.startswith("encoder.fc")])
    assert out["layer.grad_norm/encoder.fc"] == pytest.approx(enc.norm().item(), rel=1e-5)
    enc_all = torch.cat([p.grad.flatten() for n, p in model.named_parameters()
                         if n.startswith("encoder")])
    assert out["part.grad_norm/encoder"] == pytest.approx(enc_all.norm().item(), rel=1e-5)
    assert math.isnan(out["layer.grad_norm/decoder.fc"])
    assert math.isfinite(out["layer.grad_norm/decoder.out"])
    assert out["grad_nonfinite"] == 2


def test_gradient_split_matches_separate_backward_passes():
    torch.manual_seed(0)
    model = TinyVAE()
    x = torch.rand(5, 6)
    eps = torch.randn(5, 2)
    params = list(model.parameters())
    recon, kl_term, _, _ = _losses(model, x, eps)
    ref_recon = torch.autograd.grad(recon, params, allow_unused=True)
    recon, kl_term, _, _ = _losses(model, x, eps)
    ref_kl = torch.autograd.grad(kl_term, params, allow_unused=True)

    def flat(gs, prefix):
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                          for (n, p), g in zip(model.named_parameters(), gs, strict=True)
                          if n.startswith(prefix)])

    recon, kl_term, _, _ = _losses(model, x, eps)
    (recon + kl_term).backward(retain_graph=True)
    out = _floats(GradSplit().compute(_context(model, kl_term=kl_term)))
    for prefix, key in (("", "split_{}"), ("encoder", "part.split_{}/encoder")):
        r, k = flat(ref_recon, prefix), flat(ref_kl, prefix)
        assert out[key.format("recon_norm")] == pytest.approx(r.norm().item(), rel=1e-4)
        assert out[key.format("kl_norm")] == pytest.approx(k.norm().item(), rel=1e-4)
        cos = (r @ k / (r.norm() * k.norm())).item()
        assert out[key.format("cos")] == pytest.approx(cos, abs=1e-4)
    # The KL term does not reach the decoder: its KL gradient is zero, the cosine undefined.
    assert out["part.split_kl_norm/decoder"] == 0.0
    assert math.isnan(out["part.split_cos/decoder"])


def test_gradient_split_explains_a_freed_graph():
    model = TinyVAE()
    recon, kl_term, _, _ = _losses(model, torch.rand(3, 6), torch.zeros(3, 2))
    (recon + kl_term).backward()  # no retain_graph
    with pytest.raises(RuntimeError, match=r"retain_graph=monitor\.wants_graph\(step\)"):
        GradSplit().compute(_context(model, kl_term=kl_term))


# -- Adam ---------------------------------------------------------------------------------------

def _numpy_reference(grads, params_before, lr, b1, b2, eps, wd, amsgrad, layers):
    """Adam's moments by hand from the recorded gradients, then the statistics by definition."""
    m = {n: np.zeros_like(g) for n, g in grads[0].items()}
    v = {n: np.zeros_like(g) for n, g in grads[0].items()}
    v_max = {n: np.zeros_like(g) for n, g in grads[0].items()}
    for g_step, p_step in zip(grads, params_before, strict=True):
        for n, g in g_step.items():
            g = g + wd * p_step[n] if wd else g  # Adam's L2 penalty goes into its moments
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            v_max[n] = np.maximum(v_max[n], v[n])
    t = len(grads)
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    stats = {}
    for layer in layers:
        names = [n for n in m if n.rsplit(".", 1)[0] == layer]

        def cat(d, names=names):
            return np.concatenate([d[n].ravel() for n in names])

        mh, vh = cat(m) / bc1, cat(v) / bc2
        vd = cat(v_max) / bc2 if amsgrad else vh
        u = mh / (np.sqrt(vd) + eps)
        g = np.concatenate([grads[-1][n].ravel() for n in names])
        stats[layer] = {
            "adam_update_rms": np.sqrt(np.mean(u ** 2)),
            "adam_eps_frac": np.mean(np.sqrt(vd) < eps),
            "adam_sign_frac": np.mean(np.abs(u) > 0.9),
            "adam_rms_t": np.sqrt(np.mean(g ** 2 / np.maximum(vh, eps ** 2))),
            "adam_eff_lr": np.exp(np.mean(np.log(lr / (np.sqrt(vd) + eps)))),
        }
    return stats


@pytest.mark.parametrize(("cls", "wd", "amsgrad"), [
    (torch.optim.Adam, 0.0, False), (torch.optim.Adam, 0.01, True), (torch.optim.AdamW, 0.1, False),
])
def test_adam_statistics_match_a_hand_written_adam(cls, wd, amsgrad):
    torch.manual_seed(0)
    model = TinyVAE().double()
    lr, betas, eps = 0.05, (0.9, 0.99), 3e-3
    opt = cls(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=wd, amsgrad=amsgrad)
    x = torch.rand(7, 6, dtype=torch.float64)
    x[:, 0] = 1e-4  # an almost constant input: tiny gradients, epsilon-dominated entries
    grads, before = [], []
    for _ in range(6):
        opt.zero_grad()
        recon, kl_term, _, _ = _losses(model, x, torch.zeros(7, 2, dtype=torch.float64))
        (recon + kl_term).backward()
        grads.append({n: p.grad.numpy().copy() for n, p in model.named_parameters()})
        before.append({n: p.detach().numpy().copy() for n, p in model.named_parameters()})
        opt.step()
    ctx = _context(model, opt)
    out = _floats(AdamState().compute(ctx))
    layers = ctx.layers.layers
    reference = _numpy_reference(grads, before, lr, betas[0], betas[1], eps,
                                 wd if cls is torch.optim.Adam else 0.0, amsgrad, layers)
    for layer in layers:
        for stat, expected in reference[layer].items():
            got = out[f"layer.{stat}/{layer}"]
            assert got == pytest.approx(expected, rel=1e-4, abs=1e-7), (layer, stat)
    fractions = [out[f"layer.adam_eps_frac/{layer}"] for layer in layers]
    assert max(fractions) > 0  # the test does exercise the epsilon-dominated case


def test_adam_update_direction_is_the_step_adam_takes():
    """-lr * u is exactly what torch's Adam did to the parameters (no weight decay)."""
    torch.manual_seed(1)
    model = TinyVAE().double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x = torch.rand(4, 6, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        sum(_losses(model, x, torch.zeros(4, 2, dtype=torch.float64))[:2]).backward()
        snapshot = [p.detach().clone() for p in model.parameters()]
        opt.step()
    sq, n = 0.0, 0
    for p, b in zip(model.parameters(), snapshot, strict=True):
        u = (b - p.detach()) / 0.01
        sq += u.pow(2).sum().item()
        n += u.numel()
    out = _floats(AdamState().compute(_context(model, opt)))
    assert out["adam_update_rms"] == pytest.approx(math.sqrt(sq / n), rel=1e-6)


def test_adam_sampling_for_large_tensors_estimates_the_full_statistics():
    torch.manual_seed(2)
    big = nn.Linear(400, 300)
    opt = torch.optim.Adam(big.parameters(), lr=1e-3, eps=1e-4)
    for _ in range(3):
        opt.zero_grad()
        (big(torch.randn(16, 400)) ** 2).mean().backward()
        opt.step()
    params = list(big.named_parameters())
    ctx = StepContext(0, params, LayerIndex.from_params(params), opt, recon=0.0, kl=0.0,
                      param_grad_norms=torch.zeros(2))
    full = _floats(AdamState(max_entries=None).compute(ctx))
    sampled = _floats(AdamState().compute(ctx))  # the weight has 120,000 entries
    assert adam_module.MAX_ENTRIES < 120_000
    for stat in adam_module.ROWS:
        assert sampled[stat] == pytest.approx(full[stat], rel=0.03, abs=0.01), stat


def _update_ratios(before, after, layers):
    """||after - before|| / ||before|| per layer and overall, over every entry, in float64:
    the slow reference."""
    columns = {}
    totals = np.zeros(2)
    for index, layer in enumerate(layers.layers):
        members = [i for i, la in enumerate(layers.param_layer.tolist()) if la == index]
        delta = sum(float(((after[i].double() - before[i].double()) ** 2).sum()) for i in members)
        weight = sum(float((before[i].double() ** 2).sum()) for i in members)
        columns[f"layer.update_ratio/{layer}"] = math.sqrt(delta / weight)
        totals += (delta, weight)
    return {**columns, "update_ratio": math.sqrt(totals[0] / totals[1])}


def test_sampled_update_ratio_estimates_the_full_one():
    torch.manual_seed(4)
    big = nn.Sequential(nn.Linear(3, 400), nn.Linear(400, 300))  # measured whole, sampled
    opt = torch.optim.Adam(big.parameters(), lr=1e-2)
    params = list(big.named_parameters())
    layers = LayerIndex.from_params(params)
    for _ in range(3):
        opt.zero_grad()
        (big(torch.randn(16, 3)) ** 2).mean().backward()
        ctx = StepContext(0, params, layers, opt, recon=0.0, kl=0.0,
                          param_grad_norms=torch.zeros(4))
        probe = UpdateRatio()
        probe.before_step(ctx)
        before = [p.detach().reshape(-1).clone() for _, p in params]
        opt.step()
        sampled = _floats(probe.compute(ctx))
        full = _update_ratios(before, [p.detach().reshape(-1) for _, p in params], layers)
    assert list(sampled) == list(full)  # the layers in the model's order
    for column, value in full.items():
        assert sampled[column] == pytest.approx(value, rel=0.03), column


def test_adam_probe_declines_other_optimizers():
    model = TinyVAE()
    params = list(model.named_parameters())
    setup = ProbeSetup(model, torch.optim.SGD(model.parameters(), lr=0.1),
                       LayerIndex.from_params(params), 2, False)
    assert AdamState().setup(setup) == "the optimizer is SGD, not Adam or AdamW"
    setup.optimizer = None
    assert "no optimizer" in AdamState().setup(setup)


# -- updates ------------------------------------------------------------------------------------

def test_update_ratio_is_the_measured_change():
    torch.manual_seed(3)
    model = TinyVAE()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.1)
    sum(_losses(model, torch.rand(4, 6), torch.zeros(4, 2))[:2]).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = _context(model, opt)
    probe = UpdateRatio()
    assert probe.compute(ctx) == {}  # nothing taken before the step
    probe.before_step(ctx)
    opt.step()
    out = _floats(probe.compute(ctx))
    for layer in ("encoder.fc", "decoder.out"):
        delta = torch.cat([(p.detach() - before[n]).flatten()
                           for n, p in model.named_parameters() if n.startswith(layer)])
        weight = torch.cat([before[n].flatten() for n in before if n.startswith(layer)])
        expected = (delta.norm() / weight.norm()).item()
        assert out[f"layer.update_ratio/{layer}"] == pytest.approx(expected, rel=1e-5)
    # a parameter given new storage (``p.data = ...``) is measured there, not at the old one
    # the probe's kept views of the parameters point at
    weight, bias = model.decoder.out.weight, model.decoder.out.bias
    weight.data = weight.data.clone() + 1.0
    before = torch.cat([weight.detach().flatten(), bias.detach().flatten()])
    probe.before_step(ctx)
    opt.step()
    out = _floats(probe.compute(ctx))
    after = torch.cat([weight.detach().flatten(), bias.detach().flatten()])
    expected = ((after - before).norm() / before.norm()).item()
    assert out["layer.update_ratio/decoder.out"] == pytest.approx(expected, rel=1e-5)


# -- evaluation probes --------------------------------------------------------------------------

def _eval_ctx(x, recon, factors=None, zero=None, fixed=None):
    n = len(x)
    return EvalContext(0, x, recon, zero if zero is not None else x[:1],
                       fixed if fixed is not None else x, torch.zeros(n, 2), torch.zeros(n, 2),
                       factors, None, None)


@pytest.fixture(scope="module")
def faces():
    images, factors = toyfaces.generate(8, 64, seed=11)
    return torch.from_numpy(images).float() / 255, factors


def test_factor_fidelity_of_a_perfect_reconstruction(faces):
    x, factors = faces
    out = _floats(FactorFidelity().compute(_eval_ctx(x, x, factors.table())))
    for part in ("skin", "hair", "eye", "bg"):
        assert out[f"factor_{part}_de"] < 1e-3, part
    assert out["factor_angle_err"] < 2.1 and out["factor_turn_err"] < 0.07


def test_factor_fidelity_sees_a_mirrored_face_and_lost_colour(faces):
    x, factors = faces
    mirrored = _floats(FactorFidelity().compute(_eval_ctx(x, x.flip(-1), factors.table())))
    assert mirrored["factor_turn_err"] > 0.5  # the turn is reversed
    grey = x.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    washed = _floats(FactorFidelity().compute(_eval_ctx(x, grey, factors.table())))
    assert washed["factor_hair_de"] > 10 and washed["factor_bg_de"] > 5
    assert washed["factor_angle_err"] < 5  # the pose survives a loss of colour


def test_factor_probe_declines_without_factors():
    model = TinyVAE()
    setup = ProbeSetup(model, None, LayerIndex.from_params(list(model.named_parameters())), 2,
                       False)
    assert "toyfaces only" in FactorFidelity().setup(setup)


def test_generation_drift(faces):
    x, _ = faces
    probe = GenerationDrift()
    assert probe.compute(_eval_ctx(x, x)) == {}  # nothing to compare with yet
    same = _floats(probe.compute(_eval_ctx(x, x)))
    assert same["drift_zero_rmse"] == 0 and same["drift_fixed_ssim_dist"] == pytest.approx(0,
                                                                                          abs=1e-5)
    shifted = _floats(probe.compute(_eval_ctx(x, x, fixed=(x + 0.1).clamp(0, 1))))
    assert shifted["drift_fixed_rmse"] > 0.05
    restored = GenerationDrift()
    restored.load_state_dict(probe.state_dict())
    assert _floats(restored.compute(_eval_ctx(x, x, fixed=(x + 0.1).clamp(0, 1))))[
        "drift_fixed_rmse"] == 0


def test_the_quality_probes_record_exactly_the_registered_metrics(faces):
    """Every metric the quality probes record has its facts (direction, family, labels) in
    ``columns.QUALITY_METRICS``, and every registered metric is recorded by one of them: a
    metric added to a probe without registering it, or registered and never recorded, fails."""
    from vaediag.columns import QUALITY_METRICS

    x, factors = faces
    recon = (x * 0.9).clamp(0, 1)
    fake_lpips = lambda a, b: (a - b).abs().flatten(1).mean(1)  # noqa: E731 - a stand-in
    train = ImageSet(x, (x * 0.8).clamp(0, 1), torch.zeros(8, 2), torch.zeros(8, 2),
                     factors.table())
    ctx = EvalContext(0, x, recon, x[:1], x, torch.zeros(8, 2), torch.zeros(8, 2),
                      factors.table(), fake_lpips, None, train=train)
    recorded = set()
    for probe in (ImageQuality(), FactorFidelity()):
        recorded |= {k for k in probe.compute(ctx) if isinstance(k, str)}
    held = {k for k in recorded if not k.startswith("train_")}
    assert held == set(QUALITY_METRICS)
    # the training images: the same metrics, each under the prefix train_
    assert recorded - held == {f"train_{m}" for m in QUALITY_METRICS}


def test_training_images_are_scored_exactly_like_the_held_out_ones(faces):
    """The train_ columns equal what the held-out ones are for the same images: one code path."""
    x, factors = faces
    recon = (x * 0.85).clamp(0, 1)
    both = EvalContext(0, x, recon, x[:1], x, torch.zeros(8, 2), torch.zeros(8, 2),
                       factors.table(), None, None,
                       train=ImageSet(x, recon, torch.zeros(8, 2), torch.zeros(8, 2),
                                      factors.table()))
    for probe in (ImageQuality(), FactorFidelity()):
        out = _floats(probe.compute(both))
        for key, value in out.items():
            if key.startswith("train_"):
                assert value == pytest.approx(out[key[len("train_"):]], rel=1e-6), key


# -- probes loaded by path ----------------------------------------------------------------------

def test_example_probe_in_the_probes_folder():
    cls = load_from_path("probes/decoder_saturation.py:DecoderSaturation")
    x = torch.full((8, 3, 4, 4), 0.5)
    recon = x.clone()
    recon[:, :, :2] = 0.0  # half of every image pinned at black
    out = _floats(cls().compute(_eval_ctx(x, recon)))
    assert out == {"sat_recon_frac": 0.5, "sat_fixed_frac": 0.0, "sat_target_frac": 0.0}


@pytest.mark.parametrize(("content", "spec", "message"), [
    (None, "{d}/missing.py:P", "no such file"),
    ("x = 1\n", "{d}/p.py:P", "has no class P"),
    ("class P:\n    pass\n", "{d}/p.py:P", "is not a vaediag.probes.Probe subclass"),
    ("def broken(:\n", "{d}/p.py:P", "cannot import"),
    ("x = 1\n", "{d}/p.py", "expected FILE.py:ClassName"),
])
def test_bad_probe_files(tmp_path, content, spec, message):
    if content is not None:
        (tmp_path / "p.py").write_text(content)
    with pytest.raises(UserError, match=message):
        load_from_path(spec.format(d=tmp_path))


def test_sample_visits_every_filter_and_tap():
    """A conv weight (64 filters of 32 x 4 x 4) sampled to at most 1,000 of its 32,768 entries: the
    prime stride reaches every filter and every one of the 16 kernel taps."""
    shape = (64, 32, 4, 4)
    chosen = torch.arange(math.prod(shape))[sample_slice(math.prod(shape), 1_000)]
    assert 800 <= len(chosen) <= 1_000 and len(set(chosen.tolist())) == len(chosen)
    filters, taps = chosen // (32 * 16), chosen % 16
    assert set(filters.tolist()) == set(range(64)) and set(taps.tolist()) == set(range(16))
    assert sample_slice(300, 1_000) == slice(None) and sample_slice(300, 300) == slice(None)


def test_entry_sample_sums_estimate_the_layer_sums():
    """Sampled layers (weight and bias split in proportion) and whole layers, one vector."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(300, 200), nn.Linear(200, 3))  # 60,200 and 603 entries
    params = list(model.named_parameters())
    layers = LayerIndex.from_params(params)
    sample = EntrySample(list(range(4)), [p.numel() for _, p in params], layers, 2_048,
                         torch.device("cpu"))
    assert sample.size == 2_048 + 603 and sample.layer_ids.tolist() == [0, 1]
    flat = torch.empty(sample.size)
    sample.gather([p.abs() for _, p in params], flat)
    sums = sample.layer_sums(flat.unsqueeze(0))[0]
    exact = [params[0][1].abs().sum() + params[1][1].abs().sum(),
             params[2][1].abs().sum() + params[3][1].abs().sum()]
    assert sums[0].item() == pytest.approx(exact[0].item(), rel=0.03)
    assert sums[1].item() == pytest.approx(exact[1].item(), rel=1e-6)  # measured whole


def test_image_quality_of_a_nonfinite_image_is_nan_and_the_others_are_measured():
    """A model gone non-finite decodes NaN pixels: that image's metrics are NaN, the others'
    are what they are without it, and nothing raises (the probe stays on)."""
    from vaediag.probes.image_quality import quality

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g)
    y = (x + 0.1 * torch.randn(4, 3, 16, 16, generator=g)).clamp(0, 1)
    clean = quality(x, y, None)
    y[2, 0, 3, 3] = float("nan")
    y[3, 1, 0, 0] = float("inf")
    broken = quality(x, y, None)
    assert set(broken) == set(clean)
    for metric, values in broken.items():
        assert torch.isnan(values[2]), metric
        torch.testing.assert_close(values[[0, 1]], clean[metric][[0, 1]], rtol=0, atol=0,
                                   equal_nan=True)  # HaarPSI is NaN below 32 px
