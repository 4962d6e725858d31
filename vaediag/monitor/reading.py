"""The one reader of a step's values, in two kinds behind one interface:

- :class:`Blocking` (``read_before_step=True``): the step's own values are read at
  ``after_backward``, so its :class:`~vaediag.monitor.watch.StepCheck` says before
  ``optimizer.step()`` whether they are finite; its probe values wait on the device and ride
  in the next step's read.
- :class:`Deferred` (``read_before_step=False``): nothing is read during a step; the step's
  values are copied to the host without waiting at ``after_step`` and read at the next step,
  when the copy has long finished.

Either way a step is a :class:`StepRecord` from ``after_backward`` until its row is written,
which happens in one place (the ``write`` the reader is given), and every read is completed
by the same ``complete`` (which fills the row from the values read and judges them). The
record a reader holds is read and written by :meth:`Reader.flush` (at every evaluation,
checkpoint and ``close``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from vaediag.columns import STEP, TIME
from vaediag.monitor.readback import Packed, Pending, read_arrays
from vaediag.monitor.roles import Core
from vaediag.monitor.watch import StepCheck

#: the probe values of a step that ran no probe
NO_VALUES = Packed.vectors([], [])


@dataclass
class StepRecord:
    """One step, from ``after_backward`` until its row is written."""

    #: the row: the step, its time and what the host knew at once; the values read go in
    row: dict[str, Any]
    #: what the host knew at once: epoch, KL weight, learning rate and eps
    host: dict[str, Any]
    #: the step's own values on the device (losses, gradient norms)
    core: Core
    #: its probe values, still on the device (from ``after_step``)
    probes: Packed = NO_VALUES
    #: ``Deferred``: the core and probe values, copied to the host without waiting
    copy: Pending | None = None
    #: the per-parameter gradient norms on the host, when read with the losses
    host_norms: np.ndarray | None = None


#: fills a record's row from its core values read and judges them
Complete = Callable[[StepRecord, list[np.ndarray]], StepCheck]
#: writes a record's row, given its probe values read
Write = Callable[[StepRecord, list[np.ndarray]], None]


class Reader:
    """What both kinds do; see the module's docstring."""

    #: whether ``after_backward``'s StepCheck waits for the next step
    pending: bool

    def __init__(self, complete: Complete, write: Write):
        self._complete, self._write = complete, write
        #: the step read last, whose row is not written yet
        self._held: StepRecord | None = None

    def record(self, step: int, time: float, host: dict[str, Any], core: Core) -> StepRecord:
        raise NotImplementedError

    def read(self, record: StepRecord) -> StepCheck:
        """At ``after_backward``: what can be known of the step now."""
        raise NotImplementedError

    def hold(self, record: StepRecord) -> None:
        """At ``after_step``: the step, its probe values added, waits to be read."""
        self._held = record

    def flush(self) -> None:
        """Read the held step's values and write its row."""
        raise NotImplementedError


class Blocking(Reader):
    """Reads the step's values at once, with the step before's probe values: one transfer
    per device, one synchronisation per step on a GPU."""

    pending = False

    def record(self, step: int, time: float, host: dict[str, Any], core: Core) -> StepRecord:
        return StepRecord({STEP: step, TIME: time}, host, core)

    def read(self, record: StepRecord) -> StepCheck:
        held, self._held = self._held, None
        own = record.core.packed.flats
        if held is None:
            return self._complete(record, read_arrays(own) if own else [])
        arrays = read_arrays([*own, *held.probes.flats])
        self._write(held, arrays[len(own):])
        return self._complete(record, arrays[:len(own)])

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._write(held, read_arrays(held.probes.flats))


class Deferred(Reader):
    """Reads nothing during a step: each step is copied without waiting when it ends and read
    at the next (the row holds what the host knew meanwhile)."""

    pending = True

    def record(self, step: int, time: float, host: dict[str, Any], core: Core) -> StepRecord:
        return StepRecord({STEP: step, TIME: time, **host}, host, core)

    def read(self, record: StepRecord) -> StepCheck:
        self.flush()  # the step before: its copy has long finished
        return StepCheck(grad_norm=math.nan, pending=True)

    def hold(self, record: StepRecord) -> None:
        record.copy = Pending([*record.core.packed.flats, *record.probes.flats])
        self._held = record

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        assert held.copy is not None
        arrays = held.copy.result()
        own = len(held.core.packed.flats)
        self._complete(held, arrays[:own])
        self._write(held, arrays[own:])
