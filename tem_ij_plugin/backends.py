"""Inference backends: torch, onnxruntime on the CPU, and test-time augmentation over either.

Torch runs eager and channels_last, with optional autocast checked against fp32.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings

import numpy as np
import torch

from .errors import UserError
from .runtime import autocast_context, resolve_precision

log = logging.getLogger(__name__)


PRECISION_TOLERANCE = 0.02  # largest probability change accepted from bf16/fp16 instead of fp32


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
        """Class probabilities of the batch ``x`` (moved to the device), as float32 on the device."""
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
        """Class probabilities of the batch ``x`` (tensor or array), as a numpy array."""
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
        """The mean class probabilities of ``x`` over the mode's symmetries, each transformed back."""
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
