"""Focus regions (where to draw inside a suggestion) and the annotator that draws there first."""

import numpy as np
import pytest
from skimage.draw import polygon2mask

from tem_ij_plugin.annotations import rasterize
from tem_ij_plugin.focus import focus_mask, focus_regions
from tem_ij_plugin.synthetic import SYNTHETIC_CLASSES, make_tem_image, simulate_annotations


def _blob_and_lines(size=128):
    """Thin lines of full uncertainty every 16 px (predicted boundaries) and one broad uncertain disc."""
    u = np.zeros((size, size), np.float32)
    u[8::16, :] = 1.0
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - 40) ** 2 + (xx - 90) ** 2 < 15**2
    u[disc] = 0.9
    return u, disc


def test_the_broad_uncertain_area_is_the_focus_not_the_thin_boundary_lines():
    u, disc = _blob_and_lines()
    regions = focus_regions(u)
    assert len(regions) == 1
    inside = polygon2mask(u.shape, regions[0].polygon[:, ::-1] + 0.5)
    assert (inside & disc).sum() / disc.sum() > 0.9
    assert (inside & ~disc).sum() < 0.5 * disc.sum()


def test_polygons_come_back_in_image_coordinates():
    u, _ = _blob_and_lines()
    here, there = focus_regions(u)[0], focus_regions(u, origin=(300, 1000))[0]
    np.testing.assert_allclose(there.polygon - here.polygon, np.broadcast_to([1000, 300], here.polygon.shape))


def test_a_window_the_model_is_sure_about_gets_no_focus():
    assert focus_regions(np.full((64, 64), 0.01, np.float32)) == []


def test_regions_are_ranked_by_total_uncertainty_and_capped():
    u = np.zeros((200, 200), np.float32)
    yy, xx = np.mgrid[:200, :200]
    for cy, cx, r in ((40, 40, 10), (150, 150, 20), (40, 150, 15), (150, 40, 12)):
        u[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = 0.8
    regions = focus_regions(u, max_regions=3, area_fraction=0.3)
    assert [r.area for r in regions] == sorted((r.area for r in regions), reverse=True)
    assert len(regions) == 3


def test_the_mask_marks_at_most_the_area_fraction():
    u = np.random.default_rng(0).random((100, 100)).astype(np.float32)
    assert focus_mask(u, area_fraction=0.1).mean() <= 0.1 + 1e-3


def test_region_json_is_plain_data():
    region = focus_regions(_blob_and_lines()[0])[0].as_dict()
    assert set(region) == {"polygon", "uncertainty", "area_px"}
    assert all(len(v) == 2 for v in region["polygon"])


@pytest.fixture(scope="module")
def scene():
    image, truth = make_tem_image(256, 256, seed=3, cell_radius=25)
    focus = np.zeros(truth.shape, bool)
    focus[150:230, 20:120] = True
    return truth, focus


def _labelled(truth, focus, seed):
    shapes = simulate_annotations(
        truth, [(0, 0, 256, 256)], SYNTHETIC_CLASSES, np.random.default_rng(seed), focus=focus
    )
    return rasterize(shapes, (1,) + truth.shape).labels[0] >= 0


def test_the_focus_first_annotator_draws_where_the_focus_is(scene):
    truth, focus = scene
    near = np.zeros_like(focus)
    near[120:256, 0:150] = True  # the focus area and the reach of a polygon that starts in it
    with_focus = np.mean(
        [(_labelled(truth, focus, s) & near).sum() / _labelled(truth, focus, s).sum() for s in range(4)]
    )
    without = np.mean([(_labelled(truth, None, s) & near).sum() / _labelled(truth, None, s).sum() for s in range(4)])
    assert with_focus > without + 0.2


def test_focus_changes_where_the_labels_are_not_how_many(scene):
    truth, focus = scene
    with_focus = np.mean([_labelled(truth, focus, s).sum() for s in range(4)])
    without = np.mean([_labelled(truth, None, s).sum() for s in range(4)])
    assert with_focus == pytest.approx(without, rel=0.25)
