"""Evaluating the model on the grid's fixed inputs: the 8 validation images, decode(0), decode of
8 fixed z, a larger fixed set for the set-level metrics, and 8 fixed *training* images scored
exactly like the grid's (held-out against training images: memorisation shows as the two
parting).

:class:`Evaluator` owns those inputs (made at the start of a run and saved in ``fixed.npz``, or
read back from it when the run is resumed), maps images between the model's ``value_range`` and
[0, 1], runs the model on them, and draws the annotated grid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vaediag import grid
from vaediag.errors import UserError
from vaediag.monitor import captions
from vaediag.probes.context import EvalContext, ImageSet

EncodeFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
DecodeFn = Callable[[torch.Tensor], torch.Tensor]
#: (x, z, mu, logvar) -> (per-image reconstruction loss, per-image KL), each of shape (B,)
EvalLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                      tuple[torch.Tensor, torch.Tensor]]
#: (what, step, message, fields): says something about the user's input once per run
WarnFn = Callable[..., None]

GRID_IMAGES = grid.COLS
_SET_CHUNK = 64


def as_images(images: torch.Tensor | np.ndarray, what: str, minimum: int,
              value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """The images as float tensors in ``value_range`` (uint8 0..255 is mapped onto it)."""
    x = torch.as_tensor(images)
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[0] < minimum:
        raise UserError(f"{what} must be a batch of at least {minimum} RGB images shaped "
                        f"(N, 3, H, W), got {tuple(x.shape)}")
    lo, hi = value_range
    x = x.float() / 255.0 * (hi - lo) + lo if x.dtype == torch.uint8 else x.float()
    if not torch.isfinite(x).all() or x.min() < lo or x.max() > hi:
        hint = "; for images in [-1, 1] pass value_range=(-1, 1)" if (lo, hi) == (0.0, 1.0) \
            and torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1 else ""
        raise UserError(f"{what} must lie in [{lo:g}, {hi:g}] (value_range), or be uint8 0..255; "
                        f"got values in [{float(x.min()):.3g}, {float(x.max()):.3g}]{hint}")
    return x


def check_value_range(value_range: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise UserError(f"value_range must be (low, high), got {value_range!r}") from None
    if not hi > lo:
        raise UserError(f"value_range must have low < high, got {value_range!r}")
    return lo, hi


@dataclass
class Evaluation:
    """What one evaluation's forward passes gave: the probes' context, the grid's tiles and the
    per-image losses (None without an eval loss function)."""

    context: EvalContext
    tiles: np.ndarray  # (4, 8, 3, H, W) uint8
    per_image: tuple[torch.Tensor, torch.Tensor] | None
    #: the same for the fixed training images (None without them or without an eval loss)
    train_per_image: tuple[torch.Tensor, torch.Tensor] | None = None


class Evaluator:
    """The grid's fixed inputs and the model's outputs on them."""

    def __init__(self, model: torch.nn.Module, encode: EncodeFn, decode: DecodeFn, *,
                 eval_images: torch.Tensor | np.ndarray,
                 eval_loss: EvalLossFn | None, value_range: tuple[float, float],
                 recon_mode: str, metric_images: torch.Tensor | np.ndarray | None,
                 factors: dict[str, np.ndarray] | None, warn: WarnFn,
                 train_images: torch.Tensor | np.ndarray | None = None,
                 train_factors: dict[str, np.ndarray] | None = None):
        if recon_mode not in ("mean", "sample"):
            raise UserError(f"recon_mode must be 'mean' or 'sample', got {recon_mode!r}")
        self.model = model
        self.encode = encode
        self.decode = decode
        self.eval_loss = eval_loss
        self.value_range = check_value_range(value_range)
        self.recon_mode = recon_mode
        self.device = next(iter(model.parameters())).device
        self.x = as_images(eval_images, "eval_images", GRID_IMAGES,
                           self.value_range)[:GRID_IMAGES].to(self.device)
        self.set_x = None if metric_images is None else \
            as_images(metric_images, "metric_images", 2, self.value_range)
        self.factors = {k: np.asarray(v)[:GRID_IMAGES] for k, v in (factors or {}).items()}
        self.train_x = None if train_images is None else \
            as_images(train_images, "train_images", 2,
                      self.value_range)[:GRID_IMAGES].to(self.device)
        self.train_factors = {k: np.asarray(v)[:GRID_IMAGES]
                              for k, v in (train_factors or {}).items()}
        if self.train_x is not None and self.train_factors and \
                any(len(v) != len(self.train_x) for v in self.train_factors.values()):
            raise UserError(f"train_factors must describe each of the {len(self.train_x)} "
                            f"train_images")
        self._warn = warn
        self._given_uint8 = torch.as_tensor(eval_images).dtype == torch.uint8
        self.fixed_z: torch.Tensor | None = None
        self.recon_noise: torch.Tensor | None = None

    def check_range_fits(self) -> None:
        """Float images that use only the upper half of a range reaching below 0 (images in
        [0, 1] declared as [-1, 1]) would be drawn and scored at half their contrast: said
        once, naming the range they are in."""
        lo, hi = self.value_range
        if self._given_uint8 or lo >= 0:
            return
        data_lo, data_hi = float(self.x.min()), float(self.x.max())
        if data_lo >= 0 > lo:
            self._warn("value_range", 0, f"value_range=({lo:g}, {hi:g}) but the images lie in "
                       f"[{data_lo:.3g}, {data_hi:.3g}], none below 0: they look like images "
                       f"in [0, 1], which this range would draw and score at half their "
                       f"contrast; leave value_range at (0, 1) for them (and end the decoder "
                       f"in a sigmoid), or give the images in [{lo:g}, {hi:g}]")

    def make_fixed(self, seed: int, latent: int) -> dict[str, np.ndarray]:
        """Draw the fixed z (of size ``latent``) and the reconstruction noise of a new run;
        returns every fixed array, for ``fixed.npz``."""
        g = torch.Generator().manual_seed(seed + 20_231)
        self.fixed_z = torch.randn(GRID_IMAGES, latent, generator=g).to(self.device)
        self.recon_noise = torch.randn(GRID_IMAGES, latent, generator=g).to(self.device)
        fixed = {"eval_images": self._uint8(self.x),
                 "fixed_z": self.fixed_z.cpu().numpy(),
                 "recon_noise": self.recon_noise.cpu().numpy(),
                 **{f"factor_{k}": v for k, v in self.factors.items()}}
        if self.train_x is not None:
            fixed["train_images"] = self._uint8(self.train_x)
            fixed.update({f"train_factor_{k}": v for k, v in self.train_factors.items()})
        return fixed

    def _uint8(self, x: torch.Tensor) -> np.ndarray:
        return (self.to_unit(x).cpu().numpy() * 255).round().astype(np.uint8)

    def load_fixed(self, fixed: dict[str, np.ndarray]) -> None:
        """The fixed z and noise a resumed run was started with."""
        self.fixed_z = torch.from_numpy(fixed["fixed_z"]).to(self.device)
        self.recon_noise = torch.from_numpy(fixed["recon_noise"]).to(self.device)

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Images from ``value_range`` onto [0, 1]."""
        lo, hi = self.value_range
        return x if (lo, hi) == (0.0, 1.0) else (x - lo) / (hi - lo)

    @contextmanager
    def eval_mode(self) -> Iterator[None]:
        """The model in eval mode (batch norm's running statistics kept), then as it was."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def encode_set(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, recon, mu, logvar) of the larger fixed set, on the CPU, in chunks."""
        xs, recons, mus, logvars = [], [], [], []
        lo, hi = self.value_range
        assert self.set_x is not None  # offered only when there is a set
        for start in range(0, len(self.set_x), _SET_CHUNK):
            x = self.set_x[start:start + _SET_CHUNK].to(self.device)
            mu, logvar = self.encode(x)
            xs.append(self.to_unit(x).cpu())
            recons.append(self.to_unit(self.decode(mu).clamp(lo, hi)).cpu())
            mus.append(mu.cpu())
            logvars.append(logvar.cpu())
        return torch.cat(xs), torch.cat(recons), torch.cat(mus), torch.cat(logvars)

    @torch.no_grad()
    def run(self, step: int, lpips: Any) -> Evaluation:
        """The model as it is now (after ``step`` updates) on the fixed inputs, in eval mode."""
        fixed_z = self._drawn(self.fixed_z)
        with self.eval_mode():
            heldout, per_image = self._score(self.x, self.factors, step)
            zero_img = self._decoded(self.decode(torch.zeros_like(fixed_z[:1])), step)
            fixed_img = self._decoded(self.decode(fixed_z), step)
            train, train_per_image = (None, None) if self.train_x is None else \
                self._score(self.train_x, self.train_factors, step)
            context = EvalContext(step, heldout.x, heldout.recon, zero_img, fixed_img,
                                  heldout.mu, heldout.logvar, heldout.factors, lpips,
                                  self.encode_set if self.set_x is not None else None,
                                  train=train, eval_loss=self.eval_loss, inputs=self.x)
        tiles = torch.stack([heldout.x, heldout.recon, zero_img.expand(GRID_IMAGES, -1, -1, -1),
                             fixed_img]).clamp(0, 1)
        return Evaluation(context, (tiles * 255).round().to(torch.uint8).cpu().numpy(),
                          per_image, train_per_image)

    @staticmethod
    def _drawn(fixed: torch.Tensor | None) -> torch.Tensor:
        """A fixed tensor of the run, drawn by :meth:`make_fixed` or :meth:`load_fixed`."""
        if fixed is None:
            raise RuntimeError("the fixed z and noise are drawn (make_fixed or load_fixed) "
                               "before the first evaluation")
        return fixed

    def _score(self, x: torch.Tensor, factors: dict[str, np.ndarray], step: int
               ) -> tuple[ImageSet, tuple[torch.Tensor, torch.Tensor] | None]:
        """One fixed set under the model as it is: its reconstructions (posterior mean, or the
        fixed noise's sample) and per-image losses."""
        mu, logvar = self.encode(x)
        z = mu if self.recon_mode == "mean" else \
            mu + self._drawn(self.recon_noise)[:len(x)] * torch.exp(0.5 * logvar)
        recon = self._decoded(self.decode(z), step)
        per_image = self.eval_loss(x, z, mu, logvar) if self.eval_loss else None
        return ImageSet(self.to_unit(x), recon, mu, logvar, factors or None, x), per_image

    def grid_png(self, tiles: np.ndarray, row: dict[str, Any]) -> bytes:
        """The annotated 4x8 grid of an evaluation, as PNG bytes."""
        return grid.to_png(grid.render(tiles, captions.header(row),
                                       captions.row_labels(self.recon_mode),
                                       captions.image_captions(row)))

    def _range_advice(self, low: float, high: float) -> str:
        """Which one is off, the decoder or the declared range: the images' own range
        decides (they lie in ``value_range``, checked when given), never the decoder's."""
        lo, hi = self.value_range
        data_lo, data_hi = float(self.x.min()), float(self.x.max())
        if lo >= 0 and low >= -1.001 and high <= 1.001:
            return (f"the images are in [{lo:g}, {hi:g}] and the decoder's output reaches "
                    f"{low:.3g}, as a tanh does: end the decoder in a sigmoid (or map its "
                    f"output with (y + 1) / 2) for images in [0, 1]; value_range=(-1, 1) is "
                    f"for images in [-1, 1], and these lie in [{data_lo:.3g}, {data_hi:.3g}]")
        bound = "a sigmoid" if (lo, hi) == (0.0, 1.0) else \
            "a tanh" if (lo, hi) == (-1.0, 1.0) else "a bounded activation"
        return (f"bound the decoder's output to [{lo:g}, {hi:g}], the images' range ({bound} "
                f"as its last layer)")

    def _decoded(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """Decoder output mapped onto [0, 1]; values outside ``value_range`` are clamped, and
        said once."""
        lo, hi = self.value_range
        tolerance = 1e-3 * (hi - lo)
        outside = (images < lo - tolerance) | (images > hi + tolerance)
        if bool(outside.any()):
            share = float(outside.float().mean())
            low, high = float(images.min()), float(images.max())
            self._warn("decoder_range", step, f"the decoder's output leaves value_range "
                       f"[{lo:g}, {hi:g}] (values in [{low:.3g}, {high:.3g}], {share:.1%} of "
                       f"pixels at step {step}); they are clamped for the grid and the "
                       f"metrics: {self._range_advice(low, high)}", share=share)
        return self.to_unit(images.clamp(lo, hi))
