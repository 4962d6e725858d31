"""vaediag: training diagnostics for VAE instability.

``vaediag.load_run(path)`` reads a run directory (pandas DataFrames, no torch needed);
``vaediag.Monitor`` records a user's own training loop; ``vaediag.train`` runs the built-in
trainer. Heavy modules are imported on first use, so reading runs stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from vaediag.analysis import analyze as analyze
    from vaediag.config import Config as Config
    from vaediag.config import build_config as build_config
    from vaediag.errors import TrainingStopped as TrainingStopped
    from vaediag.errors import UserError as UserError
    from vaediag.monitor import Monitor as Monitor
    from vaediag.rundir import Run as Run
    from vaediag.rundir import load_run as load_run
    from vaediag.trainer import train as train

_LAZY = {
    "load_run": "vaediag.rundir",
    "Run": "vaediag.rundir",
    "Config": "vaediag.config",
    "build_config": "vaediag.config",
    "Monitor": "vaediag.monitor",
    "train": "vaediag.trainer",
    "analyze": "vaediag.analysis",
    "TrainingStopped": "vaediag.errors",
    "UserError": "vaediag.errors",
}

#: submodules a user reaches as ``vaediag.NAME`` after ``import vaediag`` (imported then)
_SUBMODULES = frozenset({"columns", "errors", "analysis", "rundir", "testing"})

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY or name in _SUBMODULES:
        import importlib

        if name in _SUBMODULES:
            return importlib.import_module(f"{__name__}.{name}")
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vaediag' has no attribute {name!r}")
