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

from .errors import ModelFileError, UserError

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
        return list(self.meta["classes"])

    @property
    def normalization(self) -> dict:
        return dict(self.meta["normalization"])


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
    tmp = path.with_name(f".{path.name}.partial")
    try:
        save_file(state, str(tmp), metadata={_KEY: json.dumps(meta)})
        # safetensors creates the file private (0600); give it the permissions any new file gets.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write model file {path}: {exc.strerror or exc}") from exc


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a model file, checked for format and version, without loading weights."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{path} is not a tem_ij_plugin model file (too short)")
            (n,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            if n == 0 or n > min(size - 8, 100_000_000):
                raise ModelFileError(f"{path} is not a tem_ij_plugin model file (no safetensors header)")
            header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} is not a tem_ij_plugin model file (unreadable header)") from exc
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    raw = (header.get("__metadata__") or {}).get(_KEY) if isinstance(header, dict) else None
    if raw is None:
        raise ModelFileError(f"{path} is a safetensors file but not a tem_ij_plugin model (no metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: the model description is corrupt") from exc
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a tem_ij_plugin model file (format {meta.get('format')!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written by a newer tem_ij_plugin (model format {version}; this version reads up to "
            f"{FORMAT_VERSION}); update tem_ij_plugin to use it"
        )
    for key in ("classes", "architecture", "normalization"):
        if key not in meta:
            raise ModelFileError(f"{path}: the model description lacks '{key}'")
    return meta


def load_model(path: str | os.PathLike, device="cpu") -> TrainedModel:
    """Load a model file written by :func:`save_model`.

    Raises
    ------
    ModelFileError
        Truncated, foreign, corrupt or newer-format files.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_metadata(path)
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: the weights are truncated or corrupt ({exc})") from exc
    try:
        net = build_network(meta["architecture"])
        net.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: the weights do not match the described architecture ({exc})") from exc
    net.to(device).eval()
    return TrainedModel(net=net, meta=meta)
