"""The Monitor's arguments beyond the run, the model and its optimizer, in one object, with
the settings every rank needs checked in one place (:meth:`Options.checked`); the images and
functions are checked where they are first used (:class:`~vaediag.monitor.evaluation.Evaluator`,
the probes' set-up)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vaediag.errors import UserError
from vaediag.monitor import checks
from vaediag.monitor.evaluation import DecodeFn, EncodeFn, EvalLossFn
from vaediag.monitor.online import STOP_ON
from vaediag.probes.base import Probe

Images = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class Options:
    """What :class:`vaediag.Monitor` was given (its docstring says what each is)."""

    eval_images: Images
    encode: EncodeFn | None
    decode: DecodeFn | None
    eval_loss: EvalLossFn | None
    eval_every: int
    value_range: tuple[float, float]
    probes: str | Sequence[Probe]
    extra_probes: Sequence[Probe]
    metric_images: Images | None
    train_images: Images | None
    train_factors: dict[str, np.ndarray] | None
    lpips_weights: str | None
    lpips_download: bool
    recon_mode: str
    seed: int
    steps_per_epoch: int | None
    eval_factors: dict[str, np.ndarray] | None
    config: dict[str, Any] | None
    overwrite: bool
    online: bool
    stop_on: str
    read_before_step: bool
    scaler: Any = None

    @classmethod
    def checked(cls, **given: Any) -> Options:
        """The options, with the evaluation cadence, the online analysis, what it stops on
        and the read mode checked (a wrong one is a :class:`~vaediag.errors.UserError`)."""
        eval_every = given["eval_every"]
        if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
            raise UserError(f"eval_every must be an int >= 1, got {eval_every!r}")
        online = checks.flag("online", given["online"])
        stop_on = given["stop_on"]
        if stop_on not in STOP_ON:
            raise UserError(f"stop_on must be one of {', '.join(map(repr, STOP_ON))}, got "
                            f"{stop_on!r}")
        if stop_on != "never" and not online:
            raise UserError(f"stop_on={stop_on!r} needs online=True (the online analysis "
                            f"finds what to stop on)")
        read_before_step = checks.flag("read_before_step", given["read_before_step"])
        return cls(**{**given, "online": online, "read_before_step": read_before_step})
