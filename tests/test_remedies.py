"""Remedies checked against the run's configuration: never one the run already applies."""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest

import vaediag
from vaediag.analysis import causes, remedies
from vaediag.analysis.data import RunData
from vaediag.analysis.detectors import DETECTORS, nonfinite
from vaediag.rundir import load_run
from vaediag.testing import standard_evals, standard_scalars, write_run


def knob_calls() -> list[tuple[str, str, object]]:
    """(module, key, literal value or None) of every ``knob(data, KEY[, VALUE])`` the
    detectors and the shared causes write."""
    found = []
    for module in (*DETECTORS, causes):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "knob" \
                    and isinstance(node.args[1], ast.Constant):
                key = node.args[1].value
                value = node.args[2] if len(node.args) > 2 else None
                literal = value.value if isinstance(value, ast.Constant) else (
                    "expr" if value is not None else None)
                found.append((module.__name__, key, literal))
    # a table of (text, key, value) remedies
    found += [("nonfinite", key, value) for entries in nonfinite._REMEDIES.values()
              for _, key, value in entries if key]
    return found


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("r") / "run"
    cols = standard_scalars(200)
    return write_run(path, cols, standard_evals(cols["step"][::50]))


def data_with(path, tmp_path, settings) -> RunData:
    cols = standard_scalars(200)
    return RunData(load_run(write_run(tmp_path / "with", cols, settings=settings)))


def test_every_setting_a_remedy_names_has_a_rule():
    calls = knob_calls()
    assert len(calls) >= 30  # the scan sees the detectors' remedies
    keys = {key for _, key, _ in calls}
    assert keys <= set(remedies.RULES) | remedies.DIRECTIONAL, \
        keys - set(remedies.RULES) - remedies.DIRECTIONAL


@pytest.mark.parametrize("key, value", sorted({(k, v) for _, k, v in knob_calls()
                                               if v not in (None, "expr")}, key=str))
def test_a_remedy_the_run_already_applies_is_dropped(tmp_path, trainer_run, key, value):
    """Each literal remedy setting, against a config that applies it: dropped; against the
    defaults: kept (unless the default already is that value)."""
    text = f"do it{' (--set ' + key + '=' + str(value) + ')'}"
    # a warm-up needs its length
    extra = ["loss.beta_warmup_steps=100"] if (key, value) == ("loss.beta_schedule",
                                                              "warmup") else []
    applies = data_with(trainer_run, tmp_path, [f"{key}={value}", *extra])
    assert remedies.check(text, applies) is None
    default = RunData(load_run(trainer_run))
    already = remedies.RULES[key][0](remedies.current(default, key), str(value))
    assert (remedies.check(text, default) is None) is already


@pytest.mark.parametrize("key, setting, note", [
    ("optim.grad_clip", "optim.grad_clip=100", "it already clips at 100: clip lower"),
    ("optim.warmup_steps", "optim.warmup_steps=500", "already warms up over 500 steps"),
    ("loss.free_bits", "loss.free_bits=0.2", "it already uses 0.2 nats: raise them"),
])
def test_a_remedy_the_run_applies_in_part_asks_for_more(tmp_path, trainer_run, key, setting,
                                                        note):
    text = f"clip or warm or free bits ({key})"
    assert note in remedies.check(text, data_with(trainer_run, tmp_path, [setting]))
    assert remedies.check(text, RunData(load_run(trainer_run))) == text


def test_undoing_a_recorded_change_is_kept(tmp_path, trainer_run):
    text = "set eps back to 1e-08 (--set optim.eps=1e-08)"
    assert remedies.check(text, RunData(load_run(trainer_run))) == text


def test_a_nonfinite_kl_in_an_analytic_kl_run_does_not_suggest_the_analytic_kl(tmp_path):
    cols = standard_scalars(1500)
    cols["kl"][900] = np.nan
    events = [{"kind": "nonfinite", "step": 900, "term": "kl"}]
    found = {}
    for kl in ("mc", "analytic"):
        run = write_run(tmp_path / kl, cols, standard_evals(cols["step"][::50]),
                        events=events, settings=[f"loss.kl={kl}"])
        (f,) = [f for f in vaediag.analyze(run).findings if f.kind == "nonfinite"]
        found[kl] = f
    assert any("analytic KL" in r for r in found["mc"].remedies)
    assert not any("analytic KL" in r for r in found["analytic"].remedies)
    assert any("analytic KL" in r
               for r in found["analytic"].evidence["remedies_already_applied"])
