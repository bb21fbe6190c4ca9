"""Where and how a network runs: the device (``auto``, ``cpu``, ``cuda[:N]``, ``mps``) and the precision."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import threading
from contextlib import contextmanager, nullcontext
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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# What glibc's own adaptive thresholds settle at once large blocks were freed (64-bit): restored after a
# block, since setting any threshold switches the adaptation off for the life of the process.
_SETTLED_MMAP_THRESHOLD = 32 * 1024 * 1024
_SETTLED_TRIM_THRESHOLD = 2 * _SETTLED_MMAP_THRESHOLD
_DEFAULT_MMAP_MAX = 65536
# A user who tuned glibc's allocator from the environment keeps their settings.
_USER_TUNING = (
    "GLIBC_TUNABLES",
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)
_heap_lock = threading.Lock()
_heap_users = 0


@functools.cache
def _glibc():
    """The C library when it is glibc (whose allocator :func:`reuse_freed_memory` tunes), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if any(name in os.environ for name in _USER_TUNING):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


@contextmanager
def reuse_freed_memory(enabled: bool = True):
    """Inside the block, freed memory (tensors, arrays) stays in the process for the next ones.

    glibc maps large blocks afresh and unmaps them when freed (on the main thread, blocks over its
    threshold, at most 32 MB), so each tile's feature maps arrive on fresh pages the kernel must fault
    in and zero: 0.7 million page faults and 1.3 s of system time per 2048-px tile of the default
    model, which took 2.3 s, and 1.35 s without them (bf16, 2-core AMD EPYC; README *Where a tile's
    time goes*). The block makes glibc serve large blocks from its heap and keep what is freed; at the
    end of the outermost block (blocks may nest, or overlap in threads) the kept memory goes back to
    the system, and glibc's thresholds stay at the values its own tuning reaches (32 MB, 64 MB).

    The setting is the process's, but only the main thread's heap can grow without bound: another
    thread's heap holds at most 64 MB, so larger tensors computed there still get fresh pages (a
    3840x2920 plane took 7.0 s on a worker thread against 5.5 s on the main one). Nothing happens
    when ``enabled`` is false, elsewhere than glibc, or where ``GLIBC_TUNABLES`` or a ``MALLOC_*_``
    variable already tunes the allocator.
    """
    global _heap_users
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    entered = False
    try:
        with _heap_lock:
            _heap_users += 1
            entered = True
            if _heap_users == 1:
                libc.mallopt(_M_MMAP_MAX, 0)
                libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        yield
    finally:
        with _heap_lock:
            _heap_users -= entered
            if entered and _heap_users == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, _SETTLED_MMAP_THRESHOLD)
                libc.mallopt(_M_TRIM_THRESHOLD, _SETTLED_TRIM_THRESHOLD)
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.malloc_trim(0)


def release_freed_memory() -> None:
    """Hand the memory that :func:`reuse_freed_memory` keeps back to the system now (glibc only).

    Inside a long block the kept memory only grows: the heap's layout drifts from plane to plane (its
    free holes land elsewhere, also with an idle writer thread), and every page ever touched stays
    resident. Releasing now and then bounds that, for the cost of faulting the pages in once more.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class PeriodicRelease:
    """Counts finished planes and calls :func:`release_freed_memory` after every ``every`` of them."""

    def __init__(self, every: int, enabled: bool = True):
        self.every, self.enabled, self.count = every, enabled, 0

    def done(self, planes: int = 1) -> None:
        """``planes`` more planes are finished."""
        if not self.enabled:
            return
        self.count += planes
        if self.count >= self.every:
            release_freed_memory()
            self.count = 0
