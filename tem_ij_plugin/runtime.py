"""Where and how a network runs: the device (``auto``, ``cpu``, ``cuda[:N]``, ``mps``) and the precision."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

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


def available_memory(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process can still take without swapping, or None when the system does not say.

    The lower of the system's available memory (``MemAvailable``; psutil's figure where there is no
    ``/proc``, if it is installed) and what is left under this process's cgroup limit (containers,
    cluster jobs: cgroup v2 ``memory.max`` or v1 ``memory.limit_in_bytes``), since passing either ends
    the process.
    """
    found = [v for v in (_meminfo_available(meminfo), _cgroup_headroom(cgroup)) if v is not None]
    if found:
        return min(found)
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _meminfo_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom(cgroup: Path) -> int | None:
    for limit_name, usage_name in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            limit = (cgroup / limit_name).read_text(encoding="ascii").strip()
            usage = (cgroup / usage_name).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue
        # v2 writes "max" for no limit, v1 a number near 2**63
        if limit.isdigit() and usage.isdigit() and int(limit) < 1 << 60:
            return max(0, int(limit) - int(usage))
    return None
