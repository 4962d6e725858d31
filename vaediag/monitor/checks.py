"""What a user's loop hands the Monitor, checked where it enters.

Every check raises :class:`~vaediag.errors.UserError` with one line that names the argument,
what it got and what to do, in Python's words (``recon=``, ``overwrite=True``): a per-image loss
passed where the batch's loss belongs would otherwise be recorded as three wrong columns.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vaediag.errors import UserError, first_line

_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def _kind(value: Any) -> str:
    """'a tensor of shape (16,)', 'a str', ... for messages."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    return f"a {type(value).__name__} ({value!r:.40})"


def step(value: Any, name: str = "step") -> int:
    """A step number: a non-negative int (numpy's too, not a bool or a float)."""
    if type(value) is int and value >= 0:  # the usual case, without the slower checks
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise UserError(f"{name} must be a non-negative int (optimizer updates made before this "
                        f"batch), got {_kind(value)}")
    return int(value)


def increasing(at: int, last: int) -> None:
    """A step after ``last``: steps count optimizer updates over the whole run, so they only
    grow (a batch index that restarts every epoch would record the same steps again)."""
    if at <= last:
        raise UserError(f"step {at} comes after step {last}: a step must grow with every call "
                        f"of after_backward; pass a global step (the optimizer updates made so "
                        f"far, counted across epochs), not the batch's index within its epoch")


def _plain(value: Any) -> bool:
    """A 0-d float tensor: a loss term as it usually comes."""
    return type(value) is torch.Tensor and value.dtype in _FLOATS and value.dim() == 0


def scalar(name: str, value: Any) -> torch.Tensor | float:
    """One number: a float, an int, a numpy scalar, or a tensor holding one value (it stays a
    tensor, so it is read from the device together with the step's other values)."""
    if _plain(value):
        return value  # the usual case, a 0-d float tensor, without the slower checks
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise UserError(f"{name}= must be one number, the batch's loss, got {_kind(value)}: "
                            f"reduce it (e.g. {name}.mean() or {name}.sum()) before passing it")
        if value.is_complex() or value.dtype == torch.bool:
            raise UserError(f"{name}= must be a real number, got {_kind(value)}")
        return value.reshape(())
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise UserError(f"{name}= must be one number, the batch's loss, got {_kind(value)}: "
                            f"reduce it before passing it")
        value = value.reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{name}= must be a number or a one-element tensor, got {_kind(value)}")
    return float(value)


def optional_scalar(name: str, value: Any) -> torch.Tensor | float | None:
    return None if value is None else scalar(name, value)


def number(name: str, value: Any) -> float | int | None:
    """An optional plain number (``beta``, ``epoch``), read now; an int stays an int."""
    if value is None or type(value) is float:
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    out = scalar(name, value)
    return float(out) if isinstance(out, torch.Tensor) else out


def latents(mu: Any, logvar: Any, latent_dim: int | None) -> tuple[torch.Tensor | None,
                                                                   torch.Tensor | None]:
    """The batch's posterior parameters: both or neither, tensors of one shape (B, D), with D
    the model's latent size when it is known."""
    if mu is None and logvar is None:
        return None, None
    if (type(mu) is torch.Tensor and type(logvar) is torch.Tensor and mu.dim() == 2
            and mu.dtype in _FLOATS and logvar.dtype in _FLOATS and mu.shape == logvar.shape
            and (latent_dim is None or mu.shape[1] == latent_dim)):
        return mu, logvar  # the usual case, without the slower checks
    for name, value in (("mu", mu), ("logvar", logvar)):
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{name}= must be a tensor (batch, latent dimensions) or None, got "
                            f"{_kind(value)}; pass mu= and logvar= together")
        if value.dim() != 2 or value.is_complex() or not value.is_floating_point():
            raise UserError(f"{name}= must be a float tensor shaped (batch, latent dimensions), "
                            f"got {_kind(value)}")
    if mu.shape != logvar.shape:
        raise UserError(f"mu= and logvar= must have one shape, got {tuple(mu.shape)} and "
                        f"{tuple(logvar.shape)}")
    if latent_dim is not None and mu.shape[1] != latent_dim:
        raise UserError(f"mu= has {mu.shape[1]} latent dimensions, but encode() gave "
                        f"{latent_dim} for eval_images")
    return mu, logvar


def extra(values: Any) -> dict[str, torch.Tensor | float]:
    """Columns of the user's own: {name: one number}."""
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(k, str) and k for k in values):
        raise UserError(f"extra= must be a dict of column name -> number, got {_kind(values)}")
    return {k: scalar(f"extra[{k!r}]", v) for k, v in values.items()}


@dataclass
class StepInputs:
    """What ``Monitor.after_backward`` was given, each checked."""

    step: int
    recon: torch.Tensor | float
    kl: torch.Tensor | float
    total: torch.Tensor | float | None
    beta: float | None
    epoch: float | None
    mu: torch.Tensor | None
    logvar: torch.Tensor | None
    kl_term: torch.Tensor | float | None
    extra: dict[str, torch.Tensor | float]

    @classmethod
    def checked(cls, at: Any, *, recon: Any, kl: Any, total: Any, beta: Any, epoch: Any,
                mu: Any, logvar: Any, kl_term: Any, columns: Any,
                latent_dim: int | None) -> StepInputs:
        """Check each argument in turn; the first wrong one raises."""
        if (type(at) is int and at >= 0 and _plain(recon) and _plain(kl)
                and (total is None or _plain(total)) and (kl_term is None or _plain(kl_term))
                and (beta is None or type(beta) is float)
                and (epoch is None or type(epoch) is int) and columns is None):
            mu, logvar = latents(mu, logvar, latent_dim)  # the usual call, checked at once
            return cls(at, recon, kl, total, beta, epoch, mu, logvar, kl_term, {})
        step_ = step(at)
        recon, kl = scalar("recon", recon), scalar("kl", kl)
        total, kl_term = optional_scalar("total", total), optional_scalar("kl_term", kl_term)
        beta, epoch = number("beta", beta), number("epoch", epoch)
        mu, logvar = latents(mu, logvar, latent_dim)
        return cls(step_, recon, kl, total, beta, epoch, mu, logvar, kl_term, extra(columns))


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise UserError(f"{name}= must be True or False, got {_kind(value)}")
    return bool(value)


def try_model(encode: Any, decode: Any, x: torch.Tensor) -> int:
    """Encode two of ``eval_images`` and decode their means, as the evaluations will: the
    latent size; or one line saying which call failed on images of which shape."""
    shape = tuple(x.shape[1:])
    try:
        out = encode(x)
    except Exception as exc:  # noqa: BLE001 - the user's model: any error is bad input
        raise UserError(f"eval_images of shape (N, {', '.join(map(str, shape))}) do not fit the "
                        f"model: encode(x) failed: {first_line(exc, 160)}") from None
    if not (isinstance(out, (tuple, list)) and len(out) == 2
            and all(isinstance(t, torch.Tensor) for t in out)):
        raise UserError(f"encode(x) must return (mu, logvar), two tensors; got {_kind(out)}")
    mu, logvar = out
    if mu.dim() != 2 or mu.shape != logvar.shape or len(mu) != len(x):
        raise UserError(f"encode(x) must return mu and logvar shaped (batch, latent "
                        f"dimensions); for {len(x)} images it gave {tuple(mu.shape)} and "
                        f"{tuple(logvar.shape)}")
    try:
        images = decode(mu)
    except Exception as exc:  # noqa: BLE001 - the user's model: any error is bad input
        raise UserError(f"decode(z) failed on z of shape {tuple(mu.shape)} from encode(x): "
                        f"{first_line(exc, 160)}") from None
    if not isinstance(images, torch.Tensor) or tuple(images.shape) != tuple(x.shape):
        got = _kind(images)
        raise UserError(f"decode(z) must give images shaped like eval_images "
                        f"{tuple(x.shape)}, got {got}")
    return int(mu.shape[1])


def same_images(name: str, images: torch.Tensor | None, like: torch.Tensor) -> None:
    """``images`` (train_images, metric_images) are shaped like eval_images, image for image."""
    if images is not None and tuple(images.shape[1:]) != tuple(like.shape[1:]):
        raise UserError(f"{name} are shaped {tuple(images.shape)}, but eval_images "
                        f"{tuple(like.shape)}: the model sees both, so each image must have the "
                        f"shape (3, {like.shape[2]}, {like.shape[3]})")
