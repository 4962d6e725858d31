"""Two VAEs that are not vaediag's, trained by plain loops of their own with the Monitor attached:
the detector benchmark's "users with their own code". Faults are planted in the loop's own code,
as a bug or a bad setting would be, and recorded as ``inject`` events (the ground truth).

- ``foreign``: the layout of a widely copied PyTorch VAE: stride-2 convs with batch norm and
  LeakyReLU, a 128-dimensional latent, a tanh decoder on images scaled to [-1, 1], the
  mean-reduced ``F.mse_loss`` and a KL weight of batch size / data set size (about 2.5e-4), so
  most latent dimensions stay unused.
- ``tfcvae``: the TensorFlow CVAE tutorial's model: two stride-2 convs with ReLU, a dense
  layer to (mu, logvar), a transposed-conv decoder to logits, the summed BCE and the
  single-sample Monte Carlo KL (log q(z|x) - log p(z)), Adam at 1e-4 by default.

``--precision bf16|fp16`` trains as PyTorch's mixed-precision recipe does: the forward pass and
the loss under ``torch.autocast`` (on a CPU, autocast computes exp, pow and sum in the half
type; on CUDA in float32), and for float16 a ``torch.amp.GradScaler`` given to the Monitor.
Two faults are half precision's own: ``logvar_jump`` (a weight edit that lifts the encoder's
log-variance by ``shift``, so exp(logvar) passes float16's 65,504) and ``half_weights`` (the
weights and the optimizer's state moved to bfloat16, as loading a checkpoint into a model
``.to(torch.bfloat16)`` does).

    python benchmarks/own_loops.py foreign --out runs/foreign --lr 1e-3 --fault lr_spike@700
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import vaediag
from vaediag.data import toyfaces

LOG_2PI = math.log(2 * math.pi)

#: fault kind -> its parameters as planted in the loops below (the same kinds as ``--inject``)
FAULTS = {
    "lr_spike": {"factor": 30.0, "steps": 10},
    "grad_scale": {"factor": 1000.0, "steps": 3},
    "ood_batch": {"steps": 30},
    "nan_grad": {},
    "inf_weight": {},
    "beta_scale": {"factor": 0.02},
    "adam_eps": {"eps": 1.0, "steps": 600},
    "desaturate": {"amount": 0.6, "steps": 1},
    "fade": {"amount": 0.8, "steps": 400},
    "logvar_jump": {"shift": 12.0},
    "half_weights": {},
}
#: ``--precision``: the autocast dtype (None: float32, no autocast)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _block(c_in: int, c_out: int, up: bool) -> nn.Sequential:
    conv = (nn.ConvTranspose2d(c_in, c_out, 3, 2, 1, output_padding=1) if up
            else nn.Conv2d(c_in, c_out, 3, 2, 1))
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.LeakyReLU())


class ForeignVAE(nn.Module):
    """Conv + BatchNorm + LeakyReLU, latent 128, tanh output in [-1, 1]."""

    value_range = (-1.0, 1.0)

    def __init__(self, resolution: int = 32, hidden=(32, 64, 128), latent: int = 128):
        super().__init__()
        self.side = resolution // 2 ** len(hidden)
        self.top = hidden[-1]
        widths = (3, *hidden)
        self.encoder = nn.Sequential(*(_block(widths[i], widths[i + 1], False)
                                       for i in range(len(hidden))))
        flat = hidden[-1] * self.side * self.side
        self.fc_mu = nn.Linear(flat, latent)
        self.fc_var = nn.Linear(flat, latent)
        self.decoder_input = nn.Linear(latent, flat)
        back = tuple(reversed(hidden))
        self.decoder = nn.Sequential(*(_block(back[i], back[i + 1], True)
                                       for i in range(len(back) - 1)))
        self.final_layer = nn.Sequential(_block(back[-1], back[-1], True),
                                         nn.Conv2d(back[-1], 3, 3, padding=1), nn.Tanh())
        self.rgb = self.final_layer[1]  # the layer that makes the colours

    def logvar_bias(self) -> torch.Tensor:
        """The bias of the encoder's log-variance head."""
        return self.fc_var.bias

    def encode(self, x):
        h = self.encoder(x).flatten(1)
        return self.fc_mu(h), self.fc_var(h)

    def decode(self, z):
        h = self.decoder_input(z).view(-1, self.top, self.side, self.side)
        return self.final_layer(self.decoder(h))

    def losses(self, x, z, mu, logvar, per_image: bool = False):
        recon = self.decode(z)
        rec = F.mse_loss(recon, x, reduction="none").flatten(1).mean(1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
        return (rec, kl) if per_image else (rec.mean(), kl.mean())


class TFCVAE(nn.Module):
    """The TensorFlow CVAE tutorial's model: summed BCE on logits, single-sample MC KL."""

    value_range = (0.0, 1.0)

    def __init__(self, resolution: int = 32, latent: int = 16):
        super().__init__()
        self.side = resolution // 4
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * self.side * self.side, 2 * latent))
        self.dense = nn.Linear(latent, 32 * self.side * self.side)
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(32, 64, 3, 2, 1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 3, 2, 1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, 3, 3, 1, 1))
        self.rgb = self.deconv[4]

    def logvar_bias(self) -> torch.Tensor:
        """The bias of the encoder's log-variance half (its dense layer's second half)."""
        return self.encoder[-1].bias[self.encoder[-1].out_features // 2:]

    def encode(self, x):
        return self.encoder(x).chunk(2, dim=1)

    def logits(self, z):
        return self.deconv(F.relu(self.dense(z)).view(-1, 32, self.side, self.side))

    def decode(self, z):
        return torch.sigmoid(self.logits(z))

    def losses(self, x, z, mu, logvar, per_image: bool = False):
        rec = F.binary_cross_entropy_with_logits(self.logits(z), x,
                                                 reduction="none").flatten(1).sum(1)
        log_q = -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(1)
        log_p = -0.5 * (z.pow(2) + LOG_2PI).sum(1)
        kl = log_q - log_p
        if per_image:  # the grid's images: the analytic KL, as vaediag's trainer reports it
            kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
        return (rec, kl) if per_image else (rec.mean(), kl.mean())


STYLES = {"foreign": (ForeignVAE, 2.5e-4), "tfcvae": (TFCVAE, 1.0)}
#: each style as its authors publish it (``--published``): the widely copied VAE's CelebA
#: configuration (64 px, five conv blocks 32-512, batch 64, Adam at 5e-3); the TensorFlow
#: tutorial's (a 2-dimensional latent, batch 32, Adam at 1e-4) on 32 px toyfaces
PUBLISHED = {
    "foreign": {"resolution": 64, "batch": 64, "lr": 5e-3,
                "model": {"hidden": (32, 64, 128, 256, 512)}},
    "tfcvae": {"resolution": 32, "batch": 32, "lr": 1e-4, "model": {"latent": 2}},
}


def desaturate(layer: nn.Module, amount: float) -> None:
    """Pull the colour-making layer's output channels toward their mean (a weight edit)."""
    axis = 1 if isinstance(layer, nn.ConvTranspose2d) else 0
    with torch.no_grad():
        for param, ax in ((layer.weight, axis), (layer.bias, 0)):
            param.mul_(1 - amount).add_(amount * param.mean(ax, keepdim=True))


def parse_fault(spec: str | None) -> tuple[str, int, dict] | None:
    if not spec:
        return None
    kind, _, at = spec.partition("@")
    step_text, _, tail = at.partition(":")
    params = dict(FAULTS[kind])
    for item in filter(None, tail.split(",")):
        key, _, value = item.partition("=")
        params[key] = type(params[key])(value) if key in params else value
    return kind, int(step_text), params


def train(style: str, out: Path, *, seed: int = 0, lr: float = 1e-3, steps: int = 1200,
          eval_every: int = 50, resolution: int = 32, batch: int = 32, fault: str | None = None,
          layer: str | None = None, model_args: dict | None = None,
          precision: str = "fp32") -> Path:
    """Train one run with the Monitor attached; plant ``fault`` (``KIND@STEP[:k=v]``)."""
    torch.manual_seed(seed)
    cls, beta0 = STYLES[style]
    model = cls(resolution, **(model_args or {}))
    lo, hi = model.value_range
    train_u8, train_factors = toyfaces.generate(2048, resolution, seed=seed)
    val_u8, val_factors = toyfaces.generate(64, resolution, seed=seed, stream=1)
    scale = lambda a: torch.from_numpy(a).float() / 255 * (hi - lo) + lo  # noqa: E731
    images, val = scale(train_u8), scale(val_u8)
    eps = 1e-8
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, eps=eps)
    planted = parse_fault(fault)
    kind, at, params = planted if planted else ("", -1, {})
    layer = layer or ("decoder_input" if style == "foreign" else "dense")
    half = PRECISIONS[precision]
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None

    def autocast():
        return torch.autocast("cpu", dtype=half or torch.bfloat16, enabled=half is not None)

    def weights() -> torch.dtype:  # float32, or bfloat16 once ``half_weights`` moved them
        return next(model.parameters()).dtype

    # the Monitor's evaluation hands float32 tensors: cast to the weights' dtype and back
    def encode(x):
        return tuple(t.float() for t in model.encode(x.to(weights())))

    def decode(z):
        return model.decode(z.to(weights())).float()

    def eval_loss(x, z, mu, logvar):
        rec, kl = model.losses(*(t.to(weights()) for t in (x, z, mu, logvar)), per_image=True)
        return rec.float(), kl.float()

    mon = vaediag.Monitor(out, model, optimizer, eval_images=val[:8], metric_images=val,
                          eval_loss=eval_loss, eval_every=eval_every, value_range=(lo, hi),
                          seed=seed, overwrite=True, encode=encode, decode=decode,
                          eval_factors=val_factors.table(), train_images=images[:8],
                          train_factors=train_factors.subset(slice(0, 8)).table(),
                          scaler=scaler,
                          config={"loop": {"style": style, "seed": seed, "lr": lr,
                                           "beta": beta0, "fault": fault or "",
                                           "precision": precision}})
    g = torch.Generator().manual_seed(seed + 1)
    bad_in_a_row = 0
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=g)]
        beta = beta0
        lr_now = lr
        if planted and step == at:
            mon.event("inject", step, fault=fault, fault_kind=kind, **params)
        active = planted and at <= step < at + int(params.get("steps", 10**9) or 10**9)
        if active and kind == "lr_spike":
            lr_now = lr * params["factor"]
        if active and kind == "ood_batch":
            x = torch.rand(x.shape, generator=g) * (hi - lo) + lo
        if planted and kind == "fade" and step >= at:  # the data pipeline greys the images
            a = params["amount"] * min(1.0, (step - at + 1) / params["steps"])
            x = (1 - a) * x + a * x.mean(1, keepdim=True)
        if planted and kind == "beta_scale" and step >= at:
            beta = beta0 * params["factor"]
        for group in optimizer.param_groups:
            group["lr"] = lr_now
            group["eps"] = params["eps"] if active and kind == "adam_eps" else eps

        with autocast():  # PyTorch's recipe: the forward pass and the loss under autocast
            mu, logvar = model.encode(x)
            z = mu + torch.randn(mu.shape, generator=g) * torch.exp(0.5 * logvar)
            recon, kl = model.losses(x, z, mu, logvar)
            loss = recon + beta * kl
        optimizer.zero_grad()
        (scaler.scale(loss) if scaler else loss).backward(retain_graph=mon.wants_graph(step))
        if active and kind == "grad_scale":
            for p in model.parameters():
                p.grad.mul_(params["factor"])
        if planted and kind == "nan_grad" and step == at:
            getattr(model, layer).weight.grad.view(-1)[0] = float("nan")
        check = mon.after_backward(step, recon=recon.float(), kl=kl.float(), total=loss.float(),
                                   beta=beta, mu=mu.float(), logvar=logvar.float())
        if check.nonfinite:  # this loop's policy: skip the update, stop after 20 in a row
            bad_in_a_row += 1
            mon.after_step(step, skipped=True, evaluate=False)
            if bad_in_a_row >= 20:
                mon.close("stopped", step + 1, "20 non-finite steps in a row")
                return out
            continue
        bad_in_a_row = 0
        if scaler:  # skipped when the gradients overflowed the scale, which it then lowers
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if planted and kind == "desaturate" and at <= step + 1 < at + params["steps"]:
            desaturate(model.rgb, params["amount"])  # the model after step + 1 updates
        if planted and step + 1 == at:  # weight edits: the model after ``at`` updates
            edit(model, optimizer, kind, params, layer)
        mon.after_step(step)
    mon.close()
    return out


def edit(model: nn.Module, optimizer: torch.optim.Optimizer, kind: str, params: dict,
         layer: str) -> None:
    """The faults that edit the model between two steps."""
    with torch.no_grad():
        if kind == "inf_weight":
            getattr(model, layer).weight.view(-1)[0] = float("inf")
        if kind == "logvar_jump":
            model.logvar_bias().add_(params["shift"])
    if kind == "half_weights":  # as a checkpoint loaded into a model moved to bfloat16:
        state = optimizer.state_dict()  # the optimizer's state follows the weights' dtype
        model.to(torch.bfloat16)
        optimizer.load_state_dict(state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("style", choices=sorted(STYLES))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--fault")
    parser.add_argument("--published", action="store_true",
                        help="the style's published resolution, model size, batch and learning "
                             "rate (--lr is ignored)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                        help="autocast in bfloat16, or float16 with a GradScaler")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = {"lr": args.lr}
    if args.published:
        published = PUBLISHED[args.style]
        settings = {"lr": published["lr"], "resolution": published["resolution"],
                    "batch": published["batch"], "model_args": published["model"]}
    train(args.style, args.out, seed=args.seed, steps=args.steps, fault=args.fault,
          precision=args.precision, **settings)
    run = vaediag.load_run(args.out)
    print(f"{len(run.scalars)} steps, {len(run.evals)} evaluations in {args.out}; "
          f"{np.isfinite(run.scalars['recon']).mean():.0%} finite")


if __name__ == "__main__":
    main()
