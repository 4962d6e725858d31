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


#: where in a training step a kind is seen, in the step's order: the weights and loss of the
#: forward pass, the latents, the backward pass's gradients, the optimizer's state, the update
#: it makes; ``evaluation``: seen only by comparing evaluations (it happened somewhere between
#: two of them). At one step the earlier stage is the cause (``incidents``).
STAGES = ("forward", "latents", "backward", "optimizer", "update", "evaluation")


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
    #: where in a training step it is seen (one of :data:`STAGES`)
    stage: str = "forward"
    #: measured harm: the loss or the values broke, or the pictures got worse (at warning or
    #: above); it makes a condition or risk shortly before it matter (``incidents.grade``)
    harm: bool = False
    #: sustained and harmless alone: ``info`` unless harm follows (``incidents.grade``)
    condition: bool = False
    #: a risk: kept at warning or high only when harm follows it, else ``info`` with the
    #: evidence that none did (``incidents.grade``)
    risk: bool = False
    #: once training has gone non-finite, a consequence counted in that finding, not listed
    aftermath: bool = False

    def __post_init__(self) -> None:
        if self.section not in SECTIONS:
            raise ValueError(f"kind {self.name!r}: unknown report section {self.section!r}")
        if self.stage not in STAGES:
            raise ValueError(f"kind {self.name!r}: unknown stage {self.stage!r}")
