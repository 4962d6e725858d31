"""Real images: a folder searched recursively, or a .npz/.npy array.

Everything is decoded once into memory as uint8 (N, 3, R, R): a 64 px image is 12 KB, so 100k
images take 1.2 GB. Images are converted to RGB (grayscale replicated, alpha composited on white,
palette and CMYK converted), centre-cropped to a square and resized with a high-quality filter.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vaediag.errors import DataError

#: File extensions tried as images; other files are counted as skipped.
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
)


@dataclass
class Skipped:
    """Files a folder held that could not be used, reported once by the caller."""

    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    not_images: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.corrupt or self.not_images)

    def summary(self) -> str:
        parts = []
        if self.corrupt:
            path, reason = self.corrupt[0]
            parts.append(f"{len(self.corrupt)} unreadable image file(s) (first: {path}: {reason})")
        if self.not_images:
            parts.append(f"{len(self.not_images)} non-image file(s) (first: {self.not_images[0]})")
        return "skipped " + " and ".join(parts)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: alpha is composited on white, 16-bit gray is scaled to 8 bits."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def square_resize(img: Image.Image, resolution: int) -> np.ndarray:
    """Centre-crop to a square and resize to ``resolution``; returns uint8 (3, R, R)."""
    img.draft("RGB", (resolution * 2, resolution * 2))  # JPEG: decode at a reduced size, fast
    img = to_rgb(img)
    img = ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _load_one(path: Path, resolution: int) -> np.ndarray | str:
    try:
        with Image.open(path) as img:
            width, height = img.size
            if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
                return (f"too large to decode safely ({width}x{height} pixels, over "
                        f"{Image.MAX_IMAGE_PIXELS:,})")
            return square_resize(img, resolution)
    except UnidentifiedImageError:
        return "not a readable image"
    except Exception as exc:  # noqa: BLE001 - PIL plugins raise many types on broken files
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:120]


def list_folder(root: Path) -> tuple[list[Path], list[str]]:
    """Image candidates (sorted, so the order is the same on every machine) and other files.

    Symbolic links are followed, but each real directory is read once: a link back up the tree
    (a loop) or two links to one folder add nothing twice, and the walk always ends."""
    images: list[Path] = []
    others: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and os.path.realpath(os.path.join(dirpath, d)) not in seen)
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            (images if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(path)
    return sorted(images), [str(p) for p in sorted(others)]


def load_folder(root: str | Path, resolution: int, max_images: int = 0,
                rng: np.random.Generator | None = None) -> tuple[np.ndarray, Skipped]:
    """Decode a folder of images. ``max_images`` > 0 picks that many at random with ``rng``."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder, a .npz or a .npy file")
    candidates, others = list_folder(root)
    if not candidates:
        raise DataError(f"no image files under {root} (looked for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    if max_images and len(candidates) > max_images:
        rng = rng or np.random.default_rng(0)
        pick = np.sort(rng.choice(len(candidates), size=max_images, replace=False))
        candidates = [candidates[i] for i in pick]
    workers = min(8, (os.cpu_count() or 1) * 2)  # PIL releases the GIL while decoding
    # Images too large to decode safely are skipped and said in vaediag's one line, not in
    # PIL's warning (the filter is the process's; the threads run inside this block).
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        results = list(pool.map(lambda p: _load_one(p, resolution), candidates))
    skipped = Skipped(not_images=others)
    good = []
    for path, result in zip(candidates, results, strict=True):
        if isinstance(result, str):
            skipped.corrupt.append((str(path), result))
        else:
            good.append(result)
    if not good:
        raise DataError(f"no usable image under {root}: {skipped.summary()}")
    return np.stack(good), skipped


def load_array(path: str | Path, resolution: int) -> np.ndarray:
    """Images from .npy, or .npz (key 'images', or its only array): (N,H,W,C) or (N,C,H,W),
    C in {1, 3, 4}, uint8 in 0..255 or floats in [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"cannot read {path} as a numpy array: {exc}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            if "images" in keys:
                arr = loaded["images"]
            elif len(keys) == 1:
                arr = loaded[keys[0]]
            else:
                raise DataError(f"{path} holds arrays {keys}; name the images array 'images'")
    else:
        arr = loaded
    return _normalise_array(arr, resolution, str(path))


def _channels_first(arr: np.ndarray, where: str) -> np.ndarray:
    """(N, C, H, W) with C of 1, 3 or 4, from (N, H, W), (N, H, W, C) or (N, C, H, W)."""
    if arr.ndim == 3:  # (N, H, W) grayscale
        arr = arr[:, None]
    if arr.ndim != 4:
        raise DataError(f"{where}: expected images shaped (N,H,W,C) or (N,C,H,W), got "
                        f"{arr.shape}")
    if arr.shape[1] not in (1, 3, 4) and arr.shape[-1] in (1, 3, 4):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.shape[1] not in (1, 3, 4):
        raise DataError(f"{where}: cannot find a channel axis of size 1, 3 or 4 in {arr.shape}")
    if len(arr) == 0:
        raise DataError(f"{where}: the array holds no images")
    return arr


def _unit_floats(arr: np.ndarray, where: str) -> np.ndarray:
    """uint8 or float images in [0, 1] as float32 in [0, 1]."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{where}: images must be uint8 or float, got {arr.dtype}")
    floats = arr.astype(np.float32)
    if not np.isfinite(floats).all():
        raise DataError(f"{where}: the array holds NaN or Inf values")
    lo, hi = float(floats.min()), float(floats.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise DataError(f"{where}: float images must lie in [0, 1], found [{lo:.3g}, {hi:.3g}]")
    return floats


def _normalise_array(arr: np.ndarray, resolution: int, where: str) -> np.ndarray:
    """An array of images as (N, 3, resolution, resolution) uint8, or one line saying what is
    wrong with it."""
    floats = _unit_floats(_channels_first(arr, where), where)
    if floats.shape[1] == 1:
        floats = np.repeat(floats, 3, axis=1)
    elif floats.shape[1] == 4:
        alpha = floats[:, 3:4]
        floats = floats[:, :3] * alpha + (1.0 - alpha)  # composite on white, like folders
    out = np.round(np.clip(floats, 0, 1) * 255.0).astype(np.uint8)
    if out.shape[2] != resolution or out.shape[3] != resolution:
        out = np.stack([square_resize(Image.fromarray(im.transpose(1, 2, 0)), resolution)
                        for im in out])
    return out
