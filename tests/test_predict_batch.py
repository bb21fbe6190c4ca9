"""`tem-ij predict` on many images: folders, globs, name templates, the model loaded once, resume of a batch;
and the command line's conventions (--kind, the deprecated --output, -v/-q after the subcommand)."""

import resource
import threading

import numpy as np
import pytest
import tifffile
from conftest import run_cli, tree_digest
from test_predict import glibc_pages, save_random_model, untuned_glibc  # noqa: F401 (a fixture)

from tem_ij_plugin.errors import Cancelled
from tem_ij_plugin.io import write_hyperstack


@pytest.fixture()
def batch(tmp_path, synthetic):
    """Three images in a folder and a model."""
    image = synthetic[0]
    folder = tmp_path / "raw"
    folder.mkdir()
    for name, plane in (("a", image), ("b", image[::-1]), ("c", image[:, ::-1])):
        write_hyperstack(folder / f"{name}.tif", plane[None])
    model = save_random_model(tmp_path / "m.model", {"patch_size": 256})
    return {"folder": folder, "model": model, "dir": tmp_path}


def predict(capsys, *argv):
    return run_cli(capsys, "predict", *argv, "--backend", "torch")


def test_a_folder_goes_to_one_output_per_image(batch, capsys):
    code, _, err = predict(capsys, batch["model"], batch["folder"], "--out-dir", batch["dir"] / "out")
    assert code == 0, err
    names = sorted(p.name for p in (batch["dir"] / "out").iterdir())
    assert names == ["a-probabilities.tif", "b-probabilities.tif", "c-probabilities.tif"]


def test_each_output_of_a_batch_is_the_one_a_single_prediction_writes(batch, capsys):
    code, _, err = predict(capsys, batch["model"], batch["folder"], "--out-dir", batch["dir"] / "out")
    assert code == 0, err
    code, _, err = predict(capsys, batch["model"], batch["folder"] / "c.tif", "-o", batch["dir"] / "c.tif")
    assert code == 0, err
    assert np.array_equal(
        tifffile.imread(batch["dir"] / "out" / "c-probabilities.tif"), tifffile.imread(batch["dir"] / "c.tif")
    )


def test_a_batch_loads_the_model_and_builds_its_predictor_once(batch, monkeypatch):
    from tem_ij_plugin import apply, predict
    from tem_ij_plugin.workflows import predict_files

    calls = {"load": 0, "build": 0}
    real_load, real_build = apply.load_segmenter, predict.make_predictor

    def load(*a, **k):
        calls["load"] += 1
        return real_load(*a, **k)

    def build(*a, **k):
        calls["build"] += 1
        return real_build(*a, **k)

    monkeypatch.setattr(apply, "load_segmenter", load)
    monkeypatch.setattr(predict, "make_predictor", build)
    result = predict_files(batch["model"], [batch["folder"]], batch["dir"] / "out", backend="torch")
    assert len(result.written) == 3
    assert calls == {"load": 1, "build": 1}


def test_a_name_template_names_the_outputs_and_picks_their_format(batch, capsys):
    out = batch["dir"] / "out"
    code, _, err = predict(capsys, batch["model"], batch["folder"], "--out-dir", out, "--name", "{name}_cells.ome.tif")
    assert code == 0, err
    with tifffile.TiffFile(out / "a_cells.ome.tif") as tif:
        assert tif.is_ome


def test_a_quoted_glob_selects_its_matches(batch, capsys):
    code, _, err = predict(capsys, batch["model"], str(batch["folder"] / "[ab].tif"), "--out-dir", batch["dir"] / "o")
    assert code == 0, err
    assert sorted(p.name for p in (batch["dir"] / "o").iterdir()) == ["a-probabilities.tif", "b-probabilities.tif"]


def test_predictions_in_the_input_folder_are_not_predicted_again(batch, capsys):
    folder = batch["folder"]
    assert predict(capsys, batch["model"], folder, "--out-dir", folder)[0] == 0
    code, out, err = predict(capsys, batch["model"], folder, "--out-dir", folder, "--resume")
    assert code == 0, err
    assert "0 file(s) written" in out
    assert "3 already done" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out-dir", "{dir}/o", "--name", "all.tif"], "would be written to all.tif"),
        (["--out-dir", "{dir}/o", "--name", "{stem}.tif"], "not a template"),
        (["--out-dir", "{dir}/o", "--name", "{name.real}.tif"], "not a template"),
        (["--out-dir", "{dir}/o", "--name", "../{name}.tif"], "not a template"),
        (["--out-dir", "{dir}/o", "--name", "{name.tif"], "not a template"),
        (["--out-dir", "{dir}/o", "--name", "{name!r}.tif"], "not a template"),
        (["-o", "{dir}/x.tif"], "use --out-dir"),
        (["-o", "{dir}/x.tif", "--out-dir", "{dir}/o"], "not both"),
        ([], "needs -o OUTPUT"),
    ],
)
def test_a_batch_that_cannot_be_named_is_exit_2_and_writes_nothing(batch, capsys, argv, message):
    before = tree_digest(batch["dir"])
    code, _, err = predict(
        capsys, batch["model"], batch["folder"], *[a.replace("{dir}", str(batch["dir"])) for a in argv]
    )
    assert code == 2
    assert message in err
    assert tree_digest(batch["dir"]) == before


def test_labels_beside_an_output_may_not_meet_another_images_output(batch, capsys):
    import shutil

    shutil.copy(batch["folder"] / "a.tif", batch["folder"] / "a_labels.tif")
    out = batch["dir"] / "o"
    code, _, err = predict(capsys, batch["model"], batch["folder"], "--out-dir", out, "--name", "{name}.tif",
                           "--kind", "both")  # fmt: skip
    assert code == 2
    assert "would be written to a_labels.tif" in err


def test_a_batch_of_ome_zarr_keeps_each_label_image_inside_its_own_image(batch, capsys):
    pytest.importorskip("zarr")
    out = batch["dir"] / "out"
    code, _, err = predict(capsys, batch["model"], batch["folder"], "--out-dir", out, "--name", "{name}.zarr",
                           "--kind", "both")  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a.zarr", "b.zarr", "c.zarr"]
    assert all((out / f"{n}.zarr" / "labels" / "classes" / "0").is_dir() for n in "abc")


def test_an_output_folder_that_is_a_file_is_exit_2(batch, capsys):
    (batch["dir"] / "out.tif").write_bytes(b"x")
    code, _, err = predict(capsys, batch["model"], batch["folder"], "--out-dir", batch["dir"] / "out.tif")
    assert code == 2
    assert "cannot create the output folder" in err


def test_a_missing_image_says_so(batch, capsys):
    code, _, err = predict(capsys, batch["model"], batch["dir"] / "missing.tif", "-o", batch["dir"] / "p.tif")
    assert code == 2
    assert "missing.tif: no such file" in err


def test_a_folder_without_images_is_exit_2(batch, capsys):
    (batch["dir"] / "empty").mkdir()
    code, _, err = predict(capsys, batch["model"], batch["dir"] / "empty", "--out-dir", batch["dir"] / "o")
    assert code == 2
    assert "holds no TIFF image" in err


def test_a_cancelled_batch_resumes_with_the_files_it_finished(batch):
    from tem_ij_plugin.workflows import predict_files

    cancel, out = threading.Event(), batch["dir"] / "out"
    seen = []

    def on_file(i, n, image):
        seen.append(image.name)
        if i == 2:
            cancel.set()  # stop while b.tif is being predicted

    with pytest.raises(Cancelled, match=r"1 of 3 file\(s\) done"):
        predict_files(batch["model"], [batch["folder"]], out, on_file=on_file, cancel=cancel, backend="torch")
    result = predict_files(batch["model"], [batch["folder"]], out, resume=True, backend="torch")
    assert ([p.name for p in result.skipped], [p.name for p in result.written]) == (
        ["a-probabilities.tif"],
        ["b-probabilities.tif", "c-probabilities.tif"],
    )


# -- the command line's conventions ------------------------------------------------------------------


def test_kind_labels_writes_the_label_image(batch, capsys):
    out = batch["dir"] / "l.tif"
    code, _, err = predict(capsys, batch["model"], batch["folder"] / "a.tif", "-o", out, "--kind", "labels")
    assert code == 0, err
    assert tifffile.imread(out).dtype == np.uint8


def test_the_old_output_option_still_works_with_a_warning(batch, capsys):
    out = batch["dir"] / "l.tif"
    code, _, err = predict(capsys, batch["model"], batch["folder"] / "a.tif", "-o", out, "--output", "labels")
    assert code == 0, err
    assert "--output labels is deprecated: use --kind labels" in err


def test_a_path_given_to_the_old_output_option_says_where_the_path_goes(batch, capsys):
    code, _, err = predict(capsys, batch["model"], batch["folder"] / "a.tif", "--output", batch["dir"] / "x.tif")
    assert code == 2
    assert "the output file is -o/--out" in err


@pytest.mark.parametrize(("flag", "shown"), [("-q", False), ("-v", True)])
def test_verbosity_may_follow_the_subcommand(batch, capsys, flag, shown):
    out = batch["dir"] / "p.tif"
    code, _, err = predict(capsys, batch["model"], batch["folder"] / "a.tif", "-o", out, flag)
    assert code == 0, err
    assert ("INFO" in err) == shown


def test_an_image_named_twice_is_predicted_once_in_the_order_given(batch):
    from tem_ij_plugin.workflows import expand_images

    folder = batch["folder"]
    (folder / "link.tif").symlink_to(folder / "a.tif")
    images = expand_images([folder / "c.tif", folder / "link.tif", folder / "a.tif", folder / "b.tif"])
    assert [p.name for p in images] == ["c.tif", "link.tif", "b.tif"]


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@glibc_pages
@pytest.mark.usefixtures("untuned_glibc")
def test_a_batch_reuses_one_files_memory_for_the_next(tmp_path):
    from tem_ij_plugin.workflows import predict_files

    # 16 channels of a 1024-px fp32 tile: each feature map is 64 MB, which glibc would map afresh
    model = save_random_model(
        tmp_path / "m.model", meta={"effective_receptive_field": {"radius": 8, "mass": 0.999}}, depth=2, base=16
    )
    rng = np.random.default_rng(0)
    files = [tmp_path / f"img{i}.tif" for i in range(4)]
    for f in files:
        tifffile.imwrite(f, rng.integers(0, 255, (1024, 1024), dtype=np.uint8))
    starts = []
    predict_files(model, files, tmp_path / "out", on_file=lambda *a: starts.append(_faults()), backend="torch",
                  precision="fp32", tile=1024)  # fmt: skip
    faults = [b - a for a, b in zip(starts, starts[1:])]  # of files 1 to 3
    # Each file apart faults its maps in afresh (here 77671, 97741, 90357 pages); kept, the third file
    # reuses the pages of those before it (76641, 21507, 4098).
    assert faults[2] < 0.5 * faults[0]
