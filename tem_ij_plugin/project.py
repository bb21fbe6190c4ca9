"""Annotation rounds kept in a project folder: what each round used, produced and scored.

A project folder holds ``project.json`` and one folder per round (``round-001/`` ...) with the model
(``round.model``), a copy of the annotations it learnt from and ``round.json``. One round is
*current*: the next training warm-starts from its model, and ``revert`` makes an earlier round
current again. Nothing is ever deleted: reverting only moves the pointer, and the rounds after it
stay on disk and in the history.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path

from .errors import UserError

PROJECT_FILE = "project.json"
FORMAT = "tem_ij_plugin project"
FORMAT_VERSION = 1


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
        """Open a project folder, creating it (and ``project.json``) when ``create`` is true."""
        root = Path(root)
        path = root / PROJECT_FILE
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise UserError(f"{path} is unreadable or corrupt ({exc})") from exc
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise UserError(f"{path} is not a tem_ij_plugin project file")
            if data.get("format_version", 0) > FORMAT_VERSION:
                raise UserError(f"{path} was written by a newer tem_ij_plugin; update it to use this project")
            return cls(root, data)
        if not create:
            if root.is_dir():
                raise UserError(f"{root} is not a project folder (no {PROJECT_FILE}); train with --project {root}")
            raise UserError(f"{root}: no such project folder")
        if root.exists() and not root.is_dir():
            raise UserError(f"cannot use {root} as a project folder: it is a file")
        if root.is_dir() and any(root.iterdir()):
            raise UserError(f"{root} is a non-empty folder without {PROJECT_FILE}; choose a new or empty folder")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the project folder {root}: {exc.strerror or exc}") from exc
        project = cls(
            root,
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "created": _now(),
                "image": None,
                "classes": None,
                "current": None,
                "rounds": [],
                "events": [],
            },
        )
        project.save()
        return project

    @property
    def rounds(self) -> list:
        return self.data["rounds"]

    @property
    def current(self) -> int | None:
        return self.data["current"]

    def round(self, number: int) -> dict:
        """The record of round ``number`` (1-based)."""
        for r in self.rounds:
            if r["round"] == number:
                return r
        have = ", ".join(str(r["round"]) for r in self.rounds) or "none yet"
        raise UserError(f"{self.root} has no round {number} (rounds: {have})")

    def current_model_path(self) -> Path | None:
        """The model of the current round, or None before the first round."""
        if self.current is None:
            return None
        return self.root / self.round(self.current)["model"]

    def save(self) -> None:
        """Write ``project.json`` atomically."""
        path = self.root / PROJECT_FILE
        tmp = path.with_name(f".{PROJECT_FILE}.partial")
        try:
            tmp.write_text(json.dumps(self.data, indent=1), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def add_round(self, model, image_path, rois_path, stop_reason: str, save_model) -> dict:
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

        Returns
        -------
        dict
            The round's record.
        """
        number = max((r["round"] for r in self.rounds), default=0) + 1
        folder = self.root / f"round-{number:03d}"
        try:
            folder.mkdir()
            rois_copy = folder / Path(rois_path).name
            shutil.copy2(rois_path, rois_copy)
        except FileExistsError as exc:
            raise UserError(f"{folder} exists but is not in {PROJECT_FILE}; move it away first") from exc
        except OSError as exc:
            raise UserError(f"cannot write the round folder {folder}: {exc.strerror or exc}") from exc
        save_model(folder / "round.model", model)
        last = model.meta["history"]["rounds"][-1]
        previous = self.round(self.current) if self.current is not None else None
        since = None
        if previous is not None:
            delta = _dt.datetime.fromisoformat(last["finished"]) - _dt.datetime.fromisoformat(previous["finished"])
            since = round(delta.total_seconds() - last["duration_s"], 1)
        record = {
            "round": number,
            "parent": self.current,
            "finished": last["finished"],
            "model": f"{folder.name}/round.model",
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
        (folder / "round.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
        self.rounds.append(record)
        self.data["current"] = number
        self.data["image"] = record["image"]
        self.data["classes"] = model.classes
        self.data["events"].append({"time": _now(), "action": "train", "round": number, "parent": record["parent"]})
        self.save()
        return record

    def revert(self, number: int) -> dict:
        """Make round ``number`` current again; later rounds are kept."""
        record = self.round(number)
        before = self.current
        self.data["current"] = number
        self.data["events"].append({"time": _now(), "action": "revert", "round": number, "from": before})
        self.save()
        return record

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
