"""The use cases every front end shares: the CLI, the Fiji commands and, next, the Qt panel and dask.

Each takes plain inputs (arrays, shapes, settings, paths, a progress sink and a cancel token) and
returns a typed result; a front end only translates its arguments and shows what comes back, so the
same inputs give the same model whichever front end asked.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import UserError
from .events import CancelToken, ProgressSink

if TYPE_CHECKING:
    from collections.abc import Callable

    from .config import Settings
    from .io import Image
    from .modelio import TrainedModel
    from .project import Project
    from .suggest import SuggestResult

log = logging.getLogger(__name__)


@dataclass
class TrainedRound:
    """What :func:`train_round` returns.

    Attributes
    ----------
    result : TrainResult
        The training's result; ``result.model`` is the trained model.
    saved : list of str
        Where the model was saved, in words, for the summary line.
    record : dict or None
        The project's record of this round, when a project was given and the round registered.
    error : str or None
        Why the round failed after training (a save that went wrong, a non-finite loss); the message
        names every place the model is kept. The front end reports it as a failure.
    """

    result: object
    saved: list = field(default_factory=list)
    record: dict | None = None
    error: str | None = None


def warm_start_path(project: Project) -> Path | None:
    """The model file of a project's current round (the next round's warm start), or None without one.

    Front ends list it among the command's inputs, so that no output may overwrite it.
    """
    path = project.current_model_path()
    if path is not None:
        n = len(project.rounds) + 1
        log.info("project %s: round %d warm-starts from round %d", project.root, n, project.current)
    return path


def train_round(
    image: Image,
    shapes: list,
    settings: Settings,
    *,
    init: TrainedModel | None = None,
    classes: list | None = None,
    all_slices: bool = False,
    group_names: dict | None = None,
    project: Project | None = None,
    out: Path | None = None,
    image_path: Path | None = None,
    rois_path: Path | None = None,
    device: str = "auto",
    progress: ProgressSink | None = None,
    cancel: CancelToken | None = None,
    rescue: bool = True,
) -> TrainedRound:
    """Rasterise the annotations, train (warm-starting from ``init``) and save the model.

    Parameters
    ----------
    image : tem_ij_plugin.io.Image
        The image (its ``data`` and ``calibration``); never modified.
    shapes : list of Shape
        The annotations (named ROIs).
    settings : Settings
    init : TrainedModel, optional
        The model to warm-start from; its classes win over ``classes`` (which must then agree).
    classes, all_slices, group_names
        How the shapes become labels (:func:`tem_ij_plugin.annotations.rasterize`).
    project : Project, optional
        Keep the round there: its folder is reserved before training, so a stray folder never costs
        a finished training, and the round records ``image_path`` and ``rois_path``.
    out : Path, optional
        Also save the model here (already checked against the inputs by the front end).
    device : str
        ``auto``, ``cpu``, ``cuda[:N]`` or ``mps``.
    progress, cancel
        The progress sink (called with each training event) and the cancel token (``is_set()``).
    rescue : bool
        When the model could be saved nowhere asked, save it in the temporary folder (the CLI; the
        Fiji front end keeps it as the current model instead).

    Returns
    -------
    TrainedRound
    """
    from .annotations import rasterize
    from .runtime import resolve_device
    from .train import train

    if init is not None:
        if classes is not None and classes != init.classes:
            raise UserError(f"classes {','.join(classes)} differ from the warm-start model's {','.join(init.classes)}")
        classes = init.classes
    labels = rasterize(shapes, image.data.shape, classes=classes, all_slices=all_slices, group_names=group_names)
    log.info(
        "image %s %s; classes %s; %d ROI(s)",
        "x".join(map(str, image.data.shape)),
        image.data.dtype,
        ", ".join(labels.classes),
        len(shapes),
    )
    reservation = project.reserve_round() if project is not None else None
    try:
        result = train(
            image.data,
            labels,
            settings,
            init=init,
            device=str(resolve_device(device)),
            progress=progress,
            cancel=cancel,
            calibration=image.calibration.as_dict(),
        )
    except BaseException:
        if reservation is not None:
            project.release(reservation)
        raise
    return _save_round(result, out, project, reservation, image_path, rois_path, rescue)


def _save_round(result, out, project, reservation, image_path, rois_path, rescue) -> TrainedRound:
    """Save a trained model to its round (if any) and ``out`` (if any); a trained model is never discarded.

    What can be saved is saved first (the model in the reserved round folder, then ``out``), the round
    is registered last, and if anything fails the one error names every place the model went.
    """
    from .modelio import save_model

    done = TrainedRound(result)
    kept, problems = [], []
    if reservation is not None:
        try:
            kept.append(project.save_round_model(reservation, result.model, save_model))
        except UserError as exc:
            problems.append(str(exc))
            project.release(reservation)
    if out is not None:
        try:
            save_model(out, result.model)
            kept.append(out)
            done.saved.append(str(out))
        except UserError as exc:
            problems.append(str(exc))
    if reservation is not None and reservation.model_saved:
        try:
            done.record = project.add_round(
                result.model, image_path, rois_path, result.stop_reason, save_model, reservation=reservation
            )
            done.saved.insert(0, f"round {done.record['round']} of {project.root} ({done.record['model']})")
        except UserError as exc:
            problems.append(str(exc))
    if result.problem:  # e.g. a non-finite loss: the best finite model is saved, and the run still failed
        problems.append(result.problem)
    if problems:
        message = "; ".join(problems)
        unnamed = [str(k) for k in kept if str(k) not in message]
        if unnamed:
            message += f"; the trained model is saved in {' and '.join(unnamed)}"
        elif not kept and rescue:
            message += "; " + _rescue(result.model)
        done.error = message
    return done


def _rescue(model) -> str:
    """Save a model that could not go where it was asked to, in the temporary folder; says where."""
    from .modelio import save_model

    path = Path(tempfile.gettempdir()) / f"tem-ij-unsaved-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.model"
    try:
        save_model(path, model)
    except UserError as exc:
        return f"the trained model could not be saved anywhere ({exc})"
    return f"the trained model is saved as {path} (move it somewhere safe)"


def suggestion_size(model: TrainedModel | None, settings: Settings | None = None) -> int:
    """The window side of suggestions: the patch size the model was trained on, else the settings' patch size."""
    from .config import Settings

    if model is not None and model.meta.get("patch_size"):
        return int(model.meta["patch_size"])
    return (settings or Settings()).patches.size


def suggest_round(
    image: Image,
    shapes: list,
    model: TrainedModel | None,
    *,
    k: int = 5,
    size: int | None = None,
    settings: Settings | None = None,
    all_slices: bool = False,
    group_names: dict | None = None,
    probabilities: str | Path | None = None,
    device: str = "auto",
    progress: ProgressSink | None = None,
    cancel: CancelToken | None = None,
    **options,
) -> SuggestResult:
    """The next windows to annotate (:func:`tem_ij_plugin.suggest.suggest`) given what is annotated.

    Parameters
    ----------
    image : tem_ij_plugin.io.Image
    shapes : list of Shape
        The annotations so far; none is fine (suggestions then come from image statistics alone).
    model : TrainedModel or None
    k : int
        How many suggestions.
    size : int, optional
        The window side; default :func:`suggestion_size`.
    settings : Settings, optional
        Their patch size is the default window side for a session without a model.
    all_slices, group_names
        How the shapes become labels (:func:`tem_ij_plugin.annotations.rasterize`).
    probabilities : path, optional
        The model's probability map of this image, written earlier by ``tem-ij predict``
        (:class:`~tem_ij_plugin.io.ProbabilityPlanes`): scoring then skips the network's most
        expensive pass. Needs ``model``.
    device, progress, cancel, **options
        Passed on to :func:`~tem_ij_plugin.suggest.suggest` (``stride``, ``temperature``, ``seed``).

    Returns
    -------
    SuggestResult
    """
    from .annotations import rasterize
    from .io import ProbabilityPlanes
    from .suggest import suggest

    size = size or suggestion_size(model, settings)
    if size < 16:
        raise UserError(f"the suggestion window must be at least 16 pixels, not {size}")
    labels = None
    if shapes:
        classes = model.classes if model is not None else None
        labels = rasterize(shapes, image.data.shape, classes=classes, all_slices=all_slices, group_names=group_names)
    elif model is not None:
        log.warning("no annotations given: suggestions may fall on patches you already annotated")
    if probabilities is not None and model is None:
        raise UserError("probabilities from an earlier prediction need the model that made them")
    maps = None if probabilities is None else ProbabilityPlanes(probabilities, model.classes, image.data.shape)
    try:
        return suggest(
            image.data, None if labels is None else labels.labels, model, k=k, size=size, device=str(device),
            probabilities=maps, progress=progress, cancel=cancel, **options,
        )  # fmt: skip
    finally:
        if maps is not None:
            maps.close()


def doctor(write: Callable[[str], object] = print, probe_seconds: float = 5.0) -> str:
    """Python, torch, the device, versions and a short training-speed probe, with advice on what is missing.

    ``tem-ij doctor`` and TEM Check Environment both show this report.

    Parameters
    ----------
    write : callable
        The output sink: called with each line as soon as it is known (the probe takes a while).
    probe_seconds : float
        How long the speed probe trains.

    Returns
    -------
    str
        The whole report.
    """
    import torch

    from . import __version__

    lines = []

    def say(line: str) -> None:
        lines.append(line)
        write(line)

    say(f"tem_ij_plugin {__version__}")
    say(f"Python {sys.version.split()[0]} ({platform.platform()})")
    say(f"torch {torch.__version__}, numpy {np.__version__}")
    device, advice = _device_line(torch, say)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        advice.append("Optional: pip install onnxruntime makes prediction on the CPU faster.")
    rate = _speed_probe(torch, device, probe_seconds)
    say(f"speed probe: {rate:.1f} training steps/s (2 crops of 128x128, default network)")
    for line in ["", "What to do:" if advice else "Everything needed is installed."] + [f"- {a}" for a in advice]:
        say(line)
    return "\n".join(lines)


def _device_line(torch, say) -> tuple:
    """Say which device training would use; returns it and the advice so far."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        say(f"device: {props.name}, {props.total_memory / 2**30:.1f} GiB (CUDA {torch.version.cuda})")
        return torch.device("cuda"), []
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        say("device: Apple GPU (MPS)")
        return torch.device("mps"), []
    say(f"device: CPU only ({torch.get_num_threads()} threads)")
    return torch.device("cpu"), [
        "No GPU found: training runs on the CPU (minutes per round). With an NVIDIA GPU, install the CUDA "
        "build of PyTorch (https://pytorch.org/get-started/locally/) into this Python."
    ]


def _speed_probe(torch, device, seconds: float) -> float:
    """Training steps per second of the default network on two 128x128 crops."""
    from .config import Settings
    from .modelio import build_network

    arch = {"name": "RecurrentUNet", "in_channels": 1, "n_classes": 2, **Settings().model.model_dump()}
    net = build_network(arch).to(device)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    x = torch.randn(2, 1, 128, 128, device=device)
    y = torch.randint(0, 2, (2, 128, 128), device=device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n == 0:
        out = net(x)
        logits = out[-1] if isinstance(out, (list, tuple)) else out
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return n / (time.perf_counter() - start)
