"""Tiles as pure data, a blending window and stitching (numpy only, no torch).

A :class:`Tile` says which window of the (padded) image a network input covers; :func:`stitch`
adds weighted tile outputs into an accumulator so that overlapping tiles blend smoothly and
non-overlapping parts are copied exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    """Window ``[y0, y0 + height) x [x0, x0 + width)`` of a (padded) image."""

    y0: int
    x0: int
    height: int
    width: int


def _axis(length: int, tile: int, overlap: int, multiple: int) -> tuple:
    """The tile size and starts along one axis: the fewest tiles of at most ``tile``, then spread evenly.

    The count comes first (the fewest tiles of ``tile`` pixels that overlap by ``overlap``); the size is
    then the smallest with which that many still cover ``length`` (960-pixel tiles on 2928 rows: 4 of
    912, not 4 of 960). Sizes and starts are counted in steps of ``multiple``, the network's pooling
    grid: a tile shifted off that grid would pool other pixels together than the whole plane does.
    """
    if length <= tile:
        return length, [0]
    units, max_units = length // multiple, tile // multiple
    overlap_units = -(-overlap // multiple)
    n = -(-(units - overlap_units) // (max_units - overlap_units))
    size = min(max_units, -(-(units + (n - 1) * overlap_units) // n))
    # floor((i * span) / (n - 1)): steps differ by at most one unit and never exceed size - overlap
    return size * multiple, [i * (units - size) // (n - 1) * multiple for i in range(n)]


def tile_specs(height: int, width: int, tile: int, overlap: int, multiple: int = 1) -> list:
    """Tiles of at most ``tile`` x ``tile`` covering a ``height`` x ``width`` image, fitted to it.

    Neighbouring tiles overlap by at least ``overlap`` pixels; along each axis the tiles have one size
    (a multiple of ``multiple``, as the network needs; the image sides must be multiples too) and are
    spread evenly from border to border, so no tile reaches past the image.
    """
    if not 0 <= overlap < tile:
        raise ValueError("overlap must be >= 0 and smaller than the tile")
    if tile % multiple or -(-overlap // multiple) * multiple >= tile:
        raise ValueError("the tile must be a multiple of the network's size multiple, and more than the overlap")
    if height % multiple or width % multiple or min(height, width) < 1:
        raise ValueError("pad the image to a multiple of the network's size multiple before tiling")
    th, ys = _axis(height, tile, overlap, multiple)
    tw, xs = _axis(width, tile, overlap, multiple)
    return [Tile(y, x, th, tw) for y in ys for x in xs]


HALO_FRACTION = 3 / 8  # of the overlap, at each inner tile edge, gets (almost) no weight


def _side_weights(tile: int, overlap: int, open_start: bool, open_end: bool) -> np.ndarray:
    w = np.ones(tile, dtype=np.float64)
    if overlap > 0:
        halo = int(HALO_FRACTION * overlap)
        ramp = max(1, overlap - 2 * halo)
        left = np.ones(tile)
        left[: min(tile, halo)] = 0.0
        part = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
        left[halo : halo + ramp] = part[: max(0, tile - halo)]
        # The smaller of the two sides, so that tiles narrower than two halos and ramps still weight
        # only their centre. A side on the image border is open: the whole image has no more context
        # there either, so its pixels are as good as any.
        w = np.minimum(np.ones(tile) if open_start else left, np.ones(tile) if open_end else left[::-1])
    return np.maximum(w, 1e-6)


def blend_window(
    shape, overlap: int, top: bool = False, bottom: bool = False, left: bool = False, right: bool = False
) -> np.ndarray:
    """Weights of ``shape`` (height, width; an int for a square) for blending tiles that overlap by ``overlap``.

    Along each inner side: a halo of ``3/8 * overlap`` pixels next to the tile edge gets a negligible
    weight (1e-6: a tile's outputs near its edge lack context), then a raised-cosine ramp over the
    middle quarter of the overlap, then 1. Where two tiles overlap (by ``overlap`` or more), every pixel
    with a real weight is therefore at least a halo away from the edge of the tile it comes from. Sides
    flagged ``top``, ``bottom``, ``left``, ``right`` lie on the image border and get no halo. The weight
    is never zero.
    """
    height, width = (shape, shape) if isinstance(shape, int) else shape
    wy = _side_weights(height, overlap, top, bottom)
    wx = _side_weights(width, overlap, left, right)
    return np.outer(wy, wx).astype(np.float32)


def tile_window(tile: Tile, height: int, width: int, overlap: int, cache: dict | None = None) -> np.ndarray:
    """:func:`blend_window` for ``tile`` in an image of ``height`` x ``width``, its border sides open."""
    sides = (tile.y0 == 0, tile.y0 + tile.height >= height, tile.x0 == 0, tile.x0 + tile.width >= width)
    key = (tile.height, tile.width, *sides)
    if cache is not None and key in cache:
        return cache[key]
    w = blend_window((tile.height, tile.width), overlap, *sides)
    if cache is not None:
        cache[key] = w
    return w


def overlap_for_halo(halo: int, multiple: int = 8) -> int:
    """The smallest overlap (a multiple of ``multiple``) whose blending halo is at least ``halo`` pixels."""
    overlap = int(np.ceil(halo / HALO_FRACTION))
    while int(HALO_FRACTION * overlap) < halo:
        overlap += 1
    return int(np.ceil(overlap / multiple) * multiple)


def stitch(accumulator: np.ndarray, weights: np.ndarray, tile: Tile, values: np.ndarray, window: np.ndarray) -> None:
    """Add ``values`` of shape (C, height, width) weighted by ``window`` into the accumulators in place."""
    ys = slice(tile.y0, tile.y0 + tile.height)
    xs = slice(tile.x0, tile.x0 + tile.width)
    accumulator[:, ys, xs] += values * window
    weights[ys, xs] += window


def pad_amounts(height: int, width: int, tile: int, multiple: int) -> tuple:
    """Bottom/right padding so that the image is at least one tile and a multiple of ``multiple``.

    >>> pad_amounts(100, 530, 256, 16)
    (156, 14)
    """

    def need(n):
        target = max(n, tile)
        return (-target) % multiple + target - n

    return need(height), need(width)
