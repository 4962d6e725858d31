"""The detectors, one module each. Each exposes ``NAME`` and ``detect(data) -> (findings,
signals)``, and raises :class:`~vaediag.analysis.data.Skip` when it cannot run on a run."""

from vaediag.analysis.detectors import (
    adam,
    decoupling,
    drift,
    epoch_average,
    gradients,
    kl_explosion,
    latents,
    loss_spikes,
    nonfinite,
)

#: In the order they run and are listed.
DETECTORS = (nonfinite, loss_spikes, kl_explosion, gradients, adam, latents, decoupling,
             epoch_average, drift)

__all__ = ["DETECTORS"]
