"""The Monitor: records a VAE's training into a run directory, one instrumented code path.

The built-in trainer and a user's own loop call the same methods::

    mon = vaediag.Monitor("runs/mine", model, optimizer, eval_images=val_batch,
                          encode=model.encode, decode=model.decode, eval_loss=eval_loss)
    for step, x in enumerate(loader):
        recon, kl, mu, logvar = ...                      # your forward pass and loss terms
        loss = recon + beta * kl
        optimizer.zero_grad()
        loss.backward(retain_graph=mon.wants_graph(step))  # retain only for the recon/KL split
        mon.after_backward(step, recon=recon, kl=kl, beta=beta, mu=mu, logvar=logvar)
        optimizer.step()
        mon.after_step(step)
    mon.close()

``step`` counts optimizer updates made before this batch (0-based): a per-step row with step s
describes the model after s updates, and an evaluation at step S shows it after S updates.
What is recorded beyond the losses is decided by probes (:mod:`vaediag.probes`).

The Monitor wires together its parts, each in a module of its own: the run's lifecycle
(:class:`vaediag.session.RunSession`), the probes and unusual steps (:mod:`.probing`), what
the gradients say (:mod:`.gradients`), the evaluations (:mod:`.evaluation`) and the grid's text
(:mod:`.captions`).
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vaediag import probes as probe_library
from vaediag.errors import TrainingStopped, UserError, first_line
from vaediag.monitor import checks, lifetime
from vaediag.monitor.evaluation import (
    DecodeFn,
    EncodeFn,
    EvalLossFn,
    Evaluator,
)
from vaediag.monitor.gradients import forward_order, grad_norms, nonfinite_origin
from vaediag.monitor.online import STOP_ON, OnlineAnalysis
from vaediag.monitor.probing import LPIPSLoader, ProbeRunner, UnusualSteps
from vaediag.monitor.ranks import (
    STOP,
    DiscardWriter,
    Ranks,
    ShadowSession,
    is_sharded,
    nonfinite_ranks,
    unwrap,
)
from vaediag.monitor.readback import Packed, Pending, read_arrays, to_floats
from vaediag.monitor.settings import SettingsWatch, optimizer_settings
from vaediag.probes.base import Probe, ProbeSetup
from vaediag.probes.context import StepContext
from vaediag.probes.latents import rank_summary as latent_summary
from vaediag.probes.layers import LayerIndex
from vaediag.rundir import RunWriter, load_run
from vaediag.session import RunSession


@dataclass(frozen=True)
class _Options:
    """The Monitor's own settings, checked once."""

    eval_every: int
    online: bool
    stop_on: str
    seed: int
    lpips_weights: str | None
    lpips_download: bool

    @classmethod
    def checked(cls, eval_every: Any, online: Any, stop_on: Any, seed: int,
                lpips_weights: str | None, lpips_download: bool) -> _Options:
        if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
            raise UserError(f"eval_every must be an int >= 1, got {eval_every!r}")
        online = checks.flag("online", online)
        if stop_on not in STOP_ON:
            raise UserError(f"stop_on must be one of {', '.join(map(repr, STOP_ON))}, got "
                            f"{stop_on!r}")
        if stop_on != "never" and not online:
            raise UserError(f"stop_on={stop_on!r} needs online=True (the online analysis "
                            f"finds what to stop on)")
        return cls(eval_every, online, stop_on, seed, lpips_weights, lpips_download)


@dataclass
class StepCheck:
    """What :meth:`Monitor.after_backward` saw: the trainer applies its non-finite policy to it."""

    grad_norm: float
    nonfinite: list[str] = field(default_factory=list)  # e.g. ["kl", "grad:decoder.fc.weight"]
    #: the step's values are not known yet: the Monitor reads nothing during a step
    #: (``read_before_step=False``); they are checked and recorded when the next step reads them
    pending: bool = False


class Monitor:
    """Record losses, gradients, optimizer state and image quality; evaluate the 4x8 grid.

    Parameters
    ----------
    run_dir
        A path for a new run directory, or a :class:`~vaediag.session.RunSession` already
        opened (the trainer's, new or resumed).
    model, optimizer
        The model (parameter names, gradients) and its optimizer (learning rate, Adam state).
    eval_images
        The fixed validation batch of the grid: at least 8 RGB images (N, 3, H, W) in [0, 1]
        (uint8 0..255 is accepted too); the first 8 are used.
    encode, decode
        ``encode(x) -> (mu, logvar)`` and ``decode(z) -> image in [0, 1]``; default: the
        model's own ``encode`` / ``decode`` methods.
    eval_loss
        Optional ``(x, z, mu, logvar) -> (recon per image, kl per image)``; without it the
        grid shows no losses of its own images.
    eval_every
        Steps between evaluations (grid, eval losses, image-quality probes). An evaluation
        costs about as much as a few training steps. The loss-quality and overfitting
        analyses need six evaluations from step 100 on: with ``eval_every=100`` a run of at
        least 600 steps, with 50 at least 350 (every analysis's shortest run: the table in
        docs/probes.md, ``vaediag.analysis.thresholds.shortest_runs``).
    value_range
        The range of the images ``eval_images`` holds and ``decode`` returns: ``(0, 1)``
        (default) or e.g. ``(-1, 1)`` for a tanh decoder. Images are mapped from it onto [0, 1]
        for the grid and the quality metrics; a decoder output outside it is clamped, with one
        warning and an event.
    probes
        A preset name (``off``, ``cheap``, ``standard``, ``full``) or a list of probes.
    extra_probes
        More probes (instances) to run besides the preset.
    metric_images
        Optional larger fixed set of validation images scored at each evaluation (active units,
        set-level quality).
    train_images
        A fixed set of *training* images (the first 8 are used), scored at every evaluation
        exactly like ``eval_images``: their losses, quality metrics and (with
        ``train_factors``) factor errors. Held-out images getting worse while these keep
        improving is memorisation; without them the Monitor says once that overfitting cannot
        be checked. Draw them once, e.g. ``train_set[:8]``.
    eval_factors, train_factors
        toyfaces' known factors of ``eval_images`` and ``train_images`` (columns as
        :meth:`vaediag.data.toyfaces.FaceFactors.table` gives them), for the factor errors.
    lpips_weights, lpips_download
        Where LPIPS' AlexNet weights are, and whether torchvision may download them (LPIPS is
        loaded only when a probe asks for it).
    recon_mode
        What the grid's second row decodes: ``"mean"`` (the posterior mean, the default) or
        ``"sample"`` (one fixed-noise sample of q(z|x)).
    seed
        Seeds the grid's fixed latent vectors and noise (the same seed, the same grid inputs).
    steps_per_epoch
        When given, evaluation rows record the epoch (step / steps_per_epoch).
    config
        Your own settings (a dict of TOML values), saved in the run's ``config.toml`` beside
        the Monitor's.
    overwrite
        Replace an existing run directory at ``run_dir`` (a path).
    online
        Run the detectors at each evaluation while training, in a child process (training
        does not wait for it), and print each new warning or high finding as one line on
        stderr as it appears; each is recorded as a ``finding`` event. The findings are those
        ``vaediag analyze`` gives for the run cut at that evaluation.
    stop_on
        ``"warning"`` or ``"high"``: when the online analysis finds a finding this severe,
        :meth:`after_step` saves a checkpoint (``checkpoints/step-N.pt``: the model's and the
        optimizer's state dicts), closes the run as ``stopped`` and raises
        :class:`vaediag.TrainingStopped`. ``"never"`` (the default) only reports.
    read_before_step
        ``True`` (the default): :meth:`after_backward` reads the step's losses and gradient
        norm from the device, so the :class:`StepCheck` it returns says whether they are finite
        before ``optimizer.step()``: a loop that skips or stops on a non-finite step, or clips
        by the returned norm, needs that (one device synchronisation per step on a GPU).
        ``False``: nothing is read during a step. Its values are copied to the host without
        waiting and read at the next step (or evaluation, checkpoint, ``close()``), when the
        copy has long finished; ``after_backward`` returns a StepCheck with ``pending=True``,
        a non-finite value is recorded (event, finding) when it is read, and an unusual step
        runs its ``when_unusual`` probes one step later. Under torch.distributed (every rank
        passes the same value) the ranks learn a request to stop one step later too, all at
        the same step.

    Under torch.distributed every rank creates its Monitor with the same arguments: rank 0
    gets this class and records; the others get a :class:`Follower` that writes nothing
    (:mod:`vaediag.monitor.ranks`). Under FSDP (``fully_shard``) a forward pass needs every
    rank, so every rank runs this class in step, and the others write nothing; call
    :meth:`evaluate` and :meth:`close` on every rank there.
    """

    #: a user's loop under torch.distributed: the ranks other than 0 raise TrainingStopped
    #: when the ranks agreed to stop (``vaediag train`` sets this False and stops every rank
    #: itself, with a checkpoint)
    stops_itself: bool = True

    def __init__(
        self,
        run_dir: str | Path | RunSession,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        eval_images: torch.Tensor | np.ndarray,
        encode: EncodeFn | None = None,
        decode: DecodeFn | None = None,
        eval_loss: EvalLossFn | None = None,
        eval_every: int = 100,
        value_range: tuple[float, float] = (0.0, 1.0),
        probes: str | Sequence[Probe] = "standard",
        extra_probes: Sequence[Probe] = (),
        metric_images: torch.Tensor | np.ndarray | None = None,
        train_images: torch.Tensor | np.ndarray | None = None,
        train_factors: dict[str, np.ndarray] | None = None,
        lpips_weights: str | None = None,
        lpips_download: bool = False,
        recon_mode: str = "mean",
        seed: int = 0,
        steps_per_epoch: int | None = None,
        eval_factors: dict[str, np.ndarray] | None = None,
        config: dict[str, Any] | None = None,
        overwrite: bool = False,
        online: bool = True,
        stop_on: str = "never",
        read_before_step: bool = True,
    ):
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.ranks = Ranks()
        if self.ranks.active:
            try:  # every rank learns whether all set up, so none waits for one that failed
                self._init(**arguments)
            except BaseException:
                self.ranks.agree(False)
                raise
            try:
                self.ranks.agree(True)
            except UserError:
                self._abandon()
                raise
        else:
            self._init(**arguments)
        if self.ranks.sharded and not self._evaluated:
            # the first evaluation now (its forward passes are collectives, so after every rank
            # agreed): under FSDP a forward pass between the backward pass and the optimizer
            # step, where after_backward(0) would make it, loses the gradients
            self.evaluate(0)

    def _abandon(self) -> None:
        """A construction that failed after the run directory was made: leave none (rank 0's
        own; a rank in step with it under FSDP made none)."""
        if getattr(self, "_own_session", False) and self.records:
            if self.online is not None:
                self.online.close(wait=False)
            self.session.discard("the Monitor could not be set up")

    def __new__(cls, *args: Any, **kwargs: Any) -> Monitor:
        """Under torch.distributed, ranks other than 0 get a :class:`Follower` (unless the
        model is sharded: see :mod:`vaediag.monitor.ranks`)."""
        model = args[1] if len(args) > 1 else kwargs.get("model")
        if cls is Monitor and not Ranks().records and not (
                isinstance(model, nn.Module) and _sharded_quietly(model)):
            return super().__new__(Follower)
        return super().__new__(cls)

    def _init(self, run_dir, model, optimizer, *, eval_images, encode, decode, eval_loss,
              eval_every, value_range, probes, extra_probes, metric_images, train_images,
              train_factors, lpips_weights, lpips_download, recon_mode, seed, steps_per_epoch,
              eval_factors, config, overwrite, online, stop_on, read_before_step) -> None:
        self.ranks.sharded = is_sharded(model)
        #: whether this rank writes the run (rank 0); under FSDP the others run in step with it
        self.records = self.ranks.records
        model = unwrap(model)  # DDP's forward would wait for the other ranks
        options = _Options.checked(eval_every, online, stop_on, seed, lpips_weights,
                                   lpips_download)
        self.model, self.optimizer = model, optimizer
        self.eval_every, self.steps_per_epoch = options.eval_every, steps_per_epoch
        self._stop_on = options.stop_on
        self.read_before_step = checks.flag("read_before_step", read_before_step)
        self._warned: set[str] = set()
        encode = encode or getattr(model, "encode", None)
        decode = decode or getattr(model, "decode", None)
        if encode is None or decode is None:
            raise UserError("Monitor needs encode(x) -> (mu, logvar) and decode(z) -> image: "
                            "pass encode= and decode=, or give the model those methods")
        self.evaluator = Evaluator(model, encode, decode, eval_images=eval_images,
                                   eval_loss=eval_loss, value_range=value_range,
                                   recon_mode=recon_mode, metric_images=metric_images,
                                   factors=eval_factors, warn=self._warn,
                                   train_images=train_images, train_factors=train_factors)
        self._try_model(encode, decode)
        chosen = [*self._choose(probes), *self._extra(extra_probes)]
        settings = {"monitor": {"eval_every": eval_every, "recon_mode": recon_mode,
                                "value_range": list(self.evaluator.value_range),
                                "probes": probes if isinstance(probes, str) else "custom"}}
        optim = optimizer_settings(optimizer)
        if optim and not isinstance(run_dir, RunSession):  # a user's loop: from the optimizer
            settings["optim"] = optim
        self.session = self._session(run_dir, settings, config, overwrite, seed)
        #: whether this Monitor made its run directory (a user's loop) or was handed a
        #: session (``vaediag train``, which stops itself)
        self._own_session = not isinstance(run_dir, RunSession)
        self._wire(options)
        try:
            self._set_up_probes(chosen, options)
        except BaseException:
            if self._own_session and self.records:  # a run directory of its own: leave none
                self.session.discard("the Monitor could not be set up")
            raise
        self._start_counting()
        self._say_what_is_missing(eval_loss is None, train_images is None)
        if self._own_session and self.records:  # a loop that never closes its run
            lifetime.watch(self)

    def _try_model(self, encode: EncodeFn, decode: DecodeFn) -> None:
        """Before anything is written: the model's parameters and layers, and one forward
        pass in eval mode on two of the grid's images, which tells the latent size and the
        order in which layers run (or says which call failed)."""
        self.device = self.evaluator.device
        self._params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.layers = LayerIndex.from_params(self._params)
        checks.same_images("train_images", self.evaluator.train_x, self.evaluator.x)
        checks.same_images("metric_images", self.evaluator.set_x, self.evaluator.x)
        with self.evaluator.eval_mode(), torch.no_grad():
            x = self.evaluator.x[:2]
            self.latent_dim = checks.try_model(encode, decode, x)
            self._rank = forward_order(self.model, lambda: decode(encode(x)[0]))

    def _session(self, run_dir: str | Path | RunSession, settings: dict[str, Any],
                 config: Any, overwrite: bool, seed: int) -> RunSession | ShadowSession:
        """The run this Monitor records into: the session it was handed (``vaediag train``),
        a new run directory of its own, or, on a rank that does not record (FSDP), none."""
        if not self.records:  # FSDP: in step with rank 0, writing nothing
            return ShadowSession(
                run_dir.path if isinstance(run_dir, RunSession) else Path(run_dir),
                resumed=run_dir.resumed if isinstance(run_dir, RunSession) else False)
        if isinstance(run_dir, RunSession):
            if run_dir.writer is None:
                raise UserError("Monitor needs an opened RunSession: call its open() first")
            return run_dir
        import tomli_w

        from vaediag import environment
        if not isinstance(config, (dict, type(None))):
            raise UserError(f"config= must be a dict of your settings, got "
                            f"{type(config).__name__}")
        try:
            config_toml = tomli_w.dumps({**settings, **(config or {})})
        except (TypeError, ValueError) as exc:
            raise UserError(f"config= must hold TOML values (numbers, strings, lists, "
                            f"dicts): {first_line(exc, 120)}") from None
        session = RunSession.new(run_dir, overwrite=overwrite,
                                 hint="pass overwrite=True to replace it")
        session.open(config_toml=config_toml, environment=environment.collect(self.device, seed))
        return session

    def _wire(self, options: _Options) -> None:
        """The writer, the online analysis, and what a failing run does before it closes."""
        assert self.session.writer is not None  # an opened session
        self.writer: RunWriter | DiscardWriter = self.session.writer
        self.run_path = self.session.path
        #: where new findings are printed (``vaediag train`` routes them past its progress bar)
        self.echo: Callable[[str], None] = lambda text: print(f"vaediag: {text}",
                                                              file=sys.stderr, flush=True)
        self.online = OnlineAnalysis(self.session.path, self._found, options.stop_on) \
            if options.online and self.records else None
        self.session.before_abort.append(self.flush)  # the last step's row, should training fail
        online = self.online
        if online is not None:  # a run that fails ends its analysis process too
            self.session.before_abort.append(lambda: online.close(wait=False))

    def _set_up_probes(self, chosen: list[Probe], options: _Options) -> None:
        """The fixed z and noise (drawn, or a resumed run's), LPIPS, and the probes, each
        offered the run's setting."""
        if self.session.resumed and self.records:
            self.evaluator.load_fixed(load_run(self.session.path).fixed)
        else:  # a rank in step with rank 0 (FSDP) draws the same, and writes nothing
            self.writer.save_fixed(**self.evaluator.make_fixed(options.seed, self.latent_dim))
        self.runner = ProbeRunner(chosen, self.writer, speak=self.records)
        self._lpips = LPIPSLoader(self.writer, options.lpips_weights, options.lpips_download,
                                  self.device, speak=self.records)
        self.runner.setup(ProbeSetup(self.model, self.optimizer, self.layers, self.latent_dim,
                                     bool(self.evaluator.factors), self._lpips,
                                     sharded=self.ranks.sharded), self.session.resumed)

    def _start_counting(self) -> None:
        """The per-step state: nothing pending, no stop asked, the clock started."""
        #: distributed: rank 0 asks the ranks to stop (sent at the next step's gather), and
        #: every rank learned from a gather that they stop now
        self._stop_asked = False
        self._stop_now = False
        #: read_before_step=False: a stop request read (at a step, or early at an evaluation
        #: or checkpoint on rank 0), agreed at the next ``after_backward``, where every rank
        #: reads the same step's values
        self._stop_read = False
        #: after_backward to after_step: the probes' context (None when none is due), the
        #: probes due after the optimizer step, the step's row and its values so far
        self._pending: tuple[StepContext | None, Sequence[Probe], dict[str, Any],
                             dict[Any, Any]] | None = None
        #: the last step's row and its probe values still on the device (see after_step)
        self._unread: tuple[dict[str, Any], Packed] | None = None
        #: read_before_step=False: this step's values, not yet read (after_backward to
        #: after_step), then the last step's, copied to the host without waiting
        self._unchecked: tuple[Packed, torch.Tensor | None] | None = None
        self._in_flight: tuple[dict[str, Any], Packed, Packed, Pending,
                               torch.Tensor | None] | None = None
        #: the step's per-parameter gradient norms on the host, when read with its losses
        #: before its probes run (for ``StepContext.host_grad_norms``)
        self._host_norms: np.ndarray | None = None
        #: whether the current step is unusual (see probing.UnusualSteps)
        self.unusual = False
        self._unusual = UnusualSteps()
        self._sums = [0.0, 0.0, 0]  # recon, kl, count since the last evaluation
        #: the optimizer's hyperparameters, checked for changes at each evaluation
        self._optimizer_settings = SettingsWatch(self.optimizer)
        #: whether the last step read was non-finite (a new episode is said at once)
        self._nonfinite_episode = False
        #: the last step given to after_backward (steps only grow; a resumed run's first step
        #: is its checkpoint's)
        self._last_step = getattr(self.session, "start_step", 0) - 1
        self._elapsed_before = 0.0
        self._t0 = time.monotonic()
        self.last_step_row: dict[str, Any] = {}
        #: the newest row whose values were read: this step's, or with read_before_step=False
        #: the step before's (what a progress line shows)
        self.last_read_row: dict[str, Any] = {}
        self.last_eval_row: dict[str, Any] = {}
        # a resumed run has its evaluation at the checkpoint's step
        self._evaluated = self.session.resumed

    def _say_what_is_missing(self, no_eval_loss: bool, no_train_images: bool) -> None:
        if self.session.resumed:
            return
        self.evaluator.check_range_fits()
        if no_eval_loss:
            self._warn("no_eval_loss", 0, "no eval_loss given: the grid shows no losses of its "
                       "own images and the loss-quality analysis cannot run (pass eval_loss=)")
        if no_train_images:
            self._warn("no_train_images", 0, "no train_images given: held-out images cannot be "
                       "compared with training images, so overfitting cannot be checked (pass "
                       "train_images=, e.g. 8 images of the training set)")

    @property
    def probes(self) -> list[Probe]:
        """The active probes (those that declined or failed are gone)."""
        return self.runner.probes

    def event(self, kind: str, step: int, **fields: Any) -> None:
        """Record an event of your own in the run (``events.jsonl``), e.g. a planted fault."""
        if not isinstance(kind, str) or not kind:
            raise UserError(f"event kind must be a non-empty str, got {kind!r}")
        self.writer.event(kind, checks.step(step), **fields)

    def _warn(self, what: str, step: int, message: str, **fields: Any) -> None:
        """Say something about the user's input once per run, and record it as an event."""
        if what in self._warned:
            return
        self._warned.add(what)
        self.writer.event("monitor_warning", step, what=what, message=message, **fields)
        if self.records:
            print(f"vaediag: warning: {message}", file=sys.stderr)

    @staticmethod
    def _choose(spec: str | Sequence[Probe]) -> list[Probe]:
        if isinstance(spec, str):
            return probe_library.build(spec)
        return Monitor._extra(spec, "probes")

    @staticmethod
    def _extra(probes: Sequence[Probe], name: str = "extra_probes") -> list[Probe]:
        if isinstance(probes, (str, bytes)) or not all(isinstance(p, Probe) for p in probes):
            raise UserError(f"{name}= must be a list of vaediag.probes.Probe instances"
                            + (" or a preset name" if name == "probes" else ""))
        return list(probes)

    def _due(self, step: int, *, after_step: bool) -> Sequence[Probe]:
        return self.runner.due(step, after_step=after_step, unusual=self.unusual)

    def wants_graph(self, step: int) -> bool:
        """Whether ``loss.backward`` should keep the graph at ``step`` (for the gradient split)."""
        return any("graph" in p.needs for p in self._due(step, after_step=False))

    # -- per step -----------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self._elapsed_before + time.monotonic() - self._t0

    def after_backward(
        self,
        step: int,
        *,
        recon: torch.Tensor | float,
        kl: torch.Tensor | float,
        total: torch.Tensor | float | None = None,
        beta: float | None = None,
        epoch: int | None = None,
        mu: torch.Tensor | None = None,
        logvar: torch.Tensor | None = None,
        kl_term: torch.Tensor | None = None,
        extra: dict[str, Any] | None = None,
    ) -> StepCheck:
        """Call after ``loss.backward()`` and before ``optimizer.step()``.

        ``kl_term`` is the KL part of the loss as differentiated (default ``beta * kl``); give
        it, still attached to the graph, for the recon/KL gradient split.

        This is the step's one read from the device: the losses, the gradient norm and the
        previous step's probe values come back together (see :meth:`_read`).

        Every value is checked first: a loss term must be one number (a per-image vector is an
        error that says to reduce it), mu and logvar tensors of one shape; a wrong one is a
        :class:`~vaediag.errors.UserError` naming it, and nothing is recorded.
        """
        given = checks.StepInputs.checked(step, recon=recon, kl=kl, total=total, beta=beta,
                                          epoch=epoch, mu=mu, logvar=logvar, kl_term=kl_term,
                                          columns=extra, latent_dim=self.latent_dim)
        checks.increasing(given.step, self._last_step)
        self._last_step = given.step
        if given.step == 0 and not self._evaluated:
            self.evaluate(0)
        if self.read_before_step:
            row, norms, where, latent_ranks = self._losses(given)
            check = self._check(given.step, row, norms, where)
            self._watch(given.step, row, check)
            self.last_read_row = row
        else:  # the step before is read now (its copy has long finished); this one later
            self._complete_in_flight()
            self._stop_now = self._stop_now or self._stop_read
            core, norms, latent_ranks = self._core(given)
            row = {"step": given.step, "time": self.elapsed(), **self._host_fields(given)}
            check = StepCheck(grad_norm=math.nan, pending=True)
            self._unchecked = (core, norms)
        before = self._due(given.step, after_step=False)
        after = self._due(given.step, after_step=True)
        values: dict[Any, Any] = dict(given.extra)
        ctx = None
        if before or after:  # most steps of a sparse preset run none: no context to build
            ctx = self._context(given, row, norms, check, latent_ranks)
            if before:
                values.update(self.runner.run(before, ctx, given.step))
            ctx.kl_term = None  # release the graph
            if after:
                self.runner.before_step(after, ctx)
        self._pending = (ctx, after, row, values)
        return check

    def _losses(self, given: checks.StepInputs
                ) -> tuple[dict[str, Any], torch.Tensor | None, dict[str, list[int]],
                           torch.Tensor | None]:
        """The step's row, read from the device with the step before's probe values: the
        losses (under torch.distributed, of the global batch, with their spread over ranks),
        the gradient norm, the settings. Also the gradient norms of whole parameters, on which
        ranks a loss term went non-finite, and every rank's latent summary."""
        core, norms, latent_ranks = self._core(given)
        values, self._host_norms = self._values(core, self._read(core))
        row: dict[str, Any] = {"step": given.step, "time": self.elapsed(), **values}
        where: dict[str, list[int]] = {}
        if self.ranks.active:
            where, stop = self._ranks_of(row)
            self._stop_now = self._stop_now or stop
        row.update(self._host_fields(given))
        return row, norms, where, latent_ranks

    def _values(self, core: Packed, arrays: list[np.ndarray]
                ) -> tuple[dict[str, float], np.ndarray | None]:
        """The core values read (:meth:`_core`): ``{column: float}``, with the global gradient
        norm made on the host from the per-parameter norms when they were read; and those
        norms (float64), or None."""
        if core.names and core.names[0] is _NORMS:  # one stack: the norms, then the losses
            values = arrays[0]
            norms = values[:len(self._params)].astype(np.float64)
            out = dict(zip(core.names[1], values[len(norms):].tolist(), strict=True))
            out["grad_norm"] = math.sqrt(norms @ norms)
            return out, norms
        return core.floats(arrays), None

    def _core(self, given: checks.StepInputs
              ) -> tuple[Packed, torch.Tensor | None, torch.Tensor | None]:
        """The step's values on the device, packed: the losses (under torch.distributed, of
        the global batch, with their spread over ranks) and the gradient norms (of each
        parameter and of all); also the gradient norms of whole parameters and every rank's
        latent summary.

        In one process, with every parameter's gradient there and the losses on its device
        (the usual case), this is two operations: one fused norm over the gradients and one
        stack of those norms with the losses; the global norm is then made on the host."""
        recon, kl, total = given.recon, given.kl, given.total
        if not self.ranks.active:
            grads = [p.grad for p in self._tensors]
            if grads and all(g is not None for g in grads):  # ("None in" compares tensors)
                device = grads[0].device
                if _on(device, recon, kl, total):  # tensors, detached: read, not differentiated
                    losses = [v.detach() for v in (recon, kl, total)  # type: ignore[union-attr]
                              if v is not None]
                    stacked = torch.stack([*torch._foreach_norm(grads), *losses])
                    names = _LOSS_NAMES if total is None else _TOTAL_NAMES
                    return Packed.vectors([_NORMS, names], [stacked]), stacked[:len(grads)], None
        norms = grad_norms(self._params, self.ranks.sharded)
        core: dict[Any, Any] = {}
        latent_ranks = None
        with torch.no_grad():  # the losses are attached to the graph: read, not differentiated
            if self.ranks.active:  # the global batch: the mean over ranks (ranks.py)
                gathered, norms, latent_ranks = self._gather(recon, kl, total, norms,
                                                             given.mu, given.logvar)
                recon, kl = gathered[:, 0].mean(), gathered[:, 1].mean()
                total = gathered[:, 2].mean() if total is not None else None
                core["recon_rank_spread"] = gathered[:, 0].max() - gathered[:, 0].min()
                core["kl_rank_spread"] = gathered[:, 1].max() - gathered[:, 1].min()
                core[self._rank_names] = gathered.reshape(-1)
            core["recon"] = recon
            core["kl"] = kl
            if total is not None:
                core["total"] = total
            if norms is not None:  # in float64: a sum of squares that overflows float32
                core["grad_norm"] = torch.linalg.vector_norm(norms, dtype=torch.float64)
            return Packed(core), norms, latent_ranks

    def _host_fields(self, given: checks.StepInputs) -> dict[str, Any]:
        """What the row holds that the host knows already: epoch, KL weight, lr and eps."""
        out: dict[str, Any] = {}
        if given.epoch is not None:
            out["epoch"] = given.epoch
        if given.beta is not None:
            out["beta"] = float(given.beta)
        out.update(self._settings())
        return out

    def _complete_in_flight(self) -> None:
        """``read_before_step=False``: the step whose values were copied to the host without
        waiting: read them (the copy has finished by now), check them as ``after_backward``
        would have, and write the row."""
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return
        row, core, probe_values, pending, norms = flight
        arrays = pending.result()
        row.update(self._values(core, arrays[:len(core.flats)])[0])
        where: dict[str, list[int]] = {}
        if self.ranks.active:
            where, stop = self._ranks_of(row)
            self._stop_read = self._stop_read or stop
        check = self._check(row["step"], row, norms, where)
        self._watch(row["step"], row, check)
        self.last_read_row = row
        self._write_row(row, probe_values, arrays[len(core.flats):])

    def _write_row(self, row: dict[str, Any], probe_values: Packed,
                   arrays: list[np.ndarray]) -> None:
        """Write a step's row: its host values and losses, and its probe values read."""
        self.writer.log_step_parts(row["step"], [(tuple(row), list(row.values())),
                                                 *probe_values.parts(arrays)])

    def _settings(self) -> dict[str, float]:
        """The optimizer's learning rate and eps (of its first group), when they are numbers."""
        if self.optimizer is None:
            return {}
        group = self.optimizer.param_groups[0]
        return {key: float(group[key]) for key in ("lr", "eps")
                if isinstance(group.get(key), (int, float))}

    def _check(self, step: int, row: dict[str, Any], norms: torch.Tensor | None,
               where: dict[str, list[int]]) -> StepCheck:
        """Whether a loss term or the gradients went non-finite, and where it started; each
        such term recorded as a ``nonfinite`` event (naming the ranks it appeared on)."""
        check = StepCheck(grad_norm=row.get("grad_norm", math.nan))
        for term in ("recon", "kl", "total"):
            if term in row and not math.isfinite(row[term]):
                check.nonfinite.append(term)
        if check.nonfinite or not self._grads_finite(norms, check):
            # read a step late, the weights are already those after the update: not scanned
            check.nonfinite += nonfinite_origin(self._params, norms, self._rank,
                                                weights=self.read_before_step) or ["grad"]
        for term in check.nonfinite:
            ranks = {"ranks": where[term]} if term in where else {}
            self.writer.event("nonfinite", step, term=term, recon=row["recon"], kl=row["kl"],
                              grad_norm=check.grad_norm, **ranks)
        self._say_nonfinite(step, check.nonfinite)
        return check

    def _say_nonfinite(self, step: int, terms: list[str]) -> None:
        """A non-finite step is said at once, once per episode (the first step after finite
        ones), not at the next evaluation's analysis."""
        if terms and not self._nonfinite_episode and self.records:
            shown = ", ".join(terms[:3]) + (f" and {len(terms) - 3} more" if len(terms) > 3
                                            else "")
            self.echo(f"non-finite values at step {step}: {shown} (recorded; vaediag analyze "
                      f"names where it started and why)")
        self._nonfinite_episode = bool(terms)

    @staticmethod
    def _grads_finite(norms: torch.Tensor | None, check: StepCheck) -> bool:
        return norms is None or math.isfinite(check.grad_norm)

    def _watch(self, step: int, row: dict[str, Any], check: StepCheck) -> None:
        """What the step's row says beyond itself: a negative KL (said once), the running
        sums for the next evaluation's averages, and whether the step is unusual."""
        if math.isfinite(row["kl"]) and row["kl"] < -1e-3 * max(1.0, abs(row["recon"])):
            self._warn("negative_kl", step, f"the KL given at step {step} is negative "
                       f"({row['kl']:.4g}): an analytic KL never is (check its sign and "
                       f"reduction); a single-sample Monte Carlo estimate can be", kl=row["kl"])
        if math.isfinite(row["recon"]) and math.isfinite(row["kl"]):
            sums = self._sums
            sums[0] += row["recon"]
            sums[1] += row["kl"]
            sums[2] += 1
        self.unusual = self._unusual.judge(row, check.grad_norm, bool(check.nonfinite))

    def _context(self, given: checks.StepInputs, row: dict[str, Any],
                 norms: torch.Tensor | None, check: StepCheck,
                 latent_ranks: torch.Tensor | None) -> StepContext:
        """What the step's probes compute from."""
        kl_term = given.kl_term
        local_kl = given.kl  # still attached to this rank's graph (the recon/KL split)
        if kl_term is None and isinstance(local_kl, torch.Tensor) and local_kl.requires_grad:
            kl_term = local_kl * (1.0 if given.beta is None else given.beta)
        grads_finite = self._grads_finite(norms, check)
        if norms is None:
            norms = torch.zeros(len(self._params), device=self.device)
        return StepContext(given.step, self._params, self.layers, self.optimizer,
                           recon=row.get("recon", math.nan), kl=row.get("kl", math.nan),
                           param_grad_norms=norms,
                           total=row.get("total"), beta=given.beta,
                           mu=None if given.mu is None else given.mu.detach(),
                           logvar=None if given.logvar is None else given.logvar.detach(),
                           kl_term=kl_term if isinstance(kl_term, torch.Tensor) else None,
                           latent_ranks=latent_ranks, grads_finite=grads_finite,
                           host_grad_norms=self._host_norms,
                           reduce=self.ranks.reduce,
                           values_read=self.read_before_step)

    def _gather(self, recon: torch.Tensor | float, kl: torch.Tensor | float,
                total: torch.Tensor | float | None, norms: torch.Tensor | None,
                mu: torch.Tensor | None, logvar: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The step's one collective (:mod:`.ranks`): every rank's loss terms and request to
        stop, with its summary of mu and logvar (when given) and, under FSDP, the sums of
        squares of its gradient shards. Returns the gathered (ranks, 4) loss terms, the
        gradient norms of whole parameters, and every rank's latent summary (or None)."""
        extra = []
        if mu is not None and logvar is not None:
            extra.append(latent_summary(mu, logvar))
        if self.ranks.sharded:
            extra.append(norms.double().square() if norms is not None else
                         torch.zeros(len(self._params), dtype=torch.float64,
                                     device=self.device))
        gathered = self.ranks.gather(recon, kl, total, self._stop_asked,
                                     self._gather_device(recon),
                                     torch.cat(extra) if extra else None)
        start = STOP + 1
        latent_ranks = None
        if mu is not None:
            latent_ranks = gathered[:, start:start + len(extra[0])]
            start += len(extra[0])
        if self.ranks.sharded:
            norms = gathered[:, start:].sum(0).sqrt().float()
        return gathered[:, :STOP + 1], norms, latent_ranks

    @functools.cached_property
    def _tensors(self) -> list[Any]:
        """The recorded parameters without their names (the per-step gradient read)."""
        return [p for _, p in self._params]

    @functools.cached_property
    def _rank_names(self) -> tuple[str, ...]:
        """Names under which the gathered (rank, value) entries are read with the step's
        other values, then taken out of the row (:meth:`_ranks_of`)."""
        return tuple(f"_rank/{r}/{i}" for r in range(self.ranks.world)
                     for i in range(STOP + 1))

    def _ranks_of(self, row: dict[str, Any]) -> tuple[dict[str, list[int]], bool]:
        """Take the gathered values out of ``row``: on which ranks each loss term was
        non-finite, and whether some rank asked to stop."""
        values = [[row.pop(f"_rank/{r}/{i}") for i in range(STOP + 1)]
                  for r in range(self.ranks.world)]
        return nonfinite_ranks(values), any(v[STOP] > 0 for v in values)

    def request_stop(self) -> None:
        """Under torch.distributed: ask every rank to stop; they learn it from the next step's
        gather and :attr:`stop_agreed` turns true on all of them after that same step (with
        ``read_before_step=False``, after the step after it, when that gather is read)."""
        self._stop_asked = True

    @property
    def stop_agreed(self) -> bool:
        """Under torch.distributed: some rank asked to stop, and every rank knows it now."""
        return self._stop_now

    def _gather_device(self, value: Any) -> torch.device:
        """Where the step's collective runs: the loss's device (NCCL needs the GPU)."""
        return value.device if isinstance(value, torch.Tensor) else self.device

    def _read(self, core: Packed | None) -> list[np.ndarray]:
        """Read the step's ``core`` values from the device together with the probe values of
        the step before (held back by :meth:`after_step`), in one transfer per device: one
        synchronisation per step on a GPU. Completes and writes that previous row; returns
        the vectors of ``core``."""
        unread, self._unread = self._unread, None
        tensors = core.flats if core is not None else []
        if unread is None:
            return read_arrays(tensors) if tensors else []
        row, probe_values = unread
        arrays = read_arrays([*tensors, *probe_values.flats])
        self._write_row(row, probe_values, arrays[len(tensors):])
        return arrays[:len(tensors)]

    def after_step(self, step: int, *, skipped: bool = False, evaluate: bool = True) -> None:
        """Call after ``optimizer.step()`` (or instead of it, with ``skipped=True``).

        Evaluates when one is due, unless ``evaluate`` is False (a loop that is about to stop).
        The step's probe values stay on the device until the next step's read (or the next
        evaluation, checkpoint or :meth:`close`), so they cost no synchronisation of their own.
        """
        step = checks.step(step)
        if skipped is not False or evaluate is not True:
            skipped = checks.flag("skipped", skipped)
            evaluate = checks.flag("evaluate", evaluate)
        pending, self._pending = self._pending, None
        if pending is None or pending[2]["step"] != step:
            self._pending = pending
            raise UserError(f"after_step({step}) without after_backward({step}) before it")
        ctx, after, row, values = pending
        if skipped:
            self.writer.event("skipped_step", step)
        elif after:
            values.update(self.runner.run(after, ctx, step))
        self.last_step_row = row
        if self._unchecked is not None:  # read_before_step=False: copy now, read later
            core, norms = self._unchecked
            self._unchecked = None
            probe_values = Packed(values) if values else _NO_VALUES
            self._in_flight = (row, core, probe_values,
                               Pending([*core.flats, *probe_values.flats]), norms)
        else:
            self._unread = (row, Packed(values) if values else _NO_VALUES)
        if evaluate and (step + 1) % self.eval_every == 0:
            self.evaluate(step + 1)
        if self.online is not None:
            self.online.poll()
        if self.ranks.active or self._stop_on != "never":
            self._stop_if_asked(step + 1)

    def flush(self) -> None:
        """Read the last step's held-back probe values and write its row (done by itself at
        every evaluation, checkpoint and at :meth:`close`)."""
        self._complete_in_flight()
        self._read(None)

    # -- findings while training --------------------------------------------------------------

    def _found(self, text: str, finding: dict[str, Any], analysed_to: int) -> None:
        self.echo(text)
        self.writer.event("finding", analysed_to, finding_kind=finding["kind"],
                          severity=finding["severity"], first_step=finding["first_step"],
                          last_step=finding["last_step"], summary=finding["summary"])

    @property
    def stop_reason(self) -> str | None:
        """Set when the online analysis found something at or above ``stop_on``."""
        return self.online.stop_reason if self.online is not None else None

    def _stop_if_asked(self, step: int) -> None:
        """A user's loop asked to stop on a finding: checkpoint, close, raise. Under
        torch.distributed the request goes to every rank with the next step's gather, and all
        stop after that step."""
        reason = self.stop_reason
        if self.ranks.active:
            self._stop_asked = self._stop_asked or reason is not None
            if not self._stop_now:
                return
            if self.ranks.sharded:  # every rank runs this: all stop here, together
                reason = reason or "rank 0's request"
        if reason is None or not self._own_session:
            return
        self.flush()
        self.session.save_checkpoint(step, self._checkpoint(step), keep=0)
        message = f"stopped at step {step} on {reason} (stop_on={self._stop_on!r})"
        self.close("stopped", step, message)
        raise TrainingStopped(message, step)

    def _checkpoint(self, step: int) -> dict[str, Any]:
        """The model's and optimizer's state for a checkpoint; under FSDP the whole of it,
        gathered to rank 0 (a collective every rank joins)."""
        if not self.ranks.sharded:
            state = {"model": self.model.state_dict(), "step": step}
            if self.optimizer is not None:
                state["optimizer"] = self.optimizer.state_dict()
            return state
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = {"model": get_model_state_dict(self.model, options=whole), "step": step}
        if self.optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer,
                                                          options=whole)
        return state

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, step: int) -> dict[str, Any]:
        """Evaluate the model as it is now (after ``step`` updates): grid PNG and eval row."""
        step = checks.step(step)
        self.flush()
        changed = self._optimizer_settings.changes()
        if changed:
            self.writer.event("optimizer_settings", step, changed=changed)
        with self.evaluator.eval_mode(), torch.no_grad():  # probes may encode the larger set
            evaluation = self.evaluator.run(step, self._lpips.metric)
            values = self.runner.run(self.runner.on_eval, evaluation.context, step)
        row: dict[str, Any] = {"step": int(step), "time": self.elapsed()}
        if self.steps_per_epoch:
            row["epoch"] = step / self.steps_per_epoch
        if evaluation.per_image is not None:
            recon_each, kl_each = (t.float().cpu() for t in evaluation.per_image)
            values["eval_recon"] = recon_each.mean()
            values["eval_kl"] = kl_each.mean()
            values.update(probe_library.per_index("img", "recon", recon_each))
            values.update(probe_library.per_index("img", "kl", kl_each))
        if evaluation.train_per_image is not None:
            recon_each, kl_each = (t.float().cpu() for t in evaluation.train_per_image)
            values["train_eval_recon"] = recon_each.mean()
            values["train_eval_kl"] = kl_each.mean()
        recon_sum, kl_sum, count = self._sums
        if count:
            row["train_recon_avg"] = recon_sum / count
            row["train_kl_avg"] = kl_sum / count
            row["train_avg_steps"] = int(count)
        self._sums = [0.0, 0.0, 0]
        row.update(to_floats(values))
        if self.records:
            self.writer.save_grid(step, self.evaluator.grid_png(evaluation.tiles, row))
        self.writer.log_eval(row)
        self.last_eval_row = row
        self._evaluated = True
        if self.online is not None:  # the child reads the run from disk
            self.writer.flush()
            self.online.evaluated(step)
        return row

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs so a resumed run continues averages, clock and probes."""
        self.flush()
        return {"sums": list(self._sums), "elapsed": self.elapsed(),
                **self._unusual.state_dict(), "probes": self.runner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        recon, kl, count = state["sums"]
        self._sums = [float(recon), float(kl), int(count)]
        self._elapsed_before = float(state["elapsed"])
        self._t0 = time.monotonic()
        self._unusual.load_state_dict(state)
        self.runner.load_state_dict(state.get("probes", {}))

    def close(self, status: str = "finished", step: int | None = None, message: str = "") -> None:
        """Flush everything and mark the run's status; the run directory is complete.

        A finished run whose last grid is older than its last step gets a final evaluation, so
        the last grid always shows the final model.
        """
        self.flush()
        last = step if step is not None else int(self.last_step_row.get("step", -1)) + 1
        if status == "finished" and last > 0 and self.last_eval_row.get("step") != last:
            self.evaluate(last)
        if self.online is not None:  # a finished run: its last evaluation analysed first
            self.online.close(wait=status == "finished")
        self.session.close(status, last, message)
        lifetime.forget(self)

    @property
    def closed(self) -> bool:
        """Whether the run is closed (by :meth:`close`, a stop, or a failure)."""
        return self.session.closed

    def abort(self, exc: BaseException) -> None:
        """Close a run of this Monitor's own because ``exc`` ended its loop: the last rows
        written, the status ``failed`` with the exception (``interrupted`` for Ctrl-C)."""
        if isinstance(self.session, RunSession) and self._own_session and not self.closed:
            self.session.__exit__(type(exc), exc, exc.__traceback__)
        lifetime.forget(self)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: Any) -> None:
        """``with vaediag.Monitor(...) as mon:`` closes the run at the block's end:
        ``finished``, or ``failed`` with the exception that left the block."""
        if self.closed:
            return
        if exc is None:
            self.close()
        else:
            self.abort(exc)


_LOSS_NAMES = ("recon", "kl")
_TOTAL_NAMES = ("recon", "kl", "total")
#: the names of a packed core whose vector starts with every parameter's gradient norm
_NORMS = ("(gradient norms)",)
#: the probe values of a step that ran no probe
_NO_VALUES = Packed.vectors([], [])


def _on(device: torch.device, recon: Any, kl: Any, total: Any) -> bool:
    """Whether the loss terms are tensors on ``device`` (``total`` may be None)."""
    return (isinstance(recon, torch.Tensor) and recon.device == device
            and isinstance(kl, torch.Tensor) and kl.device == device
            and (total is None or (isinstance(total, torch.Tensor) and total.device == device)))


def _sharded_quietly(model: nn.Module) -> bool:
    """Whether the model is sharded, for choosing the class; a model that cannot be recorded
    (FSDP1) gets the rank-0 class, whose set-up says why on every rank."""
    try:
        return is_sharded(model)
    except UserError:
        return True


class Follower(Monitor):
    """The Monitor on the ranks other than 0 under torch.distributed (``vaediag.Monitor``
    returns one there): it checks its inputs as rank 0 does, takes part in each step's one
    collective, so rank 0 records the global batch and every rank learns the same things (a
    non-finite value, a stop), and writes nothing (:mod:`vaediag.monitor.ranks`)."""

    def _init(self, run_dir, model, optimizer, *, eval_every, online, stop_on,
              read_before_step, **_unused: Any) -> None:
        model = unwrap(model)
        self.read_before_step = checks.flag("read_before_step", read_before_step)
        #: read_before_step=False: the last step's gathered values, copied without waiting
        self._gathered: Pending | None = None
        if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
            raise UserError(f"eval_every must be an int >= 1, got {eval_every!r}")
        checks.flag("online", online)
        if stop_on not in STOP_ON:
            raise UserError(f"stop_on must be one of {', '.join(map(repr, STOP_ON))}, got "
                            f"{stop_on!r}")
        self.model, self.optimizer, self.eval_every = model, optimizer, eval_every
        self.records = False
        self.run_path = run_dir.path if isinstance(run_dir, RunSession) else Path(run_dir)
        self._params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.device = self._params[0][1].device if self._params else torch.device("cpu")
        self.online = None
        self._own_session = False
        self._stop_asked = self._stop_now = False
        self._last_step = run_dir.start_step - 1 if isinstance(run_dir, RunSession) else -1
        self._t0, self._elapsed_before = time.monotonic(), 0.0
        self.last_step_row: dict[str, Any] = {}
        self.last_read_row: dict[str, Any] = {}
        self.last_eval_row: dict[str, Any] = {}

    def wants_graph(self, step: int) -> bool:
        return False

    def after_backward(self, step: int, *, recon: torch.Tensor | float,
                       kl: torch.Tensor | float, total: torch.Tensor | float | None = None,
                       beta: float | None = None, epoch: int | None = None,
                       mu: torch.Tensor | None = None, logvar: torch.Tensor | None = None,
                       kl_term: torch.Tensor | None = None,
                       extra: dict[str, Any] | None = None) -> StepCheck:
        """The step's collective; the same decision about non-finite values as rank 0."""
        given = checks.StepInputs.checked(step, recon=recon, kl=kl, total=total, beta=beta,
                                          epoch=epoch, mu=mu, logvar=logvar, kl_term=kl_term,
                                          columns=extra, latent_dim=None)
        checks.increasing(given.step, self._last_step)
        self._last_step = given.step
        step, recon, kl, total = given.step, given.recon, given.kl, given.total
        summary = None if given.mu is None or given.logvar is None else \
            latent_summary(given.mu, given.logvar)
        gathered = self.ranks.gather(recon, kl, total, self._stop_asked,
                                     self._gather_device(recon), summary)
        gathered = gathered[:, :STOP + 1]
        self.last_step_row = {"step": step}
        if not self.read_before_step:  # the step before's values now, as rank 0 reads them
            flight, self._gathered = self._gathered, Pending([gathered.reshape(-1)])
            if flight is not None:
                (before,) = flight.result()
                self._stop_now = self._stop_now or bool((before[STOP::STOP + 1] > 0).any())
            return StepCheck(grad_norm=math.nan, pending=True)
        norms = grad_norms(self._params, self.ranks.sharded)
        norm = (norms.double().square().sum().sqrt() if norms is not None
                else torch.tensor(math.nan, dtype=torch.float64))
        host = torch.cat([gathered.reshape(-1), norm.reshape(1).to(gathered)]).tolist()
        width = STOP + 1
        values = [host[r * width:(r + 1) * width] for r in range(self.ranks.world)]
        self._stop_now = self._stop_now or any(v[STOP] > 0 for v in values)
        check = StepCheck(grad_norm=host[-1])
        for i, term in enumerate(("recon", "kl", "total")):
            if term == "total" and total is None:
                continue
            if not math.isfinite(sum(v[i] for v in values)):
                check.nonfinite.append(term)
        if not math.isfinite(check.grad_norm) and norms is not None:
            check.nonfinite.append("grad")
        return check

    def after_step(self, step: int, *, skipped: bool = False, evaluate: bool = True) -> None:
        step = checks.step(step)
        checks.flag("skipped", skipped), checks.flag("evaluate", evaluate)
        if self._stop_now and self.stops_itself:
            raise TrainingStopped(f"stopped at step {step + 1}: rank 0 stopped the run", step + 1)

    def evaluate(self, step: int) -> dict[str, Any]:
        return {}

    def event(self, kind: str, step: int, **fields: Any) -> None:
        """Only rank 0 records events."""

    def flush(self) -> None:
        pass

    def close(self, status: str = "finished", step: int | None = None, message: str = "") -> None:
        """Rank 0 closes the run."""

    @property
    def closed(self) -> bool:
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
