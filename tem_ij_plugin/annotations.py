"""ROI shapes -> polygons -> partial label maps, and the rules that turn ROI names into classes.

Coordinates follow ImageJ: x to the right, y down, pixel (x, y) covers the square [x, x+1) x [y, y+1).
A pixel belongs to a shape when its centre lies inside (even-odd rule), which is the rule of ImageJ's
``PolygonFiller`` behind ``Roi.getMask()``. Label maps use -1 for "unlabelled" (ignored by the loss).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from .errors import UserError

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable

log = logging.getLogger(__name__)

UNLABELLED = -1
BACKGROUND_NAMES = ("background", "bg")
IGNORE_NAME = "ignore"
PROPOSAL_PREFIX = "proposal"  # outlines a model proposed (tem-ij objects --proposals): labels only once renamed
_PROPOSAL = re.compile(rf"{PROPOSAL_PREFIX}-[0-9]+")
_SEPARATORS = re.compile(r"[\s\-_.:,;#/]+")


@dataclass
class Shape:
    """One annotation shape, independent of where it came from (RoiSet.zip, ImageJ, a simulation).

    Attributes
    ----------
    name : str
        The ROI name; its first word gives the class.
    kind : str
        ``polygon`` (also freehand/traced), ``rect``, ``oval`` or ``composite``.
    polygons : list of ndarray, each of shape (N, 2)
        Vertices as (x, y) in ImageJ pixel-corner coordinates. ``rect`` and ``oval`` hold one
        4-vertex bounding box polygon; ``composite`` holds sub-paths combined by the even-odd rule.
    position : int
        1-based slice the shape labels; 0 = no position (every plane, allowed only on request).
    group : int
        ImageJ ROI group number (0 = none).
    hyper : tuple of int
        ImageJ's hyperstack position (channel, slice, frame), each 1-based and 0 for "all", when the
        ROI has one (then ``position`` is 0); see :func:`plane_of`.
    """

    name: str
    kind: str
    polygons: list
    position: int = 0
    group: int = 0
    hyper: tuple = ()


@dataclass(frozen=True)
class StackLayout:
    """How an image's planes are arranged, to place ROIs on them (see :func:`plane_of`).

    Attributes
    ----------
    axes : str
        ``""`` (2-D), ``"Z"``, ``"T"`` or ``"TZ"`` (frames of slices, slices fastest).
    shape : tuple of int
        The length of each axis.
    """

    axes: str = ""
    shape: tuple = ()

    def length(self, axis: str) -> int:
        """The number of slices (``"Z"``) or frames (``"T"``): 1 where the image has no such axis."""
        return self.shape[self.axes.index(axis)] if axis in self.axes else 1


def plane_of(shape: Shape, stack: StackLayout) -> int:
    """The 1-based plane a ROI labels (0: every plane), from ImageJ's position or its hyperstack position.

    ImageJ keeps either a stack position or, for a ROI drawn on a hyperstack, its (channel, slice,
    frame), 0 meaning every one. Our planes run over frames, then slices, for the one channel read. A
    stack position is taken as our plane: that is how tem-ij writes ROIs (objects, suggestions), and
    the ROI Manager records hyperstack positions on a hyperstack.

    Raises
    ------
    UserError
        A hyperstack ROI that names a slice but not the frame of a T x Z stack (or the reverse).
    """
    if not shape.hyper:
        return shape.position
    _, z, t = shape.hyper
    n_z, n_t = stack.length("Z"), stack.length("T")
    if n_t > 1 and n_z > 1 and (z == 0) != (t == 0):
        where = f"slice {z} of every frame" if z else f"frame {t}, every slice"
        raise UserError(
            f"ROI '{shape.name}' is on {where} of this T x Z hyperstack; tem-ij labels one plane per ROI: "
            "add it on one slice of one frame (ROI Manager: More > Options > Associate with slices)"
        )
    if n_z > 1 or n_t == 1:
        return (max(t, 1) - 1) * n_z + z if z else 0
    return t  # a T stack: the frame is the plane


@dataclass
class Labels:
    """Partial labels of an image.

    Attributes
    ----------
    labels : ndarray of int16, shape (Z, Y, X)
        Class index per pixel, -1 where unlabelled.
    classes : list of str
        Class names in index order; ``background`` is always index 0.
    warnings : list of str
        Things the user should know (clipped shapes, conflicts).
    """

    labels: np.ndarray
    classes: list
    warnings: list = field(default_factory=list)

    def digest(self) -> str:
        """SHA-256 of the label map and class names (identifies the annotations used)."""
        h = hashlib.sha256()
        h.update(",".join(self.classes).encode())
        h.update(str(self.labels.shape).encode())
        h.update(np.ascontiguousarray(self.labels, dtype="<i2").tobytes())
        return h.hexdigest()


def class_of(name: str) -> str | None:
    """Class token of a ROI name, or None when the name carries no class.

    The class is the part before the first separator (space, ``-``, ``_``, ...), lower-cased, with
    trailing digits removed: ``cell-3``, ``Cell_2``, ``cell 12`` and ``cell3`` are all ``cell``; ``bg``
    is ``background``. Names made only of digits and separators (ImageJ's automatic ``0123-0456``) carry
    no class.
    """
    token = _SEPARATORS.split((name or "").strip(), maxsplit=1)[0].lower().rstrip("0123456789")
    if not token:
        return None
    return "background" if token in BACKGROUND_NAMES else token


def order_classes(names: Iterable[str]) -> list:
    """Background first, then the other class names alphabetically."""
    names = set(names) - {IGNORE_NAME}
    rest = sorted(names - {"background"})
    return ["background"] + rest


def fill_polygons(polygons: Iterable[np.ndarray], height: int, width: int, x0: int = 0, y0: int = 0) -> np.ndarray:
    """Boolean mask of the pixels whose centres lie inside the polygons (even-odd rule).

    Parameters
    ----------
    polygons : list of ndarray, each of shape (N, 2)
        Closed polygons as (x, y) vertices; several polygons combine by the even-odd rule, so a
        polygon inside another makes a hole.
    height, width : int
        Size of the mask.
    x0, y0 : int
        Image coordinates of the mask's top-left pixel.

    Returns
    -------
    ndarray of bool, shape (height, width)
    """
    parity = np.zeros((height, width + 1), dtype=np.int32)
    for poly in polygons:
        p = np.asarray(poly, dtype=np.float64).reshape(-1, 2) - (x0, y0)
        if len(p) < 3:
            continue
        xa, ya = p[:, 0], p[:, 1]
        xb, yb = np.roll(xa, -1), np.roll(ya, -1)
        keep = ya != yb
        xa, ya, xb, yb = xa[keep], ya[keep], xb[keep], yb[keep]
        if xa.size == 0:
            continue
        lo = max(0, int(np.floor(min(ya.min(), yb.min()))))
        hi = min(height, int(np.ceil(max(ya.max(), yb.max()))) + 1)
        if lo >= hi:
            continue
        yc = np.arange(lo, hi, dtype=np.float64)[:, None] + 0.5
        ymin, ymax = np.minimum(ya, yb), np.maximum(ya, yb)
        # Half-open rule in y, so a vertex shared by two edges is counted once.
        hit = (yc >= ymin) & (yc < ymax)
        t = (yc - ya) / (yb - ya)
        xc = xa + t * (xb - xa)
        rows, cols = np.nonzero(hit)
        # A crossing at x toggles every pixel whose centre (c + 0.5) is right of x. As in ImageJ's
        # PolygonFiller, a centre exactly on an edge is outside a left edge and inside a right one,
        # and the 1e-8 keeps rounding errors of xc from flipping such ties.
        first = np.clip(np.floor(xc[rows, cols] - 0.5 + 1e-8) + 1, 0, width).astype(np.int64)
        np.add.at(parity, (rows + lo, first), 1)
    return (np.cumsum(parity, axis=1)[:, :width] % 2).astype(bool)


def _local_mask(shape: Shape, height: int, width: int):
    """``(rows, cols, mask)``: the shape's mask within its bounding box, clipped to the image."""
    (xmin, ymin), (xmax, ymax) = _bounds(shape)
    x0, y0 = max(0, int(np.floor(xmin))), max(0, int(np.floor(ymin)))
    x1, y1 = min(width, int(np.ceil(xmax)) + 1), min(height, int(np.ceil(ymax)) + 1)
    rows, cols = slice(y0, max(y0, y1)), slice(x0, max(x0, x1))
    hh, ww = rows.stop - y0, cols.stop - x0
    if shape.kind in ("rect", "oval"):
        xs = np.arange(x0, x0 + ww) + 0.5
        ys = np.arange(y0, y0 + hh) + 0.5
        if shape.kind == "rect":
            return rows, cols, ((ys >= ymin) & (ys < ymax))[:, None] & ((xs >= xmin) & (xs < xmax))[None, :]
        cx, cy = (xmin + xmax) / 2, (ymin + ymax) / 2
        rx, ry = max((xmax - xmin) / 2, 1e-9), max((ymax - ymin) / 2, 1e-9)
        return rows, cols, ((ys - cy) / ry)[:, None] ** 2 + ((xs - cx) / rx)[None, :] ** 2 < 1.0
    if shape.kind in ("polygon", "composite"):
        return rows, cols, fill_polygons(shape.polygons, hh, ww, x0, y0)
    raise UserError(f"ROI '{shape.name}' is a {shape.kind} ROI; only area ROIs can label pixels")


def shape_mask(shape: Shape, height: int, width: int) -> np.ndarray:
    """Boolean mask of one shape on an image of the given size (parts outside are clipped)."""
    rows, cols, local = _local_mask(shape, height, width)
    mask = np.zeros((height, width), dtype=bool)
    mask[rows, cols] = local
    return mask


def check_coordinates(shape: Shape, source: str | os.PathLike = "") -> None:
    """Refuse a shape with NaN or infinite vertex coordinates (naming the ROI)."""
    for poly in shape.polygons:
        pts = np.asarray(poly, dtype=np.float64)
        if not np.isfinite(pts).all():
            bad = int(np.count_nonzero(~np.isfinite(pts).all(axis=-1))) if pts.ndim == 2 else pts.size
            where = f"{source}: " if str(source) else ""
            raise UserError(
                f"{where}ROI '{shape.name or '<no name>'}' has {bad} vertex(es) with NaN or infinite coordinates; "
                "delete or redraw it"
            )


def _bounds(shape: Shape):
    pts = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in shape.polygons])
    return pts.min(axis=0), pts.max(axis=0)


def rasterize(
    shapes: list[Shape],
    image_shape: tuple[int, ...],
    classes: list[str] | None = None,
    all_slices: bool = False,
    group_names: dict[int, str] | None = None,
    min_classes: int = 2,
    stack: StackLayout | None = None,
) -> Labels:
    """Turn annotation shapes into a partial label map.

    Parameters
    ----------
    shapes : list of Shape
        The ROIs. Their names (or group names) give their classes, see :func:`class_of`.
    image_shape : tuple of int
        (Z, Y, X) of the image the ROIs belong to.
    classes : list of str, optional
        The allowed classes in index order (e.g. from a model being refined). Any other class is an
        error. By default the classes found are used, background first.
    all_slices : bool
        Let a ROI without slice position label every plane of a stack (otherwise an error).
    group_names : dict of int to str, optional
        Names of ImageJ ROI groups, used for ROIs whose own name carries no class.
    min_classes : int
        How many classes must be annotated (1 when the ROIs add to a label image that has others).
    stack : StackLayout, optional
        How the planes are arranged (slices, frames, channels), to place ROIs; default a Z stack.

    Returns
    -------
    Labels

    Raises
    ------
    UserError
        Empty ROI set, unnamed or unknown classes, fewer than ``min_classes``, shapes outside the image,
        zero-area shapes, NaN or infinite coordinates, slices beyond the stack.
    """
    nz, h, w = image_shape
    shapes, warnings = _without_proposals(shapes)
    if not shapes and warnings:
        raise UserError(f"the ROI set holds only proposals: {warnings[0]}")
    if not shapes:
        raise UserError("the ROI set is empty: outline at least one cell and one background area")
    stack = stack or StackLayout("Z" if nz > 1 else "", (nz,) if nz > 1 else ())
    shapes = [replace(s, position=plane_of(s, stack), hyper=()) for s in shapes]
    named = _shape_classes(shapes, group_names)
    classes = label_classes([s.name for s in shapes], named, classes, min_classes)
    prepared = [_prepared(s, cls, classes, image_shape, all_slices, warnings) for s, cls in zip(shapes, named)]
    # One plane at a time, so that only the label stack itself is ever as large as the image.
    labels = np.full((nz, h, w), UNLABELLED, dtype=np.int16)
    n_conflict = 0
    present = set()
    for z in range(nz):
        mine = [p for p in prepared if p[0] in (0, z + 1)]
        if mine:
            n_conflict += _paint(labels[z], mine)
            present |= set(np.unique(labels[z]).tolist())
    if n_conflict:
        warnings.append(f"{n_conflict} pixel(s) claimed by ROIs of different classes were left unlabelled")
    if len(present - {UNLABELLED}) < min_classes:
        raise UserError("after removing 'ignore' areas and conflicts fewer than two classes remain labelled")
    for msg in warnings:
        log.warning(msg)
    return Labels(labels=labels, classes=classes, warnings=warnings)


def labels_from_image(values: np.ndarray, classes: list[str]) -> Labels:
    """Partial labels from a label image (Labkit, Trainable Weka Segmentation, ilastik, napari).

    Parameters
    ----------
    values : ndarray of int, shape (Z, Y, X)
        0 = unlabelled, k = ``classes[k - 1]``.
    classes : list of str
        The class of each value, in order.

    Raises
    ------
    UserError
        Non-integer or negative values, values beyond the classes, or fewer than two classes labelled.
    """
    if values.dtype.kind == "f":
        if not np.isfinite(values).all() or (values != np.round(values)).any():
            raise UserError("a label image holds whole numbers (0 = unlabelled, 1..N = classes); this one does not")
    elif values.dtype.kind not in "ui":
        raise UserError(f"a label image holds whole numbers, not {values.dtype}")
    top, low = int(values.max()), int(values.min())
    if low < 0 or top > len(classes):
        raise UserError(
            f"the label image has values {low}..{top}, but {len(classes)} class(es) are named "
            f"({', '.join(classes)}): value k is the k-th class, 0 unlabelled; name one class per value (--classes)"
        )
    labels = values.astype(np.int16) - 1  # 0 becomes UNLABELLED (-1)
    if len(np.unique(labels[labels >= 0])) < 2:
        raise UserError("the label image labels fewer than two classes; paint at least two (e.g. cell and background)")
    return Labels(labels=labels, classes=list(classes))


def annotated_areas(labels: np.ndarray, classes: list[str]) -> dict:
    """Per class, the connected labelled pieces: how many and their median area in pixels.

    A piece is what a person outlined (or its part inside a patch), so the median is the object
    scale as annotated. Only planes holding the class are labelled, so a large stack costs little.

    Returns
    -------
    dict
        ``{class: {"count": int, "median_px": float}}`` for the classes labelled anywhere.
    """
    from scipy import ndimage as ndi

    out = {}
    for k, name in enumerate(classes):
        sizes = []
        for plane in labels:
            mask = plane == k
            if mask.any():
                pieces, n = ndi.label(mask)
                sizes += np.bincount(pieces.ravel())[1:].tolist()
        if sizes:
            out[name] = {"count": len(sizes), "median_px": float(np.median(sizes))}
    return out


def merge_labels(a: Labels, b: Labels) -> Labels:
    """Both sets of labels (same classes); a pixel they give different classes is left unlabelled, with a warning."""
    if a.classes != b.classes:
        raise ValueError("merge_labels needs the same classes in the same order")
    both = (a.labels >= 0) & (b.labels >= 0)
    conflict = both & (a.labels != b.labels)
    merged = np.where(a.labels >= 0, a.labels, b.labels)
    merged[conflict] = UNLABELLED
    warnings = a.warnings + b.warnings
    if conflict.any():
        warnings.append(
            f"{int(conflict.sum())} pixel(s) the ROIs and the label image give different classes were left unlabelled"
        )
        log.warning(warnings[-1])
    return Labels(labels=merged.astype(np.int16), classes=list(a.classes), warnings=warnings)


def _without_proposals(shapes: list) -> tuple[list, list]:
    """The shapes that are not unaccepted proposals (``proposal-N``), and a warning when some were."""
    kept = [s for s in shapes if not _PROPOSAL.fullmatch((s.name or "").strip())]
    if len(kept) == len(shapes):
        return shapes, []
    return kept, [
        f"{len(shapes) - len(kept)} proposed outline(s) named proposal-N are not labels: rename the ones you "
        "accept to their class (e.g. cell-N) and delete the others"
    ]


def _shape_classes(shapes, group_names) -> list:
    """The class of each shape, from its name or else its ImageJ group's; every shape must have one."""
    group_names = {int(k): v for k, v in (group_names or {}).items()}
    named = []
    unnamed = []
    for s in shapes:
        cls = class_of(s.name)
        if cls is None and s.group and s.group in group_names:
            cls = class_of(group_names[s.group])
        if cls is None:
            unnamed.append(s.name or "<no name>")
        named.append(cls)
    if unnamed:
        raise UserError(
            f"{len(unnamed)} ROI(s) have no class name: {', '.join(repr(n) for n in unnamed[:20])}. "
            "Rename them in the ROI Manager, e.g. 'cell-1', 'background' (or 'bg'), 'ignore'."
        )
    return named


def label_classes(
    names: list[str], named: list, classes: list[str] | None, min_classes: int = 2, what: str = "ROI(s)"
) -> list:
    """The classes in index order (the given ones, or those found, background first); at least two annotated.

    Parameters
    ----------
    names : list of str
        What the user named each annotation (ROI or label), to point at the offending ones.
    named : list of str
        The class of each annotation (:func:`class_of`).
    classes : list of str, optional
        The allowed classes in order; every annotation's class must be one of them.
    what : str
        What the annotations are called in a message.
    """
    found = [c for c in named if c != IGNORE_NAME]
    if classes is None:
        classes = order_classes(found)
    else:
        classes = list(classes)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            bad = [n for n, c in zip(names, named) if c in unknown]
            raise UserError(
                f"unknown class(es) {', '.join(unknown)} in {what} {', '.join(repr(n) for n in bad[:20])}; "
                f"the allowed classes are {', '.join(classes)} (plus 'ignore')"
            )
    if len(set(found)) < min_classes:
        raise UserError(
            f"only one class is annotated ({', '.join(sorted(set(found))) or 'none'}); "
            "outline at least two classes, e.g. some cells and some background"
        )
    return classes


def _prepared(s, cls, classes, image_shape, all_slices: bool, warnings: list) -> tuple:
    """A checked shape as (slice position, class index or -1 for ignore, rows, cols, mask)."""
    nz, h, w = image_shape
    check_coordinates(s)
    if s.position > nz:
        raise UserError(f"ROI '{s.name}' is on slice {s.position} but the image has {nz} slice(s)")
    if s.position == 0 and nz > 1 and not all_slices:
        raise UserError(
            f"ROI '{s.name}' has no slice position but the image is a stack of {nz} slices; "
            "add the ROI on its slice (ROI Manager: More > Options > Associate with slices) "
            "or let it label every slice (tem-ij: --all-slices; Fiji: tick 'All slices', macro key 'all')"
        )
    (xmin, ymin), (xmax, ymax) = _bounds(s)
    if xmax <= 0 or ymax <= 0 or xmin >= w or ymin >= h:
        raise UserError(
            f"ROI '{s.name}' lies entirely outside the {w}x{h} image (x {xmin:g}..{xmax:g}, y {ymin:g}..{ymax:g})"
        )
    rows, cols, mask = _local_mask(s, h, w)
    if not mask.any():
        raise UserError(f"ROI '{s.name}' covers no pixel (zero area); delete or redraw it")
    if xmin < 0 or ymin < 0 or xmax > w or ymax > h:
        warnings.append(f"ROI '{s.name}' extends beyond the image and was clipped")
    return s.position, -1 if cls == IGNORE_NAME else classes.index(cls), rows, cols, mask


def _paint(plane: np.ndarray, mine: list) -> int:
    """Label one plane from its prepared shapes: first claim wins, conflicts and ignore areas stay unlabelled.

    Returns the number of conflicting pixels.
    """
    claimed = np.zeros(plane.shape, dtype=np.int16)  # 1 + class index of the first claim
    conflict = np.zeros(plane.shape, dtype=bool)
    ignore = np.zeros(plane.shape, dtype=bool)
    for _, k, rows, cols, mask in mine:
        if k < 0:
            ignore[rows, cols] |= mask
            continue
        prev = claimed[rows, cols]
        conflict[rows, cols] |= mask & (prev != 0) & (prev != k + 1)
        prev[mask & (prev == 0)] = k + 1
    plane[:] = claimed - 1
    plane[conflict | ignore] = UNLABELLED
    return int(conflict.sum())


def boundary_band(labels: np.ndarray, n_classes: int, width: float = 6.0) -> np.ndarray:
    """The unlabelled band between outlines of different classes, given the class of the nearer outline.

    People outline regions a few pixels inside their true boundaries, so where outlines of two classes
    come within ``width`` pixels of each other the true boundary lies in the gap between them; its
    best guess is the middle. A pixel of that gap gets the class of the nearest labelled pixel.

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
        Partial labels (-1 = unlabelled).
    n_classes : int
    width : float
        A pixel is in the band when labelled pixels of two different classes are both within this
        distance.

    Returns
    -------
    ndarray of int16, shape (H, W)
        The nearer class on band pixels, -1 everywhere else (labelled pixels included).
    """
    from scipy import ndimage as ndi

    dist = np.full((n_classes,) + labels.shape, np.inf, dtype=np.float32)
    for c in range(n_classes):
        if (labels == c).any():
            dist[c] = ndi.distance_transform_edt(labels != c)
    out = np.full(labels.shape, UNLABELLED, dtype=np.int16)
    if n_classes < 2:
        return out
    order = np.argsort(dist, axis=0)
    second = np.take_along_axis(dist, order[1:2], axis=0)[0]
    band = (labels == UNLABELLED) & (second <= width)
    out[band] = order[0][band]
    return out
