"""Reports: one self-contained HTML file and a PDF telling the same story, from a run directory
and its analysis. They read; they never recompute a statistic (figures decimate long series
for drawing only).

    >>> import vaediag
    >>> from vaediag.report import write_reports
    >>> analysis = vaediag.analyze("runs/demo")
    >>> write_reports("runs/demo", analysis, html="runs/demo/report.html",
    ...               pdf="runs/demo/report.pdf")
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaediag.analysis import DECOUPLING, verdict
from vaediag.analysis.findings import Analysis, Finding
from vaediag.columns import TIME
from vaediag.report.content import (
    HTML_NAME,
    MAX_FILMSTRIP,
    MAX_FINDING_GRIDS,
    PDF_NAME,
    SECTION_OF,
    SECTIONS,
    GridImage,
    GridSet,
    Image,
    IncidentView,
    Report,
    figure_png,
    grid_caption,
    load_grid,
)
from vaediag.rundir import Run, atomic_write, load_run

if TYPE_CHECKING:
    import pandas as pd


def _optimizer_line(optim: dict) -> str:
    """'adam, lr 0.001 (cosine), betas [0.9, 0.999], eps 1e-08, ...': what the run's [optim]
    holds (a user's loop records its optimizer's own hyperparameters, not vaediag's keys)."""
    schedule = optim.get("schedule")
    parts = [str(optim.get("name")),
             f"lr {_fmt(optim.get('lr'))}" + (f" ({schedule})" if schedule else "")]
    adam = "adam" in str(optim.get("name")).lower()
    parts += [f"{label} {_fmt(optim[key])}" for label, key in
              (("betas", "betas"), ("eps", "eps"), ("weight decay", "weight_decay"),
               ("momentum", "momentum")) if key in optim and not (adam and key == "momentum")]
    if "grad_clip" in optim:
        parts.append(f"grad clip {_fmt(optim.get('grad_clip')) or 'off'}")
    return ", ".join(parts)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return "" if value is None else str(value)


def header_rows(run: Run, analysis: Analysis) -> list[tuple[str, str]]:
    try:
        config = run.config
    except Exception:  # noqa: BLE001 - a report of a run without a readable config
        config = {}
    env = run.environment
    section = lambda name: config.get(name, {})  # noqa: E731
    data, model, loss, optim = section("data"), section("model"), section("loss"), \
        section("optim")
    rows = [("run", str(run.path.name)), ("directory", str(run.path)),
            ("status", analysis.run.get("status", ""))]
    if data:
        rows.append(("data", f"{data.get('source')} at {data.get('resolution')} px"))
    if model:
        rows.append(("model", f"conv VAE, channels {_fmt(model.get('channels'))}, latent "
                              f"{model.get('latent_dim')}, norm {model.get('norm')}, "
                              f"{model.get('activation')}"))
    if loss:
        schedule = loss.get("beta_schedule")
        rows.append(("loss", f"recon {loss.get('recon')}, KL {loss.get('kl')}, beta "
                             f"{_fmt(loss.get('beta'))}"
                             + (f" ({schedule})" if schedule and schedule != "constant" else "")
                             + (f", logvar clamp {_fmt(loss.get('logvar_clamp'))}"
                                if loss.get("logvar_clamp") else "")))
    if optim:
        rows.append(("optimizer", _optimizer_line(optim)))
    steps = analysis.run.get("steps") or 0
    rows.append(("steps", f"{steps:,} recorded ({analysis.run.get('first_step')} to "
                          f"{analysis.run.get('last_step')}), "
                          f"{analysis.run.get('evaluations', 0):,} evaluations"))
    scalars = run.scalars
    if TIME in scalars.columns and len(scalars):
        seconds = float(scalars[TIME].max())
        rows.append(("wall time", f"{seconds / 60:.1f} min" if seconds >= 60 else
                     f"{seconds:.0f} s"))
    versions = env.get("versions", {})
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items()
                                           if k in ("vaediag", "torch", "numpy"))
                     + (f", Python {env['python']}" if env.get("python") else "")
                     + (f", {env['device']}" if env.get("device") else "")))
    faults = analysis.run.get("faults") or []
    if faults:
        rows.append(("injected faults", ", ".join(str(f) for f in faults)))
    return rows


def grid_steps(finding: Finding, eval_steps: list[int]) -> list[tuple[str, int]]:
    """The evaluations to show for a finding: the two it compares (and the next), or the last
    before it, the first at or after its start, and the first after its end."""
    if not eval_steps:
        return []
    if finding.compare_steps:
        chosen = [("before", finding.compare_steps[0]), ("after", finding.compare_steps[-1])]
        later = [s for s in eval_steps if s > finding.compare_steps[-1]]
        if later:
            chosen.append(("next", later[0]))
        return [(r, s) for r, s in chosen if s in eval_steps]
    before = [s for s in eval_steps if s < finding.first_step]
    at = [s for s in eval_steps if s >= finding.first_step]
    after = [s for s in eval_steps if s > max(finding.last_step, at[0] if at else -1)]
    chosen = ([("before", before[-1])] if before else []) + ([("at", at[0])] if at else []) + \
        ([("after", after[0])] if after else [])
    return chosen


def build(run: Run, analysis: Analysis) -> tuple[Report, list]:
    """The report's content, and its figures (in order, as rendered images) for the PDF."""
    findings = analysis.sorted_findings()
    report = Report(title=f"vaediag report: {run.path.name}", verdict=verdict(analysis),
                    header=header_rows(run, analysis), findings=findings,
                    problems=list(analysis.problems))
    report.unchecked = [(c.detector, c.reason) for c in analysis.not_checked()]
    position = {id(f): i for i, f in enumerate(findings)}
    report.incidents = [IncidentView(i.severity, i.first_step, position[id(i.root)],
                                     [(i.after_steps(f), position[id(f)])
                                      for f in i.consequences])
                        for i in analysis.sorted_incidents()]
    report.verification = [v["text"] for v in analysis.verification]
    pdf_figures = _figures(report, run, analysis)
    grids = _Grids(dict(run.grids), report.problems)
    _finding_grids(report, findings, grids, run.evals)
    _filmstrip(report, grids, run.evals)
    return report, pdf_figures


def _figures(report: Report, run: Run, analysis: Analysis) -> list[tuple[str, Any]]:
    """Draw the figures, each once for both reports (drawing them again as vectors for the PDF
    cost as much as everything else in the reports together); returns the PDF's list."""
    from vaediag.report import figures

    scalars, evals = run.scalars, run.evals
    pdf_figures: list[tuple[str, Any]] = []

    for figure in figures.RUN_FIGURES:
        if not figure.drawable(scalars, evals):
            continue
        fig = figure.draw(scalars, evals, analysis)
        if fig is None:
            continue
        image = Image(figure_png(fig), figure.title)
        report.figures.setdefault(figure.section, []).append((figure.title, image))
        pdf_figures.append((figure.section, image))
    return pdf_figures


class _Grids:
    """The run's grids, each read once; an unreadable one is left out with a note among the
    report's problems."""

    def __init__(self, paths: dict[int, Path], problems: list[str]):
        self.paths, self.problems = paths, problems
        self.steps = sorted(paths)
        self._loaded: dict[int, Image | None] = {}

    def __call__(self, step: int) -> Image | None:
        if step not in self._loaded:
            data = load_grid(self.paths[step])
            if isinstance(data, str):
                note = (f"grids/{self.paths[step].name} is unreadable ({data}); left out of "
                        f"the report")
                self.problems.append(note)
                print(f"vaediag: warning: {note}", file=sys.stderr)
                self._loaded[step] = None
            else:
                self._loaded[step] = Image(data, f"grid at step {step}")
        return self._loaded[step]


def _about(finding: Finding) -> list[str]:
    """The evaluation columns a finding is about: the metrics it names, the quality it says
    was lost (its evidence), at most three."""
    named = [*finding.evidence.get("metrics", {}), *finding.evidence.get("quality_lost", {})]
    return list(dict.fromkeys(m for m in named if isinstance(m, str)))[:3]


def _finding_grids(report: Report, findings: list[Finding], grids: _Grids,
                   evals: pd.DataFrame) -> None:
    """The grids each warning names, decoupling first; findings that name the same
    evaluations share one set; at most ``MAX_FINDING_GRIDS`` sets."""
    shown = [(i, f) for i, f in enumerate(findings) if f.severity != "info"]
    decoupling_first = sorted(shown, key=lambda x: x[1].kind not in DECOUPLING)
    by_steps: dict[tuple[int, ...], GridSet] = {}
    for index, finding in decoupling_first:
        chosen = grid_steps(finding, grids.steps)
        if not chosen:
            continue
        key = tuple(step for _, step in chosen)
        if key in by_steps:  # the same evaluations as an earlier finding: show them once
            by_steps[key].findings.append(index)
            by_steps[key].title += f"; {finding.kind}"
            continue
        if len(by_steps) == MAX_FINDING_GRIDS:
            continue
        images = [(role, s, grids(s)) for role, s in chosen]
        by_steps[key] = GridSet(
            anchor=f"grids-{index}", findings=[index],
            title=f"{finding.kind} (steps {finding.first_step:,}-{finding.last_step:,})",
            grids=[GridImage(s, image, grid_caption(evals, s, _about(finding)), role)
                   for role, s, image in images if image is not None])
        report.grid_sets.append(by_steps[key])


def _filmstrip(report: Report, grids: _Grids, evals: pd.DataFrame) -> None:
    """Thumbnails of up to ``MAX_FILMSTRIP`` grids spread over the run."""
    from PIL import Image as PILImage

    steps = grids.steps
    if not steps:
        return
    pick = steps if len(steps) <= MAX_FILMSTRIP else [
        steps[round(k * (len(steps) - 1) / (MAX_FILMSTRIP - 1))] for k in range(MAX_FILMSTRIP)]
    for step in pick:
        image = grids(step)
        if image is None:
            continue
        with PILImage.open(io.BytesIO(image.data)) as im:
            thumb = im.convert("RGB")
            thumb.thumbnail((360, 360))
            buf = io.BytesIO()
            thumb.save(buf, format="JPEG", quality=85)  # thumbnails: a tenth of a PNG
        report.filmstrip.append(GridImage(step, Image(buf.getvalue(), f"step {step}",
                                                      "image/jpeg"),
                                          grid_caption(evals, step)))


def write_reports(run_dir: str | Path | Run, analysis: Analysis, *, html: str | Path | None,
                  pdf: str | Path | None) -> list[Path]:
    """Write the HTML and/or PDF report; returns the paths written."""
    from vaediag.report.html import render_html
    from vaediag.report.pdf import render_pdf

    run = run_dir if isinstance(run_dir, Run) else load_run(run_dir)
    report, pdf_figures = build(run, analysis)
    written = []
    if html is not None:
        atomic_write(Path(html), render_html(report).encode("utf-8"))
        written.append(Path(html))
    if pdf is not None:
        atomic_write(Path(pdf), render_pdf(report, [f for _, f in pdf_figures]))
        written.append(Path(pdf))
    return written


__all__ = ["HTML_NAME", "PDF_NAME", "SECTIONS", "SECTION_OF", "Report", "build", "grid_steps",
           "write_reports"]
