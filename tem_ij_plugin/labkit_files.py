"""Labkit's labelings as training labels, with the class names the file gives.

Labkit (Fiji) saves a labeling in two ways (``LabelingSerializer`` of labkit-ui):

* ``NAME.labeling``: JSON ``{"interval": {"min": [...], "max": [...]}, "labels": {NAME: [[x, y(, z)],
  ...]}, "colors": {...}, "pixelSizes": [...]}``, the pixel positions of each label, x first;
* ``NAME.tif`` with ``NAME.tif.labels`` beside it: an index image, and JSON ``{"labelSets": [[names of
  index 0], [names of index 1], ...]}``.

Label names follow the ROI rules (:func:`~tem_ij_plugin.annotations.class_of`): ``cell``, ``Cell 2``,
``bg``, ``ignore``. A pixel that two labels of different classes claim stays unlabelled, as where two
ROIs disagree. Both files are read as untrusted input: parsed into a typed schema, positions checked
against the image before anything is painted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import Field, ValidationError

from .annotations import IGNORE_NAME, UNLABELLED, Labels, class_of, label_classes
from .errors import UserError
from .schemas import MAX_CLASSES, Name, _Open, describe, parse_json

LABELING_SUFFIX = ".labeling"
SIDECAR_SUFFIX = ".labels"  # Labkit writes NAME.tif.labels beside a labeling saved as NAME.tif
MAX_JSON_BYTES = 1 << 31  # a .labeling lists every labelled pixel: 2 GiB is ~100 M pixels

Coordinate = Annotated[int, Field(ge=-(2**40), le=2**40)]


class _Interval(_Open):
    min: list[Coordinate] = Field(min_length=2, max_length=3)
    max: list[Coordinate] = Field(min_length=2, max_length=3)


class LabelingFile(_Open):
    """The typed content of a Labkit ``.labeling`` (positions are checked as arrays, not one by one)."""

    interval: _Interval
    labels: dict[Name, list[Any]] = Field(max_length=MAX_CLASSES)


class LabelSetsFile(_Open):
    """The typed content of a Labkit ``NAME.tif.labels``: the label names of each index of the image."""

    labelSets: list[list[Name]] = Field(min_length=1, max_length=1 << 16)  # noqa: N815 (Labkit's key)


def is_labkit(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Labkit labeling: a ``.labeling``, or an image with ``NAME.labels`` beside it."""
    p = Path(path)
    return p.suffix.lower() == LABELING_SUFFIX or _sidecar(p).is_file()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def read_labkit(path: str | os.PathLike, classes: list[str] | None) -> Labels:
    """A Labkit labeling as partial labels, its label names giving the classes.

    Parameters
    ----------
    path : path
        ``NAME.labeling``, or ``NAME.tif`` with Labkit's ``NAME.tif.labels`` beside it.
    classes : list of str, optional
        The classes in index order (``--classes`` or the warm-start model's); the file's label names
        must belong to them. Without them the classes are the file's, background first.

    Returns
    -------
    Labels
        Shape (Z, Y, X): one plane for a 2-D labeling.

    Raises
    ------
    UserError
        An unreadable or damaged file, positions outside the labeling, a label name with no class,
        a class outside ``classes``, or fewer than two classes labelled.
    """
    path = Path(path)
    if path.suffix.lower() == LABELING_SUFFIX:
        values, names, clash = _read_labeling(path)
    else:
        values, names, clash = _read_index_image(path)
    return _as_labels(values, names, clash, classes, path)


def _load_json(path: Path, schema):
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise UserError(f"{path} is {size / 2**30:.1f} GiB, more than a Labkit labeling we read (2 GiB)")
        return schema.model_validate(parse_json(path.read_bytes()))
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValidationError as exc:
        raise UserError(f"{path} is not a Labkit labeling: {describe(exc)}") from None
    except ValueError as exc:  # parse_json: not JSON, or nested too deeply
        raise UserError(f"{path} is not a Labkit labeling: {exc}") from None


def _read_labeling(path: Path) -> tuple[np.ndarray, list[list[str]], np.ndarray]:
    """A ``.labeling`` as an index image (Z, Y, X), the label name of each index (0: none), and the clashes.

    A clash is a pixel that two labels of different classes claim (Labkit lets labels overlap).
    """
    from .io import _check_fits

    f = _load_json(path, LabelingFile)
    low, high = np.array(f.interval.min), np.array(f.interval.max)
    if len(low) != len(high) or (high < low).any():
        raise UserError(f"{path}: the labeling's interval is not a box (min {low.tolist()}, max {high.tolist()})")
    size = high - low + 1
    if np.prod(size.astype(float)) > 2**34:
        raise UserError(f"{path}: the labeling claims {'x'.join(map(str, size))} pixels, more than we read")
    shape = (int(size[2]) if len(size) == 3 else 1, int(size[1]), int(size[0]))
    # What painting and the labels need per pixel (index, clash flag, class), refused before allocating.
    _check_fits(path, f"a labeling of {'x'.join(map(str, size))} pixels", int(np.prod(size, dtype=np.int64)) * 6)
    values = np.zeros(shape, np.uint16)
    clash = np.zeros(shape, bool)
    names: list[list[str]] = [[]]
    for index, (name, points) in enumerate(f.labels.items(), start=1):
        names.append([name])
        xyz = _positions(points, len(size), path, name) - low
        if ((xyz < 0) | (xyz >= size)).any():
            raise UserError(f"{path}: label '{name}' has pixels outside the labeling's interval")
        at = (xyz[:, 2] if len(size) == 3 else 0, xyz[:, 1], xyz[:, 0])
        before = values[at]
        earlier = np.array([class_of(ns[0]) if ns else None for ns in names])[before]
        clash[at] |= (before > 0) & (earlier != class_of(name))
        values[at] = np.where(before == 0, index, before)
    return values, names, clash


def _positions(points: list, ndim: int, path: Path, name: str) -> np.ndarray:
    """A label's pixel positions as an (N, ndim) integer array."""
    if not points:
        return np.empty((0, ndim), np.int64)
    try:
        xyz = np.asarray(points)
    except ValueError:  # ragged lists
        xyz = np.empty(0)
    if xyz.ndim != 2 or xyz.shape[1] != ndim or xyz.dtype.kind not in "iu":
        raise UserError(f"{path}: label '{name}' holds something other than {ndim}-D whole-number pixel positions")
    return xyz.astype(np.int64)


def _read_index_image(path: Path) -> tuple[np.ndarray, list[list[str]], None]:
    """Labkit's index TIFF (Z, Y, X) and, from ``NAME.tif.labels``, the label names of each index."""
    from .io import read_image

    sets = _load_json(_sidecar(path), LabelSetsFile).labelSets
    values = read_image(path).data
    if values.dtype.kind not in "iu":
        raise UserError(f"{path}: a Labkit index image holds whole numbers, not {values.dtype}")
    if values.size and (values.min() < 0 or values.max() >= len(sets)):
        raise UserError(
            f"{path} has values {values.min()}..{values.max()} but {_sidecar(path).name} names "
            f"{len(sets)} label set(s) (0..{len(sets) - 1})"
        )
    return values, sets, None


def _as_labels(values: np.ndarray, names: list[list[str]], clash, classes: list[str] | None, path: Path) -> Labels:
    """Index image + the label names of each index -> partial labels of the named classes."""
    named = {n: class_of(n) for ns in names for n in ns}
    unnamed = sorted(n for n, c in named.items() if c is None)
    if unnamed:
        raise UserError(
            f"{path}: label(s) {', '.join(repr(n) for n in unnamed)} carry no class name; rename them in "
            "Labkit, e.g. 'cell', 'background' (or 'bg'), 'ignore'"
        )
    present = np.zeros(len(names), bool)
    for plane in values:  # plane by plane: no stack-sized int64 copy
        present |= np.bincount(plane.ravel(), minlength=len(names))[: len(names)] > 0
    used = sorted({n for i in np.flatnonzero(present) for n in names[i]})
    classes = label_classes(used, [named[n] for n in used], classes, what="label(s)")
    # Per index: its class; unlabelled where it has no label or labels of two classes; ignore leaves out.
    # Labels no pixel carries (Labkit keeps empty ones) need no class.
    lookup = np.full(len(names), UNLABELLED, np.int16)
    mixed = np.zeros(len(names), bool)
    for i, ns in enumerate(names):
        if not present[i]:
            continue
        kinds = {named[n] for n in ns}
        mixed[i] = len(kinds - {IGNORE_NAME}) > 1
        if len(kinds) == 1 and IGNORE_NAME not in kinds:
            lookup[i] = classes.index(kinds.pop())
    labels = lookup[values]
    clash = mixed[values] if clash is None else clash | mixed[values]
    labels[clash] = UNLABELLED
    n = int(np.count_nonzero(clash))
    warnings = [f"{n} pixel(s) carry labels of two classes and were left unlabelled"] if n else []
    return Labels(labels=labels, classes=list(classes), warnings=warnings)
