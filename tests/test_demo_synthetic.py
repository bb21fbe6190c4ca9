import numpy as np
import pytest

from tem_ij_plugin.annotations import rasterize
from tem_ij_plugin.synthetic import SYNTHETIC_CLASSES, make_tem_image, simulate_annotations


def test_synthetic_is_seeded_and_two_class():
    a, ta = make_tem_image(128, 160, seed=4, cell_radius=25)
    b, tb = make_tem_image(128, 160, seed=4, cell_radius=25)
    assert a.shape == (128, 160)
    assert a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.array_equal(ta, tb)
    assert 0.2 < ta.mean() < 0.8
    # Cells are darker than the extracellular space, as in TEM.
    assert a[ta == 1].mean() < a[ta == 0].mean()


def test_simulated_annotator_is_partial_and_inside_truth():
    image, truth = make_tem_image(256, 256, seed=1, cell_radius=40)
    shapes = simulate_annotations(truth, [(0, 0, 256, 256)], SYNTHETIC_CLASSES, np.random.default_rng(0))
    lab = rasterize(shapes, (1, 256, 256)).labels[0]
    known = lab >= 0
    assert 0.15 < known.mean() < 0.5, "about a third of the patch"
    assert (lab[known] == truth[known]).mean() > 0.995
    assert {s.name.split("-")[0] for s in shapes} == {"background", "cell"}


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    import imageio.v3 as iio

    from tem_ij_plugin.cli import main

    code = main(["demo", "-o", str(tmp_path / "demo"), "--minutes", "0.15"])
    assert code == 0
    # its 5 patches are fewer than validation needs: the summary must not call a loss a validation mIoU
    assert "no validation patch (fewer than 8 annotated)" in capsys.readouterr().out
    files = {p.name for p in (tmp_path / "demo").iterdir()}
    assert {"image.tif", "RoiSet.zip", "demo.model", "probabilities.tif", "demo.png"} <= files
    fig = iio.imread(tmp_path / "demo" / "demo.png")
    assert fig.ndim == 3
    assert fig.shape[1] > 3 * 768
