"""The one reader of a run directory: :func:`load_run` and :class:`Run`, lazily, without torch.
A run that was killed, or is still being written, always reads."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vaediag.errors import RunDirError
from vaediag.rundir.layout import (
    CONFIG_TOML,
    ENVIRONMENT_JSON,
    EVALS_DIR,
    EVENTS_JSONL,
    FIXED_NPZ,
    SCALARS_DIR,
    check_run_dir,
    list_checkpoints,
    list_grids,
)
from vaediag.rundir.lock import is_locked
from vaediag.rundir.segments import read_table


def read_events_lines(path: Path, skipped: list[int] | None = None) -> Iterator[str]:
    """The lines of an events file that are JSON objects (a torn last line, or a line that is
    not an object, is skipped; its line number goes to ``skipped`` when given)."""
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            try:
                ok = isinstance(json.loads(line), dict)
            except json.JSONDecodeError:
                ok = False
            if ok:
                yield line
            elif skipped is not None:
                skipped.append(number)


@dataclass
class Run:
    """A run directory, read lazily. Use :func:`load_run`.

    ``scalars`` and ``evals`` are DataFrames with a ``step`` column; ``events`` is a DataFrame
    with ``seq``, ``step``, ``kind``, ``wall`` and the event's own fields; ``problems`` lists
    anything that could not be read (a torn last write, a corrupt line).
    """

    path: Path
    info: dict[str, Any]

    @property
    def status(self) -> str:
        """'running', 'finished', 'stopped', 'interrupted', 'failed', or 'killed' (status says
        running but no process holds the run's lock)."""
        status = self.info.get("status", "unknown")
        if status == "running" and not is_locked(self.path):
            return "killed"
        return status

    @cached_property
    def config(self) -> dict[str, Any]:
        import tomllib

        try:
            return tomllib.loads((self.path / CONFIG_TOML).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunDirError(f"{self.path} has no {CONFIG_TOML}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise RunDirError(f"{self.path / CONFIG_TOML} is corrupt: {exc}") from None

    @cached_property
    def environment(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / ENVIRONMENT_JSON).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    @cached_property
    def _scalars_and_problems(self) -> tuple[pd.DataFrame, list[str]]:
        return read_table(self.path / SCALARS_DIR)

    @cached_property
    def _evals_and_problems(self) -> tuple[pd.DataFrame, list[str]]:
        return read_table(self.path / EVALS_DIR)

    @property
    def scalars(self) -> pd.DataFrame:
        return self._scalars_and_problems[0]

    @property
    def evals(self) -> pd.DataFrame:
        return self._evals_and_problems[0]

    @cached_property
    def events(self) -> pd.DataFrame:
        skipped: list[int] = []
        records = [json.loads(line) for line in read_events_lines(self.path / EVENTS_JSONL,
                                                                   skipped)]
        self.__dict__["_events_skipped"] = skipped
        if not records:
            return pd.DataFrame({"seq": pd.Series(dtype="int64"),
                                 "step": pd.Series(dtype="int64"),
                                 "kind": pd.Series(dtype="object")})
        return pd.DataFrame.from_records(records)

    @cached_property
    def fixed(self) -> dict[str, np.ndarray]:
        """Arrays fixed for the whole run: ``eval_images`` (uint8), ``fixed_z``, factors."""
        try:
            with np.load(self.path / FIXED_NPZ, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except FileNotFoundError:
            return {}
        except (ValueError, OSError, EOFError) as exc:
            raise RunDirError(f"{self.path / FIXED_NPZ} is corrupt: {exc}") from None

    @property
    def grids(self) -> list[tuple[int, Path]]:
        """(step, png path) of every evaluation's grid, in step order."""
        return list_grids(self.path)

    @property
    def checkpoints(self) -> list[tuple[int, Path]]:
        return list_checkpoints(self.path)

    @property
    def problems(self) -> list[str]:
        problems = self._scalars_and_problems[1] + self._evals_and_problems[1]
        _ = self.events  # reads them, noting lines it had to skip
        skipped = self.__dict__.get("_events_skipped", [])
        if skipped:
            problems.append(f"{EVENTS_JSONL}: {len(skipped)} line(s) skipped, not a complete "
                            f"JSON object (first: line {skipped[0]})")
        if self.status == "killed":
            problems.insert(0, "the run was killed or crashed while training (its status says "
                               "running but no process holds it); data up to the last flush "
                               "is intact")
        elif self.status == "failed":
            message = self.info.get("message") or "no reason recorded"
            problems.insert(0, f"the run failed at step {self.info.get('step')}: {message}; "
                               f"what was recorded before is intact")
        return problems

    def until(self, step: int) -> Run:
        """The run as it was at its evaluation of ``step`` (after ``step`` updates): the
        per-step rows before it, the evaluations and events up to and including it: what
        analysis would have seen then (what the online analysis sees). Files are not
        touched."""
        cut = copy.copy(self)  # shares what was read so far; the tables below are replaced
        cut.info = {**self.info, "step": min(int(self.info.get("step", step)), step)}

        def upto(frame: pd.DataFrame, before: bool = False) -> pd.DataFrame:
            keep = frame["step"] < step if before else frame["step"] <= step
            return frame[keep].reset_index(drop=True)

        scalars, s_problems = self._scalars_and_problems
        evals, e_problems = self._evals_and_problems
        cut.__dict__["_scalars_and_problems"] = (upto(scalars, before=True), list(s_problems))
        cut.__dict__["_evals_and_problems"] = (upto(evals), list(e_problems))
        cut.__dict__["events"] = upto(self.events)
        return cut

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.status!r})"


def load_run(path: str | Path) -> Run:
    """Open a run directory for reading: ``load_run(p).scalars`` is the per-step DataFrame."""
    path = Path(path)
    return Run(path, check_run_dir(path))
