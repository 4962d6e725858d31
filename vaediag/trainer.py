"""The built-in trainer: one readable loop around the same Monitor that users attach to theirs.

Everything random is a function of the seed and the step (data order per epoch, the sampling
generator's saved state), so a resumed run continues exactly where the checkpoint left it: the
per-step rows of an interrupted-and-resumed run equal those of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vaediag import environment
from vaediag import probes as probe_library
from vaediag.columns import DECODER_SCALE
from vaediag.config import Config, from_dict, resume_changes
from vaediag.console import Progress, StopFlag
from vaediag.data import Dataset, load_dataset, train_sample
from vaediag.data.augment import augment, step_generator
from vaediag.errors import RunDirError, TrainingStopped, UserError, first_line
from vaediag.inject import Injector, parse_all
from vaediag.losses import kl_per_dim, loss_terms, recon_per_sample
from vaediag.model import ConvVAE, VAEOutput
from vaediag.monitor import Monitor
from vaediag.monitor.ranks import ProcessGroup
from vaediag.precision import Precision
from vaediag.rundir import CHECKPOINTS_DIR, step_file
from vaediag.schedules import beta_at, lr_at
from vaediag.session import RunSession, load_latest_checkpoint


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # finished | interrupted
    step: int  # optimizer steps completed
    total_steps: int


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    o = config.optim
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                               weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.eps,
               weight_decay=o.weight_decay)


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any],
                      config: Config) -> None:
    """Load a checkpoint's optimizer state, then the configured settings over the saved ones
    (``load_state_dict`` brings back the saved eps, betas, ...): a resume or replay that
    changes them gets them."""
    optimizer.load_state_dict(state)
    o = config.optim
    settings = {"eps": o.eps, "betas": tuple(o.betas), "weight_decay": o.weight_decay,
                "momentum": o.momentum}
    for group in optimizer.param_groups:
        for key, value in settings.items():
            if key in group:
                group[key] = value


class EpochOrder:
    """The shuffled order of epoch e is a function of (seed, e): nothing to checkpoint."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = n // batch_size
        self._epoch, self._perm = -1, torch.arange(n)

    def batch(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]


def _eval_loss_fn(model: ConvVAE, config: Config):
    """Per-image losses of the grid's images as the model is now; KL is the analytic one."""
    def eval_loss(x, z, mu, logvar):
        logits = model.decode_logits(z)
        recon = recon_per_sample(logits, x, config.loss.recon, model.log_scale)
        return recon, kl_per_dim(mu, logvar).sum(1)
    return eval_loss


#: what a trainer checkpoint holds besides the session's own keys
CHECKPOINT_KEYS = ("model", "optimizer", "sampler_rng", "torch_rng", "monitor")


def _restore_weights(run_dir: str | Path, state: dict[str, Any], model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, config: Config,
                     new_optimizer: bool) -> None:
    """Load the checkpoint's model and optimizer state, or say in one line why it does not fit
    this run (another model, missing keys); nothing in the run directory has changed then."""
    name = f"{CHECKPOINTS_DIR}/{step_file(int(state['step']), 'pt')}"
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise RunDirError(f"{run_dir}: {name} lacks {', '.join(missing)}: not a checkpoint "
                          f"of vaediag train; nothing was changed")
    try:
        model.load_state_dict(state["model"])
        if not new_optimizer:
            restore_optimizer(optimizer, state["optimizer"], config)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise RunDirError(f"{run_dir}: {name} does not fit this run's model or optimizer "
                          f"({first_line(exc, 160)}); nothing was changed") from None


def build_extra_probes(specs: tuple[str, ...]) -> list:
    """Instantiate the probes named FILE.py:ClassName in ``probes.extra``."""
    out = []
    for spec in specs:
        cls = probe_library.load_from_path(spec)
        try:
            out.append(cls())
        except Exception as exc:  # noqa: BLE001 - the user's class: any error is bad input
            raise UserError(f"probe {spec}: cannot create it with no arguments: "
                            f"{type(exc).__name__}: {exc}") from None
    return out


def _report_skipped(data: Dataset) -> None:
    if data.skipped:
        print(f"vaediag: warning: {data.name}: {data.skipped.summary()}", file=sys.stderr)


def _say_what_is_too_short(total_steps: int, eval_every: int) -> None:
    """Up front: the analyses this run is too short for (docs/probes.md's table)."""
    from vaediag.analysis.thresholds import shortest_runs

    short = {name: n for name, n in shortest_runs(eval_every).items() if total_steps < n}
    if short:
        print(f"vaediag: note: {total_steps:,} steps with an evaluation every {eval_every:,} "
              f"are too few for " + ", ".join(f"{name} (needs {n:,})"
                                             for name, n in short.items())
              + "; those analyses will be listed as not checked", file=sys.stderr)


def train(
    config: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    quiet: bool = False,
    on_start: Callable[[Path], None] | None = None,
) -> TrainResult:
    """Train a VAE as configured, recording everything into ``run_dir``.

    ``resume``: continue ``run_dir`` from its newest checkpoint; ``config`` is the run's saved
    config with the changes a resume may make (:func:`vaediag.config.resume_changes`), which
    are recorded in the ``resume`` event. ``on_start(run_dir)`` is called once the inputs
    (run directory, data, checkpoint) have been checked, before training. ``progress``: a
    tqdm bar (True), periodic log lines with steps/s (False), or pick by whether stderr is a
    terminal (None); ``quiet``: neither. Raises
    :class:`~vaediag.errors.TrainingStopped` when the non-finite policy is 'stop' and a loss or
    gradient went non-finite.
    """
    tc = config.train
    ranks = ProcessGroup.join(tc.device)
    try:
        result = _train(config, run_dir, ranks, resume=resume, overwrite=overwrite,
                        progress=progress, quiet=quiet or ranks.rank > 0, on_start=on_start)
    except BaseException:
        ranks.leave(clean=False)
        raise
    ranks.leave(clean=True)
    return result


def _reads_before_step(config: Config) -> bool:
    """Whether the loop needs a step's values before ``optimizer.step()``: to stop or skip a
    non-finite step, or to clip by the gradient norm. With ``train.on_nonfinite =
    "continue"`` and no clipping it does not, and the Monitor reads nothing during a step (no
    device synchronisation per step on a GPU), under torchrun too."""
    return config.train.on_nonfinite != "continue" or bool(config.optim.grad_clip)


def _train(config: Config, run_dir: str | Path, ranks: ProcessGroup, *, resume: bool,
           overwrite: bool, progress: bool | None, quiet: bool,
           on_start: Callable[[Path], None] | None) -> TrainResult:
    tc = config.train
    device = environment.resolve_device(ranks.device(tc.device))
    # Refuse a run dir we may not use before spending time on data or touching its files.
    # Under torchrun only rank 0 touches it; the others read the checkpoint to resume from.
    session: RunSession | None = None
    checkpoint: dict[str, Any] | None = None
    if resume:
        if ranks.rank == 0:
            session = RunSession.resume(run_dir)
            checkpoint = session.checkpoint
            changes = resume_changes(from_dict(session.saved_config()), config)
        else:
            checkpoint = load_latest_checkpoint(Path(run_dir))
            changes = {}
        # another optimizer starts with its own fresh state (a replay asking "is it Adam?")
        new_optimizer = "optim.name" in changes
    elif ranks.rank == 0:
        session = RunSession.new(run_dir, overwrite=overwrite)
    extra_probes = build_extra_probes(config.probes.extra)
    data = load_dataset(config.data)
    _report_skipped(data)
    batch = tc.batch_size * ranks.world  # the global batch: each rank takes its share
    if batch > len(data.train):
        raise UserError(f"train.batch_size ({tc.batch_size}"
                        + (f" x {ranks.world} ranks" if ranks.world > 1 else "")
                        + f") is larger than the training set ({len(data.train)} images)")
    order = EpochOrder(len(data.train), batch, tc.seed)
    spe = order.steps_per_epoch
    total_steps = tc.steps or tc.epochs * spe
    eval_every = config.eval.every_steps or spe
    checkpoint_every = tc.checkpoint_every or eval_every

    torch.manual_seed(tc.seed)
    model = ConvVAE.from_config(config).to(device)
    optimizer = build_optimizer(model, config)
    sampler = torch.Generator(device=device).manual_seed(tc.seed + 1 + 1000 * ranks.rank)
    precision = Precision(tc.precision, device)

    if checkpoint is not None:  # before anything in the run directory changes: it must fit
        _restore_weights(run_dir, checkpoint, model, optimizer, config, new_optimizer)
    if on_start is not None and session is not None:  # every input checked: say where it goes
        on_start(session.path)

    # an exception from here on closes the run with the status it calls for (rank 0)
    with session if session is not None else contextlib.nullcontext():
        # A resumed run first forgets what came after its checkpoint and records how this
        # session starts, before anything else writes events.
        if session is not None:
            writer = session.open(config_toml=config.to_toml(),
                                  environment=environment.collect(device, tc.seed),
                                  flush_steps=config.log.flush_steps,
                                  flush_seconds=config.log.flush_seconds,
                                  **({"changes": changes, "total_steps": total_steps,
                                      "optimizer_state": "new" if new_optimizer
                                      else "restored"} if resume else {}))
            if not resume:
                skipped = data.skipped
                writer.event("start", 0, total_steps=total_steps, steps_per_epoch=spe,
                             train_images=len(data.train), val_images=len(data.val),
                             data=data.name, world_size=ranks.world,
                             skipped_files=len(skipped.corrupt) + len(skipped.not_images)
                             if skipped else 0)
        pc = config.probes
        train_images, train_factors = train_sample(data, config.data.seed)
        monitor = Monitor(session if session is not None else run_dir, model, optimizer,
                          eval_images=data.val[:8],
                          eval_loss=_eval_loss_fn(model, config), eval_every=eval_every,
                          probes=probe_library.build(pc.preset, pc.split_every, pc.layer_every,
                                                     pc.optimizer_every),
                          extra_probes=extra_probes,
                          metric_images=data.val[:pc.metric_images] if pc.metric_images else None,
                          train_images=train_images, train_factors=train_factors,
                          lpips_weights=pc.lpips_weights or None,
                          lpips_download=pc.lpips_download,
                          recon_mode=config.eval.recon_mode, seed=tc.seed,
                          steps_per_epoch=spe, eval_factors=data.val_factors,
                          online=tc.online, stop_on=tc.stop_on,
                          read_before_step=_reads_before_step(config),
                          scaler=precision.scaler)
        monitor.stops_itself = False  # the loop below stops every rank, with a checkpoint
        step = int(checkpoint["step"]) if checkpoint is not None else 0
        if checkpoint is not None:  # the random state last: the Monitor may draw from it
            sampler.set_state(checkpoint.get("sampler_rng_ranks", [checkpoint["sampler_rng"]])
                              [ranks.rank])
            torch.set_rng_state(checkpoint.get("torch_rng_ranks", [checkpoint["torch_rng"]])
                                [ranks.rank])
            monitor.load_state_dict(checkpoint["monitor"])
            precision.load_state_dict(checkpoint)
        if step >= total_steps:
            if session is not None:
                session.close("finished", step, "nothing to do: already at the last step")
            return TrainResult(Path(run_dir), "finished", step, total_steps)
        loop = TrainingLoop(config, data, order, model, optimizer, sampler, monitor, session,
                            device, ranks, precision)
        return loop.run(step, total_steps, checkpoint_every, progress, quiet, resume)


class TrainingLoop:
    """The training loop, one named step at a time: the batch, its settings, the step itself
    (forward, backward, the Monitor, the update), the checkpoint, whether to stop, the
    progress line. Faults planted with ``--inject`` enter through the injector, which does
    nothing when there are none."""

    def __init__(self, config: Config, data: Dataset, order: EpochOrder, model: ConvVAE,
                 optimizer, sampler: torch.Generator, monitor: Monitor,
                 session: RunSession | None, device: torch.device, ranks: ProcessGroup,
                 precision: Precision):
        self.config, self.tc, self.order = config, config.train, order
        self.precision = precision
        self.model, self.optimizer, self.sampler = model, optimizer, sampler
        self.monitor, self.session, self.device, self.ranks = monitor, session, device, ranks
        self.images = torch.from_numpy(data.train)
        self.share = slice(ranks.rank * self.tc.batch_size, (ranks.rank + 1) * self.tc.batch_size)
        # under torchrun the forward goes through DDP (its backward reduces the gradients);
        # the Monitor, the evaluations and the checkpoints use the module inside
        self.net = model if ranks.world == 1 else torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        self.injector = Injector(parse_all(self.tc.inject))
        self.fault_noise = torch.Generator().manual_seed(self.tc.seed + 2)
        self.writer = session.writer if session is not None else None

    # -- the steps of one training step -------------------------------------------------------

    def batch(self, step: int) -> torch.Tensor:
        """This rank's share of the step's global batch, augmented (and faulted)."""
        x = self.images[self.order.batch(step)[self.share]].to(self.device, non_blocking=True)
        x = augment(x.float().div_(255.0), self.tc.augment, step_generator(self.tc.seed, step))
        return self.injector.batch(step, x, self.fault_noise)

    def settings(self, step: int, total_steps: int) -> float:
        """Set the step's learning rate and eps; return its KL weight."""
        if self.writer is not None:
            for fault in self.injector.starting(step):
                self.writer.event("inject", step, fault=fault.spec, fault_kind=fault.kind,
                                  last_step=fault.last_step, **fault.params)
        lr = lr_at(step, self.config.optim, total_steps) * self.injector.lr_factor(step)
        eps = self.injector.eps(step, self.config.optim.eps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if self.injector:
                group["eps"] = eps
        return beta_at(step, self.config.loss) * self.injector.beta_factor(step)

    def train_step(self, step: int, x: torch.Tensor, beta: float) -> None:
        """Forward, backward, the Monitor, the non-finite policy and the update."""
        model, monitor, tc = self.model, self.monitor, self.tc
        with self.precision.forward():
            out = self.net(x, generator=self.sampler)
        if self.precision.dtype is not None:  # the loss terms in float32
            out = VAEOutput(*(t.float() for t in out))
        terms = loss_terms(out.logits, x, out.mu, out.logvar, out.z, self.config.loss, beta,
                           model.log_scale)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(terms.total, monitor.wants_graph(step))
        self.injector.after_backward(step, model)
        extra = {DECODER_SCALE: model.log_scale.detach().exp()} \
            if self.config.loss.learn_decoder_scale and model.log_scale is not None else None
        check = monitor.after_backward(step, recon=terms.recon, kl=terms.kl, total=terms.total,
                                       beta=beta, epoch=step // self.order.steps_per_epoch,
                                       mu=out.mu, logvar=out.logvar,
                                       kl_term=beta * terms.kl_penalty, extra=extra)
        if check.nonfinite and tc.on_nonfinite == "stop":
            monitor.after_step(step, skipped=True, evaluate=False)
            self.checkpoint(step)
            raise TrainingStopped(f"non-finite {', '.join(check.nonfinite)} at step {step}: "
                                  f"stopped (state saved at step {step}; change the config and "
                                  f"--resume, or set train.on_nonfinite)", step)
        skip = bool(check.nonfinite) and tc.on_nonfinite == "skip"
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            clip = self.config.optim.grad_clip
            if clip and check.grad_norm > clip and not check.scaler_skip:
                scale = clip / (check.grad_norm + 1e-6)
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(scale)
            self.precision.step(self.optimizer)
        self.injector.after_update(step + 1, model)
        monitor.after_step(step, skipped=skip)

    def checkpoint(self, step: int) -> None:
        """Every rank's random state, saved by rank 0 (a collective under torchrun)."""
        samplers = self.ranks.gather(self.sampler.get_state())
        torch_rngs = self.ranks.gather(torch.get_rng_state())
        if self.session is None:
            return
        self.session.save_checkpoint(step, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "sampler_rng": samplers[0], "torch_rng": torch_rngs[0],
            **({"sampler_rng_ranks": samplers, "torch_rng_ranks": torch_rngs}
               if self.ranks.world > 1 else {}),
            "monitor": self.monitor.state_dict(), **self.precision.state_dict()},
            keep=self.tc.keep_checkpoints)

    def stopping(self, step: int, signal_received: int | None) -> bool:
        """Whether to stop after ``step`` updates: a signal, or ``train.stop_on`` (raises,
        with a checkpoint). Under torchrun every rank stops after the same step."""
        monitor = self.monitor
        if self.ranks.world > 1:  # (monitor/ranks.py)
            if signal_received or monitor.stop_reason is not None:
                monitor.request_stop()
            stopping = monitor.stop_agreed
        else:
            stopping = signal_received is not None or monitor.stop_reason is not None
        if stopping and not signal_received:  # train.stop_on: a finding this severe
            self.checkpoint(step)
            raise TrainingStopped(f"stopped at step {step} (train.stop_on = "
                                  f"{self.tc.stop_on!r}) on the "
                                  f"{monitor.stop_reason or 'finding rank 0 reported'}; "
                                  f"state saved: change the config and --resume", step)
        return stopping

    # -- the loop -----------------------------------------------------------------------------

    def run(self, start: int, total_steps: int, checkpoint_every: int,
            progress: bool | None, quiet: bool, resumed: bool) -> TrainResult:
        monitor = self.monitor
        progress_line = Progress(monitor, start, total_steps, self.order.steps_per_epoch,
                                 progress, quiet)
        if start == 0 and not resumed:  # a resume from step 0 has these already
            if not quiet and self.ranks.rank == 0:
                _say_what_is_too_short(total_steps, monitor.eval_every)
            self.injector.after_update(0, self.model)
            monitor.evaluate(0)
            self.checkpoint(0)
        self.model.train()
        step = start
        with StopFlag().installed() as stop, progress_line:
            while step < total_steps:
                beta = self.settings(step, total_steps)
                self.train_step(step, self.batch(step), beta)
                step += 1
                stopping = self.stopping(step, stop.signal)
                if step % checkpoint_every == 0 or step == total_steps or stopping:
                    if step == total_steps and step % monitor.eval_every:
                        monitor.evaluate(step)  # always end on a grid of the final model
                    self.checkpoint(step)
                progress_line.after(step)
                if stopping:
                    monitor.close("interrupted", step, f"stopped by signal {stop.signal}")
                    return TrainResult(Path(monitor.run_path), "interrupted", step,
                                       total_steps)
        monitor.close("finished", step)
        return TrainResult(Path(monitor.run_path), "finished", step, total_steps)


def default_run_dir(root: str | Path = "runs") -> Path:
    """runs/run-1, runs/run-2, ...: the first that does not exist (never a timestamp)."""
    root = Path(root)
    i = 1
    while (root / f"run-{i}").exists():
        i += 1
    return root / f"run-{i}"


__all__ = ["train", "TrainResult", "build_optimizer", "restore_optimizer", "EpochOrder",
           "default_run_dir"]
