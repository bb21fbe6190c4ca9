"""OME-TIFF and OME-BigTIFF outputs with physical sizes and channel names; calibration read from OME-XML and
from the TIFF ResolutionUnit; outputs read back by tifffile's OME parser and by our own reader."""

import numpy as np
import pytest
import tifffile
from conftest import run_cli
from test_predict import save_random_model

from tem_ij_plugin.io import Calibration, PlaneReader, read_image
from tem_ij_plugin.stackio import Layout, open_writer, output_format, partial_path, recorded_job, split_name


@pytest.fixture()
def stack(tmp_path, synthetic):
    """A 3-plane ImageJ stack of 5 nm pixels (0.005 µm), 50 nm apart."""
    image = synthetic[0]
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.stack([image, image[::-1], image[:, ::-1]]), imagej=True, resolution=(200.0, 200.0),
                     metadata={"axes": "ZYX", "unit": "\\u00B5m", "spacing": 0.05})  # fmt: skip
    return path


@pytest.fixture()
def model_file(tmp_path):
    return save_random_model(tmp_path / "m.model", {"patch_size": 256})


def _ome_pixels(path) -> dict:
    """The Pixels element of a file's OME-XML, as tifffile's own parser reads it."""
    with tifffile.TiffFile(path) as tif:
        return tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("p.tif", "imagej"), ("p.ome.tif", "ome"), ("p.OME.TIFF", "ome"), ("p.btf", "bigtiff"), ("p.ome.btf", "bigtiff")],
)
def test_the_output_format_follows_the_whole_suffix(tmp_path, name, fmt):
    assert output_format(tmp_path / name) == fmt


def test_an_ome_tiff_keeps_its_double_suffix_while_partial(tmp_path):
    assert partial_path(tmp_path / "cells.ome.tif").name == "cells.partial.ome.tif"


def test_a_file_named_only_by_the_suffix_keeps_it_as_its_stem(tmp_path):
    assert split_name(tmp_path / ".ome.tif") == (".ome", ".tif")


@pytest.mark.parametrize("name", ["p.btf", "p.ome.tif"])
def test_predict_writes_the_physical_pixel_size_for_ome_readers(stack, model_file, capsys, tmp_path, name):
    code, _, err = run_cli(capsys, "predict", model_file, stack, "-o", tmp_path / name, "--backend", "torch")
    assert code == 0, err
    pixels = _ome_pixels(tmp_path / name)
    assert (pixels["PhysicalSizeX"], pixels["PhysicalSizeXUnit"]) == (0.005, "µm")


@pytest.mark.parametrize("name", ["p.btf", "p.ome.tif"])
def test_predict_writes_the_slice_spacing_for_ome_readers(stack, model_file, capsys, tmp_path, name):
    code, _, err = run_cli(capsys, "predict", model_file, stack, "-o", tmp_path / name, "--backend", "torch")
    assert code == 0, err
    assert _ome_pixels(tmp_path / name)["PhysicalSizeZ"] == 0.05


def test_predict_names_the_channels_for_ome_readers(stack, model_file, capsys, tmp_path):
    code, _, err = run_cli(capsys, "predict", model_file, stack, "-o", tmp_path / "p.btf", "--backend", "torch")
    assert code == 0, err
    assert [c["Name"] for c in _ome_pixels(tmp_path / "p.btf")["Channel"]] == ["background", "cell"]


def test_an_ome_bigtiff_stack_is_a_z_stack_of_channels_not_a_flat_one(stack, model_file, capsys, tmp_path):
    code, _, err = run_cli(capsys, "predict", model_file, stack, "-o", tmp_path / "p.btf", "--backend", "torch")
    assert code == 0, err
    with tifffile.TiffFile(tmp_path / "p.btf") as tif:
        assert tif.series[0].axes == "ZCYX"


def test_the_resolution_tags_give_the_pixel_size_in_centimetres(stack, model_file, capsys, tmp_path):
    code, _, err = run_cli(capsys, "predict", model_file, stack, "-o", tmp_path / "p.btf", "--backend", "torch")
    assert code == 0, err
    with tifffile.TiffFile(tmp_path / "p.btf") as tif:
        page = tif.pages[0]
        num, den = page.tags["XResolution"].value
        assert (int(page.tags["ResolutionUnit"].value), round(num / den)) == (3, 2_000_000)  # 0.005 µm = 5e-7 cm


@pytest.mark.parametrize("name", ["p.btf", "p.ome.tif"])
def test_our_reader_reads_the_calibration_of_an_ome_output(stack, model_file, capsys, tmp_path, name):
    code, _, err = run_cli(capsys, "predict", model_file, stack, "-o", tmp_path / name, "--backend", "torch")
    assert code == 0, err
    with PlaneReader(tmp_path / name, channel=2) as r:
        assert (r.calibration.pixel_width, r.calibration.unit, r.calibration.z_spacing) == (0.005, "µm", 0.05)


def test_our_reader_reads_an_ome_outputs_channel_names_as_slice_labels(stack, model_file, capsys, tmp_path):
    code, _, err = run_cli(capsys, "predict", model_file, stack, "-o", tmp_path / "p.ome.tif", "--backend", "torch")
    assert code == 0, err
    with PlaneReader(tmp_path / "p.ome.tif", channel=2) as r:
        assert r.slice_labels == ["cell"] * 3


def test_objects_from_an_ome_probability_map_measure_in_its_unit(stack, model_file, capsys, tmp_path):
    probs = tmp_path / "p.ome.btf"
    code, _, err = run_cli(capsys, "predict", model_file, stack, "-o", probs, "--backend", "torch")
    assert code == 0, err
    code, _, err = run_cli(capsys, "objects", probs, "--class", "cell", "--measure", tmp_path / "cells.csv")
    assert code == 0, err
    assert "area_um2" in (tmp_path / "cells.csv").read_text().splitlines()[0]


def test_an_ome_output_records_the_job_that_wrote_it(stack, model_file, capsys, tmp_path):
    code, _, err = run_cli(capsys, "predict", model_file, stack, "-o", tmp_path / "p.btf", "--backend", "torch")
    assert code == 0, err
    assert recorded_job(tmp_path / "p.btf")["patch_size"] == 256


def test_an_uncalibrated_ome_output_has_no_physical_size(tmp_path):
    w = open_writer(tmp_path / "o.ome.tif", Layout("", (), None, (8, 9), np.dtype(np.uint16)), Calibration())
    w.write(0, np.zeros((8, 9), np.uint16))
    w.finish()
    assert "PhysicalSizeX" not in _ome_pixels(tmp_path / "o.ome.tif")


def test_a_resumed_ome_output_of_one_plane_reopens_its_squeezed_series(tmp_path):
    lay = Layout("", (), 2, (8, 9), np.dtype(np.float32))
    open_writer(tmp_path / "o.btf", lay, Calibration()).close()
    w = open_writer(tmp_path / "o.btf", lay, Calibration(), resume=True)
    w.write(0, np.ones((2, 8, 9), np.float32))
    w.finish()
    assert tifffile.imread(tmp_path / "o.btf").shape == (2, 8, 9)


# -- reading the calibration of plain and OME TIFFs written elsewhere --------------------------------


@pytest.mark.parametrize(
    ("unit", "expected"),
    [("CENTIMETER", (0.005, "µm")), ("INCH", (5e-7, "inch")), ("NONE", (1.0, "pixel"))],
)
def test_a_plain_tiff_is_read_in_the_unit_of_its_resolution_tag(tmp_path, unit, expected):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((8, 8), np.uint8), resolution=(2e6, 2e6), resolutionunit=unit)
    cal = read_image(tmp_path / "a.tif").calibration
    assert (round(cal.pixel_width, 9), cal.unit) == expected


@pytest.mark.parametrize(
    ("size", "unit", "expected"),
    [
        ("0.004", "µm", (0.004, "µm")),
        ("2", "nm", (2.0, "nm")),
        ("1e-6", "m", (1.0, "µm")),
        ("0.004", None, (0.004, "µm")),  # OME's default unit
        ("0.004", "\u03bcm", (0.004, "µm")),  # the Greek mu some writers use for the micro sign
    ],  # fmt: skip
)
def test_an_ome_tiff_from_elsewhere_is_read_in_its_physical_unit(tmp_path, size, unit, expected):
    meta = {"axes": "YX", "PhysicalSizeX": float(size), "PhysicalSizeY": float(size)}
    if unit:
        meta.update(PhysicalSizeXUnit=unit, PhysicalSizeYUnit=unit)
    tifffile.imwrite(tmp_path / "a.ome.tif", np.zeros((8, 8), np.uint8), ome=True, metadata=meta)
    cal = read_image(tmp_path / "a.ome.tif").calibration
    assert (round(cal.pixel_width, 9), cal.unit) == expected


def _with_description(path, description: str) -> None:
    tifffile.imwrite(path, np.zeros((8, 8), np.uint8), description=description, metadata=None)


@pytest.mark.parametrize(
    "xml",
    [
        '<?xml version="1.0"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image',  # cut short
        '<?xml version="1.0"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="I:0">'
        '<Pixels PhysicalSizeX="nan" PhysicalSizeY="-1" SizeX="8" SizeY="8"/></Image></OME>',
        '<?xml version="1.0"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="I:0">'
        '<Pixels PhysicalSizeX="1" PhysicalSizeXUnit="parsec" PhysicalSizeY="1" SizeX="8" SizeY="8"/></Image></OME>',
    ],
)
def test_broken_or_strange_ome_xml_leaves_the_image_uncalibrated(tmp_path, xml):
    _with_description(tmp_path / "a.ome.tif", xml)
    assert read_image(tmp_path / "a.ome.tif").calibration == Calibration()
