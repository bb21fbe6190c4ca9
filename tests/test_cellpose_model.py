"""`tem-ij objects --method cellpose` with a real cellpose 3 model trained from scratch here.

cellpose 3 pins numpy < 2.1, so it runs in the environment of ``.ci/setup-cellpose`` (which sees this
one's packages); these tests skip without it, unless ``TEM_IJ_REQUIRE_CELLPOSE=1`` (set by .ci/run).
"""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import roifile
import tifffile
from conftest import tiny_settings

HERE = Path(__file__).parent
VENV = Path(os.environ.get("TEM_IJ_CELLPOSE_VENV", Path.home() / ".cache" / "tem-ij" / "cellpose-venv"))
EPOCHS = 60


def _cellpose_python() -> Path:
    python = VENV / "bin" / "python"
    probe = ["-c", "import cellpose, tem_ij_plugin"]
    if python.exists() and subprocess.run([python, *probe], capture_output=True).returncode == 0:
        return python
    if os.environ.get("TEM_IJ_REQUIRE_CELLPOSE") == "1":
        pytest.fail(f"no cellpose environment at {VENV}: run bash .ci/setup-cellpose")
    pytest.skip(f"no cellpose environment at {VENV} (bash .ci/setup-cellpose)")


def _objects(python, *argv):
    cmd = [python, "-m", "tem_ij_plugin", "objects", *map(str, argv), "--device", "cpu"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A cellpose model trained here, our tiny model, the image and its probability map."""
    from tem_ij_plugin.cli import main
    from tem_ij_plugin.config import dump_settings
    from tem_ij_plugin.io import write_hyperstack, write_rois
    from tem_ij_plugin.synthetic import SYNTHETIC_CLASSES, make_tem_image, simulate_annotations

    python = _cellpose_python()
    d = tmp_path_factory.mktemp("cellpose")
    trained = subprocess.run(
        [python, HERE / "cellpose_tiny_model.py", d, str(EPOCHS)], capture_output=True, text=True, cwd=d, timeout=900
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    image, truth = make_tem_image(256, 256, seed=9, cell_radius=30)
    write_hyperstack(d / "image.tif", image[None])
    boxes = [(0, 0, 128, 128), (0, 128, 128, 256), (128, 0, 256, 128), (128, 128, 256, 256)]
    write_rois(d / "RoiSet.zip", simulate_annotations(truth, boxes, SYNTHETIC_CLASSES, np.random.default_rng(0)))
    (d / "tiny.yaml").write_text(dump_settings(tiny_settings(40)))
    train = ["train", d / "image.tif", "--rois", d / "RoiSet.zip", "--config", d / "tiny.yaml", "-o", d / "m.model"]
    assert main([str(a) for a in [*train, "--device", "cpu"]]) == 0
    assert main([str(a) for a in ["predict", d / "m.model", d / "image.tif", "-o", d / "probs.tif"]]) == 0
    return {"python": python, "dir": d, "cellpose": Path(trained.stdout.strip().splitlines()[-1])}


@pytest.fixture(scope="module")
def found(case):
    d = case["dir"]
    done = _objects(
        case["python"], d / "m.model", d / "image.tif", "--method", "cellpose", "--cellpose-model", case["cellpose"],
        "-o", d / "cells.tif", "--rois", d / "cells.zip", "--proposals",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return tifffile.imread(d / "cells.tif")


def test_the_cellpose_model_finds_cells(found):
    assert found.max() >= 1


def test_cellpose_objects_lie_inside_the_class(case, found):
    probs = tifffile.imread(case["dir"] / "probs.tif")
    cell = np.squeeze(probs).argmax(0) == 1
    assert not found[~cell].any()


def test_cellpose_proposals_are_named_for_review(case, found):
    names = [r.name for r in roifile.roiread(case["dir"] / "cells.zip")]
    assert names == [f"proposal-{i}" for i in range(1, int(found.max()) + 1)]


def test_a_file_that_is_not_a_cellpose_model_is_exit_2(case, tmp_path):
    (tmp_path / "foreign.model").write_bytes(os.urandom(4096))
    d = case["dir"]
    done = _objects(
        case["python"], d / "m.model", d / "image.tif", "--method", "cellpose", "--cellpose-model",
        tmp_path / "foreign.model", "--rois", tmp_path / "c.zip",
    )  # fmt: skip
    assert done.returncode == 2
    assert "not a cellpose model file" in done.stderr
    assert "Traceback" not in done.stderr
