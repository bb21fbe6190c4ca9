"""Tiled inference of a trained network on 2-D images and stacks, in bounded memory.

Images are normalised by robust percentiles, padded (reflect) to the network's size multiple, cut into
overlapping tiles fitted to the plane (:mod:`tem_ij_plugin.tiling`), run in batches and blended back
with a raised-cosine window whose overlap covers the network's effective receptive field, so tile
borders leave no seams. Stacks are
processed one plane at a time: the next plane is read while the current one is computed and the
previous one is written, so memory does not grow with the number of planes.

The concerns it uses live beside it: :mod:`~tem_ij_plugin.runtime` (device, precision),
:mod:`~tem_ij_plugin.normalization`, :mod:`~tem_ij_plugin.receptive` (receptive field, BatchNorm
folding) and :mod:`~tem_ij_plugin.backends` (torch, onnxruntime, test-time augmentation).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .backends import (
    TTA_MODES,
    OnnxBackend,
    TTABackend,
    _auto_runner,
    _int8_runner,
    graph_cache_dir,
    onnx_available,
)
from .errors import Cancelled, UserError
from .events import PredictEvent
from .normalization import normalization_terms, normalize, sampled_range
from .receptive import HALO_MASS, effective_receptive_field, fold_batchnorm
from .runtime import PeriodicRelease, autocast_context, available_memory, reuse_freed_memory
from .tiling import overlap_for_halo, pad_amounts, stitch, tile_specs, tile_window

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from .events import CancelToken, ProgressSink

log = logging.getLogger(__name__)


#: The largest default CPU tile. 2048- and 3072-pixel tiles of the default model cost 4-5 % and 17 %
#: more per computed pixel than 1024-pixel ones but compute 28 % and 34 % fewer on a 3840x2920 plane;
#: 3072 was no faster than 2048 for 0.7-1.5 GB more, and a whole plane slower (torch bf16, AMD EPYC,
#: 2 cores; README, *Tile size on the CPU* to *The decoder without its upsampling*).
CPU_MAX_TILE = 2048
#: Peak process memory per pixel of a CPU tile and per base channel of the network, rounded up from the
#: default 16-channel model's growth from 1024- to 2048-pixel tiles: 15 bytes with torch bf16 (20 since
#: freed memory is kept for reuse), 46 with onnxruntime fp32 (``benchmarks/predict_tiles.py``).
TILE_BYTES_PER_PIXEL_CHANNEL = 48


def default_tiling(
    device: torch.device,
    halo: int,
    multiple: int,
    base_channels: int = 16,
    available: int | None = None,
    prefer: int | None = None,
) -> tuple:
    """(tile, overlap, batch) per device: large tiles amortise the overlap; GPUs take larger batches.

    The overlap gives a blending halo (see :func:`~tem_ij_plugin.tiling.blend_window`) of at least
    ``halo`` pixels. On a CPU the tile is 8 overlaps (at least 1024, at most :data:`CPU_MAX_TILE`
    pixels), which computes 1.17x the pixels of a 3840x2920 plane where 4 overlaps computed 1.62x,
    when a tile's estimated memory is at most half of ``available`` bytes (see
    :func:`~tem_ij_plugin.runtime.available_memory`); else the largest that is, down to 4 overlaps
    (at least 512 pixels), the size used when ``available`` is unknown. ``prefer`` (an interrupted
    run's tile) replaces the tile when it lies between 4 overlaps and the tile chosen here.
    """
    overlap = max(32, overlap_for_halo(halo, multiple))
    if device.type != "cpu":
        return max(1024, 4 * overlap), overlap, 4
    small = tile = max(512, 4 * overlap)
    if available is not None:
        tile = max(small, min(CPU_MAX_TILE, max(1024, 8 * overlap)))
        step = max(multiple, 128)
        while tile > small and tile * tile * base_channels * TILE_BYTES_PER_PIXEL_CHANNEL > available / 2:
            tile = max(small, tile - step)
    if prefer is not None and small <= prefer <= tile and prefer % multiple == 0:
        tile = prefer
    return tile, overlap, 1


def check_tiling(tile: int, overlap: int, derived: bool, halo: int) -> None:
    """Refuse an overlap that leaves no step between tiles, whether the user gave it or it came from the model.

    A derived overlap used to be clipped silently to just under the tile, which made a small ``--tile``
    into tens of thousands of tiles per plane.
    """
    if 0 <= overlap < tile:
        return
    if derived:
        raise UserError(
            f"--tile {tile} is too small for this model: its receptive field (radius {halo} px) needs an overlap "
            f"of {overlap} px between tiles, so tiles must be larger than that ({4 * overlap} px is the default "
            "size); use a larger --tile, or give --overlap explicitly (a smaller overlap may show seams)"
        )
    raise UserError(f"need 0 <= --overlap < --tile; got overlap {overlap} with tiles of {tile} px")


@dataclass
class TileEvent:
    """One batch of tiles done (passed to the ``on_batch`` callback of :meth:`Predictor.plane`)."""

    tiles_done: int
    tiles_total: int
    pixels: int


class Predictor:
    """Tiled, blended prediction of 2-D planes with a chosen backend.

    Build it with :func:`make_predictor`. Attributes ``tile``, ``overlap``, ``batch_size``,
    ``backend`` (``torch`` or ``onnx``), ``precision`` and ``halo`` (the effective receptive field
    radius) say what it does.
    """

    #: Read probabilities back from a GPU through a page-locked buffer: a copy into pageable memory ran at
    #: about 1.3 GB/s on an H200 machine, 72 ms of a 3840x2920 image's 0.16 s. Off only to measure that.
    pinned_readback = True

    def __init__(self, backend, n_classes, multiple, tile, overlap, batch_size, halo, device):
        self._staging = None
        self.backend = backend
        self.n_classes = n_classes
        self.multiple = multiple
        self.tile = int(np.ceil(tile / multiple) * multiple)
        self.overlap = overlap
        check_tiling(self.tile, overlap, derived=False, halo=halo)
        self.batch_size = batch_size
        self.halo = halo
        self.device = device

    @property
    def precision(self) -> str:
        """The backend's precision (``fp32``, ``bf16`` or ``fp16``)."""
        return self.backend.precision

    def describe(self) -> str:
        """One line for logs: backend, precision, device, tiling."""
        return (
            f"{self.backend.name} {self.precision} on {self.device}, tiles of at most {self.tile} px with "
            f"{self.overlap} px overlap (receptive-field radius {self.halo} px), batch {self.batch_size}"
            + (f", test-time augmentation x{self.backend.n}" if isinstance(self.backend, TTABackend) else "")
        )

    def plane(
        self,
        image: np.ndarray,
        on_batch: Callable[[TileEvent], None] | None = None,
        cancel: CancelToken | None = None,
        normalization: tuple | None = None,
    ) -> np.ndarray:
        """Class probabilities of one 2-D image.

        Parameters
        ----------
        image : ndarray, shape (H, W)
            Normalised float32, or the raw plane (any numeric dtype) when ``normalization`` is given.
        on_batch : callable, optional
            Called with a :class:`TileEvent` after each batch of tiles.
        cancel : threading.Event, optional
            Checked between batches; raises :class:`Cancelled` when set.
        normalization : (lo, hi), optional
            The range :func:`~tem_ij_plugin.normalization.normalize` maps to [0, 1]. On a GPU the raw
            plane crosses the bus (1 byte a pixel for uint8, not 4) and is normalised there, with the
            same float32 arithmetic.

        Returns
        -------
        ndarray of float32, shape (C, H, W)
        """
        with reuse_freed_memory(enabled=self.device.type == "cpu"):
            return self._plane(image, on_batch, cancel, normalization)

    def _plane(self, image, on_batch, cancel, normalization) -> np.ndarray:
        """:meth:`plane`'s work."""
        h, w = image.shape
        mult = self.multiple
        ph, pw = pad_amounts(h, w, mult, mult)
        on_device = self.backend.on_device
        to_gpu = on_device and self.device.type != "cpu"
        if normalization is not None and not to_gpu:
            image, normalization = normalize(image, *normalization), None
        # Reflect padding commutes with the per-pixel normalisation, so the raw plane is padded as it is.
        padded = np.pad(image, ((0, ph), (0, pw)), mode="reflect" if min(h, w) > 1 else "edge")
        # Tiles fitted to the plane: an axis no longer than a tile is one tile of its own length
        overlap = self.overlap
        tiles = tile_specs(padded.shape[0], padded.shape[1], self.tile, overlap, mult)
        windows: dict = {}  # blend windows by border flags (numpy)
        device_windows: dict = {}  # the same on the compute device
        if on_device:
            # The whole plane goes to the device once; tiles are cut and blended there.
            src = _to_device(padded, self.device, normalization)
            acc = torch.zeros((self.n_classes,) + padded.shape, dtype=torch.float32, device=self.device)
            wsum = torch.zeros(padded.shape, dtype=torch.float32, device=self.device)
            stack = torch.stack
        else:
            src = padded
            acc = np.zeros((self.n_classes,) + padded.shape, dtype=np.float32)
            wsum = np.zeros(padded.shape, dtype=np.float32)
            stack = np.stack
        for i in range(0, len(tiles), self.batch_size):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            chunk = tiles[i : i + self.batch_size]
            x = stack([src[t.y0 : t.y0 + t.height, t.x0 : t.x0 + t.width] for t in chunk])[:, None]
            probs = self.backend(x)
            for t, p in zip(chunk, probs):
                window = tile_window(t, *padded.shape, overlap, windows)
                if on_device:  # each of the (at most 9) windows goes to the device once
                    if id(window) not in device_windows:
                        device_windows[id(window)] = torch.from_numpy(window).to(self.device)
                    window = device_windows[id(window)]
                stitch(acc, wsum, t, p, window)
            if on_batch is not None:
                pixels = sum(t.height * t.width for t in chunk)
                on_batch(TileEvent(min(i + self.batch_size, len(tiles)), len(tiles), pixels))
        out = acc[:, :h, :w] / wsum[:h, :w]
        return self._to_host(out) if on_device else out

    def _to_host(self, out: torch.Tensor) -> np.ndarray:
        """``out`` as a numpy array; from a GPU through a reused page-locked buffer when ``pinned_readback``."""
        if out.device.type != "cuda" or not self.pinned_readback:
            return out.cpu().numpy()
        if self._staging is None or self._staging.shape != out.shape:
            self._staging = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        self._staging.copy_(out)
        # A copy: the caller may keep many planes (predict_stack), which must not hold page-locked memory.
        return self._staging.numpy().copy()


def _to_device(plane: np.ndarray, device: torch.device, normalization: tuple | None) -> torch.Tensor:
    """``plane`` on ``device`` as float32, normalised there when ``normalization`` is given."""
    if normalization is None:
        src = plane.astype(np.float32, copy=False)
    elif plane.dtype == np.uint16:  # torch has no CUDA arithmetic on uint16: its bits cross as int16
        src = plane.view(np.int16)
    elif plane.dtype in (np.uint8, np.int8, np.int16, np.int32, np.float32):
        src = plane
    else:  # float64, uint32, ...: converted first, as normalize() does
        src = plane.astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(src))
    if device.type == "cuda":
        t = t.pin_memory()
    t = t.to(device, non_blocking=True)
    if normalization is None:
        return t
    if plane.dtype == np.uint16:
        t = t.to(torch.int32) & 0xFFFF
    # normalize()'s float32 arithmetic. The terms are 0-d tensors on the device, not Python scalars: CUDA
    # may divide by a CPU scalar as a multiplication by its reciprocal, which can differ in the last bit.
    lo, scale = (torch.tensor(v, dtype=torch.float32, device=device) for v in normalization_terms(*normalization))
    out = (t.to(torch.float32) - lo) / scale
    return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def make_predictor(
    net: torch.nn.Module,
    device: torch.device,
    backend: str = "auto",
    precision: str = "auto",
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    probe: np.ndarray | None = None,
    halo: int | None = None,
    tta: str = "off",
    resume_tile: int | None = None,
) -> Predictor:
    """A :class:`Predictor` for ``net`` with the fastest correct path unless told otherwise.

    Parameters
    ----------
    net : RecurrentUNet
        Trained network (not modified: BatchNorm is folded into a copy).
    device : torch.device
    backend : str
        ``auto``: on the CPU in fp32, onnxruntime when installed, else torch; torch otherwise. Or
        ``torch``, ``onnx``.
    precision : str
        ``auto``: bf16 autocast on CUDA (fp16 without bf16) and on CPUs that compute bf16 in hardware
        (AVX512-BF16, AMX), fp32 elsewhere. Or ``fp32``, ``bf16``, ``fp16``, ``int8`` (onnxruntime on
        the CPU, calibrated on ``probe``: activation ranges from the image itself). Reduced precision
        (the image keeps its precision in the first convolution) is checked on ``probe`` against fp32
        and dropped unless it keeps the class of 99.9 % of the pixels, each class's IoU at 0.99 or more,
        and changes a class only where fp32's top-two margin was at most 0.1
        (:func:`~tem_ij_plugin.backends.precision_report`).
    tile, overlap, batch_size : int, optional
        Tiling; defaults per device (:func:`default_tiling`), the overlap at least twice the
        effective receptive field radius.
    probe : ndarray, optional
        A normalised 2-D crop of the image (:func:`probe_crop`), used to check reduced precision.
    halo : int, optional
        The network's effective receptive field radius (:data:`HALO_MASS`) if known (model files
        store it); computed otherwise.
    tta : str
        Test-time augmentation: ``off``, ``flips`` (mean over 4 flips, 4x the work) or ``dihedral``
        (8 symmetries, 8x).
    resume_tile : int, optional
        An interrupted run's tile, used instead of the default when ``tile`` is None and it is one
        the default could be here (:func:`default_tiling`'s ``prefer``).
    """
    if tta not in TTA_MODES:
        raise UserError(f"unknown test-time augmentation '{tta}'; use {', '.join(TTA_MODES)}")
    if backend not in ("auto", "torch", "onnx"):
        raise UserError(f"unknown backend '{backend}'; use auto, torch or onnx")
    if precision not in ("auto", "fp32", "bf16", "fp16", "int8"):
        raise UserError(f"unknown precision '{precision}'; use auto, fp32, bf16, fp16 or int8")
    infer = fold_batchnorm(net).float()
    if halo is None:
        halo = effective_receptive_field(infer, HALO_MASS)
    free = available_memory() if tile is None else None
    d_tile, d_overlap, d_batch = default_tiling(device, halo, net.size_multiple, net.base_channels, free, resume_tile)
    tile = int(np.ceil((tile or d_tile) / net.size_multiple) * net.size_multiple)
    check_tiling(tile, d_overlap if overlap is None else overlap, derived=overlap is None, halo=halo)
    overlap = d_overlap if overlap is None else overlap
    if precision == "int8":
        if device.type != "cpu" or backend == "torch" or not onnx_available():
            raise UserError(
                "int8 runs on the CPU with onnxruntime: --device cpu --backend auto (pip install 'tem-ij-plugin[onnx]')"
            )
        runner = _int8_runner(infer, probe)
    elif backend == "onnx":
        if device.type != "cpu":
            raise UserError("the onnx backend runs on the CPU; use --backend torch for a GPU")
        if precision not in ("auto", "fp32"):
            raise UserError("the onnx backend computes in fp32; use --backend torch for bf16/fp16")
        if not onnx_available():
            raise UserError("the onnx backend needs onnxruntime and onnx: pip install 'tem-ij-plugin[onnx]'")
        try:
            runner = OnnxBackend(infer, cache=graph_cache_dir())
        except ImportError as exc:  # found by name but broken (a missing shared library, say)
            raise UserError(
                f"onnxruntime or onnx is installed but does not import ({exc}); reinstall them "
                "(pip install --force-reinstall onnx onnxruntime) or use --backend torch"
            ) from exc
    else:
        runner = _auto_runner(infer, device, backend, precision, probe)
    if batch_size is None and runner.name == "onnx" and tile <= 512:
        # onnxruntime: +5 % over batch 1 at 512-pixel tiles on 2 cores (torch: -7 %); larger tiles stay
        # at 1, as 2 x 960-pixel tiles of the depth-5 model took the process to 2.3 GB.
        batch_size = 2
    batch_size = batch_size or d_batch
    if tta != "off":
        runner = TTABackend(runner, tta)
    return Predictor(runner, net.n_classes, net.size_multiple, tile, overlap, batch_size, halo, device)


#: How often a stack's (or a batch's) prediction hands the memory it keeps for reuse back to the system.
#: Each time costs one plane's page faults again; 400 planes of 2048x2048 ran at 2.74 MP/s with it and
#: 2.71 without, and peaked at 1.6 GB instead of 2.5 in that run, at 2.0 GB in a later one (README,
#: *Where a tile's time goes* and *The decoder without its upsampling*).
RELEASE_EVERY_PLANES = 16


def predict_planes(
    predictor: Predictor,
    read: Callable[[int], np.ndarray],
    n_planes: int,
    lo: float,
    hi: float,
    sink: Callable[[int, np.ndarray], object],
    skip: Iterable[int] = (),
    progress: ProgressSink | None = None,
    cancel: CancelToken | None = None,
) -> None:
    """Predict planes one by one and hand each to ``sink(i, probabilities)``.

    The next plane is read and the previous one handed to ``sink`` in background threads while the
    current one is computed; at most one plane waits on each side, so memory stays bounded.

    Parameters
    ----------
    predictor : Predictor
    read : callable
        ``read(i)`` returns plane ``i`` as a 2-D array.
    n_planes : int
    lo, hi : float
        Normalisation range (see :func:`sampled_range`).
    sink : callable
        ``sink(i, probs)`` with probs of shape (C, Y, X); runs in a writer thread.
    skip : collection of int
        Planes already done (``--resume``).
    progress : callable, optional
        Receives dicts with ``stage="predict"``, ``plane``, ``planes``, ``tiles_done``, ``tiles_total``,
        ``done`` and ``total`` (planes, including skipped ones), ``elapsed_s``, ``megapixels_per_s``
        and ``eta_s``.
    cancel : threading.Event, optional
        Checked between tile batches; raises :class:`Cancelled` after the pending write finished.
    """
    todo = [i for i in range(n_planes) if i not in set(skip)]
    start = time.perf_counter()
    pixels = 0
    done_before = n_planes - len(todo)
    # One block of reused memory over every plane: each plane's tensors reuse the last one's pages.
    on_cpu = predictor.device.type == "cpu"
    releases = PeriodicRelease(RELEASE_EVERY_PLANES, enabled=on_cpu)  # so that the peak does not creep up
    with reuse_freed_memory(enabled=on_cpu), ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        pending = None
        nxt = reader.submit(read, todo[0]) if todo else None
        try:
            for k, i in enumerate(todo):
                plane = nxt.result()
                nxt = reader.submit(read, todo[k + 1]) if k + 1 < len(todo) else None

                def on_batch(ev, i=i, k=k):
                    nonlocal pixels
                    pixels += ev.pixels
                    if progress is None:
                        return
                    elapsed = time.perf_counter() - start
                    frac = (k + ev.tiles_done / ev.tiles_total) / len(todo)
                    progress(
                        PredictEvent(
                            stage="predict",
                            plane=i + 1,
                            planes=n_planes,
                            tiles_done=ev.tiles_done,
                            tiles_total=ev.tiles_total,
                            done=done_before + k + (ev.tiles_done == ev.tiles_total),
                            total=n_planes,
                            elapsed_s=elapsed,
                            megapixels_per_s=pixels / 1e6 / max(elapsed, 1e-9),
                            eta_s=elapsed * (1 - frac) / max(frac, 1e-9),
                        )
                    )

                probs = predictor.plane(plane, on_batch, cancel, normalization=(lo, hi))
                if pending is not None:
                    pending.result()  # surfaces a write error before more work is done
                pending = writer.submit(sink, i, probs)
                releases.done()
            if pending is not None:
                pending.result()
        except BaseException:
            if pending is not None and not pending.done():
                pending.result()  # finish (or fail) the plane being written, so the state stays true
            raise


PROBE_SIZE = 512  # the side of the region a reduced precision is checked on (about 0.3 s of fp32 + bf16 on 2 cores)


def probe_crop(plane: np.ndarray, size: int = PROBE_SIZE) -> np.ndarray:
    """The centre ``size`` x ``size`` of a plane (all of a smaller one): where a reduced precision is checked.

    The centre rather than a corner: a corner of an EM section is often empty resin or the grid.
    """
    h, w = plane.shape
    y0, x0 = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return plane[y0 : y0 + size, x0 : x0 + size]


def predict_stack(
    net: torch.nn.Module,
    data: np.ndarray,
    normalization: dict,
    device: torch.device,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    precision: str = "auto",
    progress: ProgressSink | None = None,
    cancel: CancelToken | None = None,
    backend: str = "torch",
    tta: str = "off",
) -> np.ndarray:
    """Probabilities of every plane of an in-memory (Z, Y, X) stack, normalised as the model was trained.

    ``tta``: test-time augmentation (see :func:`make_predictor`).

    Returns
    -------
    ndarray of float32, shape (Z, C, Y, X)
    """
    lo, hi = sampled_range(lambda i: data[i], data.shape[0], normalization)
    probe = normalize(probe_crop(data[0]), lo, hi)
    pred = make_predictor(net, device, backend, precision, tile, overlap, batch_size, probe=probe, tta=tta)
    out = np.empty((data.shape[0], net.n_classes) + data.shape[1:], dtype=np.float32)

    def sink(i, probs):
        out[i] = probs

    predict_planes(pred, lambda i: data[i], data.shape[0], lo, hi, sink, progress=progress, cancel=cancel)
    return out


@torch.no_grad()
def predict_plane(net: torch.nn.Module, image: np.ndarray, device: torch.device, precision: str = "fp32") -> np.ndarray:
    """Probabilities of one small normalised 2-D image in a single pass (training's validation).

    The image is padded to the network's size multiple; the network is used as it is (no copy).
    """
    h, w = image.shape
    ph, pw = pad_amounts(h, w, 1, net.size_multiple)
    x = torch.from_numpy(np.pad(image, ((0, ph), (0, pw)), mode="reflect" if min(h, w) > 1 else "edge"))
    x = x[None, None].to(device).contiguous(memory_format=torch.channels_last)
    with autocast_context(device, precision):
        probs = torch.softmax(net(x).float(), dim=1)
    return probs[0, :, :h, :w].cpu().numpy()
