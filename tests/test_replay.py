"""Replays (vaediag replay), their verification of remedies (analyze --verify), end to end on
tiny real runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import TINY, run_cli
from vaediag.analysis.findings import Finding
from vaediag.rundir import load_run
from vaediag.verify import remedy_settings, verify_finding

EVERY = ["--set", "eval.every_steps=20", "--set", "probes.metric_images=0"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """60 steps with an evaluation, and so a checkpoint, every 20."""
    out = tmp_path_factory.mktemp("replay") / "parent"
    code = run_cli_plain("train", "--out", out, "--steps", "60", *TINY, *EVERY)
    assert code == 0
    return out


def run_cli_plain(*args) -> int:
    from vaediag.cli import main

    return main([str(a) for a in args])


def _rows(run, table):
    frame = getattr(run, table).drop(columns=["time"])
    return list(frame.columns), frame.to_numpy(np.float64)


def test_a_replay_without_changes_repeats_its_parent_exactly(parent, tmp_path, capsys):
    code, out, err = run_cli(capsys, "replay", parent, "--from", "30", "--out",
                             tmp_path / "same", "--no-progress")
    assert code == 0, err
    assert "vaediag compare" in out
    a, b = load_run(parent), load_run(tmp_path / "same")
    for table in ("scalars", "evals"):
        cols_a, rows_a = _rows(a, table)
        cols_b, rows_b = _rows(b, table)
        assert cols_a == cols_b
        np.testing.assert_array_equal(rows_a, rows_b)  # bit for bit, from step 20 on too
    assert b.info["parent"] == {"run": str(parent), "step": 20, "changes": {}}
    assert b.status == "finished"
    grids_a, grids_b = dict(a.grids), dict(b.grids)
    assert sorted(grids_a) == sorted(grids_b) == [0, 20, 40, 60]
    assert all(grids_a[s].read_bytes() == grids_b[s].read_bytes() for s in grids_a)


def test_a_replay_applies_its_changes_from_the_checkpoint_on(parent, tmp_path, capsys):
    code, _, err = run_cli(capsys, "replay", parent, "--from", "25", "--set", "optim.eps=1e-4",
                           "--set", "optim.lr=3e-4", "--steps", "20", "--out",
                           tmp_path / "eps", "--no-progress")
    assert code == 0, err
    run = load_run(tmp_path / "eps")
    s = run.scalars
    assert list(s["step"]) == list(range(40))
    assert (s.loc[s["step"] < 20, "eps"] == np.float32(1e-8)).all()
    assert (s.loc[s["step"] >= 20, "eps"] == np.float32(1e-4)).all()  # applied, not reloaded
    assert (s.loc[s["step"] >= 20, "lr"] == np.float32(3e-4)).all()
    parent_rows = load_run(parent).scalars
    np.testing.assert_array_equal(s.loc[s["step"] < 20, "recon"],
                                  parent_rows.loc[parent_rows["step"] < 20, "recon"])
    assert s.loc[s["step"] == 25, "recon"].item() != \
        parent_rows.loc[parent_rows["step"] == 25, "recon"].item()
    (resume,) = [e for e in run.events.to_dict("records") if e["kind"] == "resume"]
    assert resume["changes"] == {"optim.eps": [1e-8, 1e-4], "optim.lr": [1e-3, 3e-4],
                                 "train.steps": [60, 40]}
    assert resume["optimizer_state"] == "restored"


def test_a_replay_with_another_optimizer_starts_its_state_afresh(parent, tmp_path, capsys):
    code, _, err = run_cli(capsys, "replay", parent, "--from", "40", "--set", "optim.name=sgd",
                           "--set", "optim.lr=0.01", "--out", tmp_path / "sgd", "--no-progress")
    assert code == 0, err
    run = load_run(tmp_path / "sgd")
    (resume,) = [e for e in run.events.to_dict("records") if e["kind"] == "resume"]
    assert resume["optimizer_state"] == "new"
    adam = [c for c in run.scalars.columns if c.startswith("layer.adam_")]
    assert adam and run.scalars.loc[run.scalars["step"] >= 40, adam].isna().all().all()


@pytest.mark.parametrize(("args", "message"), [
    (["--from", "10", "--out", "{tmp}/b"], "no checkpoint at or before step 10"),
    (["--from", "30", "--set", "optim.speed=2", "--out", "{tmp}/b"], "unknown key 'optim.speed'"),
    (["--from", "30", "--set", "model.latent_dim=8", "--out", "{tmp}/b"],
     "a replay cannot change model.latent_dim"),
    (["--from", "30", "--out", "{tmp}/exists"], "exists; choose another --out"),
    (["--out", "{tmp}/b"], "Missing option '--from'"),
    (["--from", "9999", "--out", "{tmp}/b"],
     "ends at step 60: a replay from step 9999 would start past it; choose a step from 0 to 60"),
])
def test_bad_replays_are_one_line_and_exit_2(parent, tmp_path, capsys, args, message):
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "mine.txt").write_text("x")
    if "no checkpoint" in message:  # a parent whose first checkpoint is at step 20
        for old in (parent / "checkpoints").glob("step-00000000.pt"):
            old.rename(tmp_path / old.name)
    try:
        code, _, err = run_cli(capsys, "replay", parent,
                               *[a.format(tmp=tmp_path) for a in args])
    finally:
        for moved in tmp_path.glob("step-*.pt"):
            moved.rename(parent / "checkpoints" / moved.name)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_remedy_settings_read_the_first_concrete_setting():
    assert remedy_settings("lower eps (--set optim.eps=1e-6)") == {"optim.eps": 1e-6}
    assert remedy_settings("stop beta at 3.2 (--set loss.beta=3.2), or free bits (--set "
                           "loss.free_bits=0.5)") == {"loss.beta": 3.2}
    assert remedy_settings("clip gradients (optim.grad_clip)") == {}
    assert remedy_settings("use leaky relu (--set model.activation=leaky_relu)") == {}


def test_verify_replays_a_remedy_and_measures_it(parent, tmp_path):
    """A finding whose remedy is a learning rate 30 times higher: the replay runs from the
    checkpoint before the finding through one evaluation past it and reports numbers."""
    run = load_run(parent)
    finding = Finding("loss_spike", "warning", 25, 30, "a spike", remedies=[
        "clip gradients (optim.grad_clip)", "a much higher lr (--set optim.lr=0.03)"])
    result = verify_finding(run, finding, tmp_path, max_steps=100)
    assert result.status == "verified", result.reason
    assert (result.from_step, result.to_step) == (20, 60)
    assert result.settings == {"optim.lr": 0.03}
    replayed = load_run(result.branch)
    assert replayed.info["parent"]["changes"]["optim.lr"] == [1e-3, 0.03]
    assert result.finding_gone in (True, False)
    values = result.values["eval_recon"]
    assert values["run"][0] == values["replay"][0]  # the same model at the checkpoint
    assert values["run"][1] != values["replay"][1]
    assert "replayed with optim.lr=0.03 from step 20 to 60" in result.describe()
    assert "the remedy printed first, 'clip gradients (optim.grad_clip)', names no setting" \
        in result.describe()


def test_a_replay_runs_through_the_finding_and_an_evaluation_past_it(parent, tmp_path):
    """A finding at the run's last evaluation (steps 40-41 of 60, evaluations every 20): the
    replay runs from the checkpoint at 20 through step 41 and one interval past it, to the
    evaluation at 80, past the run's own end; it never stops at the finding's first step."""
    run = load_run(parent)
    finding = Finding("oversized_update", "warning", 40, 41, "an update",
                      remedies=["(--set optim.eps=1e-6)"])
    result = verify_finding(run, finding, tmp_path, max_steps=100)
    assert result.status == "verified", result.reason
    assert (result.from_step, result.to_step) == (20, 80)
    replayed = load_run(result.branch)
    assert replayed.scalars["step"].max() == 79 and 41 in set(replayed.scalars["step"])
    assert result.compare == [20, 60]  # the run's own last evaluation within the replay


def test_a_long_finding_is_replayed_as_far_as_the_cap_allows(parent, tmp_path):
    """A collapse from step 25 to the run's end: seen at 26, replayed from 20 for at most
    20 steps, so through step 40, and verified there."""
    run = load_run(parent)
    long = Finding("posterior_collapse", "warning", 25, 60, "x",
                   remedies=["(--set optim.eps=1e-6)"])
    result = verify_finding(run, long, tmp_path, max_steps=20)
    assert result.status == "verified", result.describe()
    assert (result.from_step, result.to_step) == (20, 40)


def test_a_replay_that_cannot_reach_the_finding_says_so(parent, tmp_path):
    run = load_run(parent)
    far = Finding("loss_quality_decoupling", "warning", 40, 55, "x",
                  remedies=["(--set optim.eps=1e-6)"], compare_steps=[40, 60])
    result = verify_finding(run, far, tmp_path, max_steps=10)
    assert result.status == "not verifiable"
    assert result.reason.startswith("not reached: the finding is seen at step 60, more than 10 "
                                    "steps after the checkpoint at step 20")
    # a replay that stops before the finding (its remedy makes every step non-finite)
    doomed = Finding("loss_spike", "warning", 45, 50, "x", remedies=["(--set optim.lr=1e30)"])
    result = verify_finding(run, doomed, tmp_path, max_steps=100)
    assert result.status in ("not reached", "replay stopped"), result.describe()
    assert "the finding is gone" not in result.describe()


def test_verify_says_why_it_cannot(parent, tmp_path):
    run = load_run(parent)
    early = Finding("loss_spike", "warning", 0, 5, "x", remedies=["(--set optim.lr=1e-4)"])
    assert verify_finding(run, early, tmp_path).reason == "no checkpoint before step 0"
    vague = Finding("loss_spike", "warning", 30, 35, "x", remedies=["lower the lr"])
    assert "no remedy names a setting" in verify_finding(run, vague, tmp_path).reason


def test_analyze_verify_end_to_end(tmp_path, capsys, monkeypatch):
    """analyze --verify on a run with a planted spike: each warning or high finding is
    replayed or said why not, in the summary and in findings.json."""
    out = tmp_path / "spiked"
    code, _, err = run_cli(capsys, "train", "--out", out, "--steps", "140", *TINY,
                           "--set", "eval.every_steps=20", "--set", "probes.metric_images=0",
                           "--inject", "lr_spike@120:factor=100,steps=5")
    assert code == 0, err
    code, text, err = run_cli(capsys, "analyze", out, "--no-pdf", "--verify",
                              "--verify-steps", "60")
    assert code == 0, err
    findings = json.loads((out / "findings.json").read_text())
    serious = [f for f in findings["findings"] if f["severity"] != "info"]
    assert serious, "the planted spike should give a warning or high finding"
    verification = findings["verification"]
    assert [(v["kind"], v["first_step"]) for v in verification] == \
        [(f["kind"], f["first_step"]) for f in serious]
    assert "verified by replay" in text
    html = (out / "report.html").read_text()
    assert "Verified by replay" in html and verification[0]["kind"] in html
    assert any(v["status"] == "verified" for v in verification)
    for v in verification:
        assert v["text"] in " ".join(text.split()) or v["text"][:60] in " ".join(text.split())
        if v["status"] == "verified":
            assert (out / "replays" / f"verify-{v['kind']}-{v['first_step']}" /
                    "run.json").exists()
            assert v["values"]["eval_recon"]["run"] and v["to_step"] - v["from_step"] <= 60
        else:
            assert v["reason"]


def test_a_verification_says_when_the_run_has_no_evaluation_after_the_finding():
    """A step finding at 200 compared at the evaluation of step 200 (before its update) has
    nothing to compare; a collapse seen at the evaluation of 3,000 is compared there."""
    from vaediag.verify import Verification

    common = dict(status="verified", settings={"optim.eps": 1e-6}, finding_gone=True)
    spike = Verification("oversized_update", 200, 208, "warning", from_step=175, to_step=250,
                         compare=[175, 200], seen_step=201, **common)
    assert "the run has no evaluation after step 200 to compare" in spike.describe()
    collapse = Verification("posterior_collapse", 3000, 4000, "warning", from_step=2900,
                            to_step=4200, compare=[2900, 3000], seen_step=3000, **common)
    assert "the run lost no quality between steps 2,900 and 3,000" in collapse.describe()
