"""Image and ROI files: TIFF (with ImageJ metadata and calibration), PNG, RoiSet.zip / .roi.

Only this module touches file formats; everything above it works on numpy arrays and
:class:`~tem_ij_plugin.annotations.Shape` lists.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .annotations import Shape, StackLayout, check_coordinates
from .errors import UserError
from .outputs import SOFTWARE, atomic_write, read_at

if TYPE_CHECKING:
    from roifile import ImagejRoi

log = logging.getLogger(__name__)

_TIFF = (".tif", ".tiff", ".btf", ".tf8")
_OTHER = (".png", ".jpg", ".jpeg", ".bmp")

#: Largest entry of a RoiSet.zip (or single .roi file) we read. ImageJ ROIs are small: a freehand ROI with
#: a million sub-pixel vertices is 16 MB; anything declaring more is refused before it is decompressed.
MAX_ROI_BYTES = 64 << 20
#: Most ROIs in one RoiSet.zip.
MAX_ROIS = 100_000


def human_size(nbytes: float) -> str:
    """A byte count for messages: ``512 bytes``, ``4.3 GB`` (powers of 1000)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB", "EB"):
        if nbytes < 1000 or unit == "EB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return ""  # pragma: no cover


def memory_bytes() -> int | None:
    """Physical memory of this machine (or the container's limit, when lower); None when unknown."""
    total = None
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        pass
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = int(Path(limit).read_text().strip())  # "max" (no limit) is not a number
        except (OSError, ValueError):
            continue
        if value > 0:
            total = value if total is None else min(total, value)
    return total


def _check_fits(path: Path, what: str, nbytes: int) -> None:
    """Refuse to allocate what can never fit in this machine's memory (rather than try and fail)."""
    limit = memory_bytes()
    if limit is not None and nbytes > limit:
        raise UserError(
            f"{path}: {what} needs {human_size(nbytes)} of memory but this machine has {human_size(limit)}; "
            "crop, bin or split the image in Fiji first"
        )


_NONFINITE_ADVICE = "replace them first (for NaN on a copy in Fiji: Process > Noise > Remove NaNs...)"


class _TifffileLog(logging.Filter):
    """Collects (and keeps off the console) what tifffile logs while this thread parses a file.

    tifffile reports structural damage (a broken page chain, an IFD loop, ImageJ metadata that does not
    match the file) by logging and then carrying on with whatever it could read, e.g. one plane of a
    truncated stack. We turn those reports into a plain error instead.
    """

    def __init__(self):
        super().__init__()
        self._local = threading.local()

    @contextlib.contextmanager
    def capture(self):
        notes: list = []
        previous = getattr(self._local, "notes", None)
        self._local.notes = notes
        try:
            yield notes
        finally:
            self._local.notes = previous

    def filter(self, record: logging.LogRecord) -> bool:
        notes = getattr(self._local, "notes", None)
        if notes is None:
            return True
        # "<tifffile.TiffPages @8> invalid page offset 10576" -> "invalid page offset 10576"
        notes.append((record.levelno, re.sub(r"^(<[^>]*>\s*)+", "", record.getMessage())))
        return False


_TIFFFILE_LOG = _TifffileLog()


def _tifffile_log():
    logger = logging.getLogger("tifffile")
    if _TIFFFILE_LOG not in logger.filters:
        logger.addFilter(_TIFFFILE_LOG)
    return _TIFFFILE_LOG.capture()


def _damage(notes) -> str | None:
    """The first error tifffile logged, if any."""
    for level, msg in notes:
        if level >= logging.ERROR:
            return msg
    return None


@dataclass
class Calibration:
    """Physical pixel size, as ImageJ keeps it."""

    pixel_width: float = 1.0
    pixel_height: float = 1.0
    unit: str = "pixel"
    z_spacing: float = 1.0

    def as_dict(self) -> dict:
        """The calibration as a JSON-able dict."""
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
    stack : StackLayout
        Slices and frames, which place ROIs on the planes.
    """

    data: np.ndarray
    calibration: Calibration = field(default_factory=Calibration)
    slice_labels: list = field(default_factory=list)
    path: Path | None = None
    stack: StackLayout = field(default_factory=StackLayout)


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not an image file")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes)")


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
        Missing, unreadable, truncated or damaged file, colour images, unsupported pixel types, NaN or
        infinite pixel values, several channels without ``channel``, and a stack too large for this
        machine's memory (refused before anything is allocated).
    """
    with PlaneReader(path, channel=channel) as r:
        nbytes = r.n_planes * r.plane_shape[0] * r.plane_shape[1] * r.dtype.itemsize
        _check_fits(r.path, f"reading {r.n_planes} plane(s) of {r.plane_shape[1]}x{r.plane_shape[0]} {r.dtype}", nbytes)
        try:
            data = np.empty((r.n_planes, *r.plane_shape), r.dtype)
        except MemoryError as exc:
            raise UserError(f"{r.path}: not enough free memory to read it ({human_size(nbytes)})") from exc
        bad = []
        r.check_finite = False  # counted here over the whole stack, for one message with the total
        for i in range(r.n_planes):
            data[i] = r.read(i)
            if data.dtype.kind == "f":
                bad.append(data[i].size - int(np.count_nonzero(np.isfinite(data[i]))))
        if sum(bad):
            raise UserError(
                f"{r.path} holds {sum(bad)} NaN or infinite pixel value(s) (in {sum(1 for b in bad if b)} of "
                f"{r.n_planes} plane(s)); {_NONFINITE_ADVICE}"
            )
        stack = StackLayout(r.stack_axes, tuple(r.stack_shape))
        return Image(data=data, calibration=r.calibration, slice_labels=r.slice_labels, path=Path(path), stack=stack)


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

    #: Refuse planes holding NaN or infinite values (float images).
    check_finite = True
    #: Channels of the file (1 without a channel axis); the reader gives one of them.
    n_channels = 1

    def __init__(self, path: str | os.PathLike, channel: int | None = None):
        self.path = Path(path)
        self._tif = None
        self._fh = None
        self._array = None
        self._zarr = None
        self.calibration = Calibration()
        self.slice_labels: list = []
        suffix = self.path.suffix.lower()
        if suffix == ".zarr" and self.path.is_dir():
            self._open_zarr(channel)
        else:
            self._open_file(suffix, channel)
        if self.dtype.kind not in "uif" or self.dtype == np.bool_:
            raise UserError(f"{self.path}: unsupported pixel type {self.dtype}; use 8/16-bit or 32-bit float")
        if self.n_planes == 0 or 0 in self.plane_shape:
            raise UserError(f"{self.path} contains no pixels")

    def _open_file(self, suffix: str, channel: int | None) -> None:
        _check_readable(self.path)
        if suffix in _TIFF:
            self._open_tiff(channel)
        elif suffix in _OTHER:
            self._open_other()
        else:
            raise UserError(
                f"{self.path}: unsupported image format '{suffix}'; use TIFF or OME-Zarr (or PNG for a 2-D image)"
            )

    def _open_zarr(self, channel: int | None) -> None:
        """An OME-Zarr image (see :class:`~tem_ij_plugin.zarr_input.ZarrPlanes`), read lazily."""
        from .zarr_input import ZarrPlanes

        z = self._zarr = ZarrPlanes(self.path, channel)
        self.n_planes, self.plane_shape, self.dtype, self.n_channels = z.n_planes, z.plane_shape, z.dtype, z.n_channels
        self.stack_axes, self.stack_shape = z.stack_axes, z.stack_shape
        self.calibration, self.slice_labels = z.calibration, z.slice_labels

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
        try:
            series, meta, notes, photometric = self._tiff_series()
            self._check_layout(series, meta, notes, photometric)
            self._plane_axes(series, meta, channel)
            if self._offset is None and len(series.pages) != self._n_pages:
                self._read_whole(series)
        except UserError:
            self.close()
            raise

    def _tiff_series(self) -> tuple:
        """Open the file: its first series, ImageJ metadata, tifffile's notes (damage it logged), photometric."""
        import tifffile

        with _tifffile_log() as notes:
            try:
                self._tif = tifffile.TiffFile(self.path)
                series = self._first_series()
                meta, photometric = {}, None
                if series is not None:
                    page = series.keyframe
                    meta = self._tif.imagej_metadata or {}
                    ome = _ome_pixels(self._tif) if not meta else None
                    self.calibration = _ome_calibration(ome) if ome is not None else _tiff_calibration(page, meta)
                    if ome is not None:
                        meta = {"Labels": _ome_page_labels(series, ome)}
                    photometric = getattr(page, "photometric", None)
            except Exception as exc:  # tifffile raises many types (struct, index, overflow...) on damaged files
                damage = _damage(notes)
                raise UserError(
                    f"{self.path} is not a readable TIFF file: {exc}" + (f" ({damage})" if damage else "")
                ) from exc
        if series is None:
            note = _damage(notes) or next((m for _, m in notes), None)
            raise UserError(
                f"{self.path} holds no readable image: it is an empty stack or a damaged TIFF file"
                + (f" ({note})" if note else "")
            )
        return series, meta, notes, photometric

    def _first_series(self):
        """The file's first series; pages without their OME-XML when tifffile cannot make sense of it."""
        import tifffile

        try:
            return self._tif.series[0] if self._tif.series else None
        except Exception:  # tifffile's OME parser on damaged or partial OME-XML: KeyError, ValueError, ...
            if not self._tif.is_ome:
                raise
        log.warning("%s: its OME metadata is damaged; reading it as a plain TIFF", self.path)
        self._tif.close()
        self._tif = tifffile.TiffFile(self.path, is_ome=False)
        return self._tif.series[0] if self._tif.series else None

    def _check_layout(self, series, meta: dict, notes, photometric) -> None:
        """Greyscale 2-D planes only, and a header whose sizes add up (:meth:`_check_tiff`)."""
        if photometric is not None and int(photometric) == 2 or "S" in series.axes:
            raise _rgb_error(self.path)
        if not series.axes.endswith("YX"):
            raise UserError(f"{self.path}: cannot read axes {series.axes} as 2-D planes")
        try:
            self._check_tiff(series, meta, _damage(notes))
        except UserError:
            raise
        except Exception as exc:  # a header too broken to even describe
            raise UserError(f"{self.path} is a damaged TIFF file: {exc}") from exc

    def _plane_axes(self, series, meta: dict, channel: int | None) -> None:
        """Which leading axes are the stack (Z, T or T x Z) and which are fixed (a chosen channel, size 1)."""
        axes, shape = series.axes, tuple(series.shape)
        self.dtype = np.dtype(series.dtype)
        self.plane_shape = shape[-2:]
        self._lead_shape = shape[:-2]
        fixed = {}
        stack = []
        for i, (ax, n) in enumerate(zip(axes[:-2], self._lead_shape)):
            if ax == "C" and n > 1:
                self.n_channels = n
                if channel is None:
                    raise UserError(
                        f"{self.path} has {n} channels (axes {axes}, shape {shape}); choose the channel to "
                        f"segment with --channel 1..{n} (or split channels in Fiji: Image > Color > Split Channels)"
                    )
                if not 1 <= channel <= n:
                    raise UserError(f"--channel {channel} is out of range: {self.path} has channels 1..{n}")
                fixed[i] = channel - 1
            elif n > 1:
                stack.append((i, "T" if ax == "T" else "Z"))
            else:
                fixed[i] = 0
        names = "".join(a for _, a in stack)
        if names not in ("", "Z", "T", "TZ"):
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

    def _read_whole(self, series) -> None:
        """Planes not stored one per page (compressed, tiled): read the whole series, if memory allows."""
        log.warning("%s: planes are not stored one per page; reading the whole file into memory", self.path)
        itemsize = self.dtype.itemsize
        _check_fits(self.path, "reading the whole file", self._n_pages * int(np.prod(self.plane_shape)) * itemsize)
        try:
            with _tifffile_log() as notes:
                self._array = series.asarray().reshape((-1,) + self.plane_shape)
            if _damage(notes):
                raise ValueError(_damage(notes))
            self._check_finite(self._array, "the image")
        except UserError:
            raise
        except Exception as exc:  # OSError, ValueError, codec errors, MemoryError
            raise UserError(f"cannot read {self.path}: {exc or type(exc).__name__}") from exc

    def _check_tiff(self, series, meta: dict, damage: str | None) -> None:
        """Refuse a file whose declared planes or pixel data are not all there, before reading any pixel."""
        path, tif = self.path, self._tif
        filesize = path.stat().st_size
        dtype = np.dtype(series.dtype)
        shape = tuple(int(n) for n in series.shape)
        plane_shape = shape[-2:] if len(shape) >= 2 else shape
        plane_bytes = int(np.prod(plane_shape, dtype=np.int64)) * dtype.itemsize
        n_pages = int(np.prod(shape[:-2], dtype=np.int64)) if len(shape) > 2 else 1
        first = tif.pages[0]
        size_txt = "x".join(str(n) for n in plane_shape[::-1])

        def held() -> int:
            """Complete planes actually in the file: pages found, or (one page found) contiguous data."""
            found = len(tif.pages)
            offsets = getattr(first, "dataoffsets", ())
            if found == 1 and getattr(first, "compression", 1) == 1 and offsets and plane_bytes:
                return max(0, (filesize - int(offsets[0])) // plane_bytes)
            return found

        if tif.is_imagej and "images" in meta:
            try:
                images = int(meta["images"])
                czt = [int(meta.get(k, 1)) for k in ("channels", "slices", "frames")]
            except (TypeError, ValueError):
                raise UserError(f"{path} has damaged ImageJ metadata (images={meta['images']!r})") from None
            if images < 1 or any(n < 1 for n in czt) or czt[0] * czt[1] * czt[2] != images:
                raise UserError(
                    f"{path}: its ImageJ metadata does not add up: images={images} but channels x slices x "
                    f"frames = {czt[0]}x{czt[1]}x{czt[2]}; re-save the stack in Fiji (File > Save As > Tiff...)"
                )
            if n_pages != images:
                holds = min(held(), images)
                raise UserError(
                    f"{path} declares {images} planes (ImageJ metadata images={images}) but holds only {holds} "
                    f"complete plane(s) of {size_txt} {dtype} in its {filesize} bytes: the file is truncated "
                    "or its metadata is wrong; re-save it in Fiji (File > Save As > Tiff...)"
                )
        if damage:
            raise UserError(f"{path} is a damaged TIFF file: {damage}; re-save it in Fiji (File > Save As > Tiff...)")
        if series.dataoffset is not None:
            end = int(series.dataoffset) + n_pages * plane_bytes
            if end > filesize:
                raise UserError(
                    f"{path} declares {n_pages} plane(s) of {size_txt} {dtype} ({human_size(n_pages * plane_bytes)} "
                    f"of pixel data from byte {series.dataoffset}) but the file is only {filesize} bytes long, "
                    f"holding {max(0, filesize - int(series.dataoffset)) // max(plane_bytes, 1)} complete plane(s): "
                    "it is truncated or its header is wrong"
                )
        else:
            for k, page in enumerate(series.pages):
                if page is None:
                    continue
                offsets = tuple(int(o) for o in page.dataoffsets)
                counts = tuple(int(c) for c in page.databytecounts)
                if not offsets or len(offsets) != len(counts):
                    raise UserError(f"{path} is a damaged TIFF file: page {k + 1} has no valid pixel data offsets")
                ends = [o + c for o, c in zip(offsets, counts) if c]
                if ends and max(ends) > filesize:
                    raise UserError(
                        f"{path}: page {k + 1} declares pixel data up to byte {max(ends)} but the file is only "
                        f"{filesize} bytes long: it is truncated or its header is wrong"
                    )
                keyframe = getattr(page, "keyframe", page)
                bits = getattr(keyframe, "bitspersample", dtype.itemsize * 8)
                raw = getattr(keyframe, "compression", 1) == 1 and bits == dtype.itemsize * 8
                if raw and sum(counts) < plane_bytes:
                    raise UserError(
                        f"{path}: page {k + 1} declares {size_txt} {dtype} pixels ({human_size(plane_bytes)}) but "
                        f"stores only {sum(counts)} bytes: it is truncated or its header is wrong"
                    )
        _check_fits(path, f"one {size_txt} {dtype} plane", plane_bytes)

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
        if self._zarr is not None:
            plane = self._zarr.read(i)
            self._check_finite(plane, f"plane {i + 1} of {self.n_planes}")
            return plane
        page = self._page(i)
        plane = self._read_page(i, page)
        self._check_finite(plane, f"plane {i + 1} of {self.n_planes}")
        return plane

    def _check_finite(self, data: np.ndarray, where: str) -> None:
        if data.dtype.kind != "f" or not self.check_finite:
            return
        bad = data.size - int(np.count_nonzero(np.isfinite(data)))
        if bad:
            raise UserError(f"{self.path}: {where} holds {bad} NaN or infinite pixel value(s); {_NONFINITE_ADVICE}")

    def _read_page(self, i: int, page: int) -> np.ndarray:
        try:
            if self._offset is not None:
                count = self.plane_shape[0] * self.plane_shape[1]
                dtype = self.dtype.newbyteorder(self._byteorder)
                if self._fh is None:
                    self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open across reads, closed in close()
                buf = read_at(self._fh.fileno(), count * dtype.itemsize, self._offset + page * count * dtype.itemsize)
                if len(buf) < count * dtype.itemsize:
                    raise OSError(f"file ends inside plane {i + 1} (truncated?)")
                return np.frombuffer(buf, dtype).reshape(self.plane_shape).astype(self.dtype, copy=False)
            with _tifffile_log() as notes:
                plane = self._tif.asarray(key=page, series=0).reshape(self.plane_shape)
            if _damage(notes):
                raise ValueError(_damage(notes))
            return plane
        except UserError:
            raise
        except Exception as exc:  # OSError, ValueError, zlib/codec errors, MemoryError on a damaged plane
            raise UserError(f"cannot read plane {i + 1} of {self.path}: {exc or type(exc).__name__}") from exc

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
    """The pixel size of a TIFF: ImageJ's unit when it has one, else the ResolutionUnit tag's.

    A plain TIFF in centimetres becomes µm; in inches (what scanners and screenshots write as dots per
    inch) it stays inches, as ImageJ shows it; with no unit (ResolutionUnit none) it is uncalibrated.
    """
    cal = Calibration()
    try:
        xres = page.tags["XResolution"].value
        yres = page.tags["YResolution"].value
        fx, fy = xres[0] / xres[1], yres[0] / yres[1]
        if fx > 0 and fy > 0:
            cal.pixel_width, cal.pixel_height = 1.0 / fx, 1.0 / fy
    except (KeyError, ZeroDivisionError, TypeError, IndexError):
        pass
    if meta.get("spacing"):
        cal.z_spacing = float(meta["spacing"])
    unit = meta.get("unit")
    if unit:
        cal.unit = str(unit).replace("\\u00B5", "µ")
        return cal
    if (cal.pixel_width, cal.pixel_height) == (1.0, 1.0):
        return cal
    tag = page.tags.get("ResolutionUnit")
    resunit = int(tag.value) if tag is not None else 2  # TIFF's default is inch
    if resunit == 3:
        cal.pixel_width, cal.pixel_height, cal.unit = cal.pixel_width * 1e4, cal.pixel_height * 1e4, "µm"
    elif resunit == 2:
        cal.unit = "inch"
    else:
        cal.pixel_width = cal.pixel_height = 1.0
    return cal


_OME_NS = "{http://www.openmicroscopy.org/Schemas/OME/2016-06}"
MAX_OME_XML = 64 << 20
#: OME's UnitsLength symbols -> (our unit, factor to it); OME's default unit is the micrometre.
# (Some writers spell the micro sign with the Greek mu, U+03BC.)
_FROM_OME = {"µm": ("µm", 1.0), "\u03bcm": ("µm", 1.0), "um": ("µm", 1.0), "nm": ("nm", 1.0), "mm": ("mm", 1.0),
             "cm": ("µm", 1e4), "m": ("µm", 1e6), "in": ("inch", 1.0), "Å": ("nm", 0.1),
             "pm": ("nm", 1e-3)}  # fmt: skip


def _ome_pixels(tif) -> dict | None:
    """The first image's ``Pixels`` of an OME-TIFF: its attributes and channel names; None if not OME."""
    from xml.etree import ElementTree

    if not tif.is_ome:
        return None
    try:
        xml = tif.pages[0].description
        if len(xml) > MAX_OME_XML:
            return None
        root = ElementTree.fromstring(xml)
    except (ElementTree.ParseError, ValueError, IndexError, AttributeError):
        return None  # not readable OME-XML: the file is read as a plain TIFF
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else _OME_NS
    pixels = root.find(f"{ns}Image/{ns}Pixels")
    if pixels is None:
        return None
    names = [c.get("Name", "") for c in pixels.findall(f"{ns}Channel")]
    return {**pixels.attrib, "channel_names": names}


def _ome_calibration(pixels: dict) -> Calibration:
    """Physical pixel size and unit of OME ``Pixels`` (uncalibrated where they are missing or not lengths)."""
    cal = Calibration()
    try:
        x, y = float(pixels["PhysicalSizeX"]), float(pixels["PhysicalSizeY"])
        unit, factor = _FROM_OME[pixels.get("PhysicalSizeXUnit", "µm")]
        if _FROM_OME.get(pixels.get("PhysicalSizeYUnit", "µm")) != (unit, factor):
            return cal
    except (KeyError, ValueError):
        return cal
    if not (np.isfinite([x, y]).all() and x > 0 and y > 0):
        return cal
    cal.pixel_width, cal.pixel_height, cal.unit = x * factor, y * factor, unit
    try:
        z = float(pixels["PhysicalSizeZ"])
        z_unit, z_factor = _FROM_OME[pixels.get("PhysicalSizeZUnit", "µm")]
        if z_unit == unit and np.isfinite(z) and z > 0:
            cal.z_spacing = z * z_factor
    except (KeyError, ValueError):
        pass
    return cal


def _ome_page_labels(series, pixels: dict) -> list[str]:
    """Per page of an OME-TIFF, the name of its channel (empty without names); ImageJ's slice-label order."""
    names = pixels["channel_names"]
    lead = tuple(series.shape[:-2])
    n_pages = int(np.prod(lead, dtype=np.int64))
    if not any(names) or n_pages > 1 << 20:
        return []
    if "C" not in series.axes[:-2]:
        return [names[0]] * n_pages if len(names) == 1 else []
    c_axis = series.axes.index("C")
    channel = np.unravel_index(np.arange(n_pages), lead)[c_axis]
    return [names[c] if c < len(names) else "" for c in channel]


def write_hyperstack(
    path: str | os.PathLike,
    data: np.ndarray,
    calibration: Calibration | None = None,
    channel_names: list[str] | None = None,
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
    atomic_write(
        path,
        lambda tmp: tifffile.imwrite(
            tmp,
            data,
            imagej=True,
            resolution=(1.0 / cal.pixel_width, 1.0 / cal.pixel_height),
            metadata=meta,
            software=SOFTWARE,
        ),
    )


def read_rois(path: str | os.PathLike) -> list:
    """Read an ImageJ ``RoiSet.zip`` or single ``.roi`` file as :class:`Shape` objects.

    In a zip, entries whose names do not end in ``.roi`` (a ``README.txt``, macOS ``__MACOSX/`` folders)
    are skipped with a logged warning, as ImageJ's ROI Manager skips them silently. An entry named
    ``*.roi`` that cannot be decoded (truncated, not an ImageJ ROI) is an error naming the entry: it is
    an annotation the user meant, and training without it would silently change the labels. Entries
    are never decompressed beyond :data:`MAX_ROI_BYTES`, whatever size they declare (zip bombs).

    Raises
    ------
    UserError
        Missing, corrupt or non-ROI files, broken or oversized ``.roi`` entries, a zip without any
        ``.roi`` entry, ROI types that cannot label areas (lines, points, text) and ROIs with NaN or
        infinite coordinates.
    """
    import roifile

    path = Path(path)
    _check_readable(path)
    if path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
        if not zipfile.is_zipfile(path):
            raise UserError(f"{path} is not a zip file; save the ROI Manager with More > Save...")
        entries = _zip_roi_entries(path)
    else:
        size = path.stat().st_size
        if size > MAX_ROI_BYTES:
            raise UserError(
                f"{path} is {human_size(size)}, too large for an ImageJ ROI (at most {human_size(MAX_ROI_BYTES)})"
            )
        try:
            entries = [(path.name, path.read_bytes())]
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    shapes = []
    for name, data in entries:
        where = f"{path}: entry {name}" if name != path.name else str(path)
        try:
            roi = roifile.ImagejRoi.frombytes(data)
        except Exception as exc:  # roifile raises ValueError/struct.error/... on bad input
            raise UserError(f"{where} is not a readable ImageJ ROI: {exc}") from exc
        shapes.append(roi_to_shape(roi, where))
    return shapes


def _zip_roi_entries(path: Path) -> list:
    """``(name, bytes)`` of the ``.roi`` entries of a zip, each read with a hard size limit."""
    out = []
    skipped = []
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_ROIS:
                raise UserError(f"{path} holds {len(infos)} entries; a RoiSet.zip may hold at most {MAX_ROIS}")
            for info in infos:
                if info.is_dir():
                    continue
                if not info.filename.lower().endswith(".roi"):
                    skipped.append(info.filename)
                    continue
                if info.file_size > MAX_ROI_BYTES:
                    raise UserError(
                        f"{path}: entry {info.filename} declares {human_size(info.file_size)} uncompressed; an ImageJ "
                        f"ROI is at most {human_size(MAX_ROI_BYTES)}, so it was not decompressed"
                    )
                try:
                    with zf.open(info) as fh:
                        data = fh.read(MAX_ROI_BYTES + 1)
                except Exception as exc:  # bad CRC, zlib.error, encrypted (RuntimeError), unknown compression
                    raise UserError(f"{path}: entry {info.filename} cannot be read: {exc}") from exc
                if len(data) > MAX_ROI_BYTES:
                    raise UserError(
                        f"{path}: entry {info.filename} is larger than its header says (over "
                        f"{human_size(MAX_ROI_BYTES)}); the zip file is damaged"
                    )
                out.append((info.filename, data))
    except zipfile.BadZipFile as exc:
        raise UserError(f"{path} is a damaged zip file: {exc}") from exc
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if skipped:
        log.warning(
            "%s: skipped %d entr%s that are not ImageJ ROIs (not *.roi): %s",
            path,
            len(skipped),
            "y" if len(skipped) == 1 else "ies",
            ", ".join(skipped[:10]) + (", ..." if len(skipped) > 10 else ""),
        )
    if not out:
        raise UserError(f"{path} holds no ImageJ ROI (*.roi entries); save the ROI Manager with More > Save...")
    return out


def roi_to_shape(roi: ImagejRoi, source: Path | str = "") -> Shape:
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
    # A ROI drawn on a hyperstack has (channel, slice, frame) and no stack position: see plane_of.
    hyper = (roi.c_position, roi.z_position, roi.t_position)
    hyper = hyper if any(hyper) else ()
    try:
        if roi.composite:
            kind, polygons = "composite", [np.asarray(p, float) for p in roi.coordinates(multi=True)]
        elif t in (ROI_TYPE.RECT, ROI_TYPE.OVAL) and roi.subtype != ROI_SUBTYPE.ROTATED_RECT:
            left, top = (roi.xd, roi.yd) if roi.subpixelrect else (roi.left, roi.top)
            right, bottom = (roi.xd + roi.widthd, roi.yd + roi.heightd) if roi.subpixelrect else (roi.right, roi.bottom)
            kind = "rect" if t == ROI_TYPE.RECT else "oval"
            polygons = [np.array([[left, top], [right, top], [right, bottom], [left, bottom]], float)]
        else:
            kind, polygons = "polygon", [np.asarray(roi.coordinates(), float)]
    except Exception as exc:  # a damaged ROI whose coordinates roifile cannot decode
        raise UserError(f"{source}: ROI '{name}' is damaged: {exc}") from exc
    shape = Shape(name, kind, polygons, roi.position, roi.group, hyper)
    check_coordinates(shape, source)
    return shape


def write_rois(path: str | os.PathLike, shapes: list[Shape]) -> None:
    """Write polygon shapes to an ImageJ ``RoiSet.zip`` (used by the demo and simulations)."""
    import roifile

    rois = []
    for s in shapes:
        if s.kind != "polygon":
            raise ValueError("write_rois writes polygon shapes only")
        roi = roifile.ImagejRoi.frompoints(np.asarray(s.polygons[0], np.float32), name=s.name)
        roi.position = s.position
        rois.append(roi)
    atomic_write(path, lambda tmp: roifile.roiwrite(tmp, rois, mode="w"))


def probability_classes(path: str | os.PathLike) -> list[str]:
    """The classes of a probability map from ``tem-ij predict``, from its channel labels.

    Raises
    ------
    UserError
        A file whose channels are not labelled with class names (not a map of ours).
    """
    readers = [PlaneReader(path, channel=1)]
    try:
        readers += [PlaneReader(path, channel=c + 1) for c in range(1, readers[0].n_channels)]
        labels = [r.slice_labels[0] if r.slice_labels else "" for r in readers]
    finally:
        for r in readers:
            r.close()
    n, names = len(labels), [label.split(": ", 1)[0].strip().lower() for label in labels]
    if n < 2 or not all(names) or len(set(names)) != n:
        raise UserError(
            f"{path} is not a probability map from `tem-ij predict`: its {n} channel(s) are not labelled with "
            "distinct class names; predict it again (without --classes), or give the model and the image"
        )
    return names


class ProbabilityPlanes:
    """A probability map written by ``tem-ij predict``, read back lazily, one plane at a time.

    Every channel must be there (one per class, in the model's order); float32 maps are taken as
    they are, ``--dtype uint8``/``uint16`` maps are scaled back to 0..1. Each plane read is checked:
    values in [0, 1] that sum to 1 over the classes (within the rounding of the stored type).

    Parameters
    ----------
    path : path-like
        The probability TIFF.
    classes : list of str
        The model's classes.
    shape : tuple of int
        The image's (Z, Y, X): the map must match it.

    Raises
    ------
    UserError
        A file with another number of channels, planes or plane size, or channel labels naming the
        classes in another order.
    """

    def __init__(self, path: str | os.PathLike, classes: list, shape: tuple):
        self.path, self.classes = Path(path), list(classes)
        self.readers: list = []
        self._last: tuple = (None, None)  # (z, plane): suggest asks for a plane again for each window drawn there
        try:
            self._open(shape)
        except UserError:
            self.close()
            raise

    def _open(self, shape) -> None:
        n = len(self.classes)
        first = PlaneReader(self.path, channel=1 if n > 1 else None)
        self.readers.append(first)
        if first.n_channels != n:
            raise UserError(
                f"{self.path} has {first.n_channels} channel(s) but the model has {n} classes "
                f"({', '.join(self.classes)}); use a map of every class (`tem-ij predict` without --classes)"
            )
        self.readers += [PlaneReader(self.path, channel=c + 1) for c in range(1, n)]
        if (first.n_planes, *first.plane_shape) != tuple(shape):
            raise UserError(
                f"{self.path} holds {first.n_planes} plane(s) of {first.plane_shape[1]}x{first.plane_shape[0]}; "
                f"the image has {shape[0]} of {shape[2]}x{shape[1]}: use the probabilities of this image"
            )
        for c, r in enumerate(self.readers):
            label = r.slice_labels[0] if r.slice_labels else ""
            if label in self.classes and label != self.classes[c]:
                raise UserError(f"{self.path}: channel {c + 1} is '{label}' but the model's class {c + 1} is "
                                f"'{self.classes[c]}'; use a map written with this model")  # fmt: skip
        self.top = 1.0 if first.dtype.kind == "f" else float(np.iinfo(first.dtype).max)

    def __call__(self, z: int) -> np.ndarray:
        """Plane ``z`` as float32 probabilities (C, Y, X)."""
        if self._last[0] == z:
            return self._last[1]
        probs = np.stack([r.read(z) for r in self.readers]).astype(np.float32) / self.top
        slack = 1e-3 if self.top == 1.0 else len(self.readers) / self.top
        total = probs.sum(0)
        if probs.min() < -slack or probs.max() > 1 + slack or np.abs(total - 1).max() > slack + 1e-3:
            raise UserError(
                f"{self.path}, plane {z + 1}: these are not class probabilities (values {probs.min():.3g}.."
                f"{probs.max():.3g}, sums up to {total.max():.3g}); use the output of `tem-ij predict`"
            )
        self._last = (z, probs)
        return probs

    def close(self) -> None:
        """Release the file handles."""
        for r in self.readers:
            r.close()
