"""Shared fixtures: small synthetic TEM images with real TIFF and RoiSet.zip files on disk."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from tem_ij_plugin.config import Settings

ISBI = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True, scope="session")
def _own_graph_cache(tmp_path_factory):
    """Exported ONNX graphs go to a folder of this test run, not the user's cache (subprocesses inherit it)."""
    import os

    old = os.environ.get("TEM_IJ_CACHE")
    os.environ["TEM_IJ_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("TEM_IJ_CACHE", None)
    else:
        os.environ["TEM_IJ_CACHE"] = old


# Run in cellpose's own environment by test_cellpose_model.py, never imported here (it imports cellpose).
collect_ignore = ["cellpose_tiny_model.py"]


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_cli(capsys, *argv):
    """Run ``tem-ij`` in-process; returns (exit status, stdout, stderr)."""
    from tem_ij_plugin.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tiny_settings(iterations: int = 12, validation_patches: int | None = 1) -> Settings:
    """Settings for a model small and quick enough for unit tests."""
    s = Settings()
    s.model.depth = 2
    s.model.base_channels = 8
    s.model.steps = 2
    s.train.max_iterations = iterations
    s.train.batch_size = 2
    s.train.crop_size = 64
    s.train.eval_every = 4
    s.train.min_iterations = 0
    # The fixtures annotate a handful of 128-pixel patches, where the default holds none out (it starts
    # at 8): one validation patch keeps early stopping, selection and warm starts under test.
    s.train.validation_patches = validation_patches
    s.patches.size = 128
    return s


@pytest.fixture(scope="session")
def synthetic():
    """A 256x256 synthetic TEM image, its truth and partial polygon annotations on four 128 px patches."""
    from tem_ij_plugin.synthetic import SYNTHETIC_CLASSES, make_tem_image, simulate_annotations

    image, truth = make_tem_image(256, 256, seed=3, cell_radius=30)
    rng = np.random.default_rng(0)
    boxes = [(0, 0, 128, 128), (0, 128, 128, 256), (128, 0, 256, 128), (128, 128, 256, 256)]
    shapes = simulate_annotations(truth, boxes, SYNTHETIC_CLASSES, rng)
    return image, truth, shapes


@pytest.fixture()
def files(tmp_path, synthetic):
    """The synthetic image as image.tif and its annotations as RoiSet.zip in a temporary folder."""
    from tem_ij_plugin.io import Calibration, write_hyperstack, write_rois

    image, _, shapes = synthetic
    img = tmp_path / "image.tif"
    write_hyperstack(img, image[None], Calibration(0.005, 0.005, "µm"))
    rois = tmp_path / "RoiSet.zip"
    write_rois(rois, shapes)
    cfg = tmp_path / "tiny.yaml"
    from tem_ij_plugin.config import dump_settings

    cfg.write_text(dump_settings(tiny_settings()))
    return {"image": img, "rois": rois, "config": cfg, "dir": tmp_path}


def tree_digest(folder) -> dict:
    """Every file (relative path -> SHA-256) and folder under ``folder``: what a refusal must leave as it was."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): sha256(p) if p.is_file() else "folder" for p in sorted(folder.rglob("*"))}


def assert_refused(code: int, err: str, before: dict, after: dict, *needles: str) -> None:
    """A hostile or broken input was refused the way users are promised.

    Exit status 2, exactly one ``error:`` message and no traceback on stderr, the message names
    every needle (the file and the problem, case-insensitive), and the folder holding the inputs is
    byte-identical with nothing stray left in it (``before``/``after`` from :func:`tree_digest`).
    """
    assert code == 2
    assert "Traceback" not in err
    assert err.count(": error: ") == 1
    message = err[err.index(": error: ") :].lower()
    for needle in needles:
        assert str(needle).lower() in message, f"{needle!r} not in {message!r}"
    assert after == before
