"""The detectors, one module each, found in this package. Each exposes ``NAME``, ``ORDER``
(where it runs and is listed among them), ``KINDS`` (the kinds of finding it emits,
:class:`~vaediag.analysis.kinds.Kind`) and ``detect(data) -> (findings, signals)``, and raises
:class:`~vaediag.analysis.data.Skip` when it cannot run on a run."""

import importlib
import pkgutil
from types import ModuleType

from vaediag.analysis.kinds import Kind


def _discover() -> tuple[ModuleType, ...]:
    """Every module of this package, in the order of their ``ORDER``: a new detector needs no
    entry here."""
    modules = [importlib.import_module(f"{__name__}.{m.name}")
               for m in pkgutil.iter_modules(__path__)]
    return tuple(sorted(modules, key=lambda module: module.ORDER))


#: In the order they run and are listed (each module's ``ORDER``).
DETECTORS = _discover()


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
