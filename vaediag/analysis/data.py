"""What detectors read: a run's tables, with the few helpers every detector needs."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from vaediag import columns
from vaediag.columns import (
    EVAL_KL,
    EVAL_RECON,
    KL,
    RECON,
    SCALER_SKIPPED,
    STEP,
    TRAIN_RECON_AVG,
)
from vaediag.rundir import Run

#: Steps at the start of a run that spike and change-point detectors ignore: the first steps of
#: learning are one long transient (KL rises from ~0, the loss falls by half), not instability.
#: A fixed number of steps, so that what analysis says about a step never depends on how long
#: the run went on after it; later transients are told apart from instability by their harm
#: (a KL that rises while the total loss falls is a trade, not a spike).
MIN_BURN_IN = 100

#: What records a column a detector needs, in the words of the one who runs training: the
#: Monitor's argument in a user's loop (``vaediag train`` records these by itself).
HOW_TO_RECORD = {
    EVAL_RECON: "the grid's images' own loss: pass eval_loss= to the Monitor (per-image "
                  "recon and KL of the grid's images)",
    EVAL_KL: "the grid's images' own KL: pass eval_loss= to the Monitor",
    TRAIN_RECON_AVG: "the training loss averaged between evaluations: pass recon= and kl= "
                       "to after_backward at every step",
    KL: "pass kl= to after_backward",
    RECON: "pass recon= to after_backward",
}

#: How many indexed-statistic matrices :meth:`RunData.matrix` keeps.
MATRICES_KEPT = 3


@dataclass
class Skip(Exception):
    """Raised by a detector that cannot run on this run; the reason is reported."""

    reason: str


class RunData:
    """A run opened for analysis. Columns are read lazily and cached."""

    def __init__(self, run: Run):
        self.run = run
        #: series a detector derived and a reader may want to see (the report plots them):
        #: {name: {"steps": [...], ...}}; written to findings.json under "derived"
        self.derived: dict[str, dict[str, Any]] = {}
        self._matrices: OrderedDict[tuple[str, str, str], pd.DataFrame] = OrderedDict()

    @cached_property
    def scalars(self) -> pd.DataFrame:
        """The per-step rows; under a loss scaler, without the gradients of the steps it
        skipped (they overflowed float16 and never reached the optimizer: NaN here)."""
        frame = self.run.scalars
        if SCALER_SKIPPED not in frame.columns:
            return frame
        skipped = frame[SCALER_SKIPPED].to_numpy() == 1
        if not skipped.any():
            return frame
        frame = frame.copy(deep=False)
        for column in columns.gradient_columns(frame.columns):
            frame[column] = frame[column].mask(skipped)
        return frame

    @cached_property
    def evals(self) -> pd.DataFrame:
        return self.run.evals

    @cached_property
    def events(self) -> pd.DataFrame:
        return self.run.events

    @cached_property
    def config(self) -> dict[str, Any]:
        try:
            return self.run.config
        except Exception:  # noqa: BLE001 - analysis works without a readable config
            return {}

    def setting(self, section: str, key: str, default: Any = None) -> Any:
        return self.config.get(section, {}).get(key, default)

    @cached_property
    def steps(self) -> np.ndarray:
        return self.scalars[STEP].to_numpy()

    @property
    def n_steps(self) -> int:
        return len(self.scalars)

    @cached_property
    def burn_in_step(self) -> int:
        """The first step detectors of spikes and level shifts look at."""
        if not self.n_steps:
            return 0
        return int(self.steps[0]) + MIN_BURN_IN

    def has(self, column: str, table: str = "scalars") -> bool:
        frame = self.scalars if table == "scalars" else self.evals
        return column in frame.columns and frame[column].notna().any()

    def series(self, column: str, table: str = "scalars") -> np.ndarray:
        frame = self.scalars if table == "scalars" else self.evals
        return frame[column].to_numpy(dtype=np.float64)

    def matrix(self, kind: str, stat: str, table: str = "scalars") -> pd.DataFrame:
        """(rows x index) frame of an indexed statistic, in float64; empty if not recorded.
        The last ``MATRICES_KEPT`` are kept (a detector reads the same statistic several
        times; a million steps of eight layers is 64 MB). Treat it as read-only."""
        key = (kind, stat, table)
        if key in self._matrices:
            self._matrices.move_to_end(key)
        else:
            frame = self.scalars if table == "scalars" else self.evals
            self._matrices[key] = columns.matrix(frame, kind, stat).astype("float64")
            while len(self._matrices) > MATRICES_KEPT:
                self._matrices.popitem(last=False)
        return self._matrices[key]

    def judged_metrics(self) -> list[str]:
        """The recorded quality metrics that analysis judges the pictures by: not pixel metrics
        (the loss is one), and not an estimate superseded by an exact metric recorded beside
        it (:data:`vaediag.columns.QUALITY_METRICS`)."""
        facts = columns.QUALITY_METRICS
        metrics = [m for m, f in facts.items() if not f.pixel and self.has(m, "evals")]
        return [m for m in metrics if facts[m].superseded_by not in metrics]

    def require(self, *names: str, table: str = "scalars") -> None:
        missing = [n for n in names if not self.has(n, table)]
        if missing:
            hints = list(dict.fromkeys(HOW_TO_RECORD[n] for n in missing
                                       if n in HOW_TO_RECORD))
            raise Skip(f"not recorded in this run: {', '.join(missing)}"
                       + (f" ({'; '.join(hints)})" if hints else ""))

    def events_of(self, kind: str) -> pd.DataFrame:
        if self.events.empty or "kind" not in self.events:
            return self.events.iloc[0:0]
        return self.events[self.events["kind"] == kind]

    def faults(self) -> list[dict[str, Any]]:
        """Injected faults recorded in the run (ground truth for benchmarks)."""
        return self.events_of("inject").to_dict("records")

    @cached_property
    def fixed(self) -> dict[str, np.ndarray]:
        try:
            return self.run.fixed
        except Exception:  # noqa: BLE001 - optional
            return {}
