"""Intensity normalisation: robust percentiles of an image or a stack, and the mapping they define."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from .errors import ModelFileError

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

DEFAULT_NORMALIZATION = {"method": "percentile", "low": 1.0, "high": 99.8}


def normalization_range(data: np.ndarray, low: float = 1.0, high: float = 99.8, max_samples: int = 2_000_000):
    """Intensities at the ``low`` and ``high`` percentiles, from an even subsample of the pixels."""
    flat = data.reshape(-1)
    step = max(1, flat.size // max_samples)
    sample = flat[::step].astype(np.float32)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def normalization_terms(lo: float, hi: float) -> tuple:
    """The float32 offset and divisor of :func:`normalize` (shared with the GPU's copy of it)."""
    return np.float32(lo), np.float32(hi - lo)


def normalize(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` to ``[0, 1]`` as float32 (values outside stay outside; NaN/inf become 0)."""
    offset, scale = normalization_terms(lo, hi)
    out = (data.astype(np.float32) - offset) / scale
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32, copy=False)


def check_normalization(normalization: dict) -> dict:
    """The model's normalisation if this version can apply it, else a :class:`ModelFileError`."""
    method = normalization.get("method")
    if method != "percentile":
        raise ModelFileError(
            f"the model normalises images with '{method}', which this version of tem_ij_plugin does not know; "
            "update tem_ij_plugin or retrain the model"
        )
    return normalization


def sampled_range(read: Callable[[int], np.ndarray], n_planes: int, normalization: dict, max_planes: int = 16):
    """Percentile range of a stack from up to ``max_planes`` evenly spaced planes (bounded memory)."""
    norm = check_normalization(normalization)
    idx = np.unique(np.linspace(0, n_planes - 1, min(n_planes, max_planes)).round().astype(int))
    per_plane = max(1, 2_000_000 // len(idx))
    samples = []
    for i in idx:
        flat = np.asarray(read(int(i))).reshape(-1)
        samples.append(flat[:: max(1, flat.size // per_plane)])
    return normalization_range(np.concatenate(samples), norm.get("low", 1.0), norm.get("high", 99.8))
