"""numpy <-> ImagePlus and ImageJ ROIs -> :class:`~tem_ij_plugin.annotations.Shape` (ImageJ1 API only).

Pixels are copied, never shared: the user's ImagePlus is only read.
"""

from __future__ import annotations

import zipfile
from typing import TYPE_CHECKING

import numpy as np
from scyjava import jimport

from ..annotations import StackLayout
from ..errors import UserError
from ..io import Calibration, Image, roi_to_shape

if TYPE_CHECKING:
    import os

# ImagePlus.getType() codes
GRAY8, GRAY16, GRAY32, COLOR_256, COLOR_RGB = 0, 1, 2, 3, 4
_DTYPES = {GRAY8: (np.int8, np.uint8), GRAY16: (np.int16, np.uint16), GRAY32: (np.float32, np.float32)}


def _plane(pixels, java_dtype, dtype, h: int, w: int) -> np.ndarray:
    # JPype arrays of primitives expose the buffer protocol: one memcpy, no per-pixel calls
    return np.frombuffer(memoryview(pixels), dtype=java_dtype).view(dtype).reshape(h, w).copy()


def to_image(imp) -> Image:
    """The pixels (Z, Y, X), calibration and slice labels of an ImagePlus.

    Raises
    ------
    UserError
        RGB or indexed-colour images, and hyperstacks with more than one channel.
    """
    kind = int(imp.getType())
    title = str(imp.getTitle())
    if kind in (COLOR_RGB, COLOR_256):
        raise UserError(
            f"'{title}' is a colour image; TEM segmentation needs greyscale. Use Image > Type > 8-bit (or 32-bit)"
        )
    if int(imp.getNChannels()) > 1:
        raise UserError(
            f"'{title}' has {imp.getNChannels()} channels; keep one with Image > Duplicate... (one channel) first"
        )
    java_dtype, dtype = _DTYPES[kind]
    stack = imp.getStack()
    h, w = int(imp.getHeight()), int(imp.getWidth())
    n = int(stack.getSize())
    data = np.empty((n, h, w), dtype=dtype)
    labels = []
    for i in range(n):
        data[i] = _plane(stack.getPixels(i + 1), java_dtype, dtype, h, w)
        label = stack.getSliceLabel(i + 1)
        labels.append("" if label is None else str(label))
    cal = imp.getCalibration()
    calibration = Calibration(float(cal.pixelWidth), float(cal.pixelHeight), str(cal.getUnit()), float(cal.pixelDepth))
    n_z, n_t = int(imp.getNSlices()), int(imp.getNFrames())
    axes = ("T" if n_t > 1 else "") + ("Z" if n_z > 1 else "")
    stack_shape = tuple(n for n in (n_t, n_z) if n > 1)
    if not axes and n > 1:  # a stack whose dimensions ImageJ does not know: its planes are slices
        axes, stack_shape = "Z", (n,)
    return Image(data, calibration, labels if any(labels) else [], None, StackLayout(axes, stack_shape))


def to_imageplus(
    data: np.ndarray,
    title: str,
    calibration: Calibration | None = None,
    channel_labels: list[str] | None = None,
    layout: StackLayout | None = None,
):
    """A new ImagePlus from (Z, Y, X) or (Z, C, Y, X) uint8, uint16 or float32 pixels.

    With channels it is a hyperstack (C channels, Z slices); ``channel_labels`` become the slice labels
    of every plane of that channel, as ``write_hyperstack`` writes them to TIFF. ``layout`` (that of the
    image the planes came from) keeps frames as frames: a T or T x Z image comes back as one.
    """
    ImagePlus = jimport("ij.ImagePlus")
    ImageStack = jimport("ij.ImageStack")
    from jpype import JArray, JByte, JFloat, JShort

    if data.ndim == 3:
        data = data[:, None]
    nz, nc, h, w = data.shape
    makers = {
        np.dtype(np.uint8): (jimport("ij.process.ByteProcessor"), JByte, np.int8),
        np.dtype(np.uint16): (jimport("ij.process.ShortProcessor"), JShort, np.int16),
        np.dtype(np.float32): (jimport("ij.process.FloatProcessor"), JFloat, np.float32),
    }
    if data.dtype not in makers:
        raise TypeError(f"no ImageJ type for {data.dtype}")
    processor, jtype, view = makers[data.dtype]
    stack = ImageStack(w, h)
    for z in range(nz):
        for c in range(nc):
            pixels = JArray(jtype)(np.ascontiguousarray(data[z, c]).view(view).ravel())
            ip = processor(w, h, pixels, None) if jtype is JShort else processor(w, h, pixels)
            stack.addSlice(str(channel_labels[c]) if channel_labels else None, ip)
    imp = ImagePlus(title, stack)
    if nz * nc == 1 and channel_labels:
        # a single image has no stack to hold its slice label: ImageJ keeps it as a property
        # ("Label" for the TIFF writer; "Slice_Label" for getInfo("slice.label") since 1.53)
        imp.setProperty("Label", str(channel_labels[0]))
        if hasattr(imp, "setProp"):
            imp.setProp("Slice_Label", str(channel_labels[0]))
    frames = layout.length("T") if layout is not None and nz % layout.length("T") == 0 else 1
    if nc > 1 or frames > 1:
        imp.setDimensions(nc, nz // frames, frames)
        imp.setOpenAsHyperStack(True)
    if data.dtype == np.float32:
        imp.setDisplayRange(float(np.nanmin(data)), float(np.nanmax(data)) or 1.0)
    if calibration is not None:
        cal = imp.getCalibration()
        cal.pixelWidth, cal.pixelHeight, cal.pixelDepth = (
            calibration.pixel_width,
            calibration.pixel_height,
            calibration.z_spacing,
        )
        cal.setUnit(calibration.unit)
    return imp


def roi_bytes(roi) -> bytes:
    """One ROI in ImageJ's own ``.roi`` encoding (what the ROI Manager saves)."""
    encoded = jimport("ij.io.RoiEncoder").saveAsByteArray(roi)
    return bytes(memoryview(encoded))


def from_roi_bytes(data: bytes):
    """A Java ROI from ImageJ's ``.roi`` encoding (what roifile writes): the exact ROI a RoiSet.zip would give."""
    from jpype import JArray, JByte

    roi = jimport("ij.io.RoiDecoder").openFromByteArray(JArray(JByte)(data))
    if roi is None:
        raise UserError("ImageJ could not decode a ROI written by tem_ij_plugin")
    return roi


def to_shapes(rois: list, source: str = "ROI Manager") -> list:
    """Convert ImageJ ROIs to shapes through their ``.roi`` bytes: the path a RoiSet.zip takes.

    Going through the file encoding means a ROI labels exactly the same pixels whether it comes from
    the ROI Manager or from a RoiSet.zip read by ``tem-ij train``.
    """
    import roifile

    shapes = []
    for roi in rois:
        try:
            parsed = roifile.ImagejRoi.frombytes(roi_bytes(roi))
        except Exception as exc:  # roifile raises ValueError/struct.error on encodings it cannot read
            raise UserError(f"{source}: ROI '{roi.getName()}' cannot be read: {exc}") from exc
        shapes.append(roi_to_shape(parsed, source))
    return shapes


def write_roiset(path: str | os.PathLike, rois: list) -> None:
    """Write ROIs as a RoiSet.zip, byte for byte what the ROI Manager's More > Save writes."""
    with zipfile.ZipFile(path, "w") as zf:
        seen = set()
        for i, roi in enumerate(rois):
            name = str(roi.getName() or f"roi-{i + 1:04d}")
            entry = name if name not in seen else f"{name}-{i + 1}"
            seen.add(entry)
            zf.writestr(entry + ".roi", roi_bytes(roi))
