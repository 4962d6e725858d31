"""What the reports show, as data: the report's parts and the helpers both outputs and the
comparison report share. A module of its own so the HTML and PDF writers (and the comparison)
import it without importing the package that drives them (:mod:`vaediag.report`)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vaediag import __version__
from vaediag.analysis.detectors import KINDS
from vaediag.analysis.findings import Finding
from vaediag.analysis.kinds import SECTIONS as FIGURE_SECTIONS
from vaediag.columns import EVAL_KL, EVAL_RECON, QUALITY_METRICS, STEP

HTML_NAME = "report.html"
PDF_NAME = "report.pdf"
DPI = 110
MAX_FINDING_GRIDS = 6  # sets of grids shown for findings (decoupling, then most severe)
MAX_FILMSTRIP = 24  # evaluations in the filmstrip (evenly spread when there are more)

#: where each finding kind is shown in figures (its detector declares it)
SECTION_OF = {name: kind.section for name, kind in KINDS.items()}
SECTIONS = (("summary", "Summary"), ("findings", "Findings"), *FIGURE_SECTIONS.items(),
            ("unchecked", "Not checked"))


@dataclass
class Image:
    data: bytes
    alt: str
    mime: str = "image/png"

    @property
    def data_uri(self) -> str:
        return f"data:{self.mime};base64," + base64.b64encode(self.data).decode("ascii")


@dataclass
class GridImage:
    step: int
    image: Image
    caption: list[str]
    role: str = ""  # "before", "at", "after", ...


@dataclass
class GridSet:
    anchor: str
    title: str
    grids: list[GridImage]
    findings: list[int] = field(default_factory=list)  # indices into the findings list


@dataclass
class IncidentView:
    """An incident as the reports show it: indices into the report's findings list."""

    severity: str
    first_step: int
    root: int
    #: (steps after the root it was seen, index) of each consequence, in the order seen
    consequences: list[tuple[int, int]]


@dataclass
class Report:
    """What both outputs show, in order. Built once by :func:`build`."""

    title: str
    verdict: str
    header: list[tuple[str, str]]
    findings: list[Finding]
    figures: dict[str, list[tuple[str, Image]]] = field(default_factory=dict)  # section -> ...
    grid_sets: list[GridSet] = field(default_factory=list)
    filmstrip: list[GridImage] = field(default_factory=list)
    unchecked: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: what replaying the findings' remedies showed (analyze --verify), one line each
    verification: list[str] = field(default_factory=list)
    #: the findings grouped by root cause: warning and high first, each in time order
    incidents: list[IncidentView] = field(default_factory=list)
    sections: tuple[tuple[str, str], ...] = SECTIONS
    version: str = __version__

    def finding_grids(self, index: int) -> str | None:
        return next((g.anchor for g in self.grid_sets if index in g.findings), None)


def figure_png(fig) -> bytes:
    """A figure drawn once as the PNG both reports show; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def grid_caption(evals, step: int, about: Sequence[str] = ()) -> list[str]:
    """A grid's caption lines: its step, the grid images' loss and KL and quality metrics;
    ``about``: the metrics a finding is about, first (a grid shown for a finding about the
    faces' pose shows the pose error)."""
    row = evals[evals[STEP] == step]
    if row.empty:
        return [f"step {step:,}"]
    row = row.iloc[0]
    parts = []
    about = [m for m in about if m not in (EVAL_RECON, EVAL_KL)]  # shown anyway
    first = [(m, QUALITY_METRICS[m].short or m if m in QUALITY_METRICS else m) for m in about]
    captioned = [(m, facts.short) for m, facts in QUALITY_METRICS.items()
                 if facts.short and m not in about]
    for col, label in (*first, (EVAL_RECON, "recon"), (EVAL_KL, "KL"), *captioned):
        if col in row.index and row[col] == row[col]:  # not NaN
            parts.append(f"{label} {row[col]:.4g}")
    return [f"step {step:,}", ", ".join(parts[:3]), ", ".join(parts[3:])]


def load_grid(path: Path) -> bytes | str:
    """A grid PNG's bytes, checked to decode; or why it does not (a torn or damaged file)."""
    from PIL import Image as PILImage

    try:
        data = path.read_bytes()
        with PILImage.open(io.BytesIO(data)) as im:
            im.load()
        return data
    except (OSError, ValueError, SyntaxError) as exc:  # PIL: truncated, not an image, ...
        text = str(exc).strip().splitlines()
        return text[0][:120] if text else type(exc).__name__
