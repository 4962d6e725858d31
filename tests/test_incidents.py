"""Incidents: findings that share a root cause are one incident, its root the earliest cause in
the order of a training step; severity from harm; the verdict leads with the earliest root."""

from __future__ import annotations

import numpy as np
import pytest

import vaediag
from vaediag.analysis import incidents, verdict
from vaediag.analysis.findings import Analysis, Finding
from vaediag.testing import standard_evals, standard_scalars, write_run

EVALS = list(range(0, 1500, 50))


def finding(kind: str, first: int, last: int | None = None, severity: str = "warning",
            detector: str = "") -> Finding:
    return Finding(kind=kind, severity=severity, first_step=first,
                   last_step=first if last is None else last, summary=f"{kind} at {first}",
                   detector=detector or kind, remedies=[f"fix {kind}"])


def grouped(*findings: Finding) -> list:
    found = incidents.group(list(findings), EVALS)
    incidents.grade(found, EVALS)
    return found


def test_a_learning_rate_jump_and_what_it_set_off_are_one_incident():
    """The step size jumps and the update is oversized at step 700 (the optimizer, then the
    update), the loss spikes and the gradients explode at 701, the pictures drift by the
    evaluation at 750: one incident, rooted at the step-size jump, the rest in the order seen."""
    jump = finding("adam_step_size_jump", 700)
    update = finding("oversized_update", 700, 708)
    spike = finding("loss_spike", 701, 720, "high")
    explosion = finding("grad_explosion", 701, 703, "high")
    drift = finding("generation_drift", 700, 750, detector="drift")
    (incident,) = grouped(spike, drift, explosion, update, jump)
    assert incident.root is jump and incident.severity == "high"
    assert incident.consequences == [update, spike, explosion, drift]
    assert [incident.after_steps(f) for f in incident.consequences] == [0, 1, 1, 50]
    assert incident.remedies == ["fix adam_step_size_jump"]


@pytest.mark.parametrize("first, second, root", [
    ("loss_spike", "grad_explosion", "loss_spike"),      # a bad batch: the forward pass first
    ("grad_explosion", "oversized_update", "grad_explosion"),  # scaled gradients, then the step
    ("nonfinite", "loss_spike", "nonfinite"),
])
def test_at_one_step_the_order_of_a_training_step_decides_the_root(first, second, root):
    a, b = finding(second, 700, severity="high"), finding(first, 700, severity="high")
    (incident,) = grouped(a, b)
    assert incident.root.kind == root


@pytest.mark.parametrize("gap, together", [(50, True), (51, False)])
def test_a_consequence_follows_within_the_window(gap, together):
    spike, explosion = finding("loss_spike", 700, severity="high"), \
        finding("kl_explosion", 700 + gap, severity="high")
    assert len(grouped(spike, explosion)) == (1 if together else 2)


def test_an_info_event_is_never_the_root_of_a_warning():
    small = finding("loss_spike", 690, severity="info")
    big = finding("kl_explosion", 700, severity="high")
    found = grouped(small, big)
    assert len(found) == 2 and {i.root.kind for i in found} == {"loss_spike", "kl_explosion"}


def test_two_views_of_one_decoupling_are_one_incident_and_a_later_collapse_another():
    """seed-decoupling's shape: the loss stops tracking quality from step 200 (and, seen over
    another pair of evaluations, from 400); the posterior collapses at 3,200."""
    a = finding("loss_quality_decoupling", 200, 1500, detector="decoupling")
    b = finding("loss_understates_quality", 400, 1800, detector="decoupling")
    collapse = finding("posterior_collapse", 3200, 4000)
    found = grouped(collapse, b, a)
    assert [len(i.members) for i in found] == [2, 1] and found[0].root is a
    result = Analysis({}, [a, b, collapse], [], [], [], incidents=found)
    assert verdict(result).startswith("loss_quality_decoupling at 200")


def test_a_risk_without_harm_is_info_and_says_so():
    alone = finding("grad_explosion", 500, severity="warning")
    harmed = finding("grad_explosion", 900, severity="high")
    spike = finding("loss_spike", 901, severity="high")
    grouped(alone, harmed, spike)
    assert alone.severity == "info" and "no harm followed within 50 steps" in alone.summary
    assert alone.evidence["severity_before_harm_check"] == "warning"
    assert harmed.severity == "high" and harmed.evidence["followed_by"]["step"] == 901


def test_a_risk_set_off_by_harm_keeps_its_severity():
    """A bad batch spikes the loss and so the gradient: the explosion is the spike's story."""
    spike, explosion = finding("loss_spike", 700, severity="high"), \
        finding("grad_explosion", 700, severity="warning")
    grouped(spike, explosion)
    assert explosion.severity == "warning"


def test_the_verdict_leads_with_the_root_of_the_worst_harm_then_the_earliest():
    early = finding("loss_understates_quality", 350, 750, detector="decoupling")
    early.evidence["tightest"] = {"before_step": 350, "after_step": 750}
    jump = finding("adam_step_size_jump", 500)
    spike = finding("loss_spike", 501, severity="high")
    found = grouped(early, jump, spike)
    assert len(found) == 2  # a slow change, the jump long before it was seen: not its doing
    text = verdict(Analysis({}, [early, jump, spike], [], [], [], incidents=found))
    assert text.startswith("adam_step_size_jump at 500; then loss spike at step 501 (+1)")
    assert "; earlier, loss_understates_quality at 350" in text


def test_an_event_just_before_a_slow_change_was_seen_is_its_root():
    """The tightest pair spans 8 evaluations (350 to 750), and a learning-rate jump came at
    700, in the interval just before the change was seen: that jump is its nearest cause."""
    slow = finding("loss_understates_quality", 350, 750, detector="decoupling")
    slow.evidence["tightest"] = {"before_step": 350, "after_step": 750}
    jump = finding("adam_step_size_jump", 700)
    (incident,) = grouped(slow, jump, finding("loss_spike", 701, severity="high"))
    assert incident.root is jump and slow in incident.consequences


def test_a_loss_quality_change_around_a_sudden_event_is_its_consequence():
    """The loss understates the pictures over the evaluations at 100 and 750, but the tightest
    pair that shows it is 700 and 750: the learning-rate jump at 700 set it off; one incident,
    and the verdict opens with the jump."""
    wide = finding("loss_understates_quality", 100, 750, detector="decoupling")
    wide.evidence["tightest"] = {"before_step": 700, "after_step": 750}
    jump = finding("adam_step_size_jump", 700)
    spike = finding("loss_spike", 701, severity="high")
    (incident,) = grouped(wide, jump, spike)
    assert incident.root is jump and wide in incident.consequences
    text = verdict(Analysis({}, [wide, jump, spike], [], [], [], incidents=[incident]))
    assert text.startswith("adam_step_size_jump at 700; then loss spike at step 701 (+1), "
                           "loss understates quality at step")


def test_analyze_groups_a_spike_and_the_gradient_explosion_it_caused(tmp_path):
    """End to end on a run directory: a loss spike at step 1,000 whose gradient explodes at
    the same step is one incident in findings.json, rooted at the spike."""
    cols = standard_scalars(1500)
    cols["recon"][1000:1004] *= 8
    cols["total"] = cols["recon"] + cols["kl"]
    for name in [c for c in cols if c.startswith("layer.grad_norm/")] + ["grad_norm"]:
        cols[name][1000:1002] *= 400
    run = write_run(tmp_path / "r", cols, standard_evals(cols["step"][::50]))
    result = vaediag.analyze(run)
    kinds = {f.kind for f in result.findings if f.severity != "info"}
    assert {"loss_spike", "grad_explosion"} <= kinds
    serious = [i for i in result.incidents if i.severity != "info"]
    assert len(serious) == 1 and serious[0].root.kind == "loss_spike"
    data = vaediag.analysis.findings_json(result)
    (entry,) = [i for i in data["incidents"] if i["severity"] != "info"]
    root = data["findings"][entry["root"]]
    assert root["kind"] == "loss_spike" and root["first_step"] == 1000
    assert {data["findings"][c["finding"]]["kind"] for c in entry["consequences"]} >= {
        "grad_explosion"}
    assert np.all([c["after_steps"] >= 0 for c in entry["consequences"]])


def test_a_verdict_of_nothing_found_still_points_at_the_info_findings_below():
    """Never "no decoupling found" directly above an info decoupling as if it were not there."""
    info = finding("loss_quality_decoupling", 300, 400, severity="info", detector="decoupling")
    text = verdict(Analysis({}, [info], [], [], [], incidents=grouped(info)))
    assert text == ("no instability or loss-quality decoupling found; 1 info finding below: "
                    "worth knowing, no harm measured")


def test_a_later_nonfinite_episode_is_harm_for_what_came_just_before_it(tmp_path):
    """A NaN from one batch at step 400, then the log-variance saturating at 902 and NaN
    gradients from 902: the saturation is followed by harm (the second episode), so it keeps
    its severity and is grouped with it; the first NaN is an incident of its own."""
    cols = standard_scalars(1500)
    cols["recon"][400] = np.nan
    cols["kl"][902:998] = np.nan
    cols["logvar_max"][902:] = 40.0
    events = [{"kind": "nonfinite", "step": 400, "term": "recon"},
              *({"kind": "nonfinite", "step": s, "term": "grad:encoder.fc.weight"}
                for s in range(902, 998))]
    result = vaediag.analyze(write_run(tmp_path / "r", cols, standard_evals(cols["step"][::50]),
                                       events=events))
    episodes = sorted((f for f in result.findings if f.kind == "nonfinite"),
                      key=lambda f: f.first_step)
    assert [f.first_step for f in episodes] == [400, 902]
    (saturation,) = [f for f in result.findings if f.kind == "logvar_saturation"]
    assert saturation.severity == "high" and "no harm followed" not in saturation.summary
    (late,) = [i for i in result.incidents if episodes[1] in i.members]
    assert saturation in late.members and episodes[0] not in late.members
