"""The 4x8 evaluation grid the user watches, annotated with what it shows and its losses.

Rows: (1) 8 fixed validation images, (2) their reconstructions, (3) 8 copies of decode(z = 0),
(4) decode of 8 fixed random z. A caption band under row 2 carries per-image numbers. Geometry
depends on the image resolution only (:func:`layout`), so anything that reads a grid PNG back
(tests, reports) can cut out exactly the tiles that were written.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROWS, COLS = 4, 8
ROW_NAMES = ("validation", "reconstruction", "decode(z=0)", "decode(fixed z)")

_GAP = 2
_LABEL_WIDTH = 118
_HEADER_LINES = 4
_LINE = 16
_CAPTION_LINES = 3
_CAPTION_LINE = 12
_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)
_MUTED = (90, 90, 90)


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@dataclass(frozen=True)
class GridLayout:
    resolution: int  # pixels of one source image
    scale: int  # integer nearest-neighbour upscaling, so small images stay readable

    @property
    def tile(self) -> int:
        return self.resolution * self.scale

    @property
    def header(self) -> int:
        return _HEADER_LINES * _LINE + 8

    @property
    def caption(self) -> int:
        return _CAPTION_LINES * _CAPTION_LINE + 4

    def row_top(self, row: int) -> int:
        y = self.header + row * (self.tile + _GAP)
        return y + (self.caption if row >= 2 else 0)  # the caption band sits under row 2

    def tile_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a tile in the PNG, right/bottom exclusive."""
        x = _LABEL_WIDTH + col * (self.tile + _GAP)
        y = self.row_top(row)
        return x, y, x + self.tile, y + self.tile

    def caption_box(self, col: int) -> tuple[int, int, int, int]:
        left, _, right, bottom = self.tile_box(1, col)
        return left, bottom, right, bottom + self.caption

    @property
    def size(self) -> tuple[int, int]:
        _, _, right, bottom = self.tile_box(ROWS - 1, COLS - 1)
        return right + _GAP, bottom + _GAP


def layout(resolution: int) -> GridLayout:
    """The grid geometry for images of ``resolution`` px: tiles are at least 64 px."""
    return GridLayout(resolution, max(1, -(-64 // resolution)))


def render(
    tiles: np.ndarray,
    header: list[str],
    row_labels: list[str] | None = None,
    captions: list[list[str]] | None = None,
) -> Image.Image:
    """Draw the grid.

    tiles: uint8 (4, 8, 3, R, R) images. header: up to 4 lines of text above the tiles.
    row_labels: one label per row (may contain a newline). captions: per column of row 2, up to
    three short lines each (e.g. per-image losses or metrics).
    """
    if tiles.shape[:3] != (ROWS, COLS, 3) or tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be uint8 (4, 8, 3, R, R), got {tiles.dtype} {tiles.shape}")
    geo = layout(tiles.shape[-1])
    canvas = Image.new("RGB", geo.size, _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(header[:_HEADER_LINES]):
        draw.text((6, 4 + i * _LINE), line, fill=_INK if i == 0 else _MUTED, font=_font(13))
    for row in range(ROWS):
        label = (row_labels or ROW_NAMES)[row]
        _, top, _, bottom = geo.tile_box(row, 0)
        lines = label.split("\n")
        y0 = (top + bottom) // 2 - len(lines) * 7
        for j, text in enumerate(lines):
            draw.text((6, y0 + j * 14), text, fill=_INK if j == 0 else _MUTED, font=_font(12))
        for col in range(COLS):
            img = Image.fromarray(np.ascontiguousarray(tiles[row, col].transpose(1, 2, 0)))
            if geo.scale > 1:
                img = img.resize((geo.tile, geo.tile), Image.Resampling.NEAREST)
            canvas.paste(img, geo.tile_box(row, col)[:2])
    for col, lines in enumerate(captions or []):
        left, top, _, _ = geo.caption_box(col)
        for j, text in enumerate(lines[:_CAPTION_LINES]):
            draw.text((left + 1, top + 1 + j * _CAPTION_LINE), text, fill=_MUTED, font=_font(10))
    return canvas


def to_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def read_tiles(png: str | bytes | io.BytesIO, resolution: int) -> np.ndarray:
    """Cut the 32 tiles back out of a grid PNG, at the source resolution: uint8 (4, 8, 3, R, R)."""
    source = io.BytesIO(png) if isinstance(png, bytes) else png
    with Image.open(source) as img:
        arr = np.asarray(img.convert("RGB"))
    geo = layout(resolution)
    out = np.empty((ROWS, COLS, 3, resolution, resolution), dtype=np.uint8)
    for row in range(ROWS):
        for col in range(COLS):
            left, top, right, bottom = geo.tile_box(row, col)
            tile = arr[top:bottom:geo.scale, left:right:geo.scale]
            out[row, col] = tile.transpose(2, 0, 1)
    return out
