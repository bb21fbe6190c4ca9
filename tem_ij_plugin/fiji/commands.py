"""The menu commands of ``plugin.yml``: each takes a :class:`~tem_ij_plugin.fiji.bridge.Context`.

They read the current image and ROIs, call the engine and return new images, ROIs or files. The
user's image pixels and ROIs are never changed; suggestions and the patch grid are drawn in the
image's overlay.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scyjava import jimport

from ..errors import Cancelled, UserError
from .convert import to_image, to_imageplus, to_shapes, write_roiset

if TYPE_CHECKING:
    from .bridge import Context

log = logging.getLogger(__name__)

SUGGEST_PREFIX = "suggest-"
GRID_NAME = "tem-grid"
TIFF_SUFFIXES = (".tif", ".tiff", ".btf")


def _java_color(name: str):
    return getattr(jimport("java.awt.Color"), name)


# -- shared pieces -----------------------------------------------------------------------------------
def _field(cls, name: str, obj):
    field = cls.getDeclaredField(name)
    field.setAccessible(True)
    return field, field.get(obj)


def roi_manager(ctx: Context, create: bool = False):
    """The ROI Manager that the macro calling this command sees (None if there is none and not ``create``).

    A visible ROI Manager is shared by everyone. In batch mode each macro interpreter keeps a hidden one
    of its own, and a menu command, being a macro file, runs in a new interpreter: the bridge notes the
    calling interpreter as the command starts (``Bridge.caller``). ImageJ keeps the manager in a
    package-private field, hence reflection.
    """
    RoiManager = jimport("ij.plugin.frame.RoiManager")
    Interpreter = jimport("ij.macro.Interpreter")
    # Not getInstance(): in batch mode it creates an empty hidden manager for our own interpreter
    manager = RoiManager.getRawInstance()
    if manager is not None or not Interpreter.isBatchMode():
        return manager if manager is not None or not create else RoiManager.getRoiManager()
    caller = ctx.bridge.caller()
    if caller is None:
        return RoiManager(True) if create else None
    _, functions = _field(Interpreter.class_, "func", caller)
    field, manager = _field(jimport("ij.macro.Functions").class_, "roiManager", functions)
    if manager is None and create:
        manager = RoiManager(True)
        field.set(functions, manager)
    return manager


def _manager_rois(ctx) -> list:
    manager = roi_manager(ctx)
    rois = list(manager.getRoisAsArray()) if manager is not None else []
    # Our own suggestions are not annotations until the user renames them
    return [r for r in rois if not str(r.getName() or "").startswith(SUGGEST_PREFIX)]


def _annotation_rois(ctx) -> tuple:
    """The annotation ROIs (from ``rois=`` or the ROI Manager) as Java ROIs and shapes."""
    path = ctx.text("rois")
    if path:
        from ..io import read_rois

        return None, read_rois(path)
    rois = _manager_rois(ctx)
    if not rois:
        raise UserError(
            "the ROI Manager has no annotations: outline a few cells and some background with the polygon tool, "
            "add each with 't', and name them cell-1, background-1, ... (or give rois=[path/RoiSet.zip])"
        )
    return rois, to_shapes(rois)


def _labels(ctx, image, shapes, classes=None):
    from ..annotations import rasterize

    all_slices = ctx.options.get("all") is True
    return rasterize(shapes, image.data.shape, classes=classes, all_slices=all_slices, stack=image.stack)


def _current_model(ctx):
    model = ctx.bridge.model
    if model is None:
        raise UserError("there is no current model: run TEM Train Model or TEM Load Model first")
    return model


def _device(ctx):
    from ..runtime import resolve_device

    return resolve_device(ctx.choice("device"))


def _show(ctx, imp) -> None:
    imp.show()
    ctx.results.setdefault("images", []).append(str(imp.getTitle()))


def _activate(imp) -> None:
    """Make ``imp`` the current image again, for the user and for the calling macro's thread."""
    WindowManager = jimport("ij.WindowManager")
    window = imp.getWindow()
    if window is not None:
        WindowManager.setCurrentWindow(window)
        window.toFront()
    WindowManager.setTempCurrentImage(imp)


def _stem(imp) -> str:
    title = str(imp.getTitle())
    for suffix in TIFF_SUFFIXES + (".png",):
        if title.lower().endswith(suffix):
            return title[: -len(suffix)]
    return title


def _path_option(ctx, key: str, title: str, save: bool, default_name: str = "") -> Path:
    """A file path from the options, or from a file chooser when a person clicked the menu."""
    text = ctx.text(key)
    if not text and ctx.interactive:
        if save:
            dialog = jimport("ij.io.SaveDialog")(title, default_name, ".model")
        else:
            dialog = jimport("ij.io.OpenDialog")(title, None)
        if dialog.getFileName() is None:
            raise UserError("no file chosen")
        text = str(dialog.getDirectory()) + str(dialog.getFileName())
    if not text:
        raise UserError(f"{ctx.command.name} needs {key}=[path]")
    return Path(text).expanduser()


def _predict_progress(ctx, label: str):
    def progress(ev):
        frac = (ev["done"] + ev["tiles_done"] / max(ev["tiles_total"], 1)) / max(ev["total"], 1)
        ctx.status(f"{label}: plane {ev['plane']}/{ev['planes']}, {ev['megapixels_per_s']:.2f} MP/s", frac)

    return progress


class TrainingPlot:
    """A live ImageJ plot of training loss and validation score that the user can keep."""

    def __init__(self, title: str, every_s: float = 1.0):
        self.title, self.every_s = title, every_s
        self.iterations, self.loss, self.val_it, self.val = [], [], [], []
        self.best = None
        self.window = None
        self._last = 0.0

    def add(self, ev: dict) -> None:
        """Record one training event: its loss, its validation score when one ran, and the best model so far."""
        self.iterations.append(ev["iteration"])
        self.loss.append(ev["train_loss"] if ev["train_loss"] is not None else np.nan)
        if ev.get("validated") and ev["val_score"] is not None:
            self.val_it.append(ev["iteration"])
            self.val.append(ev["val_score"])
        if ev["best_iteration"] is not None and ev["best_score"] is not None:
            self.best = (ev["best_iteration"], ev["best_score"])

    def plot(self):
        """An ``ij.gui.Plot`` of the recorded losses, validation scores and best model."""
        from jpype import JArray, JDouble

        Plot = jimport("ij.gui.Plot")
        plot = Plot(self.title, "iteration", "loss / validation score")
        plot.setColor(_java_color("gray"))
        plot.addPoints(JArray(JDouble)(self.iterations), JArray(JDouble)(self.loss), Plot.LINE)
        if self.val:
            blue = _java_color("blue")
            plot.setColor(blue, blue)  # the second colour draws the connecting lines (black otherwise)
            plot.addPoints(JArray(JDouble)(self.val_it), JArray(JDouble)(self.val), Plot.CONNECTED_CIRCLES)
        if self.best is not None:
            plot.setColor(_java_color("red"))
            plot.addPoints(JArray(JDouble)([self.best[0]]), JArray(JDouble)([self.best[1]]), Plot.BOX)
        legend = "training loss\tvalidation score"
        if self.best is not None:
            # the model is chosen on the smoothed score, which can sit below a single noisy validation
            legend += f"\tbest model (smoothed score {self.best[1]:.3f} at {self.best[0]})"
        plot.setColor(_java_color("black"))
        plot.setLegend(legend, Plot.AUTO_POSITION)
        plot.setLimitsToFit(False)
        return plot

    def draw(self, force: bool = False) -> None:
        """Show or redraw the plot, at most once every ``every_s`` seconds unless ``force``."""
        now = time.monotonic()
        if not self.iterations or (not force and now - self._last < self.every_s):
            return
        self._last = now
        plot = self.plot()
        if self.window is None or not self.window.isVisible():
            self.window = plot.show()
        else:
            self.window.drawPlot(plot)


# -- commands ----------------------------------------------------------------------------------------
def train_model(ctx: Context) -> None:
    """TEM Train Model."""
    from ..config import Settings, load_settings

    bridge = ctx.bridge
    settings_path = ctx.text("settings")
    settings = load_settings(settings_path) if settings_path else (bridge.settings or Settings())
    settings = settings.model_copy(deep=True)
    settings.train.max_minutes = ctx.number("max", low=0.05)
    device = _device(ctx)
    image = to_image(ctx.image)
    rois, shapes = _annotation_rois(ctx)
    project, init = _warm_start(ctx)
    if not bridge.training.acquire(blocking=False):
        raise UserError("a training is already running; stop it with TEM Stop Training first")
    plot = None if ctx.batch else TrainingPlot(f"TEM training: {ctx.image.getTitle()}")
    try:
        bridge.stop.clear()
        bridge.progress = None
        done = _train_round(ctx, image, rois, shapes, settings, init, project, device, _train_progress(ctx, plot))
    finally:
        bridge.training.release()
        bridge.stop.clear()
    result = done.result
    bridge.model = result.model
    bridge.model_path = project.root / done.record["model"] if done.record is not None else None
    if plot is not None:
        plot.draw(force=True)
        _activate(ctx.image)  # the plot window took the focus; the next command must see the image
    summary = f"TEM Train Model: {result.summary()}; classes {', '.join(result.model.classes)}"
    if done.record is not None:
        summary += f"; saved as round {done.record['round']} of {project.root}"
    jimport("ij.IJ").log(summary)
    ctx.status(summary)
    if done.error:  # the model is kept as the current model; the command still failed
        raise UserError(f"{done.error}; the trained model is the current model (TEM Save Model keeps it)")
    ctx.results.update(
        stop_reason=result.stop_reason,
        iterations=result.model.last_round["iterations"],
        classes=result.model.classes,
        train_patches=len(result.train_patches),
        val_patches=len(result.val_patches),
    )
    _show_trained(ctx, image, device, result.model.classes)


def _warm_start(ctx: Context) -> tuple:
    """(project or None, the model a training from this dialog warm-starts from, or None).

    The project's current round wins over the model in memory; ``new`` starts from neither.
    """
    from ..modelio import load_model as read_model
    from ..workflows import warm_start_path

    project = None
    init = None if ctx.options.get("new") else ctx.bridge.model
    if ctx.text("project"):
        from ..project import Project

        project = Project.open(ctx.text("project"), create=True)
        warm = None if ctx.options.get("new") else warm_start_path(project)
        if warm is not None:
            init = read_model(warm)
    return project, init


def _train_round(ctx, image, rois, shapes, settings, init, project, device, progress):
    """The shared training use case, with the ROI Manager's annotations kept as the round's RoiSet.zip."""
    from ..workflows import train_round

    info = ctx.image.getOriginalFileInfo()
    saved = info is not None and info.directory is not None and info.fileName is not None
    image_path = Path(str(info.directory), str(info.fileName)) if saved else None
    with tempfile.TemporaryDirectory() as tmp:
        roiset = Path(ctx.text("rois")) if rois is None else Path(tmp) / "RoiSet.zip"
        if rois is not None and project is not None:
            write_roiset(roiset, rois)
        return train_round(
            image,
            shapes,
            settings,
            init=init,
            all_slices=ctx.options.get("all") is True,
            project=project,
            image_path=image_path,
            rois_path=roiset,
            device=str(device),
            progress=progress,
            cancel=ctx.cancel,
            rescue=False,
        )


def _train_progress(ctx, plot):
    """The progress sink of a training: ImageJ's status and progress bars, and the live plot."""

    def progress(ev):
        ctx.bridge.progress = ev
        stage = "training" if ev["stage"] == "train" else "refit on every patch"
        ctx.status(
            f"TEM {stage}: iteration {ev['iteration']}, loss {ev['train_loss'] or 0:.3f}, "
            f"best {ev['best_score'] or 0:.3f} (Esc or TEM Stop Training stops)",
            ev["elapsed_s"] / max(ev["max_seconds"], 1e-9),
        )
        if plot is not None:
            plot.add(ev)
            plot.draw()

    return progress


def _show_trained(ctx, image, device, classes) -> None:
    """The ``show=`` option: the new model's probabilities of some or all classes."""
    show = ctx.text("show").lower() or "none"
    if show == "none":
        return
    wanted = classes if show == "all" else [c.strip() for c in show.split(",")]
    unknown = [c for c in wanted if c not in classes]
    if unknown:
        raise UserError(f"show={show}: no class {', '.join(unknown)} in {', '.join(classes)}")
    _show(ctx, _probabilities(ctx, image, device, wanted)[0])


def _predict(ctx, image, device) -> np.ndarray:
    """The current model's probabilities of the current image, (Z, C, Y, X) float32."""
    from ..predict import predict_stack

    model = _current_model(ctx)
    return predict_stack(
        model.net,
        image.data,
        model.normalization,
        device,
        progress=_predict_progress(ctx, "TEM prediction"),
        cancel=ctx.cancel,
    )


def _probabilities(ctx, image, device, classes=None):
    """Predict the current image; returns the probability ImagePlus of ``classes`` and the raw maps."""
    model = _current_model(ctx)
    probs = _predict(ctx, image, device)
    keep = [model.classes.index(c) for c in (classes or model.classes)]
    imp = to_imageplus(
        np.ascontiguousarray(probs[:, keep]),
        f"{_stem(ctx.image)}-probabilities",
        image.calibration,
        [model.classes[i] for i in keep],
        layout=image.stack,
    )
    imp.setDisplayRange(0.0, 1.0)
    return imp, probs


def predict_probabilities(ctx: Context) -> None:
    """TEM Predict Probabilities: a 32-bit image with one channel per class, or an 8-bit label image."""
    output = ctx.choice("output")
    device = _device(ctx)
    image = to_image(ctx.image)
    model = _current_model(ctx)
    imp, probs = _probabilities(ctx, image, device)
    if output == "labels":
        labels = probs.argmax(axis=1).astype(np.uint8)
        imp = to_imageplus(labels, f"{_stem(ctx.image)}-labels", image.calibration, layout=image.stack)
        imp.setLut(_distinct_lut())
        imp.setDisplayRange(0, 255)  # class k in colour k; the first class (background) black
    ctx.results.update(classes=model.classes)
    _show(ctx, imp)


def suggest_patches(ctx: Context) -> None:
    """TEM Suggest Next Patches."""
    from ..workflows import suggest_round

    k = int(ctx.number("number", low=1))
    image = to_image(ctx.image)
    # Nothing annotated yet is fine: suggestions then come from image statistics alone. Any other
    # problem with the ROIs (a line ROI, an unknown class) is still an error.
    shapes = _annotation_rois(ctx)[1] if ctx.text("rois") or _manager_rois(ctx) else []

    def progress(ev):
        ctx.status(f"TEM suggestions: {ev['stage']}, plane {ev['plane']}/{ev['planes']}", ev["plane"] / ev["planes"])

    result = suggest_round(
        image, shapes, ctx.bridge.model, k=k, settings=ctx.bridge.settings, all_slices=ctx.options.get("all") is True,
        device=str(_device(ctx)), progress=progress, cancel=ctx.cancel,
    )  # fmt: skip

    from ..suggest import suggestion_rois, suggestion_rows
    from .convert import from_roi_bytes

    manager = roi_manager(ctx, create=True)
    # Earlier suggestions are ours to replace; everything else in the manager stays as it is
    for i in reversed(range(int(manager.getCount()))):
        if str(manager.getName(i) or "").startswith(SUGGEST_PREFIX):
            manager.select(i)
            manager.runCommand("Delete")
    overlay = _overlay_without(ctx.image, SUGGEST_PREFIX)
    names = []
    # The same ROIs as `tem-ij suggest` writes, decoded by ImageJ from their .roi bytes
    for r in suggestion_rois(result, stack=image.data.shape[0] > 1):
        roi = from_roi_bytes(r.tobytes())
        roi.setName(r.name)
        manager.addRoi(roi)
        shown = roi.clone()
        focus = "-focus-" in r.name
        shown.setStrokeColor(_java_color("magenta" if focus else "yellow"))
        shown.setStrokeWidth(1.5 if focus else 3.0)
        overlay.add(shown)
        names.append(r.name)
    overlay.drawNames(True)
    ctx.image.setOverlay(overlay)
    manager.deselect()
    rows = suggestion_rows(result)
    for row in rows:
        row["focus_regions"] = len(row["focus"])
    scalars = [k for k in dict.fromkeys(k for r in rows for k in r) if not isinstance(rows[0].get(k), (list, dict))]
    _show_table(rows, {k: k for k in scalars}, "TEM Suggestions")  # the columns of `tem-ij suggest`'s CSV
    ctx.results.update(suggestions=[c.box() for c in result.suggestions], names=names, phase=result.phase)
    windows = [n for n in names if "-focus-" not in n]
    n_focus = len(names) - len(windows)
    focus = f"; outline the {n_focus} magenta focus region(s) first" if n_focus else ""
    jimport("ij.IJ").log(
        f"TEM Suggest Next Patches: {', '.join(windows)} added to the ROI Manager ({result.phase}){focus}; "
        "annotate them, rename or delete the rectangles, then run TEM Train Model again"
    )


def find_objects(ctx: Context) -> None:
    """TEM Find Objects: the label image, the outlines in the ROI Manager, the measurements in the Results table."""
    from ..annotations import PROPOSAL_PREFIX
    from ..objects import ObjectSettings
    from ..workflows import object_class, objects_in_planes, suggestion_size

    image = to_image(ctx.image)
    model = _current_model(ctx)
    index = object_class(model.classes, ctx.text("class") or None)
    options = {"split": ctx.choice("split")}
    if int(ctx.number("minimum", low=0)):
        options["min_area"] = int(ctx.number("minimum"))
    areas = model.meta.get("object_areas")
    settings = ObjectSettings.for_annotations(suggestion_size(model), areas, model.classes[index], **options)
    probs = _predict(ctx, image, _device(ctx))
    labels = np.zeros(image.data.shape, np.int64)

    def progress(ev):
        ctx.status(f"TEM objects: plane {ev['plane']}/{ev['planes']}", ev["plane"] / ev["planes"])

    proposals = ctx.options.get("proposals") is True
    found = objects_in_planes(
        probs.__getitem__, len(probs), index, model.classes[index], settings, image.data.__getitem__,
        image.calibration, image.slice_labels, sink=labels.__setitem__, progress=progress, cancel=ctx.cancel,
        roi_prefix=PROPOSAL_PREFIX if proposals else None,
    )  # fmt: skip
    imp = to_imageplus(
        labels.astype(np.uint16 if found.count <= 65535 else np.float32),
        f"{_stem(ctx.image)}-{found.class_name}-objects",
        image.calibration,
        layout=image.stack,
    )
    imp.setLut(_distinct_lut())
    imp.setDisplayRange(0, 255)  # id N in colour N (mod 255): neighbours never share a colour
    _show(ctx, imp)
    _objects_to_manager(ctx, found.rois)
    _results_table(found.rows, found.unit)
    ctx.results.update(count=found.count, names=[r.name for r in found.rois], rows=found.rows)
    name = PROPOSAL_PREFIX if proposals else found.class_name
    how = (
        f"rename the ones you accept to {found.class_name}-N (training ignores proposal-N) and delete the others"
        if proposals
        else f"TEM Train Model reads ROIs named {name}-N as {name} annotations: delete the outlines you do not mean "
        "to train on"
    )
    jimport("ij.IJ").log(
        f"TEM Find Objects: {found.count} {found.class_name} object(s); outlines {name}-1.. in the ROI Manager, "
        f"measurements in the Results table. {how}."
    )


def _distinct_lut():
    """A label LUT: black background, then 255 colours that differ from their neighbours (golden-ratio hues)."""
    from jpype import JArray, JByte

    from ..stackio import label_colours

    rgb = label_colours(256)
    channels = [[c[k] for c in rgb] for k in range(3)]
    arrays = [JArray(JByte)(np.array(ch, np.uint8).view(np.int8).tolist()) for ch in channels]
    return jimport("ij.process.LUT")(*arrays)


def _objects_to_manager(ctx, rois: list) -> None:
    """The object outlines, as ImageJ decodes the ROIs `tem-ij objects --rois` writes."""
    from .convert import from_roi_bytes

    manager = roi_manager(ctx, create=True)
    for r in rois:
        roi = from_roi_bytes(r.tobytes())
        roi.setName(r.name)
        manager.addRoi(roi)
    manager.deselect()


def _results_table(rows: list, unit: str) -> None:
    """The object table in ImageJ's Results window (a real ResultsTable: File > Save As gives a CSV)."""
    from ..objects import measurement_columns

    _show_table(rows, measurement_columns(unit), "Results")


def _show_table(rows: list, columns: dict, title: str) -> None:
    """``rows`` (dicts) as an ImageJ ResultsTable window ``title``, ``columns`` mapping keys to column names."""
    table = jimport("ij.measure.ResultsTable")()
    for row in rows:
        table.incrementCounter()
        for key, name in columns.items():
            v = row.get(key)
            if isinstance(v, str):
                table.addValue(name, v)
            else:
                table.addValue(name, float("nan") if v is None else float(v))
    table.show(title)


def _overlay_without(imp, prefix: str):
    """The image's overlay (a new one if it has none) without our earlier ROIs named ``prefix*``."""
    Overlay = jimport("ij.gui.Overlay")
    overlay = imp.getOverlay()
    overlay = Overlay() if overlay is None else overlay.duplicate()
    for i in reversed(range(int(overlay.size()))):
        if str(overlay.get(i).getName() or "").startswith(prefix):
            overlay.remove(i)
    return overlay


def show_patch_grid(ctx: Context) -> None:
    """TEM Show Patch Grid: training patches red, validation blue, unused green (as training splits them)."""
    from ..config import Settings
    from ..patches import annotated_patches, grid, round_history, split

    settings = ctx.bridge.settings or Settings()
    image = to_image(ctx.image)
    _, shapes = _annotation_rois(ctx)
    _, model = _warm_start(ctx)
    labels = _labels(ctx, image, shapes, model.classes if model is not None else None)
    size = settings.patches.size
    annotated = annotated_patches(labels.labels, size)
    # Split as the next training will, warm-started from the project's current round or the model in memory.
    earlier, learnt = round_history(getattr(model, "rounds", None) or [])
    train_p, val_p = split(
        labels.labels,
        annotated,
        settings.train.validation_patches,
        settings.train.seed,
        len(labels.classes),
        earlier,
        learnt,
    )
    role = {p.grid_index: "train" for p in train_p} | {p.grid_index: "validation" for p in val_p}
    colours = {"train": "red", "validation": "blue", "unused": "green"}
    Roi = jimport("ij.gui.Roi")
    overlay = _overlay_without(ctx.image, GRID_NAME)
    stack = image.data.shape[0] > 1
    counts = dict.fromkeys(colours, 0)
    for p in grid(image.data.shape, size):
        kind = role.get(p.grid_index, "unused")
        counts[kind] += 1
        roi = Roi(p.x0, p.y0, p.x1 - p.x0, p.y1 - p.y0)
        roi.setName(f"{GRID_NAME}-{kind}")
        roi.setStrokeColor(_java_color(colours[kind]))
        roi.setStrokeWidth(2.0 if kind == "unused" else 4.0)
        if stack:
            roi.setPosition(p.z + 1)
        overlay.add(roi)
    ctx.image.setOverlay(overlay)
    ctx.results.update(counts)
    jimport("ij.IJ").showStatus(
        f"patch grid: {counts['train']} training (red), {counts['validation']} validation (blue), "
        f"{counts['unused']} unused (green)"
    )


def apply_to_stack(ctx: Context) -> None:
    """TEM Apply Model To Stack: a TIFF file or a folder of TIFFs into an output folder, no windows.

    The batch is :func:`~tem_ij_plugin.workflows.predict_files`, as ``tem-ij predict --out-dir`` runs it.
    """
    from ..modelio import save_model
    from ..workflows import DEFAULT_NAME, predict_files

    source = Path(ctx.text("input")).expanduser()
    out_dir = Path(ctx.text("output")).expanduser()
    kind = ctx.choice("kind")
    if not ctx.text("input") or not source.exists():
        raise UserError(f"input=[{source}]: no such file or folder")
    if not ctx.text("output"):
        raise UserError("TEM Apply Model To Stack needs output=[folder]")
    model = _current_model(ctx)
    progress = [None]

    def on_file(i: int, n: int, image: Path) -> None:
        progress[0] = _predict_progress(ctx, f"TEM apply: file {i}/{n} {image.name}")

    with tempfile.TemporaryDirectory() as tmp:
        model_path = ctx.bridge.model_path
        if model_path is None:  # trained in this session and not saved yet
            model_path = Path(tmp) / "current.model"
            save_model(model_path, model)
        try:
            result = predict_files(
                model_path, [source], out_dir, DEFAULT_NAME, kind=kind, device=ctx.choice("device"),
                resume=ctx.options.get("resume") is True, on_file=on_file, progress=lambda ev: progress[0](ev),
                cancel=ctx.cancel,
            )  # fmt: skip
        except Cancelled as exc:
            raise Cancelled(f"{exc}; run it again with 'Resume' ticked (macro key resume) to complete it") from None
    ctx.results.update(files=[str(p) for p in result.written], skipped=[str(p) for p in result.skipped])
    kept = f", {len(result.skipped)} already done" if result.skipped else ""
    jimport("ij.IJ").log(f"TEM Apply Model To Stack: {len(result.written)} file(s) written to {out_dir}{kept}")


def load_model(ctx: Context) -> None:
    """TEM Load Model."""
    from ..modelio import load_model as load

    path = _path_option(ctx, "model", "Load TEM model", save=False)
    model = load(path)
    ctx.bridge.model, ctx.bridge.model_path = model, path
    ctx.results.update(classes=model.classes, path=str(path))
    jimport("ij.IJ").showStatus(f"TEM model {path.name}: classes {', '.join(model.classes)}")


def save_model(ctx: Context) -> None:
    """TEM Save Model."""
    from ..modelio import save_model as save

    model = _current_model(ctx)
    path = _path_option(ctx, "model", "Save TEM model", save=True, default_name="tem")
    save(path, model)
    ctx.bridge.model_path = path
    ctx.results.update(path=str(path))
    jimport("ij.IJ").showStatus(f"TEM model saved to {path}")


def stop_training(ctx: Context) -> None:
    """TEM Stop Training: the running training stops after its current step and keeps its best model."""
    bridge = ctx.bridge
    running = bridge.training.locked()
    if running:
        bridge.stop.set()
    at = bridge.progress["iteration"] if running and bridge.progress else None
    ctx.results.update(running=running, iteration=at)
    message = "TEM: no training is running"
    if running:
        message = "TEM: stopping training" + (f" at iteration {at}" if at is not None else "") + "..."
    jimport("ij.IJ").showStatus(message)


def check_environment(ctx: Context) -> None:
    """TEM Check Environment."""
    IJ = jimport("ij.IJ")
    ctx.status("TEM: measuring speed (5 s)...")
    from ..workflows import doctor

    text = doctor(write=lambda line: None)
    text = f"{text}\nImageJ {IJ.getFullVersion()}, Java {jimport('java.lang.System').getProperty('java.version')}"
    ctx.results.update(report=text)
    if ctx.batch:
        IJ.log(text)
    else:
        jimport("ij.text.TextWindow")("TEM Check Environment", text, 640, 360)
