"""An unchanged-style LightningModule VAE for the callback's tests; run as a script it trains
under ``strategy="ddp"`` on 2 CPU processes (Lightning re-runs this script for rank 1), or in
one process with only the older ``pytorch_lightning`` package importable:

    python tests/lightning_vae.py OUT_DIR [ddp | pytorch_lightning]

It logs its loss terms with ``sync_dist=True``, as most modules trained on several devices do,
and keeps its KL weight in a ``beta`` attribute.
"""

from __future__ import annotations

import sys

if sys.argv[2:] == ["pytorch_lightning"]:  # a user who has only the older package
    sys.modules["lightning"] = None  # type: ignore[assignment]
    import pytorch_lightning as pl
else:
    import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from vaediag.integrations.lightning import VaediagCallback


class LitVAE(pl.LightningModule):
    """A small VAE as people write them in Lightning: it logs its loss terms."""

    def __init__(self, latent: int = 4):
        super().__init__()
        self.beta = 0.5
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 64), nn.ReLU(),
                                 nn.Linear(64, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent, 64), nn.ReLU(), nn.Linear(64, 3 * 8 * 8))

    def encode(self, x):
        return self.enc(x).chunk(2, dim=1)

    def decode(self, z):
        return torch.sigmoid(self.dec(z).view(-1, 3, 8, 8))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        recon = F.binary_cross_entropy(self.decode(z), x, reduction="none").sum((1, 2, 3)).mean()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
        loss = recon + self.beta * kl
        self.log_dict({"recon": recon, "kl": kl}, sync_dist=True)
        self.log("loss", loss, sync_dist=True)
        self.vaediag_latents = (mu, logvar)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def fit(out: str, steps: int = 40, accelerator: str = "cpu", **trainer_args) -> None:
    pl.seed_everything(0, verbose=False)
    data = TensorDataset(torch.rand(256, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    images = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    callback = VaediagCallback(out, eval_images=images, eval_every=10, online=False,
                               total_key="loss")
    trainer = pl.Trainer(max_steps=steps, accelerator=accelerator, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback], **trainer_args)
    trainer.fit(LitVAE(), DataLoader(data, batch_size=16, shuffle=True))


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[2:] == ["ddp"]:
        fit(sys.argv[1], strategy="ddp", devices=2)
    elif sys.argv[2:] == ["pytorch_lightning"]:
        assert "lightning.pytorch" not in sys.modules
        fit(sys.argv[1], steps=12, devices=1)
    else:
        fit(sys.argv[1], devices=1)
