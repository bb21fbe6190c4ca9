"""OME-Zarr images as input: 0.4 (Zarr v2) and 0.5 (Zarr v3) written by the zarr library with compressed
chunks, our own OME-Zarr outputs read back, and metadata that does not describe an image refused."""

import numpy as np
import pytest
import tifffile
from conftest import run_cli
from test_predict import save_random_model

from tem_ij_plugin.errors import UserError
from tem_ij_plugin.io import PlaneReader, read_image

zarr = pytest.importorskip("zarr")


def write_ome_zarr(path, data, axes="zyx", version="0.4", scale=None, unit="micrometer", labels=None):
    """An OME-Zarr image as other tools write one: compressed chunks of one plane, one resolution level."""
    fmt = 2 if version == "0.4" else 3
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    chunks = tuple(1 for _ in axes[:-2]) + data.shape[-2:]
    group.create_array("s0", data=data, chunks=chunks)
    kinds = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
    ax = [{"name": a, "type": kinds[a], **({"unit": unit} if kinds[a] == "space" else {})} for a in axes]
    transforms = [{"type": "scale", "scale": list(scale or [1.0] * len(axes))}]
    meta = {"multiscales": [{"version": version, "axes": ax, "datasets": [{"path": "s0",
            "coordinateTransformations": transforms}]}]}  # fmt: skip
    if labels:
        meta["omero"] = {"channels": [{"label": label} for label in labels]}
    group.attrs.update(meta if version == "0.4" else {"ome": {"version": version, **meta}})
    return path


@pytest.fixture()
def stack(synthetic):
    image = synthetic[0]
    return np.stack([image, image[::-1], image[:, ::-1]])


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_an_ome_zarr_reads_plane_by_plane(tmp_path, stack, version):
    path = write_ome_zarr(tmp_path / "s.zarr", stack, version=version)
    with PlaneReader(path) as r:
        assert np.array_equal(np.stack([r.read(i) for i in range(r.n_planes)]), stack)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_an_ome_zarr_gives_its_physical_scale(tmp_path, stack, version):
    path = write_ome_zarr(tmp_path / "s.zarr", stack, version=version, scale=[50, 4, 4], unit="nanometer")
    cal = read_image(path).calibration
    assert (cal.pixel_width, cal.unit, cal.z_spacing) == (4.0, "nm", 50.0)


def test_a_time_series_in_ome_zarr_is_read_over_t(tmp_path, stack):
    with PlaneReader(write_ome_zarr(tmp_path / "t.zarr", stack, axes="tyx")) as r:
        assert (r.stack_axes, r.stack_shape) == ("T", (3,))


def test_a_channel_of_an_ome_zarr_is_chosen_with_its_label(tmp_path, stack):
    data = np.stack([stack, 255 - stack])  # c, z, y, x: OME-Zarr's axis order
    path = write_ome_zarr(tmp_path / "c.zarr", data, axes="czyx", labels=["em", "inverted"])
    with PlaneReader(path, channel=2) as r:
        assert np.array_equal(r.read(1), 255 - stack[1])
        assert r.slice_labels == ["inverted"] * 3


def test_several_channels_need_a_channel(tmp_path, stack):
    path = write_ome_zarr(tmp_path / "c.zarr", np.stack([stack, stack]), axes="czyx")
    with pytest.raises(UserError, match="--channel 1..2"):
        PlaneReader(path)


def test_predict_from_ome_zarr_equals_predict_from_the_same_tiff(tmp_path, stack, capsys):
    model = save_random_model(tmp_path / "m.model", {"patch_size": 256})
    tifffile.imwrite(tmp_path / "s.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    write_ome_zarr(tmp_path / "s.zarr", stack)
    outs = []
    for name in ("s.tif", "s.zarr"):
        outs.append(tmp_path / f"p-{name}.tif")
        code, _, err = run_cli(capsys, "predict", model, tmp_path / name, "-o", outs[-1], "--backend", "torch")
        assert code == 0, err
    assert np.array_equal(tifffile.imread(outs[0]), tifffile.imread(outs[1]))


def test_our_ome_zarr_probabilities_read_back_with_their_class_names(tmp_path, stack, capsys):
    model = save_random_model(tmp_path / "m.model", {"patch_size": 256})
    write_ome_zarr(tmp_path / "s.zarr", stack, scale=[0.05, 0.005, 0.005])
    out = tmp_path / "p.zarr"
    code, _, err = run_cli(capsys, "predict", model, tmp_path / "s.zarr", "-o", out, "--backend", "torch")
    assert code == 0, err
    with PlaneReader(out, channel=2) as r:
        assert (r.slice_labels[0], r.calibration.pixel_width, r.n_planes) == ("cell", 0.005, 3)


def test_a_folder_of_images_lists_an_ome_zarr_as_one_image(tmp_path, stack):
    from tem_ij_plugin.workflows import expand_images

    write_ome_zarr(tmp_path / "s.zarr", stack)
    assert expand_images([tmp_path / "s.zarr"]) == [(tmp_path / "s.zarr").resolve()]


# -- groups that are not images ----------------------------------------------------------------------


def _with_attrs(path, attrs, data=None):
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", data=np.zeros((2, 8, 8), np.uint8) if data is None else data)
    group.attrs.update(attrs)
    return path


def _axes(*names):
    return [{"name": n, "type": "space"} for n in names]


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({}, "not an OME-Zarr image"),
        ({"multiscales": [{"axes": _axes("z", "x", "y"), "datasets": [{"path": "0"}]}]}, "cannot be read as planes"),
        ({"multiscales": [{"axes": _axes("z", "y", "x"), "datasets": [{"path": "../../etc"}]}]}, "not valid"),
        ({"multiscales": [{"axes": _axes("y", "x"), "datasets": [{"path": "0"}]}]}, "names 2 axes but the array has 3"),
        ({"multiscales": [{"axes": _axes("z", "y", "x"), "datasets": [{"path": "missing"}]}]}, "cannot open"),
        ({"multiscales": [{"axes": _axes("q", "y", "x"), "datasets": [{"path": "0"}]}]}, "not valid"),
    ],
)
def test_a_group_that_is_not_an_image_is_exit_2(tmp_path, capsys, attrs, message):
    path = _with_attrs(tmp_path / "g.zarr", attrs)
    model = save_random_model(tmp_path / "m.model", {"patch_size": 256})
    code, _, err = run_cli(capsys, "predict", model, path, "-o", tmp_path / "p.tif")
    assert code == 2
    assert message in err
    assert "Traceback" not in err


# -- OME-Zarr outputs through the zarr library -------------------------------------------------------


def test_ome_zarr_outputs_are_compressed_one_plane_a_chunk(tmp_path, stack, capsys):
    import json

    model = save_random_model(tmp_path / "m.model", {"patch_size": 256})
    tifffile.imwrite(tmp_path / "s.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    code, _, err = run_cli(
        capsys, "predict", model, tmp_path / "s.tif", "-o", tmp_path / "p.zarr", "--backend", "torch"
    )
    assert code == 0, err
    meta = json.loads((tmp_path / "p.zarr" / "0" / ".zarray").read_text())
    assert (meta["compressor"]["cname"], meta["chunks"]) == ("zstd", [1, 1, 256, 256])


@pytest.fixture()
def pyramid(tmp_path, stack, capsys):
    """Probabilities and labels of a 3-plane stack as OME-Zarr with two extra levels."""
    model = save_random_model(tmp_path / "m.model", {"patch_size": 256})
    tifffile.imwrite(tmp_path / "s.tif", stack[:, :250, :250], imagej=True, metadata={"axes": "ZYX"})
    out = tmp_path / "p.zarr"
    code, _, err = run_cli(capsys, "predict", model, tmp_path / "s.tif", "-o", out, "--kind", "both", "--pyramid", "2",
                           "--backend", "torch")  # fmt: skip
    assert code == 0, err
    return out


def test_a_pyramid_lists_each_level_at_twice_the_scale(pyramid):
    group = zarr.open_group(str(pyramid), mode="r")
    scales = [d["coordinateTransformations"][0]["scale"][-1] for d in group.attrs["multiscales"][0]["datasets"]]
    assert scales == [1.0, 2.0, 4.0]


def test_a_pyramid_level_is_the_mean_of_2x2_blocks_of_probabilities(pyramid):
    group = zarr.open_group(str(pyramid), mode="r")
    full, half = np.asarray(group["0"][1, 0]), np.asarray(group["1"][1, 0])  # channel 1, plane 0
    np.testing.assert_allclose(half[:5, :5], full[:10, :10].reshape(5, 2, 5, 2).mean(axis=(1, 3)), atol=1e-6)


def test_a_label_pyramid_keeps_labels(pyramid):
    group = zarr.open_group(str(pyramid / "labels" / "classes"), mode="r")
    full, half = np.asarray(group["0"][0, 0]), np.asarray(group["1"][0, 0])  # channel 0, plane 0
    assert np.array_equal(half, full[::2, ::2])


def test_the_label_image_is_in_the_images_labels_group(pyramid):
    assert zarr.open_group(str(pyramid / "labels"), mode="r").attrs["labels"] == ["classes"]
    assert not pyramid.with_name("p_labels.zarr").exists()


def test_the_label_image_has_the_images_axes_with_one_channel(pyramid):
    image = zarr.open_group(str(pyramid), mode="r")
    labels = zarr.open_group(str(pyramid / "labels" / "classes"), mode="r")
    assert [a["name"] for a in labels.attrs["multiscales"][0]["axes"]] == ["c", "z", "y", "x"]
    assert labels["0"].shape == (1, *image["0"].shape[1:])


def test_the_label_image_has_as_many_levels_as_the_image(pyramid):
    image = zarr.open_group(str(pyramid), mode="r").attrs["multiscales"][0]["datasets"]
    labels = zarr.open_group(str(pyramid / "labels" / "classes"), mode="r").attrs["multiscales"][0]["datasets"]
    assert [d["coordinateTransformations"] for d in labels] == [d["coordinateTransformations"] for d in image]


def test_the_label_image_names_each_label_value_by_its_class(pyramid):
    label = zarr.open_group(str(pyramid / "labels" / "classes"), mode="r").attrs["image-label"]
    assert [(p["label-value"], p["class"]) for p in label["properties"]] == [(0, "background"), (1, "cell")]
    assert [c["label-value"] for c in label["colors"]] == [0, 1]
    assert label["source"] == {"image": "../../"}


def test_the_label_image_is_the_argmax_of_the_probabilities(pyramid):
    probabilities = np.asarray(zarr.open_group(str(pyramid), mode="r")["0"])
    labels = np.asarray(zarr.open_group(str(pyramid / "labels" / "classes"), mode="r")["0"])
    assert np.array_equal(labels[0], probabilities.argmax(axis=0))


def test_a_cancelled_run_with_labels_inside_resumes_to_the_same_store(tmp_path, stack):
    import threading

    from tem_ij_plugin.apply import PredictJob
    from tem_ij_plugin.errors import Cancelled

    model = save_random_model(tmp_path / "m.model", {"patch_size": 256})
    tifffile.imwrite(tmp_path / "s.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    cancel, out = threading.Event(), tmp_path / "p.zarr"

    def stop_after_first_plane(ev):
        if ev["done"] >= 1:
            cancel.set()

    options = {"kind": "both", "backend": "torch", "pyramid": 1}
    with pytest.raises(Cancelled):
        PredictJob(model, tmp_path / "s.tif", out, **options).run(progress=stop_after_first_plane, cancel=cancel)
    assert (tmp_path / "p.partial.zarr" / "labels" / "classes").is_dir()
    planes = set()
    PredictJob(model, tmp_path / "s.tif", out, resume=True, **options).run(progress=lambda ev: planes.add(ev["plane"]))
    assert planes == {2, 3}
    PredictJob(model, tmp_path / "s.tif", tmp_path / "fresh.zarr", **options).run()
    for part in ["0", "1", "labels/classes/0", "labels/classes/1"]:
        fresh = np.asarray(zarr.open_array(str(tmp_path / "fresh.zarr" / part), mode="r"))
        assert np.array_equal(np.asarray(zarr.open_array(str(out / part), mode="r")), fresh), part


def test_an_odd_sized_plane_rounds_its_pyramid_up(pyramid):
    assert zarr.open_group(str(pyramid), mode="r")["2"].shape[-2:] == (63, 63)  # 250 -> 125 -> 63


def test_a_pyramid_needs_an_ome_zarr_output(tmp_path, stack, capsys):
    model = save_random_model(tmp_path / "m.model", {"patch_size": 256})
    tifffile.imwrite(tmp_path / "s.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    code, _, err = run_cli(capsys, "predict", model, tmp_path / "s.tif", "-o", tmp_path / "p.tif", "--pyramid", "1")
    assert code == 2
    assert "OME-Zarr output" in err


def test_a_pyramid_left_half_built_by_a_kill_is_rebuilt_on_resume(tmp_path):
    from tem_ij_plugin.io import Calibration
    from tem_ij_plugin.stackio import Layout, open_writer

    lay = Layout("Z", (2,), 2, (20, 30), np.dtype(np.float32))
    w = open_writer(tmp_path / "p.zarr", lay, Calibration(), pyramid=1)
    for i in range(2):
        w.write(i, np.full((2, 20, 30), 0.5, np.float32))
    group = zarr.open_group(str(tmp_path / "p.partial.zarr"), mode="r+")
    group.create_array("1", shape=(2, 2, 3, 3), dtype="<f4")  # what a kill inside finish() leaves
    resumed = open_writer(tmp_path / "p.zarr", lay, Calibration(), resume=True, pyramid=1)
    resumed.finish()
    assert zarr.open_group(str(tmp_path / "p.zarr"), mode="r")["1"].shape == (2, 2, 10, 15)


def test_a_pyramid_build_stops_when_cancelled_and_keeps_the_working_store(tmp_path):
    import threading

    from tem_ij_plugin.errors import Cancelled
    from tem_ij_plugin.io import Calibration
    from tem_ij_plugin.stackio import Layout, open_writer

    lay = Layout("Z", (2,), 2, (20, 30), np.dtype(np.float32))
    w = open_writer(tmp_path / "p.zarr", lay, Calibration(), pyramid=1)
    for i in range(2):
        w.write(i, np.full((2, 20, 30), 0.5, np.float32))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        w.finish(cancel)
    assert (tmp_path / "p.partial.zarr" / "0").is_dir()
    assert not (tmp_path / "p.zarr").exists()


def _validator():
    """ome-zarr-models, an independent reading of the OME-NGFF spec (required in CI)."""
    import os

    try:
        from ome_zarr_models import v04
    except ImportError:
        if os.environ.get("TEM_IJ_REQUIRE_OME_ZARR_MODELS") == "1":
            pytest.fail("ome-zarr-models is required in CI (pip install -e '.[test]')")
        pytest.skip("ome-zarr-models not installed")
    return v04


def test_our_ome_zarr_image_validates_against_the_spec(pyramid):
    _validator().Image.from_zarr(zarr.open_group(str(pyramid), mode="r"))


def test_our_labels_group_validates_against_the_spec(pyramid):
    _validator().Labels.from_zarr(zarr.open_group(str(pyramid / "labels"), mode="r"))


def test_our_label_image_validates_against_the_spec(pyramid):
    _validator().ImageLabel.from_zarr(zarr.open_group(str(pyramid / "labels" / "classes"), mode="r"))


@pytest.mark.parametrize("command", ["predict", "objects"])
def test_an_output_named_inside_an_images_labels_group_is_exit_2(tmp_path, stack, capsys, command):
    model = save_random_model(tmp_path / "m.model", {"patch_size": 256})
    tifffile.imwrite(tmp_path / "s.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    (tmp_path / "raw.zarr" / "labels").mkdir(parents=True)
    code, _, err = run_cli(capsys, command, model, tmp_path / "s.tif", "-o", tmp_path / "raw.zarr" / "labels" / "cells")
    assert code == 2
    assert "inside the labels/ group" in err


def _predict_again(tmp_path, capsys, out):
    model = tmp_path / "m.model"
    return run_cli(capsys, "predict", model, tmp_path / "s.tif", "-o", out, "--kind", "both", "--backend", "torch")


def _add_users_label_image(store):
    users = zarr.open_group(str(store / "labels" / "cells"), mode="w", zarr_format=2)
    users.create_array("0", data=np.ones((4, 4), np.uint8))
    return store / "labels" / "cells"


def test_predicting_again_onto_our_store_replaces_it(pyramid, tmp_path, capsys):
    code, _, err = _predict_again(tmp_path, capsys, pyramid)
    assert code == 0, err


def test_predicting_again_onto_our_store_with_a_users_label_image_is_exit_2(pyramid, tmp_path, capsys):
    _add_users_label_image(pyramid)
    code, _, err = _predict_again(tmp_path, capsys, pyramid)
    assert code == 2
    assert "also holds labels/cells" in err


def test_a_refused_store_keeps_the_users_label_image(pyramid, tmp_path, capsys):
    users = _add_users_label_image(pyramid)
    _predict_again(tmp_path, capsys, pyramid)
    assert np.asarray(zarr.open_group(str(users), mode="r")["0"]).sum() == 16
