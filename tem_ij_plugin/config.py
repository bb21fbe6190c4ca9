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

#: Largest seed accepted anywhere (``train.seed``, ``--seed``, ``--seeds``): seeds are 0 .. 2**32 - 1.
SEED_MAX = 2**32 - 1
#: Largest config file read; real ones are a few KB.
MAX_CONFIG_BYTES = 1 << 20
#: Deepest nesting of mappings/lists in a config file (the settings themselves nest two levels).
MAX_CONFIG_DEPTH = 16
#: Validation errors listed in a message (the rest are counted).
MAX_REPORTED_ERRORS = 5


class _Strict(BaseModel):
    # allow_inf_nan=False: every float setting must be finite (".inf", "Infinity", "NaN" are refused).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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
    norm_groups: int = Field(8, ge=1, le=128, description="Maximum GroupNorm groups (norm: group only).")
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
    edge_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the edge-aware Potts term on every pixel of a crop (0 = off): label changes "
        "cost little across image edges, much inside uniform regions (losses.edge_potts_loss).",
    )
    edge_sigma: float = Field(
        0.1, gt=0, description="Intensity difference (normalised units) that makes two pixels an edge apart."
    )
    pseudo_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of cross-entropy towards the weight average's confident predictions on the "
        "unlabelled pixels (0 = off; costs one more forward pass per step).",
    )
    pseudo_threshold: float = Field(
        0.9, gt=0, le=1, description="Minimum confidence of the weight average for a pseudo-label."
    )
    band_weight: float = Field(
        0.5,
        ge=0,
        description="Weight of cross-entropy on the unlabelled band between outlines of different classes, "
        "each pixel given the class of the nearer outline (0 = off; annotations.boundary_band).",
    )
    band_width: float = Field(
        6.0, gt=0, le=64, description="Pixels: outlines of two classes closer than this enclose a band."
    )
    selection: Literal["labelled", "band"] = Field(
        "labelled",
        description="What validation scores: mIoU on the labelled pixels of the held-out patches, or "
        "('band') on those plus their boundary band, each band pixel taken as the nearer outline's class.",
    )
    prior_correction: Literal["off", "em", "mean", "relative"] = Field(
        "relative",
        description="After training, shift the output towards the class priors of the training image (Saerens "
        "et al. 2002), estimated by the network's mean posterior there: 'relative' measures it against the "
        "network's own mean posterior on its labelled pixels (its bias cancels), 'mean' against the labelled "
        "mix; 'em' iterates to the maximum-likelihood priors (it over-corrected with the band term on: ISBI "
        "profiles 0.565 vs 0.658); 'off' keeps the labelled class mix.",
    )
    validation_patches: int | None = Field(
        None,
        ge=0,
        description="Annotated patches held out for validation; None = about 20 % once that makes 2 "
        "(8+ patches), else 0.",
    )
    refit: float = Field(
        0.0,
        ge=0,
        le=2,
        description="After selection, continue the selected model on every annotated patch, validation "
        "patches included, for this fraction of its iterations (0 = off): the held-out labels are learnt "
        "too, at the cost of a model no patch has validated.",
    )
    eval_every: int = Field(25, ge=1, description="Iterations between validations.")
    smoothing: float = Field(0.6, ge=0, lt=1, description="EMA factor of the validation score.")
    patience: int = Field(6, ge=1, description="Validations without improvement before backtracking.")
    backtracks: int = Field(3, ge=0, description="How often to reload the best model with a lower rate.")
    backtrack_lr_factor: float = Field(0.3, gt=0, lt=1, description="Learning-rate factor per backtrack.")
    min_iterations: int = Field(
        150, ge=0, description="Warm-up: validations before this iteration neither count as best nor as stalls."
    )
    warm_selection: Literal["best", "final"] = Field(
        "final",
        description="A warm start (--init, --project, Fiji's model in memory): 'best' selects among the "
        "round's checkpoints after warm-up like a fresh training; 'final' lets only the round's last weight "
        "average compete with the starting model, on the validation patches the start never trained on "
        "(none: the last is kept), with no early stopping: the round runs its whole budget.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA that supports it, fp32 elsewhere."
    )
    seed: int = Field(
        0, ge=0, le=SEED_MAX, description="Seeds crops, augmentation, split and initialisation (0 .. 2**32 - 1)."
    )


class PatchConfig(_Strict):
    """The annotation patch grid."""

    size: int = Field(256, ge=32, description="Patch side in pixels (the grid annotators work on).")


class Settings(_Strict):
    """All settings; ``tem-ij train --print-config`` prints the defaults."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    patches: PatchConfig = Field(default_factory=PatchConfig)


def load_settings(path: str | Path) -> Settings:
    """Read settings from a YAML or JSON file; missing keys take their defaults.

    The file must be UTF-8 text of at most :data:`MAX_CONFIG_BYTES` whose top level is a mapping of
    sections (``model``, ``augment``, ``train``, ``patches``). An empty file (or one holding
    only comments) and an empty section (``train:`` with nothing under it) mean "all defaults". Any other
    top level (``0``, ``[]``, a string) is an error, as are YAML anchors and aliases (config files have no
    use for them, and expanding them is how a 400-byte file becomes gigabytes), nesting deeper than
    :data:`MAX_CONFIG_DEPTH`, non-finite numbers (``.inf``, ``Infinity``, ``NaN``) and unknown keys.

    Raises
    ------
    UserError
        If the file cannot be read, decoded, parsed or validated. The message lists at most
        :data:`MAX_REPORTED_ERRORS` problems with their locations, never the offending input itself.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise UserError(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MB; a settings file is a few KB")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"config file {path} is not UTF-8 text (byte {exc.start} is 0x{raw[exc.start]:02x}); save it as UTF-8"
        ) from exc
    kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
    try:
        data = _parse_json(text) if kind == "JSON" else _parse_yaml(text)
    except RecursionError as exc:
        raise UserError(f"config file {path} is nested too deeply (more than {MAX_CONFIG_DEPTH} levels)") from exc
    except Exception as exc:  # any parse error is the user's file, not our bug
        raise UserError(f"config file {path} is not valid {kind}: {_short(str(exc), 600)}") from exc
    if data is None:
        return Settings()
    if not isinstance(data, dict):
        raise UserError(
            f"config file {path} must be a mapping of sections (model, augment, train, patches), not {_kind(data)}"
        )
    if _depth(data) > MAX_CONFIG_DEPTH:
        raise UserError(f"config file {path} is nested too deeply (more than {MAX_CONFIG_DEPTH} levels)")
    # An empty section ("train:" with everything below commented out) means that section's defaults.
    data = {k: ({} if v is None else v) for k, v in data.items()}
    if "tiling" in data:  # 0.2 wrote one, and never read it: refuse it rather than ignore it again
        raise UserError(
            f"config file {path}: the tiling section is not a setting (prediction tiles are chosen per run: "
            "tem-ij predict --tile, --overlap, --batch-size); remove it"
        )
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"config file {path} has invalid settings:\n{describe_errors(exc)}") from exc


def describe_errors(exc: ValidationError, limit: int = MAX_REPORTED_ERRORS) -> str:
    """The first ``limit`` validation errors as ``  location: message`` lines, without the input values."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    lines = []
    for e in errors[:limit]:
        loc = ".".join(_short(str(p), 60) for p in e["loc"]) or "(top level)"
        lines.append(f"  {loc}: {_short(e['msg'], 200)}")
    if len(errors) > limit:
        lines.append(f"  ... and {len(errors) - limit} more")
    return "\n".join(lines)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _kind(value) -> str:
    if isinstance(value, bool):
        return f"the boolean {value}"
    if isinstance(value, (int, float)):
        return f"the number {_short(repr(value), 40)}"
    if isinstance(value, str):
        return f"the text {_short(repr(value), 40)}"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    return f"a {type(value).__name__}"


def _depth(data) -> int:
    """Nesting depth of dicts/lists, computed without recursion."""
    deepest, todo = 0, [(data, 1)]
    while todo:
        value, d = todo.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, d)
        if deepest > MAX_CONFIG_DEPTH:
            return deepest
        todo.extend((c, d + 1) for c in children)
    return deepest


def _parse_json(text: str):
    def refuse(name):
        raise ValueError(f"non-finite number {name} (every number must be finite)")

    return json.loads(text, parse_constant=refuse)


_LOADER = None


def _parse_yaml(text: str):
    global _LOADER
    if _LOADER is None:
        _LOADER = _make_loader()
    loader = _LOADER(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _make_loader():
    import yaml
    from yaml.composer import ComposerError

    class ConfigLoader(yaml.SafeLoader):
        """SafeLoader that refuses anchors/aliases (no "billion laughs") and deep nesting, while composing."""

        depth = 0

        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise ComposerError(
                    None,
                    None,
                    "YAML anchors and aliases (&name, *name) are not allowed in config files",
                    event.start_mark,
                )
            self.depth += 1
            try:
                if self.depth > MAX_CONFIG_DEPTH:
                    raise ComposerError(
                        None, None, f"nested more than {MAX_CONFIG_DEPTH} levels deep", event.start_mark
                    )
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return ConfigLoader


def dump_settings(settings: Settings, fmt: str = "yaml") -> str:
    """Settings as YAML (default) or JSON text."""
    data = settings.model_dump(mode="json")
    if fmt == "json":
        return json.dumps(data, indent=2)
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
