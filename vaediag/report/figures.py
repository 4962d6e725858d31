"""The report's figures, as matplotlib Figures sized for an A4 page (8.3 in wide).

Each function takes the run's tables and the analysis and draws; none computes a statistic.
Long per-step series are decimated *for drawing only* (block median with a min-max band, or
block max for heatmaps), and so are long evaluation series (block medians, markers only while
they are few; the scatter shows at most ``MAX_SCATTER`` evaluations, evenly spread), so a
million-step run plots about as fast as a short one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from vaediag import columns
from vaediag.analysis import DECOUPLING
from vaediag.analysis.detectors import KINDS
from vaediag.analysis.findings import Analysis, Finding
from vaediag.columns import (
    ACTIVE_UNITS,
    ADAM_EPS_FRAC,
    ADAM_UPDATE_RMS,
    BETA,
    EVAL_RECON,
    LOGVAR_MAX,
    LOGVAR_MIN,
    MU_MAX,
    MU_MIN,
    STEP,
    UPDATE_RATIO,
)

PAGE_WIDTH = 8.3  # inches: A4 portrait
MAX_POINTS = 1500  # drawn per series
MAX_COLUMNS = 600  # drawn per heatmap row
MAX_EVAL_POINTS = 600  # evaluations drawn per line; more are drawn as block medians
MAX_MARKED = 150  # evaluation lines get a marker per point up to this many points
MAX_SCATTER = 400  # evaluations drawn in a scatter
SEVERITY_COLOURS = {"high": "#d62728", "warning": "#ff7f0e", "info": "#1f77b4"}
#: shaded on the latent-health figure: the kinds their detectors show in the latents section
LATENT_KINDS = {name for name, kind in KINDS.items() if kind.section == "latents"}

#: seaborn's "paper" context and "whitegrid" style, as matplotlib ships them (importing seaborn
#: to set a theme would cost most of a second: it imports scipy.stats); applied to the reports'
#: figures only, never to the process (no global style or backend is set at import)
STYLE = ("seaborn-v0_8-whitegrid", "seaborn-v0_8-paper")


def styled(draw: Callable[..., Any]) -> Callable[..., Any]:
    """Draw a figure in the reports' style, scoped to it."""
    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with plt.style.context(STYLE):
            return draw(*args, **kwargs)
    return wrapper


def subplots(*args: Any, figsize: tuple[float, float], **kwargs: Any):
    """(figure, axes) like ``plt.subplots``, but a figure of its own: not in pyplot's list (so
    nothing to close), drawn by the Agg canvas whatever the process's backend."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def _blocks(steps: np.ndarray, values: np.ndarray, max_points: int = MAX_POINTS):
    """(step, median, min, max) per block of a series, NaN-aware, for drawing."""
    ok = np.isfinite(values)
    steps, values = steps[ok], values[ok]
    if len(values) <= max_points:
        return steps, values, values, values
    block = math.ceil(len(values) / max_points)
    n = len(values) // block * block
    shaped = values[:n].reshape(-1, block)
    return (steps[:n].reshape(-1, block)[:, 0], np.median(shaped, 1), shaped.min(1),
            shaped.max(1))


def plot_evals(ax, steps, values, marker: str, **style) -> None:
    """An evaluation series as a line: decimated beyond ``MAX_EVAL_POINTS``, with markers
    while it has at most ``MAX_MARKED`` points (markers are what costs in a PDF)."""
    x, med, _, _ = _blocks(np.asarray(steps), np.asarray(values, dtype=np.float64),
                           MAX_EVAL_POINTS)
    ax.plot(x, med, marker=marker if len(x) <= MAX_MARKED else None, **style)


def shade(ax, findings: list[Finding], kinds: set[str] | None = None) -> None:
    for f in findings:
        if kinds is not None and f.kind not in kinds:
            continue
        colour = SEVERITY_COLOURS[f.severity]
        if f.last_step > f.first_step:
            ax.axvspan(f.first_step, f.last_step, color=colour, alpha=0.12, lw=0, zorder=0)
        ax.axvline(f.first_step, color=colour, lw=0.6, alpha=0.6, ls="--", zorder=1)


def plot_series(ax, scalars: pd.DataFrame, column: str, label: str, colour: str,
                ls: str = "-") -> bool:
    """One per-step column as a line (block medians with a min-max band when decimated);
    whether anything was drawn."""
    if column not in scalars.columns:
        return False
    x, med, lo, hi = _blocks(scalars[STEP].to_numpy(), scalars[column].to_numpy(np.float64))
    if not len(x):
        return False
    if len(x) < len(scalars):
        ax.fill_between(x, lo, hi, color=colour, alpha=0.2, lw=0)
    ax.plot(x, med, color=colour, lw=0.8, label=label, zorder=3, ls=ls)
    return True


@styled
def timelines(scalars: pd.DataFrame, evals: pd.DataFrame, analysis: Analysis) -> Figure:
    """Reconstruction and KL (log scale) per step with the evaluation values on the same axes,
    flagged spans shaded; the learning rate and beta below."""
    fig, axes = subplots(3, 1, figsize=(PAGE_WIDTH, 7.2), sharex=True,
                         gridspec_kw={"height_ratios": [3, 3, 1.4]})
    for ax, term, colour in ((axes[0], columns.RECON, "C0"), (axes[1], columns.KL, "C2")):
        drawn = plot_series(ax, scalars, term, f"{term} (training batch, per step)", colour)
        eval_col = f"eval_{term}"
        if eval_col in evals.columns and evals[eval_col].notna().any():
            plot_evals(ax, evals[STEP], evals[eval_col], "o", color="k", ms=3, lw=0.8,
                        label=f"{term} (the 8 held-out grid images, per evaluation)")
            drawn = True
        train_col = f"train_{eval_col}"  # the 8 fixed training images, scored alike
        if train_col in evals.columns and evals[train_col].notna().any():
            plot_evals(ax, evals[STEP], evals[train_col], "x", color="0.45", ms=3, lw=0.8,
                        ls="--", label=f"{term} (8 fixed training images, per evaluation)")
        if drawn:
            positive = scalars[term] if term in scalars.columns else pd.Series([1.0])
            if (positive.dropna() > 0).all():
                ax.set_yscale("log")
            ax.legend(loc="upper right", fontsize=7)
        ax.set_ylabel(term)
        shade(ax, analysis.findings)
    ax = axes[2]
    if plot_series(ax, scalars, columns.LR, "learning rate", "C4"):
        ax.set_ylabel("lr")
        if BETA in scalars.columns and scalars[BETA].nunique() > 1:
            twin = ax.twinx()
            plot_series(twin, scalars, columns.BETA, "beta (KL weight)", "C5")
            twin.set_ylabel("beta")
            twin.grid(False)
    shade(ax, analysis.findings)
    axes[-1].set_xlabel("step")
    fig.suptitle("Losses over training (shaded: findings, coloured by severity)", fontsize=10)
    fig.tight_layout()
    return fig


def quality_metrics(evals: pd.DataFrame) -> list[tuple[str, str]]:
    """(metric, label) of the quality metrics to draw (:data:`vaediag.columns.QUALITY_METRICS`
    marked ``shown``) that have at least two recorded values."""
    return [(m, facts.label) for m, facts in columns.QUALITY_METRICS.items()
            if facts.shown and m in evals.columns and evals[m].notna().sum() >= 2]


@styled
def loss_vs_quality(scalars: pd.DataFrame, evals: pd.DataFrame, analysis: Analysis
                    ) -> Figure | None:
    """The evaluation loss (black) against each quality metric (colour) over time, one panel per
    metric with twin axes; decoupling findings shaded."""
    metrics = quality_metrics(evals)
    if EVAL_RECON not in evals.columns or not metrics:
        return None
    cols = 2
    rows = math.ceil(len(metrics) / cols)
    fig, axes = subplots(rows, cols, figsize=(PAGE_WIDTH, 1.9 * rows + 0.6), sharex=True,
                         squeeze=False)
    steps = evals[STEP].to_numpy()
    kinds = set(DECOUPLING)
    for ax, (metric, label) in zip(axes.flat, metrics, strict=False):
        plot_evals(ax, steps, evals[EVAL_RECON], "o", color="k", ms=2, lw=0.8)
        ax.set_ylabel("eval recon", fontsize=7)
        twin = ax.twinx()
        plot_evals(twin, steps, evals[metric], "s", color="C3", ms=2, lw=0.8)
        train = f"train_{metric}"  # the same metric of the 8 fixed training images
        if train in evals.columns and evals[train].notna().sum() >= 2:
            plot_evals(twin, steps, evals[train], "x", color="C1", ms=2, lw=0.7, ls="--")
        twin.set_ylabel(metric, color="C3", fontsize=7)
        twin.grid(False)
        ax.set_title(label, fontsize=8)
        shade(ax, analysis.findings, kinds)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    training = any(f"train_{m}" in evals.columns for m, _ in metrics)
    fig.suptitle("Loss (black) and image quality (red) at each evaluation"
                 + ("; the training images' quality dashed" if training else ""), fontsize=10)
    fig.tight_layout()
    return fig


@styled
def correlation(scalars: pd.DataFrame, evals: pd.DataFrame, analysis: Analysis
                ) -> Figure | None:
    """The rolling Spearman correlation of the loss's and each metric's changes, as the
    decoupling detector derived it: positive while they move together."""
    derived = analysis.derived.get("loss_quality_correlation")
    if not derived or not derived.get("metrics"):
        return None
    fig, ax = subplots(figsize=(PAGE_WIDTH, 2.8))
    steps = np.asarray(derived["steps"])
    for k, (metric, rho) in enumerate(derived["metrics"].items()):
        rho = np.asarray(rho, dtype=np.float64)
        if np.isfinite(rho).any():
            ax.plot(steps, rho, lw=0.9, label=metric, color=f"C{k % 10}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("Spearman rho")
    ax.set_xlabel("step")
    ax.set_title(f"Rolling rank correlation of loss changes and quality-metric changes "
                 f"(window {derived['window']} evaluations; badness, so + = moving together)",
                 fontsize=8)
    ax.legend(fontsize=6, ncol=4, loc="lower left")
    fig.tight_layout()
    return fig


@styled
def loss_quality_scatter(scalars: pd.DataFrame, evals: pd.DataFrame, analysis: Analysis
                         ) -> Figure | None:
    """Loss against quality at every evaluation, coloured by step: where the cloud bends away,
    the loss stopped tracking the metric."""
    metrics = quality_metrics(evals)[:4]
    if EVAL_RECON not in evals.columns or not metrics:
        return None
    fig, axes = subplots(1, len(metrics), figsize=(PAGE_WIDTH, 2.6), squeeze=False)
    evals = evals.iloc[::math.ceil(len(evals) / MAX_SCATTER)]
    for ax, (metric, _) in zip(axes[0], metrics, strict=True):
        points = ax.scatter(evals[EVAL_RECON], evals[metric], c=evals[STEP], cmap="viridis",
                            s=12)
        ax.plot(evals[EVAL_RECON], evals[metric], color="grey", lw=0.4, alpha=0.6)
        ax.set_xlabel("eval recon", fontsize=7)
        ax.set_ylabel(metric, fontsize=7)
        ax.tick_params(labelsize=6)
    fig.subplots_adjust(left=0.07, right=0.88, bottom=0.2, top=0.85, wspace=0.55)
    fig.colorbar(points, ax=axes[0].tolist(), label="step", fraction=0.03)
    fig.suptitle("Loss against quality, coloured by step", fontsize=10)
    return fig


def _decimated_matrix(steps: np.ndarray, frame: pd.DataFrame, reduce: str):
    values = frame.to_numpy(np.float64)
    recorded = np.isfinite(values).any(1)
    steps, values = steps[recorded], values[recorded]
    if len(steps) > MAX_COLUMNS:
        block = math.ceil(len(steps) / MAX_COLUMNS)
        n = len(steps) // block * block
        shaped = values[:n].reshape(-1, block, values.shape[1])
        with np.errstate(all="ignore"):
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                if reduce == "max":
                    values = np.nanmax(shaped, 1)
                elif np.isnan(shaped).any():
                    values = np.nanmedian(shaped, 1)
                else:  # five times faster than nanmedian
                    values = np.median(shaped, 1)
        steps = steps[:n].reshape(-1, block)[:, 0]
    return steps, values


#: per-layer statistics shown as heatmaps: (stat, title, reduce, log colour scale)
LAYER_MAPS = ((columns.GRAD_NORM, "gradient norm", "max", True),
              (ADAM_UPDATE_RMS, "Adam update RMS (healthy ~0.2-0.3; 1 = sign descent)", "max",
               False),
              (ADAM_EPS_FRAC, "fraction of entries with sqrt(v^) < eps", "max", False),
              (UPDATE_RATIO, "update-to-weight ratio |dW|/|W|", "max", True))


@styled
def layer_heatmaps(scalars: pd.DataFrame, evals: pd.DataFrame, analysis: Analysis
                   ) -> Figure | None:
    """Per-layer gradient norm, Adam update RMS, eps-dominated fraction and update ratio over
    steps (block maximum when decimated, so spikes survive), with signals marked."""
    panels = [(stat, title, reduce, log, columns.matrix(scalars, "layer", stat))
              for stat, title, reduce, log in LAYER_MAPS]
    panels = [p for p in panels if not p[4].empty]
    if not panels:
        return None
    n_layers = panels[0][4].shape[1]
    height = 0.25 * n_layers + 0.9
    fig, axes = subplots(len(panels), 1, squeeze=False,  # at most one A4 page
                         figsize=(PAGE_WIDTH, min(height * len(panels) + 0.5, 11.5)))
    steps = scalars[STEP].to_numpy()
    channel_of = {columns.GRAD_NORM: columns.GRAD_NORM, ADAM_UPDATE_RMS: ADAM_UPDATE_RMS,
                  UPDATE_RATIO: UPDATE_RATIO, ADAM_EPS_FRAC: None}
    for ax, (stat, title, reduce, log, frame) in zip(axes[:, 0], panels, strict=True):
        x, values = _decimated_matrix(steps, frame, reduce)
        finite = values[np.isfinite(values)]
        norm = None
        if log and finite.size and (finite > 0).any():
            positive = finite[finite > 0]
            norm = LogNorm(vmin=np.percentile(positive, 1), vmax=positive.max())
        edges = np.append(x, x[-1] + (x[-1] - x[-2] if len(x) > 1 else 1))
        mesh = ax.pcolormesh(edges, np.arange(values.shape[1] + 1), values.T, norm=norm,
                             cmap="magma", shading="flat", rasterized=True)
        ax.set_yticks(np.arange(values.shape[1]) + 0.5)
        ax.set_yticklabels(frame.columns, fontsize=6)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        fig.colorbar(mesh, ax=ax, fraction=0.02, pad=0.01)
        channel = channel_of.get(stat)
        marks = [s for s in analysis.signals if s.channel == channel and s.where in frame.columns]
        if marks:
            rows = {name: k for k, name in enumerate(frame.columns)}
            ax.scatter([s.step for s in marks], [rows[s.where] + 0.5 for s in marks],
                       marker="v", s=14, color="#00e5ff", edgecolor="k", lw=0.3, zorder=3)
    for ax in axes[:, 0]:  # one time axis for all panels, whatever each recorded
        ax.set_xlim(steps[0], steps[-1] + 1)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("Optimizer and gradients per layer (triangles: flagged steps)", fontsize=10)
    fig.tight_layout()
    return fig


@styled
def latent_health(scalars: pd.DataFrame, evals: pd.DataFrame, analysis: Analysis
                  ) -> Figure | None:
    """KL per latent dimension over steps, active units per evaluation, mu/logvar ranges."""
    dims = columns.matrix(scalars, "dim", columns.KL)
    has_ranges = LOGVAR_MIN in scalars.columns
    has_au = ACTIVE_UNITS in evals.columns and evals[ACTIVE_UNITS].notna().any()
    if dims.empty and not has_ranges and not has_au:
        return None
    rows = [r for r, ok in (("dims", not dims.empty), ("au", has_au), ("ranges", has_ranges))
            if ok]
    ratios = {"dims": 3, "au": 1.3, "ranges": 1.6}
    fig, axes = subplots(len(rows), 1, figsize=(PAGE_WIDTH, 1.6 * sum(
        ratios[r] for r in rows) + 0.4), sharex=True, squeeze=False,
        gridspec_kw={"height_ratios": [ratios[r] for r in rows]})
    steps = scalars[STEP].to_numpy()
    for ax, row in zip(axes[:, 0], rows, strict=True):
        if row == "dims":
            x, values = _decimated_matrix(steps, dims, "median")
            finite = values[np.isfinite(values) & (values > 0)]
            norm = LogNorm(vmin=max(finite.min(), 1e-4), vmax=finite.max()) if finite.size \
                else None
            edges = np.append(x, x[-1] + (x[-1] - x[-2] if len(x) > 1 else 1))
            mesh = ax.pcolormesh(edges, np.arange(values.shape[1] + 1), values.T, norm=norm,
                                 cmap="viridis", shading="flat", rasterized=True)
            ax.set_ylabel("latent dim", fontsize=7)
            ax.set_title("KL per latent dimension (nats; dark = unused)", fontsize=8)
            fig.colorbar(mesh, ax=ax, fraction=0.02, pad=0.01)
        elif row == "au":
            plot_evals(ax, evals[STEP], evals[ACTIVE_UNITS], "o", ms=3, lw=0.8,
                        color="C1")
            ax.set_ylabel("active units", fontsize=7)
            ax.set_ylim(bottom=0)
        else:
            for col, colour in ((LOGVAR_MIN, "C0"), (LOGVAR_MAX, "C0"), (MU_MIN, "C3"),
                                (MU_MAX, "C3")):
                label = ("log-variance range" if col == LOGVAR_MIN else
                         "mu range" if col == MU_MIN else None)
                if col in scalars.columns:
                    x, med, _, _ = _blocks(steps, scalars[col].to_numpy(np.float64))
                    ax.plot(x, med, color=colour, lw=0.8, label=label)
            ax.legend(fontsize=6, loc="upper right")
            ax.set_ylabel("range", fontsize=7)
        shade(ax, analysis.findings, LATENT_KINDS)
    axes[-1, 0].set_xlim(steps[0], steps[-1] + 1)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("Latent health", fontsize=10)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class RunFigure:
    """One of the report's figures of a run: its section, its title, how it is drawn
    (``draw(scalars, evals, analysis) -> Figure or None``), and the columns it reads, so that
    it is drawn only when the run has rows with them."""

    section: str
    title: str
    draw: Callable[[pd.DataFrame, pd.DataFrame, Analysis], Figure | None]
    #: the per-step columns it needs (none: it reads no per-step row)
    step_columns: tuple[str, ...] = ()
    #: the evaluation columns it needs (none: it reads no evaluation row)
    eval_columns: tuple[str, ...] = ()

    def drawable(self, scalars: pd.DataFrame, evals: pd.DataFrame) -> bool:
        """Whether each table it reads has rows and the columns it needs."""
        return all(not needs or (len(table) > 0 and all(c in table.columns for c in needs))
                   for table, needs in ((scalars, self.step_columns),
                                        (evals, self.eval_columns)))


#: The report's figures of one run, in order. A new figure is a function above and one entry
#: here; the report draws each once for the HTML and the PDF.
RUN_FIGURES: tuple[RunFigure, ...] = (
    RunFigure("timelines", "Losses over time", timelines, step_columns=(columns.STEP,)),
    RunFigure("optimizer", "Per-layer heatmaps", layer_heatmaps, step_columns=(columns.STEP,)),
    RunFigure("latents", "Latent health", latent_health, step_columns=(columns.STEP,)),
    RunFigure("quality", "Loss and quality over time", loss_vs_quality,
              eval_columns=(columns.STEP, columns.EVAL_RECON)),
    RunFigure("quality", "Rolling rank correlation", correlation,
              eval_columns=(columns.STEP,)),
    RunFigure("quality", "Loss against quality", loss_quality_scatter,
              eval_columns=(columns.STEP, columns.EVAL_RECON)),
)


@styled
def grid_panel(images: list[tuple[str, Any]], title: str) -> Figure:
    """Grid PNGs (as arrays) one above the other with their captions: an A4 page for the PDF."""
    n = len(images)
    fig, axes = subplots(n, 1, figsize=(PAGE_WIDTH, 11.69), squeeze=False)
    for ax, (caption, array) in zip(axes[:, 0], images, strict=True):
        ax.imshow(array)
        ax.set_axis_off()
        ax.set_title(caption, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
