"""Outputs written one plane at a time: ImageJ TIFF, BigTIFF and OME-Zarr, resumable.

A writer is created at its full size under a ``.partial`` name, filled plane by plane (each plane
goes straight to its place in the file, so memory does not grow with the stack) and moved to its
final name only when every plane is written. A JSON file next to the output records which planes
are done, so an interrupted prediction can be resumed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from pydantic import ValidationError

from .errors import UserError
from .io import Calibration, human_size
from .outputs import SOFTWARE, atomic_write, read_at, remove_output
from .schemas import JobStateFile

log = logging.getLogger(__name__)

IMAGEJ_LIMIT = 2**32 - 2**25  # ImageJ TIFFs store 32-bit offsets; keep a margin for the metadata
TIFF_SUFFIXES = (".tif", ".tiff")
OME_TIFF_SUFFIXES = (".ome.tif", ".ome.tiff")
BIGTIFF_SUFFIXES = (".btf", ".tf8", ".tf2")
ZARR_SUFFIXES = (".zarr",)
JOB_KEY = "tem_ij_plugin_job"  # what a finished output records about the job that wrote it
JOB_TAG = 65000  # a private TIFF tag: the job record of an OME-TIFF, whose description is OME-XML
MAX_JOB_BYTES = 1_000_000
#: Calibration units as OME-XML writes them (its UnitsLength symbols), and their length in centimetres
#: for the TIFF resolution tags (ResolutionUnit = centimetre).
OME_UNITS = {"µm": ("µm", 1e-4), "um": ("µm", 1e-4), "micron": ("µm", 1e-4), "microns": ("µm", 1e-4),
             "nm": ("nm", 1e-7), "mm": ("mm", 0.1), "cm": ("cm", 1.0), "m": ("m", 100.0),
             "inch": ("in", 2.54), "in": ("in", 2.54), "å": ("Å", 1e-8)}  # fmt: skip


def split_name(path: Path) -> tuple[str, str]:
    """``(stem, suffix)`` of an output name, the suffix of an OME-TIFF being two (``cells``, ``.ome.tif``)."""
    name = path.name
    for suffix in (*OME_TIFF_SUFFIXES, ".ome.btf"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], name[-len(suffix) :]
    return path.stem, path.suffix


def label_store(path: Path) -> Path | None:
    """The OME-Zarr image whose ``labels/`` group holds ``path`` (``cells.zarr/labels/classes``), else None."""
    parent = path.parent
    if parent.name == "labels" and parent.parent.suffix.lower() in ZARR_SUFFIXES:
        return parent.parent
    return None


def refuse_label_group_output(path: Path) -> None:
    """A :class:`UserError` for an output named inside an OME-Zarr image's ``labels/`` group.

    Only ``--kind both`` writes there (its own ``labels/classes``, moved into place with the image);
    a store of its own inside someone's image would be neither planned nor moved.
    """
    store = label_store(Path(path))
    if store is not None:
        raise UserError(
            f"{path} is inside the labels/ group of {store.name}; write the image with --kind both "
            f"(-o {store.name}) to get its label image there, or name an output of its own (NAME.zarr, NAME.tif)"
        )


def output_format(path: Path) -> str:
    """``imagej``, ``ome`` (OME-TIFF), ``bigtiff`` (OME-BigTIFF) or ``zarr`` from the file name.

    Anything else is a :class:`UserError`.
    """
    if label_store(path) is not None:
        return "zarr"
    if path.name.lower().endswith(OME_TIFF_SUFFIXES):
        return "ome"
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return "imagej"
    if suffix in BIGTIFF_SUFFIXES:
        return "bigtiff"
    if suffix in ZARR_SUFFIXES:
        return "zarr"
    raise UserError(
        f"{path}: unknown output type '{suffix}'; use .tif (ImageJ TIFF), .ome.tif (OME-TIFF), .btf or "
        ".ome.btf (OME-BigTIFF, for outputs over 4 GB) or .zarr (OME-Zarr)"
    )


class PartialMismatch(Exception):
    """The partial output of an interrupted run cannot be continued (missing, unreadable, another layout)."""


def partial_path(path: Path) -> Path:
    """Where ``path`` is written until it is complete: ``name.partial.tif`` for ``name.tif``.

    A label image inside an OME-Zarr image is written inside that image's working store, and moves
    into place with it.
    """
    store = label_store(path)
    if store is not None:
        return partial_path(store) / path.relative_to(store)
    stem, suffix = split_name(path)
    return path.with_name(f"{stem}.partial{suffix}")


@dataclass
class Layout:
    """Shape of an output: planes over ``stack_axes`` (``""``, ``Z``, ``T``, ``TZ``), then channels, Y, X.

    ``channels`` is None for a label image (no channel axis).
    """

    stack_axes: str
    stack_shape: tuple
    channels: int | None
    plane_shape: tuple
    dtype: np.dtype

    @property
    def n_planes(self) -> int:
        """The number of planes (the product of ``stack_shape``)."""
        return int(np.prod(self.stack_shape, dtype=np.int64))

    @property
    def plane_bytes(self) -> int:
        """Bytes of one plane, channels included."""
        return (self.channels or 1) * self.plane_shape[0] * self.plane_shape[1] * np.dtype(self.dtype).itemsize

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole output."""
        return self.n_planes * self.plane_bytes


@runtime_checkable
class PlaneWriter(Protocol):
    """What prediction writes through, whatever the format: planes in any order, checksums, then finish.

    A writer fills ``work`` (the partial file or folder); :meth:`finish` moves it to ``path``,
    :meth:`close` leaves it for ``--resume``. :class:`TiffPlaneWriter` and :class:`ZarrPlaneWriter`
    are the two; :func:`open_writer` picks one from the output's suffix.
    """

    path: Path
    work: Path
    layout: Layout

    def write(self, i: int, plane: np.ndarray) -> int:
        """Write plane ``i``; returns the CRC-32 of the bytes written."""
        ...

    def digest(self, i: int) -> int | None:
        """CRC-32 of plane ``i`` as it is on disk now (None when it cannot be read)."""
        ...

    def close(self) -> None:
        """Close without finishing: the partial output stays for a resume."""
        ...

    def finish(self, cancel=None) -> None:
        """Close and move the complete output to its final name (``cancel`` stops slow finishing work)."""
        ...


class TiffPlaneWriter:
    """ImageJ hyperstack, OME-TIFF or OME-BigTIFF, pre-allocated and filled plane by plane.

    ``fmt`` is ``imagej`` (calibration, slice labels and the job record in ImageJ's description),
    ``ome`` or ``bigtiff`` (OME-XML with the physical pixel size, its unit and the channel names, which
    Bio-Formats, napari and Fiji read; the job record in a private tag). Every TIFF also carries its
    pixel size in the resolution tags in centimetres, for readers that know only those.
    """

    def __init__(
        self, path: Path, layout: Layout, calibration: Calibration, labels=None, resume=False, fmt="imagej", job=None,
        channel_names=None,
    ):  # fmt: skip
        self.path, self.layout, self.fmt = path, layout, fmt
        self.work = partial_path(path)
        self._dtype = np.dtype(layout.dtype).newbyteorder("<")
        if fmt != "bigtiff" and layout.total_bytes > IMAGEJ_LIMIT:
            big = path.with_name(split_name(path)[0] + ".btf").name
            raise UserError(
                f"the output would be {human_size(layout.total_bytes)}, over the 4 GB limit of classic TIFF files; "
                f"write {big} (OME-BigTIFF) or {path.with_name(split_name(path)[0] + '.zarr').name} (OME-Zarr), "
                "or use --dtype uint8 (4x smaller than float32) or --classes to keep fewer channels"
            )
        if resume:
            self.offset = self._reopen()
        else:
            self.offset = self._create(calibration, labels, channel_names, job)
        self._fh = open(self.work, "r+b")  # noqa: SIM115 - closed in close()

    def _create(self, cal: Calibration, labels, channel_names, job) -> int:
        """Write the header and an empty pixel block; returns the offset of the pixels."""
        import tifffile

        axes = self.layout.stack_axes + ("C" if self.layout.channels else "") + "YX"
        extra: dict = {}
        if self.fmt == "imagej":
            meta: dict = {"axes": axes, "unit": cal.unit.replace("µ", "\\u00B5"), "spacing": cal.z_spacing}
            if self.layout.channels:
                meta["mode"] = "grayscale"
            if labels:
                meta["Labels"] = list(labels)
            if job is not None:  # ImageJ keeps it as the image's Info (Image > Show Info)
                meta["Info"] = json.dumps({JOB_KEY: job})
            extra["resolution"] = (1.0 / cal.pixel_width, 1.0 / cal.pixel_height)
        else:
            meta = ome_metadata(axes, cal, channel_names if self.layout.channels else None)
            extra.update(ome=True, bigtiff=self.fmt == "bigtiff", **resolution_tags(cal))
            if job is not None:
                extra["extratags"] = [(JOB_TAG, "s", 0, json.dumps({JOB_KEY: job}), True)]
        try:
            offset, _ = tifffile.imwrite(
                self.work,
                shape=self.shape,
                dtype=self._dtype,
                imagej=self.fmt == "imagej",
                byteorder="<",
                photometric="minisblack",  # never RGB, even with 3 or 4 classes
                software=SOFTWARE,  # how a later run knows it may replace this file
                metadata=meta,
                returnoffset=True,
                **extra,
            )
        except OSError as exc:
            self.work.unlink(missing_ok=True)
            raise UserError(f"cannot create {self.work}: {exc.strerror or exc}") from exc
        return offset

    @property
    def shape(self) -> tuple:
        """The full array shape: stack axes, then channels (if any), Y and X."""
        lay = self.layout
        return tuple(lay.stack_shape) + ((lay.channels,) if lay.channels else ()) + tuple(lay.plane_shape)

    def _reopen(self) -> int:
        """The data offset of the partial file an interrupted run left, checked against this layout."""
        import tifffile

        try:
            with tifffile.TiffFile(self.work) as tif:
                series = tif.series[0]
                shape, offset = tuple(series.shape), series.dataoffset
                # Every page's IFD, not just the first: a run killed while creating the file can leave the
                # pixel block sized but the later IFDs unwritten, which tifffile's ImageJ shortcut would
                # hide and the finished file would keep (other readers then see one page).
                pages = len(tif.pages)
            size = self.work.stat().st_size
        except (OSError, ValueError, IndexError, tifffile.TiffFileError) as exc:
            raise PartialMismatch(f"{self.work} is not readable ({exc})") from exc
        want = self.layout.n_planes * (self.layout.channels or 1)
        # OME series drop axes of length 1 (one plane, one channel): compare what is left.
        if _squeezed(shape) != _squeezed(self.shape) or offset is None or offset + self.layout.total_bytes > size:
            raise PartialMismatch(f"{self.work} does not have the layout of this prediction")
        if pages != want:
            raise PartialMismatch(f"{self.work} holds {pages} of its {want} pages (cut short while it was created)")
        return offset

    def write(self, i: int, plane: np.ndarray) -> int:
        """Write plane ``i`` (shape (C, Y, X), or (Y, X) for labels) in place; returns its checksum."""
        data = np.ascontiguousarray(plane, dtype=self._dtype)
        self._fh.seek(self.offset + i * self.layout.plane_bytes)
        self._fh.write(memoryview(data).cast("B"))
        self._fh.flush()
        return zlib.crc32(memoryview(data).cast("B"))

    def digest(self, i: int) -> int | None:
        """Checksum of plane ``i`` as it is on disk now (None when it cannot be read)."""
        n = self.layout.plane_bytes
        try:
            buf = read_at(self._fh.fileno(), n, self.offset + i * n)
        except OSError:
            return None
        return zlib.crc32(buf) if len(buf) == n else None

    def close(self) -> None:
        """Close the partial file without finishing it."""
        self._fh.close()

    def finish(self, cancel=None) -> None:
        """Close and move the complete file to its final name (quick: ``cancel`` is not needed)."""
        self.close()
        if self.path.is_dir():  # only planned with --overwrite
            remove_output(self.path)
        os.replace(self.work, self.path)


def _squeezed(shape) -> tuple:
    return tuple(n for n in shape if n != 1)


def ome_metadata(axes: str, cal: Calibration, channel_names: list[str] | None) -> dict:
    """The OME metadata tifffile writes: axes, the physical pixel size in its unit (if calibrated), channel names."""
    meta: dict = {"axes": axes}
    unit = OME_UNITS.get(cal.unit.lower())
    if unit is not None:
        meta.update(PhysicalSizeX=cal.pixel_width, PhysicalSizeXUnit=unit[0])
        meta.update(PhysicalSizeY=cal.pixel_height, PhysicalSizeYUnit=unit[0])
        if "Z" in axes:
            meta.update(PhysicalSizeZ=cal.z_spacing, PhysicalSizeZUnit=unit[0])
    if channel_names:
        meta["Channel"] = {"Name": [str(n) for n in channel_names]}
    return meta


def resolution_tags(cal: Calibration) -> dict:
    """``resolution`` and ``resolutionunit`` for tifffile: pixels per centimetre, or none when uncalibrated."""
    unit = OME_UNITS.get(cal.unit.lower())
    if unit is None:
        return {}
    cm = unit[1]
    return {"resolution": (1.0 / (cal.pixel_width * cm), 1.0 / (cal.pixel_height * cm)), "resolutionunit": "CENTIMETER"}


_OME_UNITS = {"µm": "micrometer", "um": "micrometer", "micron": "micrometer", "nm": "nanometer", "mm": "millimeter"}


def _zarr():
    """The zarr library, or a :class:`UserError` naming the extra that installs it."""
    try:
        import zarr
    except ImportError as exc:
        raise UserError(
            "OME-Zarr needs the zarr library (zarr 3, Python 3.11 or newer): pip install 'tem_ij_plugin[zarr]'"
        ) from exc
    return zarr


class ZarrPlaneWriter:
    """OME-Zarr 0.4 (Zarr v2 layout) through the zarr library, filled plane by plane.

    Axes follow OME-Zarr's order: ``t``, ``c``, ``z``, ``y``, ``x`` (those present). Chunks hold one
    plane of one channel (up to 1024 x 1024 pixels), compressed with Blosc/zstd, so that planes are
    written, checked and resumed independently. ``pyramid`` adds that many levels, each half the size of
    the one before (2 x 2 means of probabilities, the top-left pixel of labels), built when the output
    is finished, for viewers (napari, Fiji's OME-Zarr readers) that show large images level by level.
    """

    CHUNK = 1024

    def __init__(
        self, path: Path, layout: Layout, calibration: Calibration, channel_names=None, resume=False, job=None,
        pyramid: int = 0,
    ):  # fmt: skip
        self._job, self.pyramid = job, pyramid
        self.path, self.layout = path, layout
        self.work = partial_path(path)
        # A label image in an image's labels/ group: the image's axes, with one channel
        self.inside = label_store(path) is not None
        self._dtype = np.dtype(layout.dtype).newbyteorder("<")
        dims = [("t", "time")] if "T" in layout.stack_axes else []
        dims += [("c", "channel")] if layout.channels or self.inside else []
        dims += [("z", "space")] if "Z" in layout.stack_axes else []
        dims += [("y", "space"), ("x", "space")]
        self._axes = dims
        self._dims = [d for d, _ in dims]
        sizes = dict(zip(layout.stack_axes.lower(), layout.stack_shape))
        sizes.update(c=layout.channels or 1, y=layout.plane_shape[0], x=layout.plane_shape[1])
        self.shape = [int(sizes[d]) for d in self._dims]
        self.chunks = [1 if d in "tcz" else min(self.CHUNK, sizes[d]) for d in self._dims]
        self._calibration, self._channel_names = calibration, channel_names
        zarr = _zarr()
        if resume:
            self._array = self._reopen(zarr)
            return
        try:
            if self.work.is_dir() and not self.work.is_symlink():
                shutil.rmtree(self.work)  # planned and ours: see PredictJob
            elif self.work.exists() or self.work.is_symlink():
                self.work.unlink()
            if self.inside:  # the image's writer has just created its store: list this label image there
                labels = zarr.open_group(str(self.work.parent), mode="a", zarr_format=2)
                labels.attrs.update({"labels": [*labels.attrs.get("labels", []), self.work.name]})
            group = zarr.open_group(str(self.work), mode="w", zarr_format=2)
            group.attrs.update(self._attributes(calibration, channel_names, levels=1))
            self._array = self._create(group, "0", self.shape)
        except OSError as exc:
            raise UserError(f"cannot create {self.work}: {exc.strerror or exc}") from exc

    def _create(self, group, name: str, shape: list):
        import numcodecs

        chunks = [min(c, n) for c, n in zip(self.chunks, shape)]
        compressor = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)
        # overwrite: a pyramid level a killed finish() left is rebuilt by the resumed one
        return group.create_array(
            name, shape=shape, chunks=chunks, dtype=self._dtype, compressors=compressor, fill_value=0,
            chunk_key_encoding={"name": "v2", "separator": "/"}, overwrite=True,
        )  # fmt: skip

    def _reopen(self, zarr):
        """The level-0 array an interrupted run left, checked against this layout."""
        try:
            array = zarr.open_array(str(self.work / "0"), mode="r+")
            shape, dtype = list(array.shape), np.dtype(array.dtype)
        except Exception as exc:  # missing or damaged metadata: zarr raises several kinds
            raise PartialMismatch(f"{self.work} is not readable ({exc})") from exc
        if shape != self.shape or dtype != self._dtype:
            raise PartialMismatch(f"{self.work} does not have the layout of this prediction")
        return array

    def _attributes(self, cal: Calibration, channel_names, levels: int) -> dict:
        """The group's OME-Zarr metadata for ``levels`` resolution levels."""
        unit = _OME_UNITS.get(cal.unit)
        axes = [{"name": n, "type": k, **({"unit": unit} if k == "space" and unit else {})} for n, k in self._axes]
        base = [{"x": cal.pixel_width, "y": cal.pixel_height, "z": cal.z_spacing}.get(n, 1.0) for n in self._dims]
        datasets = []
        for k in range(levels):
            scale = [v * 2**k if n in "yx" else v for n, v in zip(self._dims, base)]
            datasets.append({"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
        attrs = {
            # how a later run knows it may replace this store, and what it holds
            SOFTWARE: {"written_by": "tem-ij predict", JOB_KEY: self._job},
            "multiscales": [{"version": "0.4", "name": self.path.stem, "axes": axes, "datasets": datasets}],
        }
        if channel_names and self.layout.channels:
            top = 1.0 if self._dtype.kind == "f" else float(np.iinfo(self._dtype).max)
            window = {"start": 0.0, "end": top, "min": 0.0, "max": top}
            colours = [bytes(c).hex().upper() for c in label_colours(len(channel_names) + 1)[1:]]  # not black
            attrs["omero"] = {
                "channels": [
                    {"label": str(n), "color": colour, "active": True, "window": window}
                    for n, colour in zip(channel_names, colours)
                ]
            }
        if self.inside:
            names = list(channel_names or [])
            colours = label_colours(len(names))
            attrs["image-label"] = {
                "version": "0.4",
                "colors": [{"label-value": i, "rgba": [*rgb, 0 if i == 0 else 255]} for i, rgb in enumerate(colours)],
                "properties": [{"label-value": i, "class": str(n)} for i, n in enumerate(names)],
                "source": {"image": "../../"},
            }
        return attrs

    def _index(self, i: int) -> tuple:
        """The array index of plane ``i``: its t and z, every channel, the whole plane."""
        lay = self.layout
        pos = dict(zip(lay.stack_axes.lower(), np.unravel_index(i, lay.stack_shape))) if lay.stack_shape else {}
        return tuple(int(pos[d]) if d in pos else slice(None) for d in self._dims)

    def write(self, i: int, plane: np.ndarray) -> int:
        """Write plane ``i`` (shape (C, Y, X), or (Y, X) for labels); returns the checksum of its values."""
        data = np.ascontiguousarray(plane, dtype=self._dtype)
        self._array[self._index(i)] = data[None] if self.inside else data  # its one channel
        return zlib.crc32(memoryview(data).cast("B"))

    def digest(self, i: int) -> int | None:
        """Checksum of plane ``i`` as it reads back now (None when it cannot be read)."""
        try:
            data = np.ascontiguousarray(self._array[self._index(i)], dtype=self._dtype)
        except Exception:  # a damaged or truncated chunk: zarr and its codecs raise many kinds
            return None
        return zlib.crc32(memoryview(data).cast("B"))

    def close(self) -> None:
        """Nothing to close: every chunk file is written whole."""
        pass

    def finish(self, cancel=None) -> None:
        """Add the pyramid levels, then move the complete store to its final name.

        A label image inside an image moves with the image's store: finish it before the image's.
        ``cancel`` is checked between the planes of the pyramid: a cancelled build stays in the
        working store, and a resumed run builds it again.
        """
        if self.pyramid:
            self._build_pyramid(cancel)
        if self.inside:
            return
        remove_output(self.path)
        os.replace(self.work, self.path)

    def _build_pyramid(self, cancel=None) -> None:
        """Levels 1..pyramid, plane by plane from the level before (bounded memory)."""
        from .events import check_cancel

        zarr = _zarr()
        group = zarr.open_group(str(self.work), mode="r+")
        labels = self.layout.channels is None
        previous, shape = self._array, list(self.shape)
        for k in range(1, self.pyramid + 1):
            shape = shape[:-2] + [max(1, (shape[-2] + 1) // 2), max(1, (shape[-1] + 1) // 2)]
            planes = self.layout.n_planes
            log.info("%s: resolution level %d of %d (%d plane(s))", self.path.name, k, self.pyramid, planes)
            level = self._create(group, str(k), shape)
            for i in range(self.layout.n_planes):
                check_cancel(cancel)
                level[self._index(i)] = _half(np.asarray(previous[self._index(i)]), labels).astype(self._dtype)
            previous = level
        attrs = self._attributes(self._calibration, self._channel_names, self.pyramid + 1)
        group.attrs.update({"multiscales": attrs["multiscales"]})


def label_colours(n: int) -> list:
    """``n`` RGB colours (0-255) for label values: black for the first, then hues that differ from their neighbours."""
    import colorsys

    if n <= 0:
        return []
    hsv = [((i * 0.618034) % 1.0, 0.55 + 0.45 * (i % 3) / 2, 1.0 - 0.3 * (i % 2)) for i in range(max(n - 1, 0))]
    return [(0, 0, 0)] + [tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(*v)) for v in hsv][: max(n - 1, 0)]


def _half(plane: np.ndarray, labels: bool) -> np.ndarray:
    """A plane (..., Y, X) at half the size: 2 x 2 means, or for labels the top-left pixel of each block."""
    if labels:
        return plane[..., ::2, ::2]
    y, x = plane.shape[-2:]
    padded = np.pad(plane.astype(np.float32), [(0, 0)] * (plane.ndim - 2) + [(0, y % 2), (0, x % 2)], mode="edge")
    blocks = padded.reshape(*padded.shape[:-2], padded.shape[-2] // 2, 2, padded.shape[-1] // 2, 2)
    mean = blocks.mean(axis=(-3, -1))
    return np.rint(mean) if plane.dtype.kind in "ui" else mean


def open_writer(
    path: Path,
    layout: Layout,
    calibration: Calibration,
    labels: list[str] | None = None,
    channel_names: list[str] | None = None,
    resume: bool = False,
    job: dict | None = None,
    pyramid: int = 0,
) -> PlaneWriter:
    """A plane writer for ``path``; the format follows the suffix (see :func:`output_format`).

    ``pyramid`` (OME-Zarr only) adds that many half-size resolution levels.

    ``job`` (a JSON-able dict: what decides the result) is stored in the file; see :func:`recorded_job`.
    """
    fmt = output_format(path)
    if fmt == "zarr":
        return ZarrPlaneWriter(path, layout, calibration, channel_names, resume, job=job, pyramid=pyramid)
    return TiffPlaneWriter(path, layout, calibration, labels, resume, fmt=fmt, job=job, channel_names=channel_names)


def recorded_job(path: Path) -> dict | None:
    """The ``job`` a finished output of ours records (see :func:`open_writer`); None when it has none."""
    import tifffile

    try:
        if output_format(path) == "zarr":
            attrs = json.loads((path / ".zattrs").read_text(encoding="utf-8")[:1_000_000])
            job = attrs[SOFTWARE][JOB_KEY]
        else:
            with tifffile.TiffFile(path) as tif:
                if tif.is_imagej:
                    job = json.loads((tif.imagej_metadata or {})["Info"])[JOB_KEY]
                elif JOB_TAG in tif.pages[0].tags:
                    job = json.loads(str(tif.pages[0].tags[JOB_TAG].value)[:MAX_JOB_BYTES])[JOB_KEY]
                else:  # a BigTIFF of 0.2, before OME: tifffile's JSON description
                    job = tif.shaped_metadata[0][JOB_KEY]
    except (OSError, ValueError, KeyError, TypeError, IndexError, UserError, tifffile.TiffFileError):
        return None
    return job if isinstance(job, dict) else None


STATE_FORMAT = "tem_ij_plugin.predict-state"
STATE_VERSION = 2  # 2: outputs, per-plane checksums; version 1 (0.2.0) had no checksums and is not trusted
MAX_STATE_BYTES = 64 << 20


def _readable_state(path: Path) -> JobStateFile | None:
    """The state file at ``path`` as its schema reads it, or None (missing, too large or not a state)."""
    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            return None
        return JobStateFile.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None


class JobState:
    """Which planes of a prediction are written, kept as JSON next to the output (``name.partial.json``).

    ``signature`` holds everything that decides the result (model, input, options, the output files
    and their format); a resume with a different signature is refused rather than mixing two
    predictions in one file. ``outputs`` describes the partial files, and each finished plane keeps
    a checksum per output, so that a resume continues only files that are the ones described and
    recomputes every plane whose bytes on disk are not the ones written (:meth:`verify`).
    """

    def __init__(self, out: Path, signature: dict, outputs: list | None = None):
        self.path = self.path_for(out)
        self.signature = signature
        self.outputs = outputs or []
        self.planes: dict[int, list] = {}

    @property
    def done(self) -> set:
        """The finished planes."""
        return set(self.planes)

    @staticmethod
    def path_for(out: Path) -> Path:
        """Where the state of a prediction to ``out`` is kept while it is unfinished."""
        return Path(out).with_name(f"{Path(out).stem}.partial.json")

    def exists(self) -> bool:
        """Whether a state file is on disk."""
        return self.path.exists()

    @classmethod
    def recorded_tile(cls, out: Path) -> int | None:
        """The tile of the interrupted prediction to ``out``, or None (no state, or one :meth:`load` refuses).

        The default tile follows the free memory, so a resume keeps the one its partial files were made
        with, where it still fits (:func:`~tem_ij_plugin.predict.default_tiling`).
        """
        saved = _readable_state(cls.path_for(out))
        tile = saved.signature.get("tile") if saved is not None else None
        return tile if isinstance(tile, int) and not isinstance(tile, bool) and tile > 0 else None

    def load(self, n_planes: int) -> None:
        """Read an earlier run's state; a corrupt file or a different signature is a :class:`UserError`."""
        start_over = "delete it and the .partial files to start over"
        try:
            if self.path.stat().st_size > MAX_STATE_BYTES:
                raise UserError(f"cannot resume: {self.path} is too large to be a prediction state; {start_over}")
            saved = JobStateFile.model_validate_json(self.path.read_bytes())
        except OSError as exc:
            raise UserError(f"cannot read {self.path} ({exc.strerror or exc}); {start_over}") from exc
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "the file"
            raise UserError(
                f"cannot resume: {self.path} is not a valid prediction state ({where}: {first['msg']}); {start_over}"
            ) from None
        old = saved.model_dump(mode="json")["signature"]  # plain values, as this run's signature holds them
        diff = [k for k in sorted(set(old) | set(self.signature)) if old.get(k) != self.signature.get(k)]
        if diff:
            hint = f" (it used --tile {old['tile']})" if "tile" in diff and old.get("tile") else ""
            raise UserError(
                f"cannot resume: {', '.join(diff)} differ from the interrupted run recorded in {self.path}; "
                f"rerun with the same model, image and options{hint}, or delete the .partial files to start over"
            )
        if [o.model_dump() for o in saved.outputs] != self.outputs:
            raise UserError(f"cannot resume: {self.path} describes other output files; {start_over}")
        planes = {}
        for key, crcs in saved.planes.items():
            if not re.fullmatch(r"[0-9]{1,12}", key) or int(key) >= n_planes or len(crcs) != len(self.outputs):
                raise UserError(
                    f"cannot resume: {self.path} lists a plane {key!r} this prediction has not; {start_over}"
                )
            planes[int(key)] = list(crcs)
        self.planes = planes

    def recorded_outputs(self) -> list | None:
        """The final outputs an existing state file names (None when it cannot be read as a state)."""
        saved = _readable_state(self.path)
        return None if saved is None else [o.path for o in saved.outputs]

    def verify(self, writers: list) -> list:
        """Drop (and return) the finished planes whose bytes in any partial file differ from those written."""
        bad = sorted(i for i, crcs in self.planes.items() if [w.digest(i) for w in writers] != crcs)
        for i in bad:
            del self.planes[i]
        return bad

    def save(self) -> None:
        """Write the state atomically (a crash leaves the old or the new state, never half of one)."""
        data = {
            "format": STATE_FORMAT,
            "format_version": STATE_VERSION,
            "signature": self.signature,
            "outputs": self.outputs,
            "planes": {str(i): c for i, c in sorted(self.planes.items())},
        }
        # OSError, not UserError: a full disk here is reported by the job with what is safe and how to resume.
        atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps(data), encoding="utf-8"), wrap=False)

    def remove(self) -> None:
        """Delete the state file (if any)."""
        self.path.unlink(missing_ok=True)
