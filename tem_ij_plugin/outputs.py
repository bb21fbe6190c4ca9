"""The one place that decides which paths a command may create, replace or remove.

Rule (DESIGN.md §2b, "nothing lost"): every path a command will create, rename or delete (its final
outputs and their documented companions, their ``.partial`` working names, state files, lock files
and the hidden temporary names of write-then-rename) is allocated through an :class:`OutputPlan`
before any slow work starts, and checked there against every input of the command (resolved, with
symlinks followed and hard links compared by inode; a folder we may replace never contains an input)
and against protected folders (a project folder, which only its own commands write). An existing
file is replaced only when it was written by tem_ij_plugin (:func:`written_by_us`), when the caller
proved it ours (a resume state that describes it, a dead run's lock), or when the user said
``overwrite``.

Writers then use :func:`atomic_write` (write a temporary name, flush it to disk, rename) and
:class:`OutputLock` (one writer per output; locks of dead processes detected and reported).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
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


SOFTWARE = "tem_ij_plugin"  # the TIFF Software tag of every TIFF we write (see written_by_us)
SUGGESTIONS_FORMAT = "tem_ij_plugin.suggestions"
SUGGESTIONS_CSV_HEADER = "name,slice,x,y,width,height,score"
SLICES_CSV_HEADER = "slice,candidates,best_score,uncertainty,novelty,novelty_max,suggestions"
OBJECTS_CSV_HEADER = "id,slice,slice_label,area_"  # then the unit: area_um2, area_px2, ...
OBJECT_SLICES_CSV_HEADER = "slice,slice_label,count,mean_area_"
OBJECTS_ZIP_COMMENT = b"tem_ij_plugin objects"  # object ROIs are named like anyone's (cell-1): the zip is marked
PACKAGE_ZIP_COMMENT = b"tem_ij_plugin bioimage.io package"  # tem-ij export's model packages


_SEEK_LOCK = threading.Lock()


def read_at(fd: int, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes of the open file ``fd`` from ``offset``, leaving its position alone where possible.

    ``os.pread`` where the platform has it (it is thread-safe and never moves the file position);
    elsewhere (Windows) a seek and read under a lock, so that threads reading one file never interleave.
    """
    if hasattr(os, "pread"):
        return os.pread(fd, n, offset)
    chunks, got = [], 0
    with _SEEK_LOCK:
        os.lseek(fd, offset, os.SEEK_SET)
        while got < n:
            chunk = os.read(fd, n - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    return b"".join(chunks)


def written_by_us(path: Path) -> bool:
    """Whether an existing output was written by tem_ij_plugin, by the marks our writers leave.

    TIFF: the Software tag; OME-Zarr: our key in ``.zattrs``; model files: our metadata; suggestion
    files: only ``suggest-N`` rectangles and ``suggest-N-focus-M`` polygons in the zip, our headers in
    the CSVs, our format in the JSON; object ROIs: our comment on the zip, our headers in the CSVs;
    cellpose ``_seg.npy``: our ``software`` entry.
    Anything unreadable or unmarked is not ours.
    """
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            return _marked_zarr(path) and not foreign_in_zarr(path)
        if suffix in (".tif", ".tiff", ".btf", ".tf8", ".tf2"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return tif.pages[0].software == SOFTWARE
        if suffix == ".zip":
            import zipfile

            with zipfile.ZipFile(path) as zf:
                names, comment = zf.namelist(), zf.comment
            if comment in (OBJECTS_ZIP_COMMENT, PACKAGE_ZIP_COMMENT):
                return True
            return bool(names) and all(re.fullmatch(r"suggest-[0-9]+(-focus-[0-9]+)?\.roi", n) for n in names)
        if suffix == ".csv":
            with open(path, encoding="utf-8") as f:
                ours = (SUGGESTIONS_CSV_HEADER, SLICES_CSV_HEADER, OBJECTS_CSV_HEADER, OBJECT_SLICES_CSV_HEADER)
                return f.readline().startswith(ours)
        if suffix == ".npy":
            from .cellpose_files import is_our_seg_npy

            return is_our_seg_npy(path)
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8")[:10_000_000])
            return isinstance(data, dict) and data.get("format") == SUGGESTIONS_FORMAT
        from .modelio import read_metadata

        read_metadata(path)
        return True
    except Exception:  # unreadable in any way: not a file we can vouch for
        return False


def _marked_zarr(path: Path) -> bool:
    """Whether a folder is an OME-Zarr store with our key in its ``.zattrs``."""
    try:
        attrs = json.loads((path / ".zattrs").read_text(encoding="utf-8")[:1_000_000])
    except (OSError, ValueError):
        return False
    return path.suffix.lower() == ".zarr" and isinstance(attrs, dict) and SOFTWARE in attrs


def foreign_in_zarr(path: Path) -> list[str]:
    """What an OME-Zarr store of ours holds that we never write there (a label image someone added, say).

    Our stores hold resolution levels named by number, the group's metadata and ``labels/classes``.
    Replacing the store would take anything else with it, so such a store is not ours to replace.
    """
    ours_top = {".zattrs", ".zgroup", "labels"}
    try:
        found = [e.name for e in path.iterdir() if e.name not in ours_top and not e.name.isdigit()]
        labels = path / "labels"
        if labels.is_dir():
            found += [f"labels/{e.name}" for e in labels.iterdir() if e.name not in {".zattrs", ".zgroup", "classes"}]
    except OSError:  # unreadable: the caller's other checks decide
        return []
    return sorted(found)


class OutputPlan:
    """Every path one command will write, checked against its inputs as it is added.

    Parameters
    ----------
    inputs : iterable of path-like or None
        Everything the command reads (None entries are skipped).
    overwrite : bool
        The user allowed replacing existing files that tem_ij_plugin did not write (never an input).
    protect : iterable of path-like
        Folders no planned path may lie in (e.g. a project folder, which only its own commands write).
    """

    def __init__(self, inputs: Iterable, overwrite: bool = False, protect: Iterable = ()):
        self.inputs = [Path(p) for p in inputs if p]
        self.overwrite = overwrite
        self.protect = [Path(p) for p in protect if p]
        self.paths: dict[Path, str] = {}

    def add(self, path: str | os.PathLike, role: str, replace: bool = False) -> Path:
        """Plan to write ``path`` (``role`` names it in messages); returns it as a Path.

        Raises
        ------
        UserError
            The path is, or holds, an input, or lies in a protected folder; or it exists and is
            neither replaceable (``replace``) nor allowed by ``overwrite``.
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
        for folder in self.protect:
            if _resolved(folder) in _resolved(path).parents or conflict(path, folder):
                raise UserError(
                    f"the {role} {path} would be written inside the project folder {folder}, which only "
                    "tem-ij train --project and revert change; choose a name outside it"
                )
        if (path.exists() or path.is_symlink()) and not (replace or self.overwrite):
            raise UserError(
                f"{path} exists and was not written by this job (it would be the {role}); move it away "
                "(or, with tem-ij, pass --overwrite to replace it)"
            )
        self.paths[path] = role
        return path

    def output(self, path: str | os.PathLike, role: str = "output") -> Path:
        """Plan a final output and its hidden write-then-rename name.

        An existing output is replaced only when tem_ij_plugin wrote it (:func:`written_by_us`), or
        with ``overwrite``. The parent folder must exist and be writable. A leftover hidden
        temporary name (``.NAME.partial``) is ours by its name and may be replaced.
        """
        path = Path(path)
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise UserError(f"cannot write {path}: the folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise UserError(f"cannot write {path}: the folder {parent} is not writable")
        self.add(path, role, replace=True)
        exists = path.exists() or path.is_symlink()
        if exists and not self.overwrite and (path.is_symlink() or not written_by_us(path)):
            ours = path.is_dir() and not path.is_symlink() and _marked_zarr(path)
            foreign = foreign_in_zarr(path) if ours else []
            if foreign:
                raise UserError(
                    f"the {role} {path} is an OME-Zarr store that tem_ij_plugin wrote, but it now also holds "
                    f"{', '.join(foreign[:5])}, which replacing it would delete; choose another name or move "
                    "those away (or, with tem-ij, pass --overwrite to replace the whole store)"
                )
            kind = "folder" if path.is_dir() else "file"
            raise UserError(
                f"the {role} {path} is an existing {kind} that tem_ij_plugin did not write; choose another "
                "name or move it away (or, with tem-ij, pass --overwrite to replace it)"
            )
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
    for source in inputs:  # an input inside is safe: the folder is new, empty or holds only what we wrote
        if source and conflict(folder, Path(source)) == "is":
            raise UserError(f"the output folder {folder} is the input {source}; choose another folder")
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


def atomic_write(
    path: str | os.PathLike, write: Callable[[Path], object], wrap: bool = True, tmp: Path | None = None
) -> None:
    """Call ``write(tmp)``, flush ``tmp`` to disk and rename it to ``path``.

    A failure (or a power cut) leaves any earlier ``path`` intact and never a half-written one.
    ``tmp`` is :func:`temporary_name` of ``path`` unless given; callers plan both names with
    :class:`OutputPlan`. An OSError becomes a :class:`UserError` naming ``path`` unless ``wrap`` is false.
    """
    path = Path(path)
    tmp = temporary_name(path) if tmp is None else tmp
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, folder=True)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if not wrap:
            raise
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _fsync(path: Path, folder: bool = False) -> None:
    """Flush ``path`` to disk: its data, or (``folder``) a rename in it. Folders cannot be on Windows."""
    if folder and os.name == "nt":
        return
    fd = os.open(path if str(path) else ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_output(path: Path) -> None:
    """Remove a finished output we are about to replace (a file, or an OME-Zarr folder)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def lock_path(out: str | os.PathLike) -> Path:
    """The lock file of output ``out``: ``NAME.lock`` beside it (``X.lock`` for ``X.tif`` and ``X.zarr``).

    Named by the stem, as the resume state is (``X.partial.json``), so that jobs sharing a state name
    also share the lock.
    """
    out = Path(out)
    return out.with_name(f"{out.stem}.lock")


class OutputLock:
    """An exclusive lock on one output: ``NAME.lock`` holding host, PID and start time.

    The lock is the kernel's (``flock`` on that file), so it ends with its process however that ends.
    A second writer is refused with a message naming the first (or, with ``wait_s``, waited for). A
    lock file left by a process that died is reported (``stale`` holds its record) and taken over;
    one written on another host is refused, as it cannot be checked from here. A file at the lock's
    name that is not a lock we wrote (empty, or anything else) is left alone unless ``overwrite``.
    """

    def __init__(self, out: str | os.PathLike, command: str = "tem-ij", overwrite: bool = False, wait_s: float = 0):
        self.out = Path(out)
        self.path = lock_path(self.out)
        self.command = command
        self.overwrite = overwrite
        self.wait_s = wait_s
        self.stale: dict | None = None
        self._fd: int | None = None

    def _owner(self, fd: int) -> dict | None:
        """The record in an existing lock file; None when it is not a lock file we wrote.

        An empty file is what a process killed between creating its lock and writing the record
        leaves (it holds nothing to lose): it reads as a dead owner.
        """
        raw = read_at(fd, 4096, 0)
        if not raw:
            return {"pid": -1, "host": socket.gethostname(), "started": "?", "command": "(an empty lock file)"}
        try:
            data = json.loads(raw.decode("utf-8"))
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("pid"), int) or "host" not in data:
            return None
        return data

    def acquire(self) -> OutputLock:
        """Take the lock (see the class docstring); returns self."""
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fd = self._try_acquire()
            except _Busy as busy:
                if time.monotonic() >= deadline:
                    raise UserError(
                        f"{self.out} is being written by {_who(busy.owner)}; wait for it to finish"
                    ) from None
                time.sleep(0.1)
                continue
            if fd is not None:
                self._fd = fd
                return self

    def _try_acquire(self) -> int | None:
        """A locked descriptor, None to retry (the file was replaced meanwhile), or :class:`_Busy`."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                return None  # removed by its owner in between
            created = False
        except OSError as exc:
            raise UserError(f"cannot create the lock file {self.path}: {exc.strerror or exc}") from exc
        try:
            owner = None if created else self._owner(fd)
            if not created and owner is None and not self.overwrite:
                raise UserError(
                    f"{self.path} exists and is not a lock file written by tem_ij_plugin; move it away "
                    "(or, with tem-ij, pass --overwrite to replace it)"
                )
            try:
                _flock(fd, owner)
            except BlockingIOError:
                raise _Busy(owner or {}) from None
            if os.fstat(fd).st_ino != getattr(_stat(self.path), "st_ino", None):
                os.close(fd)  # the owner removed the file in between: lock the new one
                return None
            if owner and owner.get("host") != socket.gethostname():
                raise UserError(f"{self.out} is locked by {_who(owner)}; if that process is gone, delete {self.path}")
            if owner:
                log.warning("%s: taking over the lock left by %s, which is no longer running", self.out, _who(owner))
                self.stale = owner
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_record(self.command)).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

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


class _Busy(Exception):
    def __init__(self, owner: dict):
        super().__init__()
        self.owner = owner


def _flock(fd: int, owner: dict | None) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    elif owner:  # no flock (Windows): a lock file with a record is taken to be held
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
