from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from vaediag.config import LossConfig
from vaediag.losses import kl_mc_per_dim, kl_per_dim, loss_terms, recon_per_sample


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_kl_per_dim_matches_torch_distributions(gen):
    mu = torch.randn(5, 7, generator=gen, dtype=torch.float64) * 2
    logvar = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    reference = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0))
    torch.testing.assert_close(kl_per_dim(mu, logvar), reference)


def test_kl_is_zero_for_the_prior():
    zeros = torch.zeros(3, 4)
    assert torch.equal(kl_per_dim(zeros, zeros), zeros)


def test_monte_carlo_kl_is_unbiased(gen):
    mu = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, -1.0, 0.5]], dtype=torch.float64)
    n = 200_000
    eps = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    z = mu + eps * (0.5 * logvar).exp()
    mc = kl_mc_per_dim(z, mu.expand(n, 3), logvar.expand(n, 3)).mean(0)
    torch.testing.assert_close(mc, kl_per_dim(mu, logvar)[0], atol=0.02, rtol=0.01)
    # ... and per sample it equals log q(z|x) - log p(z) computed by torch.distributions.
    ref = Normal(mu, (0.5 * logvar).exp()).log_prob(z[:5]) - Normal(0.0, 1.0).log_prob(z[:5])
    torch.testing.assert_close(kl_mc_per_dim(z[:5], mu.expand(5, 3), logvar.expand(5, 3)), ref)


def test_bce_matches_bernoulli_log_prob_and_has_an_entropy_floor(gen):
    x = torch.rand(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    logits = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    ours = recon_per_sample(logits, x, "bce")
    ref = -(x * torch.log(torch.sigmoid(logits)) + (1 - x) * torch.log(torch.sigmoid(-logits)))
    torch.testing.assert_close(ours, ref.sum((1, 2, 3)))
    # Perfect reconstruction of grey-ish targets still costs their entropy: the floor.
    perfect = recon_per_sample(torch.logit(x), x, "bce")
    entropy = Bernoulli(probs=x).entropy().sum((1, 2, 3))
    torch.testing.assert_close(perfect, entropy)
    assert (perfect > 0).all()


def test_mse_and_gaussian(gen):
    x = torch.rand(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    logits = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    mean = torch.sigmoid(logits)
    torch.testing.assert_close(recon_per_sample(logits, x, "mse_sum"),
                               ((mean - x) ** 2).sum((1, 2, 3)))
    torch.testing.assert_close(recon_per_sample(logits, x, "mse_mean").mean(),
                               torch.nn.functional.mse_loss(mean, x))
    log_scale = torch.tensor(math.log(0.2), dtype=torch.float64)
    ref = -Normal(mean, 0.2).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(recon_per_sample(logits, x, "gaussian", log_scale), ref)
    with pytest.raises(ValueError, match="log_scale"):
        recon_per_sample(logits, x, "gaussian")


def test_loss_terms_free_bits_and_beta(gen):
    x = torch.rand(4, 3, 8, 8, generator=gen)
    logits = torch.randn(4, 3, 8, 8, generator=gen)
    mu = torch.zeros(4, 3)
    mu[:, 0] = 2.0  # dim 0 carries 2 nats, dims 1 and 2 none
    logvar = torch.zeros(4, 3)
    cfg = LossConfig(free_bits=0.5)
    terms = loss_terms(logits, x, mu, logvar, mu, cfg, beta=0.3)
    torch.testing.assert_close(terms.kl_dims, torch.tensor([2.0, 0.0, 0.0]))
    torch.testing.assert_close(terms.kl, torch.tensor(2.0))
    torch.testing.assert_close(terms.kl_penalty, torch.tensor(3.0))  # 2 + 0.5 + 0.5
    torch.testing.assert_close(terms.total, terms.recon + 0.3 * terms.kl_penalty)


def test_loss_terms_mc_uses_the_sample(gen):
    mu, logvar = torch.zeros(2, 3), torch.zeros(2, 3)
    z = torch.ones(2, 3)  # log q(z) - log p(z) = 0 when q = p, whatever z is
    x = torch.rand(2, 3, 4, 4, generator=gen)
    terms = loss_terms(torch.zeros(2, 3, 4, 4), x, mu, logvar, z, LossConfig(kl="mc"), beta=1.0)
    torch.testing.assert_close(terms.kl, torch.tensor(0.0))
    mu2 = torch.full((2, 3), 1.0)
    terms2 = loss_terms(torch.zeros(2, 3, 4, 4), x, mu2, logvar, z, LossConfig(kl="mc"), 1.0)
    # z = mu: log q = -0.5 log 2pi per dim, log p = -0.5 (1 + log 2pi): KL estimate 0.5 per dim.
    torch.testing.assert_close(terms2.kl, torch.tensor(1.5))
