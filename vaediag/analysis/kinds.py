"""Kinds of finding: what analysis and the reports know about each, declared by the detector that
emits it (its module's ``KINDS``) and collected in :data:`vaediag.analysis.detectors.KINDS`.

A new detector declares its kinds beside its code; the verdict, the timeline's grading and
linking, and the reports' sections and shading all read them from there.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the report's sections of figures, where findings are shown: {id: title}, in page order
SECTIONS = {"timelines": "Losses over time", "quality": "Loss against image quality",
            "optimizer": "Optimizer and gradients", "latents": "Latent health",
            "grids": "Grids"}


@dataclass(frozen=True)
class Kind:
    name: str
    #: the report section whose figures show it
    section: str
    #: an instability, ranked for the verdict (1 is named first among equally severe findings
    #: at the same step); None when it is not one
    instability: int | None = None
    #: the loss stopped tracking image quality: the verdict's second half, the first grids
    #: shown, shaded on the loss-against-quality figures
    decoupling: bool = False
    #: the channels of its own signals; set, its precursors (signals of *other* channels
    #: shortly before it) are linked by the timeline
    own_channels: frozenset[str] | None = None
    #: the loss or the values broke: a condition holding shortly before is raised to warning
    harm: bool = False
    #: sustained and harmless alone: ``info`` unless harm follows (``timeline.grade``)
    condition: bool = False
    #: once training has gone non-finite, a consequence counted in that finding, not listed
    aftermath: bool = False

    def __post_init__(self) -> None:
        if self.section not in SECTIONS:
            raise ValueError(f"kind {self.name!r}: unknown report section {self.section!r}")
