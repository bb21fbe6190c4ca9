"""Labkit's labelings as training labels: the label names give the classes; damaged files are exit 2.

The files are written here the way labkit-ui's LabelingSerializer writes them (Labkit itself needs a
full Fiji, which cannot run on these machines).
"""

import json

import numpy as np
import pytest
from conftest import assert_refused, run_cli, tree_digest

from tem_ij_plugin.errors import UserError
from tem_ij_plugin.io import write_hyperstack
from tem_ij_plugin.labkit_files import is_labkit, read_labkit


def write_labeling(path, labels: dict, size: tuple, low: tuple | None = None) -> None:
    """A ``.labeling`` as Labkit saves it: the interval, pixel sizes, each label's pixels (x first), colours."""
    low = low or (0,) * len(size)
    high = [lo + s - 1 for lo, s in zip(low, size)]
    doc = {
        "interval": {"min": list(low), "max": high, "n": len(size)},
        "pixelSizes": [{"size": 1.0, "unit": "pixel"} for _ in size],
        "labels": {name: [list(p) for p in points] for name, points in labels.items()},
        "colors": {name: "#FF0000" for name in labels},
    }
    path.write_text(json.dumps(doc))


def _two_classes():
    return {"background": [(0, 0), (1, 0)], "cell": [(5, 2), (6, 2), (5, 3)]}


def test_a_labeling_labels_the_pixels_it_lists_x_first(tmp_path):
    write_labeling(tmp_path / "a.labeling", _two_classes(), (8, 4))
    labels = read_labkit(tmp_path / "a.labeling", None)
    assert labels.labels.shape == (1, 4, 8)
    assert labels.labels[0, 2, 5] == labels.classes.index("cell")


def test_a_labeling_leaves_every_pixel_it_does_not_list_unlabelled(tmp_path):
    write_labeling(tmp_path / "a.labeling", _two_classes(), (8, 4))
    assert int((read_labkit(tmp_path / "a.labeling", None).labels >= 0).sum()) == 5


def test_the_label_names_give_the_classes_background_first(tmp_path):
    write_labeling(tmp_path / "a.labeling", {"Mito 2": [(0, 0)], "cell": [(1, 1)], "bg": [(2, 2)]}, (4, 4))
    assert read_labkit(tmp_path / "a.labeling", None).classes == ["background", "cell", "mito"]


def test_a_3d_labeling_labels_the_plane_of_its_third_coordinate(tmp_path):
    write_labeling(tmp_path / "a.labeling", {"background": [(0, 0, 0)], "cell": [(3, 1, 2)]}, (4, 4, 3))
    labels = read_labkit(tmp_path / "a.labeling", None).labels
    assert labels[2, 1, 3] == 1


def test_positions_count_from_the_intervals_minimum(tmp_path):
    write_labeling(tmp_path / "a.labeling", {"background": [(10, 20)], "cell": [(12, 21)]}, (4, 4), low=(10, 20))
    assert read_labkit(tmp_path / "a.labeling", None).labels[0, 1, 2] == 1


def test_a_pixel_two_classes_claim_is_left_unlabelled_with_a_warning(tmp_path):
    write_labeling(tmp_path / "a.labeling", {"background": [(0, 0), (1, 1)], "cell": [(1, 1), (2, 2)]}, (4, 4))
    labels = read_labkit(tmp_path / "a.labeling", None)
    assert labels.labels[0, 1, 1] == -1
    assert "1 pixel(s) carry labels of two classes" in labels.warnings[0]


def test_two_labels_of_one_class_may_overlap(tmp_path):
    write_labeling(tmp_path / "a.labeling", {"bg": [(0, 0)], "cell 1": [(1, 1)], "cell 2": [(1, 1)]}, (4, 4))
    assert read_labkit(tmp_path / "a.labeling", None).labels[0, 1, 1] == 1


def test_a_label_nobody_painted_needs_no_class(tmp_path):
    write_labeling(tmp_path / "a.labeling", {**_two_classes(), "mito": []}, (8, 4))
    assert read_labkit(tmp_path / "a.labeling", ["background", "cell"]).classes == ["background", "cell"]


def test_ignore_leaves_its_pixels_out_even_under_another_label(tmp_path):
    labels = {"background": [(0, 0), (3, 3)], "cell": [(1, 1), (2, 2)], "ignore": [(2, 2)]}
    write_labeling(tmp_path / "a.labeling", labels, (4, 4))
    assert read_labkit(tmp_path / "a.labeling", None).labels[0, 2, 2] == -1


def test_given_classes_keep_their_order(tmp_path):
    write_labeling(tmp_path / "a.labeling", _two_classes(), (8, 4))
    labels = read_labkit(tmp_path / "a.labeling", ["background", "mito", "cell"])
    assert labels.labels[0, 2, 5] == 2


def test_a_label_outside_the_given_classes_is_refused(tmp_path):
    write_labeling(tmp_path / "a.labeling", {"background": [(0, 0)], "foreground": [(1, 1)]}, (4, 4))
    with pytest.raises(UserError, match=r"unknown class\(es\) foreground in label\(s\) 'foreground'"):
        read_labkit(tmp_path / "a.labeling", ["background", "cell"])


def test_an_index_image_reads_its_names_from_the_labels_file_beside_it(tmp_path):
    values = np.zeros((1, 4, 6), np.uint8)
    values[0, 1, 1], values[0, 2, 4] = 1, 2
    write_hyperstack(tmp_path / "a.tif", values)
    (tmp_path / "a.tif.labels").write_text(json.dumps({"labelSets": [[], ["bg"], ["cell"]]}))
    labels = read_labkit(tmp_path / "a.tif", None)
    assert labels.labels[0, 2, 4] == labels.classes.index("cell")


def test_an_index_with_labels_of_two_classes_is_left_unlabelled(tmp_path):
    values = np.zeros((1, 4, 6), np.uint8)
    values[0, 1, 1], values[0, 2, 4], values[0, 3, 3] = 1, 2, 3
    write_hyperstack(tmp_path / "a.tif", values)
    (tmp_path / "a.tif.labels").write_text(json.dumps({"labelSets": [[], ["bg"], ["cell"], ["bg", "cell"]]}))
    assert read_labkit(tmp_path / "a.tif", None).labels[0, 3, 3] == -1


@pytest.mark.parametrize(
    ("name", "beside", "labkit"),
    [("a.labeling", None, True), ("a.tif", "a.tif.labels", True), ("a.tif", None, False), ("a.tif", "a.labels", False)],
)
def test_labkit_files_are_known_by_name_or_by_the_file_beside_them(tmp_path, name, beside, labkit):
    if beside:
        (tmp_path / beside).write_text("{}")
    assert is_labkit(tmp_path / name) == labkit


# -- hostile and damaged files ----------------------------------------------------------------------


def _nested(depth):
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json {", "not valid JSON"),
        ('{"labels": ' + _nested(5000) + "}", "nested"),
        ('{"labels": {"cell": [[0, 0]]}}', "interval"),
        ('{"interval": {"min": [0, 0], "max": [3, 3]}, "labels": {"cell": [[0, 0], [9, 1]]}}', "outside"),
        ('{"interval": {"min": [0, 0], "max": [3, 3]}, "labels": {"cell": [[0, 0], [1]]}}', "whole-number"),
        ('{"interval": {"min": [0, 0], "max": [3, 3]}, "labels": {"cell": [[0.5, 0]]}}', "whole-number"),
        ('{"interval": {"min": [0, 0], "max": [3, -1]}, "labels": {}}', "not a box"),
        ('{"interval": {"min": [0, 0], "max": [99999999, 99999999]}, "labels": {}}', "more than we read"),
        ('{"interval": {"min": [0, 0], "max": [3, 3]}, "labels": {"17": [[0, 0]], "bg": [[1, 1]]}}', "no class"),
        ('{"interval": {"min": [0, 0], "max": [3, 3]}, "labels": {"cell": [[0, 0]]}}', "one class"),
    ],
)
def test_a_damaged_labeling_is_refused_with_one_message(tmp_path, text, message):
    (tmp_path / "a.labeling").write_text(text)
    with pytest.raises(UserError, match=message):
        read_labkit(tmp_path / "a.labeling", None)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"labelSets": [[], ["cell"]]}, r"values 0\.\.2"),
        ({"labelSets": "cell"}, "not a Labkit labeling"),
        ({"sets": [[]]}, "not a Labkit labeling"),
    ],
)
def test_an_index_image_its_labels_file_does_not_describe_is_refused(tmp_path, sets, message):
    write_hyperstack(tmp_path / "a.tif", np.arange(3, dtype=np.uint8).reshape(1, 1, 3))
    (tmp_path / "a.tif.labels").write_text(json.dumps(sets))
    with pytest.raises(UserError, match=message):
        read_labkit(tmp_path / "a.tif", None)


# -- through tem-ij ---------------------------------------------------------------------------------


def _as_labeling(path, truth, step: int = 9) -> None:
    """Every ``step``-th pixel of the truth's two classes as a Labkit labeling of the image."""
    ys, xs = np.mgrid[0 : truth.shape[0] : step, 0 : truth.shape[1] : step]
    names = {0: "background", 1: "cell"}
    labels = {name: [(int(x), int(y)) for y, x in zip(ys.ravel(), xs.ravel()) if truth[y, x] == k]
              for k, name in names.items()}  # fmt: skip
    write_labeling(path, labels, (truth.shape[1], truth.shape[0]))


def test_train_from_a_labeling_takes_its_classes_from_the_file(files, synthetic, capsys):
    from tem_ij_plugin.modelio import load_model

    _as_labeling(files["dir"] / "image.labeling", synthetic[1])
    out = files["dir"] / "m.model"
    labeling, config = files["dir"] / "image.labeling", files["config"]
    code, _, err = run_cli(capsys, "train", files["image"], "--labels", labeling, "-o", out, "--config", config)
    assert code == 0, err
    assert load_model(out).classes == ["background", "cell"]


def test_a_labeling_trains_on_the_pixels_of_the_same_label_image(files, synthetic, capsys):
    from tem_ij_plugin.modelio import load_model

    _as_labeling(files["dir"] / "image.labeling", synthetic[1])
    values = np.zeros((1, *synthetic[1].shape), np.uint8)
    values[0, ::9, ::9] = synthetic[1][::9, ::9] + 1
    write_hyperstack(files["dir"] / "labels.tif", values)
    pixels = []
    for labels, extra in (("image.labeling", []), ("labels.tif", ["--classes", "background,cell"])):
        out = files["dir"] / f"{labels}.model"
        argv = ["train", files["image"], "--labels", files["dir"] / labels, "-o", out, "--config", files["config"]]
        code, _, err = run_cli(capsys, *argv, *extra)
        assert code == 0, err
        pixels.append(load_model(out).last_round["labelled_pixels"])
    assert pixels[0] == pixels[1]


def test_a_labeling_outside_the_image_is_exit_2_and_changes_nothing(files, capsys):
    write_labeling(files["dir"] / "image.labeling", {"background": [(0, 0)], "cell": [(5, 5)]}, (100, 100))
    before = tree_digest(files["dir"])
    argv = ["train", files["image"], "--labels", files["dir"] / "image.labeling", "-o", files["dir"] / "m.model"]
    code, _, err = run_cli(capsys, *argv)
    assert_refused(code, err, before, tree_digest(files["dir"]), "label image is 1x100x100")
