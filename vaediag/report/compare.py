"""``vaediag compare``: several runs in one report (HTML and PDF), typically a run and its
replays. Losses and quality on the same step axis, the grids side by side at the same steps,
each run's settings where they differ from the first run's, its verdict and its findings.

It reads run directories and analyses each like ``vaediag analyze`` (writing nothing into
them); like the single-run report it never recomputes a statistic.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaediag import __version__
from vaediag.analysis import analyze, verdict
from vaediag.analysis.findings import Finding
from vaediag.report.content import GridImage, Image, figure_png, grid_caption, load_grid
from vaediag.rundir import Run, atomic_write, load_run

#: evaluations whose grids are set side by side
MAX_COMPARED_STEPS = 5


@dataclass
class ComparedRun:
    name: str
    path: str
    status: str
    steps: int
    verdict: str
    findings: list[Finding]
    #: "replay of NAME from step N" for a branch
    origin: str = ""
    #: settings that differ from the first run's: [(key, value here, value in the first run)]
    differences: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass
class Comparison:
    title: str
    runs: list[ComparedRun]
    figures: list[tuple[str, Image]] = field(default_factory=list)
    #: (step, one grid per run, None where a run has none at that step)
    grid_rows: list[tuple[int, list[GridImage | None]]] = field(default_factory=list)
    version: str = __version__


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config.items()
            if isinstance(values, dict) for key, value in values.items()}


def _config(run: Run) -> dict[str, Any]:
    """The run's settings by dotted key; a ``vaediag train`` run's with today's defaults for
    keys added since it was made (so they do not show as differences)."""
    try:
        config = _flat(run.config)
    except Exception:  # noqa: BLE001 - a run without a readable config still compares
        return {}
    if "train" not in run.config:
        return config
    from vaediag.config import Config

    defaults = {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in _flat(Config().to_dict()).items()}
    return {**defaults, **config}


def _names(runs: list[Run]) -> list[str]:
    """Each run's folder name, with its parent folder where two share a name."""
    names = [r.path.name for r in runs]
    return [f"{r.path.parent.name}/{r.path.name}" if names.count(r.path.name) > 1 else
            r.path.name for r in runs]


def compared_steps(eval_steps: list[list[int]], branch_steps: list[int]) -> list[int]:
    """The evaluations to set side by side: where a replay branched off (when every run has
    it), then steps evenly spread over those every run has, always the last of them; at most
    ``MAX_COMPARED_STEPS``."""
    common = sorted(set.intersection(*(set(s) for s in eval_steps))) if eval_steps else []
    if not common:
        return []
    chosen = [s for s in sorted(set(branch_steps)) if s in common][:1]
    later = [s for s in common if not chosen or s > chosen[0]] or common
    room = MAX_COMPARED_STEPS - len(chosen)
    if len(later) <= room:
        picks = later
    else:
        picks = [later[round(k * (len(later) - 1) / (room - 1))] for k in range(room)]
    return sorted(set(chosen + picks))


def build(paths: list[str | Path]) -> Comparison:
    """Read and analyse the runs, draw the figures, pick the grids."""
    from vaediag.report import compare_figures

    runs = [load_run(p) for p in paths]
    names = _names(runs)
    first = _config(runs[0])
    compared: list[ComparedRun] = []
    branches: list[tuple[str, int]] = []
    for run, name in zip(runs, names, strict=True):
        analysis = analyze(run)
        parent = run.info.get("parent")
        origin = ""
        if isinstance(parent, dict) and "step" in parent:
            origin = f"replay of {Path(str(parent.get('run', '?'))).name} from step " \
                     f"{int(parent['step']):,}"
            branches.append((name, int(parent["step"])))
        mine = _config(run)
        differences = [(k, str(mine.get(k)), str(first.get(k)))
                       for k in sorted(set(mine) | set(first)) if mine.get(k) != first.get(k)]
        compared.append(ComparedRun(name, str(run.path), analysis.run.get("status", ""),
                                    analysis.run.get("steps") or 0, verdict(analysis),
                                    analysis.sorted_findings(), origin, differences))
    comparison = Comparison("vaediag comparison: " + " vs ".join(names), compared)

    def add(title: str, fig) -> None:
        if fig is not None:
            comparison.figures.append((title, Image(figure_png(fig), title)))

    with_rows = [(n, r.scalars) for n, r in zip(names, runs, strict=True) if len(r.scalars)]
    if with_rows:
        add("Losses per step", compare_figures.compare_losses(with_rows, branches))
    with_evals = [(n, r.evals) for n, r in zip(names, runs, strict=True) if len(r.evals)]
    if with_evals:
        add("Loss and quality at each evaluation",
            compare_figures.compare_quality(with_evals, branches))

    grids = [dict(r.grids) for r in runs]
    for step in compared_steps([sorted(g) for g in grids], [s for _, s in branches]):
        row: list[GridImage | None] = []
        for run, grid in zip(runs, grids, strict=True):
            data = load_grid(grid[step]) if step in grid else "none"
            row.append(None if isinstance(data, str) else GridImage(
                step, Image(data, f"grid at step {step}"), grid_caption(run.evals, step)))
        comparison.grid_rows.append((step, row))
    return comparison


def render_html(comparison: Comparison) -> str:
    from vaediag.report.html import _environment

    return _environment().get_template("compare.html.j2").render(c=comparison)


def render_pdf(comparison: Comparison) -> bytes:
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    from vaediag.report.figures import grid_panel
    from vaediag.report.pdf import image_array, image_page, text_pages

    blocks: list[tuple[str, str]] = [("title", comparison.title)]
    for r in comparison.runs:
        blocks.append(("h1", r.name))
        blocks.append(("body", f"{r.path}: {r.status}, {r.steps:,} steps"
                               + (f"; {r.origin}" if r.origin else "")))
        blocks += [("bullet", f"{k} = {mine} (first run: {theirs})")
                   for k, mine, theirs in r.differences]
        blocks.append(("body", f"Verdict: {r.verdict}"))
        if not r.findings:
            blocks.append(("body", "No findings."))
        blocks += [("bullet", f"{f.severity.upper()} {f.kind} (steps {f.first_step:,}-"
                              f"{f.last_step:,}): {f.summary}") for f in r.findings]
    buf = io.BytesIO()
    with PdfPages(buf, metadata={"Title": comparison.title, "Creator": "vaediag"}) as pdf:
        text_pages(pdf, blocks)
        for _, image in comparison.figures:
            fig = image_page(image.data)
            pdf.savefig(fig)
            plt.close(fig)
        for step, row in comparison.grid_rows:
            shown = [(f"{r.name}: " + " | ".join(c for c in g.caption[1:] if c),
                      image_array(g.image.data))
                     for r, g in zip(comparison.runs, row, strict=True) if g is not None]
            fig = grid_panel(shown, f"The grids at step {step:,}")
            pdf.savefig(fig)
            plt.close(fig)
        text_pages(pdf, [("small", f"Written by vaediag {comparison.version}.")])
    return buf.getvalue()


def write_comparison(paths: list[str | Path], *, html: str | Path | None,
                     pdf: str | Path | None) -> list[Path]:
    """Compare the runs at ``paths``; write the HTML and/or PDF; returns the paths written."""
    comparison = build(paths)
    written = []
    if html is not None:
        atomic_write(Path(html), render_html(comparison).encode("utf-8"))
        written.append(Path(html))
    if pdf is not None:
        atomic_write(Path(pdf), render_pdf(comparison))
        written.append(Path(pdf))
    return written


__all__ = ["Comparison", "ComparedRun", "build", "compared_steps", "write_comparison"]
