"""Reports: structure of the HTML (sections, findings, embedded images, no network, escaping)
and the PDF (pages, rendering), on synthetic runs and a tiny real one; a real browser and
pdftoppm where the machine has them."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

import vaediag
from tests.conftest import run_cli
from vaediag.analysis.findings import Finding
from vaediag.report import SECTIONS, grid_steps
from vaediag.testing import standard_evals, standard_scalars, write_run

EVAL_EVERY = 50
IMG_SRC = re.compile(r'<img src="([^"]*)"')


def _run(tmp_path, name="r", settings=()):
    cols = standard_scalars(1500)
    cols["kl"][1000:] *= 10
    cols["layer.grad_norm/decoder.out"][800] *= 1000
    steps = cols["step"][::EVAL_EVERY]
    evals = standard_evals(steps)
    evals["colour_de"][18:] += 6.0  # quality worse from step 900 while the loss holds
    evals["sat_ratio"][18:] -= 0.3
    return write_run(tmp_path / name, cols, evals, grids=steps, settings=settings)


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    run = _run(tmp)
    code = vaediag.cli.main(["analyze", str(run)])
    assert code == 0
    return run


def test_html_has_every_section_and_finding(reported):
    html = (reported / "report.html").read_text()
    for anchor, title in SECTIONS:
        assert f'id="{anchor}"' in html and f'href="#{anchor}"' in html, anchor
        assert title in html
    result = vaediag.analyze(reported)
    for i, finding in enumerate(result.sorted_findings()):
        assert f'id="finding-{i}"' in html
        assert finding.kind in html
    assert "kl_explosion" in html and "loss_quality_decoupling" in html
    assert 'href="#grids-' in html  # findings link to their grids
    assert "Verdict:" in html and "KL exploded at step" in html


def test_html_is_self_contained(reported):
    html = (reported / "report.html").read_text()
    sources = IMG_SRC.findall(html)
    assert len(sources) >= 10
    for src in sources:
        assert re.match(r"data:image/(png|jpeg);base64,", src), src[:40]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            image.verify()
    assert not re.search(r"https?://", html)
    assert "<script" not in html and "<link" not in html and "@import" not in html


def test_pdf_has_pages(reported):
    pdf = (reported / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF")
    pages = len(re.findall(rb"/Type\s*/Page\b", pdf))
    assert pages >= 8, pages


def test_strings_from_config_and_path_are_escaped(tmp_path, capsys):
    parent = tmp_path / "<script>alert(1)<"  # the run dir's path reads <script>alert(1)</script>
    parent.mkdir()
    run = _run(parent, "script>", settings=['data.source="<script>alert(1)</script>"'])
    assert str(run).endswith("<script>alert(1)</script>")
    code, _, err = run_cli(capsys, "analyze", run, "--no-pdf")
    assert code == 0, err
    html = (run / "report.html").read_text()
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # the data source, escaped


def test_report_flags(tmp_path, capsys):
    run = _run(tmp_path)
    out = tmp_path / "elsewhere.html"
    code, stdout, _ = run_cli(capsys, "analyze", run, "--no-pdf", "--html", out)
    assert code == 0 and out.exists()
    assert not (run / "report.pdf").exists() and not (run / "report.html").exists()
    assert f"wrote {out}" in stdout
    untouched = _run(tmp_path, "untouched")
    before = sorted(p.name for p in untouched.iterdir())
    code, _, _ = run_cli(capsys, "analyze", untouched, "--no-write")
    assert code == 0 and sorted(p.name for p in untouched.iterdir()) == before
    code, _, err = run_cli(capsys, "analyze", run, "--pdf", tmp_path / "missing" / "r.pdf")
    assert code == 2 and "no such directory" in err


def test_report_of_a_run_with_only_losses_and_one_without_steps(tmp_path, capsys):
    full = standard_scalars(500)
    bare = write_run(tmp_path / "bare", {k: full[k] for k in ("step", "recon", "kl", "total")})
    empty = write_run(tmp_path / "empty", None)
    for run in (bare, empty):
        code, _, err = run_cli(capsys, "analyze", run)
        assert code == 0, err
        html = (run / "report.html").read_text()
        assert "Nothing recorded for this section" in html and "No grids in this run" in html
        assert (run / "report.pdf").read_bytes().startswith(b"%PDF")


def test_grid_steps_before_at_after():
    evals = [0, 50, 100, 150, 200]
    spike = Finding("loss_spike", "high", 120, 130, "")
    assert grid_steps(spike, evals) == [("before", 100), ("at", 150), ("after", 200)]
    decoupling = Finding("loss_quality_decoupling", "warning", 50, 150, "",
                         compare_steps=[50, 150])
    assert grid_steps(decoupling, evals) == [("before", 50), ("after", 150), ("next", 200)]
    assert grid_steps(spike, []) == []


def test_report_of_a_tiny_real_run(tiny_run, tmp_path, capsys):
    html, pdf = tmp_path / "tiny.html", tmp_path / "tiny.pdf"
    code, _, err = run_cli(capsys, "analyze", tiny_run, "--no-write", "--html", html,
                           "--pdf", pdf)
    assert code == 0, err
    text = html.read_text()
    assert "lpips" in text and "unavailable" in text  # what could not be checked is said
    assert len(IMG_SRC.findall(text)) >= 4


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (make test installs it where "
                           "apt-get can)")
def test_html_renders_in_headless_chromium(reported, tmp_path):
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tempfile.mkdtemp()}", "--hide-scrollbars",
                    "--window-size=1200,2400", f"--screenshot={shot}",
                    (reported / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"))
    assert pixels.shape == (2400, 1200)
    assert pixels.std() > 20  # text, figures and grids, not a blank page


@pytest.mark.skipif(shutil.which("pdftoppm") is None,
                    reason="pdftoppm (poppler-utils) is not installed (make test installs it "
                           "where apt-get can)")
def test_pdf_pages_render_with_pdftoppm(reported, tmp_path):
    subprocess.run(["pdftoppm", "-r", "30", "-png", str(reported / "report.pdf"),
                    str(tmp_path / "page")], check=True, timeout=120)
    pages = sorted(tmp_path.glob("page-*.png"))
    assert len(pages) >= 8
    for page in pages:
        with Image.open(page) as image:
            assert np.asarray(image.convert("L")).std() > 5  # something on every page


# -- comparing runs -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_run):
    """The tiny run, a replay of it with another learning rate, and their comparison."""
    from vaediag.cli import main

    where = tmp_path_factory.mktemp("compare")
    assert main(["replay", str(tiny_run), "--from", "16", "--set", "optim.lr=0.01", "--out",
                 str(where / "faster"), "--no-progress"]) == 0
    assert main(["compare", str(tiny_run), str(where / "faster"), "--html",
                 str(where / "c.html"), "--pdf", str(where / "c.pdf")]) == 0
    return where


def test_compare_sets_a_run_beside_its_replay(compared, tiny_run):
    html = (compared / "c.html").read_text()
    assert "vaediag comparison: tiny vs faster" in html
    assert "replay of tiny from step 16" in html
    assert re.search(r"<th>optim.lr</th><td>0.01</td><td>&nbsp;&nbsp;0.001</td>", html)
    assert html.count("<h3>Step ") == 2  # where it branched, and the last step both have
    assert "<h3>Step 16</h3>" in html and "<h3>Step 30</h3>" in html
    sources = IMG_SRC.findall(html)
    assert len(sources) == 2 + 2 * 2  # two figures, two runs' grids at two steps
    for src in sources:
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            image.verify()
    assert not re.search(r"https?://", html) and "<script" not in html
    pdf = (compared / "c.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page\b", pdf)) >= 4
    assert not (tiny_run / "compare.html").exists()  # nothing written into the runs


def test_compared_steps_start_where_a_replay_branched():
    from vaediag.report.compare import MAX_COMPARED_STEPS, compared_steps

    every = list(range(0, 1001, 100))
    assert compared_steps([every, every[3:]], [300]) == [300, 400, 600, 800, 1000]
    assert compared_steps([every, every], []) == [0, 200, 500, 800, 1000]
    assert len(compared_steps([every] * 3, [])) == MAX_COMPARED_STEPS
    assert compared_steps([[0, 10], [20]], []) == []


def test_compare_needs_two_readable_runs(tiny_run, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compare", tiny_run)
    assert code == 2 and "at least two run directories" in err
    code, _, err = run_cli(capsys, "compare", tiny_run, tmp_path / "missing")
    assert code == 2 and "no run directory at" in err and len(err.strip().splitlines()) == 1


def test_the_figures_leave_matplotlib_as_they_found_it():
    """No global style or backend at import (the reports' style is scoped to their figures),
    and the latent figure shades the kinds the registry puts in the latents section."""
    code = ("import matplotlib\n"
            "rc = {k: repr(v) for k, v in matplotlib.rcParams.items()}\n"
            "import vaediag.report.figures as figures, vaediag.report.pdf\n"
            "assert {k: repr(v) for k, v in matplotlib.rcParams.items()} == rc\n"
            "from vaediag.analysis.detectors import KINDS\n"
            "assert 'unused_dimensions' in figures.LATENT_KINDS\n"
            "assert figures.LATENT_KINDS == {n for n, k in KINDS.items() "
            "if k.section == 'latents'}\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_findings_grids_are_captioned_with_the_metrics_it_is_about():
    """A finding about the faces' pose shows the pose error under its grids, first."""
    import pandas as pd

    from vaediag.analysis.findings import Finding
    from vaediag.report import _about
    from vaediag.report.content import grid_caption

    evals = pd.DataFrame({"step": [300, 1000], "eval_recon": [2100.0, 2110.0],
                          "ssim": [0.6, 0.55], "colour_de": [10.0, 11.0],
                          "factor_angle_err": [6.46, 10.1]})
    pose = Finding("loss_quality_decoupling", "warning", 300, 1000, "x",
                   evidence={"metrics": {"factor_angle_err": {"before": 6.46, "after": 10.1}}},
                   compare_steps=[300, 1000])
    lines = grid_caption(evals, 1000, _about(pose))
    assert lines[0] == "step 1,000" and lines[1].startswith("factor_angle_err 10.1")
    assert "factor_angle_err" not in " ".join(grid_caption(evals, 1000))  # not by default


def test_a_run_figure_is_drawn_only_when_the_run_has_the_columns_it_declares():
    """Each figure declares the columns it reads (vaediag.columns); the report draws it only
    when the run's tables have rows with them."""
    import pandas as pd

    from vaediag import columns
    from vaediag.report.figures import RUN_FIGURES

    by_title = {figure.title: figure for figure in RUN_FIGURES}
    scatter, timelines = by_title["Loss against quality"], by_title["Losses over time"]
    steps = pd.DataFrame({columns.STEP: [0, 1], columns.RECON: [1.0, 0.9]})
    with_loss = pd.DataFrame({columns.STEP: [0, 100], columns.EVAL_RECON: [1.0, 0.8]})
    without_loss = pd.DataFrame({columns.STEP: [0, 100], "ssim": [0.5, 0.6]})
    assert scatter.eval_columns == (columns.STEP, columns.EVAL_RECON)
    assert scatter.drawable(steps, with_loss) and not scatter.drawable(steps, without_loss)
    assert not scatter.drawable(steps, with_loss.iloc[:0])  # the columns, but no rows
    assert timelines.drawable(steps, without_loss.iloc[:0])  # reads no evaluation
    assert not timelines.drawable(steps.iloc[:0], with_loss)
    for figure in RUN_FIGURES:  # every figure reads some table
        assert figure.step_columns or figure.eval_columns, figure.title
