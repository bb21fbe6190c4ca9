"""Inference backends: torch, onnxruntime on the CPU, and test-time augmentation over either.

Torch runs eager and channels_last, with optional autocast checked against fp32.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .nn.inference import inference_form
from .runtime import autocast_context, resolve_precision

log = logging.getLogger(__name__)

OPSET = 17  # of the exported ONNX graphs
KEPT_GRAPHS = 20  # exported graphs kept in the cache, the most recently used
STALE_PARTIAL_S = 3600  # a temporary graph this old is a killed writer's, not one being written


# A reduced precision is accepted when, on the probe, it agrees with fp32 where users look: the class of
# at least this fraction of pixels, each class's area (IoU of the two argmaxes) ...
MIN_ARGMAX_AGREEMENT = 0.999
MIN_CLASS_IOU = 0.99
MIN_CLASS_FRACTION = 0.001  # classes on fewer pixels of the probe than this are judged by the margin alone
# ... and a pixel may change class only where fp32 itself was nearly undecided (top-two margin).
MAX_FLIP_MARGIN = 0.1


def onnx_available() -> bool:
    """Whether onnxruntime and onnx (extra ``[onnx]``) are installed.

    Found, not imported: importing onnx costs most of a second, and a cached graph never needs it.
    """
    from importlib.util import find_spec

    return find_spec("onnx") is not None and find_spec("onnxruntime") is not None


def graph_cache_dir() -> Path:
    """Where exported ONNX graphs are kept between runs: ``$TEM_IJ_CACHE/onnx`` or the user's cache folder."""
    root = os.environ.get("TEM_IJ_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tem-ij"
    return Path(root) / "onnx"


def graph_key(net: torch.nn.Module) -> str:
    """What an exported graph depends on: the network's weights and structure, torch, onnxruntime, the opset."""
    import onnxruntime

    h = hashlib.sha256(f"{torch.__version__}|{onnxruntime.__version__}|{OPSET}|{net!r}".encode())
    for name, tensor in net.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


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


def _ends_in_fp32(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``net`` whose first convolution and output layer stay fp32 under autocast.

    Rounding the normalised image to bf16 (8 significant bits) moved probabilities most: on a 1024-px
    crop of a trained default model's image, bf16 moved them at most 0.012 from fp32 with both layers in
    fp32, and 0.039 with the output layer alone, as before (a search for "the first convolution" found
    the output layer). The two layers are 0.3 % of the FLOPs.
    """
    net = copy.deepcopy(net)
    unet = getattr(net, "unet", None)
    if unet is not None:
        unet.down[0][0] = _FP32(unet.down[0][0])
        unet.out = _FP32(unet.out)
    return net


class TorchBackend:
    """Probabilities from the network in torch on ``device`` (tensors in, tensors out, on the device).

    On the CPU in fp32 or bf16, a BatchNorm-folded one-step network runs in its inference form
    (:class:`~tem_ij_plugin.nn.inference.InferenceUNet`: the same function with less memory traffic),
    tiles whose sides it cannot take eager; other networks, precisions and devices run eager, under
    autocast.
    """

    name = "torch"
    on_device = True  # takes and returns tensors on the compute device

    def __init__(self, net: torch.nn.Module, device: torch.device, precision: str = "fp32"):
        self.device = device
        self.precision = precision
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision)
        self.form = inference_form(net, dtype) if device.type == "cpu" and dtype is not None else None
        if precision != "fp32":
            net = _ends_in_fp32(net)
        self.net = _Softmax(net).to(device).eval().to(memory_format=torch.channels_last)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities of the batch ``x`` (moved to the device), as float32 on the device."""
        if self.form is not None and self.form.accepts(x):
            return self.form(x.to(self.device))
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast_context(self.device, self.precision):
            return self.net(x).float()


class OnnxBackend:
    """Probabilities from onnxruntime on the CPU (numpy in, numpy out).

    The network (with its softmax) is exported to ONNX; its outputs are checked against torch on a
    test input and must agree within 1e-4. With ``cache`` (a folder), the exported graph is kept there
    under :func:`graph_key` and reused by later runs, which then skip the export (and importing onnx);
    a kept graph is checked the same way, and one that fails or cannot be loaded is exported again.
    """

    name = "onnx"
    precision = "fp32"
    on_device = False

    def __init__(self, net: torch.nn.Module, threads: int | None = None, cache: Path | None = None):
        self._threads = threads or torch.get_num_threads()
        x = torch.rand((1, 1, 64, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            self._ref = (x, _Softmax(net).eval()(x).numpy())
        path = Path(cache) / f"{graph_key(net)}.onnx" if cache is not None else None
        if path is not None and self._load(path):
            log.debug("ONNX graph from %s", path)
            return
        self._use(export_onnx(net))
        if not self._agrees():
            raise RuntimeError("the ONNX export differs from torch by more than 1e-4")
        if path is not None:
            self._keep(path)

    def _use(self, graph: bytes) -> None:
        self.onnx_bytes = graph
        self.session = self._session(graph)
        self.input_name = self.session.get_inputs()[0].name

    def _agrees(self) -> bool:
        x, ref = self._ref
        return float(np.abs(self(x) - ref).max()) <= 1e-4

    def _load(self, path: Path) -> bool:
        """Use the kept graph at ``path`` if there is one and it computes what the network does."""
        try:
            graph = path.read_bytes()
        except OSError:
            return False
        try:
            self._use(graph)
            if self._agrees():
                with contextlib.suppress(OSError):
                    os.utime(path)  # recently used: kept longest
                return True
        except Exception as exc:  # a damaged file: onnxruntime raises several kinds
            log.debug("kept ONNX graph %s unusable: %s", path, exc)
        log.info("the kept ONNX graph %s does not match the model; exporting it again", path)
        return False

    def _keep(self, path: Path) -> None:
        """Keep the graph for later runs; a cache that cannot be written only costs the next run the export."""
        from .outputs import atomic_write

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # A name of this process's own: two processes keeping the same graph must not share one.
            mine = path.with_name(f".{path.name}.{os.getpid()}.partial")
            atomic_write(path, lambda tmp: tmp.write_bytes(self.onnx_bytes), wrap=False, tmp=mine)
            # every trained model adds a graph (8 MB for the default one): keep the most recently used
            kept = sorted(path.parent.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
            # per-process temporary names are never reused: one a killed run left would stay for good
            stale = [p for p in path.parent.glob(".*.partial") if time.time() - p.stat().st_mtime > STALE_PARTIAL_S]
            for old in kept[KEPT_GRAPHS:] + stale:
                old.unlink(missing_ok=True)
        except OSError as exc:
            log.debug("cannot keep the ONNX graph in %s: %s", path, exc)

    def _session(self, graph: bytes):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self._threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The memory pattern plans one block for a shape's intermediates and keeps it: with the pattern off,
        # `tem-ij predict` of a 3840x2920 image peaked at 1263 MB instead of 1468 MB and took 12.74 s
        # instead of 13.39 s, output identical (benchmarks/results/whole_process_ab_mem_pattern.json).
        # Turning the whole arena off saved more memory (1042 MB) but cost 14 % time (..._arena_off.json).
        opts.enable_mem_pattern = False
        return ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])

    def __call__(self, x) -> np.ndarray:
        """Class probabilities of the batch ``x`` (tensor or array), as a numpy array."""
        x = x.numpy() if isinstance(x, torch.Tensor) else x
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def node_names(self, op_type: str | None = None) -> list[str]:
        """Names of the graph's nodes (of ``op_type``: ``Conv``, ``Softmax``), input side first, for ``keep_fp32``."""
        import onnx

        nodes = onnx.load_from_string(self.onnx_bytes).graph.node
        return [n.name for n in nodes if op_type is None or n.op_type == op_type]

    def quantized(self, calibration: np.ndarray | Sequence[np.ndarray], keep_fp32: Sequence[str] = ()) -> OnnxBackend:
        """An int8 copy (onnxruntime static quantisation, QDQ, per-channel weights) calibrated on ``calibration``.

        ``calibration`` is a normalised 2-D crop of the image, or a list of them: activation ranges come
        from these crops. ``keep_fp32`` names graph nodes left unquantised (see :meth:`node_names`).
        """
        import tempfile

        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        crops = [calibration] if isinstance(calibration, np.ndarray) else list(calibration)
        if not crops or any(np.ndim(c) != 2 for c in crops):
            raise ValueError("int8 calibration needs one or more 2-D crops")
        if isinstance(keep_fp32, str):
            raise TypeError("keep_fp32 is a sequence of node names, not one name")
        if unknown := set(keep_fp32) - set(self.node_names()):  # onnxruntime would ignore them silently
            raise ValueError(f"no node of the graph is named {', '.join(sorted(unknown))}")
        batches = [np.ascontiguousarray(c, dtype=np.float32)[None, None] for c in crops]

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.items = iter([{"image": b} for b in batches])

            def get_next(self):
                return next(self.items, None)

        with tempfile.TemporaryDirectory(prefix="tem-ij-int8-") as tmp:
            source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            source.write_bytes(self.onnx_bytes)
            root = logging.getLogger()  # quantize_static logs advice to pre-process the graph on the root logger
            was, root.disabled = root.disabled, True
            try:
                quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                nodes_to_exclude=list(keep_fp32))  # fmt: skip
            finally:
                root.disabled = was
            graph = target.read_bytes()
        low = copy.copy(self)
        low.precision, low.onnx_bytes, low.session = "int8", graph, self._session(graph)
        return low


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

    A transposed rectangular tile is computed as it is and transposed back; each symmetry costs one more
    forward pass.
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
            opset_version=OPSET,
        )
    return buf.getvalue()


def precision_report(ref: np.ndarray, low: np.ndarray) -> dict:
    """How reduced-precision probabilities ``low`` (C, Y, X) differ from fp32's ``ref`` where it matters.

    Returns
    -------
    dict
        ``agreement`` (fraction of pixels with the same class), ``min_iou`` (the lowest IoU between the
        two argmaxes over the classes either one assigns to at least 0.1 % of the pixels),
        ``flip_margin`` (the largest fp32 top-two margin at a pixel whose class changed; 0 when none
        did), ``max_diff`` (largest probability change, for the log) and ``accepted``.
    """
    a, b = ref.argmax(axis=0), low.argmax(axis=0)
    changed = a != b
    top2 = np.sort(ref, axis=0)[-2:]
    margin = top2[1] - top2[0]
    ious = [1.0]
    for k in np.union1d(np.unique(a), np.unique(b)):
        union = np.count_nonzero((a == k) | (b == k))
        if union >= MIN_CLASS_FRACTION * a.size:  # a few pixels of a class make a noisy IoU
            ious.append(np.count_nonzero((a == k) & (b == k)) / union)
    report = {
        "agreement": float(1.0 - changed.mean()),
        "min_iou": float(min(ious)),
        "flip_margin": float(margin[changed].max()) if changed.any() else 0.0,
        "max_diff": float(np.abs(ref - low).max()),
    }
    report["accepted"] = (
        report["agreement"] >= MIN_ARGMAX_AGREEMENT
        and report["min_iou"] >= MIN_CLASS_IOU
        and report["flip_margin"] <= MAX_FLIP_MARGIN
    )
    return report


def _log_refusal(precision: str, report: dict) -> None:
    """Say why a reduced precision was not used (a :func:`precision_report` that failed)."""
    log.info(
        "%s vs fp32 on the probe: %.4f of pixels keep their class, lowest class IoU %.4f, a class changed "
        "at an fp32 margin of %.3f; using fp32", precision, report["agreement"], report["min_iou"],
        report["flip_margin"],
    )  # fmt: skip


def _check_reduced_precision(net, device, precision, probe: np.ndarray) -> str:
    """``precision`` if it passes :func:`precision_report` against fp32 on ``probe``, else ``fp32``."""
    x = torch.from_numpy(np.ascontiguousarray(probe))[None, None]
    with torch.inference_mode():
        ref = TorchBackend(net, device, "fp32")(x)[0].float().cpu().numpy()
        low = TorchBackend(net, device, precision)(x)[0].float().cpu().numpy()
    report = precision_report(ref, low)
    if not report["accepted"]:
        _log_refusal(precision, report)
        return "fp32"
    log.debug("%s vs fp32 on the probe: %s", precision, report)
    return precision


def _int8_runner(infer, probe) -> OnnxBackend:
    """The int8 onnxruntime backend calibrated on ``probe`` if it passes :func:`precision_report` there, else fp32."""
    fp32 = OnnxBackend(infer, cache=graph_cache_dir())
    if probe is None:
        log.info("int8 needs a probe of the image to calibrate on; using fp32")
        return fp32
    try:
        int8 = fp32.quantized(probe)
    except Exception as exc:  # onnxruntime's quantiser raises many kinds; fp32 computes the same result
        log.warning("int8 quantisation failed (%s); using fp32", exc)
        return fp32
    x = np.ascontiguousarray(probe, dtype=np.float32)[None, None]
    report = precision_report(fp32(x)[0], int8(x)[0])
    if not report["accepted"]:
        _log_refusal("int8", report)
        return fp32
    return int8


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), where bf16 roughly halves the time."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: keep fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _auto_runner(infer, device, backend: str, precision: str, probe):
    """The torch or (for ``backend="auto"``) onnxruntime runner; reduced precision checked on ``probe``.

    ``auto`` on a CPU with native bf16 tries bf16 (twice fp32's speed there), kept only when it passes
    the check on the probe; without a probe, fp32.
    """
    if precision == "auto" and device.type == "cpu" and probe is not None and cpu_has_native_bf16():
        precision = "bf16"
    precision = resolve_precision(device, precision, checked=probe is not None)
    if precision != "fp32" and probe is not None:
        precision = _check_reduced_precision(infer, device, precision, probe)
    if precision == "fp32" and backend == "auto" and device.type == "cpu" and onnx_available():
        try:
            return OnnxBackend(infer, cache=graph_cache_dir())
        except Exception as exc:  # any export/runtime failure: torch computes the same result
            log.warning("onnxruntime unavailable for this model (%s); using torch", exc)
    return TorchBackend(infer, device, precision)
