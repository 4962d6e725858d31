"""The built-in trainer at the terminal: its progress (a tqdm bar, a log line every 5%, or
nothing; new findings printed past the bar) and Ctrl-C / SIGTERM (finish the step, save a
checkpoint; a second one aborts)."""

from __future__ import annotations

import math
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

from vaediag.columns import KL, RECON
from vaediag.monitor import Monitor


class StopFlag:
    """First SIGINT/SIGTERM asks the loop to stop after the current step; a second one aborts."""

    def __init__(self) -> None:
        self.signal: int | None = None

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        def handler(signum: int, frame: Any) -> None:
            if self.signal is not None:
                raise KeyboardInterrupt
            self.signal = signum
            print(f"\nvaediag: {signal.Signals(signum).name} received: finishing this step and "
                  f"saving a checkpoint (again to abort)", file=sys.stderr)

        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for s in previous:
                signal.signal(s, handler)
        except ValueError:  # not the main thread: no signal handling
            previous = {}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)



class Progress:
    """A tqdm bar, or a log line every 5% with steps/s, or nothing; new findings of the online
    analysis printed past the bar."""

    def __init__(self, monitor: Monitor, start: int, total_steps: int, steps_per_epoch: int,
                 progress: bool | None, quiet: bool):
        self.monitor, self.start, self.total = monitor, start, total_steps
        self.steps_per_epoch, self.quiet = steps_per_epoch, quiet
        self.use_bar = not quiet and (sys.stderr.isatty() if progress is None else progress)
        self.bar = tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True,
                        disable=not self.use_bar, file=sys.stderr, desc="training")
        self.log_every = max(1, total_steps // 20)
        monitor.echo = (lambda text: None) if quiet else \
            (lambda text: tqdm.write(f"vaediag: {text}", file=sys.stderr)) if self.use_bar \
            else (lambda text: print(f"vaediag: {text}", file=sys.stderr, flush=True))
        self.started_at = monitor.elapsed()  # steps/s of this session (a resume's clock goes on)

    def __enter__(self) -> Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def after(self, step: int) -> None:
        row = {RECON: math.nan, KL: math.nan, **self.monitor.last_read_row}
        if self.use_bar:
            self.bar.set_postfix_str(f"recon {row[RECON]:.4g}  KL {row[KL]:.4g}",
                                     refresh=False)
            self.bar.update(1)
        elif not self.quiet and (step % self.log_every == 0 or step == self.total):
            elapsed = self.monitor.elapsed()
            rate = (step - self.start) / max(elapsed - self.started_at, 1e-9)
            print(f"step {step:,}/{self.total:,}  epoch {step / self.steps_per_epoch:.2f}  "
                  f"recon {row[RECON]:.4g}  KL {row[KL]:.4g}  ({elapsed:.0f} s, "
                  f"{rate:.1f} steps/s)", file=sys.stderr, flush=True)
