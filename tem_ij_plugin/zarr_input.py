"""OME-Zarr images in, plane by plane: the metadata checked against a typed schema, pixels read lazily.

Reads OME-NGFF 0.4 (Zarr v2; ``multiscales`` in the group's attributes) and 0.5 (Zarr v3; under
``ome``) with the zarr library (the ``[zarr]`` extra), the full-resolution level only. Axes ``t``,
``c``, ``z`` (any of them) then ``y``, ``x``; the physical scale of the first dataset and the axes'
units give the calibration, ``omero`` channel labels the channel names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UserError

MAX_ATTRS = 10 << 20
#: OME-Zarr's (UDUNITS) length units -> (our unit, factor to it).
_UNITS = {"micrometer": ("µm", 1.0), "nanometer": ("nm", 1.0), "millimeter": ("mm", 1.0),
          "centimeter": ("µm", 1e4), "meter": ("µm", 1e6), "angstrom": ("nm", 0.1)}  # fmt: skip


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Axis(_Loose):
    name: Literal["t", "c", "z", "y", "x"]
    type: str | None = Field(None, max_length=64)
    unit: str | None = Field(None, max_length=64)


class _Transform(_Loose):
    type: str = Field(max_length=64)
    scale: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] | None = Field(None, max_length=5)


class _Dataset(_Loose):
    path: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
    coordinateTransformations: list[_Transform] = Field(default_factory=list, max_length=8)  # noqa: N815

    @field_validator("path")
    @classmethod
    def _inside(cls, v: str) -> str:
        if any(part in (".", "..") for part in v.split("/")):
            raise ValueError("a dataset path stays inside the image group")
        return v


class _Multiscale(_Loose):
    axes: list[_Axis] = Field(min_length=2, max_length=5)
    datasets: list[_Dataset] = Field(min_length=1, max_length=64)


def _attributes(group) -> dict:
    """The OME part of a group's attributes, 0.4 (top level) or 0.5 (under ``ome``)."""
    attrs = dict(group.attrs)
    return attrs.get("ome", attrs) if isinstance(attrs.get("ome"), dict) else attrs


class ZarrPlanes:
    """The planes of an OME-Zarr image, as :class:`~tem_ij_plugin.io.PlaneReader` gives those of a TIFF.

    Parameters
    ----------
    path : path
        The ``.zarr`` folder (an OME-Zarr image group).
    channel : int, optional
        1-based channel, required when the image has several.

    Raises
    ------
    UserError
        zarr missing, not an OME-Zarr image, metadata that does not describe the array, axes we cannot
        read as planes, a channel out of range.
    """

    def __init__(self, path: str | os.PathLike, channel: int | None = None):
        from .io import Calibration

        self.path = Path(path)
        group = self._group()
        ms = self._multiscale(group)
        names = "".join(a.name for a in ms.axes)
        if not names.endswith("yx") or len(set(names)) != len(names) or names[:-2] not in _LEADS:
            raise UserError(f"{self.path}: axes {','.join(names)} cannot be read as planes (expected [t][c][z] y x)")
        try:
            self._array = group[ms.datasets[0].path]
            shape, dtype = tuple(int(n) for n in self._array.shape), np.dtype(self._array.dtype)
        except Exception as exc:  # a missing or damaged array: KeyError, ValueError, zarr's own errors
            raise UserError(f"{self.path}: cannot open its array {ms.datasets[0].path} ({exc})") from exc
        if len(shape) != len(names):
            raise UserError(f"{self.path}: the metadata names {len(names)} axes but the array has {len(shape)}")
        self.dtype, self.plane_shape = dtype, shape[-2:]
        self._names, self._shape = names, shape
        self.n_channels = shape[names.index("c")] if "c" in names else 1
        self._channel = self._pick_channel(channel)
        self.stack_axes = "".join(a.upper() for a in names[:-2] if a != "c")
        self.stack_shape = tuple(shape[names.index(a.lower())] for a in self.stack_axes)
        keep = [a for a in self.stack_axes if self.stack_shape[self.stack_axes.index(a)] > 1]
        if keep != list(self.stack_axes):  # a T or Z axis of length 1 is no stack axis
            self.stack_shape = tuple(self.stack_shape[self.stack_axes.index(a)] for a in keep)
            self.stack_axes = "".join(keep)
        self.n_planes = int(np.prod(self.stack_shape, dtype=np.int64))
        self.calibration = _calibration(ms, Calibration())
        labels = _channel_labels(group, self.n_channels)
        self.slice_labels = [labels[self._channel]] * self.n_planes if labels else []

    def _group(self):
        try:
            import zarr
        except ImportError as exc:
            raise UserError(f"reading {self.path} needs zarr: pip install 'tem_ij_plugin[zarr]'") from exc
        try:
            return zarr.open_group(str(self.path), mode="r")
        except Exception as exc:  # zarr raises many kinds for a folder that is not a group
            raise UserError(f"{self.path} is not a readable Zarr group ({exc})") from exc

    def _multiscale(self, group) -> _Multiscale:
        attrs = _attributes(group)
        if len(repr(attrs)) > MAX_ATTRS:
            raise UserError(f"{self.path}: its attributes are larger than an OME-Zarr image's")
        scales = attrs.get("multiscales") if isinstance(attrs, dict) else None
        if not isinstance(scales, list) or not scales:
            raise UserError(f"{self.path} is a Zarr group but not an OME-Zarr image (no multiscales)")
        try:
            return _Multiscale.model_validate(scales[0])
        except ValidationError as exc:
            from .schemas import describe

            raise UserError(f"{self.path}: its OME-Zarr metadata is not valid: {describe(exc)}") from None

    def _pick_channel(self, channel: int | None) -> int:
        n = self.n_channels
        if n > 1 and channel is None:
            raise UserError(f"{self.path} has {n} channels; choose the channel to segment with --channel 1..{n}")
        if channel is not None and not 1 <= channel <= n:
            raise UserError(f"--channel {channel} is out of range: {self.path} has channels 1..{n}")
        return (channel or 1) - 1

    def index(self, i: int) -> tuple:
        """The array index of plane ``i`` (planes run over T, then Z, as in a TIFF hyperstack)."""
        pos = dict(zip(self.stack_axes.lower(), np.unravel_index(i, self.stack_shape))) if self.stack_shape else {}
        lead = tuple(self._channel if a == "c" else int(pos.get(a, 0)) for a in self._names[:-2])
        return (*lead, slice(None), slice(None))

    def read(self, i: int) -> np.ndarray:
        """Plane ``i`` as a (Y, X) array."""
        try:
            return np.asarray(self._array[self.index(i)])
        except Exception as exc:  # a missing or damaged chunk
            raise UserError(f"cannot read plane {i + 1} of {self.path}: {exc or type(exc).__name__}") from exc


_LEADS = ("", "t", "c", "z", "tc", "tz", "cz", "tcz")


def _calibration(ms: _Multiscale, cal):
    """Pixel size, unit and slice spacing from the first dataset's scale and the space axes' unit."""
    scale = next((t.scale for t in ms.datasets[0].coordinateTransformations if t.type == "scale" and t.scale), None)
    axes = {a.name: (a, i) for i, a in enumerate(ms.axes)}
    unit = _UNITS.get(axes["x"][0].unit or "")
    if scale is None or len(scale) != len(ms.axes) or unit is None or axes["y"][0].unit != axes["x"][0].unit:
        return cal
    cal.unit, factor = unit
    cal.pixel_width, cal.pixel_height = scale[axes["x"][1]] * factor, scale[axes["y"][1]] * factor
    if "z" in axes and axes["z"][0].unit == axes["x"][0].unit:
        cal.z_spacing = scale[axes["z"][1]] * factor
    return cal


def _channel_labels(group, n: int) -> list[str]:
    """``omero`` channel labels, one per channel, or none."""
    omero = _attributes(group).get("omero")
    channels = omero.get("channels") if isinstance(omero, dict) else None
    if not isinstance(channels, list) or len(channels) != n:
        return []
    labels = [c.get("label") if isinstance(c, dict) else None for c in channels]
    return [str(x)[:200] for x in labels] if all(isinstance(x, str) for x in labels) else []
