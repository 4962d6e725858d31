"""The Monitor's part on a process that records (one process, rank 0) or runs in step with the
one that does (a rank other than 0 under FSDP): the probes, the step's one read, the
evaluations, the findings while training and the run's end.

What differs between those processes is the role (:mod:`.roles`), chosen once; what differs
between reading during a step and a step later is the reader (:mod:`.reading`), chosen once.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaediag import columns as col
from vaediag import probes as probe_library
from vaediag.errors import TrainingStopped, UserError
from vaediag.monitor import checks
from vaediag.monitor.evaluation import DecodeFn, EncodeFn, Evaluator
from vaediag.monitor.gradients import forward_order
from vaediag.monitor.online import OnlineAnalysis
from vaediag.monitor.options import Options
from vaediag.monitor.probing import LPIPSLoader, ProbeRunner
from vaediag.monitor.ranks import DiscardWriter, StopState, unwrap
from vaediag.monitor.readback import Packed, to_floats
from vaediag.monitor.reading import NO_VALUES, Blocking, Deferred, StepRecord
from vaediag.monitor.roles import Role, checkpoint
from vaediag.monitor.scaling import GradScale, LossScaling
from vaediag.monitor.settings import SettingsWatch, optimizer_settings
from vaediag.monitor.setup import chosen_probes, open_session
from vaediag.monitor.watch import StepCheck, StepWatch, grads_finite
from vaediag.probes.base import Probe, ProbeSetup
from vaediag.probes.context import StepContext
from vaediag.probes.layers import LayerIndex
from vaediag.rundir import RunWriter, load_run
from vaediag.session import RunSession


@dataclass
class StepInFlight:
    """A step from ``after_backward`` to ``after_step``: the probes' context (None when none
    is due), the probes due after the optimizer step, the step's record and its values so
    far."""

    ctx: StepContext | None
    after: Sequence[Probe]
    record: StepRecord
    values: dict[Any, Any]


class Recorder:
    """See the module's docstring; :class:`vaediag.Monitor` says what each call does."""

    #: (a Follower's setting: a process that records stops on its findings as ``stop_on`` says)
    stops_itself = True

    def __init__(self, role: Role, run_dir: str | Path | RunSession,
                 model: nn.Module, optimizer: torch.optim.Optimizer | None, options: Options):
        self.role, self.options = role, options
        #: whether this process writes the run (rank 0); under FSDP the others run in step
        self.records = role.records
        self.model, self.optimizer = unwrap(model), optimizer  # DDP's forward would wait
        #: mixed precision: the loop's GradScaler (:mod:`.scaling`)
        self.scaling = LossScaling(options.scaler, optimizer) \
            if options.scaler is not None else None
        self.eval_every, self.read_before_step = options.eval_every, options.read_before_step
        self._warned: set[str] = set()
        encode, decode = self._functions(options)
        self.evaluator = Evaluator(
            self.model, encode, decode, eval_images=options.eval_images,
            eval_loss=options.eval_loss, value_range=options.value_range,
            recon_mode=options.recon_mode, metric_images=options.metric_images,
            factors=options.eval_factors, warn=self._warn, train_images=options.train_images,
            train_factors=options.train_factors)
        self._try_model(encode, decode)
        chosen = chosen_probes(options.probes, options.extra_probes)
        #: whether this Monitor made its run directory (a user's loop) or was handed a
        #: session (``vaediag train``, which stops itself)
        self.owns_run = not isinstance(run_dir, RunSession)
        self.session = open_session(run_dir, self.records, self._settings(run_dir), options.config,
                                    options.overwrite, options.seed, self.device)
        self._wire()
        try:
            self._set_up_probes(chosen)
        except BaseException:
            if self.owns_run and self.records:  # a run directory of its own: leave none
                self.session.discard("the Monitor could not be set up")
            raise
        self._start_counting()
        self._say_what_is_missing()

    def _functions(self, options: Options) -> tuple[EncodeFn, DecodeFn]:
        encode = options.encode or getattr(self.model, "encode", None)
        decode = options.decode or getattr(self.model, "decode", None)
        if encode is None or decode is None:
            raise UserError("Monitor needs encode(x) -> (mu, logvar) and decode(z) -> image: "
                            "pass encode= and decode=, or give the model those methods")
        return encode, decode

    def _try_model(self, encode: EncodeFn, decode: DecodeFn) -> None:
        """Before anything is written: the model's parameters and layers, and one forward
        pass in eval mode on two of the grid's images, which tells the latent size and the
        order in which layers run (or says which call failed)."""
        self.device = self.evaluator.device
        self.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.role.bind(self.params, self.device)
        self.layers = LayerIndex.from_params(self.params)
        checks.same_images("train_images", self.evaluator.train_x, self.evaluator.x)
        checks.same_images("metric_images", self.evaluator.set_x, self.evaluator.x)
        with self.evaluator.eval_mode(), torch.no_grad():
            x = self.evaluator.x[:2]
            self.latent_dim = checks.try_model(encode, decode, x)
            self._order = forward_order(self.model, lambda: decode(encode(x)[0]))

    def _settings(self, run_dir: str | Path | RunSession) -> dict[str, Any]:
        """The Monitor's own settings for the run's ``config.toml``."""
        probes = self.options.probes
        settings = {"monitor": {"eval_every": self.eval_every,
                                "recon_mode": self.options.recon_mode,
                                "value_range": list(self.evaluator.value_range),
                                "probes": probes if isinstance(probes, str) else "custom"}}
        optim = optimizer_settings(self.optimizer)
        if optim and not isinstance(run_dir, RunSession):  # a user's loop: from the optimizer
            settings["optim"] = optim
        return settings

    def _wire(self) -> None:
        """The writer, the online analysis, and what a failing run does before it closes."""
        assert self.session.writer is not None  # an opened session
        self.writer: RunWriter | DiscardWriter = self.session.writer
        self.run_path = self.session.path
        #: where new findings are printed (``vaediag train`` routes them past its progress bar)
        self.echo: Callable[[str], None] = lambda text: print(f"vaediag: {text}",
                                                              file=sys.stderr, flush=True)
        self.online = OnlineAnalysis(self.session.path, self._found, self.options.stop_on) \
            if self.options.online and self.records else None
        self.session.before_abort.append(self.flush)  # the last step's row, should training fail
        online = self.online
        if online is not None:  # a run that fails ends its analysis process too
            self.session.before_abort.append(lambda: online.close(wait=False))

    def _set_up_probes(self, chosen: list[Probe]) -> None:
        """The fixed z and noise (drawn, or a resumed run's), LPIPS, and the probes, each
        offered the run's setting."""
        options = self.options
        if self.session.resumed and self.records:
            self.evaluator.load_fixed(load_run(self.session.path).fixed)
        else:  # a rank in step with rank 0 (FSDP) draws the same, and writes nothing
            self.writer.save_fixed(**self.evaluator.make_fixed(options.seed, self.latent_dim))
        self.runner = ProbeRunner(chosen, self.writer, speak=self.records)
        self._lpips = LPIPSLoader(self.writer, options.lpips_weights, options.lpips_download,
                                  self.device, speak=self.records)
        self.runner.setup(ProbeSetup(self.model, self.optimizer, self.layers, self.latent_dim,
                                     bool(self.evaluator.factors), self._lpips,
                                     sharded=self.role.sharded), self.session.resumed)

    def _start_counting(self) -> None:
        """The per-step state: nothing pending, no stop asked, the clock started."""
        reader = Blocking if self.read_before_step else Deferred
        self.reader = reader(self._complete, self._write)
        self.watch = StepWatch(self.params, self._order, self.writer,
                               scan_weights=self.read_before_step, say=self._say,
                               warn=self._warn)
        self.stop = StopState()
        self._step: StepInFlight | None = None
        #: the optimizer's hyperparameters, checked for changes at each evaluation
        self._optimizer_settings = SettingsWatch(self.optimizer)
        #: the last step given to after_backward (steps only grow; a resumed run's first step
        #: is its checkpoint's)
        self._last_step = getattr(self.session, "start_step", 0) - 1
        self._elapsed_before, self._t0 = 0.0, time.monotonic()
        self.last_step_row: dict[str, Any] = {}
        #: the newest row whose values were read: this step's, or with read_before_step=False
        #: the step before's (what a progress line shows)
        self.last_read_row: dict[str, Any] = {}
        self.last_eval_row: dict[str, Any] = {}
        # a resumed run has its evaluation at the checkpoint's step
        self._evaluated = self.session.resumed

    def _say_what_is_missing(self) -> None:
        if self.session.resumed:
            return
        self.evaluator.check_range_fits()
        if self.options.eval_loss is None:
            self._warn("no_eval_loss", 0, "no eval_loss given: the grid shows no losses of its "
                       "own images and the loss-quality analysis cannot run (pass eval_loss=)")
        if self.options.train_images is None:
            self._warn("no_train_images", 0, "no train_images given: held-out images cannot be "
                       "compared with training images, so overfitting cannot be checked (pass "
                       "train_images=, e.g. 8 images of the training set)")

    def begin(self) -> None:
        """Once every rank set up: under FSDP the first evaluation now (its forward passes
        are collectives; a forward pass between the backward pass and the optimizer step,
        where after_backward(0) would make it, loses the gradients)."""
        if self.role.sharded and not self._evaluated:
            self.evaluate(0)

    def abandon(self) -> None:
        """Another rank could not set up: leave no run directory (rank 0's own; a rank in step
        with it under FSDP made none)."""
        if self.owns_run and self.records:
            if self.online is not None:
                self.online.close(wait=False)
            self.session.discard("the Monitor could not be set up")

    @property
    def probes(self) -> list[Probe]:
        return self.runner.probes

    def event(self, kind: str, step: int, **fields: Any) -> None:
        self.writer.event(kind, step, **fields)

    def _warn(self, what: str, step: int, message: str, **fields: Any) -> None:
        """Say something about the user's input once per run, and record it as an event."""
        if what in self._warned:
            return
        self._warned.add(what)
        self.writer.event("monitor_warning", step, what=what, message=message, **fields)
        if self.records:
            print(f"vaediag: warning: {message}", file=sys.stderr)

    def _say(self, text: str) -> None:
        if self.records:
            self.echo(text)

    def _due(self, step: int, *, after_step: bool) -> Sequence[Probe]:
        return self.runner.due(step, after_step=after_step, unusual=self.watch.unusual)

    def wants_graph(self, step: int) -> bool:
        return any("graph" in p.needs for p in self._due(step, after_step=False))

    def elapsed(self) -> float:
        return self._elapsed_before + time.monotonic() - self._t0

    # -- per step -----------------------------------------------------------------------------

    def after_backward(self, given: checks.StepInputs) -> StepCheck:
        checks.increasing(given.step, self._last_step)
        self._last_step = given.step
        if given.step == 0 and not self._evaluated:
            self.evaluate(0)
        scale = self.scaling.now() if self.scaling is not None else None
        core = self.role.core(given, self.stop.asked, scale)
        record = self.reader.record(given.step, self.elapsed(), self._host_fields(given), core)
        check = self.reader.read(record)
        self.stop.now = self.stop.now or self.stop.read
        before = self._due(given.step, after_step=False)
        after = self._due(given.step, after_step=True)
        values: dict[Any, Any] = dict(given.extra)
        ctx = None
        if before or after:  # most steps of a sparse preset run none: no context to build
            ctx = self._context(given, record, check, scale)
            if before:
                values.update(self.runner.run(before, ctx, given.step))
            ctx.kl_term = None  # release the graph
            ctx.optimizer_stepped()  # (what the probes after it see)
            if after:
                self.runner.before_step(after, ctx)
        self._step = StepInFlight(ctx, after, record, values)
        return check

    def _host_fields(self, given: checks.StepInputs) -> dict[str, Any]:
        """What the row holds that the host knows already: epoch, KL weight, lr and eps (of
        the optimizer's first group, when they are numbers)."""
        out: dict[str, Any] = {}
        if given.epoch is not None:
            out[col.EPOCH] = given.epoch
        if given.beta is not None:
            out[col.BETA] = float(given.beta)
        if self.optimizer is not None:
            group = self.optimizer.param_groups[0]
            out.update({key: float(group[key]) for key in (col.LR, col.EPS)
                        if isinstance(group.get(key), (int, float))})
        return out

    def _complete(self, record: StepRecord, arrays: list[Any]) -> StepCheck:
        """A step's own values read: into its row, with what they say (:mod:`.watch`)."""
        row = record.row
        values, record.host_norms = record.core.values(arrays, len(self.params))
        row.update(values)
        where, stop = self.role.after_read(row)
        self.stop.read = self.stop.read or stop
        row.update(record.host)
        check = self.watch.check(row[col.STEP], row, record.core.norms, where,
                                 scaled=col.LOSS_SCALE in row)
        self.watch.watch(row[col.STEP], row, check)
        self.last_read_row = row
        return check

    def _write(self, record: StepRecord, arrays: list[Any]) -> None:
        """Write a step's row: its host values and losses, and its probe values read."""
        row = record.row
        self.writer.log_step_parts(row[col.STEP], [(tuple(row), list(row.values())),
                                               *record.probes.parts(arrays)])

    def _context(self, given: checks.StepInputs, record: StepRecord, check: StepCheck,
                 scale: GradScale | None) -> StepContext:
        """What the step's probes compute from."""
        kl_term, row, norms = given.kl_term, record.row, record.core.norms
        local_kl = given.kl  # still attached to this rank's graph (the recon/KL split)
        if kl_term is None and isinstance(local_kl, torch.Tensor) and local_kl.requires_grad:
            kl_term = local_kl * (1.0 if given.beta is None else given.beta)
        finite = grads_finite(norms, check)
        if norms is None:
            norms = torch.zeros(len(self.params), device=self.device)
        return StepContext(given.step, self.params, self.layers, self.optimizer,
                           recon=row.get(col.RECON, math.nan),
                           kl=row.get(col.KL, math.nan), param_grad_norms=norms,
                           total=row.get(col.TOTAL), beta=given.beta,
                           mu=None if given.mu is None else given.mu.detach(),
                           logvar=None if given.logvar is None else given.logvar.detach(),
                           kl_term=kl_term if isinstance(kl_term, torch.Tensor) else None,
                           latent_ranks=record.core.latent_ranks, grads_finite=finite,
                           host_grad_norms=record.host_norms, reduce=self.role.reduce,
                           values_read=self.read_before_step,
                           grad_scale=scale.value if scale is not None and scale.applied
                           else None)

    def after_step(self, step: int, skipped: bool, evaluate: bool) -> None:
        pending, self._step = self._step, None
        if pending is None or pending.record.row[col.STEP] != step:
            self._step = pending
            raise UserError(f"after_step({step}) without after_backward({step}) before it")
        if skipped:
            self.writer.event("skipped_step", step)
        elif pending.after:
            pending.values.update(self.runner.run(pending.after, pending.ctx, step))
        self.last_step_row = pending.record.row
        pending.record.probes = Packed(pending.values) if pending.values else NO_VALUES
        self.reader.hold(pending.record)
        if evaluate and (step + 1) % self.eval_every == 0:
            self.evaluate(step + 1)
        if self.online is not None:
            self.online.poll()
        if self.role.distributed or self.options.stop_on != "never":
            self._stop_if_asked(step + 1)

    def flush(self) -> None:
        self.reader.flush()

    # -- findings while training --------------------------------------------------------------

    def _found(self, text: str, finding: dict[str, Any], analysed_to: int) -> None:
        self.echo(text)
        self.writer.event("finding", analysed_to, finding_kind=finding["kind"],
                          severity=finding["severity"], first_step=finding["first_step"],
                          last_step=finding["last_step"], summary=finding["summary"])

    @property
    def stop_reason(self) -> str | None:
        return self.online.stop_reason if self.online is not None else None

    def _stop_if_asked(self, step: int) -> None:
        """A user's loop asked to stop on a finding: checkpoint, close, raise. Under
        torch.distributed the request goes to every rank with the next step's collective, and
        all stop after that step."""
        reason = self.stop_reason
        if self.role.distributed:
            self.stop.asked = self.stop.asked or reason is not None
            if not self.stop.now:
                return
            if self.role.sharded:  # every rank runs this: all stop here, together
                reason = reason or "rank 0's request"
        if reason is None or not self.owns_run:
            return
        self.flush()
        state = checkpoint(self.model, self.optimizer, step, self.role.sharded)
        self.session.save_checkpoint(step, state, keep=0)
        message = f"stopped at step {step} on {reason} (stop_on={self.options.stop_on!r})"
        self.close("stopped", step, message)
        raise TrainingStopped(message, step)

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, step: int) -> dict[str, Any]:
        self.flush()
        changed = self._optimizer_settings.changes()
        if changed:
            self.writer.event("optimizer_settings", step, changed=changed)
        with self.evaluator.eval_mode(), torch.no_grad():  # probes may encode the larger set
            evaluation = self.evaluator.run(step, self._lpips.metric)
            values = self.runner.run(self.runner.on_eval, evaluation.context, step)
        row: dict[str, Any] = {col.STEP: int(step), col.TIME: self.elapsed()}
        if self.options.steps_per_epoch:
            row[col.EPOCH] = step / self.options.steps_per_epoch
        if evaluation.per_image is not None:
            recon_each, kl_each = (t.float().cpu() for t in evaluation.per_image)
            values[col.EVAL_RECON], values[col.EVAL_KL] = recon_each.mean(), kl_each.mean()
            values.update(probe_library.per_index("img", col.RECON, recon_each))
            values.update(probe_library.per_index("img", col.KL, kl_each))
        if evaluation.train_per_image is not None:
            recon_each, kl_each = (t.float().cpu() for t in evaluation.train_per_image)
            values[col.TRAIN_EVAL_RECON] = recon_each.mean()
            values[col.TRAIN_EVAL_KL] = kl_each.mean()
        row.update(self.watch.averages())
        row.update(to_floats(values))
        if self.records:
            self.writer.save_grid(step, self.evaluator.grid_png(evaluation.tiles, row))
        self.writer.log_eval(row)
        self.last_eval_row, self._evaluated = row, True
        if self.online is not None:  # the child reads the run from disk
            self.writer.flush()
            self.online.evaluated(step)
        return row

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        watch = self.watch.state_dict()
        return {"sums": watch.pop("sums"), "elapsed": self.elapsed(), **watch,
                "probes": self.runner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.watch.load_state_dict(state)
        self._elapsed_before, self._t0 = float(state["elapsed"]), time.monotonic()
        self.runner.load_state_dict(state.get("probes", {}))

    def close(self, status: str, step: int | None, message: str) -> None:
        self.flush()
        last = step if step is not None else int(self.last_step_row.get(col.STEP, -1)) + 1
        if status == "finished" and last > 0 and self.last_eval_row.get(col.STEP) != last:
            self.evaluate(last)
        if self.online is not None:  # a finished run: its last evaluation analysed first
            self.online.close(wait=status == "finished")
        self.session.close(status, last, message)

    @property
    def closed(self) -> bool:
        return self.session.closed

    def abort(self, exc: BaseException) -> None:
        if isinstance(self.session, RunSession) and self.owns_run and not self.closed:
            self.session.__exit__(type(exc), exc, exc.__traceback__)
