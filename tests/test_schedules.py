from __future__ import annotations

import pytest

from vaediag.config import LossConfig, OptimConfig
from vaediag.schedules import beta_at, lr_at


def test_constant_and_warmup_lr():
    cfg = OptimConfig(lr=1e-3, warmup_steps=4)
    assert [lr_at(s, cfg, 100) for s in range(5)] == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_cosine_lr_runs_from_peak_to_floor():
    cfg = OptimConfig(lr=1.0, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, cfg, 101) == pytest.approx(1.0)
    assert lr_at(50, cfg, 101) == pytest.approx(0.55, abs=0.01)
    assert lr_at(100, cfg, 101) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(1000, cfg, 101) == pytest.approx(0.1)  # past the end: stays at the floor


def test_step_lr():
    cfg = OptimConfig(lr=1.0, schedule="step", step_every=10, step_gamma=0.5)
    assert [lr_at(s, cfg, 100) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]


def test_beta_schedules():
    assert beta_at(7, LossConfig(beta=2.0)) == 2.0
    warm = LossConfig(beta=2.0, beta_schedule="warmup", beta_warmup_steps=10)
    assert [beta_at(s, warm) for s in (0, 5, 10, 50)] == [0.0, 1.0, 2.0, 2.0]
    cyc = LossConfig(beta=1.0, beta_schedule="cyclical", beta_cycle_steps=10,
                     beta_cycle_ratio=0.5)
    assert [beta_at(s, cyc) for s in (0, 2, 5, 9, 10, 12)] == pytest.approx(
        [0.0, 0.4, 1.0, 1.0, 0.0, 0.4])
