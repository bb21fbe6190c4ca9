"""Every setting of the engine as pydantic models, with YAML/JSON input and output.

The defaults are chosen to train in minutes on a 2-core CPU and scale up unchanged on a GPU.
Unknown keys are errors (``extra="forbid"``) so that a misspelt setting never passes silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Architecture of the recurrent U-Net."""

    depth: int = Field(
        5,
        ge=2,
        le=6,
        description="U-Net levels (depth - 1 poolings). 5 sees whole cells (receptive field ~2x that of 4): "
        "ISBI profiles 0.682 vs 0.661, membrane 0.755 vs 0.761, synthetic demo 0.86 vs 0.80 (see README).",
    )
    base_channels: int = Field(16, ge=4, le=128, description="Channels at the first level, doubled per level.")
    steps: int = Field(
        1,
        ge=1,
        le=6,
        description="Recurrent steps T (1 = plain U-Net). T=3 was less accurate per minute of 2-core CPU "
        "training on ISBI (see README benchmarks); worth trying on a GPU.",
    )
    norm: Literal["batch", "group"] = Field(
        "batch",
        description="Normalisation layers. 'batch': fixed statistics at inference, so predictions do not "
        "depend on tile size or position (seam-free, folds into the convolutions). 'group': per-tile "
        "statistics (a 1024-pixel tile and 256-pixel tiles gave different maps).",
    )
    norm_groups: int = Field(8, ge=1, description="Maximum GroupNorm groups (norm: group only).")
    feedback: Literal["input", "head"] = Field(
        "input",
        description="Where the previous softmax re-enters: 'input' re-runs the whole U-Net per step, "
        "'head' only its finest decoder block (much cheaper per step).",
    )


class AugmentConfig(_Strict):
    """Paired image/label augmentation, run on the training device."""

    dihedral: bool = Field(True, description="Random flips and 90-degree rotations.")
    rotation_deg: float = Field(15.0, ge=0, le=180, description="Maximum extra rotation in degrees.")
    scale: float = Field(0.15, ge=0, lt=1, description="Maximum relative zoom in or out.")
    elastic_alpha: float = Field(6.0, ge=0, description="Elastic displacement amplitude in pixels.")
    elastic_grid: int = Field(6, ge=2, description="Control points per side of the elastic field.")
    brightness: float = Field(0.1, ge=0, description="Maximum additive brightness shift (normalised units).")
    contrast: float = Field(0.25, ge=0, lt=1, description="Maximum relative contrast change.")
    gamma: float = Field(0.3, ge=0, lt=1, description="Maximum relative gamma change.")
    noise: float = Field(0.06, ge=0, description="Maximum Gaussian noise sigma (normalised units).")
    blur: float = Field(1.2, ge=0, description="Maximum Gaussian blur sigma in pixels.")
    low_resolution: float = Field(2.0, ge=1, description="Maximum down-then-up sampling factor (1 = off).")
    probability: float = Field(0.5, ge=0, le=1, description="Probability of each photometric augmentation.")


class TrainConfig(_Strict):
    """Optimisation, validation, early stopping and backtracking."""

    max_minutes: float = Field(10.0, gt=0, description="Wall-clock budget; training always stops by then.")
    max_iterations: int = Field(3000, ge=1, description="Hard cap on optimiser steps.")
    batch_size: int = Field(4, ge=1, description="Crops per step.")
    crop_size: int = Field(192, ge=32, description="Training crop side in pixels.")
    context: int = Field(32, ge=0, description="Image context around a training patch that crops may use.")
    learning_rate: float = Field(1e-3, gt=0)
    ema_decay: float = Field(
        0.99, ge=0, lt=1, description="Decay of the weight average that is validated and saved (0 = off)."
    )
    weight_decay: float = Field(1e-4, ge=0)
    class_balance: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Exponent of inverse labelled-class frequency used as loss weight "
        "(0 = none, 1 = fully balanced); counters under-labelled thin classes.",
    )
    dice_weight: float = Field(0.0, ge=0, description="Weight of soft Dice on labelled pixels, added to CE.")
    step_decay: float = Field(0.4, gt=0, le=1, description="Deep supervision: step t weighs decay**(T-1-t).")
    validation_patches: int | None = Field(
        None, ge=0, description="Annotated patches held out for validation; None = about 20 %, at least 1 when 3+."
    )
    eval_every: int = Field(25, ge=1, description="Iterations between validations.")
    smoothing: float = Field(0.6, ge=0, lt=1, description="EMA factor of the validation score.")
    patience: int = Field(6, ge=1, description="Validations without improvement before backtracking.")
    backtracks: int = Field(3, ge=0, description="How often to reload the best model with a lower rate.")
    backtrack_lr_factor: float = Field(0.3, gt=0, lt=1, description="Learning-rate factor per backtrack.")
    min_iterations: int = Field(
        150, ge=0, description="Warm-up: validations before this iteration neither count as best nor as stalls."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA that supports it, fp32 elsewhere."
    )
    seed: int = Field(0, description="Seeds crops, augmentation, split and initialisation.")


class PatchConfig(_Strict):
    """The annotation patch grid."""

    size: int = Field(256, ge=32, description="Patch side in pixels (the grid annotators work on).")


class TilingConfig(_Strict):
    """Tiled prediction."""

    tile: int = Field(256, ge=32, description="Tile side in pixels.")
    overlap: int = Field(32, ge=0, description="Overlap between neighbouring tiles in pixels.")
    batch_size: int = Field(4, ge=1, description="Tiles per forward pass.")


class Settings(_Strict):
    """All settings; ``tem-ij train --print-config`` prints the defaults."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    patches: PatchConfig = Field(default_factory=PatchConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)


def load_settings(path: str | Path) -> Settings:
    """Read settings from a YAML or JSON file; missing keys take their defaults.

    Raises
    ------
    UserError
        If the file cannot be read, parsed or validated.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # any parse error is the user's file, not our bug
        raise UserError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from exc
    try:
        return Settings.model_validate(data or {})
    except ValidationError as exc:
        raise UserError(f"config file {path} has invalid settings:\n{exc}") from exc


def dump_settings(settings: Settings, fmt: str = "yaml") -> str:
    """Settings as YAML (default) or JSON text."""
    data = settings.model_dump(mode="json")
    if fmt == "json":
        return json.dumps(data, indent=2)
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
