"""Tiled inference of a trained network on 2-D images and stacks: backends, precision, bounded memory.

Images are normalised by robust percentiles, padded (reflect) to whole tiles, cut into overlapping
tiles (:mod:`tem_ij_plugin.tiling`), run in batches and blended back with a raised-cosine window whose
overlap covers the network's effective receptive field, so tile borders leave no seams. Stacks are
processed one plane at a time: the next plane is read while the current one is computed and the
previous one is written, so memory does not grow with the number of planes.

Backends: ``torch`` (eager, channels_last, BatchNorm folded into the convolutions, optional bf16/fp16
autocast that is checked against fp32 on a probe tile) and ``onnx`` (onnxruntime on the CPU, from
the optional extra ``tem-ij-plugin[onnx]``).
"""

from __future__ import annotations

import copy
import io
import logging
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from .errors import Cancelled, ModelFileError, UserError
from .events import PredictEvent
from .tiling import overlap_for_halo, pad_amounts, stitch, tile_specs, tile_window

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


def resolve_precision(device: torch.device, precision: str, checked: bool = False) -> str:
    """What ``precision="auto"`` means, for training and prediction alike; other values pass through.

    bf16 on a CUDA GPU that supports it; fp16 on an older CUDA GPU only where the result is ``checked``
    against fp32 (prediction's probe tile: training has no loss scaling, so fp16 could underflow);
    fp32 elsewhere, CPUs included (bf16 there was twice as fast but moved probabilities by up to
    0.047-0.066 somewhere in a 3840x2920 image while passing the probe check).
    """
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    if torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp16" if checked else "fp32"


def autocast_context(device: torch.device, precision: str):
    """Autocast for ``bf16``/``fp16`` (``auto``: see :func:`resolve_precision`); nothing for fp32."""
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


PRECISION_TOLERANCE = 0.02  # largest probability change accepted from bf16/fp16 instead of fp32
# Share of the effective receptive field the blending halo covers. Measured on a trained depth-4 model:
# a tile's error against the whole image fell below 0.02 at 32 px from its edge and to 0.002 at 40 px,
# while 99 % / 99.9 % of the input gradient lay within 24 / 34 px.
HALO_MASS = 0.999


def fold_batchnorm(net: torch.nn.Module) -> torch.nn.Module:
    """An inference copy of ``net`` with every BatchNorm folded into the convolution before it.

    The input network is not modified. GroupNorm layers are left as they are.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(net).eval()
    for module in net.modules():
        if isinstance(module, torch.nn.Sequential):
            for i in range(len(module) - 1):
                conv, bn = module[i], module[i + 1]
                if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                    module[i] = fuse_conv_bn_eval(conv, bn)
                    module[i + 1] = torch.nn.Identity()
    return net


def effective_receptive_field(net: torch.nn.Module, fraction: float = 0.99, size: int = 256, seed: int = 0) -> int:
    """Radius (pixels) of the square around an output pixel that holds ``fraction`` of its input gradient.

    The effective receptive field of Luo et al. (2016): the gradient of the centre pixel's class
    margin with respect to a textured input, averaged over a few inputs. Input beyond this radius
    barely changes the output, so tile outputs this far from a tile edge are as good as whole-image
    ones; the blending halo is at least this wide.
    """
    net = copy.deepcopy(net).float().cpu().eval()
    mult = getattr(net, "size_multiple", 1)
    size = int(np.ceil(size / mult) * mult)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((4, 1, size, size), generator=gen).requires_grad_(True)
    out = net(x)
    c = size // 2
    (out[:, -1, c, c] - out[:, 0, c, c]).sum().backward()
    g = x.grad.abs().sum(dim=(0, 1)).numpy()
    total = g.sum()
    if total <= 0:
        return 0
    yy, xx = np.indices(g.shape)
    radius = np.maximum(np.abs(yy - c), np.abs(xx - c))
    mass = np.bincount(radius.ravel(), weights=g.ravel())
    return int(np.searchsorted(np.cumsum(mass), fraction * total))


def onnx_available() -> bool:
    """Whether onnxruntime and onnx (extra ``[onnx]``) can be imported."""
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class _Softmax(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.softmax(self.net(x), dim=1)


class _FP32(torch.nn.Module):
    """Runs a layer in fp32 inside an autocast region."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return self.layer(x.float())


def _input_layer_in_fp32(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``net`` whose first convolution stays fp32 under autocast.

    Rounding the normalised image itself to bf16 (8 significant bits) is what moved probabilities
    most: on a trained default model, 0.037 with every layer in bf16 and 0.011 with this one layer
    (0.3 % of the FLOPs) in fp32.
    """
    net = copy.deepcopy(net)
    for module in net.modules():
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Conv2d):
                setattr(module, name, _FP32(child))
                return net
    return net


class TorchBackend:
    """Probabilities from the network in torch on ``device`` (tensors in, tensors out, on the device)."""

    name = "torch"
    on_device = True  # takes and returns tensors on the compute device

    def __init__(self, net: torch.nn.Module, device: torch.device, precision: str = "fp32"):
        self.device = device
        self.precision = precision
        if precision != "fp32":
            net = _input_layer_in_fp32(net)
        self.net = _Softmax(net).to(device).eval().to(memory_format=torch.channels_last)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast_context(self.device, self.precision):
            return self.net(x).float()


class OnnxBackend:
    """Probabilities from onnxruntime on the CPU (numpy in, numpy out).

    The network (with its softmax) is exported to ONNX in memory; its outputs are checked against
    torch on a test input and must agree within 1e-4.
    """

    name = "onnx"
    precision = "fp32"
    on_device = False

    def __init__(self, net: torch.nn.Module, threads: int | None = None):
        import onnxruntime as ort

        self.onnx_bytes = export_onnx(net)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(self.onnx_bytes, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        x = torch.rand((1, 1, 64, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = _Softmax(net).eval()(x).numpy()
        diff = float(np.abs(self(x) - ref).max())
        if diff > 1e-4:
            raise RuntimeError(f"the ONNX export differs from torch by {diff:.2g} (> 1e-4)")

    def __call__(self, x) -> np.ndarray:
        x = x.numpy() if isinstance(x, torch.Tensor) else x
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


TTA_MODES = {"off": 1, "flips": 4, "dihedral": 8}


def _dihedral(x, k: int, inverse: bool = False):
    """Transform ``k`` of the 8 symmetries of the square on the last two axes (torch or numpy)."""
    is_t = isinstance(x, torch.Tensor)
    flip = (lambda a, d: torch.flip(a, d)) if is_t else (lambda a, d: np.flip(a, d))
    swap = (lambda a: a.transpose(-1, -2)) if is_t else (lambda a: np.swapaxes(a, -1, -2))
    fy, fx, tr = bool(k & 1), bool(k & 2), bool(k & 4)
    if inverse and tr:
        x = swap(x)
    if fy:
        x = flip(x, (-2,))
    if fx:
        x = flip(x, (-1,))
    if not inverse and tr:
        x = swap(x)
    return x


class TTABackend:
    """Test-time augmentation: the mean probabilities over flips (4) or all 8 dihedral symmetries.

    Tiles are square, so every symmetry keeps the tile's shape; each costs one more forward pass.
    """

    def __init__(self, backend, mode: str):
        if mode not in TTA_MODES:
            raise UserError(f"unknown test-time augmentation '{mode}'; use {', '.join(TTA_MODES)}")
        self.backend = backend
        self.n = TTA_MODES[mode]
        self.name = backend.name
        self.precision = backend.precision
        self.on_device = backend.on_device

    def __call__(self, x):
        total = None
        for k in range(self.n):
            xk = _dihedral(x, k)
            xk = xk.contiguous() if isinstance(xk, torch.Tensor) else np.ascontiguousarray(xk)
            p = _dihedral(self.backend(xk), k, inverse=True)
            total = p if total is None else total + p
        return total / self.n


def export_onnx(net: torch.nn.Module, size: int = 64) -> bytes:
    """The network with a softmax on its output as ONNX bytes (batch, height and width dynamic)."""
    net = copy.deepcopy(net).float().cpu().eval()
    mult = getattr(net, "size_multiple", 1)
    size = int(np.ceil(size / mult) * mult)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export, which needs onnxscript and
        # has no advantage for this plain convolutional graph; its tracer warnings are expected.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Softmax(net),
            (torch.zeros(1, net.in_channels, size, size),),
            buf,
            dynamo=False,
            input_names=["image"],
            output_names=["probabilities"],
            dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "probabilities": {0: "batch"}},
            opset_version=17,
        )
    return buf.getvalue()


def default_tiling(device: torch.device, halo: int, multiple: int) -> tuple:
    """(tile, overlap, batch) per device: large tiles amortise the overlap; GPUs take larger batches.

    The overlap gives a blending halo (see :func:`~tem_ij_plugin.tiling.blend_window`) of at least
    ``halo`` pixels.
    """
    overlap = max(32, overlap_for_halo(halo, multiple))
    if device.type == "cpu":
        tile, batch = 512, 1
    else:
        tile, batch = 1024, 4
    return max(tile, 4 * overlap), overlap, batch


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

    def __init__(self, backend, n_classes, multiple, tile, overlap, batch_size, halo, device):
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
        return self.backend.precision

    def describe(self) -> str:
        """One line for logs: backend, precision, device, tiling."""
        return (
            f"{self.backend.name} {self.precision} on {self.device}, tiles {self.tile} px with {self.overlap} px "
            f"overlap (receptive-field radius {self.halo} px), batch {self.batch_size}"
            + (f", test-time augmentation x{self.backend.n}" if isinstance(self.backend, TTABackend) else "")
        )

    def plane(self, image: np.ndarray, on_batch=None, cancel=None) -> np.ndarray:
        """Class probabilities of one normalised 2-D image.

        Parameters
        ----------
        image : ndarray of float32, shape (H, W)
        on_batch : callable, optional
            Called with a :class:`TileEvent` after each batch of tiles.
        cancel : threading.Event, optional
            Checked between batches; raises :class:`Cancelled` when set.

        Returns
        -------
        ndarray of float32, shape (C, H, W)
        """
        h, w = image.shape
        mult = self.multiple
        # A small image needs no tile bigger than itself.
        tile = min(self.tile, int(np.ceil(max(h, w) / mult) * mult))
        overlap = min(self.overlap, tile - mult)
        ph, pw = pad_amounts(h, w, tile, mult)
        padded = np.pad(image, ((0, ph), (0, pw)), mode="reflect" if min(h, w) > 1 else "edge")
        tiles = tile_specs(padded.shape[0], padded.shape[1], tile, overlap)
        windows: dict = {}  # blend windows by border flags (numpy)
        device_windows: dict = {}  # the same on the compute device
        on_device = self.backend.on_device
        if on_device:
            src = torch.from_numpy(padded)
            if self.device.type == "cuda":
                src = src.pin_memory()
            # The whole plane goes to the device once; tiles are cut and blended there.
            src = src.to(self.device, non_blocking=True)
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
            x = stack([src[t.y0 : t.y0 + t.size, t.x0 : t.x0 + t.size] for t in chunk])[:, None]
            probs = self.backend(x)
            for t, p in zip(chunk, probs):
                window = tile_window(t, *padded.shape, overlap, windows)
                if on_device:  # each of the (at most 9) windows goes to the device once
                    if id(window) not in device_windows:
                        device_windows[id(window)] = torch.from_numpy(window).to(self.device)
                    window = device_windows[id(window)]
                stitch(acc, wsum, t, p, window)
            if on_batch is not None:
                on_batch(TileEvent(min(i + self.batch_size, len(tiles)), len(tiles), len(chunk) * tile * tile))
        out = acc[:, :h, :w] / wsum[:h, :w]
        return out.cpu().numpy() if on_device else out


def _check_reduced_precision(net, device, precision, probe: np.ndarray) -> str:
    """``precision`` if it stays within :data:`PRECISION_TOLERANCE` of fp32 on ``probe``, else ``fp32``."""
    x = torch.from_numpy(np.ascontiguousarray(probe))[None, None]
    ref = TorchBackend(net, device, "fp32")(x)
    low = TorchBackend(net, device, precision)(x)
    diff = float((ref - low).abs().max())
    if diff > PRECISION_TOLERANCE:
        log.info("%s differs from fp32 by %.3f on a test tile; using fp32", precision, diff)
        return "fp32"
    log.debug("%s vs fp32 on a test tile: max probability difference %.4f", precision, diff)
    return precision


def _auto_runner(infer, device, backend: str, precision: str, probe):
    """The torch or (for ``backend="auto"``) onnxruntime runner; reduced precision checked on ``probe``."""
    precision = resolve_precision(device, precision, checked=probe is not None)
    if precision != "fp32" and probe is not None:
        precision = _check_reduced_precision(infer, device, precision, probe)
    if precision == "fp32" and backend == "auto" and device.type == "cpu" and onnx_available():
        try:
            return OnnxBackend(infer)
        except Exception as exc:  # any export/runtime failure: torch computes the same result
            log.warning("onnxruntime unavailable for this model (%s); using torch", exc)
    return TorchBackend(infer, device, precision)


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
        ``auto``: bf16 autocast on CUDA (fp16 without bf16), fp32 elsewhere. Or ``fp32``, ``bf16``,
        ``fp16``. Reduced precision (the first convolution stays fp32) is checked on ``probe`` against
        fp32 and dropped if a probability moves by more than 0.02 there.
    tile, overlap, batch_size : int, optional
        Tiling; defaults per device (:func:`default_tiling`), the overlap at least twice the
        effective receptive field radius.
    probe : ndarray, optional
        A normalised 2-D crop of the image, used to check reduced precision.
    halo : int, optional
        The network's effective receptive field radius (:data:`HALO_MASS`) if known (model files
        store it); computed otherwise.
    tta : str
        Test-time augmentation: ``off``, ``flips`` (mean over 4 flips, 4x the work) or ``dihedral``
        (8 symmetries, 8x).
    """
    if tta not in TTA_MODES:
        raise UserError(f"unknown test-time augmentation '{tta}'; use {', '.join(TTA_MODES)}")
    if backend not in ("auto", "torch", "onnx"):
        raise UserError(f"unknown backend '{backend}'; use auto, torch or onnx")
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"unknown precision '{precision}'; use auto, fp32, bf16 or fp16")
    infer = fold_batchnorm(net).float()
    if halo is None:
        halo = effective_receptive_field(infer, HALO_MASS)
    d_tile, d_overlap, d_batch = default_tiling(device, halo, net.size_multiple)
    tile = int(np.ceil((tile or d_tile) / net.size_multiple) * net.size_multiple)
    check_tiling(tile, d_overlap if overlap is None else overlap, derived=overlap is None, halo=halo)
    overlap = d_overlap if overlap is None else overlap
    if backend == "onnx":
        if device.type != "cpu":
            raise UserError("the onnx backend runs on the CPU; use --backend torch for a GPU")
        if precision not in ("auto", "fp32"):
            raise UserError("the onnx backend computes in fp32; use --backend torch for bf16/fp16")
        if not onnx_available():
            raise UserError("the onnx backend needs onnxruntime and onnx: pip install 'tem-ij-plugin[onnx]'")
        runner = OnnxBackend(infer)
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


def check_normalization(normalization: dict) -> dict:
    """The model's normalisation if this version can apply it, else a :class:`ModelFileError`."""
    method = normalization.get("method")
    if method != "percentile":
        raise ModelFileError(
            f"the model normalises images with '{method}', which this version of tem_ij_plugin does not know; "
            "update tem_ij_plugin or retrain the model"
        )
    return normalization


def sampled_range(read, n_planes: int, normalization: dict, max_planes: int = 16):
    """Percentile range of a stack from up to ``max_planes`` evenly spaced planes (bounded memory)."""
    norm = check_normalization(normalization)
    idx = np.unique(np.linspace(0, n_planes - 1, min(n_planes, max_planes)).round().astype(int))
    per_plane = max(1, 2_000_000 // len(idx))
    samples = []
    for i in idx:
        flat = np.asarray(read(int(i))).reshape(-1)
        samples.append(flat[:: max(1, flat.size // per_plane)])
    return normalization_range(np.concatenate(samples), norm.get("low", 1.0), norm.get("high", 99.8))


def predict_planes(
    predictor: Predictor, read, n_planes: int, lo: float, hi: float, sink, skip=(), progress=None, cancel=None
):
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
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
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

                probs = predictor.plane(normalize(plane, lo, hi), on_batch, cancel)
                if pending is not None:
                    pending.result()  # surfaces a write error before more work is done
                pending = writer.submit(sink, i, probs)
            if pending is not None:
                pending.result()
        except BaseException:
            if pending is not None and not pending.done():
                pending.result()  # finish (or fail) the plane being written, so the state stays true
            raise


def predict_stack(
    net: torch.nn.Module,
    data: np.ndarray,
    normalization: dict,
    device: torch.device,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    precision: str = "auto",
    progress=None,
    cancel=None,
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
    probe = normalize(data[0, :256, :256], lo, hi)
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
