"""Weights as pictures: a grid of filter tiles (or a heat map) as a PNG, drawn with Pillow from numpy.

Layouts (docs/api.md#pictures):

- 4-D ``(kh, kw, c_in, c_out)`` (convolution, deconvolution): one tile per output channel when
  ``c_in`` is 1 (grey) or 3 (colour), else one grey tile per ``(c_in, c_out)`` filter, a row per
  output channel (``c_in`` tiles across) unless ``columns`` is given;
- 2-D ``(n_in, n_out)`` (dense): each output unit's incoming weights as a ``tile=h,w`` tile when
  ``h·w = n_in`` (by default when ``n_in`` is a square), else the whole matrix as one heat map
  (``n_in`` rows, ``n_out`` columns).

Values map to brightness by ``normalize``: ``tile`` (each tile's own min..max), ``global`` (the
whole array's min..max), or ``symmetric`` (a diverging blue-white-red map, ±max|w| of the whole
array, zero white). A constant range draws mid-grey. No JAX here: the API renders what the
backend read.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from synapse_serve.errors import InvalidRequest

NORMALIZATIONS = ("tile", "global", "symmetric")
MAX_PIXELS = 1 << 24  # 16 M pixels (4096 × 4096): larger pictures are refused, not drawn
MAX_SCALE, MAX_PADDING, MAX_COLUMNS = 64, 16, 4096
OPTIONS = ("compartment", "normalize", "scale", "columns", "tile", "padding")


@dataclass(frozen=True)
class PictureOptions:
    """How to draw: the compartment, the normalisation, pixels per weight, tiles per row, a dense tile's
    shape and the pixels between tiles."""

    compartment: str = "weights"
    normalize: str = "tile"
    scale: int | None = None  # None: chosen so that a tile is about 32 pixels high (1..8)
    columns: int | None = None
    tile: tuple[int, int] | None = None
    padding: int = 1

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> PictureOptions:
        """Options from query parameters (strings); InvalidRequest (422) naming the bad one."""
        unknown = sorted(set(query) - set(OPTIONS) - {"owner"})
        if unknown:
            raise InvalidRequest(f"{unknown[0][:40]}: unknown option; the picture takes {', '.join(OPTIONS)}",
                                 argument=unknown[0][:40])
        normalize = query.get("normalize", "tile")
        if normalize not in NORMALIZATIONS:
            raise InvalidRequest(f"normalize: {normalize[:40]!r} is not one of {', '.join(NORMALIZATIONS)}",
                                 argument="normalize")
        tile = None
        if query.get("tile"):
            parts = query["tile"].split(",")
            tile = tuple(_integer("tile", p, 1, 1 << 16) for p in parts)
            if len(tile) != 2:
                raise InvalidRequest("tile: expected h,w (two integers)", argument="tile")
        return cls(compartment=query.get("compartment", "weights"), normalize=normalize,
                   scale=_optional_integer(query, "scale", 1, MAX_SCALE),
                   columns=_optional_integer(query, "columns", 1, MAX_COLUMNS), tile=tile,
                   padding=_integer("padding", query.get("padding", "1"), 0, MAX_PADDING))


def _integer(name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InvalidRequest(f"{name}: expected an integer, received {text[:40]!r}", argument=name) from None
    if not low <= value <= high:
        raise InvalidRequest(f"{name}: {value} is outside {low}..{high}", argument=name)
    return value


def _optional_integer(query: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    return None if query.get(name) in (None, "") else _integer(name, query[name], low, high)


@dataclass(frozen=True)
class Picture:
    """A drawn picture: the PNG and its layout (tiles, each tile's weights shape, rows and columns)."""

    png: bytes
    tiles: int
    tile_shape: tuple[int, int]
    rows: int
    columns: int
    scale: int

    def headers(self) -> dict[str, str]:
        return {"X-Tiles": str(self.tiles), "X-Tile-Shape": f"{self.tile_shape[0]},{self.tile_shape[1]}",
                "X-Grid": f"{self.rows},{self.columns}", "X-Scale": str(self.scale)}


def tiles_of(values: np.ndarray, options: PictureOptions) -> tuple[np.ndarray, int | None]:
    """``(n, h, w)`` grey or ``(n, h, w, 3)`` colour tiles of a compartment, and the columns its layout asks."""
    if values.ndim == 4:
        kh, kw, c_in, c_out = values.shape
        if c_in in (1, 3):  # one tile per output channel, in colour for three input channels
            tiles = np.moveaxis(values, 3, 0)
            return (tiles[..., 0] if c_in == 1 else tiles), None
        tiles = np.transpose(values, (3, 2, 0, 1)).reshape(c_out * c_in, kh, kw)  # c_out-major, c_in-minor
        return tiles, c_in
    if values.ndim == 2:
        n_in, n_out = values.shape
        tile = options.tile
        if tile is None and math.isqrt(n_in) ** 2 == n_in and n_in > 1:
            tile = (math.isqrt(n_in), math.isqrt(n_in))
        if tile is None:  # the matrix as a heat map
            return values[None], 1
        if tile[0] * tile[1] != n_in:
            raise InvalidRequest(f"tile: {tile[0]}x{tile[1]} = {tile[0] * tile[1]} weights, but each output unit has "
                                 f"{n_in} inputs", argument="tile")
        return np.moveaxis(values, 1, 0).reshape(n_out, *tile), None
    raise InvalidRequest(f"compartment: {options.compartment!r} has shape {list(values.shape)}; a picture needs a "
                         "weights-shaped compartment (2-D dense or 4-D filters)", argument="compartment")


def _normalized(tiles: np.ndarray, normalize: str) -> np.ndarray:
    """Tiles mapped to 0..1 (tile, global) or -1..1 (symmetric)."""
    values = tiles.astype(np.float64)  # in place from here: a picture at its size bound is 128 MB of these
    if normalize == "symmetric":
        top = float(np.abs(values).max()) if values.size else 0.0
        if top > 0:
            values /= top
        else:
            values[...] = 0.0
        return values
    axes = tuple(range(1, values.ndim)) if normalize == "tile" else None
    low, high = values.min(axis=axes, keepdims=True), values.max(axis=axes, keepdims=True)
    span = high - low
    values -= low
    values /= np.where(span > 0, span, 1.0)
    flat = span <= 0
    if flat.any():
        values[np.broadcast_to(flat, values.shape)] = 0.5
    return values


def _colours(values: np.ndarray, normalize: str, colour: bool) -> np.ndarray:
    """uint8 RGB pixels: grey (or the tiles' own colours) for 0..1, blue-white-red for -1..1."""
    if normalize == "symmetric":
        if colour:
            values = values.mean(axis=-1)
        positive, negative = np.clip(values, 0, 1), np.clip(-values, 0, 1)
        rgb = np.empty((*values.shape, 3), np.uint8)  # each channel made apart: one float copy at a time
        for channel, level in enumerate((lambda: 1 - negative, lambda: 1 - positive - negative,
                                         lambda: 1 - positive)):
            rgb[..., channel] = _bytes(level())
        return rgb
    if colour:
        return _bytes(values)
    return np.repeat(_bytes(values)[..., None], 3, axis=-1)  # grey made bytes first, then three of them


def _bytes(values: np.ndarray) -> np.ndarray:
    """0..1 as 0..255 (clipped, rounded), reusing ``values``' memory for the steps between."""
    values = np.clip(values, 0, 1)
    values *= 255
    return np.round(values, out=values).astype(np.uint8)


def render(values: np.ndarray, options: PictureOptions) -> Picture:
    """The compartment's tiles on a grid, as a PNG (InvalidRequest for a shape or size it cannot draw)."""
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.floating) and not np.issubdtype(values.dtype, np.integer):
        raise InvalidRequest(f"compartment: {options.compartment!r} holds {values.dtype.name}, not numbers",
                             argument="compartment")
    tiles, natural_columns = tiles_of(values, options)
    count, height, width = tiles.shape[:3]
    colour = tiles.ndim == 4
    columns = min(options.columns or natural_columns or math.ceil(math.sqrt(count)), count)
    rows = math.ceil(count / columns)
    scale = options.scale or max(1, min(8, 32 // max(height, 1)))
    pad = options.padding
    image_h, image_w = rows * (height * scale + pad) + pad, columns * (width * scale + pad) + pad
    if image_h * image_w > MAX_PIXELS:
        raise InvalidRequest(f"the picture would be {image_w}x{image_h} pixels, more than {MAX_PIXELS}; lower scale "
                             "or padding, or set columns", argument="scale")
    pixels = _colours(_normalized(tiles, options.normalize), options.normalize, colour)
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    # every tile placed at once (a loop over a million one-pixel tiles took seconds): each cell a tile and its
    # padding below and right of it, the grid's rows and columns then interleaved with the cells' own
    tile_h, tile_w = height * scale, width * scale
    cells = np.full((rows * columns, tile_h + pad, tile_w + pad, 3), 48, np.uint8)  # dark grey between tiles
    cells[:count, :tile_h, :tile_w] = pixels
    canvas = np.full((image_h, image_w, 3), 48, np.uint8)
    canvas[pad:, pad:] = cells.reshape(rows, columns, tile_h + pad, tile_w + pad, 3).transpose(0, 2, 1, 3, 4) \
        .reshape(rows * (tile_h + pad), columns * (tile_w + pad), 3)
    buffer = io.BytesIO()
    Image.fromarray(canvas, "RGB").save(buffer, format="PNG", optimize=False, compress_level=6)
    return Picture(buffer.getvalue(), count, (height, width), rows, columns, scale)


def options_from(query: Mapping[str, Any]) -> PictureOptions:
    """PictureOptions from a frame's or a request's query (values as strings or numbers)."""
    if not isinstance(query, Mapping):
        raise InvalidRequest("options: expected a map of picture options", argument="options")
    options = {str(k)[:OPTION_MAX + 1]: str(v) for k, v in query.items() if v is not None}
    for name, value in options.items():  # every option is a word or a few numbers: none is parsed past this
        if len(name) > OPTION_MAX or len(value) > OPTION_MAX:
            raise InvalidRequest(f"{name[:OPTION_MAX]}: a picture option is at most {OPTION_MAX} characters",
                                 argument="options")
    return PictureOptions.parse(options)


OPTION_MAX = 64
