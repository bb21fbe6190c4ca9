import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from conftest import run_cli, sha256

run = run_cli


@pytest.fixture()
def model(files, capsys):
    out = files["dir"] / "cells.model"
    code, stdout, err = run(
        capsys, "train", files["image"], "--rois", files["rois"], "-o", out, "--config", files["config"]
    )
    assert code == 0, err
    assert "saved" in stdout
    return out


def test_train_then_predict_probabilities(files, model, capsys):
    before = {k: sha256(files[k]) for k in ("image", "rois")}
    out = files["dir"] / "probs.tif"
    code, stdout, err = run(capsys, "predict", model, files["image"], "-o", out, "--tile", 96, "--overlap", 16)
    assert code == 0, err
    with tifffile.TiffFile(out) as tif:
        data = tif.series[0].asarray()
        meta = tif.imagej_metadata
        xres = tif.pages[0].tags["XResolution"].value
    assert data.dtype == np.float32
    assert data.shape == (2, 256, 256)  # C, Y, X (Z = 1 squeezed)
    assert np.allclose(data.sum(0), 1, atol=1e-4)
    assert meta["Labels"] == ["background", "cell"]
    assert meta["unit"] == "\\u00B5m"
    assert xres[0] / xres[1] == pytest.approx(200.0)
    assert {k: sha256(files[k]) for k in ("image", "rois")} == before, "inputs are never modified"


def test_predict_labels_on_stack(files, model, capsys):
    stack = np.stack([tifffile.imread(files["image"])] * 2)
    tifffile.imwrite(files["dir"] / "stack.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    out = files["dir"] / "labels.tif"
    code, _, err = run(capsys, "predict", model, files["dir"] / "stack.tif", "-o", out, "--kind", "labels")
    assert code == 0, err
    lab = tifffile.imread(out)
    assert lab.shape == (2, 256, 256)
    assert lab.dtype == np.uint8
    assert set(np.unique(lab)) <= {0, 1}


def test_small_image_is_padded(files, model, capsys):
    small = tifffile.imread(files["image"])[:50, :70]
    tifffile.imwrite(files["dir"] / "small.tif", small)
    out = files["dir"] / "small-probs.tif"
    code, _, err = run(capsys, "predict", model, files["dir"] / "small.tif", "-o", out)
    assert code == 0, err
    assert tifffile.imread(out).shape == (2, 50, 70)


def test_warm_start_and_history(files, model, capsys):
    out = files["dir"] / "round2.model"
    code, _, err = run(
        capsys,
        "train",
        files["image"],
        "--rois",
        files["rois"],
        "-o",
        out,
        "--init",
        model,
        "--config",
        files["config"],
        "--max-minutes",
        "0.5",
    )
    assert code == 0, err
    from tem_ij_plugin.modelio import read_metadata

    assert len(read_metadata(out)["history"]["rounds"]) == 2


def write_rois(path, specs):
    import roifile

    rois = []
    for name, pts in specs:
        rois.append(roifile.ImagejRoi.frompoints(np.asarray(pts, np.float32), name=name))
    roifile.roiwrite(path, rois, mode="w")


TRI = [[10, 10], [60, 10], [10, 60]]
FAR = [[1000, 1000], [1100, 1000], [1000, 1100]]


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown", "unknown class"),
        ("unnamed", "no class name"),
        ("one_class", "only one class"),
        ("outside", "entirely outside"),
        ("rgb", "RGB"),
        ("same_output", "would overwrite the input"),
        ("no_dir", "does not exist"),
        ("corrupt_init", "not a tem_ij_plugin model"),
        ("bad_config", "invalid settings"),
        ("empty", "empty"),
    ],
)
def test_train_bad_input_exit_2_without_traceback(files, capsys, case, message):
    d = files["dir"]
    image, rois, out = files["image"], files["rois"], d / "m.model"
    extra = []
    if case == "unknown":
        extra = ["--classes", "background,mito"]
    elif case in ("unnamed", "one_class", "outside", "empty"):
        rois = d / f"{case}.zip"
        specs = {
            "unnamed": [("0001-0001", TRI), ("bg", TRI)],
            "one_class": [("cell-1", TRI), ("cell-2", TRI)],
            "outside": [("bg", TRI), ("cell", FAR)],
            "empty": [],
        }[case]
        if specs:
            write_rois(rois, specs)
        else:
            import zipfile

            zipfile.ZipFile(rois, "w").close()
    elif case == "rgb":
        image = d / "rgb.tif"
        tifffile.imwrite(image, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    elif case == "same_output":
        out = image
    elif case == "no_dir":
        out = d / "missing" / "m.model"
    elif case == "corrupt_init":
        (d / "bad.model").write_bytes(b"\x00" * 100)
        extra = ["--init", d / "bad.model"]
    elif case == "bad_config":
        (d / "bad.yaml").write_text("train:\n  learning_rat: 0.1\n")
        extra = ["--config", d / "bad.yaml"]
    before = sha256(image), sha256(rois)
    code, _, err = run(capsys, "train", image, "--rois", rois, "-o", out, *extra)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert (sha256(image), sha256(rois)) == before
    if case != "same_output":
        assert not out.exists()


def test_init_with_different_classes(files, model, capsys):
    d = files["dir"]
    write_rois(d / "three.zip", [("bg", TRI), ("mito-1", [[100, 100], [150, 100], [100, 150]])])
    code, _, err = run(capsys, "train", files["image"], "--rois", d / "three.zip", "-o", d / "x.model", "--init", model)
    assert code == 2
    assert "unknown class(es) mito" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir(files, capsys):
    ro = files["dir"] / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, _, err = run(capsys, "train", files["image"], "--rois", files["rois"], "-o", ro / "m.model")
    assert code == 2
    assert "not writable" in err


def test_unwritable_output_as_root_too(files, capsys):
    # A file in place of the folder cannot be written whoever we are.
    blocker = files["dir"] / "blocker"
    blocker.write_text("x")
    code, _, err = run(capsys, "train", files["image"], "--rois", files["rois"], "-o", blocker / "m.model")
    assert code == 2
    assert "does not exist" in err


def test_predict_with_corrupt_model(files, capsys):
    bad = files["dir"] / "bad.model"
    bad.write_bytes(b"PK\x03\x04 this is a zip header, not a model")
    code, _, err = run(capsys, "predict", bad, files["image"], "-o", files["dir"] / "p.tif")
    assert code == 2
    assert "not a tem_ij_plugin model" in err


def test_print_config_round_trips(files, capsys, tmp_path):
    code, out, _ = run(capsys, "train", "--print-config")
    assert code == 0
    assert "max_minutes: 10.0" in out
    assert "steps:" in out
    (tmp_path / "c.yaml").write_text(out)
    from tem_ij_plugin.config import Settings, load_settings

    assert load_settings(tmp_path / "c.yaml") == Settings()


def test_missing_cuda_is_exit_2(files, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    code, _, err = run(
        capsys, "train", files["image"], "--rois", files["rois"], "-o", files["dir"] / "m.model", "--device", "cuda"
    )
    assert code == 2
    assert "CUDA is not available" in err


def test_console_script_help():
    exe = shutil.which("tem-ij")
    cmd = [exe] if exe else [sys.executable, "-m", "tem_ij_plugin.cli"]
    r = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert "demo" in r.stdout
    assert "predict" in r.stdout


def test_import_is_light():
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, tem_ij_plugin, tem_ij_plugin.cli; "
            "print(any(m in sys.modules for m in ('torch', 'scyjava', 'jpype')))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stdout.strip() == "False", r.stderr


def test_ctrl_c_saves_best_model_and_exits_130(files):
    import signal
    import time

    from tem_ij_plugin.modelio import load_model

    cfg = files["dir"] / "long.yaml"
    cfg.write_text(
        "train:\n  max_iterations: 100000\n  eval_every: 2\n  min_iterations: 0\n"
        "model:\n  depth: 2\n  base_channels: 8\npatches:\n  size: 128\n"
    )
    out = files["dir"] / "interrupted.model"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tem_ij_plugin",
            "train",
            str(files["image"]),
            "--rois",
            str(files["rois"]),
            "-o",
            str(out),
            "--config",
            str(cfg),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Wait until training runs (its first log line), then interrupt like a user pressing Ctrl-C.
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        if "iteration" in line or time.monotonic() > deadline:
            break
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "cancelled" in stdout
    assert "Traceback" not in stderr
    model = load_model(out)
    assert model.meta["history"]["rounds"][-1]["stop_reason"] == "cancelled"


@pytest.mark.parametrize("option, value", [("--max-minutes", "0"), ("--val-patches", "-1")])
def test_invalid_option_values_are_exit_2(files, capsys, option, value):
    code, _, err = run(
        capsys, "train", files["image"], "--rois", files["rois"], "-o", files["dir"] / "m.model", option, value
    )
    assert code == 2
    assert option in err
    assert "Traceback" not in err


def test_predict_tta_is_the_mean_over_flips(files, model, capsys):
    from tem_ij_plugin.modelio import load_model
    from tem_ij_plugin.predict import predict_stack

    out = files["dir"] / "tta.tif"
    code, _, err = run(capsys, "predict", model, files["image"], "-o", out, "--tta", "flips", "--backend", "torch")
    assert code == 0, err
    import torch

    m = load_model(model)
    image = tifffile.imread(files["image"]).astype(np.float32)[None]
    expected = predict_stack(m.net, image, m.normalization, torch.device("cpu"), tta="flips")[0]
    assert np.allclose(tifffile.imread(out), expected, atol=1e-4)


def test_predict_records_tta_in_the_job(files, model, capsys):
    out = files["dir"] / "tta.tif"
    code, _, err = run(capsys, "predict", model, files["image"], "-o", out, "--tta", "flips")
    assert code == 0, err
    import json

    from tem_ij_plugin.stackio import JOB_KEY

    with tifffile.TiffFile(out) as tif:
        job = json.loads(tif.imagej_metadata["Info"])[JOB_KEY]
    assert job["tta"] == "flips"


@pytest.fixture()
def label_image(files, synthetic):
    """A label image painted on the top-left 128 px patch only (0 elsewhere): 1 background, 2 cell."""
    from tem_ij_plugin.io import write_hyperstack

    truth = synthetic[1]
    painted = np.zeros(truth.shape, np.uint8)
    painted[:128, :128] = truth[:128, :128] + 1
    path = files["dir"] / "labkit-labels.tif"
    write_hyperstack(path, painted[None])
    return path


def test_train_from_a_label_image(files, label_image, capsys):
    out = files["dir"] / "from-labels.model"
    code, _, err = run(
        capsys, "train", files["image"], "--labels", label_image, "--classes", "background,cell", "-o", out,
        "--config", files["config"], "--val-patches", "0",  # one painted patch: nothing to hold out
    )  # fmt: skip
    assert code == 0, err
    from tem_ij_plugin.modelio import load_model

    assert load_model(out).classes == ["background", "cell"]


def test_a_label_image_and_rois_train_together(files, label_image, capsys):
    from tem_ij_plugin.modelio import load_model

    counts = {}
    for name, extra in (("labels", []), ("both", ["--rois", files["rois"]])):
        out = files["dir"] / f"{name}.model"
        code, _, err = run(
            capsys, "train", files["image"], "--labels", label_image, *extra, "--classes", "background,cell",
            "-o", out, "--config", files["config"], "--val-patches", "0",  # one painted patch in "labels"
        )  # fmt: skip
        assert code == 0, err
        counts[name] = sum(load_model(out).last_round["labelled_pixels"].values())
    assert counts["both"] > counts["labels"]  # the ROIs outside the painted patch count too


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "name the classes of the values"),
        (["--classes", "cell"], "values 0..2, but 1 class(es)"),
        (["--classes", "background,cell", "--project", "{dir}/proj"], "not a label image"),
    ],
)
def test_bad_label_image_use_is_exit_2(files, label_image, capsys, extra, message):
    argv = ["train", files["image"], "--labels", label_image, "-o", files["dir"] / "x.model"]
    code, _, err = run(capsys, *argv, *[e.format(dir=files["dir"]) for e in extra])
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_a_label_image_of_another_size_is_exit_2(files, capsys):
    from tem_ij_plugin.io import write_hyperstack

    small = files["dir"] / "small-labels.tif"
    write_hyperstack(small, np.tile(np.array([0, 1, 2], np.uint8), (1, 64, 22))[:, :, :64])
    argv = ["train", files["image"], "--labels", small, "--classes", "background,cell"]
    code, _, err = run(capsys, *argv, "-o", files["dir"] / "x.model")
    assert code == 2
    assert "paint the labels on this image" in err


@pytest.mark.parametrize(
    "command",
    ["demo", "train", "predict", "objects", "suggest", "history", "revert", "experiment", "fiji", "install-fiji",
     "doctor", "export"],
)  # fmt: skip
def test_every_command_shows_an_example_in_its_help(capsys, command):
    from tem_ij_plugin.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert f"\n  tem-ij {command} " in capsys.readouterr().out
