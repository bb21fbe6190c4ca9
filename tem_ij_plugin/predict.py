"""Tiled inference of a trained network on 2-D images and Z stacks.

Images are normalised by robust percentiles, padded (reflect) to whole tiles, cut into overlapping
tiles (:mod:`tem_ij_plugin.tiling`), run in batches and blended back with a raised-cosine window, so
tile borders leave no seams.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext

import numpy as np
import torch

from .errors import Cancelled
from .tiling import blend_window, pad_amounts, stitch, tile_specs

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


def normalize(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` to ``[0, 1]`` as float32 (values outside stay outside; NaN/inf become 0)."""
    out = (data.astype(np.float32) - lo) / (hi - lo)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32, copy=False)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; an explicit device that is missing is an error."""
    from .errors import UserError

    name = (name or "auto").lower()
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if has_mps else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(
                f"device '{name}' requested but CUDA is not available here (torch {torch.__version__}); "
                "use --device auto or cpu"
            )
        return torch.device(name)
    if name == "mps":
        if not has_mps:
            raise UserError("device 'mps' requested but Apple MPS is not available; use --device auto or cpu")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps")


def autocast_context(device: torch.device, precision: str):
    """Autocast for ``bf16``/``fp16``; ``auto`` means bf16 on CUDA that supports it, fp32 elsewhere."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict_plane(
    net: torch.nn.Module,
    image: np.ndarray,
    device: torch.device,
    tile: int = 256,
    overlap: int = 32,
    batch_size: int = 4,
    precision: str = "auto",
    cancel=None,
) -> np.ndarray:
    """Class probabilities of one normalised 2-D image.

    Parameters
    ----------
    net : torch.nn.Module
        A network with ``n_classes`` and ``size_multiple`` attributes, in eval mode.
    image : ndarray of float32, shape (H, W)
        Normalised image.
    device : torch.device
    tile, overlap, batch_size : int
        Tiling; the tile is rounded up to the network's size multiple.
    precision : str
        ``auto``, ``fp32``, ``bf16`` or ``fp16``.
    cancel : threading.Event, optional
        Checked between batches; raises :class:`Cancelled` when set.

    Returns
    -------
    ndarray of float32, shape (C, H, W)
        Softmax probabilities.
    """
    h, w = image.shape
    mult = net.size_multiple
    tile = int(np.ceil(tile / mult) * mult)
    overlap = min(overlap, tile - mult)
    ph, pw = pad_amounts(h, w, tile, mult)
    padded = np.pad(image, ((0, ph), (0, pw)), mode="reflect" if min(h, w) > 1 else "edge")
    H, W = padded.shape
    tiles = tile_specs(H, W, tile, overlap)
    window = blend_window(tile, overlap)
    acc = np.zeros((net.n_classes, H, W), dtype=np.float32)
    wsum = np.zeros((H, W), dtype=np.float32)
    src = torch.from_numpy(padded)
    for i in range(0, len(tiles), batch_size):
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        chunk = tiles[i : i + batch_size]
        x = torch.stack([src[t.y0 : t.y0 + t.size, t.x0 : t.x0 + t.size] for t in chunk])[:, None]
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        with autocast_context(device, precision):
            probs = torch.softmax(net(x).float(), dim=1).cpu().numpy()
        for t, p in zip(chunk, probs):
            stitch(acc, wsum, t, p, window)
    return (acc / wsum)[:, :h, :w]


def predict_stack(
    net: torch.nn.Module,
    data: np.ndarray,
    normalization: dict,
    device: torch.device,
    tile: int = 256,
    overlap: int = 32,
    batch_size: int = 4,
    precision: str = "auto",
    progress=None,
    cancel=None,
) -> np.ndarray:
    """Probabilities of every plane of a (Z, Y, X) stack, normalised as the model was trained.

    Returns
    -------
    ndarray of float32, shape (Z, C, Y, X)
    """
    lo, hi = normalization_range(data, normalization.get("low", 1.0), normalization.get("high", 99.8))
    net.eval()
    out = np.empty((data.shape[0], net.n_classes) + data.shape[1:], dtype=np.float32)
    start = time.perf_counter()
    for z in range(data.shape[0]):
        out[z] = predict_plane(net, normalize(data[z], lo, hi), device, tile, overlap, batch_size, precision, cancel)
        if progress is not None:
            progress(
                {"stage": "predict", "done": z + 1, "total": data.shape[0], "elapsed_s": time.perf_counter() - start}
            )
    return out
