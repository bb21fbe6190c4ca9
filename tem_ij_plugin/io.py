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


def read_image(path: str | os.PathLike, channel: int | None = None) -> Image:
    """Read a 2-D image or stack as (planes, Y, X) with its calibration.

    Supports 8/16-bit integer and float TIFF (ImageJ or plain, BigTIFF included) and greyscale PNG.
    Hyperstacks with T and Z are read plane by plane in ImageJ's order (Z fastest); see
    :class:`PlaneReader` for channels.

    Raises
    ------
    UserError
        Missing or unreadable file, colour images, unsupported pixel types, several channels
        without ``channel``.
    """
    with PlaneReader(path, channel=channel) as r:
        data = np.stack([r.read(i) for i in range(r.n_planes)])
        return Image(data=data, calibration=r.calibration, slice_labels=r.slice_labels, path=Path(path))


class PlaneReader:
    """The 2-D planes of a greyscale image or stack, read one at a time so memory stays bounded.

    Uncompressed contiguous TIFF data (ImageJ stacks, including ImageJ files over 4 GB) is read with
    one positioned read per plane; other TIFFs one page at a time.

    Parameters
    ----------
    path : path-like
        TIFF (ImageJ, plain, BigTIFF) or a 2-D PNG/JPEG/BMP.
    channel : int, optional
        1-based channel of a multichannel hyperstack (required when it has several channels).

    Attributes
    ----------
    n_planes : int
    plane_shape : tuple of int
        (Y, X).
    dtype : numpy.dtype
    stack_axes : str
        The axes the planes run over, ``""`` (2-D), ``"Z"``, ``"T"`` or ``"TZ"``.
    stack_shape : tuple of int
        Length of each stack axis (its product is ``n_planes``).
    calibration : Calibration
    slice_labels : list of str
        One per plane where the file had labels, else empty.
    """

    def __init__(self, path: str | os.PathLike, channel: int | None = None):
        self.path = Path(path)
        _check_readable(self.path)
        self._tif = None
        self._fh = None
        self._array = None
        self.calibration = Calibration()
        self.slice_labels: list = []
        suffix = self.path.suffix.lower()
        if suffix in _TIFF:
            self._open_tiff(channel)
        elif suffix in _OTHER:
            self._open_other()
        else:
            raise UserError(f"{self.path}: unsupported image format '{suffix}'; use TIFF (or PNG for a 2-D image)")
        if self.dtype.kind not in "uif" or self.dtype == np.bool_:
            raise UserError(f"{self.path}: unsupported pixel type {self.dtype}; use 8/16-bit or 32-bit float")
        if self.n_planes == 0 or 0 in self.plane_shape:
            raise UserError(f"{self.path} contains no pixels")

    def _open_other(self) -> None:
        import imageio.v3 as iio

        try:
            data = np.asarray(iio.imread(self.path))
        except Exception as exc:  # imageio raises many types for a broken file
            raise UserError(f"{self.path} is not a readable image: {exc}") from exc
        if data.ndim == 3:
            if data.shape[-1] in (3, 4) and not all(np.array_equal(data[..., 0], data[..., i]) for i in range(1, 3)):
                raise _rgb_error(self.path)
            data = data[..., 0]
        self._array = data[None]
        self.n_planes, self.plane_shape, self.dtype = 1, data.shape, data.dtype
        self.stack_axes, self.stack_shape = "", ()

    def _open_tiff(self, channel: int | None) -> None:
        import tifffile

        try:
            self._tif = tifffile.TiffFile(self.path)
            if not self._tif.series:
                self.close()
                raise UserError(f"{self.path} is an empty stack: it contains no images")
            series = self._tif.series[0]
            axes, shape = series.axes, tuple(series.shape)
            page = self._tif.pages[0]
            meta = self._tif.imagej_metadata or {}
            self.calibration = _tiff_calibration(page, meta)
            photometric = getattr(page, "photometric", None)
        except (tifffile.TiffFileError, ValueError, OSError, IndexError) as exc:
            self.close()
            raise UserError(f"{self.path} is not a readable TIFF file: {exc}") from exc
        if photometric is not None and int(photometric) == 2 or "S" in axes:
            self.close()
            raise _rgb_error(self.path)
        if not axes.endswith("YX"):
            self.close()
            raise UserError(f"{self.path}: cannot read axes {axes} as 2-D planes")
        self.dtype = np.dtype(series.dtype)
        self.plane_shape = shape[-2:]
        self._lead_shape = shape[:-2]
        fixed = {}
        stack = []
        for i, (ax, n) in enumerate(zip(axes[:-2], self._lead_shape)):
            if ax == "C" and n > 1:
                if channel is None:
                    self.close()
                    raise UserError(
                        f"{self.path} has {n} channels (axes {axes}, shape {shape}); choose the channel to "
                        f"segment with --channel 1..{n} (or split channels in Fiji: Image > Color > Split Channels)"
                    )
                if not 1 <= channel <= n:
                    self.close()
                    raise UserError(f"--channel {channel} is out of range: {self.path} has channels 1..{n}")
                fixed[i] = channel - 1
            elif n > 1:
                stack.append((i, "T" if ax == "T" else "Z"))
            else:
                fixed[i] = 0
        names = "".join(a for _, a in stack)
        if names not in ("", "Z", "T", "TZ"):
            self.close()
            raise UserError(
                f"{self.path} has axes {axes} with shape {shape}; expected a 2-D image, a Z or T stack, or a "
                "T x Z hyperstack (plus an optional channel axis chosen with --channel)"
            )
        self.stack_axes = names
        self._stack_dims = [i for i, _ in stack]
        self.stack_shape = tuple(self._lead_shape[i] for i in self._stack_dims)
        self._fixed = fixed
        self.n_planes = int(np.prod(self.stack_shape, dtype=np.int64))
        self._n_pages = int(np.prod(self._lead_shape, dtype=np.int64))
        labels = list(meta.get("Labels", []) or [])
        if len(labels) == self._n_pages:
            self.slice_labels = [labels[self._page(i)] for i in range(self.n_planes)]
        self._series = series
        self._offset = series.dataoffset
        self._byteorder = self._tif.byteorder
        if self._offset is None and len(series.pages) != self._n_pages:
            log.warning("%s: planes are not stored one per page; reading the whole file into memory", self.path)
            self._array = series.asarray().reshape((-1,) + self.plane_shape)

    def _page(self, i: int) -> int:
        """Index in the file's page order (channel fixed) of plane ``i``."""
        pos = np.unravel_index(i, self.stack_shape) if self.stack_shape else ()
        index = [0] * len(self._lead_shape)
        for dim, p in zip(self._stack_dims, pos):
            index[dim] = int(p)
        for dim, v in self._fixed.items():
            index[dim] = v
        return int(np.ravel_multi_index(index, self._lead_shape)) if self._lead_shape else 0

    def read(self, i: int) -> np.ndarray:
        """Plane ``i`` (0-based, in the order of :attr:`stack_axes`) as a (Y, X) array."""
        if not 0 <= i < self.n_planes:
            raise IndexError(f"plane {i} of {self.n_planes}")
        if self._array is not None:
            return self._array[self._page(i) if self._tif is not None else i]
        page = self._page(i)
        try:
            if self._offset is not None:
                count = self.plane_shape[0] * self.plane_shape[1]
                dtype = self.dtype.newbyteorder(self._byteorder)
                if self._fh is None:
                    self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open across reads, closed in close()
                buf = os.pread(self._fh.fileno(), count * dtype.itemsize, self._offset + page * count * dtype.itemsize)
                if len(buf) < count * dtype.itemsize:
                    raise OSError(f"file ends inside plane {i + 1} (truncated?)")
                return np.frombuffer(buf, dtype).reshape(self.plane_shape).astype(self.dtype, copy=False)
            return self._tif.asarray(key=page, series=0).reshape(self.plane_shape)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read plane {i + 1} of {self.path}: {exc}") from exc

    def close(self) -> None:
        """Release the file handles."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
