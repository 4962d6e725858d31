"""Attach vaediag to your own PyTorch training loop: a complete, runnable example.

The model here is deliberately not vaediag's: any VAE works that can encode a batch to
(mu, logvar) and decode z to images in [0, 1]. The data is vaediag's offline toyfaces so the
example runs anywhere; use your own DataLoader instead.

    python examples/own_loop.py --out runs/own-loop --steps 300
    python -c "import vaediag; print(vaediag.load_run('runs/own-loop').scalars.tail())"
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F

import vaediag
from vaediag.data import toyfaces


class TinyVAE(nn.Module):
    """A small fully connected VAE on flattened images."""

    def __init__(self, resolution: int, latent: int = 8, hidden: int = 256):
        super().__init__()
        self.shape = (3, resolution, resolution)
        pixels = 3 * resolution * resolution
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU())
        self.to_stats = nn.Linear(hidden, 2 * latent)
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, pixels))

    def encode(self, x):
        mu, logvar = self.to_stats(self.enc(x)).chunk(2, dim=1)
        return mu, logvar

    def decode_logits(self, z):
        return self.dec(z).view(-1, *self.shape)

    def decode(self, z):
        return torch.sigmoid(self.decode_logits(z))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/own-loop")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    train, _ = toyfaces.generate(2048, args.resolution, seed=0)
    val, _ = toyfaces.generate(64, args.resolution, seed=0, stream=1)
    train = torch.from_numpy(train).float() / 255
    val = torch.from_numpy(val).float() / 255

    model = TinyVAE(args.resolution)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    beta = 1.0

    def eval_loss(x, z, mu, logvar):
        """Per-image losses of the grid's images, as this loop computes them: the loss half of
        the loss-vs-quality analysis (without it, that analysis cannot run)."""
        logits = model.decode_logits(z)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum((1, 2, 3))
        return recon, 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)

    # 1. Create the Monitor: where to write, what to watch, the images to show on the grid.
    #    (A tanh decoder on images in [-1, 1] adds value_range=(-1, 1).)
    #    train_images: 8 fixed training images scored like the grid's, so that memorising the
    #    training set shows (held-out images getting worse while these keep improving).
    mon = vaediag.Monitor(args.out, model, optimizer, eval_images=val[:8], eval_loss=eval_loss,
                          train_images=train[:8], metric_images=val, eval_every=100,
                          overwrite=args.overwrite,
                          config={"example": {"beta": beta, "lr": 1e-3}})
    for step in range(args.steps):
        x = train[torch.randint(0, len(train), (64,))]
        mu, logvar = model.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        logits = model.decode_logits(z)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum((1, 2, 3))
        recon = recon.mean()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
        loss = recon + beta * kl

        optimizer.zero_grad()
        # 2. Keep the graph only on the steps the recon/KL gradient split is recorded.
        loss.backward(retain_graph=mon.wants_graph(step))
        # 3. Record losses, latents and gradients, before the optimizer changes anything.
        mon.after_backward(step, recon=recon, kl=kl, beta=beta, mu=mu, logvar=logvar)
        optimizer.step()
        # 4. Record the optimizer's state and the update it made; evaluates when due.
        mon.after_step(step)
    mon.close()  # 5. Done: the run directory is complete.

    run = vaediag.load_run(args.out)
    print(f"{len(run.scalars)} steps, {len(run.evals)} evaluations recorded in {args.out}")


if __name__ == "__main__":
    main()
