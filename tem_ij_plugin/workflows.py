"""The use cases every front end shares: the CLI, the Fiji commands and, next, the Qt panel and dask.

Each takes plain inputs (arrays, shapes, settings, paths, a progress sink and a cancel token) and
returns a typed result; a front end only translates its arguments and shows what comes back, so the
same inputs give the same model whichever front end asked.
"""

from __future__ import annotations

import contextlib
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
from .events import CancelToken, ProgressSink, check_cancel

if TYPE_CHECKING:
    from collections.abc import Callable

    from .annotations import Labels
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
    label_image: Labels | None = None,
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
        The annotations (named ROIs); may be empty with ``label_image``.
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
    label_image : Labels, optional
        Labels painted elsewhere (:func:`tem_ij_plugin.annotations.labels_from_image`), in the classes
        of ``init`` when given; the shapes add to them (a pixel they disagree on is left unlabelled).
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
    from .runtime import resolve_device
    from .train import train

    if init is not None:
        if classes is not None and classes != init.classes:
            raise UserError(f"classes {','.join(classes)} differ from the warm-start model's {','.join(init.classes)}")
        classes = init.classes
    labels = _round_labels(image, shapes, classes, label_image, all_slices, group_names)
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


def read_label_file(path: str | os.PathLike, classes: list | None) -> Labels:
    """A label image as partial labels, a Labkit labeling, or cellpose's masks as labels of every pixel.

    Parameters
    ----------
    path : path
        A label image (Trainable Weka Segmentation, ilastik, napari, Labkit's exported label image:
        0 unlabelled, value k the k-th class); a Labkit labeling (``NAME.labeling``, or ``NAME.tif``
        with ``NAME.tif.labels`` beside it), whose label names give the classes (see
        :func:`~tem_ij_plugin.labkit_files.read_labkit`); or cellpose's ``NAME_seg.npy`` /
        ``NAME_cp_masks.tif`` / ``NAME_masks.tif`` (see
        :func:`~tem_ij_plugin.cellpose_files.labels_from_masks`).
    classes : list of str, optional
        The class of each value; for a Labkit labeling the allowed classes in order (default: its
        label names); for cellpose masks the outside and the cell class (default ``background, cell``).

    Raises
    ------
    UserError
        An unreadable or hostile file, values beyond the classes, or classes missing.
    """
    from .annotations import labels_from_image
    from .cellpose_files import is_cellpose_masks, labels_from_masks, read_seg_masks
    from .io import read_image
    from .labkit_files import is_labkit, read_labkit

    if is_labkit(path):
        return read_labkit(path, classes)
    if is_cellpose_masks(path):
        suffix = Path(path).suffix.lower()
        masks = read_seg_masks(path) if suffix == ".npy" else read_image(path).data
        return labels_from_masks(masks, classes or ["background", "cell"])
    if not classes:
        raise UserError(f"name the classes of the values 1, 2, ... of {path} with --classes, e.g. background,cell")
    return labels_from_image(read_image(path).data, classes)


def _round_labels(image, shapes, classes, label_image, all_slices, group_names):
    """The shapes rasterised, a label image, or both merged."""
    from .annotations import merge_labels, rasterize

    how = {"all_slices": all_slices, "group_names": group_names, "stack": image.stack}
    if label_image is None:
        return rasterize(shapes, image.data.shape, classes=classes, **how)
    if label_image.labels.shape != image.data.shape:
        raise UserError(
            f"the label image is {'x'.join(map(str, label_image.labels.shape))} but the image "
            f"{'x'.join(map(str, image.data.shape))} (planes x height x width): paint the labels on this image"
        )
    if classes is not None and classes != label_image.classes:
        raise UserError(f"the label image's classes {','.join(label_image.classes)} differ from {','.join(classes)}")
    if not shapes:
        return label_image
    return merge_labels(
        rasterize(shapes, image.data.shape, classes=label_image.classes, min_classes=1, **how), label_image
    )


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


IMAGE_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
DEFAULT_NAME = "{name}-{kind}.tif"  # what Fiji's TEM Apply Model To Stack has always written
_GLOB = set("*?[")


@dataclass
class BatchResult:
    """What :func:`predict_files` wrote and what an interrupted run had finished already.

    Attributes
    ----------
    written, skipped : list of Path
        The outputs written now, and those skipped with resume because they record this very job.
    summaries : list of str
        One line per file written.
    """

    written: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    summaries: list = field(default_factory=list)


def is_image_path(path: Path) -> bool:
    """Whether ``path`` names one image: a file, or an OME-Zarr folder (``NAME.zarr``)."""
    return path.is_file() or (path.is_dir() and path.suffix.lower() == ".zarr")


def expand_images(paths: list) -> list[Path]:
    """Images named directly, the TIFFs of a folder (sorted, not recursive) or the matches of a quoted glob.

    Prediction outputs (files that record the prediction job that wrote them) are left out of a folder
    or a glob, so that a second run over a folder holding its own results does not predict them.

    Raises
    ------
    UserError
        A path that is neither a file, a folder nor a glob with matches; a folder with no TIFF.
    """
    import glob

    from .stackio import recorded_job

    found: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if is_image_path(p):
            found.append(p)
            continue
        if p.is_dir():
            listed = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            what = f"{p} holds no TIFF image (.tif, .tiff, .btf)"
        elif _GLOB & set(str(raw)):
            listed = sorted(Path(f) for f in glob.glob(str(p)) if is_image_path(Path(f)))
            what = f"no file matches {raw}"
        else:
            raise UserError(f"{raw}: no such file or folder")
        listed = [f for f in listed if recorded_job(f) is None]
        if not listed:
            raise UserError(what)
        found += listed
    # Once each (by the file they resolve to), in order, named as given: a symlinked image keeps its name.
    seen: set = set()
    unique = []
    for f in found:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def output_names(images: list[Path], out_dir: Path, name: str, kind: str) -> list[Path]:
    """The output of each image: ``out_dir`` / ``name``, ``{name}`` the image's name, ``{kind}`` what the file holds.

    ``{kind}`` is ``labels`` or ``probabilities`` (also for ``both``, whose labels go beside the named
    file as ``NAME_labels``, or into an OME-Zarr's ``labels/classes``).

    Raises
    ------
    UserError
        An unknown placeholder, a template without ``{name}`` for several images, or two images whose
        outputs would have the same name.
    """
    import string

    from .apply import labels_path
    from .stackio import split_name

    bad = UserError(
        f"the output name '{name}' is not a template of a file name with {{name}} (the image's name) and "
        "{kind} (probabilities or labels), e.g. '{name}-{kind}.tif'"
    )
    try:
        parts = list(string.Formatter().parse(name))
    except ValueError:  # unbalanced braces
        raise bad from None
    if (
        any(f not in (None, "name", "kind") or spec or conv for _, f, spec, conv in parts)
        or "/" in name
        or "\\" in name
    ):
        raise bad
    holds = "labels" if kind == "labels" else "probabilities"
    outs = [out_dir / name.format(name=split_name(image)[0], kind=holds) for image in images]
    if any(o.name in ("", ".", "..") for o in outs):
        raise UserError(f"the output name '{name}' gives an empty file name")
    # Case-insensitive disks (macOS, Windows) fold names; --kind both also writes NAME_labels beside each
    # (inside each OME-Zarr image: NAME.zarr/labels/classes).
    written = [
        str(p.relative_to(out_dir)).casefold() for o in outs for p in ([o, labels_path(o)] if kind == "both" else [o])
    ]
    clash = sorted({n for n in written if written.count(n) > 1})
    if clash:
        raise UserError(
            f"several images would be written to {', '.join(clash[:5])}; give a name template with {{name}} "
            "(--name '{name}-probabilities.tif') or images with different names"
        )
    return outs


def predict_files(
    model_path: str | os.PathLike,
    images: list,
    out_dir: str | os.PathLike,
    name: str = DEFAULT_NAME,
    kind: str = "probabilities",
    resume: bool = False,
    overwrite: bool = False,
    on_file: Callable[[int, int, Path], object] | None = None,
    progress: ProgressSink | None = None,
    cancel: CancelToken | None = None,
    **options,
) -> BatchResult:
    """One model applied to many images, each to its own output in ``out_dir``; the model loaded once.

    Parameters
    ----------
    images : list of path
        Files, folders or globs (see :func:`expand_images`).
    name : str
        The output name template (see :func:`output_names`); its suffix picks the format.
    resume : bool
        Skip outputs that record this very job (a finished file of an interrupted batch) and complete
        the file that was being written.
    on_file : callable, optional
        ``(i, n, image)`` before each image, 1-based.
    options
        :class:`~tem_ij_plugin.apply.PredictJob` options (``dtype``, ``classes``, ``device``, ...).

    Raises
    ------
    Cancelled
        With how many files were done; the file being written keeps its finished planes for resume.
    """
    from .apply import PredictJob, SharedModel
    from .errors import Cancelled
    from .predict import RELEASE_EVERY_PLANES
    from .runtime import PeriodicRelease, resolve_device, reuse_freed_memory

    files = expand_images(list(images))
    out_dir = Path(out_dir)
    outs = output_names(files, out_dir, name, kind)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output folder {out_dir}: {exc.strerror or exc}") from exc
    shared, result = SharedModel(), BatchResult()
    # The memory one file's prediction frees serves the next file's (on the CPU), handed back to the system
    # as often as within a stack: each file's first tiles need not fault their pages in afresh.
    on_cpu = resolve_device(options.get("device") or "auto").type == "cpu"
    releases = PeriodicRelease(RELEASE_EVERY_PLANES, enabled=on_cpu)
    with reuse_freed_memory(enabled=on_cpu):
        for i, (image, out) in enumerate(zip(files, outs), 1):
            job = PredictJob(
                model_path, image, out, kind=kind, resume=resume, overwrite=overwrite, inputs=files, shared=shared,
                **options,
            )  # fmt: skip
            if resume and job.already_done():  # finished by the interrupted run, as the file itself records
                result.skipped.append(out)
                continue
            if on_file is not None:
                on_file(i, len(files), image)
            try:
                result.summaries.append(job.run(progress=progress, cancel=cancel))
            except Cancelled:
                raise Cancelled(
                    f"{len(result.written) + len(result.skipped)} of {len(files)} file(s) done, {job.planes_done} "
                    f"of {job.n_planes} plane(s) of {image.name}"
                ) from None
            result.written.append(out)
            releases.done(job.n_planes)
    return result


def export_model(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    image_path: str | os.PathLike | None = None,
    name: str | None = None,
    license_id: str = "CC-BY-4.0",
    overwrite: bool = False,
):
    """A model file as a bioimage.io model package (see :func:`tem_ij_plugin.zoo.export_package`).

    Raises
    ------
    UserError
        An output that is not a ``.zip``, touches an input or replaces a file we did not write.
    """
    from .outputs import OutputPlan
    from .zoo import export_package

    if Path(out).suffix.lower() != ".zip":
        raise UserError(f"{out}: a bioimage.io package is a .zip file; name it e.g. cells.zip")
    OutputPlan([model_path, image_path], overwrite=overwrite).output(out)
    return export_package(model_path, out, image_path, name, license_id)


@contextlib.contextmanager
def model_file(path: str | os.PathLike):
    """A model file to load: ``path`` itself, or the ``.model`` a bioimage.io package of ours carries.

    A context manager: an extracted model lives in a temporary folder until the block ends.

    Raises
    ------
    UserError
        A package that tem_ij_plugin did not export (not supported yet), or a damaged one.
    """
    from .zoo import extract_model, is_package

    if not is_package(path):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="tem-ij-package-") as tmp:
        yield extract_model(path, tmp)


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
        labels = rasterize(
            shapes, image.data.shape, classes=classes, all_slices=all_slices, group_names=group_names, stack=image.stack
        )
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


@dataclass
class FoundObjects:
    """What :func:`find_objects` found and wrote.

    Attributes
    ----------
    class_name : str
    count : int
        Objects over every plane.
    n_planes : int
    rows, summary : list of dict
        The object table and the per-slice table (:func:`tem_ij_plugin.objects.measure`,
        :func:`~tem_ij_plugin.objects.slice_summary`).
    rois : list of EncodedRoi
        One outline per object, named ``CLASS-ID``, with its slice position on a stack, as the bytes
        of its ``.roi`` file (:class:`~tem_ij_plugin.objects.EncodedRoi`).
    unit : str
        The calibration unit of areas and lengths (``pixel`` when uncalibrated).
    written : list of Path
    seconds : float
    """

    class_name: str
    count: int
    n_planes: int
    rows: list
    summary: list
    rois: list
    unit: str
    written: list = field(default_factory=list)
    seconds: float = 0.0


def object_class(classes: list, name: str | None) -> int:
    """The index of the class to cut objects from; the one class that is not background when not named."""
    if name is None:
        rest = [c for c in classes if c != "background"]
        if len(rest) != 1:
            raise UserError(f"name the class to find objects of (--class): one of {', '.join(classes)}")
        name = rest[0]
    name = name.strip().lower()
    if name not in classes:
        raise UserError(f"there is no class '{name}': the classes are {', '.join(classes)}")
    return classes.index(name)


def objects_in_planes(
    planes: Callable[[int], np.ndarray],
    n_planes: int,
    class_index: int,
    class_name: str,
    settings=None,
    image: Callable[[int], np.ndarray] | None = None,
    calibration=None,
    slice_labels=(),
    sink: Callable[[int, np.ndarray], object] | None = None,
    progress: ProgressSink | None = None,
    cancel: CancelToken | None = None,
    segment: Callable[[int, np.ndarray], np.ndarray] | None = None,
    roi_prefix: str | None = None,
) -> FoundObjects:
    """Objects, measurements and outlines of every plane; ids run on over the stack.

    Parameters
    ----------
    planes : callable
        ``z -> (C, Y, X)`` class probabilities of plane ``z``.
    image : callable, optional
        ``z -> (Y, X)`` the image plane, for the intensity columns.
    sink : callable, optional
        ``(z, labels)`` for each plane's label image, ids already unique over the stack (int64).
    segment : callable, optional
        ``(z, probabilities) -> labels`` instead of :func:`~tem_ij_plugin.objects.label_plane`.
    roi_prefix : str, optional
        ROI names ``PREFIX-ID`` (default the class name).
    """
    from .io import Calibration
    from .objects import label_plane, measure, object_outlines, object_roi, slice_summary

    t0, cal = time.perf_counter(), calibration or Calibration()
    rows, rois, count, shape = [], [], 0, None
    for z in range(n_planes):
        check_cancel(cancel)
        probs = planes(z)
        shape = probs.shape[1:]
        labels = segment(z, probs) if segment else label_plane(probs, class_index, settings)
        label = slice_labels[z] if z < len(slice_labels) else ""
        img = image(z) if image is not None else None
        rows += measure(labels, z, cal, img, probs[class_index], label, first_id=count)
        for i, xy in object_outlines(labels).items():
            rois.append(object_roi(xy, f"{roi_prefix or class_name}-{count + i}", z + 1 if n_planes > 1 else 0))
        if sink is not None:
            sink(z, np.where(labels > 0, labels.astype(np.int64) + count, 0))
        count += int(labels.max())
        if progress is not None:
            progress({"stage": "objects", "plane": z + 1, "planes": n_planes})
    summary = slice_summary(rows, n_planes, int(np.prod(shape)), slice_labels)
    return FoundObjects(class_name, count, n_planes, rows, summary, rois, cal.unit, seconds=time.perf_counter() - t0)


def find_objects(
    *,
    model_path: str | os.PathLike | None = None,
    image_path: str | os.PathLike | None = None,
    probabilities: str | os.PathLike | None = None,
    class_name: str | None = None,
    out: str | os.PathLike | None = None,
    measure: str | os.PathLike | None = None,
    rois: str | os.PathLike | None = None,
    options: dict | None = None,
    channel: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: ProgressSink | None = None,
    cancel: CancelToken | None = None,
    cellpose_model: str | os.PathLike | None = None,
    proposals: bool = False,
) -> FoundObjects:
    """Objects of one class of a model's prediction, or of a probability map written earlier, plane by plane.

    Parameters
    ----------
    model_path, image_path
        A model and the image to predict; or ``probabilities`` (from ``tem-ij predict``), with
        ``image_path`` optional (it gives the intensity columns).
    class_name : str, optional
        Default: the one class that is not ``background``.
    out : path, optional
        The instance label image: ImageJ TIFF (16-bit, or 32-bit beyond 65535 objects), ``.btf`` or
        ``.zarr``, with the image's calibration and slice labels; or ``NAME_seg.npy`` for cellpose's GUI.
    measure : path, optional
        ``NAME.csv`` (one row per object) and ``NAME-slices.csv`` (one row per plane).
    rois : path, optional
        A RoiSet.zip of the outlines (``CLASS-ID``).
    options : dict, optional
        :class:`~tem_ij_plugin.objects.ObjectSettings` fields; the minimum area defaults to
        :meth:`~tem_ij_plugin.objects.ObjectSettings.for_annotations`: a quarter of the median annotated
        piece of the class, as the model (or the map's job record) gives it, at least 1/1024 of the patch.
    cellpose_model : path, optional
        The user's cellpose model file: its masks on the image, cut to the class
        (:func:`~tem_ij_plugin.objects.within_class`), instead of the watershed.
    proposals : bool
        Name the ROIs ``proposal-N``: outlines to review, which training ignores until renamed.

    Raises
    ------
    UserError
        Bad input (a class the model lacks, a probability file that is not ours, sizes that differ),
        or an output that would touch an input or a file we did not write.
    """
    from .annotations import PROPOSAL_PREFIX
    from .objects import ObjectSettings, objects_paths, write_measurements, write_object_rois
    from .outputs import OutputPlan

    if (model_path is None) == (probabilities is None):
        raise UserError("give a model and an image, or a probability map from `tem-ij predict`")
    if model_path is not None and image_path is None:
        raise UserError("a model needs the image to find objects in")
    plan = OutputPlan([model_path, image_path, probabilities, cellpose_model], overwrite=overwrite)
    targets = [out] if out else []
    targets += objects_paths(measure) if measure else []
    targets += [rois] if rois else []
    if not targets:
        raise UserError("nothing to write: give a label image (-o), a table (--measure) or ROIs (--rois)")
    from .stackio import refuse_label_group_output

    for t in targets:
        refuse_label_group_output(Path(t))
        plan.output(t)
    if out:
        from .outputs import written_by_us
        from .stackio import _zarr, output_format, partial_path

        if not Path(out).name.lower().endswith(".npy") and output_format(Path(out)) == "zarr":
            _zarr()  # said before any object is computed

        work = partial_path(Path(out))
        plan.add(work, f"unfinished {Path(out).name}", replace=not work.exists() or written_by_us(work))
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(_ObjectSource(model_path, image_path, probabilities, channel, device))
        index = object_class(src.classes, class_name)
        s = ObjectSettings.for_annotations(src.patch_size, src.object_areas, src.classes[index], **(options or {}))
        segment = _cellpose_segment(cellpose_model, src, index, s, device) if cellpose_model else None
        labels = stack.enter_context(_LabelStore(Path(out), src, image_path)) if out else None
        found = objects_in_planes(
            src.planes, src.n_planes, index, src.classes[index], s, src.image, src.calibration, src.slice_labels,
            sink=labels.put if labels else None, progress=progress, cancel=cancel, segment=segment,
            roi_prefix=PROPOSAL_PREFIX if proposals else None,
        )  # fmt: skip
        if labels is not None:
            found.written.append(labels.finish(found.count))
    if measure:
        found.written += write_measurements(measure, found.rows, found.summary, found.unit)
    if rois:
        write_object_rois(rois, found.rois)
        found.written.append(Path(rois))
    return found


def _cellpose_segment(path, src, index: int, settings, device: str) -> Callable:
    """``(z, probabilities) -> labels``: the cellpose model's masks of image plane ``z``, cut to the class."""
    from .cellpose_model import CellposeSegmenter
    from .objects import within_class
    from .runtime import resolve_device

    if src.image is None:
        raise UserError("cellpose segments the image: give --image with a probability map")
    segmenter = CellposeSegmenter(path, str(resolve_device(device)))
    return lambda z, probs: within_class(segmenter(src.image(z)), probs, index, settings)


class _ObjectSource:
    """Per plane: the class probabilities (a model's prediction or a map from disk) and the image plane."""

    def __init__(self, model_path, image_path, probabilities, channel, device):
        from .io import PlaneReader

        self._readers: list = []
        self.image = None
        try:
            if model_path is not None:
                self._from_model(model_path, image_path, channel, device)
            else:
                self._from_map(probabilities)
                if image_path is not None:
                    self._add_image(PlaneReader(image_path, channel=channel))
        except BaseException:
            self.close()
            raise

    def _from_model(self, model_path, image_path, channel, device) -> None:
        from .apply import image_predictor, load_segmenter
        from .io import PlaneReader

        model = load_segmenter(model_path, device)
        reader = PlaneReader(image_path, channel=channel)
        self._readers.append(reader)
        predictor, lo, hi = image_predictor(model, reader, device)
        self.classes, self.patch_size = list(model.classes), suggestion_size(model)
        self.object_areas = model.meta.get("object_areas")
        self._describe(reader, reader.slice_labels)
        self.image = reader.read
        self.planes = lambda z: predictor.plane(reader.read(z), normalization=(lo, hi))

    def _from_map(self, path) -> None:
        from .io import PlaneReader, ProbabilityPlanes, probability_classes
        from .stackio import recorded_job

        self.classes, self.patch_size = probability_classes(path), _recorded_patch_size(Path(path))
        self.object_areas = (recorded_job(Path(path)) or {}).get("object_areas")  # checked where it is used
        first = PlaneReader(path, channel=1)
        self._readers.append(first)
        maps = ProbabilityPlanes(path, self.classes, (first.n_planes, *first.plane_shape))
        self._readers.append(maps)
        # predict labels each channel's planes "CLASS: SLICE LABEL" (or "CLASS" without slice labels)
        labels = [label.split(": ", 1)[1] if ": " in label else "" for label in first.slice_labels]
        self._describe(first, labels if any(labels) else [])
        self.planes = maps

    def _add_image(self, reader) -> None:
        self._readers.append(reader)
        if (reader.n_planes, *reader.plane_shape) != (self.n_planes, *self.plane_shape):
            raise UserError(
                f"{reader.path} holds {reader.n_planes} plane(s) of {reader.plane_shape[1]}x{reader.plane_shape[0]} "
                f"but the probability map {self.n_planes} of {self.plane_shape[1]}x{self.plane_shape[0]}: give "
                "the image the map was predicted from"
            )
        self.calibration, self.slice_labels = reader.calibration, reader.slice_labels or self.slice_labels
        self.image = reader.read

    def _describe(self, reader, slice_labels) -> None:
        self.n_planes, self.plane_shape = reader.n_planes, tuple(reader.plane_shape)
        self.stack_axes, self.stack_shape = reader.stack_axes, tuple(reader.stack_shape)
        self.calibration, self.slice_labels = reader.calibration, list(slice_labels)

    def close(self) -> None:
        for r in self._readers:
            r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _recorded_patch_size(path: Path) -> int:
    """The patch size of the model that wrote a probability map (its job record), else the default."""
    from .stackio import recorded_job

    size = (recorded_job(path) or {}).get("patch_size")
    if isinstance(size, int) and not isinstance(size, bool) and 16 <= size <= 1 << 16:
        return size
    log.info("%s does not record the model's patch size: defaults assume %d px patches", path, suggestion_size(None))
    return suggestion_size(None)


class _LabelStore:
    """A stack's label planes kept on disk until the object count fixes the type (16- or 32-bit), then written.

    Planes go through plain reads and writes of a scratch file, not a memory map: the pages of a map
    count in the process's resident memory once touched, which grew with the stack (4 planes of
    2048x2048: 377 MB, 40 planes: 1023 MB, measured with ``benchmarks/objects.py --memory``).
    """

    def __init__(self, out: Path, src: _ObjectSource, image_path=None):
        self.out, self.src, self.image_path = out, src, image_path
        self.plane_shape = tuple(src.plane_shape)
        fd, name = tempfile.mkstemp(dir=out.parent if str(out.parent) else ".", prefix=f".{out.name}.", suffix=".raw")
        self.tmp = Path(name)
        self.file = os.fdopen(fd, "w+b")

    def put(self, z: int, labels: np.ndarray) -> None:
        try:
            self.file.seek(z * self._plane_bytes)
            self.file.write(np.ascontiguousarray(labels, np.uint32).tobytes())
        except OSError as exc:
            raise UserError(f"cannot keep the label planes next to {self.out}: {exc.strerror or exc}") from exc

    def plane(self, z: int) -> np.ndarray:
        """Label plane ``z`` as uint32 (Y, X)."""
        self.file.seek(z * self._plane_bytes)
        return np.frombuffer(self.file.read(self._plane_bytes), np.uint32).reshape(self.plane_shape)

    @property
    def _plane_bytes(self) -> int:
        return 4 * self.plane_shape[0] * self.plane_shape[1]

    def finish(self, count: int) -> Path:
        """Write the label image (uint16 up to 65535 objects, else ImageJ's 32-bit float, exact to 2**24).

        ``NAME_seg.npy`` is written for cellpose's GUI instead (16- or 32-bit integers; the whole stack
        in memory, as cellpose's GUI holds it).
        """
        from .cellpose_files import SEG_SUFFIX, write_seg_npy
        from .stackio import Layout, open_writer

        if count >= 1 << 24:
            raise UserError(
                f"{count} objects are more than a label image holds exactly (16777215); raise the minimum area"
            )
        if self.out.name.lower().endswith(SEG_SUFFIX):
            masks = np.stack([self.plane(z) for z in range(self.src.n_planes)])
            write_seg_npy(self.out, masks, self.image_path)
            return self.out
        dtype = np.dtype(np.uint16 if count <= 65535 else np.float32)
        src = self.src
        layout = Layout(src.stack_axes, src.stack_shape, None, src.plane_shape, dtype)
        writer = open_writer(self.out, layout, src.calibration, labels=src.slice_labels or None)
        try:
            for z in range(src.n_planes):
                writer.write(z, self.plane(z).astype(dtype))
        except BaseException:
            from .outputs import remove_output

            writer.close()
            remove_output(writer.work)  # a label image is recomputed, never resumed
            raise
        writer.finish()
        return self.out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()
        self.tmp.unlink(missing_ok=True)
