"""Objects of one class from its probability map: instance labels, measurements and outlines.

An object is a 4-connected region of pixels whose most probable class is the chosen one. Touching
objects are split by a seeded watershed: on the class probability (``split="probability"``, seeds
where the model is sure, so the split follows the dips in its evidence between two cells) or on the
distance to the region's edge (``"distance"``: what Fiji's Distance Map and Watershed do). Holes that
one object encloses are filled by default, so that its outline, traced along pixel edges, encloses
exactly its pixels: ImageJ measures the same area from the ROI as :func:`measure` reports.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .io import Calibration

SPLITS = ("probability", "distance", "none")
_EIGHT = np.ones((3, 3), bool)


@dataclass(frozen=True)
class ObjectSettings:
    """How objects are cut out of a probability map.

    Attributes
    ----------
    min_area : int
        Objects of fewer pixels are dropped.
    split : str
        ``probability``, ``distance`` or ``none`` (connected regions only).
    seed_level : float
        ``probability`` split: a seed is a region where the class probability is at least this.
    seed_depth : float
        ``distance`` split: a seed is a maximum of the distance map at least this many pixels deep.
    fill_holes : bool
        Fill the holes an object encloses (background, other classes, and objects inside it).
    """

    min_area: int = 64
    split: str = "probability"
    seed_level: float = 0.8
    seed_depth: float = 2.0
    fill_holes: bool = True

    def __post_init__(self):
        if self.split not in SPLITS:
            raise UserError(f"the split must be one of {', '.join(SPLITS)}, not {self.split!r}")
        if self.min_area < 1:
            raise UserError(f"the minimum object area must be at least 1 pixel, not {self.min_area}")
        if not 0 < self.seed_level <= 1:
            raise UserError(f"the seed level is a probability in (0, 1], not {self.seed_level}")
        if self.seed_depth <= 0:
            raise UserError(f"the seed depth must be above 0 pixels, not {self.seed_depth}")

    @classmethod
    def for_patch_size(cls, size: int, **overrides) -> ObjectSettings:
        """Defaults scaled to the annotation patch: the smallest object is 1/1024 of a patch (64 px at 256)."""
        return cls(**{"min_area": max(1, size * size // 1024), **overrides})

    @classmethod
    def for_annotations(cls, size: int, areas: dict | None, class_name: str, **overrides) -> ObjectSettings:
        """Defaults from what was annotated: the smallest object is a quarter of the median annotated one.

        Falls back to :meth:`for_patch_size` (and never goes below it) when fewer than
        ``MIN_PIECES`` pieces of the class were annotated. ``areas`` is
        :func:`~tem_ij_plugin.annotations.annotated_areas` as a model or a probability map records it
        (untrusted: anything malformed is ignored).
        """
        floor = max(1, size * size // 1024)
        median = _median_area(areas, class_name)
        if median is not None:
            floor = max(floor, int(OBJECT_FRACTION * median))
        return cls(**{"min_area": floor, **overrides})


OBJECT_FRACTION = 0.25  # of the median annotated piece: the smallest object kept
MIN_PIECES = 5  # annotated pieces of a class before their median sets the minimum area


def _median_area(areas, class_name: str) -> float | None:
    """The median annotated area of a class from a record, when it is well-formed and rests on enough pieces."""
    from pydantic import ValidationError

    from .schemas import ObjectAreas

    entry = areas.get(class_name) if isinstance(areas, dict) else None
    try:
        checked = ObjectAreas.model_validate(entry)  # the model schema's own type: a job record is untrusted
    except ValidationError:
        return None
    return checked.median_px if checked.count >= MIN_PIECES else None


def label_plane(probs: np.ndarray, index: int, settings: ObjectSettings | None = None) -> np.ndarray:
    """Objects of class ``index`` in one plane's probabilities (C, Y, X).

    Returns
    -------
    ndarray of int32, shape (Y, X)
        0 outside objects, 1..N inside, numbered in raster order of each object's first pixel.
    """
    from scipy import ndimage as ndi

    s = settings or ObjectSettings()
    mask = probs.argmax(0) == index
    if s.split == "none":
        labels = ndi.label(mask)[0]
    else:
        labels = _watershed(mask, probs[index], s)
    labels = _drop_small(labels, s.min_area)
    if s.fill_holes:
        labels = _fill_holes(labels)
    return _raster_order(labels)


def within_class(
    masks: np.ndarray, probs: np.ndarray, index: int, settings: ObjectSettings | None = None
) -> np.ndarray:
    """Another segmenter's objects (cellpose's masks) cut to the pixels the model gives class ``index``.

    A mask that the cut splits becomes one object per piece; pieces under the minimum area are dropped.
    Holes are not filled: what the other segmenter left open stays open.

    Returns
    -------
    ndarray of int32, shape (Y, X)
        As :func:`label_plane`.
    """
    from skimage.measure import label

    s = settings or ObjectSettings()
    cut = np.where(probs.argmax(0) == index, masks, 0)
    pieces = label(cut, background=0, connectivity=1)  # connected pixels of one id: a piece each
    return _raster_order(_drop_small(pieces, s.min_area))


def _watershed(mask: np.ndarray, prob: np.ndarray, s: ObjectSettings) -> np.ndarray:
    """Seeded watershed inside ``mask``; a region with no seed stays one object."""
    from scipy import ndimage as ndi
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    if s.split == "probability":
        height = prob
        seeds = ndi.label(mask & (prob >= s.seed_level))[0]
        seeds = _drop_small(seeds, max(1, s.min_area // 4))  # specks of confidence are not cells
    else:
        height = ndi.gaussian_filter(ndi.distance_transform_edt(mask), 1.0)
        seeds = ndi.label(h_maxima(height, s.seed_depth) & mask)[0]
    labels = watershed(-height, seeds, mask=mask, connectivity=1)
    orphans = ndi.label(mask & (labels == 0))[0]
    labels[orphans > 0] = orphans[orphans > 0] + labels.max()
    return labels


def _drop_small(labels: np.ndarray, min_area: int) -> np.ndarray:
    """``labels`` without the objects of fewer than ``min_area`` pixels."""
    counts = np.bincount(labels.ravel())
    small = counts < min_area
    small[0] = False
    return np.where(small[labels], 0, labels) if small.any() else labels


def _fill_holes(labels: np.ndarray) -> np.ndarray:
    """Each object with what it encloses: its holes, and any object inside them (which becomes part of it).

    Holes are 8-connected (as the background is, next to 4-connected objects): a gap that reaches
    the outside through a corner is not a hole, and the outline tracer treats it the same way.
    """
    from scipy import ndimage as ndi

    labels = labels.copy()
    for i, box in enumerate(ndi.find_objects(labels), 1):
        if box is None:
            continue
        own = labels[box] == i  # empty when an enclosing object took it already
        inside = ndi.binary_fill_holes(own, structure=_EIGHT) & ~own
        if inside.any():
            labels[box][inside] = i
    return labels


def _raster_order(labels: np.ndarray) -> np.ndarray:
    """Renumber 1..N in raster order of each object's first pixel (deterministic ids), as int32."""
    flat = labels.ravel()
    ids, first = np.unique(flat, return_index=True)
    order = ids[np.argsort(first)]
    order = order[order > 0]
    lut = np.zeros(int(labels.max()) + 1, np.int32)
    lut[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return lut[labels]


def outline(mask: np.ndarray) -> np.ndarray:
    """The outer outline of a 4-connected region along pixel edges, as polygon vertices (x, y).

    Vertices are pixel corners, so ImageJ's polygon of them holds exactly the region's pixels (with
    its holes, if any were left). Where two of its pixels touch only at a corner, the outline turns
    to stay on the pixel it came from (the region is 4-connected).

    Parameters
    ----------
    mask : ndarray of bool, shape (Y, X)

    Returns
    -------
    ndarray of float32, shape (N, 2)
        Clockwise on screen (y down), without repeated or collinear vertices.
    """
    m = np.pad(mask, 1)
    out: dict = {}
    # Each pixel edge between the region and the outside, directed clockwise around its pixel.
    for (dy, dx), (a, b) in {
        (-1, 0): ((0, 0), (0, 1)),  # top side, left to right
        (0, 1): ((0, 1), (1, 1)),  # right side, downwards
        (1, 0): ((1, 1), (1, 0)),  # bottom side, right to left
        (0, -1): ((1, 0), (0, 0)),  # left side, upwards
    }.items():
        ys, xs = np.nonzero(m & ~np.roll(m, (-dy, -dx), (0, 1)))
        for y, x in zip(ys.tolist(), xs.tolist()):
            out.setdefault((y + a[0], x + a[1]), []).append((y + b[0], x + b[1]))
    if not out:
        raise ValueError("outline() of an empty mask")
    start = min(out)  # the top-left corner of the first pixel: on the outer outline, its top side
    prev, here = start, _top_side_end(start, out)
    points = [start]
    while here != start:
        points.append(here)
        nxt = out[here]
        if len(nxt) == 1:
            step = nxt[0]
        else:  # a corner shared with a diagonal neighbour: turn right, staying on this pixel
            dy, dx = here[0] - prev[0], here[1] - prev[1]
            step = (here[0] + dx, here[1] - dy)
        prev, here = here, step
    return _corners(np.array(points, np.float32)[:, ::-1] - 1)


def _top_side_end(start: tuple, out: dict) -> tuple:
    """The end of the edge that leaves ``start`` to the right (the top side of the first pixel)."""
    return next(v for v in out[start] if v == (start[0], start[1] + 1))


def _corners(xy: np.ndarray) -> np.ndarray:
    """Drop the vertices where the outline goes straight on."""
    before, after = np.roll(xy, 1, 0), np.roll(xy, -1, 0)
    d1, d2 = xy - before, after - xy
    turn = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    return xy[turn != 0]


def object_outlines(labels: np.ndarray) -> dict:
    """``{id: (N, 2) float32 polygon (x, y) in image pixels}`` for every object of a label plane."""
    from scipy import ndimage as ndi

    found = {}
    for i, box in enumerate(ndi.find_objects(labels), 1):
        if box is None:
            continue
        xy = outline(labels[box] == i)
        found[i] = xy + np.array([box[1].start, box[0].start], np.float32)
    return found


def unit_suffix(unit: str) -> str:
    """A column-name suffix for a calibration unit: ``um``, ``nm``, ``px`` (uncalibrated), ..."""
    u = unit.strip().lower().replace("µ", "u").replace("\\u00b5", "u")
    if u in ("", "pixel", "pixels", "px"):
        return "px"
    if u in ("micron", "microns", "micrometer", "micrometre"):
        return "um"
    return re.sub(r"[^a-z0-9]", "", u) or "unit"


def measure(
    labels: np.ndarray,
    z: int,
    calibration: Calibration | None = None,
    image: np.ndarray | None = None,
    prob: np.ndarray | None = None,
    slice_label: str = "",
    first_id: int = 0,
) -> list[dict]:
    """One row per object of a label plane (see :func:`measurement_columns` for names and units).

    Parameters
    ----------
    labels : ndarray of int, shape (Y, X)
        Objects 1..N of plane ``z`` (0-based; rows say ``slice`` z + 1, as ImageJ counts).
    calibration : Calibration, optional
        Pixel size and unit; areas and lengths are in pixels without one.
    image : ndarray, shape (Y, X), optional
        The image plane: mean, min and max intensity (empty without it).
    prob : ndarray, shape (Y, X), optional
        The class probability: its mean over the object is the row's confidence.
    first_id : int
        Added to the plane's object numbers: ids stay unique over a stack.
    """
    from skimage.measure import regionprops

    cal = calibration or Calibration()
    pw, ph = cal.pixel_width, cal.pixel_height
    length = float(np.sqrt(pw * ph))
    h, w = labels.shape
    rows = []
    for r in regionprops(labels):
        y0, x0, y1, x1 = r.bbox
        cy, cx = r.centroid
        pixels = tuple(r.coords.T)
        area = r.area * pw * ph
        rows.append(
            {
                "id": first_id + r.label,
                "slice": z + 1,
                "slice_label": slice_label,
                "area": area,
                "perimeter": r.perimeter * length,
                "x": (cx + 0.5) * pw,  # ImageJ's centroid: pixel centres at +0.5
                "y": (cy + 0.5) * ph,
                "bbox_x": x0,
                "bbox_y": y0,
                "bbox_width": x1 - x0,
                "bbox_height": y1 - y0,
                "equivalent_diameter": float(np.sqrt(4 * area / np.pi)),
                "eccentricity": r.eccentricity,
                "solidity": r.solidity,
                "mean": float(image[pixels].mean()) if image is not None else None,
                "min": float(image[pixels].min()) if image is not None else None,
                "max": float(image[pixels].max()) if image is not None else None,
                "confidence": float(prob[pixels].mean()) if prob is not None else None,
                "touches_border": int(y0 == 0 or x0 == 0 or y1 == h or x1 == w),
                "pixels": int(r.area),
            }
        )
    return rows


def measurement_columns(unit: str) -> dict:
    """``{row key: CSV column name}``; names carry the unit (``area_um2``, ``perimeter_um``, ``x_um``)."""
    u = unit_suffix(unit)
    return {
        "id": "id",
        "slice": "slice",
        "slice_label": "slice_label",
        "area": f"area_{u}2",
        "perimeter": f"perimeter_{u}",
        "x": f"x_{u}",
        "y": f"y_{u}",
        "bbox_x": "bbox_x_px",
        "bbox_y": "bbox_y_px",
        "bbox_width": "bbox_width_px",
        "bbox_height": "bbox_height_px",
        "equivalent_diameter": f"equivalent_diameter_{u}",
        "eccentricity": "eccentricity",
        "solidity": "solidity",
        "mean": "mean_intensity",
        "min": "min_intensity",
        "max": "max_intensity",
        "confidence": "confidence",
        "touches_border": "touches_border",
        "pixels": "pixels",
    }


def slice_summary(rows: list[dict], n_planes: int, plane_pixels: int, slice_labels=()) -> list[dict]:
    """Per plane: object count, mean and total area, and the fraction of the plane the objects cover."""
    out = []
    for z in range(n_planes):
        mine = [r for r in rows if r["slice"] == z + 1]
        areas = [r["area"] for r in mine]
        out.append(
            {
                "slice": z + 1,
                "slice_label": slice_labels[z] if z < len(slice_labels) else "",
                "count": len(mine),
                "mean_area": float(np.mean(areas)) if areas else None,
                "total_area": float(np.sum(areas)),
                "area_fraction": sum(r["pixels"] for r in mine) / plane_pixels,
            }
        )
    return out


def objects_paths(measure_path: str | os.PathLike) -> list[Path]:
    """What :func:`write_measurements` writes for ``NAME.csv``: it and the per-slice ``NAME-slices.csv``."""
    path = Path(measure_path)
    return [path, path.with_name(f"{path.stem}-slices.csv")]


def _csv_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _write_table(path: Path, rows: list[dict], columns: dict) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns.values())
        for r in rows:
            w.writerow([_csv_value(r[k]) for k in columns])


def summary_columns(unit: str) -> dict:
    """``{row key: CSV column name}`` of the per-slice table."""
    u = unit_suffix(unit)
    return {
        "slice": "slice",
        "slice_label": "slice_label",
        "count": "count",
        "mean_area": f"mean_area_{u}2",
        "total_area": f"total_area_{u}2",
        "area_fraction": "area_fraction",
    }


def write_measurements(path: str | os.PathLike, rows: list[dict], summary: list[dict], unit: str) -> list[Path]:
    """Write the object table to ``NAME.csv`` and the per-slice table to ``NAME-slices.csv``; returns both paths."""
    from .outputs import atomic_write

    paths = objects_paths(path)
    atomic_write(paths[0], lambda tmp: _write_table(tmp, rows, measurement_columns(unit)))
    atomic_write(paths[1], lambda tmp: _write_table(tmp, summary, summary_columns(unit)))
    return paths


@dataclass(frozen=True)
class EncodedRoi:
    """An outline as the bytes of its ImageJ ``.roi`` file, and its name.

    A stack's outlines are kept encoded: a roifile ``ImagejRoi`` object costs several kB more than
    its bytes, which made the memory of ``objects`` grow with the number of objects.
    """

    name: str
    data: bytes

    def tobytes(self) -> bytes:
        """The ``.roi`` file's bytes (what ImageJ's ``RoiDecoder`` reads)."""
        return self.data


def object_roi(xy: np.ndarray, name: str, position: int) -> EncodedRoi:
    """An ImageJ polygon ROI of an outline; ``position`` is the 1-based slice (0: a 2-D image)."""
    import roifile

    roi = roifile.ImagejRoi.frompoints(xy, name=name)
    roi.roitype = roifile.ROI_TYPE.TRACED  # what ImageJ's wand makes: integer pixel corners
    roi.position = position
    return EncodedRoi(name, roi.tobytes())


def write_object_rois(path: str | os.PathLike, rois: list) -> None:
    """Write object ROIs to an ImageJ RoiSet.zip, marked as ours (see :func:`outputs.written_by_us`)."""
    import zipfile

    from .outputs import OBJECTS_ZIP_COMMENT, atomic_write

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for roi in rois:
                zf.writestr(f"{roi.name}.roi", roi.tobytes())
            zf.comment = OBJECTS_ZIP_COMMENT

    atomic_write(path, write)
