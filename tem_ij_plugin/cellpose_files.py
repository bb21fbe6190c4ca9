"""cellpose's files without cellpose: masks in as training labels, objects out for its GUI.

cellpose keeps a segmentation in two forms: ``NAME_seg.npy``, a dict (``masks``, ``outlines``,
``filename``, ...) that ``np.save`` pickled, and ``NAME_cp_masks.tif`` / ``NAME_masks.tif``, an
instance label image (0 no cell, 1..N one id per cell). ``np.load(allow_pickle=True)`` on a pickle
from elsewhere can run any code, so :func:`read_seg_masks` reads the pickle with an unpickler that
builds only plain containers and numpy arrays and refuses every other object. Nothing here imports
cellpose; the files follow cellpose 2-4 (the GUI reads ``masks`` and ``outlines``).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from .annotations import Labels, labels_from_image
from .errors import UserError

SEG_SUFFIX = "_seg.npy"
MASK_STEMS = ("_cp_masks", "_masks")
# What a pickled numpy array needs and nothing more: the array, its dtype and numpy scalars.
_NUMPY_GLOBALS = {"_reconstruct", "scalar", "_frombuffer", "ndarray", "dtype"}
_NUMPY_MODULES = {
    "numpy",
    "numpy.core.multiarray",
    "numpy._core.multiarray",
    "numpy.core.numeric",
    "numpy._core.numeric",
}


class _Refused(pickle.UnpicklingError):
    """A pickle asked for an object that is not an array or a plain container."""


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds dicts, lists, strings, numbers and numpy arrays, and nothing else."""

    def find_class(self, module: str, name: str):
        if module in _NUMPY_MODULES and name in _NUMPY_GLOBALS:
            if int(np.__version__.split(".")[0]) >= 2:  # numpy 1's pickles name numpy.core, a deprecated alias
                module = module.replace("numpy.core", "numpy._core")
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def _load_npy(f) -> object:
    """An ``.npy``'s array; a pickled one (object dtype) through :class:`_ArraysOnly`."""
    version = np.lib.format.read_magic(f)
    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    if header(f)[2].hasobject:
        return _ArraysOnly(f).load()
    f.seek(0)
    return np.load(f, allow_pickle=False)


def is_cellpose_masks(path: str | os.PathLike) -> bool:
    """Whether a file name is one of cellpose's: ``NAME_seg.npy``, ``NAME_cp_masks.*`` or ``NAME_masks.*``."""
    p = Path(path)
    return p.name.lower().endswith(SEG_SUFFIX) or p.stem.lower().endswith(MASK_STEMS)


def read_seg_masks(path: str | os.PathLike) -> np.ndarray:
    """The instance masks of a cellpose ``_seg.npy`` (or of a plain integer ``.npy``), shape (Z, Y, X).

    Raises
    ------
    UserError
        Not an ``.npy``; a pickle that holds anything but containers and arrays; no ``masks``;
        masks that are not a 2-D or 3-D array of whole numbers >= 0.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = _load_npy(f)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except _Refused as exc:
        raise UserError(
            f"{path} is not a cellpose _seg.npy: it holds {exc}, which is never unpickled (only arrays are read)"
        ) from exc
    except Exception as exc:  # a truncated or foreign file: numpy and pickle raise many kinds
        raise UserError(f"{path} is not a readable .npy file ({type(exc).__name__}: {exc})") from exc
    if isinstance(data, np.ndarray) and data.dtype.hasobject and data.shape == ():
        data = data.item()
    masks = data.get("masks") if isinstance(data, dict) else data
    return _checked_masks(masks, path)


def _checked_masks(masks, path: Path) -> np.ndarray:
    if not isinstance(masks, np.ndarray) or masks.ndim not in (2, 3) or masks.dtype.kind not in "uif":
        raise UserError(f"{path} holds no cellpose masks (a 2-D or 3-D array of cell ids under 'masks')")
    if masks.dtype.kind == "f" and (not np.isfinite(masks).all() or (masks != np.round(masks)).any()):
        raise UserError(f"the masks in {path} are not whole numbers")
    if masks.size and masks.min() < 0:
        raise UserError(f"the masks in {path} hold negative ids")
    return masks.reshape((-1,) + masks.shape[-2:]).astype(np.int64)


def labels_from_masks(masks: np.ndarray, classes: list[str]) -> Labels:
    """Masks of cellpose as labels, read as cellpose trains on them: every pixel is labelled.

    Inside a mask is ``classes[1]``; outside every mask ``classes[0]``, and so is the line where two
    masks touch (the membrane between two cells belongs to neither), so that the model learns to
    keep touching cells apart.

    Parameters
    ----------
    masks : ndarray of int, shape (Z, Y, X)
        0 = no cell, 1..N = one id per cell.
    classes : list of str
        Exactly two: the outside class, then the cell class.
    """
    if len(classes) != 2:
        raise UserError(
            f"cellpose masks give two classes (outside the cells, inside them), but {len(classes)} are named "
            f"({', '.join(classes)}); name two with --classes, e.g. background,cell"
        )
    values = np.where(masks > 0, 2, 1).astype(np.uint8)
    values[_contacts(masks)] = 1
    return labels_from_image(values, classes)


def _contacts(masks: np.ndarray) -> np.ndarray:
    """Pixels of a cell with a 4-neighbour in another cell (both sides of the line), per plane."""
    out = np.zeros(masks.shape, bool)
    for axis in (1, 2):
        a = np.swapaxes(masks, 0, axis)[1:]
        b = np.swapaxes(masks, 0, axis)[:-1]
        touch = (a > 0) & (b > 0) & (a != b)
        o = np.swapaxes(out, 0, axis)
        o[1:] |= touch
        o[:-1] |= touch
    return out


def outlines(masks: np.ndarray) -> np.ndarray:
    """The ``outlines`` of a ``_seg.npy``: each cell's id on its own pixels that have a 4-neighbour outside it."""
    pad = np.pad(masks, [(0, 0), (1, 1), (1, 1)])
    inner = masks.copy()
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        inner[pad[:, dy : dy + masks.shape[1], dx : dx + masks.shape[2]] != masks] = 0
    return np.where(inner == 0, masks, 0).astype(masks.dtype)


def write_seg_npy(path: str | os.PathLike, masks: np.ndarray, image_path: str | os.PathLike | None = None) -> None:
    """Write objects as a cellpose ``_seg.npy`` that its GUI opens beside the image, marked as ours.

    Parameters
    ----------
    masks : ndarray of int, shape (Z, Y, X)
        Object ids (0 = none); one plane is written 2-D, a stack as (Z, Y, X) (cellpose's 3-D GUI).
    image_path : path, optional
        The image the objects belong to (cellpose's GUI opens it, or the image named like the file).
    """
    from .outputs import SOFTWARE, atomic_write

    n = int(masks.max()) if masks.size else 0
    masks = np.array(masks, dtype=np.uint16 if n < 2**16 else np.uint32)  # a plain array: a memmap pickles as one
    edges = outlines(masks)
    flat = len(masks) == 1
    data = {
        "masks": masks[0] if flat else masks,
        "outlines": edges[0] if flat else edges,
        "ismanual": np.zeros(n, bool),
        "filename": str(Path(image_path).resolve()) if image_path else "",
        "chan_choose": [0, 0],
        "software": SOFTWARE,
    }

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.array(data, dtype=object), allow_pickle=True)

    atomic_write(path, write)


def is_our_seg_npy(path: str | os.PathLike) -> bool:
    """Whether a ``_seg.npy`` was written by :func:`write_seg_npy` (its ``software`` entry)."""
    from .outputs import SOFTWARE

    try:
        with open(path, "rb") as f:
            data = _load_npy(f)
    except Exception:  # anything unreadable is not ours
        return False
    data = data.item() if isinstance(data, np.ndarray) and data.shape == () else data
    return isinstance(data, dict) and data.get("software") == SOFTWARE
