"""Typed, bounded schemas of every file tem_ij_plugin reads back.

The rule: every file we read back (model metadata, ``project.json``, ``round.json``, a prediction's
resume state ``NAME.partial.json``) is parsed into a typed, bounded schema here before anything uses
it. Nothing read from disk is trusted: types are
strict (no "5" for 5, no true for 1), numbers are bounded by what this version can build and use,
lists and strings have maximum lengths, nesting is bounded, and the cross-field rules (the class
count is the number of output channels, percentiles in order, round numbers unique) are checked
here too. A violation is a :class:`~tem_ij_plugin.errors.UserError` (a
:class:`~tem_ij_plugin.errors.ModelFileError` for model files) naming the file and the problem.

Callers keep plain dicts (the files stay JSON and carry keys this module does not model, such as a
model's ``settings`` and ``versions``): :func:`validate_model_meta`, :func:`validate_project` and
:func:`validate_round` raise or return the validated schema object, and the dict they checked is
used unchanged (strict validation coerces nothing, so the dict holds exactly the validated values).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ModelFileError, UserError

if TYPE_CHECKING:
    import os

# Bounds that hold for every file this version writes, with room to spare.
MAX_NESTING = 32  # JSON depth (a model's history is 5 deep)
MAX_CLASSES = 255
MAX_NAME = 200  # characters of a class name
MAX_TEXT = 4096  # characters of any other string we use
MAX_ROUNDS = 100_000
MAX_PATCHES = 1_000_000

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=2**53)]
# A patch as written by Patch.as_list(): [z, y0, x0, y1, x1].
PatchList = Annotated[list[Annotated[int, Field(ge=0, le=2**31)]], Field(min_length=5, max_length=5)]


class _Strict(BaseModel):
    """No coercion, no unknown keys."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


class _Open(BaseModel):
    """No coercion; unknown keys are kept (and bounded by :func:`check_nesting`)."""

    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)


def _iso_time(value: str) -> str:
    try:
        _dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"not an ISO date and time: {value[:40]!r}") from exc
    return value


IsoTime = Annotated[str, Field(max_length=64)]


# -- model files ----------------------------------------------------------------------------------
class Architecture(_Strict):
    """The network of a model file; the bounds are those of :class:`tem_ij_plugin.config.ModelConfig`."""

    name: Literal["RecurrentUNet"] = "RecurrentUNet"
    in_channels: int = Field(1, ge=1, le=16)
    n_classes: int = Field(ge=2, le=MAX_CLASSES)
    depth: int = Field(ge=2, le=6)
    base_channels: int = Field(ge=4, le=128)
    steps: int = Field(ge=1, le=6)
    # Files of format 1 have no "norm": they are GroupNorm models (see modelio.build_network).
    norm: Literal["batch", "group"] = "group"
    norm_groups: int = Field(8, ge=1, le=128)
    feedback: Literal["input", "head"] = "input"


class Normalization(_Open):
    """How input images are scaled.

    Other methods than ``percentile`` pass here and are refused, with their own message, by
    :func:`tem_ij_plugin.normalization.check_normalization`.
    """

    method: Name
    low: float = Field(1.0, ge=0, le=100, allow_inf_nan=False)
    high: float = Field(99.8, ge=0, le=100, allow_inf_nan=False)
    training_range: list[Finite] | None = Field(None, min_length=2, max_length=2)

    @model_validator(mode="after")
    def _ordered(self):
        if self.method == "percentile":
            if self.model_extra:
                raise ValueError(f"unknown key(s) {', '.join(sorted(self.model_extra))} for percentile normalisation")
            if not self.low < self.high:
                raise ValueError(f"the low percentile {self.low} must be below the high one {self.high}")
        if self.training_range is not None and self.training_range[0] > self.training_range[1]:
            raise ValueError("training_range must be [low, high]")
        return self


class ObjectAreas(_Open):
    """The annotated pieces of one class: how many, and their median area in pixels."""

    count: Count
    median_px: float = Field(ge=0, le=1e12, allow_inf_nan=False)


class ReceptiveField(_Open):
    """A model's effective receptive field: the ``radius`` that holds the share ``mass`` of it."""

    mass: float = Field(ge=0, le=1, allow_inf_nan=False)
    radius: int | None = Field(None, ge=0, le=4096)


Priors = Annotated[list[Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]], Field(max_length=MAX_CLASSES)]


class PriorCorrection(_Open):
    """The class-prior correction folded into a round's output bias (see :mod:`tem_ij_plugin.priors`)."""

    method: Literal["em", "mean", "relative"]
    train_prior: Priors
    image_prior: Priors
    # Bounded by log(1 / MIN_PRIOR) ~ 6.9 either way; a warm start subtracts it from the bias.
    logit_shift: list[Annotated[float, Field(ge=-10, le=10, allow_inf_nan=False)]] = Field(max_length=MAX_CLASSES)
    em_iterations: Count | None = None
    # What ``relative`` measures the image's priors against (priors.labelled_reference); a probability
    # of 0 would make the shift infinite.
    reference: list[Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]] | None = Field(
        None, max_length=MAX_CLASSES
    )

    @model_validator(mode="after")
    def _has_reference(self):
        if self.method == "relative" and (self.reference is None or len(self.reference) != len(self.logit_shift)):
            raise ValueError("a 'relative' prior correction needs a reference prior for every class")
        return self


class Refit(_Open):
    """The continuation of a round's selected model on every patch (``train.refit``)."""

    iterations: Count
    from_iteration: Count
    patches: list[PatchList] = Field(max_length=MAX_PATCHES)


class HistoryRound(_Open):
    """One training round in a model's history; the keys callers read are typed when present."""

    round: int | None = Field(None, ge=0, le=MAX_ROUNDS)
    finished: IsoTime | None = None
    iterations: Count | None = None
    duration_s: float | None = Field(None, ge=0, allow_inf_nan=False)
    stop_reason: Text | None = None
    best_iteration: Count | None = None
    best_score: Finite | None = None
    score: Text | None = None
    backtracks: Count | None = None
    device: Text | None = None
    train_patches: list[PatchList] | None = Field(None, max_length=MAX_PATCHES)
    val_patches: list[PatchList] | None = Field(None, max_length=MAX_PATCHES)
    labelled_pixels: dict[Name, Count] | None = None
    curves: dict[Name, list[float | None]] | None = None  # a diverged run may have logged NaN losses
    prior_correction: PriorCorrection | None = None
    refit: Refit | None = None

    @field_validator("finished")
    @classmethod
    def _time(cls, v):
        return v if v is None else _iso_time(v)


class History(_Open):
    """A model's training history: its rounds, oldest first."""

    rounds: list[HistoryRound] = Field(default_factory=list, max_length=MAX_ROUNDS)


class ModelMeta(_Open):
    """The JSON description stored in a model file (see :mod:`tem_ij_plugin.modelio`)."""

    format: Literal["tem_ij_plugin.model"]
    format_version: int = Field(ge=1)
    classes: list[Name] = Field(min_length=2, max_length=MAX_CLASSES)
    architecture: Architecture
    normalization: Normalization
    pixel_size: dict[Name, Any] | None = None
    patch_size: int | None = Field(None, ge=16, le=16384)
    object_areas: dict[Name, ObjectAreas] | None = Field(None, max_length=MAX_CLASSES)
    history: History | None = None
    annotations_sha256: Annotated[str, Field(max_length=128)] | None = None
    effective_receptive_field: ReceptiveField | None = None
    settings: dict[Name, Any] | None = None
    versions: dict[Name, Any] | None = None

    @field_validator("classes")
    @classmethod
    def _distinct(cls, v):
        if any(not c.strip() for c in v):
            raise ValueError("class names must not be blank")
        dupes = sorted({c for c in v if v.count(c) > 1})
        if dupes:
            raise ValueError(f"duplicate class name(s) {', '.join(map(repr, dupes))}")
        return v

    @model_validator(mode="after")
    def _classes_are_outputs(self):
        if self.architecture.n_classes != len(self.classes):
            raise ValueError(
                f"architecture.n_classes is {self.architecture.n_classes} but {len(self.classes)} classes are named"
            )
        for r in self.history.rounds if self.history else []:
            if r.prior_correction is not None and len(r.prior_correction.logit_shift) != len(self.classes):
                raise ValueError(
                    f"round {r.round}: the prior correction has {len(r.prior_correction.logit_shift)} logit "
                    f"shift(s) for {len(self.classes)} classes"
                )
        return self


# -- project folders ------------------------------------------------------------------------------
def inside_path(value: str) -> str:
    """A relative path that stays in its folder (no absolute path, no '..', no backslash or drive)."""
    p = PurePosixPath(value)
    if not value or p.is_absolute() or "\\" in value or ":" in value or ".." in p.parts or "\x00" in value:
        raise ValueError(f"{value!r} points outside the project folder")
    return value


RelPath = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]


class RoundRecord(_Strict):
    """One round in ``project.json`` and in its ``round-NNN/round.json``."""

    round: int = Field(ge=1, le=MAX_ROUNDS)
    parent: int | None = Field(ge=1, le=MAX_ROUNDS)
    finished: IsoTime
    model: RelPath
    annotations: RelPath
    annotations_source: Text
    annotations_sha256: Annotated[str, Field(max_length=128)] | None
    image: Text | None
    train_patches: list[PatchList] = Field(max_length=MAX_PATCHES)
    val_patches: list[PatchList] = Field(max_length=MAX_PATCHES)
    labelled_pixels: dict[Name, Count]
    score: Text
    best_score: Finite | None
    iterations: Count
    train_s: float = Field(ge=0, allow_inf_nan=False)
    since_parent_s: Finite | None
    stop_reason: Text

    @field_validator("finished")
    @classmethod
    def _time(cls, v):
        return _iso_time(v)

    @field_validator("model", "annotations")
    @classmethod
    def _inside(cls, v):
        return inside_path(v)


class Event(_Strict):
    """One entry of the event log in ``project.json``: a round trained, or reverted to."""

    time: IsoTime
    action: Literal["train", "revert"]
    round: int = Field(ge=1, le=MAX_ROUNDS)
    parent: int | None = Field(None, ge=1, le=MAX_ROUNDS)
    from_: int | None = Field(None, alias="from", ge=1, le=MAX_ROUNDS)

    @field_validator("time")
    @classmethod
    def _time(cls, v):
        return _iso_time(v)

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data):
        if isinstance(data, dict):
            need = {"train": "parent", "revert": "from"}.get(data.get("action"))
            if need and need not in data:
                raise ValueError(f"a {data['action']} event needs '{need}'")
        return data


class ProjectFile(_Strict):
    """``project.json``."""

    format: Literal["tem_ij_plugin project"]
    format_version: int = Field(ge=1)
    created: IsoTime
    image: Text | None
    classes: list[Name] | None = Field(max_length=MAX_CLASSES)
    current: int | None = Field(ge=1, le=MAX_ROUNDS)
    rounds: list[RoundRecord] = Field(max_length=MAX_ROUNDS)
    events: list[Event] = Field(max_length=10 * MAX_ROUNDS)

    @field_validator("created")
    @classmethod
    def _time(cls, v):
        return _iso_time(v)

    @model_validator(mode="after")
    def _consistent(self):
        numbers = [r.round for r in self.rounds]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"round numbers repeat ({', '.join(map(str, numbers))})")
        if numbers != sorted(numbers):
            raise ValueError("rounds are out of order")
        if self.current is not None and self.current not in numbers:
            raise ValueError(f"the current round {self.current} is not one of the rounds")
        for r in self.rounds:
            if r.parent is not None and r.parent not in numbers:
                raise ValueError(f"round {r.round} warm-started from round {r.parent}, which is not in the project")
        for e in self.events:
            if e.round not in numbers:
                raise ValueError(f"an event names round {e.round}, which is not in the project")
        return self


# -- helpers --------------------------------------------------------------------------------------
def check_nesting(obj: object, limit: int = MAX_NESTING) -> None:
    """Raise ValueError when ``obj`` (parsed JSON) nests deeper than ``limit``."""
    stack = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth >= limit:
                raise ValueError(f"nested more than {limit} levels deep")
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            if depth >= limit:
                raise ValueError(f"nested more than {limit} levels deep")
            stack.extend((v, depth + 1) for v in item)


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` that turns every way a hostile text can fail (deep nesting included) into ValueError."""
    try:
        obj = json.loads(text)
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from exc
    check_nesting(obj)
    return obj


def describe(exc: ValidationError, limit: int = 3) -> str:
    """A pydantic error as one readable line: ``where: what`` for the first few problems."""
    parts = []
    for err in exc.errors()[:limit]:
        where = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] in ("missing", "extra_forbidden"):
            parts.append(f"{where}: {msg.lower()}")
            continue
        given = err.get("input")
        shown = (
            "" if isinstance(given, (dict, list)) or err["type"].startswith("value_error") else f" (got {given!r:.60})"
        )
        parts.append(f"{where}: {msg}{shown}" if where else f"{msg}{shown}")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more problem(s)" if more > 0 else "")


def validate_model_meta(path: str | os.PathLike, meta: dict) -> ModelMeta:
    """The model description of ``path`` as a :class:`ModelMeta`, or a :class:`ModelFileError`."""
    try:
        check_nesting(meta)
        return ModelMeta.model_validate(meta)
    except ValueError as exc:  # ValidationError is a ValueError
        text = describe(exc) if isinstance(exc, ValidationError) else str(exc)
        raise ModelFileError(f"{path}: the model description is invalid: {text}") from None


def validate_project(path: str | os.PathLike, data: dict) -> ProjectFile:
    """``project.json`` of a project as a :class:`ProjectFile`, or a :class:`UserError`."""
    try:
        return ProjectFile.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{path} is damaged or was edited by hand: {describe(exc)}") from None


def validate_round(path: str | os.PathLike, data: dict) -> RoundRecord:
    """A ``round.json`` as a :class:`RoundRecord`, or a :class:`UserError`."""
    try:
        return RoundRecord.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{path} is damaged or was edited by hand: {describe(exc)}") from None


# --- resume state of a prediction (NAME.partial.json) ---------------------------------------------------


class _OutputRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    path: str = Field(max_length=4096)
    work: str = Field(max_length=4096)
    format: Literal["imagej", "ome", "bigtiff", "zarr"]
    shape: list[Annotated[int, Field(ge=1, le=2**40)]] = Field(max_length=8)
    dtype: str = Field(max_length=16)


Scalar = Annotated[str, Field(max_length=4096)] | int | float | bool | None


class JobStateFile(BaseModel):
    """The typed content of ``NAME.partial.json`` (see :class:`~tem_ij_plugin.stackio.JobState`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["tem_ij_plugin.predict-state"]
    format_version: Literal[2]
    # object_areas: the model's annotated areas (ObjectAreas per class), which the job records for `objects`
    signature: dict[str, Scalar | list[Annotated[str, Field(max_length=256)]] | dict[Name, ObjectAreas]] = Field(
        max_length=64
    )
    outputs: list[_OutputRecord] = Field(min_length=1, max_length=2)
    #: finished plane (index as text, JSON keys are strings) -> CRC-32 of its bytes in each output
    planes: dict[str, list[Annotated[int, Field(ge=0, lt=2**32)]]]
