"""The detectors, one module each. Each exposes ``NAME``, ``KINDS`` (the kinds of finding it
emits, :class:`~vaediag.analysis.kinds.Kind`) and ``detect(data) -> (findings, signals)``, and
raises :class:`~vaediag.analysis.data.Skip` when it cannot run on a run."""

from vaediag.analysis.detectors import (
    adam,
    decoupling,
    drift,
    epoch_average,
    generalisation,
    gradients,
    kl_explosion,
    latents,
    loss_spikes,
    nonfinite,
)
from vaediag.analysis.kinds import Kind

#: In the order they run and are listed.
DETECTORS = (nonfinite, loss_spikes, kl_explosion, gradients, adam, latents, generalisation,
             decoupling, epoch_average, drift)



def _collect() -> dict[str, Kind]:
    kinds: dict[str, Kind] = {}
    for detector in DETECTORS:
        for kind in detector.KINDS:
            if kind.name in kinds:
                raise ValueError(f"finding kind {kind.name!r} is declared twice")
            kinds[kind.name] = kind
    return kinds


#: every kind of finding, by name, in the order the detectors declare them
KINDS: dict[str, Kind] = _collect()

__all__ = ["DETECTORS", "KINDS"]
