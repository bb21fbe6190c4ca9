"""Annotation rounds kept in a project folder: what each round used, produced and scored.

A project folder holds ``project.json`` and one folder per round (``round-001/`` ...) with the model
(``round.model``), a copy of the annotations it learnt from and ``round.json``. One round is
*current*: the next training warm-starts from its model, and ``revert`` makes an earlier round
current again. Nothing is ever deleted: reverting only moves the pointer, and the rounds after it
stay on disk and in the history.

A training *reserves* its round before it starts: the next number free both in ``project.json`` and
on disk, taken with an atomic ``mkdir`` and marked by ``reserved.json`` (host, process, time) until the
round is registered. A folder that is not in ``project.json`` is never touched: its number is skipped.
After training the model is saved first, then the annotations, ``round.json`` and, last,
``project.json``, so a round listed there is always complete and a failure (or a kill) leaves at most
a reserved folder, with the trained model in it when it got that far. Everything read back is checked
against :mod:`tem_ij_plugin.schemas`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .outputs import atomic_write

if TYPE_CHECKING:
    from collections.abc import Callable

    from .modelio import TrainedModel

log = logging.getLogger(__name__)

PROJECT_FILE = "project.json"
ROUND_FILE = "round.json"
MODEL_FILE = "round.model"
RESERVATION_FILE = "reserved.json"  # in a round folder whose training has not been registered (yet)
FORMAT = "tem_ij_plugin project"
FORMAT_VERSION = 1
MAX_PROJECT_BYTES = 256 * 2**20
MAX_ROUND_BYTES = 64 * 2**20


def _round_folder(number: int) -> str:
    return f"round-{number:03d}"


def _write_json(path: Path, data) -> None:
    """Write ``data`` as JSON to ``path`` atomically (:func:`~tem_ij_plugin.outputs.atomic_write`)."""
    try:
        text = json.dumps(data, indent=1, allow_nan=False)
    except ValueError as exc:  # a non-finite number, which JSON cannot hold
        raise UserError(f"cannot write {path}: {exc}") from exc
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _read_json(path: Path, limit: int):
    """The parsed JSON of ``path`` (at most ``limit`` bytes), or a UserError naming the file and the problem."""
    from .schemas import parse_json

    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        raise UserError(f"{path} is unreadable ({exc.strerror or exc})") from exc
    if len(raw) > limit:
        raise UserError(f"{path} is corrupt (larger than {limit} bytes)")
    try:
        return parse_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path} is unreadable or corrupt ({exc})") from None


@dataclass
class Reservation:
    """A round number taken for a training that has not been registered yet.

    Attributes
    ----------
    number : int
    folder : Path
        ``round-NNN/`` in the project, created by :meth:`Project.reserve_round`.
    parent : int or None
        The current round when the training started (the one it warm-starts from).
    model_saved : bool
        Whether the trained model is in ``folder/round.model``.
    """

    number: int
    folder: Path
    parent: int | None
    model_saved: bool = False

    @property
    def model_path(self) -> Path:
        """The round's model file, ``folder/round.model``."""
        return self.folder / MODEL_FILE


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Project:
    """A project folder; open it with :meth:`open`.

    Attributes
    ----------
    root : Path
    data : dict
        The content of ``project.json``: ``rounds`` (list of dicts), ``current`` (round number or
        None), ``events`` (what happened, in order), ``image`` and ``classes``.
    """

    def __init__(self, root: Path, data: dict):
        self.root = root
        self.data = data

    @classmethod
    def open(cls, root: str | os.PathLike, create: bool = False) -> Project:
        """Open a project folder, checking ``project.json`` against its schema.

        With ``create``, a folder without ``project.json`` (new or empty) is accepted; the folder and
        ``project.json`` are written by the first :meth:`reserve_round`, so a refused training leaves
        nothing behind.
        """
        root = Path(root)
        path = root / PROJECT_FILE
        if path.is_file():
            return cls(root, cls._load(path))
        if path.exists() or path.is_symlink():
            raise UserError(f"{path} is not a file; this is not a usable project folder")
        if not create:
            if root.is_dir():
                raise UserError(f"{root} is not a project folder (no {PROJECT_FILE}); train with --project {root}")
            raise UserError(f"{root}: no such project folder")
        cls._check_creatable(root)
        project = cls(root, cls._new_data())
        project._new = True
        return project

    _new = False

    @staticmethod
    def _new_data() -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": _now(),
            "image": None,
            "classes": None,
            "current": None,
            "rounds": [],
            "events": [],
        }

    @staticmethod
    def _check_creatable(root: Path) -> None:
        if root.exists() and not root.is_dir():
            raise UserError(f"cannot use {root} as a project folder: it is a file")
        # (a .project.json.partial is what a process killed while creating the project leaves)
        if root.is_dir() and any(p.name != f".{PROJECT_FILE}.partial" for p in root.iterdir()):
            raise UserError(f"{root} is a non-empty folder without {PROJECT_FILE}; choose a new or empty folder")

    @staticmethod
    def _load(path: Path) -> dict:
        """``project.json`` parsed and validated; a UserError naming the file and the problem otherwise."""
        from .schemas import validate_project

        data = _read_json(path, MAX_PROJECT_BYTES)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"{path} is not a tem_ij_plugin project file")
        version = data.get("format_version")
        if type(version) is not int:
            raise UserError(f"{path} is corrupt (format_version {str(version)[:40]!r} is not an integer)")
        if version > FORMAT_VERSION:
            raise UserError(f"{path} was written by a newer tem_ij_plugin; update it to use this project")
        validate_project(path, data)
        return data

    @property
    def rounds(self) -> list:
        """The round records of ``project.json``, oldest first."""
        return self.data["rounds"]

    @property
    def current(self) -> int | None:
        """The current round's number (None before the first round)."""
        return self.data["current"]

    def round(self, number: int) -> dict:
        """The record of round ``number`` (1-based)."""
        for r in self.rounds:
            if r["round"] == number:
                return r
        have = ", ".join(str(r["round"]) for r in self.rounds) or "none yet"
        raise UserError(f"{self.root} has no round {number} (rounds: {have})")

    def inside(self, relative: str, what: str) -> Path:
        """``root / relative``, refused when it leads outside the project folder (symbolic links followed)."""
        from .schemas import inside_path

        path = self.root / relative
        try:
            inside_path(relative)
            path.resolve().relative_to(self.root.resolve())
        except ValueError:
            raise UserError(
                f"{self.root / PROJECT_FILE}: {what} {relative!r} points outside the project folder; refused"
            ) from None
        return path

    def verified_round(self, number: int) -> dict:
        """The record of round ``number`` once its ``round.json`` agrees with it and its model file is usable."""
        from .modelio import check_model_file
        from .schemas import validate_round

        record = self.round(number)
        model = self.inside(record["model"], f"the model of round {number}")
        self.inside(record["annotations"], f"the annotations of round {number}")
        folder = model.parent
        round_file = folder / ROUND_FILE
        if not round_file.is_file():
            raise UserError(f"round {number} of {self.root} is incomplete: {round_file} is missing")
        saved = _read_json(round_file, MAX_ROUND_BYTES)
        validate_round(round_file, saved)
        if saved != record:
            raise UserError(f"{round_file} does not agree with {self.root / PROJECT_FILE} about round {number}")
        if not model.is_file():
            raise UserError(f"the model of round {number}, {model}, is missing")
        try:
            check_model_file(model)
        except UserError as exc:
            raise UserError(f"round {number} cannot be used: {exc}") from None
        return record

    def current_model_path(self) -> Path | None:
        """The model of the current round (its round.json checked), or None before the first round."""
        if self.current is None:
            return None
        record = self.round(self.current)
        model = self.inside(record["model"], f"the model of round {self.current}")
        round_file = model.parent / ROUND_FILE
        from .schemas import validate_round

        if round_file.is_file():
            saved = _read_json(round_file, MAX_ROUND_BYTES)
            validate_round(round_file, saved)
            if saved != record:
                raise UserError(
                    f"{round_file} does not agree with {self.root / PROJECT_FILE} about round {self.current}"
                )
        else:
            raise UserError(f"round {self.current} of {self.root} is incomplete: {round_file} is missing")
        return model

    def save(self) -> None:
        """Write ``project.json`` atomically."""
        _write_json(self.root / PROJECT_FILE, self.data)

    # -- rounds ---------------------------------------------------------------------------------------
    def reserve_round(self) -> Reservation:
        """Take the next round number free both in ``project.json`` and on disk (atomic ``mkdir``).

        Folders that exist but are not listed (strays, reservations of other or killed trainings) are
        skipped with a warning and never touched. A new project is written here.
        """
        if self._new:
            self._check_creatable(self.root)
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"cannot create the project folder {self.root}: {exc.strerror or exc}") from exc
            self.save()
            self._new = False
        first = max((r["round"] for r in self.rounds), default=0) + 1
        for number in range(first, first + 10_000):
            folder = self.root / _round_folder(number)
            try:
                folder.mkdir()
            except FileExistsError:
                log.warning("round %d is skipped: %s", number, self._describe_stray(folder))
                continue
            except OSError as exc:
                raise UserError(f"cannot create the round folder {folder}: {exc.strerror or exc}") from exc
            break
        else:
            raise UserError(f"{self.root} has no free round number (10000 stray round folders)")
        reservation = Reservation(number, folder, self.current)
        marker = {
            "reserved_by": "tem_ij_plugin",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": _now(),
            "parent": self.current,
            "note": "a training took this round; it was not registered in project.json (yet). If that process "
            "no longer runs, the training ended before it finished; a round.model here is its trained model.",
        }
        try:
            _write_json(folder / RESERVATION_FILE, marker)
        except UserError:
            self.release(reservation)
            raise
        log.info("project %s: training round %d (%s)", self.root, number, folder)
        return reservation

    @staticmethod
    def _describe_stray(folder: Path) -> str:
        marker = folder / RESERVATION_FILE
        if not folder.is_dir():
            return f"{folder} exists and is not in {PROJECT_FILE} (left as it is)"
        if marker.is_file():
            try:
                m = _read_json(marker, 65536)
                who = f"process {m.get('pid')} on {m.get('host')} at {m.get('time')}"
            except (UserError, AttributeError):
                who = "a training"
            kept = "; it holds a trained model" if (folder / MODEL_FILE).is_file() else ""
            return f"{folder} was reserved by {who} and never registered{kept} (left as it is)"
        return f"{folder} exists but is not in {PROJECT_FILE} (left as it is)"

    def release(self, reservation: Reservation) -> None:
        """Give back a reservation whose training produced nothing: remove the marker and the empty folder."""
        if reservation.model_saved:
            return
        try:
            (reservation.folder / RESERVATION_FILE).unlink(missing_ok=True)
            reservation.folder.rmdir()
        except OSError as exc:
            log.warning("could not remove the unused round folder %s (%s)", reservation.folder, exc)

    def save_round_model(
        self, reservation: Reservation, model: TrainedModel, save_model: Callable[[Path, TrainedModel], object]
    ) -> Path:
        """Save the trained model into the reserved folder (the first thing saved after training)."""
        save_model(reservation.model_path, model)
        reservation.model_saved = True
        return reservation.model_path

    def add_round(
        self,
        model: TrainedModel,
        image_path: str | os.PathLike | None,
        rois_path: str | os.PathLike,
        stop_reason: str,
        save_model: Callable[[Path, TrainedModel], object],
        reservation: Reservation | None = None,
    ) -> dict:
        """Store a trained model as the next round and make it current.

        Parameters
        ----------
        model : TrainedModel
            The trained model; its last history entry describes this round.
        image_path : path or None
            The image trained on (recorded; None for an image that was never saved, e.g. in Fiji).
        rois_path : path
            The annotations (copied into the round folder).
        stop_reason : str
        save_model : callable
            ``save_model(path, model)``.
        reservation : Reservation, optional
            From :meth:`reserve_round` before training (taken now when not given); the model may
            already be saved in it (:meth:`save_round_model`).

        Returns
        -------
        dict
            The round's record.

        Raises
        ------
        UserError
            When the round cannot be registered; once the model is saved, the message says where it is.
        """
        res = reservation if reservation is not None else self.reserve_round()
        if not res.model_saved:
            try:
                self.save_round_model(res, model, save_model)
            except BaseException:
                self.release(res)
                raise
        try:
            with self._locked("tem-ij train"):  # another training may register its round at the same time
                return self._register(res, model, image_path, rois_path, stop_reason)
        except UserError as exc:
            raise UserError(
                f"{exc}; the trained model is saved as {res.model_path} but is not registered as a round of {self.root}"
            ) from exc

    def _register(self, res: Reservation, model, image_path, rois_path, stop_reason: str) -> dict:
        folder = res.folder
        name = Path(rois_path).name
        if name in (MODEL_FILE, ROUND_FILE, RESERVATION_FILE) or name.startswith("."):
            name = "annotations" + Path(rois_path).suffix
        rois_copy = folder / name
        try:
            shutil.copy2(rois_path, rois_copy)
        except OSError as exc:
            raise UserError(f"cannot copy the annotations to {rois_copy}: {exc.strerror or exc}") from exc
        last = model.last_round
        # Re-read project.json: another training may have registered a round meanwhile.
        fresh = Project.open(self.root)
        previous = None
        if res.parent is not None and any(r["round"] == res.parent for r in fresh.rounds):
            previous = fresh.round(res.parent)
        since = None
        if previous is not None:
            delta = _dt.datetime.fromisoformat(last["finished"]) - _dt.datetime.fromisoformat(previous["finished"])
            since = round(delta.total_seconds() - last["duration_s"], 1)
        record = {
            "round": res.number,
            "parent": res.parent if previous is not None else None,
            "finished": last["finished"],
            "model": f"{folder.name}/{MODEL_FILE}",
            "annotations": f"{folder.name}/{rois_copy.name}",
            "annotations_source": str(Path(rois_path).resolve()),
            "annotations_sha256": model.meta.get("annotations_sha256"),
            "image": str(Path(image_path).resolve()) if image_path is not None else None,
            "train_patches": last["train_patches"],
            "val_patches": last["val_patches"],
            "labelled_pixels": last["labelled_pixels"],
            "score": last["score"],
            "best_score": last["best_score"],
            "iterations": last["iterations"],
            "train_s": last["duration_s"],
            # Time between the parent round's end and this training's start: annotation, mostly.
            "since_parent_s": since,
            "stop_reason": stop_reason,
        }
        _write_json(folder / ROUND_FILE, record)
        if any(r["round"] == res.number for r in fresh.rounds):
            raise UserError(f"{self.root / PROJECT_FILE} already lists a round {res.number}")
        fresh.rounds.append(record)
        fresh.rounds.sort(key=lambda r: r["round"])
        fresh.data["current"] = res.number
        fresh.data["image"] = record["image"]
        fresh.data["classes"] = model.classes
        fresh.data["events"].append(
            {"time": _now(), "action": "train", "round": res.number, "parent": record["parent"]}
        )
        fresh.save()
        self.data = fresh.data
        try:
            (folder / RESERVATION_FILE).unlink()
        except OSError as exc:
            log.warning("could not remove %s (%s)", folder / RESERVATION_FILE, exc)
        return record

    def revert(self, number: int) -> dict:
        """Make round ``number`` current again; later rounds are kept.

        Refused when the round's ``round.json`` or model file is missing, damaged or disagrees.
        """
        record = self.verified_round(number)
        with self._locked("tem-ij revert"):
            self.data = Project.open(self.root).data  # as it is now, not as it was when opened
            before = self.current
            self.data["current"] = number
            self.data["events"].append({"time": _now(), "action": "revert", "round": number, "from": before})
            self.save()
        return record

    def _locked(self, command: str):
        """The lock on ``project.json`` (``project.lock``) for a read-modify-write; waits for another holder."""
        from .outputs import OutputLock

        return OutputLock(self.root / PROJECT_FILE, command, wait_s=60)

    def history(self) -> str:
        """The rounds as a text table (``*`` marks the current round)."""
        if not self.rounds:
            return f"{self.root}: no rounds yet"
        head = (
            f"{'':1s} {'round':>5s} {'from':>4s} {'finished (UTC)':19s} {'train':>5s} {'val':>3s} "
            f"{'labelled px':>11s} {'best':>6s} {'iters':>5s} {'train s':>7s} {'annot. s':>8s}  stop"
        )
        lines = [head]
        for r in self.rounds:
            best = "-" if r["best_score"] is None else f"{r['best_score']:.3f}"
            since = "-" if r["since_parent_s"] is None else f"{r['since_parent_s']:.0f}"
            lines.append(
                f"{'*' if r['round'] == self.current else '':1s} {r['round']:5d} {r['parent'] or '-':>4} "
                f"{r['finished'][:19].replace('T', ' '):19s} {len(r['train_patches']):5d} {len(r['val_patches']):3d} "
                f"{sum(r['labelled_pixels'].values()):11d} {best:>6s} {r['iterations']:5d} {r['train_s']:7.0f} "
                f"{since:>8s}  {r['stop_reason']}"
            )
        reverts = [e for e in self.data["events"] if e["action"] == "revert"]
        for e in reverts:
            lines.append(f"reverted to round {e['round']} (from {e['from']}) at {e['time'][:19].replace('T', ' ')}")
        lines.append(
            "best = validation mIoU on held-out annotated patches (rounds with fewer than 3 patches have "
            "no validation: best = -training loss)"
        )
        return "\n".join(lines)
