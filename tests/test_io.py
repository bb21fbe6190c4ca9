import zipfile

import numpy as np
import pytest
import roifile
import tifffile

from tem_ij_plugin.errors import UserError
from tem_ij_plugin.io import Calibration, read_image, read_rois, write_hyperstack


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiff_round_trip_with_calibration(tmp_path, dtype):
    data = (np.random.default_rng(0).random((3, 20, 30)) * 200).astype(dtype)
    p = tmp_path / "s.tif"
    write_hyperstack(p, data, Calibration(0.25, 0.5, "µm", 2.0))
    img = read_image(p)
    assert img.data.dtype == dtype
    assert np.array_equal(img.data, data)
    cal = img.calibration
    assert cal.unit == "µm"
    assert cal.pixel_width == pytest.approx(0.25)
    assert cal.pixel_height == pytest.approx(0.5)
    assert cal.z_spacing == pytest.approx(2.0)


def test_hyperstack_channels_and_labels(tmp_path):
    data = np.zeros((2, 3, 8, 9), np.float32)
    p = tmp_path / "h.tif"
    write_hyperstack(p, data, channel_names=["background", "cell", "mito"])
    with tifffile.TiffFile(p) as tif:
        assert tif.series[0].axes == "ZCYX"
        assert tif.series[0].shape == (2, 3, 8, 9)
        assert tif.imagej_metadata["Labels"] == ["background", "cell", "mito"] * 2
        assert tif.imagej_metadata["channels"] == 3


def test_plain_2d_tiff_and_png(tmp_path):
    import imageio.v3 as iio

    a = np.arange(100, dtype=np.uint8).reshape(10, 10)
    tifffile.imwrite(tmp_path / "a.tif", a)
    iio.imwrite(tmp_path / "a.png", a)
    assert read_image(tmp_path / "a.tif").data.shape == (1, 10, 10)
    assert np.array_equal(read_image(tmp_path / "a.png").data[0], a)


def test_rgb_is_refused_with_advice(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (10, 10, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    with pytest.raises(UserError, match="RGB.*8-bit"):
        read_image(tmp_path / "rgb.tif")


def test_bad_image_files(tmp_path):
    (tmp_path / "bad.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(UserError, match="not a readable TIFF"):
        read_image(tmp_path / "bad.tif")
    with pytest.raises(UserError, match="no such file"):
        read_image(tmp_path / "missing.tif")
    (tmp_path / "a.xyz").write_bytes(b"x")
    with pytest.raises(UserError, match="unsupported image format"):
        read_image(tmp_path / "a.xyz")


def test_roiset_types_and_positions(tmp_path):
    poly = roifile.ImagejRoi.frompoints(np.array([[1, 1], [9, 1], [9, 9]], np.float32), name="cell-1")
    poly.position = 2
    rect = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, left=2, top=3, right=7, bottom=8, name="bg")
    oval = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.OVAL, left=0, top=0, right=10, bottom=6, name="cell 2")
    p = tmp_path / "RoiSet.zip"
    roifile.roiwrite(p, [poly, rect, oval])
    shapes = read_rois(p)
    assert [s.kind for s in shapes] == ["polygon", "rect", "oval"]
    assert [s.name for s in shapes] == ["cell-1", "bg", "cell 2"]
    assert shapes[0].position == 2
    assert np.allclose(shapes[1].polygons[0].min(0), [2, 3])
    assert np.allclose(shapes[1].polygons[0].max(0), [7, 8])


def test_single_roi_file_and_line_roi_error(tmp_path):
    r = roifile.ImagejRoi.frompoints(np.array([[1, 1], [9, 1], [9, 9]], np.float32), name="bg")
    r.tofile(tmp_path / "one.roi")
    assert read_rois(tmp_path / "one.roi")[0].name == "bg"
    line = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.LINE, x1=0, y1=0, x2=5, y2=5, name="cell")
    line.tofile(tmp_path / "line.roi")
    with pytest.raises(UserError, match="line ROI.*Line to Area"):
        read_rois(tmp_path / "line.roi")


def test_corrupt_roiset(tmp_path):
    (tmp_path / "RoiSet.zip").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a zip"):
        read_rois(tmp_path / "RoiSet.zip")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("a.roi", b"not a roi")
    with pytest.raises(UserError, match="not a readable ImageJ ROI"):
        read_rois(tmp_path / "other.zip")


def _path(pts):
    ops = [0, *pts[0]]
    for p in pts[1:]:
        ops += [1, *p]
    return ops + [4]


def test_composite_roi_with_hole(tmp_path):
    from tem_ij_plugin.annotations import shape_mask

    outer = [(0, 0), (10, 0), (10, 10), (0, 10)]
    inner = [(3, 3), (6, 3), (6, 6), (3, 6)]
    mc = np.array(_path(outer) + _path(inner), np.float32)
    roi = roifile.ImagejRoi(
        roitype=roifile.ROI_TYPE.RECT, left=0, top=0, right=10, bottom=10, name="cell-ring", multi_coordinates=mc
    )
    roi.shape_roi_size = len(mc)
    roi.tofile(tmp_path / "ring.roi")
    (shape,) = read_rois(tmp_path / "ring.roi")
    assert shape.kind == "composite"
    assert len(shape.polygons) == 2
    mask = shape_mask(shape, 12, 12)
    assert mask.sum() == 100 - 9
    assert not mask[3:6, 3:6].any()
    assert mask[0:3, 0:10].all()


def test_planes_read_the_same_without_os_pread(tmp_path, monkeypatch):
    """Windows has no os.pread: the seek-and-read path must give the same planes."""
    import tifffile

    from tem_ij_plugin.io import PlaneReader

    data = np.random.default_rng(0).integers(0, 60000, (3, 40, 50)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", data, imagej=True, metadata={"axes": "ZYX"})
    monkeypatch.delattr("os.pread")
    with PlaneReader(tmp_path / "s.tif") as r:
        assert np.array_equal(np.stack([r.read(i) for i in (2, 0, 1)]), data[[2, 0, 1]])
