"""Decoder output saturation: the fraction of output pixels pinned near 0 or 1.

An example of the probe API, loaded by path:

    vaediag train --probe probes/decoder_saturation.py:DecoderSaturation

A sigmoid decoder whose logits grow large outputs pure blacks and whites: its gradient there
vanishes (the sigmoid is flat) and colours posterise. At each evaluation this probe records the
fraction of pixel values below ``LOW`` or above ``HIGH`` in the grid's reconstructions
(``sat_recon_frac``), in decode(fixed z) (``sat_fixed_frac``) and, as the baseline the data
itself sets, in the validation images (``sat_target_frac``). A reconstruction fraction well above
the target's means the decoder is saturating.
"""

from __future__ import annotations

import torch

from vaediag.probes import EvalContext, Probe

LOW, HIGH = 0.01, 0.99


def saturated_fraction(images: torch.Tensor) -> torch.Tensor:
    """Fraction of values of ``images`` (in [0, 1]) below LOW or above HIGH."""
    return ((images < LOW) | (images > HIGH)).float().mean()


class DecoderSaturation(Probe[EvalContext]):
    name = "decoder_saturation"
    needs = frozenset({"eval"})

    def compute(self, ctx: EvalContext) -> dict[str, torch.Tensor]:
        return {
            "sat_recon_frac": saturated_fraction(ctx.recon),
            "sat_fixed_frac": saturated_fraction(ctx.fixed),
            "sat_target_frac": saturated_fraction(ctx.x),
        }
