"""Objects: watershed splits, hole filling, outlines that hold exactly their pixels, measurements, `tem-ij objects`."""

import csv
import zipfile

import numpy as np
import pytest
import roifile
import tifffile
from conftest import run_cli, sha256, tiny_settings
from matplotlib.path import Path as PolygonPath

from tem_ij_plugin.io import Calibration, write_hyperstack
from tem_ij_plugin.objects import (
    ObjectSettings,
    label_plane,
    measure,
    object_outlines,
    outline,
    slice_summary,
    unit_suffix,
)


def _probs(cell: np.ndarray) -> np.ndarray:
    """Two-class probabilities (background, cell) from a cell probability map."""
    return np.stack([1 - cell, cell]).astype(np.float32)


def _disks(shape, centres, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return [(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2 for cy, cx in centres]


def _pixels_inside(xy, shape):
    """The pixels whose centres lie inside a polygon of pixel corners (ImageJ's rule for a polygon's mask)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    centres = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1)
    return PolygonPath(xy).contains_points(centres).reshape(shape)


def test_touching_cells_split_where_the_probability_dips():
    a, b = _disks((60, 80), [(30, 25), (30, 52)], 15)
    cell = np.where(a | b, 0.95, 0.05)
    cell[a & b] = 0.6  # still the cell class, but the model is unsure where the two touch
    cell[:, 38:40][(a | b)[:, 38:40]] = 0.6
    probs = _probs(cell)
    assert label_plane(probs, 1, ObjectSettings(min_area=10)).max() == 2
    assert label_plane(probs, 1, ObjectSettings(min_area=10, split="none")).max() == 1


def test_the_distance_split_cuts_a_figure_of_eight():
    a, b = _disks((60, 90), [(30, 25), (30, 58)], 18)
    probs = _probs(np.where(a | b, 0.99, 0.01))  # no dip in the evidence: only the shape says two
    assert label_plane(probs, 1, ObjectSettings(min_area=10, split="distance")).max() == 2


def test_small_objects_are_dropped():
    (a,) = _disks((40, 40), [(20, 20)], 3)  # 29 pixels
    probs = _probs(np.where(a, 0.9, 0.1))
    assert label_plane(probs, 1, ObjectSettings(min_area=30)).max() == 0
    assert label_plane(probs, 1, ObjectSettings(min_area=29)).max() == 1


def test_holes_and_objects_inside_them_become_part_of_the_enclosing_object():
    (outer,) = _disks((50, 50), [(25, 25)], 20)
    (hole,) = _disks((50, 50), [(25, 25)], 10)
    (speck,) = _disks((50, 50), [(25, 25)], 4)
    cell = np.where(outer & ~hole | speck, 0.9, 0.1)
    filled = label_plane(_probs(cell), 1, ObjectSettings(min_area=5))
    kept = label_plane(_probs(cell), 1, ObjectSettings(min_area=5, fill_holes=False))
    assert filled.max() == 1
    assert (filled == 1).sum() == outer.sum()
    assert kept.max() == 2  # the ring and the speck inside it


def test_a_hole_two_objects_enclose_together_is_not_filled():
    (outer,) = _disks((50, 50), [(25, 25)], 20)
    (hole,) = _disks((50, 50), [(25, 25)], 8)
    ring = outer & ~hole
    cell = np.where(ring, 0.95, 0.05)
    cell[:, 24:26][ring[:, 24:26]] = 0.6  # the left and right halves of the ring are two cells
    labels = label_plane(_probs(cell), 1, ObjectSettings(min_area=5))
    assert labels.max() == 2
    assert (labels > 0).sum() == ring.sum()


def test_ids_run_in_raster_order():
    a, b, c = _disks((50, 50), [(40, 10), (10, 40), (10, 10)], 5)
    labels = label_plane(_probs(np.where(a | b | c, 0.9, 0.1)), 1, ObjectSettings(min_area=5))
    assert [labels[10, 10], labels[10, 40], labels[40, 10]] == [1, 2, 3]


@pytest.mark.parametrize("seed", range(6))
def test_an_outline_holds_exactly_the_pixels_of_its_object(seed):
    rng = np.random.default_rng(seed)
    probs = _probs(np.where(rng.random((30, 34)) < 0.6, 0.9, 0.1))  # ragged shapes, corner contacts, holes
    labels = label_plane(probs, 1, ObjectSettings(min_area=3, split="none"))
    for i, xy in object_outlines(labels).items():
        np.testing.assert_array_equal(_pixels_inside(xy, labels.shape), labels == i)


def test_an_outline_keeps_only_its_corners():
    mask = np.zeros((5, 6), bool)
    mask[1:4, 1:5] = True
    assert outline(mask).tolist() == [[1, 1], [5, 1], [5, 4], [1, 4]]


def test_measurements_are_calibrated():
    mask = np.zeros((20, 30), np.int32)
    mask[2:6, 3:11] = 1  # 4 x 8 pixels
    image = np.arange(600, dtype=np.uint16).reshape(20, 30)
    prob = np.full((20, 30), 0.75, np.float32)
    (row,) = measure(mask, 0, Calibration(0.5, 0.5, "µm"), image, prob, first_id=10)
    assert row["id"] == 11
    assert row["area"] == pytest.approx(32 * 0.25)
    assert row["x"] == pytest.approx(7.0 * 0.5)  # the centre of pixels 3..10 is 7 (6.5 + 0.5)
    assert row["y"] == pytest.approx(4.0 * 0.5)
    assert row["min"] == image[2, 3]
    assert row["max"] == image[5, 10]
    assert row["confidence"] == pytest.approx(0.75)
    assert row["touches_border"] == 0


def test_an_object_at_the_edge_touches_the_border():
    mask = np.zeros((10, 10), np.int32)
    mask[0:3, 4:6] = 1
    assert measure(mask, 0)[0]["touches_border"] == 1


def test_no_objects_is_an_empty_table_and_a_zero_count():
    rows = measure(np.zeros((10, 10), np.int32), 0)
    assert rows == []
    assert slice_summary(rows, 1, 100)[0]["count"] == 0


@pytest.mark.parametrize(("unit", "suffix"), [("µm", "um"), ("micron", "um"), ("nm", "nm"), ("pixel", "px")])
def test_unit_suffixes(unit, suffix):
    assert unit_suffix(unit) == suffix


@pytest.mark.parametrize("field", [{"split": "magic"}, {"min_area": 0}, {"seed_level": 1.5}, {"seed_depth": 0}])
def test_bad_object_settings_are_user_errors(field):
    from tem_ij_plugin.errors import UserError

    with pytest.raises(UserError):
        ObjectSettings(**field)


def test_the_minimum_area_is_a_quarter_of_the_median_annotated_piece():
    areas = {"cell": {"count": 5, "median_px": 2000.0}}
    assert ObjectSettings.for_annotations(256, areas, "cell").min_area == 500


def test_the_minimum_area_never_falls_below_the_patch_default():
    areas = {"cell": {"count": 50, "median_px": 40.0}}
    assert ObjectSettings.for_annotations(256, areas, "cell").min_area == 64


@pytest.mark.parametrize(
    "areas",
    [
        None,
        {"cell": {"count": 4, "median_px": 2000.0}},  # too few pieces to trust
        {"mito": {"count": 9, "median_px": 2000.0}},  # another class
        {"cell": {"count": True, "median_px": 2000.0}},
        {"cell": {"count": 9, "median_px": "2000"}},
        {"cell": {"count": 9, "median_px": float("nan")}},
        {"cell": [9, 2000.0]},
        "cell",
    ],
)
def test_without_trustworthy_annotated_areas_the_patch_default_holds(areas):
    assert ObjectSettings.for_annotations(256, areas, "cell").min_area == 64


def test_a_given_minimum_area_wins_over_the_annotations():
    areas = {"cell": {"count": 9, "median_px": 2000.0}}
    assert ObjectSettings.for_annotations(256, areas, "cell", min_area=7).min_area == 7


# -- tem-ij objects, on a model trained here ---------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model, a two-plane calibrated stack and that stack's probability map from `tem-ij predict`."""
    from tem_ij_plugin.cli import main
    from tem_ij_plugin.config import dump_settings
    from tem_ij_plugin.io import write_rois
    from tem_ij_plugin.synthetic import SYNTHETIC_CLASSES, make_tem_image, simulate_annotations

    d = tmp_path_factory.mktemp("objects")
    image, truth = make_tem_image(256, 256, seed=3, cell_radius=30)
    boxes = [(0, 0, 128, 128), (0, 128, 128, 256), (128, 0, 256, 128), (128, 128, 256, 256)]
    write_hyperstack(d / "image.tif", np.stack([image, image[::-1]]), Calibration(0.005, 0.005, "µm"))
    write_rois(d / "RoiSet.zip", simulate_annotations(truth, boxes, SYNTHETIC_CLASSES, np.random.default_rng(0)))
    (d / "tiny.yaml").write_text(dump_settings(tiny_settings(40)))
    train = ["train", d / "image.tif", "--rois", d / "RoiSet.zip", "--config", d / "tiny.yaml", "--all-slices"]
    assert main([str(a) for a in [*train, "-o", d / "m.model", "--device", "cpu"]]) == 0
    assert main([str(a) for a in ["predict", d / "m.model", d / "image.tif", "-o", d / "probs.tif"]]) == 0
    return d


@pytest.fixture(scope="module")
def from_model(trained):
    from tem_ij_plugin.cli import main

    d = trained
    out = [d / "cells.tif", "--measure", d / "cells.csv", "--rois", d / "cells.zip"]
    assert main([str(a) for a in ["objects", d / "m.model", d / "image.tif", "-o", *out]]) == 0
    return d


def _table(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _shoelace(xy):
    x, y = xy[:, 0].astype(float), xy[:, 1].astype(float)
    return abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2


def test_the_model_and_its_probability_map_record_the_annotated_areas(from_model):
    from tem_ij_plugin.modelio import read_metadata
    from tem_ij_plugin.stackio import recorded_job

    areas = read_metadata(from_model / "m.model")["object_areas"]
    assert set(areas) == {"background", "cell"}
    assert recorded_job(from_model / "probs.tif")["object_areas"] == areas


def test_the_label_image_is_16_bit_with_the_image_calibration(from_model):
    with tifffile.TiffFile(from_model / "cells.tif") as tif:
        labels = tif.asarray()
        unit = tif.imagej_metadata["unit"]
        xres = tif.pages[0].tags["XResolution"].value
    assert labels.dtype == np.uint16
    assert labels.shape == (2, 256, 256)
    assert unit == "\\u00B5m"
    assert xres[0] / xres[1] == pytest.approx(200)


def test_every_object_has_one_row_and_one_roi(from_model):
    labels = tifffile.imread(from_model / "cells.tif")
    rows = _table(from_model / "cells.csv")
    rois = roifile.roiread(from_model / "cells.zip")
    assert len(rows) == labels.max()
    assert len(rois) == len(rows)
    assert sorted(np.unique(labels[labels > 0]).tolist()) == [int(r["id"]) for r in rows]


def test_roi_areas_are_the_table_areas(from_model):
    rows = _table(from_model / "cells.csv")
    rois = roifile.roiread(from_model / "cells.zip")
    assert [_shoelace(r.coordinates()) for r in rois] == [float(r["pixels"]) for r in rows]


def test_rois_carry_names_and_slices(from_model):
    rows = _table(from_model / "cells.csv")
    rois = roifile.roiread(from_model / "cells.zip")
    assert [r.name for r in rois] == [f"cell-{r['id']}" for r in rows]
    assert [r.position for r in rois] == [int(r["slice"]) for r in rows]


def test_the_table_columns_carry_the_unit(from_model):
    header = (from_model / "cells.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert {"area_um2", "perimeter_um", "x_um", "equivalent_diameter_um", "confidence"} <= set(header)


def test_the_slice_table_counts_the_objects_of_each_plane(from_model):
    rows = _table(from_model / "cells.csv")
    per_slice = _table(from_model / "cells-slices.csv")
    assert [int(s["count"]) for s in per_slice] == [sum(r["slice"] == str(z) for r in rows) for z in (1, 2)]


def test_a_probability_map_gives_the_same_objects_as_the_model(from_model, capsys, tmp_path):
    d = from_model
    out = [tmp_path / "cells.tif", "--measure", tmp_path / "cells.csv"]
    code, _, err = run_cli(capsys, "objects", d / "probs.tif", "--image", d / "image.tif", "-o", *out)
    assert code == 0, err
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "cells.tif"), tifffile.imread(d / "cells.tif"))
    assert (tmp_path / "cells.csv").read_text() == (d / "cells.csv").read_text()


def test_without_the_image_the_intensity_columns_are_empty(from_model, capsys, tmp_path):
    code, _, err = run_cli(capsys, "objects", from_model / "probs.tif", "--measure", tmp_path / "c.csv")
    assert code == 0, err
    assert {r["mean_intensity"] for r in _table(tmp_path / "c.csv")} == {""}


def test_no_objects_writes_an_empty_table(from_model, capsys, tmp_path):
    d = from_model
    code, out, err = run_cli(
        capsys, "objects", d / "probs.tif", "--min-area", 10**6, "--measure", tmp_path / "c.csv", "--rois",
        tmp_path / "c.zip",
    )  # fmt: skip
    assert code == 0, err
    assert _table(tmp_path / "c.csv") == []
    assert zipfile.ZipFile(tmp_path / "c.zip").namelist() == []


def test_our_own_outputs_are_replaced_on_a_rerun(from_model, capsys):
    d = from_model
    code, _, err = run_cli(capsys, "objects", d / "m.model", d / "image.tif", "--rois", d / "cells.zip")
    assert code == 0, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{d}/m.model", "{d}/image.tif", "--class", "nucleus", "--measure", "{t}/c.csv"], "no class 'nucleus'"),
        (["{d}/image.tif", "--measure", "{t}/c.csv"], "not a probability map"),
        (["{d}/m.model", "{d}/image.tif"], "nothing to write"),
        (["{d}/m.model", "{d}/image.tif", "-o", "{d}/image.tif"], "would overwrite the input"),
        (["{d}/probs.tif", "--measure", "{t}/c.csv", "--min-area", "0"], "at least 1 pixel"),
        (["{d}/probs.tif", "--image", "{t}/small.tif", "--measure", "{t}/c.csv"], "give the image the map was"),
        (["{d}/m.model", "{d}/image.tif", "--rois", "{t}/theirs.zip"], "did not write"),
    ],
)
def test_bad_input_is_exit_2_with_one_message(from_model, capsys, tmp_path, argv, message):
    write_hyperstack(tmp_path / "small.tif", np.zeros((1, 64, 64), np.uint8))
    roifile.ImagejRoi.frompoints([[0, 0], [5, 0], [5, 5]], name="cell-1").tofile(tmp_path / "theirs.zip")
    before = sha256(from_model / "image.tif")
    code, _, err = run_cli(capsys, "objects", *[a.format(d=from_model, t=tmp_path) for a in argv])
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert sha256(from_model / "image.tif") == before


def test_the_label_image_may_be_ome_zarr(from_model, capsys, tmp_path):
    zarr = pytest.importorskip("zarr")
    code, _, err = run_cli(capsys, "objects", from_model / "probs.tif", "-o", tmp_path / "cells.zarr")
    assert code == 0, err
    stored = zarr.open_array(str(tmp_path / "cells.zarr" / "0"), mode="r")[...]
    np.testing.assert_array_equal(np.squeeze(stored), tifffile.imread(from_model / "cells.tif"))


def test_the_label_image_may_be_a_cellpose_seg_npy(from_model, capsys, tmp_path):
    from tem_ij_plugin.cellpose_files import read_seg_masks

    code, _, err = run_cli(capsys, "objects", from_model / "probs.tif", "-o", tmp_path / "image_seg.npy")
    assert code == 0, err
    np.testing.assert_array_equal(read_seg_masks(tmp_path / "image_seg.npy"), tifffile.imread(from_model / "cells.tif"))


def test_a_seg_npy_we_wrote_is_replaced_and_a_foreign_one_is_not(from_model, capsys, tmp_path):
    argv = ["objects", from_model / "probs.tif", "-o"]
    assert run_cli(capsys, *argv, tmp_path / "ours_seg.npy")[0] == 0
    assert run_cli(capsys, *argv, tmp_path / "ours_seg.npy")[0] == 0
    np.save(tmp_path / "theirs_seg.npy", np.array({"masks": np.zeros((4, 4), np.uint16)}, dtype=object))
    code, _, err = run_cli(capsys, *argv, tmp_path / "theirs_seg.npy")
    assert code == 2
    assert "did not write" in err


def test_another_segmenters_masks_are_cut_to_the_class_one_object_per_piece():
    from tem_ij_plugin.objects import within_class

    masks = np.zeros((40, 40), np.int64)
    masks[5:15, 5:35] = 7  # cut in two by a non-cell column at x = 20
    masks[25:35, 5:15] = 3  # outside the class entirely
    cell = np.zeros((40, 40), bool)
    cell[:20] = True
    cell[:, 20] = False
    labels = within_class(masks, _probs(cell.astype(np.float32)), 1, ObjectSettings(min_area=10))
    assert labels.max() == 2
    assert (labels[5:15, 5:20] == 1).all()
    assert (labels[5:15, 21:35] == 2).all()
    assert (labels[25:35, 5:15] == 0).all()


def test_proposals_are_rois_that_training_ignores_until_renamed(from_model, capsys, tmp_path):
    from tem_ij_plugin.annotations import rasterize
    from tem_ij_plugin.errors import UserError
    from tem_ij_plugin.io import read_rois

    code, _, err = run_cli(capsys, "objects", from_model / "probs.tif", "--proposals", "--rois", tmp_path / "p.zip")
    assert code == 0, err
    shapes = read_rois(tmp_path / "p.zip")
    assert {s.name.rsplit("-", 1)[0] for s in shapes} == {"proposal"}
    with pytest.raises(UserError, match="only proposals"):
        rasterize(shapes, (2, 256, 256))
    shapes[0].name, shapes[1].name = "cell-1", "background-1"
    labels = rasterize(shapes, (2, 256, 256))
    assert labels.classes == ["background", "cell"]
    assert len(labels.warnings) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "cellpose"], "goes with --cellpose-model"),
        (["--cellpose-model", "{t}/cp.model"], "goes with --cellpose-model"),
        (["--method", "cellpose", "--cellpose-model", "{t}/missing.model"], "nothing is downloaded"),
    ],
)
def test_bad_cellpose_use_is_exit_2(from_model, capsys, tmp_path, argv, message):
    argv = [a.format(t=tmp_path) for a in argv]
    code, _, err = run_cli(capsys, "objects", from_model / "m.model", from_model / "image.tif", "--rois",
                           tmp_path / "c.zip", *argv)  # fmt: skip
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_cellpose_on_a_probability_map_needs_the_image(from_model, capsys, tmp_path):
    (tmp_path / "cp.model").write_bytes(b"weights")
    argv = ["--method", "cellpose", "--cellpose-model", tmp_path / "cp.model", "--rois", tmp_path / "c.zip"]
    code, _, err = run_cli(capsys, "objects", from_model / "probs.tif", *argv)
    assert code == 2
    assert "give --image" in err


def test_without_cellpose_the_method_says_how_to_install_it(from_model, capsys, tmp_path):
    import importlib.util

    if importlib.util.find_spec("cellpose") is not None:
        pytest.skip("cellpose is installed here")
    (tmp_path / "cp.model").write_bytes(b"weights")
    argv = ["--method", "cellpose", "--cellpose-model", tmp_path / "cp.model", "--rois", tmp_path / "c.zip"]
    code, _, err = run_cli(capsys, "objects", from_model / "m.model", from_model / "image.tif", *argv)
    assert code == 2
    assert "tem-ij-plugin[cellpose]" in err
