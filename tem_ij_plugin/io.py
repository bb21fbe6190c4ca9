"""Image and ROI files: TIFF (with ImageJ metadata and calibration), PNG, RoiSet.zip / .roi.

Only this module touches file formats; everything above it works on numpy arrays and
:class:`~tem_ij_plugin.annotations.Shape` lists.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .annotations import Shape
from .errors import UserError

log = logging.getLogger(__name__)

_TIFF = (".tif", ".tiff", ".btf", ".tf8")
_OTHER = (".png", ".jpg", ".jpeg", ".bmp")


@dataclass
class Calibration:
    """Physical pixel size, as ImageJ keeps it."""

    pixel_width: float = 1.0
    pixel_height: float = 1.0
    unit: str = "pixel"
    z_spacing: float = 1.0

    def as_dict(self) -> dict:
        return {
            "pixel_width": self.pixel_width,
            "pixel_height": self.pixel_height,
            "unit": self.unit,
            "z_spacing": self.z_spacing,
        }


@dataclass
class Image:
    """A greyscale image or stack.

    Attributes
    ----------
    data : ndarray, shape (Z, Y, X)
        Pixel values in their original dtype (a 2-D image has Z = 1).
    calibration : Calibration
    slice_labels : list of str
        ImageJ slice labels, one per plane where the file had them.
    path : Path or None
    """

    data: np.ndarray
    calibration: Calibration = field(default_factory=Calibration)
    slice_labels: list = field(default_factory=list)
    path: Path | None = None


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not an image file")


def _rgb_error(path: Path) -> UserError:
    return UserError(
        f"{path} is an RGB/colour image; TEM segmentation needs greyscale. In Fiji use "
        "Image > Type > 8-bit (or 32-bit), then save as TIFF"
    )


def read_image(path: str | os.PathLike) -> Image:
    """Read a 2-D image or Z stack as (Z, Y, X) with its calibration.

    Supports 8/16-bit integer and float TIFF (ImageJ or plain, BigTIFF included) and greyscale PNG.

    Raises
    ------
    UserError
        Missing or unreadable file, colour or multichannel images, unsupported pixel types.
    """
    path = Path(path)
    _check_readable(path)
    suffix = path.suffix.lower()
    cal = Calibration()
    labels: list = []
    if suffix in _TIFF:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                axes = series.axes
                data = series.asarray()
                page = tif.pages[0]
                meta = tif.imagej_metadata or {}
                cal = _tiff_calibration(page, meta)
                labels = list(meta.get("Labels", []) or [])
                photometric = getattr(page, "photometric", None)
        except (tifffile.TiffFileError, ValueError, OSError, IndexError) as exc:
            raise UserError(f"{path} is not a readable TIFF file: {exc}") from exc
        if photometric is not None and int(photometric) == 2 or "S" in axes:
            raise _rgb_error(path)
        data = _to_zyx(data, axes, path)
    elif suffix in _OTHER:
        import imageio.v3 as iio

        try:
            data = np.asarray(iio.imread(path))
        except Exception as exc:  # imageio raises many types for a broken file
            raise UserError(f"{path} is not a readable image: {exc}") from exc
        if data.ndim == 3:
            if data.shape[-1] in (3, 4) and not all(np.array_equal(data[..., 0], data[..., i]) for i in range(1, 3)):
                raise _rgb_error(path)
            data = data[..., 0]
        data = data[None]
    else:
        raise UserError(f"{path}: unsupported image format '{suffix}'; use TIFF (or PNG for a 2-D image)")
    if data.dtype.kind not in "uif" or data.dtype == np.bool_:
        raise UserError(f"{path}: unsupported pixel type {data.dtype}; use 8/16-bit or 32-bit float")
    if data.size == 0:
        raise UserError(f"{path} contains no pixels")
    return Image(data=data, calibration=cal, slice_labels=labels, path=path)


def _to_zyx(data: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """Reduce a TIFF series to (Z, Y, X); axes other than Z, Y, X must have length 1."""
    keep = []
    for i, ax in enumerate(axes):
        if ax in "YX":
            continue
        if data.shape[i] == 1:
            continue
        keep.append(ax)
    if len(keep) > 1 or (keep and keep[0] == "C"):
        raise UserError(
            f"{path} has axes {axes} with shape {data.shape}; expected a greyscale image or one Z (or T) stack. "
            "Split channels in Fiji (Image > Color > Split Channels) and save the channel to segment"
        )
    squeeze = tuple(i for i, ax in enumerate(axes) if ax not in "YX" and ax not in keep)
    data = data.squeeze(axis=squeeze) if squeeze else data
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise UserError(f"{path}: cannot interpret axes {axes} as a Z stack")
    return data


def _tiff_calibration(page, meta: dict) -> Calibration:
    cal = Calibration()
    try:
        xres = page.tags["XResolution"].value
        yres = page.tags["YResolution"].value
        fx, fy = xres[0] / xres[1], yres[0] / yres[1]
        if fx > 0 and fy > 0:
            cal.pixel_width, cal.pixel_height = 1.0 / fx, 1.0 / fy
    except (KeyError, ZeroDivisionError, TypeError, IndexError):
        pass
    unit = meta.get("unit")
    if unit:
        cal.unit = str(unit).replace("\\u00B5", "µ")
    elif (cal.pixel_width, cal.pixel_height) != (1.0, 1.0):
        cal.unit = "inch"
    if meta.get("spacing"):
        cal.z_spacing = float(meta["spacing"])
    return cal


def write_hyperstack(
    path: str | os.PathLike,
    data: np.ndarray,
    calibration: Calibration | None = None,
    channel_names=None,
) -> None:
    """Write (Z, C, Y, X) or (Z, Y, X) data as an ImageJ TIFF hyperstack.

    Channel names become ImageJ slice labels (one per plane, channel fastest, as ImageJ orders them).
    The file is written next to its final name and moved into place, so a failed write never leaves a
    half-written file under the requested name.
    """
    import tifffile

    path = Path(path)
    cal = calibration or Calibration()
    axes = "ZCYX" if data.ndim == 4 else "ZYX"
    # ImageJ writes the micro sign as an escape: TIFF descriptions are ASCII.
    meta: dict = {"axes": axes, "unit": cal.unit.replace("µ", "\\u00B5"), "spacing": cal.z_spacing}
    if channel_names is not None and data.ndim == 4:
        meta["Labels"] = [str(channel_names[c]) for _ in range(data.shape[0]) for c in range(data.shape[1])]
    if data.ndim == 4:
        meta["mode"] = "grayscale"
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tifffile.imwrite(
            tmp,
            data,
            imagej=True,
            resolution=(1.0 / cal.pixel_width, 1.0 / cal.pixel_height),
            metadata=meta,
        )
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc


def read_rois(path: str | os.PathLike) -> list:
    """Read an ImageJ ``RoiSet.zip`` or single ``.roi`` file as :class:`Shape` objects.

    Raises
    ------
    UserError
        Missing, corrupt or non-ROI files, and ROI types that cannot label areas (lines, points, text).
    """
    import roifile

    path = Path(path)
    _check_readable(path)
    if path.suffix.lower() == ".zip" and not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a zip file; save the ROI Manager with More > Save...")
    try:
        rois = roifile.roiread(path)
    except Exception as exc:  # roifile raises ValueError/struct.error/zip errors on bad input
        raise UserError(f"{path} is not a readable ImageJ ROI file: {exc}") from exc
    if not isinstance(rois, list):
        rois = [rois]
    return [roi_to_shape(r, path) for r in rois]


def roi_to_shape(roi, source: Path | str = "") -> Shape:
    """Convert one ``roifile.ImagejRoi`` to a :class:`Shape`."""
    from roifile import ROI_SUBTYPE, ROI_TYPE

    name = roi.name or ""
    t = roi.roitype
    if roi.subtype == ROI_SUBTYPE.TEXT or t in (
        ROI_TYPE.LINE,
        ROI_TYPE.FREELINE,
        ROI_TYPE.POLYLINE,
        ROI_TYPE.ANGLE,
        ROI_TYPE.POINT,
        ROI_TYPE.NOROI,
    ):
        kind = "text" if roi.subtype == ROI_SUBTYPE.TEXT else t.name.lower()
        raise UserError(
            f"{source}: ROI '{name}' is a {kind} ROI; use area ROIs (polygon, freehand, rectangle, oval). "
            "A line can be turned into an area with Edit > Selection > Line to Area"
        )
    position = roi.position or roi.z_position or roi.t_position or 0
    if roi.composite:
        return Shape(
            name, "composite", [np.asarray(p, float) for p in roi.coordinates(multi=True)], position, roi.group
        )
    if t in (ROI_TYPE.RECT, ROI_TYPE.OVAL) and roi.subtype != ROI_SUBTYPE.ROTATED_RECT:
        left, top = (roi.xd, roi.yd) if roi.subpixelrect else (roi.left, roi.top)
        right, bottom = (roi.xd + roi.widthd, roi.yd + roi.heightd) if roi.subpixelrect else (roi.right, roi.bottom)
        box = np.array([[left, top], [right, top], [right, bottom], [left, bottom]], float)
        return Shape(name, "rect" if t == ROI_TYPE.RECT else "oval", [box], position, roi.group)
    return Shape(name, "polygon", [np.asarray(roi.coordinates(), float)], position, roi.group)


def write_rois(path: str | os.PathLike, shapes) -> None:
    """Write polygon shapes to an ImageJ ``RoiSet.zip`` (used by the demo and simulations)."""
    import roifile

    rois = []
    for s in shapes:
        if s.kind != "polygon":
            raise ValueError("write_rois writes polygon shapes only")
        roi = roifile.ImagejRoi.frompoints(np.asarray(s.polygons[0], np.float32), name=s.name)
        roi.position = s.position
        rois.append(roi)
    path = Path(path)
    path.unlink(missing_ok=True)
    roifile.roiwrite(path, rois, mode="w")
