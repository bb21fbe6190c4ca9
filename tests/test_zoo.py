"""bioimage.io model packages: written by `tem-ij export`, checked by the Zoo's own `bioimageio test` (offline),
equal to `tem-ij predict` on the packaged test input, and run by `tem-ij predict` as a MODEL."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from conftest import run_cli, sha256, tree_digest
from test_predict import save_random_model


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A default-architecture model (random weights, trained-like BatchNorm statistics) and its package."""
    folder = tmp_path_factory.mktemp("zoo")
    model = save_random_model(folder / "cells.model", {"patch_size": 256}, depth=5, base=16)
    from tem_ij_plugin.cli import main

    assert main(["export", str(model), "-o", str(folder / "cells.zip")]) == 0
    return {"model": model, "zip": folder / "cells.zip", "dir": folder}


def _bioimageio() -> str | None:
    exe = Path(sys.executable).with_name("bioimageio")
    return str(exe) if exe.exists() else shutil.which("bioimageio")


def test_the_zoos_own_test_passes_offline(package):
    exe = _bioimageio()
    if exe is None:
        if os.environ.get("TEM_IJ_REQUIRE_ZOO") == "1":  # set by .ci/run, which installs the test extras
            pytest.fail("bioimageio.core is required in CI (pip install -e '.[test]')")
        pytest.skip("bioimageio.core not installed")
    # No network: a proxy that does not exist makes any download fail instead of hanging.
    env = {**os.environ, "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    res = subprocess.run([exe, "test", str(package["zip"])], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _rdf(package) -> dict:
    with zipfile.ZipFile(package["zip"]) as zf:
        return yaml.safe_load(zf.read("rdf.yaml"))


def test_the_package_holds_every_file_its_rdf_names(package):
    rdf = _rdf(package)
    named = [rdf["documentation"], *rdf["covers"], *(a["source"] for a in rdf["attachments"])]
    named += [w["source"] for w in rdf["weights"].values()]
    named += [rdf["weights"]["pytorch_state_dict"]["architecture"]["source"]]
    with zipfile.ZipFile(package["zip"]) as zf:
        assert set(named) <= set(zf.namelist())


def test_the_preprocessing_is_the_models_percentile_normalisation(package):
    step = _rdf(package)["inputs"][0]["preprocessing"][0]
    assert (step["id"], step["kwargs"]["min_percentile"], step["kwargs"]["max_percentile"]) == (
        "scale_range",
        1.0,
        99.8,
    )


def test_the_output_halo_is_the_receptive_field_the_model_records(package):
    from tem_ij_plugin.modelio import read_metadata

    radius = read_metadata(package["model"]).get("effective_receptive_field", {}).get("radius")
    halo = _rdf(package)["outputs"][0]["axes"][2]["halo"]
    assert halo >= (radius or 1)


def test_the_channels_are_the_model_classes(package):
    assert _rdf(package)["outputs"][0]["axes"][1]["channel_names"] == ["background", "cell"]


def _packaged(package, name):
    with zipfile.ZipFile(package["zip"]) as zf, zf.open(name) as f:
        return np.load(f)


def test_the_packaged_test_output_is_what_tem_ij_predict_gives(package, capsys):
    x = _packaged(package, "test_input.npy")
    tifffile.imwrite(package["dir"] / "test.tif", x[0, 0])
    out = package["dir"] / "test-probs.tif"
    code, _, err = run_cli(capsys, "predict", package["model"], package["dir"] / "test.tif", "-o", out, "--overwrite")
    assert code == 0, err
    ours, packaged = tifffile.imread(out), _packaged(package, "test_output.npy")[0]
    assert float(np.abs(ours - packaged).max()) <= 0.02
    assert float((ours.argmax(0) == packaged.argmax(0)).mean()) >= 0.999


def test_predict_runs_a_package_as_its_model(package, capsys, synthetic):
    tifffile.imwrite(package["dir"] / "image.tif", synthetic[0])
    outs = []
    for model in (package["model"], package["zip"]):
        outs.append(package["dir"] / f"p-{Path(model).suffix[1:]}.tif")
        code, _, err = run_cli(capsys, "predict", model, package["dir"] / "image.tif", "-o", outs[-1], "--overwrite")
        assert code == 0, err
    assert np.array_equal(tifffile.imread(outs[0]), tifffile.imread(outs[1]))


def test_export_again_replaces_its_own_package(package, capsys):
    code, _, err = run_cli(capsys, "export", package["model"], "-o", package["zip"])
    assert code == 0, err


def test_export_does_not_replace_a_zip_it_did_not_write(package, capsys, tmp_path):
    theirs = tmp_path / "theirs.zip"
    with zipfile.ZipFile(theirs, "w") as zf:
        zf.writestr("notes.txt", "mine")
    before = sha256(theirs)
    code, _, err = run_cli(capsys, "export", package["model"], "-o", theirs)
    assert code == 2
    assert sha256(theirs) == before


def test_export_names_a_zip(package, capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", package["model"], "-o", tmp_path / "cells.yaml")
    assert code == 2
    assert "is a .zip file" in err


def _foreign(tmp_path, rdf: dict, extra=()) -> Path:
    path = tmp_path / "zoo.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("rdf.yaml", yaml.safe_dump(rdf))
        for name, data in extra:
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize(
    ("rdf", "extra"),
    [
        ({"type": "model", "name": "someone else's"}, ()),  # a zoo model from elsewhere
        ({"type": "model", "config": {"tem_ij_plugin": {"model": "../../escape.model"}}}, ()),
        ({"type": "model", "config": {"tem_ij_plugin": {"model": "missing.model"}}}, ()),
        ({"type": "model", "config": {"tem_ij_plugin": "cells.model"}}, (("cells.model", b"x"),)),
    ],
)
def test_a_package_we_did_not_export_is_exit_2_and_changes_nothing(tmp_path, capsys, synthetic, rdf, extra):
    path = _foreign(tmp_path, rdf, extra)
    tifffile.imwrite(tmp_path / "image.tif", synthetic[0])
    before = tree_digest(tmp_path)
    code, _, err = run_cli(capsys, "predict", path, tmp_path / "image.tif", "-o", tmp_path / "p.tif")
    assert code == 2
    assert "not supported yet" in err
    assert tree_digest(tmp_path) == before


def test_a_package_with_a_damaged_model_is_the_model_files_error(tmp_path, capsys, synthetic):
    rdf = {"type": "model", "config": {"tem_ij_plugin": {"model": "cells.model"}}}
    path = _foreign(tmp_path, rdf, (("cells.model", json.dumps({"not": "a model"}).encode()),))
    tifffile.imwrite(tmp_path / "image.tif", synthetic[0])
    code, _, err = run_cli(capsys, "predict", path, tmp_path / "image.tif", "-o", tmp_path / "p.tif")
    assert code == 2
    assert "Traceback" not in err
