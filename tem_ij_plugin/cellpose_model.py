"""A user's own cellpose model file, run on one plane at a time (the optional ``[cellpose]`` extra).

cellpose is imported here only, when ``tem-ij objects --method cellpose`` asks for it. Only a local
file is ever loaded: cellpose itself falls back to downloading its default model when it is given a
path that does not exist or a built-in model name, so the path is checked first and passed resolved.
Tested with cellpose 3.1; cellpose 4 loads its own model files through the same calls but is not
tested here (it cannot build a model without downloaded weights).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .errors import UserError

log = logging.getLogger(__name__)
TESTED_MAJOR = "3"


class CellposeSegmenter:
    """cellpose's masks for a greyscale plane, from a model file of the user's.

    Parameters
    ----------
    path : path
        A cellpose model file (``torch.save`` of its network's weights, as cellpose's training writes).
    device : str
        ``cpu``, ``cuda`` or ``cuda:N``.
    diameter : float, optional
        Cell diameter in pixels; default the model's own (the mean of its training masks).

    Raises
    ------
    UserError
        cellpose is not installed, the file is missing, or it is not a cellpose model.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", diameter: float | None = None):
        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"the cellpose model {path} is not a file (give your own model's file; nothing is downloaded)"
            )
        try:
            import cellpose
            import torch
            from cellpose import models
        except ImportError as exc:
            raise UserError(f"--method cellpose needs cellpose: pip install 'tem-ij-plugin[cellpose]' ({exc})") from exc
        version = getattr(cellpose, "version", None) or "unknown"
        if not str(version).startswith(TESTED_MAJOR):
            log.warning("cellpose %s is untested here (tested: %s.x)", version, TESTED_MAJOR)
        dev = torch.device("cpu" if device == "auto" else device)
        try:
            self._model = models.CellposeModel(pretrained_model=str(path.resolve()), device=dev, gpu=dev.type == "cuda")
        except Exception as exc:  # a foreign file: torch, cellpose and its asserts raise many kinds
            raise UserError(f"{path} is not a cellpose model file ({type(exc).__name__}: {exc})") from exc
        self.diameter = diameter

    def __call__(self, plane: np.ndarray) -> np.ndarray:
        """Instance masks (Y, X) of one greyscale plane (0 = no cell)."""
        masks = self._model.eval(plane.astype(np.float32), channels=[0, 0], diameter=self.diameter)[0]
        return np.asarray(masks, dtype=np.int64)
