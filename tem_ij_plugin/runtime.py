"""Where and how a network runs: the device (``auto``, ``cpu``, ``cuda[:N]``, ``mps``) and the precision."""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from .errors import UserError

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; an explicit device that is missing is an error."""
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
    fp32 elsewhere, CPUs included. (Prediction alone tries bf16 on CPUs that have it in hardware, checked
    on its probe: see :func:`~tem_ij_plugin.backends.precision_report`.)
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
