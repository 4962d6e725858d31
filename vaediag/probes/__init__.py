"""Probes: what the Monitor records beyond the losses. One built-in probe per module.

:func:`build` turns a preset name and config into probe instances; :func:`load_from_path`
loads a user's probe class from ``FILE.py:ClassName``. :data:`PRESETS` names the presets (the
command line and the configuration take their choices from it). This package imports torch
only when a probe is built or one of its classes is used, so the CLI's help and analysis stay
light.

=========  =======================================================================================
preset     probes
=========  =======================================================================================
off        none: the Monitor still records losses, lr and the global gradient norm every step
cheap      latent stats every step; per-layer gradient norms every 10 steps; at each evaluation:
           image quality, latent health, factors (toyfaces), generation drift, the
           amortisation gap (held-out and training images)
standard   latent stats and per-layer gradient norms every step; Adam state and update ratios
           (on a fixed sample of 2,048 entries of each larger layer) every
           ``probes.optimizer_every`` steps and at every unusual step (the gradient norm
           jumped, lr or eps jumped: ``Monitor.unusual``); the recon/KL gradient split
           every ``probes.split_every`` steps; evaluations as cheap
full       as standard, with Adam state and update ratios on every entry at every step and
           the gradient split every ``FULL_SPLIT_EVERY`` steps
=========  =======================================================================================
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaediag.errors import UserError

if TYPE_CHECKING:
    from vaediag.probes.base import Probe as Probe
    from vaediag.probes.base import ProbeSetup as ProbeSetup
    from vaediag.probes.base import Schedule as Schedule
    from vaediag.probes.base import every as every
    from vaediag.probes.base import log_spaced as log_spaced
    from vaediag.probes.base import per_index as per_index
    from vaediag.probes.context import EvalContext as EvalContext
    from vaediag.probes.context import ImageSet as ImageSet
    from vaediag.probes.context import StepContext as StepContext
    from vaediag.probes.layers import LayerIndex as LayerIndex

#: The presets, each with what it records (the table above, short).
PRESETS: dict[str, str] = {
    "off": "losses, lr and the global gradient norm only",
    "cheap": "latent statistics; per-layer gradient norms every 10 steps; image quality at "
             "evaluations",
    "standard": "as cheap, with per-layer gradient norms every step and Adam's state and "
                "update ratios on a sample of each layer every few steps and at unusual steps",
    "full": "as standard, on every entry at every step",
}

#: Steps between gradient splits in the ``full`` preset. The split is an extra backward pass
#: through the encoder, about a third of a training step; no detector reads it, so even
#: ``full`` takes it at a cadence.
FULL_SPLIT_EVERY = 10


def _eval_probes() -> list[Probe]:
    from vaediag.probes.amortisation import AmortisationGap
    from vaediag.probes.drift import GenerationDrift
    from vaediag.probes.factors import FactorFidelity
    from vaediag.probes.image_quality import ImageQuality
    from vaediag.probes.latent_health import LatentHealth

    return [ImageQuality(), LatentHealth(), FactorFidelity(), GenerationDrift(),
            AmortisationGap()]


def build(preset: str, split_every: int = 100, layer_every: int = 1,
          optimizer_every: int = 4) -> list[Probe]:
    """The probes of a named preset (see the module docstring)."""
    from vaediag.probes.adam import MAX_ENTRIES, AdamState
    from vaediag.probes.base import every
    from vaediag.probes.grad_split import GradSplit
    from vaediag.probes.gradients import GradientNorms
    from vaediag.probes.latents import LatentStats
    from vaediag.probes.updates import UpdateRatio

    if preset not in PRESETS:
        raise UserError(f"unknown probe preset {preset!r}; choose from {', '.join(PRESETS)}")
    if preset == "off":
        return []
    if preset == "cheap":
        return [LatentStats(), GradientNorms(every(10)), *_eval_probes()]
    full = preset == "full"
    cap = None if full else MAX_ENTRIES
    optimizer = every(1 if full else optimizer_every)
    return [LatentStats(), GradientNorms(every(layer_every)),
            AdamState(optimizer, max_entries=cap, when_unusual=True),
            UpdateRatio(optimizer, max_entries=cap, when_unusual=True),
            GradSplit(every(min(split_every, FULL_SPLIT_EVERY) if full else split_every)),
            *_eval_probes()]


def load_from_path(spec: str) -> type[Probe]:
    """``"probes/saturation.py:DecoderSaturation"`` -> the class, checked to be a Probe."""
    from vaediag.probes.base import Probe

    path_text, sep, class_name = spec.rpartition(":")
    if not sep or not path_text or not class_name:
        raise UserError(f"--probe {spec!r}: expected FILE.py:ClassName")
    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"--probe {spec}: no such file {path}")
    module_name = f"vaediag_user_probe_{abs(hash(str(path.resolve())))}"
    try:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ImportError("not a Python module")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any error in the user's file is bad input
        raise UserError(f"--probe {spec}: cannot import {path}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UserError(f"--probe {spec}: {path} has no class {class_name}")
    if not (inspect.isclass(cls) and issubclass(cls, Probe)):
        raise UserError(f"--probe {spec}: {class_name} is not a vaediag.probes.Probe subclass")
    return cls


#: the probe API, imported on first use
_LAZY = {
    **dict.fromkeys(["Probe", "ProbeSetup", "Schedule", "every", "log_spaced", "per_index"],
                    "vaediag.probes.base"),
    **dict.fromkeys(["EvalContext", "ImageSet", "StepContext"], "vaediag.probes.context"),
    "LayerIndex": "vaediag.probes.layers",
}

#: the modules of this package that hold no probe
_NOT_PROBES = frozenset({"base", "context", "layers", "sampling"})


def _built_in(name: str) -> Any:
    """A built-in probe class by name (``vaediag.probes.AdamState``), found in the probe
    modules, so a new probe needs no entry here."""
    import pkgutil

    from vaediag.probes.base import Probe

    for module in pkgutil.iter_modules(__path__):
        if module.name not in _NOT_PROBES:
            found = getattr(importlib.import_module(f"{__name__}.{module.name}"), name, None)
            if isinstance(found, type) and issubclass(found, Probe):
                return found
    return None


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    found = _built_in(name) if name[:1].isupper() else None
    if found is None:
        raise AttributeError(f"module 'vaediag.probes' has no attribute {name!r}")
    return found


__all__ = ["FULL_SPLIT_EVERY", "PRESETS", "build", "load_from_path", *_LAZY]
