"""The comparison report's figures (``vaediag compare``): several runs on one step axis, one
colour per run; dotted lines where a replay branched off its parent."""

from __future__ import annotations

import math

import pandas as pd
from matplotlib.figure import Figure

from vaediag import columns
from vaediag.columns import STEP
from vaediag.report.figures import (
    PAGE_WIDTH,
    plot_evals,
    plot_series,
    quality_metrics,
    styled,
    subplots,
)


def _run_colour(k: int) -> str:
    return f"C{k % 10}"


#: line styles by run, so a run that repeats another (a replay before it branches) still shows
_RUN_STYLES = ("-", "--", ":", "-.")


def _run_style(k: int) -> str:
    return _RUN_STYLES[k % len(_RUN_STYLES)]


def _branch_marks(ax, branches: list[tuple[str, int]]) -> None:
    for k, (_, step) in enumerate(branches):
        ax.axvline(step, color="0.3", lw=0.7, ls=":", zorder=1,
                   label="replayed from here" if k == 0 else None)


@styled
def compare_losses(runs: list[tuple[str, pd.DataFrame]],
                   branches: list[tuple[str, int]]) -> Figure:
    """Reconstruction, KL (log scale where positive) and the learning rate per step, one colour
    per run, on the same step axis; dotted: where a replay branched off its parent."""
    fig, axes = subplots(3, 1, figsize=(PAGE_WIDTH, 7.2), sharex=True,
                         gridspec_kw={"height_ratios": [3, 3, 1.4]})
    for ax, column, label in ((axes[0], columns.RECON, "recon"), (axes[1], columns.KL, "KL"),
                              (axes[2], columns.LR, "lr")):
        positive = True
        for k, (name, scalars) in enumerate(runs):
            if plot_series(ax, scalars, column, name, _run_colour(k), _run_style(k)):
                positive &= bool((scalars[column].dropna() > 0).all())
        if positive and column != columns.LR and ax.lines:
            ax.set_yscale("log")
        ax.set_ylabel(label)
        _branch_marks(ax, branches)
    axes[0].legend(loc="upper right", fontsize=7)
    axes[-1].set_xlabel("step")
    fig.suptitle("Losses per step, run against run (training batches)", fontsize=10)
    fig.tight_layout()
    return fig


@styled
def compare_quality(runs: list[tuple[str, pd.DataFrame]],
                    branches: list[tuple[str, int]]) -> Figure | None:
    """The evaluation loss and each quality metric at every evaluation, one panel per column,
    one colour per run."""
    drawn = {m for _, e in runs for m, _ in quality_metrics(e)}
    shown = [(columns.EVAL_RECON, "eval recon (the 8 grid images)")] + \
        [(m, facts.label) for m, facts in columns.QUALITY_METRICS.items() if m in drawn]
    shown = [(c, label) for c, label in shown if any(c in e.columns for _, e in runs)]
    if not shown:
        return None
    cols = 2
    rows = math.ceil(len(shown) / cols)
    fig, axes = subplots(rows, cols, figsize=(PAGE_WIDTH, 1.9 * rows + 0.6), sharex=True,
                         squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.set_axis_off()
    for ax, (column, label) in zip(axes.flat, shown, strict=False):
        for k, (name, evals) in enumerate(runs):
            if column in evals.columns and evals[column].notna().any():
                plot_evals(ax, evals[STEP], evals[column], ".", color=_run_colour(k), ms=3,
                            lw=0.9, ls=_run_style(k), label=name)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
        _branch_marks(ax, branches)
    axes.flat[0].legend(fontsize=6, loc="best")
    fig.suptitle("The loss and image quality at each evaluation, run against run", fontsize=10)
    fig.tight_layout()
    return fig
