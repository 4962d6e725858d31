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

The Monitor is the calls above and their arguments, checked (:mod:`.options`, :mod:`.checks`);
its part on this process, chosen once by the process's role (:mod:`.roles`), does the work: a
:class:`~.recorder.Recorder` (one process, rank 0, a rank in step with it under FSDP) or a
:class:`~.follower.Follower` (a rank other than 0 under DDP). CONTRIBUTING.md lists the
recorder's own parts, a module each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vaediag.errors import TrainingStopped, UserError
from vaediag.monitor import checks, lifetime, roles
from vaediag.monitor.evaluation import DecodeFn, EncodeFn, EvalLossFn
from vaediag.monitor.follower import Follower
from vaediag.monitor.options import Options
from vaediag.monitor.ranks import Ranks
from vaediag.monitor.recorder import Recorder
from vaediag.monitor.watch import StepCheck
from vaediag.probes.base import Probe
from vaediag.session import RunSession


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
    scaler
        Mixed precision: the loop's ``torch.amp.GradScaler`` (float16). The gradient
        statistics are then of the unscaled gradients, the ones the optimizer applies (divided
        by the scale while the gradients carry it; as they are after the loop's own
        ``scaler.unscale_(optimizer)``), the scale is a per-step column (``loss_scale``), and a
        step whose gradients overflowed is the scaler's skip (``scaler_skipped``, a
        ``scaler_skip`` event, ``StepCheck.scaler_skip``), not a non-finite fault. Call
        :meth:`after_backward` after ``scaler.scale(loss).backward()`` and :meth:`after_step`
        after ``scaler.step(optimizer)``. Not needed for bfloat16, which needs no scaler.

    Under torch.distributed every rank creates its Monitor with the same arguments: rank 0
    records; on the others it writes nothing and only takes part in each step's one collective
    (:mod:`vaediag.monitor.ranks`). Under FSDP (``fully_shard``) a forward pass needs every
    rank, so every rank runs the recording in step, and the others write nothing; call
    :meth:`evaluate` and :meth:`close` on every rank there.
    """

    def __init__(
        self, run_dir: str | Path | RunSession, model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None, *,
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
        scaler: torch.amp.GradScaler | None = None,
    ):
        options = Options.checked(
            eval_images=eval_images, encode=encode, decode=decode, eval_loss=eval_loss,
            eval_every=eval_every, value_range=value_range, probes=probes, seed=seed, config=config,
            extra_probes=extra_probes, metric_images=metric_images, train_images=train_images,
            train_factors=train_factors, lpips_weights=lpips_weights, overwrite=overwrite,
            lpips_download=lpips_download, recon_mode=recon_mode, eval_factors=eval_factors,
            steps_per_epoch=steps_per_epoch, online=online, stop_on=stop_on, scaler=scaler,
            read_before_step=read_before_step)
        self._part = _set_up(run_dir, model, optimizer, options)
        if self._part.owns_run and self._part.records:  # a loop that never closes its run
            lifetime.watch(self)

    # -- what a loop reads --------------------------------------------------------------------

    @property
    def run_path(self) -> Path:
        """The run directory."""
        return self._part.run_path

    @property
    def eval_every(self) -> int:
        return self._part.eval_every

    @property
    def probes(self) -> list[Probe]:
        """The active probes (those that declined or failed are gone)."""
        return self._part.probes

    @property
    def online(self) -> Any:
        """The online analysis (:class:`~.online.OnlineAnalysis`), or None."""
        return self._part.online

    @property
    def stops_itself(self) -> bool:
        """A user's loop under torch.distributed: the ranks other than 0 raise TrainingStopped
        when the ranks agreed to stop (True; ``vaediag train`` sets it False and stops every
        rank itself, with a checkpoint)."""
        return self._part.stops_itself

    @stops_itself.setter
    def stops_itself(self, stops: bool) -> None:
        self._part.stops_itself = stops

    @property
    def echo(self) -> Callable[[str], None]:
        """Where new findings and non-finite steps are said (``vaediag train`` routes them past
        its progress bar)."""
        return self._part.echo

    @echo.setter
    def echo(self, say: Callable[[str], None]) -> None:
        self._part.echo = say

    @property
    def last_read_row(self) -> dict[str, Any]:
        """The newest row whose values were read: this step's, or with
        ``read_before_step=False`` the step before's (what a progress line shows)."""
        return self._part.last_read_row

    def elapsed(self) -> float:
        """Seconds of training recorded (a resumed run's clock goes on)."""
        return self._part.elapsed()

    # -- per step -----------------------------------------------------------------------------

    def wants_graph(self, step: int) -> bool:
        """Whether ``loss.backward`` should keep the graph at ``step`` (for the gradient split)."""
        return self._part.wants_graph(step)

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
        previous step's probe values come back together (:mod:`vaediag.monitor.reading`).

        Every value is checked first: a loss term must be one number (a per-image vector is an
        error that says to reduce it), mu and logvar tensors of one shape; a wrong one is a
        :class:`~vaediag.errors.UserError` naming it, and nothing is recorded.
        """
        given = checks.StepInputs.checked(step, recon=recon, kl=kl, total=total, beta=beta,
                                          epoch=epoch, mu=mu, logvar=logvar, kl_term=kl_term,
                                          columns=extra, latent_dim=self._part.latent_dim)
        return self._part.after_backward(given)

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
        try:
            self._part.after_step(step, skipped, evaluate)
        except TrainingStopped:  # the run is closed
            lifetime.forget(self)
            raise

    def flush(self) -> None:
        """Read the last step's held-back probe values and write its row (done by itself at
        every evaluation, checkpoint and at :meth:`close`)."""
        self._part.flush()

    def event(self, kind: str, step: int, **fields: Any) -> None:
        """Record an event of your own in the run (``events.jsonl``), e.g. a planted fault."""
        if not isinstance(kind, str) or not kind:
            raise UserError(f"event kind must be a non-empty str, got {kind!r}")
        self._part.event(kind, checks.step(step), **fields)

    def evaluate(self, step: int) -> dict[str, Any]:
        """Evaluate the model as it is now (after ``step`` updates): grid PNG and eval row."""
        return self._part.evaluate(checks.step(step))

    # -- stopping -----------------------------------------------------------------------------

    @property
    def stop_reason(self) -> str | None:
        """Set when the online analysis found something at or above ``stop_on``."""
        return self._part.stop_reason

    def request_stop(self) -> None:
        """Under torch.distributed: ask every rank to stop; they learn it from the next step's
        collective and :attr:`stop_agreed` turns true on all of them after that same step
        (with ``read_before_step=False``, after the step after it, when that one is read)."""
        self._part.stop.asked = True

    @property
    def stop_agreed(self) -> bool:
        """Under torch.distributed: some rank asked to stop, and every rank knows it now."""
        return self._part.stop.now

    # -- state and the run's end --------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs so a resumed run continues averages, clock and probes."""
        return self._part.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._part.load_state_dict(state)

    def close(self, status: str = "finished", step: int | None = None, message: str = "") -> None:
        """Flush everything and mark the run's status; the run directory is complete.

        A finished run whose last grid is older than its last step gets a final evaluation, so
        the last grid always shows the final model.
        """
        self._part.close(status, step, message)
        lifetime.forget(self)

    @property
    def closed(self) -> bool:
        """Whether the run is closed (by :meth:`close`, a stop, or a failure)."""
        return self._part.closed

    def abort(self, exc: BaseException) -> None:
        """Close a run of this Monitor's own because ``exc`` ended its loop: the last rows
        written, the status ``failed`` with the exception (``interrupted`` for Ctrl-C)."""
        self._part.abort(exc)
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


def _set_up(run_dir: str | Path | RunSession, model: nn.Module,
            optimizer: torch.optim.Optimizer | None, options: Options) -> Recorder | Follower:
    """This process's part, by its role (:mod:`.roles`). Under torch.distributed every rank
    learns whether all set up, so none waits at the first step for one that failed."""
    ranks = Ranks()
    try:
        role = roles.choose(model, ranks)
        if role is None:
            start = run_dir.start_step if isinstance(run_dir, RunSession) else 0
            part: Recorder | Follower = Follower(ranks, model, optimizer, run_dir, options,
                                                 start)
        else:
            part = Recorder(role, run_dir, model, optimizer, options)
    except BaseException:
        if ranks.active:
            ranks.agree(False)
        raise
    if ranks.active:
        try:
            ranks.agree(True)
        except UserError:
            part.abandon()
            raise
    part.begin()
    return part


__all__ = ["Monitor", "StepCheck"]
