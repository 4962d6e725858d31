"""The convolutional VAE: a stride-2 conv encoder, a mirrored transposed-conv decoder.

Parameter names are stable and readable because per-layer statistics are keyed by them:
``encoder.blocks.0.conv.weight``, ``encoder.fc.weight``, ``decoder.fc.weight``,
``decoder.blocks.0.conv.weight``, ``decoder.out.weight`` and, with a learned decoder scale,
``decoder.log_scale``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from vaediag.config import Config

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2), "silu": nn.SiLU}


def _norm(kind: str, width: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(width)
    if kind == "group":
        return nn.GroupNorm(groups, width)
    return nn.Identity()


class ConvBlock(nn.Module):
    """conv -> norm -> activation; stride 2 down (encoder) or up (decoder)."""

    def __init__(self, c_in: int, c_out: int, *, up: bool, norm: str, groups: int, act: str):
        super().__init__()
        conv = nn.ConvTranspose2d if up else nn.Conv2d
        self.conv = conv(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=norm == "none")
        self.norm = _norm(norm, c_out, groups)
        self.act = _ACTIVATIONS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class Encoder(nn.Module):
    def __init__(self, resolution: int, channels: tuple[int, ...], latent_dim: int,
                 norm: str, groups: int, act: str):
        super().__init__()
        widths = (3, *channels)
        self.blocks = nn.Sequential(*(
            ConvBlock(widths[i], widths[i + 1], up=False, norm=norm, groups=groups, act=act)
            for i in range(len(channels))
        ))
        side = resolution // 2 ** len(channels)
        self.fc = nn.Linear(channels[-1] * side * side, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.blocks(x * 2.0 - 1.0).flatten(1)  # inputs in [0, 1], centred for the convs
        mu, logvar = self.fc(h).chunk(2, dim=1)
        return mu, logvar


class Decoder(nn.Module):
    def __init__(self, resolution: int, channels: tuple[int, ...], latent_dim: int,
                 norm: str, groups: int, act: str, log_scale: float | None, learn_scale: bool):
        super().__init__()
        self.side = resolution // 2 ** len(channels)
        self.top = channels[-1]
        self.fc = nn.Linear(latent_dim, self.top * self.side * self.side)
        widths = tuple(reversed(channels))
        self.blocks = nn.Sequential(*(
            ConvBlock(widths[i], widths[i + 1], up=True, norm=norm, groups=groups, act=act)
            for i in range(len(channels) - 1)
        ))
        # The last upsampling maps straight to RGB logits (as DCGAN's generator does): a hidden
        # block at full resolution would triple the step time on a CPU for little gain.
        self.out = nn.ConvTranspose2d(channels[0], 3, kernel_size=4, stride=2, padding=1)
        self.act = _ACTIVATIONS[act]()
        if log_scale is None:
            self.log_scale = None
        elif learn_scale:
            self.log_scale = nn.Parameter(torch.tensor(log_scale))
        else:
            self.register_buffer("log_scale", torch.tensor(log_scale))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder logits; the image is their sigmoid."""
        h = self.act(self.fc(z)).view(-1, self.top, self.side, self.side)
        return self.out(self.blocks(h))


class VAEOutput(NamedTuple):
    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor
    logits: torch.Tensor


class ConvVAE(nn.Module):
    """A Gaussian-latent VAE for square RGB images in [0, 1]."""

    def __init__(
        self,
        resolution: int = 64,
        channels: tuple[int, ...] = (32, 64, 128, 256),
        latent_dim: int = 32,
        *,
        norm: str = "none",
        groups: int = 8,
        activation: str = "relu",
        decoder_scale: float | None = None,
        learn_decoder_scale: bool = False,
        logvar_clamp: tuple[float, float] | None = None,
    ):
        super().__init__()
        self.latent_dim = latent_dim
        self.resolution = resolution
        self.logvar_clamp = logvar_clamp
        self.encoder = Encoder(resolution, channels, latent_dim, norm, groups, activation)
        log_scale = None if decoder_scale is None else math.log(decoder_scale)
        self.decoder = Decoder(resolution, channels, latent_dim, norm, groups, activation,
                               log_scale, learn_decoder_scale)

    @classmethod
    def from_config(cls, config: Config) -> ConvVAE:
        m, loss = config.model, config.loss
        return cls(
            config.data.resolution, m.channels, m.latent_dim, norm=m.norm,
            groups=m.group_norm_groups, activation=m.activation,
            decoder_scale=loss.decoder_scale if loss.recon == "gaussian" else None,
            learn_decoder_scale=loss.learn_decoder_scale,
            logvar_clamp=(loss.logvar_clamp[0], loss.logvar_clamp[1]) if loss.logvar_clamp
            else None,
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x) as (mu, logvar), with the configured log-variance clamp applied."""
        mu, logvar = self.encoder(x)
        if self.logvar_clamp is not None:
            logvar = logvar.clamp(*self.logvar_clamp)
        return mu, logvar

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoded image in [0, 1]."""
        return torch.sigmoid(self.decoder(z))

    @property
    def log_scale(self) -> torch.Tensor | None:
        """Log of the Gaussian decoder's scale (``None`` for BCE and MSE losses)."""
        return self.decoder.log_scale

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> VAEOutput:
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + eps * torch.exp(0.5 * logvar)
        return VAEOutput(mu, logvar, z, self.decode_logits(z))
