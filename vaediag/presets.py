"""The named presets of ``vaediag train --preset NAME``: partial configs applied on top of the
defaults (:func:`vaediag.config.build_config`), and one line of help each. Plain data: this
module imports nothing."""

from __future__ import annotations

from typing import Any

# The case study's runs (docs/case-study.md): 32 px toyfaces, a small model, an evaluation every
# 100 steps, about two minutes on 2 CPU cores.
_CASE_STUDY: dict[str, dict[str, Any]] = {
    "data": {"resolution": 32, "toyfaces_size": 4096, "val_size": 128},
    "model": {"channels": [16, 32, 64], "latent_dim": 16},
    "train": {"steps": 4000, "batch_size": 32},
    "eval": {"every_steps": 100},
}

#: Named presets: partial configs applied on top of the defaults (``--preset NAME``).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    "tiny": {  # a smoke test: a minute or less on a laptop CPU
        "data": {"resolution": 32, "toyfaces_size": 1024, "val_size": 64},
        "model": {"channels": [16, 32, 64], "latent_dim": 16},
        "train": {"epochs": 4, "batch_size": 32},
    },
    # The loss stops tracking the pictures: a KL warm-up to a beta-VAE weight makes the model
    # drop pose and colour, which the summed BCE barely charges for.
    "seed-decoupling": {
        **_CASE_STUDY,
        "loss": {"beta": 16.0, "beta_schedule": "warmup", "beta_warmup_steps": 2000},
    },
    # The same with the remedy vaediag names: free bits keep a minimum of information per
    # dimension while the KL weight rises.
    "seed-decoupling-stable": {
        **_CASE_STUDY,
        "loss": {"beta": 16.0, "beta_schedule": "warmup", "beta_warmup_steps": 2000,
                 "free_bits": 1.0},
    },
}

# Memorisation: a model with room to spare trained for hundreds of epochs on 128 faces. Its
# training loss keeps falling while the held-out grid loses colour and pose.
_OVERFIT: dict[str, dict[str, Any]] = {
    "data": {"resolution": 32, "toyfaces_size": 128, "val_size": 128},
    "model": {"channels": [32, 64, 128], "latent_dim": 64},
    "loss": {"kl": "mc"},
    "train": {"steps": 6000, "batch_size": 32},
    "eval": {"every_steps": 200},
}
PRESETS["seed-overfit"] = _OVERFIT
# The same with the remedy vaediag names first that a replay can apply: augmented batches.
PRESETS["seed-overfit-stable"] = {**_OVERFIT, "train": {**_OVERFIT["train"],
                                                        "augment": "flip_shift"}}

#: One line per preset, for ``--help`` and the docs.
PRESET_HELP: dict[str, str] = {
    "default": "64 px toyfaces, summed BCE, analytic KL, Adam at 1e-3, 10 epochs",
    "tiny": "a one-minute smoke test (32 px, small model, 4 epochs)",
    "seed-decoupling": "case study: the loss stays flat while pose and colour are lost "
                       "(KL warm-up to beta 16; docs/case-study.md)",
    "seed-decoupling-stable": "case study: seed-decoupling with free bits, the remedy vaediag "
                              "names",
    "seed-overfit": "case study: 128 training faces for 1,500 epochs; the model memorises them "
                    "and the held-out grid loses colour and pose (docs/case-study.md)",
    "seed-overfit-stable": "case study: seed-overfit with augmented batches (flips and shifts)",
}
