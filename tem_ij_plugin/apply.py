"""Apply a model file to an image file: plane by plane, resumable, one or two outputs.

This is what ``tem-ij predict`` runs (and what Fiji's "Apply Model To Stack" will run): it reads
planes with :class:`~tem_ij_plugin.io.PlaneReader`, predicts them with a
:class:`~tem_ij_plugin.predict.Predictor` and writes them with the plane writers of
:mod:`tem_ij_plugin.stackio`, recording finished planes so that an interrupted job can be resumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import ModelFileError, UserError

if TYPE_CHECKING:
    import os

    from numpy.typing import DTypeLike

    from .events import CancelToken, ProgressSink

log = logging.getLogger(__name__)

STATE_EVERY_PLANE = 1000  # the resume state is saved after every plane up to this many planes ...
STATE_SAVE_S = 2.0  # ... and then at most every this many seconds


def labels_path(out: Path) -> Path:
    """Where ``--kind both`` writes the label image: ``name_labels.tif`` next to ``name.tif``.

    An OME-Zarr image keeps it in its standard ``labels/`` group: ``name.zarr/labels/classes``.
    """
    from .stackio import ZARR_SUFFIXES, split_name

    if out.suffix.lower() in ZARR_SUFFIXES:
        return out / "labels" / "classes"
    stem, suffix = split_name(out)
    return out.with_name(f"{stem}_labels{suffix}")


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def to_output(probs: np.ndarray, kind: str, dtype: DTypeLike, keep: list[int] | None = None) -> np.ndarray:
    """Convert (C, Y, X) probabilities to what is written.

    ``labels``: the argmax class index. ``probabilities``: the channels ``keep`` as float32, or scaled
    to the full range of an integer ``dtype`` (255 or 65535 = probability 1).
    """
    dtype = np.dtype(dtype)
    if kind == "labels":
        return probs.argmax(axis=0).astype(dtype)
    p = probs if keep is None else probs[keep]
    if dtype == np.float32:
        return p
    return np.rint(p * np.iinfo(dtype).max).astype(dtype)


def _size_and_mtime(path: Path) -> tuple[int, int]:
    """Size and modification time of an image file, or of an OME-Zarr folder's files (summed, newest).

    Chunks rewritten in place change neither the size nor the time of the folder itself.
    """
    if not path.is_dir():
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    size = mtime = 0
    for folder, dirs, names in os.walk(path):
        # What viewers and file browsers add (a labels/ group, .DS_Store) is not the image.
        dirs[:] = [d for d in dirs if d != "labels" and not d.startswith(".")]
        for n in names:
            if n.startswith(".") and n not in (".zattrs", ".zarray", ".zgroup"):
                continue
            try:
                st = os.stat(os.path.join(folder, n))
            except OSError:  # a broken link: not data the image can be read from either
                continue
            size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
    return size, mtime


class SharedModel:
    """A model loaded once for a batch of images, and the tiled predictor built for the first of them.

    Loading a model and building its backend (an ONNX export and its check) cost seconds; a batch
    pays them once. The predictor's tiling depends on the device and the network only; its check of
    a reduced precision (bf16, int8) and int8's calibration run on the first image's probe.
    """

    def __init__(self):
        self._model = self._key = None
        self.predictor = None

    def model(self, path: Path, device: str):
        """The model of ``path`` on ``device``, loaded on the first call."""
        key = (Path(path).resolve(), device)
        if self._model is None or self._key != key:
            self._model, self._key, self.predictor = load_segmenter(path, device), key, None
        return self._model


class PredictJob:
    """One model applied to one image file, written to ``out`` (and ``name_labels.*`` for ``both``).

    Parameters mirror ``tem-ij predict``; ``inputs`` names further files the caller reads (a batch's
    other images), which no path of this job may touch either. After :meth:`run`, or after it raised
    :class:`Cancelled`, ``planes_done``, ``n_planes`` and ``partial_files`` say where things stand.

    Every path the job writes (outputs, their ``.partial`` names, the state and lock files) is planned
    and checked against the inputs before anything is read (:class:`~tem_ij_plugin.outputs.OutputPlan`);
    each output is locked while it is written (:class:`~tem_ij_plugin.outputs.OutputLock`).
    """

    def __init__(
        self,
        model_path,
        image_path,
        out,
        kind: str = "probabilities",
        dtype: str = "float32",
        classes=None,
        channel: int | None = None,
        device: str = "auto",
        backend: str = "auto",
        precision: str = "auto",
        tile: int | None = None,
        overlap: int | None = None,
        batch_size: int | None = None,
        resume: bool = False,
        overwrite: bool = False,
        inputs=(),
        tta: str = "off",
        shared: SharedModel | None = None,
        pyramid: int = 0,
    ):
        from .stackio import refuse_label_group_output

        refuse_label_group_output(Path(out))
        if kind not in ("probabilities", "labels", "both"):
            raise UserError(f"unknown output '{kind}'; use probabilities, labels or both")
        if dtype not in ("float32", "uint8", "uint16"):
            raise UserError(f"unknown dtype '{dtype}'; use float32, uint8 or uint16")
        self.model_path, self.image_path, self.out = Path(model_path), Path(image_path), Path(out)
        self.kind, self.dtype, self.classes, self.channel = kind, dtype, classes, channel
        self.device, self.backend, self.precision = device, backend, precision
        self.tile, self.overlap, self.batch_size, self.resume = tile, overlap, batch_size, resume
        self.overwrite, self.inputs = overwrite, [Path(p) for p in inputs]
        self.tta, self.shared = tta, shared
        if not 0 <= pyramid <= 10:
            raise UserError(f"--pyramid {pyramid}: give 0 to 10 levels")
        if pyramid and Path(out).suffix.lower() != ".zarr":
            raise UserError(
                "--pyramid adds resolution levels to an OME-Zarr output: name it NAME.zarr "
                "(with --out-dir: --name '{name}-{kind}.zarr')"
            )
        self.pyramid = pyramid
        self._model_sha256 = self._patch_size = self._object_areas = self._image_stat = None
        self._model_classes: list = []
        self.n_planes = 0
        self.state = None
        self.writers: list = []

    @property
    def planes_done(self) -> int:
        """The planes finished so far (0 before :meth:`run` starts)."""
        return len(self.state.done) if self.state is not None else 0

    @property
    def partial_files(self) -> list:
        """The ``.partial`` files the writers fill, one per output."""
        return [w.work for w in self.writers]

    def final_paths(self) -> list:
        """The finished outputs (a label image inside an OME-Zarr image finishes before it)."""
        return {"both": [self.out, labels_path(self.out)]}.get(self.kind, [self.out])

    def _files(self) -> list:
        """The files (or OME-Zarr folders) this job creates: the outputs not inside another one."""
        from .stackio import label_store

        return [p for p in self.final_paths() if label_store(p) is None]

    def plan(self):
        """Check every path this job may write against every input; returns the :class:`OutputPlan`."""
        from .outputs import OutputPlan, lock_path, temporary_name
        from .stackio import JobState, _zarr, output_format, partial_path

        plan = OutputPlan([self.model_path, self.image_path, *self.inputs], overwrite=self.overwrite)
        state = JobState.path_for(self.out)
        for path in self._files():
            if output_format(path) == "zarr":
                _zarr()  # a missing library is said before anything is computed
            plan.output(path)
            plan.add(partial_path(path), f"working file of {path.name}", replace=True)
            plan.add(lock_path(path), f"lock file of {path.name}", replace=True)
        plan.add(state, f"resume state of {self.out.name}", replace=True)
        plan.add(temporary_name(state), f"temporary name of {state.name}", replace=True)
        return plan

    def run(self, progress: ProgressSink | None = None, cancel: CancelToken | None = None) -> str:
        """Predict every plane not yet written and move the outputs into place; returns a summary line.

        Raises
        ------
        UserError
            Bad input, a path that would touch an input, an output another process is writing, an
            output that cannot be written (a full disk included: the finished planes stay in the
            ``.partial`` files for ``--resume``).
        Cancelled
            When ``cancel`` was set; the finished planes stay in the ``.partial`` files.
        """
        from .io import PlaneReader
        from .outputs import OutputLock

        self.plan()
        model, keep, names = self._load_model()
        with PlaneReader(self.image_path, channel=self.channel) as reader:
            self.n_planes = n = reader.n_planes
            predictor, lo, hi = self._predictor(model, reader)
            outputs = self._outputs(reader, model, keep, names)
            with contextlib.ExitStack() as locks:
                stale = [
                    locks.enter_context(OutputLock(p, "tem-ij predict", overwrite=self.overwrite)).stale
                    for p in self._files()
                ]
                if self.resume and self._renamed_but_state_kept(names):
                    return f"{', '.join(map(str, self.final_paths()))} already complete (the state was left behind)"
                self._open(outputs, reader, predictor, names, any(stale))
                elapsed = self._predict_all(predictor, reader, lo, hi, outputs, keep, progress, cancel)
                self._finish(cancel)
                self.state.remove()
        mp = n * reader.plane_shape[0] * reader.plane_shape[1] / 1e6
        return (
            f"wrote {', '.join(str(p) for p, *_ in outputs)}: {self.kind} of {n} plane(s), classes {', '.join(names)} "
            f"({elapsed:.1f} s, {mp / max(elapsed, 1e-9):.2f} MP/s, {predictor.backend.name} {predictor.precision})"
        )

    def _finish(self, cancel) -> None:
        """Move the finished outputs into place (an OME-Zarr pyramid is built then); a full disk is exit 2."""
        try:
            for w in reversed(self.writers):  # a label image inside the image's OME-Zarr finishes first
                w.finish(cancel)
        except OSError as exc:
            raise UserError(
                f"finishing {self.out} failed: {exc.strerror or exc}. Every plane is in "
                f"{', '.join(map(str, self.partial_files))}; free space and run it again with resume "
                "(tem-ij: --resume; Fiji: tick 'Resume')"
            ) from exc

    def _predict_all(self, predictor, reader, lo, hi, outputs, keep, progress, cancel) -> float:
        """Predict and write every plane not done yet, recording each; returns the seconds it took.

        Whatever stops it (Ctrl-C, a full disk, a damaged plane) leaves the finished planes recorded
        in the state for ``--resume``.
        """
        from .predict import predict_planes

        state, n = self.state, reader.n_planes
        saved = [time.monotonic()]

        def sink(i, probs):
            state.planes[i] = [
                w.write(i, to_output(probs, kind, lay.dtype, keep))
                for w, (_, kind, lay, _) in zip(self.writers, outputs)
            ]
            # Every plane while the state is small; then every few seconds, as rewriting it per plane would
            # grow with the square of the stack (a plane missing from the state is only predicted again).
            if len(state.planes) <= STATE_EVERY_PLANE or time.monotonic() - saved[0] >= STATE_SAVE_S:
                state.save()
                saved[0] = time.monotonic()

        start = time.perf_counter()
        try:
            predict_planes(predictor, reader.read, n, lo, hi, sink, skip=state.done, progress=progress, cancel=cancel)
        except BaseException as exc:
            self._close()
            with contextlib.suppress(OSError):
                state.save()
            if isinstance(exc, OSError):
                raise UserError(
                    f"writing {self.out} failed: {exc.strerror or exc}. {len(state.done)} of {n} plane(s) are in "
                    f"{', '.join(map(str, self.partial_files))} (incomplete); free space and run it again with "
                    "resume (tem-ij: --resume; Fiji: tick 'Resume')"
                ) from exc
            raise
        state.save()
        return time.perf_counter() - start

    def _load_model(self):
        """The model on its device, the indices of the classes to write and their names."""
        if self.shared is not None:
            model = self.shared.model(self.model_path, self.device)
        else:
            model = load_segmenter(self.model_path, self.device)
        keep = list(range(len(model.classes)))
        self._model_classes = list(model.classes)
        if self.classes:
            unknown = [c for c in self.classes if c not in model.classes]
            if unknown:
                raise UserError(
                    f"unknown class(es) {', '.join(unknown)}: the model's classes are {', '.join(model.classes)}"
                )
            keep = [model.classes.index(c) for c in self.classes]
        return model, keep, [model.classes[k] for k in keep]

    def _predictor(self, model, reader):
        """The tiled predictor for this image (a batch's, when it has one), and the image's normalisation range."""
        if self.shared is not None and self.shared.predictor is not None:
            lo, hi, _ = image_range(model, reader)
            return self.shared.predictor, lo, hi
        from .stackio import JobState

        options = {"backend": self.backend, "precision": self.precision, "tile": self.tile, "overlap": self.overlap}
        # The default tile follows the free memory: a resume keeps the interrupted run's while it fits.
        resume_tile = JobState.recorded_tile(self.out) if self.resume and self.tile is None else None
        predictor, lo, hi = image_predictor(
            model, reader, self.device, batch_size=self.batch_size, tta=self.tta, resume_tile=resume_tile, **options
        )
        if self.shared is not None:
            self.shared.predictor = predictor
        return predictor, lo, hi

    def _outputs(self, reader, model, keep, names) -> list:
        """(path, kind, layout, slice labels) of each output."""
        from .stackio import Layout

        n, sl = reader.n_planes, reader.slice_labels
        outputs = []
        if self.kind in ("probabilities", "both"):
            lay = Layout(reader.stack_axes, reader.stack_shape, len(keep), reader.plane_shape, np.dtype(self.dtype))
            outputs.append(
                (self.out, "probabilities", lay, [f"{c}: {sl[i]}" if sl else c for i in range(n) for c in names])
            )
        if self.kind in ("labels", "both"):
            dt = np.dtype(np.uint8 if len(model.classes) < 256 else np.uint16)
            lay = Layout(reader.stack_axes, reader.stack_shape, None, reader.plane_shape, dt)
            outputs.append((self.final_paths()[-1], "labels", lay, sl or None))
        return outputs

    def _job(self, names) -> dict:
        """What decides which result this job writes (recorded in each finished output)."""
        if self._image_stat is None:  # once per job: a folder image is walked
            self._image_stat = _size_and_mtime(self.image_path)
        size, mtime = self._image_stat
        if self._model_sha256 is None:  # hashed once per job: the signature, the writers and resume all ask
            from .modelio import read_metadata

            self._model_sha256 = file_digest(self.model_path)
            meta = read_metadata(self.model_path)
            self._patch_size, self._object_areas = meta.get("patch_size"), meta.get("object_areas")
        return {
            "model_sha256": self._model_sha256,
            "image": str(self.image_path.resolve()),
            "image_size": size,
            "image_mtime_ns": mtime,
            "output": self.kind,
            "dtype": self.dtype,
            "classes": names,
            "channel": self.channel,
            # Only when on, so that jobs without them keep the record they always had.
            **({"tta": self.tta} if self.tta != "off" else {}),
            **({"pyramid": self.pyramid} if self.pyramid else {}),
            # The annotation scale, which sets defaults downstream (tem-ij objects' minimum area).
            **({"patch_size": self._patch_size} if self._patch_size else {}),
            **({"object_areas": self._object_areas} if self._object_areas else {}),
        }

    def _signature(self, predictor, names) -> dict:
        """The job plus how it is computed: a resume must not mix two tilings or precisions in one file."""
        return {
            **self._job(names),
            "tile": predictor.tile,
            "tiling": "fitted",  # 0.2's square tiles put their seams elsewhere: never mixed in one file
            "overlap": predictor.overlap,
            "precision": predictor.precision,
        }

    def already_done(self) -> bool:
        """Whether every output exists, complete, from this very job (same model, image and options).

        Checked from what the finished files record, so a resume of a batch skips only files that are
        really done, never an older result from another model or image.
        """
        from .modelio import read_metadata
        from .stackio import JobState

        if JobState.path_for(self.out).exists():
            return False
        classes = read_metadata(self.model_path)["classes"]
        return self._finals_record(self._job(list(self.classes) if self.classes else list(classes)))

    def _finals_record(self, job: dict) -> bool:
        from .stackio import recorded_job

        return all(p.exists() and recorded_job(p) == job for p in self.final_paths())

    def _renamed_but_state_kept(self, names) -> bool:
        """A run killed after moving its finished files into place but before removing its state: done.

        Only finished files are ever renamed to the final names, and they record the job that wrote them.
        """
        from .stackio import JobState, partial_path

        state = JobState.path_for(self.out)
        if not state.exists() or any(partial_path(p).exists() for p in self._files()):
            return False
        if not self._finals_record(self._job(names)):
            return False
        log.info("%s: the outputs are complete; removing the state the interrupted run left", self.out)
        state.unlink()
        return True

    def _open(self, outputs, reader, predictor, names, stale_lock: bool) -> None:
        """The resume state and the plane writers: continued where verified, else created afresh.

        Runs with the outputs locked. The state is saved before any partial file is created, so that
        whatever a kill leaves behind is described by a state (or is nothing at all).
        """
        from .stackio import JobState, PartialMismatch, open_writer, output_format, partial_path

        records = [
            {
                "path": str(path.resolve()),
                "work": str(partial_path(path).resolve()),
                "format": output_format(path),
                "shape": [*lay.stack_shape, *([lay.channels] if lay.channels else []), *lay.plane_shape],
                "dtype": np.dtype(lay.dtype).newbyteorder("<").str,
            }
            for path, _, lay, _ in outputs
        ]
        state = self.state = JobState(self.out, self._signature(predictor, names), records)
        resuming = state.exists()
        recorded = state.recorded_outputs() if resuming else None
        if resuming and recorded is not None and recorded != [r["path"] for r in records]:
            raise UserError(
                f"{state.path} records an interrupted prediction to {', '.join(recorded)}, not to {self.out}; "
                f"complete that one (same -o, with resume), or choose another output name"
            )
        if resuming and not (self.resume or self.overwrite):
            raise UserError(
                f"{state.path} records an interrupted prediction to {self.out}; complete it with resume "
                "(tem-ij: --resume; Fiji: tick 'Resume'), or delete the .partial files to start over"
            )
        resuming = resuming and self.resume
        if not resuming and not stale_lock:
            self._refuse_foreign_scratch(state)
        if resuming:
            state.load(reader.n_planes)
            log.info("resuming: %d of %d plane(s) already written", len(state.done), reader.n_planes)
        elif self.resume:
            log.info("nothing to resume (no %s); predicting every plane", state.path.name)
        state.save()

        def create(resume: bool) -> list:
            writers, job = [], self._job(names)
            try:
                for path, kind, lay, labels in outputs:
                    # label value k is the model's class k, whichever classes the probabilities keep
                    classes = self._model_classes if kind == "labels" else names
                    cal = reader.calibration
                    writers.append(open_writer(path, lay, cal, labels, classes, resume, job, self.pyramid))
            except BaseException:
                for w in writers:
                    w.close()
                raise
            return writers

        try:
            try:
                self.writers = create(resume=resuming)
            except PartialMismatch as exc:
                if state.done:
                    log.warning("%s; predicting all %d plane(s) again", exc, reader.n_planes)
                state.planes = {}
                state.save()
                self.writers = create(resume=False)
        except UserError:
            if not state.done:  # nothing finished to keep: leave no state behind either
                state.remove()
            raise
        bad = state.verify(self.writers)
        if bad:
            log.warning(
                "%d finished plane(s) in the partial output are not the bytes that were written "
                "(planes %s); predicting them again",
                len(bad),
                ", ".join(str(i + 1) for i in bad[:10]) + (" ..." if len(bad) > 10 else ""),
            )
            state.save()

    def _refuse_foreign_scratch(self, state) -> None:
        """Working files that no state or dead run of ours describes are someone else's: never replace them."""
        from .stackio import partial_path

        # (Hidden temporary names, .NAME.partial, are ours by their name: a kill mid-write leaves one.)
        for path in [*(partial_path(p) for p in self._files()), state.path]:
            if (path.exists() or path.is_symlink()) and not self.overwrite:
                raise UserError(
                    f"{path} exists but no interrupted run of this job describes it; move it away "
                    "(or, with tem-ij, pass --overwrite to replace it)"
                )

    def _close(self) -> None:
        for w in self.writers:
            w.close()


def load_segmenter(path: str | os.PathLike, device: str = "auto"):
    """A model file's model on ``device``, checked to segment one greyscale channel.

    Raises
    ------
    ModelFileError
        Not a model of ours, or one that expects several input channels.
    """
    from .modelio import load_model
    from .normalization import check_normalization
    from .runtime import resolve_device

    model = load_model(path, device=resolve_device(device))
    check_normalization(model.normalization)
    if model.net.in_channels != 1:
        raise ModelFileError(
            f"{path} expects {model.net.in_channels} input channels; tem_ij_plugin segments one "
            "greyscale channel (use --channel to pick it from a multichannel image)"
        )
    return model


def image_predictor(
    model,
    reader,
    device: str = "auto",
    backend: str = "auto",
    precision: str = "auto",
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    tta: str = "off",
    resume_tile: int | None = None,
) -> tuple:
    """The tiled predictor of ``model`` for the image behind ``reader``, and the image's normalisation range.

    ``resume_tile``: an interrupted run's tile, kept when ``tile`` is None and it is one the default
    could be here (see :func:`~tem_ij_plugin.predict.default_tiling`).

    Returns
    -------
    predictor : Predictor
    lo, hi : float
        The intensity range that :func:`normalize` maps to the model's input range.

    Raises
    ------
    UserError
        A single plane with no contrast.
    """
    from .normalization import normalize
    from .predict import make_predictor, probe_crop
    from .receptive import HALO_MASS
    from .runtime import resolve_device

    lo, hi, first = image_range(model, reader)
    erf = model.meta.get("effective_receptive_field") or {}
    predictor = make_predictor(
        model.net,
        resolve_device(device),
        backend,
        precision,
        tile,
        overlap,
        batch_size,
        normalize(probe_crop(first), lo, hi),
        halo=erf.get("radius") if erf.get("mass") == HALO_MASS else None,
        tta=tta,
        resume_tile=resume_tile,
    )
    log.info("prediction: %s", predictor.describe())
    return predictor, lo, hi


def image_range(model, reader) -> tuple:
    """The intensity range of the image behind ``reader`` that the model's normalisation maps, and its first plane.

    Raises
    ------
    UserError
        A single plane with no contrast.
    """
    from .normalization import sampled_range

    n = reader.n_planes
    log.info(
        "image %s: %d plane(s) of %dx%d %s%s",
        reader.path,
        n,
        reader.plane_shape[1],
        reader.plane_shape[0],
        reader.dtype,
        f", predicted over axis {reader.stack_axes} {reader.stack_shape}" if reader.stack_axes else "",
    )
    lo, hi = sampled_range(reader.read, n, model.normalization)
    first = reader.read(0)
    if np.ptp(first) == 0 and n == 1:
        raise UserError(f"{reader.path} has no contrast (every pixel is {first.flat[0]}); nothing to segment")
    return lo, hi, first
