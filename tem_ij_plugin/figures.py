"""Figures as plain RGB arrays (no plotting library): panels, probability maps, patch-grid overlays."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .patches import Patch

RED = (230, 40, 40)
BLUE = (40, 110, 255)
GREEN = (40, 200, 70)


def to_rgb(gray: np.ndarray) -> np.ndarray:
    """An 8-bit RGB view of a greyscale image, contrast-stretched to its 0.5-99.5 percentiles."""
    lo, hi = np.percentile(gray, [0.5, 99.5])
    g = np.clip((gray.astype(np.float32) - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def probability_rgb(prob: np.ndarray) -> np.ndarray:
    """A probability map in [0, 1] as a dark-blue to yellow colour ramp."""
    p = np.clip(prob, 0, 1)[..., None]
    low, high = np.array([20, 20, 80], np.float32), np.array([255, 230, 40], np.float32)
    return (low + p * (high - low)).astype(np.uint8)


def outline(rgb: np.ndarray, y0: int, x0: int, y1: int, x1: int, color: tuple[int, int, int], width: int = 3) -> None:
    """Draw a rectangle outline in place on an RGB array."""
    y1, x1 = min(y1, rgb.shape[0]), min(x1, rgb.shape[1])
    rgb[y0 : y0 + width, x0:x1] = color
    rgb[max(y1 - width, y0) : y1, x0:x1] = color
    rgb[y0:y1, x0 : x0 + width] = color
    rgb[y0:y1, max(x1 - width, x0) : x1] = color


def patch_overlay(
    gray: np.ndarray,
    labels: np.ndarray,
    patch_size: int,
    train: list[Patch],
    val: list[Patch],
    class_colors: list[tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """The image with its patch grid: training patches red, validation blue, unused green.

    Labelled pixels are tinted by class so the partial annotation is visible.

    Parameters
    ----------
    gray : ndarray, shape (Y, X)
    labels : ndarray of int, shape (Y, X)
        Partial labels (-1 = unlabelled).
    patch_size : int
    train, val : list of Patch
        Patches of this plane.
    """
    rgb = to_rgb(gray).astype(np.float32)
    colors = class_colors or [(70, 140, 255), (255, 120, 40), (200, 60, 220), (60, 220, 200)]
    for c in range(int(labels.max()) + 1):
        m = labels == c
        rgb[m] = 0.55 * rgb[m] + 0.45 * np.array(colors[c % len(colors)], np.float32)
    rgb = rgb.astype(np.uint8)
    h, w = gray.shape
    used = {(p.y0, p.x0) for p in train} | {(p.y0, p.x0) for p in val}
    for y in range(0, h, patch_size):
        for x in range(0, w, patch_size):
            if (y, x) not in used:
                outline(rgb, y, x, y + patch_size, x + patch_size, GREEN, 2)
    for p in train:
        outline(rgb, p.y0, p.x0, p.y1, p.x1, RED)
    for p in val:
        outline(rgb, p.y0, p.x0, p.y1, p.x1, BLUE)
    return rgb


def side_by_side(panels: list[np.ndarray], gap: int = 8) -> np.ndarray:
    """Panels of equal height next to each other on a white background."""
    h = max(p.shape[0] for p in panels)
    out = [np.full((h, gap, 3), 255, np.uint8)]
    for p in panels:
        pad = np.full((h - p.shape[0], p.shape[1], 3), 255, np.uint8)
        out += [np.concatenate([p, pad], axis=0), np.full((h, gap, 3), 255, np.uint8)]
    return np.concatenate(out, axis=1)
