"""toyfaces: procedural cartoon faces whose generative factors are known.

Every image is drawn from a handful of continuous factors (colours, pose, hair length, eye size),
which are returned next to the pixels. Later analysis uses them to measure exactly how well a
model keeps colour and orientation, something a real data set cannot tell.

Rendering is vectorised numpy: each face part is an ellipse or a band in the face's own
coordinate frame, painted back to front with analytic anti-aliasing (coverage from an approximate
signed distance in pixels), so faces look clean at any resolution from 16 to 128 px.

Conventions
-----------
- Image coordinates run from -1 to 1; y points down.
- ``angle`` is the in-plane rotation of the head in degrees, positive = clockwise on screen.
- ``turn`` in [-1, 1] is the left/right turn of the head: positive = the face looks toward the
  right edge of the image (features shift right, the left eye is the nearer and larger one).
- Colours are RGB in [0, 1].
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Names of the scalar factors, in the column order of :func:`factor_table`.
FACTOR_NAMES: tuple[str, ...] = (
    "skin_r", "skin_g", "skin_b",
    "hair_r", "hair_g", "hair_b",
    "eye_r", "eye_g", "eye_b",
    "bg_r", "bg_g", "bg_b",
    "angle", "turn", "center_x", "center_y", "size", "hair_length", "eye_size",
)

#: Ranges the sampler draws from (documented, and checked by the tests).
ANGLE_RANGE = (-30.0, 30.0)
TURN_RANGE = (-1.0, 1.0)
CENTER_RANGE = (-0.1, 0.1)
SIZE_RANGE = (0.55, 0.72)
HAIR_LENGTH_RANGE = (0.0, 1.0)
EYE_SIZE_RANGE = (0.8, 1.2)

_RENDER_CHUNK = 64  # images per vectorised chunk: small enough to stay in cache


@dataclass(frozen=True)
class FaceFactors:
    """Factors of a batch of faces: one array per factor, all of length N."""

    skin: np.ndarray  # (N, 3) RGB in [0, 1]
    hair: np.ndarray  # (N, 3)
    eye: np.ndarray  # (N, 3)
    background: np.ndarray  # (N, 3)
    angle: np.ndarray  # (N,) degrees
    turn: np.ndarray  # (N,) in [-1, 1]
    center: np.ndarray  # (N, 2) in image coordinates
    size: np.ndarray  # (N,) face half-width as a fraction of the image half-width
    hair_length: np.ndarray  # (N,) in [0, 1]
    eye_size: np.ndarray  # (N,)

    def __len__(self) -> int:
        return len(self.angle)

    def table(self) -> dict[str, np.ndarray]:
        """The factors as named 1-D float32 columns, in :data:`FACTOR_NAMES` order."""
        cols = np.concatenate(
            [
                self.skin, self.hair, self.eye, self.background,
                self.angle[:, None], self.turn[:, None], self.center,
                self.size[:, None], self.hair_length[:, None], self.eye_size[:, None],
            ],
            axis=1,
        ).astype(np.float32)
        return {name: cols[:, i] for i, name in enumerate(FACTOR_NAMES)}

    @classmethod
    def from_table(cls, table: dict[str, np.ndarray]) -> FaceFactors:
        """Inverse of :meth:`table`."""
        col = {k: np.asarray(v, dtype=np.float64) for k, v in table.items()}

        def rgb(prefix: str) -> np.ndarray:
            return np.stack([col[f"{prefix}_{c}"] for c in "rgb"], axis=1)

        return cls(
            skin=rgb("skin"), hair=rgb("hair"), eye=rgb("eye"), background=rgb("bg"),
            angle=col["angle"], turn=col["turn"],
            center=np.stack([col["center_x"], col["center_y"]], axis=1),
            size=col["size"], hair_length=col["hair_length"], eye_size=col["eye_size"],
        )

    def subset(self, index: np.ndarray | slice) -> FaceFactors:
        return FaceFactors(**{k: getattr(self, k)[index] for k in self.__dataclass_fields__})


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all inputs in [0, 1]; returns (N, 3)."""
    i = np.floor(h * 6.0).astype(int) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack(
        [
            np.stack([v, t, p], 1), np.stack([q, v, p], 1), np.stack([p, v, t], 1),
            np.stack([p, q, v], 1), np.stack([t, p, v], 1), np.stack([v, p, q], 1),
        ],
        axis=0,
    )
    return table[i, np.arange(len(h))]


_DRAWS = 19  # uniforms per face, in the order used below


def sample_factors(n: int, rng: np.random.Generator) -> FaceFactors:
    """Draw ``n`` independent faces' factors from ``rng``.

    One row of uniforms per face, so the first k faces are the same whatever ``n`` is.
    """
    draws = iter(rng.random((n, _DRAWS)).T)

    def u(lo: float, hi: float) -> np.ndarray:
        return lo + (hi - lo) * next(draws)

    skin = _hsv_to_rgb(u(0.02, 0.10), u(0.15, 0.55), u(0.55, 1.0))
    hair = _hsv_to_rgb(u(0.0, 1.0), u(0.35, 0.95), u(0.25, 0.95))
    eye = _hsv_to_rgb(u(0.0, 1.0), u(0.55, 1.0), u(0.45, 1.0))
    background = _hsv_to_rgb(u(0.0, 1.0), u(0.05, 0.5), u(0.35, 1.0))
    return FaceFactors(
        skin=skin, hair=hair, eye=eye, background=background,
        angle=u(*ANGLE_RANGE), turn=u(*TURN_RANGE),
        center=np.stack([u(*CENTER_RANGE), u(*CENTER_RANGE)], axis=1), size=u(*SIZE_RANGE),
        hair_length=u(*HAIR_LENGTH_RANGE), eye_size=u(*EYE_SIZE_RANGE),
    )


def _ellipse_coverage(
    x: np.ndarray, y: np.ndarray, cx, cy, rx, ry, pixel: np.ndarray
) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of an axis-aligned ellipse, per pixel.

    The signed distance is approximated to first order, (r - 1) / |grad r| with
    r = sqrt((dx/rx)^2 + (dy/ry)^2), which is exact on the boundary; coverage ramps over one pixel.
    Written with in-place float32 operations: this function is most of the rendering time.
    """
    f32 = np.float32
    rx, ry = np.asarray(rx, f32), np.asarray(ry, f32)
    dx = np.subtract(x, np.asarray(cx, f32), dtype=f32)
    dx /= rx
    dy = np.subtract(y, np.asarray(cy, f32), dtype=f32)
    dy /= ry
    r = dx * dx
    r += dy * dy
    np.sqrt(r, out=r)
    dx /= rx
    dy /= ry
    dx *= dx
    dy *= dy
    dx += dy
    np.sqrt(dx, out=dx)  # |grad r| * r
    dx += f32(1e-6)
    dist = r - f32(1.0)
    dist *= r
    dist /= dx  # (r - 1) / |grad r|: distance to the boundary in face units
    dist /= pixel
    np.subtract(f32(0.5), dist, out=dist)
    return np.clip(dist, f32(0.0), f32(1.0), out=dist)


def _paint(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """Alpha-blend ``colour`` ((B, C) or (C,)) over ``canvas`` (C, B, H, W) in place."""
    channels = canvas.shape[0]
    colour = np.broadcast_to(np.asarray(colour, dtype=np.float32), (alpha.shape[0], channels))
    tmp = np.empty_like(alpha)
    for c in range(channels):
        channel = canvas[c]
        np.subtract(colour[:, c, None, None], channel, out=tmp)  # canvas += a * (colour - canvas)
        tmp *= alpha
        channel += tmp


#: Face parts, for :func:`render_parts`: the index of each part's mask.
PARTS = ("background", "hair", "skin", "eye", "other")
_BACKGROUND, _HAIR, _SKIN, _EYE, _OTHER = range(len(PARTS))


def _layers(f: FaceFactors, resolution: int):
    """The face's painted layers, back to front: (coverage (B, H, W), colour, part index).

    The background is not a layer: it is the canvas the layers are painted on.
    """
    b = len(f)
    col = lambda v: np.asarray(v, dtype=np.float32).reshape(b, 1, 1)  # noqa: E731
    grid = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution * 2.0 - 1.0
    gy, gx = np.meshgrid(grid, grid, indexing="ij")

    # Face frame: translate, rotate by -angle, scale so the face half-width is 1.
    theta = np.deg2rad(f.angle)
    cos, sin = col(np.cos(theta)), col(np.sin(theta))
    size = col(f.size)
    px, py = gx[None] - col(f.center[:, 0]), gy[None] - col(f.center[:, 1])
    x = (cos * px + sin * py) / size
    y = (-sin * px + cos * py) / size
    pixel = np.float32(2.0 / resolution) / size  # one pixel in face units
    t = col(f.turn)
    hair_len = col(f.hair_length)
    eye_size = col(f.eye_size)

    hair = np.asarray(f.hair, dtype=np.float32)
    skin = np.asarray(f.skin, dtype=np.float32)
    dark = np.array([0.08, 0.06, 0.08], dtype=np.float32)

    # Hair behind the head: longer hair reaches further down.
    yield _ellipse_coverage(x, y, -0.12 * t, 0.05 + 0.35 * hair_len, 1.22,
                            1.25 + 0.45 * hair_len, pixel), hair * 0.75, _HAIR
    # Neck, then the face (slightly shifted with the turn).
    yield _ellipse_coverage(x, y, 0.05 * t, 1.05, 0.38, 0.45, pixel), skin * 0.85, _OTHER
    yield _ellipse_coverage(x, y, 0.06 * t, 0.08, 0.9, 1.02, pixel), skin, _SKIN
    # Bangs: the top of a hair cap, cut by a spiky fringe line that moves with the turn.
    cap = _ellipse_coverage(x, y, -0.06 * t, -0.32, 1.04, 0.82, pixel)
    fringe_y = -0.22 + 0.16 * np.abs(np.sin(3.2 * (x - 0.35 * t)))
    below = np.clip(0.5 + (fringe_y - y) / pixel, 0.0, 1.0)
    yield cap * below, hair, _HAIR

    # Eyes: the far eye (opposite the turn) is narrower. Outline, iris, pupil, highlight.
    for side in (-1.0, 1.0):
        ex = side * 0.38 + 0.3 * t
        near = 1.0 - 0.4 * np.clip(-side * t, 0.0, 1.0)
        rx, ry = 0.2 * near * eye_size, 0.25 * eye_size
        ey = 0.22
        yield _ellipse_coverage(x, y, ex, ey, rx * 1.18, ry * 1.12, pixel), dark, _OTHER
        yield _ellipse_coverage(x, y, ex, ey + 0.02, rx, ry * 0.95, pixel), f.eye, _EYE
        yield (_ellipse_coverage(x, y, ex + 0.02 * t, ey + 0.05, rx * 0.5, ry * 0.55, pixel),
               dark, _OTHER)
        yield (_ellipse_coverage(x, y, ex - 0.35 * rx, ey - 0.35 * ry, rx * 0.3, ry * 0.25,
                                 pixel), np.ones(3, np.float32), _OTHER)
    # Nose and mouth shift further than the eyes with the turn: a clear orientation cue.
    yield _ellipse_coverage(x, y, 0.42 * t, 0.5, 0.045, 0.03, pixel), skin * 0.6, _OTHER
    yield (_ellipse_coverage(x, y, 0.36 * t, 0.72, 0.16 * (1 - 0.3 * np.abs(t)), 0.055, pixel),
           np.array([0.55, 0.12, 0.15], np.float32), _OTHER)


def _render_chunk(f: FaceFactors, resolution: int) -> np.ndarray:
    grid = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution * 2.0 - 1.0
    # Background with a soft vertical shading so it is not a flat fill.
    shade = (1.0 - 0.12 * (grid + 1.0) / 2.0).astype(np.float32)[:, None]
    bg = np.asarray(f.background, dtype=np.float32)
    canvas = np.ascontiguousarray(  # (3, B, H, W), channels first for speed
        np.broadcast_to(bg.T[:, :, None, None] * shade[None, None],
                        (3, len(f), resolution, resolution)))
    for alpha, colour, _ in _layers(f, resolution):
        _paint(canvas, alpha, colour)
    return canvas


def render_parts(factors: FaceFactors, resolution: int) -> np.ndarray:
    """Visible coverage of each part in :data:`PARTS`, float32 (N, len(PARTS), R, R).

    The masks sum to 1 at every pixel: what each pixel shows once every layer is painted.
    """
    canvas = np.zeros((len(PARTS), len(factors), resolution, resolution), dtype=np.float32)
    canvas[_BACKGROUND] = 1.0
    eye = np.eye(len(PARTS), dtype=np.float32)
    for alpha, _, part in _layers(factors, resolution):
        _paint(canvas, alpha, eye[part])
    return canvas.transpose(1, 0, 2, 3)


def render(factors: FaceFactors, resolution: int) -> np.ndarray:
    """Render faces as uint8 images of shape (N, 3, resolution, resolution)."""
    if not 8 <= resolution <= 512:
        raise ValueError(f"toyfaces resolution must be within 8..512, got {resolution}")
    out = np.empty((len(factors), 3, resolution, resolution), dtype=np.uint8)

    def work(start: int) -> None:
        sl = slice(start, start + _RENDER_CHUNK)
        img = _render_chunk(factors.subset(sl), resolution)
        out[sl] = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 0, 2, 3)

    starts = range(0, len(factors), _RENDER_CHUNK)
    if len(starts) == 1:
        work(0)
    else:  # numpy releases the GIL inside its array loops, so chunks render in parallel
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            list(pool.map(work, starts))
    return out


def export(directory: Path, n: int, resolution: int, seed: int, stream: int = 0) -> Path:
    """Write ``n`` faces as PNGs (00000.png, ...) and their factors as ``factors.csv``.

    The folder can be trained on like any image folder (``--data DIR``); the CSV has one row per
    file: ``file`` then the columns of :data:`FACTOR_NAMES`.
    """
    from PIL import Image

    images, factors = generate(n, resolution, seed, stream)
    directory.mkdir(parents=True, exist_ok=True)
    table = factors.table()
    width = max(5, len(str(n - 1)))
    rows = [",".join(["file", *FACTOR_NAMES])]
    for i, img in enumerate(images):
        name = f"{i:0{width}d}.png"
        Image.fromarray(img.transpose(1, 2, 0)).save(directory / name)
        rows.append(",".join([name, *(f"{table[k][i]:.6g}" for k in FACTOR_NAMES)]))
    csv = directory / "factors.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def generate(n: int, resolution: int, seed: int, stream: int = 0) -> tuple[np.ndarray, FaceFactors]:
    """``n`` faces, deterministic in (seed, stream): different streams never share faces.

    The training set uses stream 0 and the validation set stream 1, so the two are disjoint and
    each is reproducible on its own.
    """
    rng = np.random.default_rng([seed, stream])
    factors = sample_factors(n, rng)
    return render(factors, resolution), factors
