"""Analysis: the shared statistics against slow obvious references, bad and partial run
directories, the Python API and the ``vaediag analyze`` command."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

import vaediag
from tests.conftest import TINY, run_cli
from vaediag.analysis import stats
from vaediag.analysis.detectors import DETECTORS
from vaediag.testing import standard_evals, standard_scalars, write_run

# -- statistics ---------------------------------------------------------------------------------


def test_trailing_median_against_a_loop():
    x = np.random.default_rng(0).normal(size=300)
    rz = stats.trailing_robust_z(x, 40)
    for i in range(40, 300, 17):
        past = x[i - 40:i]  # the window before i, i excluded
        assert rz.median[i] == pytest.approx(np.median(past))
        exact_mad = stats.MAD_TO_SIGMA * np.median(np.abs(past - np.median(past)))
        assert rz.scale[i] == pytest.approx(exact_mad, rel=0.35)  # documented approximation
        assert rz.z[i] == pytest.approx((x[i] - rz.median[i]) / rz.scale[i])


def test_trailing_z_of_a_spike():
    x = np.random.default_rng(1).normal(size=400)
    x[300] = 12.0
    rz = stats.trailing_robust_z(x, 100)
    assert rz.z[300] > 8
    assert np.nanmax(np.abs(np.delete(rz.z, 300))) < 5


def _ewma_loop(x, alpha):
    """The exponential moving mean, one element at a time: m_t = (1 - a) m_{t-1} + a x_t."""
    out, m = [], x[0]
    for v in x:
        m = (1 - alpha) * m + alpha * v if out else v
        out.append(m)
    return np.array(out)


def test_ewm_z_against_a_loop_and_spikes_stay_visible():
    rng = np.random.default_rng(2)
    x = rng.normal(size=500)
    x[200] = x[220] = 40.0
    z = stats.ewm_z(x, alpha=0.03, cap=4.0)
    # reference: a first pass, values capped at mean + 4 sd of it, then z against the second
    m1 = np.concatenate([[np.nan], _ewma_loop(x, 0.03)[:-1]])
    s1 = pd.Series(x).ewm(alpha=0.03, adjust=False).std().shift(1).to_numpy()
    capped = np.where(np.isfinite(s1), np.minimum(x, m1 + 4 * s1), x)
    m2 = np.concatenate([[np.nan], _ewma_loop(capped, 0.03)[:-1]])
    s2 = pd.Series(capped).ewm(alpha=0.03, adjust=False).std().shift(1).to_numpy()
    np.testing.assert_allclose(z[30:], ((x - m2) / s2)[30:], rtol=1e-9)
    assert np.isnan(z[:30]).all()
    assert 0.7 < np.nanstd(np.delete(z, [200, 220])) < 1.3
    assert z[200] > 10 and z[220] > 10  # the first spike does not hide the second


def test_episodes_against_a_loop():
    rng = np.random.default_rng(3)
    mask = rng.random(200) < 0.2
    expected, start = [], None
    for i, v in enumerate(np.append(mask, False)):
        if v and start is None:
            start = i
        if not v and start is not None:
            expected.append((start, i - 1))
            start = None
    assert stats.episodes(mask, merge_gap=0) == expected
    merged = stats.episodes(np.array([1, 0, 0, 1, 0, 0, 0, 0, 1], bool), merge_gap=2)
    assert merged == [(0, 3), (8, 8)]


def test_noise_scale_of_a_quantised_series_is_its_typical_step():
    """A metric that moves in steps (half its changes exactly 0) has no tiny noise unit."""
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(0, 1.0, 40), 2)  # every value twice: half the changes are 0
    d = np.diff(x)
    assert np.mean(d == 0) >= 0.45
    assert stats.noise_scale(x) == pytest.approx(np.sqrt(np.pi / 2) * np.abs(d).mean())
    mad_sigma = 1.4826 * np.median(np.abs(d - np.median(d)))  # what the MAD alone says
    assert stats.noise_scale(x) > max(3 * mad_sigma, 0.3)


def test_noise_scale_and_decimate():
    x = np.random.default_rng(4).normal(scale=2.0, size=20000)
    assert stats.noise_scale(x) == pytest.approx(2.0 * np.sqrt(2), rel=0.05)
    values, block = stats.decimate(np.arange(10.0), 3)
    assert block == 4 and values.tolist() == [1.5, 5.5]


def test_change_points_find_a_planted_shift_on_a_long_series():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(0, 1, 60_000), rng.normal(1.0, 1, 40_000)])
    segments = stats.change_points(x)
    assert len(segments) == 2
    assert abs(segments[1].start - 60_000) <= 100  # one block of the decimated series
    assert segments[1].mean - segments[0].mean == pytest.approx(1.0, abs=0.05)
    assert len(stats.change_points(rng.normal(size=5000))) == 1


def _optimal_partition(y, penalty, min_size):
    """Every segmentation's cost, by dynamic programming without pruning: the slow reference."""
    n = len(y)
    best = {0: (-penalty, [])}
    for t in range(min_size, n + 1):
        options = [(best[s][0] + ((y[s:t] - y[s:t].mean()) ** 2).sum() + penalty, best[s][1] + [t])
                   for s in best if t - s >= min_size]
        if options:
            best[t] = min(options, key=lambda o: o[0])
    return best[n]


def test_pelt_finds_the_optimal_segmentation():
    rng = np.random.default_rng(12)
    for trial in range(20):
        n = int(rng.integers(8, 60))
        y = rng.normal(size=n) + np.repeat(rng.normal(scale=2, size=4), n // 4 + 1)[:n]
        penalty = float(rng.uniform(1, 10))
        cost, ends = _optimal_partition(y, penalty, 3)
        found = stats.pelt(y, penalty, min_size=3)
        starts = [0, *found[:-1]]
        found_cost = sum(((y[a:b] - y[a:b].mean()) ** 2).sum() + penalty
                         for a, b in zip(starts, found, strict=True)) - penalty
        assert found_cost == pytest.approx(cost, rel=1e-9), trial
        assert found == ends or found_cost == pytest.approx(cost, rel=1e-12)


def test_rolling_spearman_against_scipy():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=40), rng.normal(size=40)
    a[20] = np.nan  # windows with a gap are ranked without it
    b[5:8] = 1.0  # ties get average ranks
    rho = stats.rolling_spearman(a, b, 8)
    assert np.isnan(rho[:7]).all()
    for i in range(7, 40):
        x, y = a[i - 7:i + 1], b[i - 7:i + 1]
        ok = np.isfinite(x) & np.isfinite(y)
        assert rho[i] == pytest.approx(scipy_stats.spearmanr(x[ok], y[ok]).statistic)


def test_bce_floor_is_the_summed_entropy():
    images = np.random.default_rng(7).integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8)
    p = images.astype(np.float64) / 255
    entropy = [sum(scipy_stats.entropy([q, 1 - q]) for q in img.ravel()) for img in p]
    assert stats.bce_floor(images) == pytest.approx(np.mean(entropy))


# -- bad and partial run directories ------------------------------------------------------------

def _analyze_cli(capsys, run_dir, *extra):
    return run_cli(capsys, "analyze", run_dir, *extra)


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p / "missing", "no run directory at"),
    (lambda p: p, "not a vaediag run directory"),
    (lambda p: (p / "run.json").write_text("{trunc") and p, "is corrupt"),
])
def test_unreadable_run_dir_is_one_line_and_exit_2(tmp_path, capsys, make, message):
    code, out, err = _analyze_cli(capsys, make(tmp_path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_run_with_no_steps(tmp_path, capsys):
    run = write_run(tmp_path / "empty", None)
    code, out, _ = _analyze_cli(capsys, run)
    assert code == 0
    assert "0 steps" in out and "the run has no steps recorded" in out
    result = json.loads((run / "findings.json").read_text())
    assert result["findings"] == [] and all(c["status"] == "skipped" for c in result["checks"])


def test_run_with_one_step(tmp_path):
    cols = {k: v[:1] for k, v in standard_scalars(1).items()}
    result = vaediag.analyze(write_run(tmp_path / "one", cols))
    assert result.findings == []
    assert not [c for c in result.checks if c.status == "failed"]
    assert {c.detector for c in result.checks if c.status == "skipped"} >= {
        "loss_spikes", "kl_explosion", "decoupling"}


def test_run_with_only_the_losses(tmp_path):
    full = standard_scalars(1500)
    cols = {k: full[k] for k in ("step", "recon", "kl", "total")}
    cols["kl"][1000:] *= 10
    result = vaediag.analyze(write_run(tmp_path / "bare", cols, settings=["probes.preset=off"]))
    assert [f.kind for f in result.findings] == ["kl_explosion"]
    skipped = {c.detector: c.reason for c in result.checks if c.status == "skipped"}
    assert "no gradient norms recorded" in skipped["gradients"]
    assert "decoupling" in skipped and "adam" in skipped
    assert not [c for c in result.checks if c.status == "failed"]


def test_nan_filled_columns_do_not_crash(tmp_path):
    cols = standard_scalars(1500)
    evals = standard_evals(cols["step"][::50])
    for name in list(cols):
        if name not in ("step", "epoch", "time", "recon", "kl", "total"):
            cols[name] = np.full(len(cols[name]), np.nan, np.float32)
    for name in list(evals):
        if name not in ("step", "epoch", "time"):
            evals[name] = np.full(len(evals[name]), np.nan, np.float32)
    result = vaediag.analyze(write_run(tmp_path / "nan", cols, evals))
    assert not [c for c in result.checks if c.status == "failed"], result.checks
    assert result.findings == []


def test_truncated_last_write_is_analysed_and_reported(tmp_path):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    cols = standard_scalars(1500)
    run = write_run(tmp_path / "torn", cols)
    segment = sorted((run / "scalars").iterdir())[-1]
    table = ipc.open_stream(pa.memory_map(str(segment))).read_all()
    sink = pa.BufferOutputStream()  # as a writer leaves it before closing: batches of 500
    with ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=500):
            writer.write_batch(batch)
    segment.write_bytes(sink.getvalue().to_pybytes()[:-300])  # killed mid-batch
    result = vaediag.analyze(run)
    assert 1000 <= result.run["steps"] < 1500
    assert result.problems and "scalars" in result.problems[0]


def test_a_failing_detector_is_reported_not_fatal(tmp_path, monkeypatch):
    run = write_run(tmp_path / "r", standard_scalars(300))

    def broken(data):
        raise ValueError("boom")

    monkeypatch.setattr(DETECTORS[1], "detect", broken)
    result = vaediag.analyze(run)
    failed = [c for c in result.checks if c.status == "failed"]
    assert [c.detector for c in failed] == [DETECTORS[1].NAME]
    assert "ValueError: boom" in failed[0].reason



def test_an_undeclared_finding_kind_fails_its_detector(tmp_path, monkeypatch):
    """A finding whose kind its detector's KINDS do not declare is not reported (the reports
    would not know where to show it): the detector's check fails and names the kind."""
    from vaediag.analysis.findings import Finding

    run = write_run(tmp_path / "r", standard_scalars(300))
    monkeypatch.setattr(DETECTORS[1], "detect", lambda data: (
        [Finding("made_up_kind", "warning", 10, 20, "x")], []))
    result = vaediag.analyze(run)
    assert "made_up_kind" not in {f.kind for f in result.findings}
    failed = [c for c in result.checks if c.status == "failed"]
    assert [c.detector for c in failed] == [DETECTORS[1].NAME]
    assert "made_up_kind" in failed[0].reason


def test_every_kind_a_detector_writes_is_declared_by_it():
    """Each detector module names the kinds it emits (``Finding(kind="...")``, ``add("...")``
    or ``_held("...")``, or a loop or comprehension over literal names) only from its own
    ``KINDS``; and every kind of the registry
    has a report section and a place in the verdict's rules that exists."""
    import ast
    import inspect

    from vaediag.analysis import DECOUPLING, INSTABILITIES
    from vaediag.analysis.detectors import KINDS
    from vaediag.analysis.kinds import SECTIONS

    named_anywhere = set()
    for detector in DETECTORS:
        own = {k.name for k in detector.KINDS}
        assert own, detector.NAME
        written = set()
        for node in ast.walk(ast.parse(inspect.getsource(detector))):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "kind" and isinstance(kw.value, ast.Constant):
                        written.add(kw.value.value)
                if (isinstance(node.func, ast.Name) and node.func.id in ("add", "_held")
                        and node.args and isinstance(node.args[0], ast.Constant)):
                    written.add(node.args[0].value)
            if isinstance(node, (ast.For, ast.comprehension)) \
                    and isinstance(node.target, ast.Name) \
                    and node.target.id == "kind" and isinstance(node.iter, ast.Tuple):
                written |= {e.value for e in node.iter.elts if isinstance(e, ast.Constant)}
        assert written, f"{detector.NAME}: no finding kind found in its source"
        assert written <= own, f"{detector.NAME} writes undeclared kinds {written - own}"
        named_anywhere |= written
    assert set(KINDS) == named_anywhere  # no kind declared that no detector writes
    assert all(k.section in SECTIONS for k in KINDS.values())
    ranks = [KINDS[n].instability for n in INSTABILITIES]
    assert ranks == sorted(set(ranks)), "instability ranks must be distinct"
    assert set(DECOUPLING) == {"overfitting", "loss_quality_decoupling",
                               "loss_understates_quality"}


def test_analysis_never_imports_torch(tmp_path):
    cols = standard_scalars(1500)
    cols["kl"][1000:] *= 10
    run = write_run(tmp_path / "r", cols, standard_evals(cols["step"][::50]))
    code = ("import sys\n"
            "class NoTorch:\n"  # any import of torch now fails
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ImportError('no torch here')\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "import vaediag\n"
            f"r = vaediag.analyze({str(run)!r})\n"
            "print([f.kind for f in r.findings])\n"
            "from vaediag.cli import main\n"
            f"sys.exit(main(['analyze', {str(run)!r}, '--json']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "kl_explosion" in proc.stdout.splitlines()[0]


# -- the command --------------------------------------------------------------------------------

@pytest.fixture
def exploding_run(tmp_path):
    cols = standard_scalars(1500)
    cols["kl"][1000:] *= 10
    return write_run(tmp_path / "boom", cols, standard_evals(cols["step"][::50]))


def test_analyze_prints_a_summary_and_writes_findings_json(exploding_run, capsys):
    code, out, _ = _analyze_cli(capsys, exploding_run)
    assert code == 0
    assert "HIGH     kl_explosion" in out and "remedy:" in out and "cause: " in out
    assert out.splitlines()[1].startswith("verdict: KL exploded at step")
    written = json.loads((exploding_run / "findings.json").read_text())
    assert written["format"] == 1
    (f,) = [f for f in written["findings"] if f["kind"] == "kl_explosion"]
    assert set(f) >= {"kind", "severity", "first_step", "last_step", "summary", "evidence",
                      "cause", "remedies", "preceded_by", "compare_steps", "detector"}


def test_analyze_json_and_fail_on(exploding_run, capsys):
    code, out, _ = _analyze_cli(capsys, exploding_run, "--json", "--no-write")
    assert code == 0 and not (exploding_run / "findings.json").exists()
    payload = json.loads(out)
    assert payload["findings"][0]["severity"] == "high"
    assert payload["verdict"].startswith("KL exploded")
    assert _analyze_cli(capsys, exploding_run, "--fail-on", "high")[0] == 1
    calm = write_run(exploding_run.parent / "calm", standard_scalars(1500))
    assert _analyze_cli(capsys, calm, "--fail-on", "warning")[0] == 0


def test_python_api_matches_the_file(exploding_run, capsys):
    _analyze_cli(capsys, exploding_run)
    written = json.loads((exploding_run / "findings.json").read_text())
    result = vaediag.analyze(exploding_run)
    assert [f.to_json() for f in result.sorted_findings()] == written["findings"]


def test_end_to_end_injected_lr_spike_is_found(tmp_path, capsys):
    """A real tiny training run with a planted learning-rate spike, then analyze."""
    out = tmp_path / "spiked"
    code, _, err = run_cli(capsys, "train", "--out", out, "--steps", "220", *TINY,
                           "--set", "eval.every_steps=100", "--set", "probes.metric_images=0",
                           "--inject", "lr_spike@200:factor=100,steps=5")
    assert code == 0, err
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    (fault,) = [e for e in events if e["kind"] == "inject"]
    assert (fault["step"], fault["fault_kind"], fault["last_step"]) == (200, "lr_spike", 204)
    result = vaediag.analyze(out)
    hits = [f for f in result.findings if f.severity != "info" and 200 <= f.first_step <= 220]
    assert {f.kind for f in hits} & {"loss_spike", "grad_explosion", "oversized_update"}
    assert not [f for f in result.findings if f.severity == "high" and f.first_step < 200]


@pytest.mark.parametrize(("spec", "message"), [
    ("lr_spike", "expected KIND@STEP"),
    ("warp@10", "expected KIND@STEP"),
    ("lr_spike@x", "the step must be an integer"),
    ("lr_spike@10:speed=3", "unknown parameter 'speed'"),
    ("lr_spike@10:factor=big", "is not a number"),
    ("ood_batch@10:source=cats", "source must be noise or invert"),
])
def test_bad_inject_spec(tmp_path, capsys, spec, message):
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "r", "--steps", "5", *TINY,
                           "--inject", spec)
    assert code == 2 and message in err and err.count("\n") == 1


def test_badness_of_a_ratio_is_symmetric_in_log():
    b = stats.badness("sat_ratio", np.array([0.5, 2.0, 1.0, 0.25]))
    assert b[0] == pytest.approx(b[1]) and b[2] == 0 and b[3] == pytest.approx(2 * b[0])


def test_injector_faults_act_as_documented():
    import torch

    from vaediag.inject import Injector, parse_all
    from vaediag.model import ConvVAE

    inj = Injector(parse_all(["beta_scale@10:factor=0.1", "fade@20:amount=0.8,steps=40",
                              "inf_weight@30:layer=decoder.fc"]))
    assert (inj.beta_factor(9), inj.beta_factor(10), inj.beta_factor(10_000)) == (1, 0.1, 0.1)
    assert inj.fade_amount(19) == 0 and inj.fade_amount(39) == pytest.approx(0.4)
    assert inj.fade_amount(59) == inj.fade_amount(10_000) == pytest.approx(0.8)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    faded = inj.batch(59, x, None)
    spread = lambda t: (t - t.mean(1, keepdim=True)).abs().mean()  # noqa: E731
    assert float(spread(faded)) == pytest.approx(0.2 * float(spread(x)), rel=1e-5)
    assert torch.equal(inj.batch(19, x, None), x)
    model = ConvVAE(16, (8, 16), 4)
    inj.after_update(29, model)
    assert torch.isfinite(model.decoder.fc.weight).all()
    inj.after_update(30, model)
    assert model.decoder.fc.weight.view(-1)[0] == float("inf")
    assert torch.isfinite(model.decoder.fc.weight.view(-1)[1:]).all()


def test_end_to_end_corrupted_weight_is_named(tmp_path, capsys):
    """A real tiny run whose weight is set to Inf: stopped, and the finding names the weight."""
    out = tmp_path / "inf"
    code, _, err = run_cli(capsys, "train", "--out", out, "--steps", "60", *TINY,
                           "--set", "probes.metric_images=0",
                           "--inject", "inf_weight@40:layer=decoder.fc")
    assert code == 3 and "weight:decoder.fc.weight" in err
    (f,) = [f for f in vaediag.analyze(out).findings if f.kind == "nonfinite"]
    assert f.first_step == 40 and "the weight of decoder.fc" in f.summary


def test_a_verdict_says_what_was_not_checked(tiny_run, tmp_path):
    """A 30-step run cannot be checked for spikes or decoupling: the verdict says so on the
    terminal, in findings.json and on the PDF's first page, never a bare "all clear"."""
    import json
    import shutil
    import subprocess

    from vaediag.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["analyze", str(run)]) == 0
    data = json.loads((run / "findings.json").read_text())
    skipped = {c["detector"] for c in data["checks"] if c["status"] != "ok"} - {"lpips"}
    assert {d["detector"] for d in data["not_checked"]} == skipped
    assert {"decoupling", "generalisation"} <= skipped
    clause = "; not checked: " + ", ".join(d["detector"] for d in data["not_checked"])
    assert data["verdict"].endswith(clause)
    html = (run / "report.html").read_text()
    assert clause in html
    if shutil.which("pdftotext"):
        text = subprocess.run(["pdftotext", "-l", "1", str(run / "report.pdf"), "-"],
                              capture_output=True, text=True, check=True).stdout
        assert clause.strip("; ") in " ".join(text.split())
    # with nothing found, never a bare all-clear about what was not looked at
    calm = write_run(tmp_path / "calm", standard_scalars(40))
    assert vaediag.analysis.verdict(vaediag.analyze(calm)).startswith(
        "no instability or loss-quality decoupling found in what could be checked; not "
        "checked: ")


def test_what_was_not_checked_says_what_to_pass_and_names_a_failed_probe(tmp_path):
    """A run from a loop that gave no eval_loss= and whose image-quality probe failed: "not
    checked" says what to pass, and lists the probe, in the verdict and findings.json."""
    scalars = standard_scalars(1500)
    evals = {k: v for k, v in standard_evals(scalars["step"][::50]).items()
             if k not in ("eval_recon", "eval_kl")}
    events = [{"kind": "probe_failed", "step": 300, "probe": "image_quality",
               "error": "AssertionError: values must be >= 0"}]
    path = write_run(tmp_path / "run", scalars, evals, events=events)
    result = vaediag.analyze(path)
    reasons = dict(vaediag.analysis.unchecked_detectors(result))
    assert reasons["decoupling"] == (
        "not recorded in this run: eval_recon (the grid's images' own loss: pass eval_loss= to "
        "the Monitor (per-image recon and KL of the grid's images))")
    assert reasons["probe image_quality"].startswith(
        "the probe failed at step 300 and was disabled for the rest of the run "
        "(AssertionError: values must be >= 0)")
    assert "probe image_quality" in vaediag.analysis.verdict(result)
    listed = vaediag.analysis.findings_json(result)["not_checked"]
    assert {"detector": "probe image_quality", "reason": reasons["probe image_quality"]} \
        in listed


def test_the_shortest_run_of_each_analysis_is_documented_beside_eval_every(tmp_path):
    """The table in docs/probes.md and the Monitor's eval_every help are the code's numbers,
    and a run that short is just long enough: one evaluation fewer and it is not checked."""
    import inspect
    from pathlib import Path

    from vaediag.analysis.data import RunData, Skip
    from vaediag.analysis.detectors import decoupling
    from vaediag.analysis.thresholds import shortest_runs, shortest_runs_markdown
    from vaediag.monitor import Monitor
    from vaediag.rundir import load_run

    assert shortest_runs_markdown() in Path("docs/probes.md").read_text()
    runs = shortest_runs(100)
    assert runs["loss-quality decoupling"] == 600 and shortest_runs(50)[
        "loss-quality decoupling"] == 350
    help_text = " ".join(inspect.getdoc(Monitor).split())
    assert "with ``eval_every=100`` a run of at least 600 steps, with 50 at least 350" in \
        help_text
    for steps, checked in ((600, True), (599, False)):
        scalars = standard_scalars(steps + 1)
        evals = standard_evals(scalars["step"][::100])
        data = RunData(load_run(write_run(tmp_path / f"run{steps}", scalars, evals)))
        try:
            decoupling.detect(data)
            ran = True
        except Skip:
            ran = False
        assert ran is checked, steps
