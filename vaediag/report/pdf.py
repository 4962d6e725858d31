"""The PDF report: the same story as the HTML, paginated on A4 with matplotlib's PdfPages:
text pages (summary and findings), the figures (the images the HTML shows, drawn once), the
grids, what was not checked."""

from __future__ import annotations

import io
import textwrap

import numpy as np
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from PIL import Image as PILImage

from vaediag.report.content import Report
from vaediag.report.figures import grid_panel

A4 = (8.27, 11.69)
MARGIN = 0.07  # of the page width/height
#: style: (font size, bold, wrap width in characters, space before in points)
STYLES = {"title": (16, True, 48, 0), "h1": (12, True, 80, 10), "h2": (9.5, True, 100, 6),
          "body": (8.5, False, 108, 1), "bullet": (8.5, False, 104, 1),
          "small": (7.5, False, 120, 1)}


def text_pages(pdf: PdfPages, blocks: list[tuple[str, str]]) -> None:
    """Lay out (style, text) blocks top to bottom, wrapping and starting new pages as needed."""
    height_pt = A4[1] * 72
    fig: Figure | None = None
    y = 0.0

    def new_page():
        nonlocal fig, y
        if fig is not None:
            pdf.savefig(fig)
        fig = Figure(figsize=A4)
        y = 1 - MARGIN

    new_page()
    for style, text in blocks:
        size, bold, width, before = STYLES[style]
        indent = "    " if style == "bullet" else ""
        lines = textwrap.wrap(text, width, initial_indent="- " if style == "bullet" else "",
                              subsequent_indent=indent + "  " if style == "bullet" else "") \
            or [""]
        step = size * 1.35 / height_pt
        y -= before / height_pt
        if y - step * min(len(lines), 3) < MARGIN:
            new_page()
        for line in lines:
            if y - step < MARGIN:
                new_page()
            assert fig is not None  # new_page() made one
            fig.text(MARGIN, y, line, fontsize=size, fontweight="bold" if bold else "normal",
                     va="top", ha="left", family="DejaVu Sans")
            y -= step
    pdf.savefig(fig)


def _span(f) -> str:
    return f"step {f.first_step:,}" if f.first_step == f.last_step else \
        f"steps {f.first_step:,}-{f.last_step:,}"


def _summary_blocks(report: Report) -> list[tuple[str, str]]:
    blocks = [("title", report.title), ("h2", "Verdict"), ("body", report.verdict),
              ("h2", "Run")]
    blocks += [("body", f"{key}: {value}") for key, value in report.header]
    blocks.append(("h1", "Findings"))
    if not report.findings:
        blocks.append(("body", "No findings: no instability and no loss-quality decoupling "
                               "was detected" + (" in what could be checked (not checked: "
                                                 + ", ".join(n for n, _ in report.unchecked)
                                                 + ")" if report.unchecked else "") + "."))
    for n, incident in enumerate(report.incidents, 1):
        size = len(incident.consequences)
        blocks.append(("h2", f"Incident {n}: {incident.severity.upper()} from step "
                             f"{incident.first_step:,}"
                       + (f" (root cause and {size} consequence{'s' if size > 1 else ''})"
                          if size else "")))
        f = report.findings[incident.root]
        blocks.append(("body", f"{f.severity.upper()}  {f.kind}  ({_span(f)}): {f.summary}"))
        if f.preceded_by:
            blocks.append(("body", "Preceded by: " + f.precursors_text(6)))
        if f.cause:
            blocks.append(("body", f"Likely cause: {f.cause}"))
        blocks += [("bullet", r) for r in f.remedies]
        for after, i in incident.consequences:
            c = report.findings[i]
            blocks.append(("bullet", f"+{after:,} steps: {c.severity.upper()} {c.kind} "
                                     f"({_span(c)}): {c.summary}"))
    if report.verification:
        blocks.append(("h1", "Verified by replay"))
        blocks += [("bullet", text) for text in report.verification]
    return blocks


def _unchecked_blocks(report: Report) -> list[tuple[str, str]]:
    blocks = [("h1", "Not checked")]
    if not report.unchecked and not report.problems:
        blocks.append(("body", "Every detector ran."))
    blocks += [("bullet", f"{name}: {reason}") for name, reason in report.unchecked]
    blocks += [("bullet", f"run directory: {p}") for p in report.problems]
    blocks.append(("small", f"Written by vaediag {report.version}. The numbers behind every "
                            "finding are in findings.json beside this report."))
    return blocks


def image_array(data: bytes) -> np.ndarray:
    with PILImage.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def image_page(data: bytes):
    """An A4 page with a rendered figure across its width at the top, embedded as it is
    (``interpolation="none"``: no resampling)."""
    picture = image_array(data)
    height = min(1.0, A4[0] * picture.shape[0] / picture.shape[1] / A4[1])
    fig = Figure(figsize=A4)
    ax = fig.add_axes((0, 1 - height, 1, height))
    ax.imshow(picture, interpolation="none", aspect="auto")
    ax.set_axis_off()
    return fig


def render_pdf(report: Report, figures: list) -> bytes:
    buf = io.BytesIO()
    with PdfPages(buf, metadata={"Title": report.title, "Creator": "vaediag"}) as pdf:
        text_pages(pdf, _summary_blocks(report))
        for image in figures:
            fig = image_page(image.data)
            pdf.savefig(fig)
        for grid_set in report.grid_sets:
            fig = grid_panel([(f"{g.role}: " + " | ".join(c for c in g.caption if c),
                               image_array(g.image.data)) for g in grid_set.grids],
                             f"Grids for {grid_set.title}")
            pdf.savefig(fig)
        strip = report.filmstrip
        per_page = 12
        for start in range(0, len(strip), per_page):
            chunk = strip[start:start + per_page]
            fig = Figure(figsize=A4)
            axes = fig.subplots(4, 3)
            for ax in axes.flat:
                ax.set_axis_off()
            for ax, g in zip(axes.flat, chunk, strict=False):
                ax.imshow(image_array(g.image.data))
                ax.set_title(" | ".join(c for c in g.caption[:2] if c), fontsize=6)
            fig.suptitle("All evaluations", fontsize=10)
            fig.tight_layout()
            pdf.savefig(fig)
        text_pages(pdf, _unchecked_blocks(report))
    return buf.getvalue()
