"""cellpose's files without cellpose: masks in as training labels (hostile pickles refused), _seg.npy out."""

import numpy as np
import pytest
from conftest import run_cli, sha256
from scipy import ndimage as ndi

from tem_ij_plugin.cellpose_files import (
    is_cellpose_masks,
    labels_from_masks,
    outlines,
    read_seg_masks,
    write_seg_npy,
)
from tem_ij_plugin.errors import UserError


def _masks():
    """Two cells that touch along x = 10 and one apart, on a 20 x 30 plane."""
    m = np.zeros((1, 20, 30), np.int64)
    m[0, 2:8, 2:10], m[0, 2:8, 10:15], m[0, 12:18, 3:9] = 1, 2, 3
    return m


class _Touch:
    """A pickle payload that would create a file when unpickled (what a hostile _seg.npy does)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.path),))


def test_a_seg_npy_we_write_reads_back_as_its_masks(tmp_path):
    write_seg_npy(tmp_path / "x_seg.npy", _masks(), tmp_path / "x.tif")
    np.testing.assert_array_equal(read_seg_masks(tmp_path / "x_seg.npy"), _masks())


def test_a_seg_npy_holds_what_the_cellpose_gui_reads(tmp_path):
    write_seg_npy(tmp_path / "x_seg.npy", _masks(), tmp_path / "x.tif")
    data = np.load(tmp_path / "x_seg.npy", allow_pickle=True).item()
    assert data["masks"].shape == (20, 30)  # one plane is 2-D, as cellpose's 2-D GUI expects
    assert data["masks"].dtype == np.uint16
    assert data["outlines"].shape == (20, 30)
    assert data["ismanual"].shape == (3,)
    assert data["filename"] == str((tmp_path / "x.tif").resolve())


def test_outlines_are_each_cells_pixels_next_to_another_value():
    m = _masks()
    expected = np.zeros_like(m)
    for i in (1, 2, 3):
        cell = m[0] == i
        expected[0][cell & ~ndi.binary_erosion(cell, border_value=0)] = i
    np.testing.assert_array_equal(outlines(m), expected)


def test_masks_become_labels_of_every_pixel_with_the_contact_line_outside():
    labels = labels_from_masks(_masks(), ["background", "cell"]).labels
    assert (labels >= 0).all()
    assert (labels[0, 2:8, 9:11] == 0).all()  # both sides of the line where cells 1 and 2 touch
    assert (labels[0, 2:8, 2:9] == 1).all()
    assert (labels[0, 0] == 0).all()


def test_masks_need_exactly_two_classes():
    with pytest.raises(UserError, match="two classes"):
        labels_from_masks(_masks(), ["background", "membrane", "cell"])


@pytest.mark.parametrize(
    ("name", "ours"),
    [("a_seg.npy", True), ("a_cp_masks.tif", True), ("a_masks.png", True), ("a.tif", False), ("seg.npy", False)],
)
def test_cellpose_files_are_known_by_their_names(name, ours):
    assert is_cellpose_masks(name) == ours


def test_a_hostile_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    np.save(tmp_path / "x_seg.npy", np.array({"masks": _Touch(marker)}, dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="never unpickled"):
        read_seg_masks(tmp_path / "x_seg.npy")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"outlines": np.zeros((4, 4), np.uint16)}, "holds no cellpose masks"),
        ({"masks": np.full((4, 4), -1)}, "negative ids"),
        ({"masks": np.full((4, 4), 0.5)}, "not whole numbers"),
        ({"masks": "cells"}, "holds no cellpose masks"),
    ],
)
def test_foreign_seg_npy_content_is_refused(tmp_path, content, message):
    np.save(tmp_path / "x_seg.npy", np.array(content, dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match=message):
        read_seg_masks(tmp_path / "x_seg.npy")


def test_a_truncated_seg_npy_is_refused(tmp_path):
    write_seg_npy(tmp_path / "full_seg.npy", _masks())
    (tmp_path / "x_seg.npy").write_bytes((tmp_path / "full_seg.npy").read_bytes()[:300])
    with pytest.raises(UserError, match="not a readable .npy"):
        read_seg_masks(tmp_path / "x_seg.npy")


def test_a_plain_integer_npy_is_read_as_masks(tmp_path):
    np.save(tmp_path / "x_seg.npy", _masks()[0])
    np.testing.assert_array_equal(read_seg_masks(tmp_path / "x_seg.npy"), _masks())


# -- through tem-ij -------------------------------------------------------------------------------


@pytest.fixture()
def cellpose_masks(files, synthetic):
    """The synthetic cells as cellpose masks: one id per connected cell."""
    truth = synthetic[1]
    masks, _ = ndi.label(truth == 1)
    return masks[None]


def test_train_from_a_cellpose_seg_npy(files, cellpose_masks, capsys):
    from tem_ij_plugin.modelio import load_model

    write_seg_npy(files["dir"] / "image_seg.npy", cellpose_masks, files["image"])
    out = files["dir"] / "m.model"
    code, _, err = run_cli(
        capsys, "train", files["image"], "--labels", files["dir"] / "image_seg.npy", "-o", out,
        "--config", files["config"],
    )  # fmt: skip
    assert code == 0, err
    assert load_model(out).classes == ["background", "cell"]


def test_a_cellpose_masks_tiff_trains_like_its_seg_npy(files, cellpose_masks, capsys):
    from tem_ij_plugin.io import write_hyperstack
    from tem_ij_plugin.modelio import load_model

    write_seg_npy(files["dir"] / "image_seg.npy", cellpose_masks, files["image"])
    write_hyperstack(files["dir"] / "image_cp_masks.tif", cellpose_masks.astype(np.uint16))
    pixels = []
    for name in ("image_seg.npy", "image_cp_masks.tif"):
        out = files["dir"] / f"{name}.model"
        argv = ["train", files["image"], "--labels", files["dir"] / name, "-o", out, "--config", files["config"]]
        code, _, err = run_cli(capsys, *argv)
        assert code == 0, err
        pixels.append(load_model(out).last_round["labelled_pixels"])
    assert pixels[0] == pixels[1]


def test_a_hostile_seg_npy_is_exit_2_and_never_runs(files, capsys):
    marker = files["dir"] / "pwned"
    hostile = files["dir"] / "image_seg.npy"
    np.save(hostile, np.array({"masks": _Touch(marker)}, dtype=object), allow_pickle=True)
    before = sha256(hostile)
    code, _, err = run_cli(capsys, "train", files["image"], "--labels", hostile, "-o", files["dir"] / "m.model")
    assert code == 2
    assert "never unpickled" in err
    assert "Traceback" not in err
    assert not marker.exists()
    assert sha256(hostile) == before
