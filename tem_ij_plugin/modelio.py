"""Model files: one safetensors file whose header metadata holds the JSON description.

Loading never unpickles. The metadata key ``tem_ij_plugin`` carries classes, normalisation, pixel
size, architecture, settings, training history, software versions and the annotation hash.
"""

from __future__ import annotations

import json
import os
import platform
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelFileError, UserError
from .outputs import atomic_write

if TYPE_CHECKING:
    import torch

FORMAT = "tem_ij_plugin.model"
FORMAT_VERSION = 2  # 2: "norm" in the architecture (BatchNorm default); 1 means GroupNorm
_KEY = "tem_ij_plugin"


@dataclass
class TrainedModel:
    """A network with everything needed to use and describe it.

    Attributes
    ----------
    net : RecurrentUNet
    meta : dict
        JSON-able description (see module docstring); ``classes``, ``architecture`` and
        ``normalization`` are always present.
    """

    net: object
    meta: dict = field(default_factory=dict)

    @property
    def classes(self) -> list:
        """The model's class names, in output-channel order."""
        return list(self.meta["classes"])

    @property
    def normalization(self) -> dict:
        """A copy of how input images are scaled (``meta["normalization"]``)."""
        return dict(self.meta["normalization"])

    @property
    def rounds(self) -> list:
        """The training rounds of its history, oldest first ([] for a model never trained here)."""
        return list((self.meta.get("history") or {}).get("rounds") or [])

    @property
    def last_round(self) -> dict:
        """The record of its latest training round ({} for a model never trained here)."""
        rounds = self.rounds
        return rounds[-1] if rounds else {}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def software_versions() -> dict:
    """Versions recorded in every model file."""
    import numpy
    import torch

    from . import __version__

    return {
        "tem_ij_plugin": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def build_network(arch: dict):
    """A :class:`RecurrentUNet` from an architecture dict."""
    from .nn import RecurrentUNet

    return RecurrentUNet(
        in_channels=int(arch.get("in_channels", 1)),
        n_classes=int(arch["n_classes"]),
        depth=int(arch["depth"]),
        base_channels=int(arch["base_channels"]),
        steps=int(arch["steps"]),
        norm_groups=int(arch.get("norm_groups", 8)),
        feedback=str(arch.get("feedback", "input")),
        # Files written before BatchNorm became the default have no "norm" entry.
        norm=str(arch.get("norm", "group")),
    )


def save_model(path: str | os.PathLike, model: TrainedModel) -> None:
    """Write a model file atomically (a failed write leaves any earlier file intact)."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = dict(model.meta)
    meta["format"] = FORMAT
    meta["format_version"] = FORMAT_VERSION
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}

    def write(tmp):
        save_file(state, str(tmp), metadata={_KEY: json.dumps(meta)})
        # safetensors creates the file private (0600); give it the permissions any new file gets.
        os.chmod(tmp, 0o666 & ~_umask())

    atomic_write(path, write)


# Bytes per element of the safetensors dtypes.
_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_TORCH_DTYPES = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16", "int64": "I64"}
MAX_HEADER_BYTES = 32 * 2**20  # a model's JSON header; a long training history takes a few MB
MAX_TENSORS = 10_000


@dataclass
class _FileHeader:
    meta: dict
    tensors: dict  # name -> (dtype, shape tuple)


def _read_header(path: Path) -> _FileHeader:
    """Parse and check the safetensors header of ``path``: structure, sizes and offsets against the file.

    Nothing is allocated from what the header declares; only its JSON (at most MAX_HEADER_BYTES) is read.
    """
    from .schemas import parse_json, validate_model_meta

    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{path} is not a tem_ij_plugin model file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER_BYTES:
                raise ModelFileError(
                    f"{path} is not a tem_ij_plugin model file (no safetensors header: the declared header length "
                    f"{n} is not plausible)"
                )
            if n > size - 8:
                raise ModelFileError(
                    f"{path} is truncated or not a tem_ij_plugin model file (the header length {n} points past "
                    f"the end of the file, {size} bytes)"
                )
            raw = f.read(n)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        header = parse_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelFileError(f"{path} is not a tem_ij_plugin model file (unreadable header: {exc})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path} is not a tem_ij_plugin model file (the header is not a mapping)")
    extra = header.get("__metadata__")
    if extra is None or (isinstance(extra, dict) and _KEY not in extra):
        raise ModelFileError(f"{path} is a safetensors file but not a tem_ij_plugin model (no metadata)")
    if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
        raise ModelFileError(f"{path}: the safetensors __metadata__ must map names to strings")
    try:
        meta = parse_json(extra[_KEY])
    except ValueError as exc:
        raise ModelFileError(f"{path}: the model description is corrupt ({exc})") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: the model description is corrupt (not a mapping)")
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a tem_ij_plugin model file (format {str(meta.get('format'))[:80]!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelFileError(f"{path}: the model description is corrupt (format_version {str(version)[:40]!r})")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written by a newer tem_ij_plugin (model format {version}; this version reads up to "
            f"{FORMAT_VERSION}); update tem_ij_plugin to use it"
        )
    for key in ("classes", "architecture", "normalization"):
        if key not in meta:
            raise ModelFileError(f"{path}: the model description lacks '{key}'")
    validate_model_meta(path, meta)
    tensors = _check_tensor_table(path, header, size - 8 - n)
    return _FileHeader(meta, tensors)


def _check_tensor_table(path: Path, header: dict, data_bytes: int) -> dict:
    """Every tensor entry well formed, its bytes matching dtype x shape, the entries tiling the data exactly."""

    def bad(problem: str) -> ModelFileError:
        return ModelFileError(f"{path}: the weights are truncated or corrupt ({problem})")

    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    if len(entries) > MAX_TENSORS:
        raise bad(f"{len(entries)} tensors")
    spans, tensors = [], {}
    for name, entry in entries:
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name[:80]!r} is not a mapping of dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPE_SIZES:
            raise bad(f"tensor {name[:80]!r} has an unknown dtype {str(dtype)[:20]!r}")
        ints = (shape, offsets)
        if not all(isinstance(x, list) and all(type(i) is int and i >= 0 for i in x) for x in ints):
            raise bad(f"tensor {name[:80]!r}: shape and data_offsets must be lists of non-negative integers")
        if len(shape) > 8 or len(offsets) != 2:
            raise bad(f"tensor {name[:80]!r}: {len(shape)} dimensions, {len(offsets)} data_offsets")
        begin, end = offsets
        count = 1
        for d in shape:
            count *= d
        if end < begin or end - begin != count * _DTYPE_SIZES[dtype]:
            raise bad(f"tensor {name[:80]!r}: data_offsets {offsets} do not hold {dtype} of shape {shape}")
        spans.append((begin, end, name))
        tensors[name] = (dtype, tuple(shape))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else "leaves a gap before it"
            raise bad(f"tensor {name[:80]!r}: data_offsets {[begin, end]} {what}")
        position = end
    if position != data_bytes:
        if position > data_bytes:
            raise bad(f"the tensors need {position} bytes of data but the file holds {data_bytes}")
        raise bad(f"{data_bytes - position} bytes after the last tensor")
    return tensors


def _check_weights_fit(path: Path, head: _FileHeader) -> None:
    """The tensors are exactly those of the described network: built on torch's meta device (no memory)."""
    import torch

    try:
        with torch.device("meta"):
            net = build_network(head.meta["architecture"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: the described architecture cannot be built ({exc})") from None
    want = {k: (_TORCH_DTYPES.get(str(v.dtype).removeprefix("torch."), "?"), tuple(v.shape))
            for k, v in net.state_dict().items()}  # fmt: skip
    missing = sorted(set(want) - set(head.tensors))
    extra = sorted(set(head.tensors) - set(want))
    if missing or extra:
        parts = [
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(extra[:3])}" if extra else "",
        ]
        raise ModelFileError(
            f"{path}: the weights do not match the described architecture ({'; '.join(p for p in parts if p)})"
        )
    for name, (dtype, shape) in want.items():
        if head.tensors[name] != (dtype, shape):
            got = head.tensors[name]
            raise ModelFileError(
                f"{path}: the weights do not match the described architecture ({name}: shape {list(got[1])} "
                f"{got[0]} in the file, the architecture needs {list(shape)} {dtype})"
            )


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a model file, checked for format, version and schema, without loading weights.

    The safetensors header is checked too (tensor sizes and offsets against the file size).
    """
    return _read_header(Path(path)).meta


def check_model_file(path: str | os.PathLike) -> dict:
    """:func:`read_metadata` plus the weight names and shapes against the architecture; loads no weights."""
    path = Path(path)
    head = _read_header(path)
    _check_weights_fit(path, head)
    return head.meta


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> TrainedModel:
    """Load a model file written by :func:`save_model`.

    The header, the metadata schema and the weight shapes are checked before anything is allocated;
    non-finite weights are refused.

    Raises
    ------
    ModelFileError
        Truncated, foreign, corrupt, hostile or newer-format files.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    head = _read_header(path)
    _check_weights_fit(path, head)
    meta = head.meta
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: the weights are truncated or corrupt ({exc})") from exc
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFileError(f"{path}: the weights are corrupt (non-finite values in {name})")
    try:
        net = build_network(meta["architecture"])
        net.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: the weights do not match the described architecture ({exc})") from exc
    net.to(device).eval()
    return TrainedModel(net=net, meta=meta)
