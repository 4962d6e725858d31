"""Data sources: the built-in toyfaces, image folders and image arrays, with a fixed split.

:func:`load_dataset` returns uint8 images (N, 3, R, R) split once into training and validation
sets. The split depends only on ``data.seed``, never on the training seed, so the validation
images (and the grid's 8) stay the same across runs, and they never enter training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vaediag.data import images, toyfaces
from vaediag.errors import DataError

if TYPE_CHECKING:  # config imports nothing that imports it back
    from vaediag.config import DataConfig


@dataclass
class Dataset:
    name: str  # "toyfaces" or the source as the user gave it
    train: np.ndarray  # uint8 (N, 3, R, R)
    val: np.ndarray  # uint8 (M, 3, R, R)
    val_factors: dict[str, np.ndarray] | None  # toyfaces only: known factors of each val image
    skipped: images.Skipped | None = None  # files a folder held that could not be used
    train_factors: dict[str, np.ndarray] | None = None  # toyfaces only: of each training image

    @property
    def resolution(self) -> int:
        return int(self.train.shape[-1])


#: how many training images each evaluation scores like the grid's held-out ones
TRAIN_EVAL_IMAGES = 8


def train_sample(data: Dataset, seed: int, count: int = TRAIN_EVAL_IMAGES) -> tuple[np.ndarray,
                                                                         dict | None]:
    """A fixed set of ``count`` training images (and their factors), drawn once by a seeded
    shuffle of ``data.seed``: the same images for every training seed, so runs that differ
    only in how they train are scored on the same faces."""
    pick = np.sort(np.random.default_rng([seed, 13]).choice(len(data.train),
                                                            min(count, len(data.train)),
                                                            replace=False))
    factors = None if data.train_factors is None else \
        {k: v[pick] for k, v in data.train_factors.items()}
    return data.train[pick], factors


def _split(all_images: np.ndarray, val_size: int, seed: int, name: str) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    n = len(all_images)
    if n < val_size + 1:
        raise DataError(f"{name} has {n} usable images; need more than data.val_size = {val_size} "
                        f"(lower it with --set data.val_size=N, at least 8)")
    order = np.random.default_rng([seed, 7]).permutation(n)
    return all_images[order[val_size:]], all_images[order[:val_size]]


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load (or generate) the configured data source and split it."""
    source = cfg.source
    if source == "toyfaces":
        train, train_factors = toyfaces.generate(cfg.toyfaces_size, cfg.resolution, cfg.seed,
                                                 stream=0)
        val, factors = toyfaces.generate(cfg.val_size, cfg.resolution, cfg.seed, stream=1)
        return Dataset("toyfaces", train, val, factors.table(),
                       train_factors=train_factors.table())
    path = Path(source)
    rng = np.random.default_rng([cfg.seed, 11])
    if path.suffix.lower() in (".npz", ".npy"):
        arr = images.load_array(path, cfg.resolution)
        if cfg.max_images and len(arr) > cfg.max_images:
            arr = arr[np.sort(rng.choice(len(arr), cfg.max_images, replace=False))]
        train, val = _split(arr, cfg.val_size, cfg.seed, source)
        return Dataset(source, train, val, None)
    if not path.exists():
        raise DataError(f"data source not found: {source} (use 'toyfaces', a folder of images, "
                        f"or a .npz/.npy file)")
    arr, skipped = images.load_folder(path, cfg.resolution, cfg.max_images, rng)
    train, val = _split(arr, cfg.val_size, cfg.seed, source)
    return Dataset(source, train, val, None, skipped or None)


__all__ = ["TRAIN_EVAL_IMAGES", "Dataset", "train_sample", "load_dataset"]
