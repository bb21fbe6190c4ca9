"""Apply a model file to an image file: plane by plane, resumable, one or two outputs.

This is what ``tem-ij predict`` runs (and what Fiji's "Apply Model To Stack" will run): it reads
planes with :class:`~tem_ij_plugin.io.PlaneReader`, predicts them with a
:class:`~tem_ij_plugin.predict.Predictor` and writes them with the plane writers of
:mod:`tem_ij_plugin.stackio`, recording finished planes so that an interrupted job can be resumed.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np

from .errors import Cancelled, ModelFileError, UserError

log = logging.getLogger(__name__)


def labels_path(out: Path) -> Path:
    """Where ``--output both`` writes the label image: ``name_labels.tif`` next to ``name.tif``."""
    return out.with_name(f"{out.stem}_labels{out.suffix}")


def file_digest(path) -> str:
    """SHA-256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def to_output(probs: np.ndarray, kind: str, dtype, keep=None) -> np.ndarray:
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


class PredictJob:
    """One model applied to one image file, written to ``out`` (and ``name_labels.*`` for ``both``).

    Parameters mirror ``tem-ij predict``. After :meth:`run`, or after it raised :class:`Cancelled`,
    ``planes_done``, ``n_planes`` and ``partial_files`` say where things stand.
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
    ):
        if kind not in ("probabilities", "labels", "both"):
            raise UserError(f"unknown output '{kind}'; use probabilities, labels or both")
        if dtype not in ("float32", "uint8", "uint16"):
            raise UserError(f"unknown dtype '{dtype}'; use float32, uint8 or uint16")
        self.model_path, self.image_path, self.out = Path(model_path), Path(image_path), Path(out)
        self.kind, self.dtype, self.classes, self.channel = kind, dtype, classes, channel
        self.device, self.backend, self.precision = device, backend, precision
        self.tile, self.overlap, self.batch_size, self.resume = tile, overlap, batch_size, resume
        self.n_planes = 0
        self.state = None
        self.writers: list = []

    @property
    def planes_done(self) -> int:
        return len(self.state.done) if self.state is not None else 0

    @property
    def partial_files(self) -> list:
        return [w.work for w in self.writers]

    def run(self, progress=None, cancel=None) -> str:
        """Predict every plane not yet written and move the outputs into place; returns a summary line.

        Raises
        ------
        UserError
            Bad input, an output that cannot be written (a full disk included: the finished planes stay
            in the ``.partial`` files for ``--resume``).
        Cancelled
            When ``cancel`` was set; the finished planes stay in the ``.partial`` files.
        """
        from .io import PlaneReader
        from .modelio import load_model
        from .predict import (
            HALO_MASS,
            check_normalization,
            make_predictor,
            normalize,
            predict_planes,
            resolve_device,
            sampled_range,
        )
        from .stackio import JobState, Layout, open_writer

        device = resolve_device(self.device)
        model = load_model(self.model_path, device=device)
        check_normalization(model.normalization)
        if model.net.in_channels != 1:
            raise ModelFileError(
                f"{self.model_path} expects {model.net.in_channels} input channels; tem_ij_plugin segments one "
                "greyscale channel (use --channel to pick it from a multichannel image)"
            )
        keep = list(range(len(model.classes)))
        if self.classes:
            unknown = [c for c in self.classes if c not in model.classes]
            if unknown:
                raise UserError(
                    f"unknown class(es) {', '.join(unknown)}: the model's classes are {', '.join(model.classes)}"
                )
            keep = [model.classes.index(c) for c in self.classes]
        names = [model.classes[k] for k in keep]

        with PlaneReader(self.image_path, channel=self.channel) as reader:
            n = self.n_planes = reader.n_planes
            log.info(
                "image %s: %d plane(s) of %dx%d %s%s",
                self.image_path,
                n,
                reader.plane_shape[1],
                reader.plane_shape[0],
                reader.dtype,
                f", predicted over axis {reader.stack_axes} {reader.stack_shape}" if reader.stack_axes else "",
            )
            lo, hi = sampled_range(reader.read, n, model.normalization)
            first = reader.read(0)
            if np.ptp(first) == 0 and n == 1:
                raise UserError(
                    f"{self.image_path} has no contrast (every pixel is {first.flat[0]}); nothing to segment"
                )
            probe = normalize(first[:256, :256], lo, hi)
            erf = model.meta.get("effective_receptive_field") or {}
            predictor = make_predictor(
                model.net,
                device,
                self.backend,
                self.precision,
                self.tile,
                self.overlap,
                self.batch_size,
                probe,
                halo=erf.get("radius") if erf.get("mass") == HALO_MASS else None,
            )
            log.info("prediction: %s", predictor.describe())

            outputs = []  # (path, kind, layout, slice labels)
            sl = reader.slice_labels
            if self.kind in ("probabilities", "both"):
                lay = Layout(reader.stack_axes, reader.stack_shape, len(keep), reader.plane_shape, np.dtype(self.dtype))
                outputs.append(
                    (self.out, "probabilities", lay, [f"{c}: {sl[i]}" if sl else c for i in range(n) for c in names])
                )
            if self.kind in ("labels", "both"):
                dt = np.dtype(np.uint8 if len(model.classes) < 256 else np.uint16)
                lay = Layout(reader.stack_axes, reader.stack_shape, None, reader.plane_shape, dt)
                outputs.append(
                    (self.out if self.kind == "labels" else labels_path(self.out), "labels", lay, sl or None)
                )

            st = self.image_path.stat()
            self.state = state = JobState(
                self.out,
                {
                    "model_sha256": file_digest(self.model_path),
                    "image": str(self.image_path.resolve()),
                    "image_size": st.st_size,
                    "image_mtime_ns": st.st_mtime_ns,
                    "output": self.kind,
                    "dtype": self.dtype,
                    "classes": names,
                    "channel": self.channel,
                    "tile": predictor.tile,
                    "overlap": predictor.overlap,
                    "precision": predictor.precision,
                },
            )
            if state.exists():
                if not self.resume:
                    raise UserError(
                        f"{state.path} records an interrupted prediction to {self.out}; complete it with resume "
                        "(tem-ij: --resume; Fiji: tick 'Resume'), or delete the .partial files to start over"
                    )
                state.load()
                log.info("resuming: %d of %d plane(s) already written", len(state.done), n)
            elif self.resume:
                log.info("nothing to resume (no %s); predicting every plane", state.path.name)
            for path, _, lay, labels in outputs:
                self.writers.append(
                    open_writer(
                        path, lay, reader.calibration, labels=labels, channel_names=names, resume=bool(state.done)
                    )
                )
            state.save()

            def sink(i, probs):
                for w, (_, kind, lay, _) in zip(self.writers, outputs):
                    w.write(i, to_output(probs, kind, lay.dtype, keep))
                state.done.add(i)
                state.save()

            start = time.perf_counter()
            try:
                predict_planes(
                    predictor, reader.read, n, lo, hi, sink, skip=state.done, progress=progress, cancel=cancel
                )
            except Cancelled:
                self._close()
                raise
            except OSError as exc:
                self._close()
                raise UserError(
                    f"writing {self.out} failed: {exc.strerror or exc}. {len(state.done)} of {n} plane(s) are in "
                    f"{', '.join(map(str, self.partial_files))} (incomplete); free space and run it again with "
                    "resume (tem-ij: --resume; Fiji: tick 'Resume')"
                ) from exc
            elapsed = time.perf_counter() - start
        for w in self.writers:
            w.finish()
        state.remove()
        mp = n * reader.plane_shape[0] * reader.plane_shape[1] / 1e6
        return (
            f"wrote {', '.join(str(p) for p, *_ in outputs)}: {self.kind} of {n} plane(s), classes {', '.join(names)} "
            f"({elapsed:.1f} s, {mp / max(elapsed, 1e-9):.2f} MP/s, {predictor.backend.name} {predictor.precision})"
        )

    def _close(self) -> None:
        for w in self.writers:
            w.close()
