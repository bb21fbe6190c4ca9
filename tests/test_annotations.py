import re

import numpy as np
import pytest

from tem_ij_plugin.annotations import (
    Labels,
    Shape,
    class_of,
    fill_polygons,
    labels_from_image,
    merge_labels,
    order_classes,
    rasterize,
)
from tem_ij_plugin.errors import UserError


@pytest.mark.parametrize(
    "name, cls",
    [
        ("background", "background"),
        ("bg", "background"),
        ("BG-2", "background"),
        ("cell", "cell"),
        ("cell-3", "cell"),
        ("cell 12", "cell"),
        ("Cell_2", "cell"),
        ("cell3", "cell"),
        ("Mito.1", "mito"),
        ("ignore", "ignore"),
        ("0123-0456", None),
        ("", None),
        ("  ", None),
    ],
)
def test_class_of(name, cls):
    assert class_of(name) == cls


def test_order_background_first():
    assert order_classes(["mito", "cell", "background", "ignore"]) == ["background", "cell", "mito"]


def square(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


def test_fill_integer_polygon_covers_exact_pixels():
    m = fill_polygons([square(2, 3, 6, 5)], 10, 10)
    expect = np.zeros((10, 10), bool)
    expect[3:5, 2:6] = True
    assert np.array_equal(m, expect)


def test_fill_uses_pixel_centres_and_even_odd_holes():
    # Vertices at .4/.6 keep or drop a pixel depending on where its centre falls.
    m = fill_polygons([square(1.6, 1.6, 4.4, 4.4)], 6, 6)
    assert m.sum() == 4
    assert m[2:4, 2:4].all()
    ring = fill_polygons([square(0, 0, 8, 8), square(2, 2, 6, 6)], 8, 8)
    assert ring.sum() == 64 - 16
    assert not ring[2:6, 2:6].any()


def test_fill_triangle_area_close_to_geometry():
    tri = np.array([[0, 0], [100, 0], [0, 100]], float)
    assert abs(fill_polygons([tri], 100, 100).sum() - 5000) < 100


def shape(name, x0, y0, x1, y1, position=0, kind="polygon"):
    return Shape(name, kind, [square(x0, y0, x1, y1)], position)


def test_rasterize_classes_ignore_and_conflicts():
    shapes = [
        shape("cell-1", 0, 0, 10, 10),
        shape("bg", 20, 20, 30, 30),
        shape("cell-2", 25, 25, 35, 35),
        shape("ignore", 0, 0, 5, 5),
    ]
    lab = rasterize(shapes, (1, 40, 40))
    assert lab.classes == ["background", "cell"]
    l = lab.labels[0]
    assert (l[5:10, 5:10] == 1).all()
    assert (l[:5, :5] == -1).all()
    assert (l[25:30, 25:30] == -1).all(), "pixels claimed by two classes stay unlabelled"
    assert (l[20:25, 20:25] == 0).all()
    assert (l[30:35, 30:35] == 1).all()
    assert any("different classes" in w for w in lab.warnings)


def test_rect_and_oval_shapes():
    lab = rasterize([shape("bg", 0, 0, 4, 3, kind="rect"), shape("cell", 10, 10, 20, 20, kind="oval")], (1, 30, 30))
    l = lab.labels[0]
    assert (l[:3, :4] == 0).all()
    assert (l == 0).sum() == 12
    assert l[15, 15] == 1
    assert l[10, 10] == -1
    assert 60 < (l == 1).sum() < 100


def test_slices_and_positions():
    shapes = [shape("bg", 0, 0, 5, 5, position=2), shape("cell", 5, 5, 9, 9, position=3)]
    lab = rasterize(shapes, (3, 10, 10))
    assert (lab.labels[0] == -1).all()
    assert (lab.labels[1] == 0).sum() == 25
    assert (lab.labels[2] == 1).sum() == 16
    with pytest.raises(UserError, match="slice 3 but the image has 2"):
        rasterize(shapes, (2, 10, 10))
    with pytest.raises(UserError, match="no slice position"):
        rasterize([shape("bg", 0, 0, 5, 5), shape("cell", 5, 5, 9, 9)], (3, 10, 10))
    lab = rasterize([shape("bg", 0, 0, 5, 5), shape("cell", 5, 5, 9, 9)], (3, 10, 10), all_slices=True)
    assert all((lab.labels[z] == 1).sum() == 16 for z in range(3))


@pytest.mark.parametrize(
    "shapes, message",
    [
        ([], "empty"),
        (
            [shape("0001-0002", 0, 0, 5, 5), shape("cell", 5, 5, 9, 9), shape("", 1, 1, 2, 2)],
            "2 ROI.*no class name.*0001-0002",
        ),
        ([shape("cell", 0, 0, 5, 5), shape("cell-2", 5, 5, 9, 9)], "only one class"),
        ([shape("bg", 0, 0, 5, 5), shape("cell", 50, 50, 60, 60)], "entirely outside"),
        ([shape("bg", 0, 0, 5, 5), shape("cell", 3.6, 3.6, 4.4, 4.4)], "zero area"),
    ],
)
def test_rasterize_errors(shapes, message):
    with pytest.raises(UserError, match=message):
        rasterize(shapes, (1, 20, 20))


def test_unknown_class_lists_names_and_allowed():
    shapes = [shape("bg", 0, 0, 5, 5), shape("mito-4", 5, 5, 9, 9), shape("cell", 10, 10, 12, 12)]
    with pytest.raises(UserError, match=r"unknown class\(es\) mito.*'mito-4'.*background, cell"):
        rasterize(shapes, (1, 20, 20), classes=["background", "cell"])


def test_partly_outside_is_clipped_with_warning():
    lab = rasterize([shape("bg", -5, -5, 3, 3), shape("cell", 5, 5, 9, 9)], (1, 10, 10))
    assert (lab.labels[0] == 0).sum() == 9
    assert any("clipped" in w for w in lab.warnings)


def test_group_names_give_classes():
    shapes = [
        Shape("", "polygon", [square(0, 0, 4, 4)], 0, group=1),
        Shape("x1", "polygon", [square(5, 5, 9, 9)], 0, group=2),
    ]
    shapes[1].name = ""
    lab = rasterize(shapes, (1, 10, 10), group_names={1: "cell", 2: "background"})
    assert (lab.labels[0] == 1).sum() == 16
    assert (lab.labels[0] == 0).sum() == 16


def test_digest_changes_with_labels():
    a = rasterize([shape("bg", 0, 0, 5, 5), shape("cell", 5, 5, 9, 9)], (1, 10, 10))
    b = rasterize([shape("bg", 0, 0, 5, 5), shape("cell", 5, 5, 9, 8)], (1, 10, 10))
    assert a.digest() != b.digest()
    assert a.digest() == a.digest()


def test_a_label_image_value_names_its_class_and_zero_is_unlabelled():
    values = np.array([[[0, 1, 2], [2, 1, 0]]], np.uint8)
    labels = labels_from_image(values, ["background", "cell"])
    assert labels.labels.tolist() == [[[-1, 0, 1], [1, 0, -1]]]
    assert labels.classes == ["background", "cell"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.array([[[0, 1, 3]]], np.uint8), "values 0..3, but 2 class(es)"),
        (np.array([[[0.0, 1.5, 2.0]]], np.float32), "whole numbers"),
        (np.array([[[0, 1, 1]]], np.uint16), "fewer than two classes"),
        (np.array([[[0, -1, 2]]], np.int16), "values -1..2"),
    ],
)
def test_bad_label_images_are_user_errors(values, message):
    with pytest.raises(UserError, match=re.escape(message)):
        labels_from_image(values, ["background", "cell"])


def test_merged_labels_keep_both_and_leave_disagreements_unlabelled():
    classes = ["background", "cell"]
    a = Labels(np.array([[[0, -1, 1, 1]]], np.int16), classes)
    b = Labels(np.array([[[-1, 1, 1, 0]]], np.int16), classes)
    merged = merge_labels(a, b)
    assert merged.labels.tolist() == [[[0, 1, 1, -1]]]
    assert "1 pixel(s)" in merged.warnings[-1]


def test_rois_of_one_class_may_add_to_a_label_image():
    square = Shape("cell-1", "polygon", [np.array([[1, 1], [5, 1], [5, 5], [1, 5]], float)])
    with pytest.raises(UserError, match="only one class"):
        rasterize([square], (1, 8, 8))
    assert (rasterize([square], (1, 8, 8), classes=["background", "cell"], min_classes=1).labels == 1).sum() == 16


def test_annotated_areas_count_the_connected_pieces_of_each_class():
    from tem_ij_plugin.annotations import annotated_areas

    labels = np.full((2, 20, 20), -1, np.int16)
    labels[0, :2, :5] = 1  # 10 px
    labels[0, 10:15, 10:16] = 1  # 30 px
    labels[1, 5:10, 5:10] = 0  # 25 px of background on the other plane
    assert annotated_areas(labels, ["background", "cell", "mito"]) == {
        "background": {"count": 1, "median_px": 25.0},
        "cell": {"count": 2, "median_px": 20.0},
    }


# -- slice, frame and channel positions -------------------------------------------------------------


def _placed(position=0, hyper=()):
    from tem_ij_plugin.annotations import Shape

    return Shape("cell-1", "polygon", [np.array([[0, 0], [4, 0], [4, 4]], float)], position, 0, hyper)


@pytest.mark.parametrize(
    ("position", "hyper", "axes", "shape", "plane"),
    [
        (5, (), "Z", (8,), 5),  # a stack position is the plane
        (5, (), "TZ", (2, 3), 5),  # ... on a hyperstack too (how tem-ij writes ROIs)
        (0, (1, 2, 2), "TZ", (2, 3), 5),  # slice 2 of frame 2: after the 3 slices of frame 1
        (0, (1, 3, 1), "TZ", (2, 3), 3),
        (0, (1, 4, 1), "Z", (8,), 4),  # a hyperstack ROI on a Z stack: its slice
        (0, (1, 1, 3), "T", (4,), 3),  # ... on a T stack: its frame
        (0, (2, 0, 0), "Z", (8,), 0),  # a channel only: every plane
        (0, (1, 1, 1), "", (), 1),
    ],
)
def test_a_roi_labels_the_plane_of_its_position(position, hyper, axes, shape, plane):
    from tem_ij_plugin.annotations import StackLayout, plane_of

    assert plane_of(_placed(position, hyper), StackLayout(axes, shape)) == plane


@pytest.mark.parametrize("hyper", [(1, 2, 0), (1, 0, 2)])
def test_a_slice_of_every_frame_is_refused_on_a_tz_stack(hyper):
    from tem_ij_plugin.annotations import StackLayout, plane_of

    with pytest.raises(UserError, match="one plane per ROI"):
        plane_of(_placed(0, hyper), StackLayout("TZ", (2, 3)))


def test_rasterize_places_a_hyperstack_roi_on_its_frame_and_slice():
    from tem_ij_plugin.annotations import Shape, StackLayout

    bg = Shape("bg", "polygon", [np.array([[10, 10], [14, 10], [14, 14]], float)], 0, 0, (1, 1, 1))
    labels = rasterize([_placed(0, (1, 2, 2)), bg], (6, 16, 16), stack=StackLayout("TZ", (2, 3))).labels
    assert int((labels[4] == 1).sum()) > 0
