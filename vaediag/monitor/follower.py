"""A rank other than 0 under DDP: it records nothing, and takes part in each step's one
collective (:mod:`vaediag.monitor.ranks`), so that rank 0 records the global batch and every
rank learns the same things: a non-finite value on any rank, a request to stop."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaediag.columns import LOSS_TERMS, TOTAL
from vaediag.errors import TrainingStopped
from vaediag.monitor import checks
from vaediag.monitor.gradients import grad_norms
from vaediag.monitor.options import Options
from vaediag.monitor.ranks import Ranks, StopState, unwrap
from vaediag.monitor.readback import Pending
from vaediag.monitor.roles import gather_device, shared_values, unscaled
from vaediag.monitor.scaling import LossScaling
from vaediag.monitor.watch import StepCheck
from vaediag.probes.base import Probe
from vaediag.session import RunSession


class Follower:
    """The Monitor's part on a DDP rank other than 0 (see the module's docstring)."""

    records = False
    owns_run = False  # rank 0 made the run directory
    online = None
    closed = False
    stop_reason = None

    latent_dim = None  # rank 0 checks mu and logvar against the model

    def __init__(self, ranks: Ranks, model: nn.Module,
                 optimizer: torch.optim.Optimizer | None, run_dir: str | Path | RunSession,
                 options: Options, start_step: int):
        self.ranks, self.options = ranks, options
        self.eval_every, self.read_before_step = options.eval_every, options.read_before_step
        self.run_path = run_dir.path if isinstance(run_dir, RunSession) else Path(run_dir)
        model = unwrap(model)
        self._params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.device = self._params[0][1].device if self._params else torch.device("cpu")
        self.stop = StopState()
        self.scaling = LossScaling(options.scaler, optimizer) \
            if options.scaler is not None else None
        self.echo: Callable[[str], None] = lambda text: None
        self._t0 = time.monotonic()
        #: set by the Monitor: whether it raises TrainingStopped when the ranks agreed to stop
        self.stops_itself = True
        #: read_before_step=False: the last step's gathered values, copied without waiting
        self._gathered: Pending | None = None
        self._last_step = start_step - 1
        self.last_step_row: dict[str, Any] = {}
        self.last_read_row: dict[str, Any] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def after_backward(self, given: checks.StepInputs) -> StepCheck:
        """The step's collective; the same decision about non-finite values as rank 0."""
        checks.increasing(given.step, self._last_step)
        self._last_step = given.step
        shared = shared_values(given, self.stop.asked, self.device)
        got = self.ranks.exchange(shared, gather_device(given, self.device))
        losses, stop = got["losses"], got["stop"]
        self.last_step_row = {"step": given.step}
        if not self.options.read_before_step:  # the step before's, as rank 0 reads them
            flight, self._gathered = self._gathered, Pending([stop])
            if flight is not None:
                (before,) = flight.result()
                self.stop.now = self.stop.now or bool((before > 0).any())
            return StepCheck(grad_norm=math.nan, pending=True)
        scale = self.scaling.now() if self.scaling is not None else None
        norms = unscaled(grad_norms(self._params), scale)
        norm = (norms.double().square().sum().sqrt() if norms is not None
                else torch.tensor(math.nan, dtype=torch.float64))
        host = torch.cat([losses.reshape(-1), stop, norm.reshape(1).to(losses)]).tolist()
        world = self.ranks.world
        values = [host[r * 3:(r + 1) * 3] for r in range(world)]
        self.stop.now = self.stop.now or host[3 * world] > 0
        check = StepCheck(grad_norm=host[-1])
        for i, term in enumerate(LOSS_TERMS):
            if term == TOTAL and given.total is None:
                continue
            if not math.isfinite(sum(v[i] for v in values)):
                check.nonfinite.append(term)
        if not math.isfinite(check.grad_norm) and norms is not None:
            if scale is not None:  # the scaler skips the step, on every rank
                check.scaler_skip = True
            else:
                check.nonfinite.append("grad")
        return check

    @property
    def probes(self) -> list[Probe]:
        """Rank 0 runs them."""
        return []

    def wants_graph(self, step: int) -> bool:
        return False

    def after_step(self, step: int, skipped: bool, evaluate: bool) -> None:
        if self.stop.now and self.stops_itself:
            raise TrainingStopped(f"stopped at step {step + 1}: rank 0 stopped the run", step + 1)

    def evaluate(self, step: int) -> dict[str, Any]:
        return {}

    def event(self, kind: str, step: int, **fields: Any) -> None:
        """Only rank 0 records events."""

    def flush(self) -> None:
        pass

    def close(self, status: str, step: int | None, message: str) -> None:
        """Rank 0 closes the run."""

    def abort(self, exc: BaseException) -> None:
        pass

    def abandon(self) -> None:
        pass

    def begin(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
