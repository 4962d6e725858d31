"""Running the probes: set up once, each run at the steps it is due, disabled when it fails;
which steps are unusual (so probes on a sparse schedule still see sudden events); and LPIPS,
loaded once when a probe asks for it."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from vaediag.columns import EPS, LR
from vaediag.metrics import lpips as lpips_metric
from vaediag.probes.base import Probe, ProbeSetup
from vaediag.probes.context import StepContext
from vaediag.probes.sampling import local

#: A step is unusual when its gradient norm exceeds this many times the recent level (an
#: exponential average with weight ``GRAD_LEVEL_ALPHA`` per step) ...
GRAD_JUMP = 2.0
GRAD_LEVEL_ALPHA = 0.1
#: ... or when one of these optimizer settings changed by more than ``SETTING_JUMP`` times (either
#: way) since the previous step: a step decay or a spike, not a smooth schedule (a cosine decay
#: moves the lr by far less per step; a linear warm-up by more only in its first 10 steps).
WATCHED_SETTINGS = (LR, EPS)
SETTING_JUMP = 1.1


def _jumped(before: float | None, now: float | None) -> bool:
    """Whether a setting moved by more than ``SETTING_JUMP`` times (or changed sign)."""
    if before is None or now is None or before == now:
        return False
    if before <= 0 or now <= 0:
        return True
    return max(now / before, before / now) > SETTING_JUMP


class UnusualSteps:
    """Judges each step from host values the Monitor already has: its gradient norm jumped
    (``GRAD_JUMP`` times the recent level), lr or eps jumped (``SETTING_JUMP``), or a value went
    non-finite. Its state is kept in checkpoints, so a resumed run judges the same."""

    def __init__(self) -> None:
        self._grad_level: float | None = None
        self._settings: tuple | None = None

    def judge(self, row: dict[str, Any], grad_norm: float, nonfinite: bool) -> bool:
        settings = tuple(map(row.get, WATCHED_SETTINGS))
        changed = self._settings is not None and self._settings != settings and any(
            _jumped(before, now) for before, now in zip(self._settings, settings, strict=True))
        self._settings = settings
        if not math.isfinite(grad_norm):
            return True
        jumped = self._grad_level is not None and grad_norm > GRAD_JUMP * self._grad_level
        self._grad_level = grad_norm if self._grad_level is None else \
            (1 - GRAD_LEVEL_ALPHA) * self._grad_level + GRAD_LEVEL_ALPHA * grad_norm
        return nonfinite or changed or jumped

    def state_dict(self) -> dict[str, Any]:
        return {"grad_level": self._grad_level, "settings": list(self._settings or [])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._grad_level = state.get("grad_level")
        self._settings = tuple(state["settings"]) if state.get("settings") else None


#: The longest cycle of probe periods (their least common multiple) looked up rather than
#: asked step by step.
MAX_CYCLE = 10_000


def _cycle(probes: list[Probe]) -> list[tuple[Probe, ...]] | None:
    """For each step of the cycle of the probes' periods (a schedule with a ``period`` repeats
    after it), the probes due, their order kept; None when a schedule has no ``period`` or the
    cycle is longer than ``MAX_CYCLE``."""
    periods = [getattr(p.schedule, "period", None) for p in probes]
    if not all(isinstance(n, int) and n >= 1 for n in periods):
        return None
    length = math.lcm(*(int(n) for n in periods if n is not None))
    if length > MAX_CYCLE:
        return None
    return [tuple(p for p in probes if p.schedule(step)) for step in range(length)]


class EventWriter(Protocol):
    """Where the probes' events go: the run's writer (a rank that does not record discards
    them)."""

    def event(self, kind: str, step: int, **fields: Any) -> None: ...


class LPIPSLoader:
    """Loads LPIPS the first time a probe asks (in its ``setup``), says once whether it is
    available and records that as a ``metric_status`` event; later asks get the same metric."""

    def __init__(self, writer: EventWriter, weights: str | None, download: bool,
                 device: torch.device, speak: bool = True):
        self.writer, self.weights, self.download, self.device = writer, weights, download, device
        self.speak = speak  # whether this rank prints (rank 0 under torch.distributed)
        self.asked = False
        self.metric: lpips_metric.LPIPSMetric | None = None

    def __call__(self) -> lpips_metric.LPIPSMetric | None:
        if self.asked:
            return self.metric
        self.asked = True
        self.metric, status = lpips_metric.load(self.weights, self.download, self.device)
        self.writer.event("metric_status", 0, metric="lpips", available=status.available,
                          reason=status.reason, weights=status.weights, sha256=status.sha256,
                          verified=status.verified)
        if self.speak and not status.available:
            print(f"vaediag: warning: {status.describe()}; the other metrics are recorded",
                  file=sys.stderr)
        elif self.speak and not status.verified:
            print(f"vaediag: warning: {status.describe()}", file=sys.stderr)
        return self.metric


class ProbeRunner:
    """The run's probes: set up once, run when due, disabled (with one warning and an event)
    when one raises, so a broken probe never stops training."""

    def __init__(self, probes: Sequence[Probe], writer: EventWriter, speak: bool = True):
        self.writer = writer
        self.speak = speak  # whether this rank prints (rank 0 under torch.distributed)
        self._before: list[torch.Tensor] | None = None
        self.probes = list(probes)

    @property
    def probes(self) -> list[Probe]:
        return self._probes

    @probes.setter
    def probes(self, probes: list[Probe]) -> None:
        """The active probes, and once for all steps which of them run before the optimizer
        step, which after it, and which at evaluations (so a step decides what is due without
        asking each probe what it needs)."""
        self._probes = probes
        self._at_step = {after: [p for p in probes if not p.on_eval and p.after_step == after]
                         for after in (False, True)}
        self._on_eval = [p for p in probes if p.on_eval]
        self._cycle = {after: _cycle(self._at_step[after]) for after in (False, True)}

    def setup(self, info: ProbeSetup, resumed: bool) -> None:
        """Offer each probe the run's setting; keep those that accept. A new run records which
        declined and why (``probe_not_applicable``) and which are active (``probes``)."""
        active = []
        for probe in self.probes:
            reason = probe.setup(info)
            if reason:
                if not resumed:
                    self.writer.event("probe_not_applicable", 0, probe=probe.name, reason=reason)
                if self.speak:
                    print(f"vaediag: note: probe '{probe.name}' is not applicable: {reason}",
                          file=sys.stderr)
            else:
                active.append(probe)
        self.probes = active
        if not resumed:
            self.writer.event("probes", 0, active=[p.name for p in active])

    @property
    def on_eval(self) -> list[Probe]:
        return self._on_eval

    def due(self, step: int, *, after_step: bool, unusual: bool) -> Sequence[Probe]:
        """The step probes to run before (``after_step`` False) or after the optimizer step:
        looked up in the cycle of the probes' periods when every schedule has one, else asked
        of each schedule."""
        cycle = self._cycle[after_step]
        if cycle is not None:
            due = cycle[step % len(cycle)]
        else:
            due = tuple(p for p in self._at_step[after_step] if p.schedule(step))
        if unusual:
            due = tuple(p for p in self._at_step[after_step] if p in due or p.when_unusual)
        return due

    def before_step(self, probes: Sequence[Probe], ctx: StepContext) -> None:
        """Before the optimizer step, for the probes that run after it: the parameters as they
        are now (``ctx.before``) when one needs the update, then each probe's ``before_step``."""
        if any("update" in p.needs for p in probes):
            ctx.before = self._snapshot(ctx.params)
        for probe in probes:
            probe.before_step(ctx)

    def _snapshot(self, params: list[tuple[str, nn.Parameter]]) -> list[torch.Tensor]:
        """Copy the parameters into buffers kept for the run (no allocation per step)."""
        if self._before is None:
            self._before = [torch.empty(local(p).numel(), device=p.device, dtype=p.dtype)
                            for _, p in params]
        torch._foreach_copy_(self._before, [local(p).detach().reshape(-1) for _, p in params])
        return self._before

    def run(self, probes: Sequence[Probe], ctx: Any, step: int) -> dict[str, Any]:
        """Run ``probes`` on ``ctx``; their values, merged."""
        values: dict[str, Any] = {}
        for probe in probes:
            try:
                values.update(probe.compute(ctx))
            except Exception as exc:  # noqa: BLE001 - a broken probe must never stop training
                first = str(exc).splitlines()[0] if str(exc) else ""
                message = f"{type(exc).__name__}: {first}"
                self.probes = [p for p in self.probes if p is not probe]
                self.writer.event("probe_failed", step, probe=probe.name, error=message)
                if self.speak:
                    print(f"vaediag: warning: probe '{probe.name}' failed at step {step} and "
                          f"is disabled: {message}", file=sys.stderr)
        return values

    def state_dict(self) -> dict[str, Any]:
        return {p.name: p.state_dict() for p in self.probes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for probe in self.probes:
            if probe.name in state:
                probe.load_state_dict(state[probe.name])
