"""The one place that decides which paths a command may create, replace or remove.

Rule (DESIGN.md §2b, "nothing lost"): every path a command will create, rename or delete (its final
outputs, their ``.partial`` working names, state files, lock files and the temporary names of
write-then-rename) is allocated through an :class:`OutputPlan` before any slow work starts, and
checked there against every input of the command: resolved with symlinks followed, hard links
compared by inode, and a folder we may replace never containing an input. An existing file at a
working name is never overwritten or removed unless the caller proved it ours (a resume state or a
dead process's lock that names it) or the user said ``overwrite``.

Writers then use :func:`atomic_write` (write to :func:`temporary_name`, then rename) and
:class:`OutputLock` (one writer per output, stale locks of dead processes detected and reported).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; an existing lock file is then always treated as busy
    fcntl = None

log = logging.getLogger(__name__)


def temporary_name(path: str | os.PathLike) -> Path:
    """Where :func:`atomic_write` writes ``path`` before renaming it: ``.NAME.partial`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def _resolved(path: Path) -> Path:
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare it as written
        return path.absolute()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def conflict(path: Path, source: Path) -> str | None:
    """How writing (or replacing) ``path`` would touch the input ``source``, or None if it would not."""
    rp, rs = _resolved(path), _resolved(source)
    if rp == rs or _same_file(path, source):
        return "is"
    if rp in rs.parents:
        return "contains"
    return None


class OutputPlan:
    """Every path one command will write, checked against its inputs as it is added.

    Parameters
    ----------
    inputs : iterable of path-like or None
        Everything the command reads (None entries are skipped).
    overwrite : bool
        The user allowed replacing existing files at working names (never an input).
    """

    def __init__(self, inputs: Iterable, overwrite: bool = False):
        self.inputs = [Path(p) for p in inputs if p]
        self.overwrite = overwrite
        self.paths: dict[Path, str] = {}

    def add(self, path: str | os.PathLike, role: str, replace: bool = False) -> Path:
        """Plan to write ``path`` (``role`` names it in messages); returns it as a Path.

        Raises
        ------
        UserError
            The path is, or holds, an input; or it exists and is neither replaceable (``replace``)
            nor allowed by ``overwrite``.
        """
        path = Path(path)
        for source in self.inputs:
            how = conflict(path, source)
            if how == "is":
                raise UserError(
                    f"the {role} {path} would overwrite the input {source}; choose another output name "
                    "(inputs are never overwritten)"
                )
            if how == "contains":
                raise UserError(f"the {role} {path} would replace a folder holding the input {source}")
        if (path.exists() or path.is_symlink()) and not (replace or self.overwrite):
            raise UserError(
                f"{path} exists and was not written by this job (it would be the {role}); move it away, "
                "or pass --overwrite to replace it"
            )
        self.paths[path] = role
        return path

    def output(self, path: str | os.PathLike, role: str = "output") -> Path:
        """Plan a final output and its write-then-rename name; an existing output file is replaced.

        A folder (OME-Zarr) already at ``path`` is replaced only with ``overwrite``: it might hold
        anything. The parent folder must exist and be writable.
        """
        path = Path(path)
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise UserError(f"cannot write {path}: the folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise UserError(f"cannot write {path}: the folder {parent} is not writable")
        if path.is_dir() and not self.overwrite:
            raise UserError(f"{path} is an existing folder; choose another output name or pass --overwrite")
        self.add(path, role, replace=True)
        self.add(temporary_name(path), f"temporary name of {path.name}", replace=True)
        return path


def claim_folder(folder: str | os.PathLike, command: str, inputs: Iterable = ()) -> Path:
    """A folder that ``command`` may fill with files of fixed names: new, empty, or one it filled before.

    The folder gets a marker file (``.tem-ij``) naming the command; a non-empty folder without the
    marker of the same command is refused, since the fixed names (``image.tif``, ...) could be a
    user's files. Returns the folder.
    """
    folder = Path(folder)
    marker = folder / ".tem-ij"
    for source in inputs:
        if source and conflict(folder, Path(source)) == "is":
            raise UserError(f"the output folder {folder} is the input {source}")
    try:
        if folder.is_dir() and any(folder.iterdir()):
            try:
                owner = marker.read_text(encoding="utf-8")[:200].strip()
            except (OSError, UnicodeDecodeError):
                owner = None
            if owner != command:
                raise UserError(
                    f"{folder} is a folder with files that {command} did not write; choose a new or empty folder "
                    "(its files would be overwritten)"
                )
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(command + "\n", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot create the folder {folder}: {exc.strerror or exc}") from exc
    return folder


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` and rename ``tmp`` to ``path``: a failure leaves any earlier ``path`` intact.

    ``tmp`` is :func:`temporary_name` of ``path``; callers plan both names with :class:`OutputPlan`.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc


def remove_output(path: Path) -> None:
    """Remove a finished output we are about to replace (a file, or an OME-Zarr folder)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def lock_path(out: str | os.PathLike) -> Path:
    """The lock file of output ``out``: ``NAME.lock`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.name}.lock")


class OutputLock:
    """An exclusive lock on one output: ``NAME.lock`` holding host, PID and start time.

    The lock is the kernel's (``flock`` on that file), so it ends with its process however that
    ends. A second writer is refused with a message naming the first. A lock file left by a process
    that died is reported (``stale`` holds its record) and taken over; one written on another host
    is refused, as it cannot be checked from here.
    """

    def __init__(self, out: str | os.PathLike, command: str = "tem-ij"):
        self.out = Path(out)
        self.path = lock_path(self.out)
        self.command = command
        self.stale: dict | None = None
        self._fd: int | None = None

    def _owner(self, fd: int) -> dict:
        """The record in the lock file ({} when empty); a file that is not our lock is refused, not truncated."""
        raw = os.pread(fd, 4096, 0)
        if not raw:
            return {}
        try:
            data = json.loads(raw.decode("utf-8"))
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("pid"), int) or "host" not in data:
            raise UserError(f"{self.path} exists and is not a lock file written by tem_ij_plugin; move it away")
        return data

    def acquire(self) -> OutputLock:
        """Take the lock (see the class docstring); returns self."""
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UserError(f"cannot create the lock file {self.path}: {exc.strerror or exc}") from exc
            try:
                owner = self._owner(fd)
                try:
                    _flock(fd, owner)
                except BlockingIOError:
                    raise UserError(f"{self.out} is being written by {_who(owner)}; wait for it to finish") from None
                if os.fstat(fd).st_ino != getattr(_stat(self.path), "st_ino", None):
                    os.close(fd)  # the file was removed by its owner in between: lock the new one
                    continue
                owner = self._owner(fd)
                if owner and owner.get("host") != socket.gethostname():
                    raise UserError(
                        f"{self.out} is locked by {_who(owner)}; if that process is gone, delete {self.path}"
                    )
                if owner:
                    log.warning(
                        "%s: taking over the lock left by %s, which is no longer running", self.out, _who(owner)
                    )
                    self.stale = owner
                record = json.dumps(_record(self.command)).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, record, 0)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self
        raise UserError(f"cannot lock {self.out}: {self.path} keeps being replaced by another process")

    def release(self) -> None:
        """Remove the lock file and release the lock (only if this object holds it)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _flock(fd: int, owner: dict) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    elif owner:
        raise BlockingIOError


def _stat(path: Path):
    try:
        return path.stat()
    except OSError:
        return None


def _record(command: str) -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


def _who(owner: dict) -> str:
    if not owner:
        return "another process"
    return (
        f"process {owner.get('pid', '?')} on {owner.get('host', '?')} (started {owner.get('started', '?')}, "
        f"{owner.get('command', '?')})"
    )
