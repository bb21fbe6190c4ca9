"""Nothing lost: scratch names never touch inputs, resume verifies what it continues, one writer per output.

Everything runs through the real ``tem-ij predict`` (in-process, or as a real subprocess where a second
process or a kill is involved) on real TIFF and OME-Zarr files.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
from conftest import assert_refused, run_cli, sha256, tree_digest
from test_predict import save_random_model

from tem_ij_plugin.errors import Cancelled
from tem_ij_plugin.schemas import JobStateFile

CLI = [sys.executable, "-m", "tem_ij_plugin"]


@pytest.fixture()
def job(tmp_path, synthetic):
    """A folder with a 3-plane stack and a small model; predict arguments to use on them."""
    image = synthetic[0]
    tifffile.imwrite(
        tmp_path / "stack.tif", np.stack([image, image[::-1], image[:, ::-1]]), imagej=True, metadata={"axes": "ZYX"}
    )
    save_random_model(tmp_path / "m.model")
    return tmp_path


def predict(capsys, d, image, out, *extra):
    return run_cli(capsys, "predict", d / "m.model", image, "-o", out, "--backend", "torch", *extra)


# --- 1. every path we write is checked against every input --------------------------------------------------


def _input_named(d, name, how):
    """The stack as an input called ``name``: a copy, a symlink to it or a hard link to it."""
    target = d / name
    if how == "copy":
        shutil.copy(d / "stack.tif", target)
    elif how == "symlink":
        target.symlink_to(d / "stack.tif")
    else:
        os.link(d / "stack.tif", target)
    return target


@pytest.mark.parametrize(
    "input_name, out_name, extra, how",
    [
        ("X.partial.tif", "X.tif", [], "copy"),  # the case that truncated its own input in 0.2
        ("X.partial.tif", "X.tif", [], "symlink"),
        ("X.partial.tif", "X.tif", [], "hardlink"),
        ("X_labels.partial.tif", "X.tif", ["--kind", "both"], "copy"),
        ("X_labels.tif", "X.tif", ["--kind", "both"], "copy"),
        (".X.tif.partial", "X.tif", [], "copy"),
        ("X.partial.btf", "X.btf", [], "copy"),
    ],
    ids=["partial", "partial-symlink", "partial-hardlink", "labels-partial", "labels-final", "tmp-name", "bigtiff"],
)
def test_scratch_names_never_touch_an_image_input(job, capsys, input_name, out_name, extra, how):
    image = _input_named(job, input_name, how)
    before = tree_digest(job)
    code, _, err = predict(capsys, job, image, job / out_name, *extra)
    assert_refused(code, err, before, tree_digest(job), "would overwrite the input", input_name)


@pytest.mark.parametrize("model_name", ["X.partial.json", "X.lock", ".X.partial.json.partial"])
def test_scratch_names_never_touch_the_model_file(job, capsys, model_name):
    shutil.copy(job / "m.model", job / model_name)
    before = tree_digest(job)
    code, _, err = run_cli(capsys, "predict", job / model_name, job / "stack.tif", "-o", job / "X.tif")
    assert_refused(code, err, before, tree_digest(job), "would overwrite the input", model_name)


def test_a_zarr_output_never_replaces_a_folder_holding_an_input(job, capsys):
    store = job / "X.zarr"
    store.mkdir()
    image = shutil.copy(job / "stack.tif", store / "stack.tif")
    before = tree_digest(job)
    code, _, err = predict(capsys, job, image, store, "--overwrite")
    assert_refused(code, err, before, tree_digest(job), "holding the input", "stack.tif")


def test_a_foreign_partial_file_is_never_overwritten_without_overwrite(job, capsys):
    (job / "X.partial.tif").write_bytes(b"somebody's notes")
    before = tree_digest(job)
    code, _, err = predict(capsys, job, job / "stack.tif", job / "X.tif")
    assert_refused(code, err, before, tree_digest(job), "X.partial.tif", "--overwrite")
    code, _, err = predict(capsys, job, job / "stack.tif", job / "X.tif", "--overwrite")
    assert code == 0, err
    assert not (job / "X.partial.tif").exists()


def test_an_output_that_tem_ij_wrote_is_replaced_by_the_next_run(job, capsys):
    assert predict(capsys, job, job / "stack.tif", job / "X.tif", "--kind", "both")[0] == 0
    tifffile.imwrite(job / "other.tif", tifffile.imread(job / "stack.tif")[:1])
    code, _, err = predict(capsys, job, job / "other.tif", job / "X.tif", "--kind", "both")
    assert code == 0, err
    assert tifffile.imread(job / "X_labels.tif").shape == (256, 256)


@pytest.mark.parametrize(
    "name, extra",
    [("X.tif", []), ("X_labels.tif", ["--kind", "both"]), ("X.zarr", [])],
    ids=["output", "labels-beside-it", "zarr-folder"],
)
def test_an_existing_file_that_tem_ij_did_not_write_is_not_replaced(job, capsys, name, extra):
    if name.endswith(".zarr"):
        (job / name).mkdir()
        (job / name / "keep.txt").write_text("not ours")
    else:
        tifffile.imwrite(job / name, np.ones((8, 8), np.uint8))  # e.g. labels a person painted
    before = tree_digest(job)
    code, _, err = predict(capsys, job, job / "stack.tif", job / "X.tif" if "zarr" not in name else job / name, *extra)
    assert_refused(code, err, before, tree_digest(job), name, "did not write")
    code, _, err = predict(capsys, job, job / "stack.tif", job / "X.tif" if "zarr" not in name else job / name, *extra)
    assert code == 2
    code, _, err = predict(
        capsys, job, job / "stack.tif", job / "X.tif" if "zarr" not in name else job / name, *extra, "--overwrite"
    )
    assert code == 0, err


@pytest.fixture()
def project(files, capsys):
    """A project folder with one trained round."""
    d = files["dir"]
    code, _, err = run_cli(
        capsys, "train", files["image"], "--rois", files["rois"], "--project", d / "P", "--config", files["config"]
    )
    assert code == 0, err
    return d / "P"


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "{image}", "--rois", "{rois}", "--config", "{config}", "-o", "{P}/project.json"],
            "inside the project",
        ),
        (["train", "{image}", "--rois", "{rois}", "--config", "{config}", "-o", "{P}/round-001/round.model"], "input"),
        (["suggest", "{P}", "{image}", "-k", "1", "-o", "{P}/project.zip"], "inside the project folder"),
        (["suggest", "{P}", "{image}", "-k", "1", "-o", "{P}/round-001/round.zip"], "inside the project folder"),
    ],
    ids=["train-o-project-json", "train-o-round-model", "suggest-json-beside-project", "suggest-json-beside-round"],
)
def test_nothing_is_written_into_a_project_folder_but_its_rounds(files, project, capsys, argv, message):
    names = {"image": files["image"], "rois": files["rois"], "config": files["config"], "P": project}
    argv = [a.format(**names) for a in argv]
    if "--project" not in argv and argv[0] == "train":
        argv += ["--project", str(project)]
    before = tree_digest(files["dir"])
    code, _, err = run_cli(capsys, *argv)
    assert_refused(code, err, before, tree_digest(files["dir"]), message)


def test_a_small_tile_without_overlap_is_refused_not_turned_into_thousands_of_tiles(job, capsys):
    save_random_model(job / "deep.model", depth=4)  # its receptive field asks for a wide overlap
    before = tree_digest(job)
    code, _, err = run_cli(capsys, "predict", job / "deep.model", job / "stack.tif", "-o", job / "X.tif", "--tile", 32)
    assert_refused(code, err, before, tree_digest(job), "--tile 32 is too small", "--overlap")


def test_an_explicit_overlap_as_large_as_the_tile_is_refused(job, capsys):
    before = tree_digest(job)
    code, _, err = predict(capsys, job, job / "stack.tif", job / "X.tif", "--tile", 64, "--overlap", 64)
    assert_refused(code, err, before, tree_digest(job), "--overlap < --tile")


# --- 2. resume verifies what it continues ----------------------------------------------------------------------


def _interrupted(job, capsys, out, monkeypatch, after=1):
    """Leave ``out``'s partial files as an interrupted run does: ``after`` planes written, then Ctrl-C."""
    from tem_ij_plugin import apply

    real = apply.PredictJob._open

    def cancel_after(self, *a, **kw):
        real(self, *a, **kw)
        write = self.writers[0].write
        count = {"n": 0}

        def counting(i, plane):
            if count["n"] >= after:
                raise Cancelled()
            count["n"] += 1
            return write(i, plane)

        self.writers[0].write = counting

    monkeypatch.setattr(apply.PredictJob, "_open", cancel_after)
    code, _, err = predict(capsys, job, job / "stack.tif", out)
    monkeypatch.setattr(apply.PredictJob, "_open", real)
    assert code == 130, err


@pytest.fixture()
def reference(job, capsys):
    code, _, err = predict(capsys, job, job / "stack.tif", job / "ref.tif")
    assert code == 0, err
    return tifffile.imread(job / "ref.tif")


def test_resume_with_the_partial_image_deleted_predicts_every_plane(job, capsys, monkeypatch, reference):
    _interrupted(job, capsys, job / "X.tif", monkeypatch)
    (job / "X.partial.tif").unlink()
    code, _, err = predict(capsys, job, job / "stack.tif", job / "X.tif", "--resume")
    assert code == 0, err
    assert np.array_equal(tifffile.imread(job / "X.tif"), reference)


def test_resume_recomputes_a_finished_plane_whose_bytes_changed(job, capsys, monkeypatch, reference):
    _interrupted(job, capsys, job / "X.tif", monkeypatch, after=2)
    with tifffile.TiffFile(job / "X.partial.tif") as tif:
        offset = tif.series[0].dataoffset
    with open(job / "X.partial.tif", "r+b") as f:  # zero part of plane 1, as a failing disk would
        f.seek(offset + 1000)
        f.write(bytes(4000))
    code, _, err = predict(capsys, job, job / "stack.tif", job / "X.tif", "--resume")
    assert code == 0, err
    assert "predicting them again" in err
    assert np.array_equal(tifffile.imread(job / "X.tif"), reference)


def test_resume_into_another_output_format_is_refused(job, capsys, monkeypatch):
    _interrupted(job, capsys, job / "X.tif", monkeypatch)
    before = tree_digest(job)
    code, _, err = predict(capsys, job, job / "stack.tif", job / "X.zarr", "--resume")
    assert_refused(code, err, before, tree_digest(job), "X.partial.json", "not to")


def test_resume_without_state_checksums_from_version_0_2_is_refused(job, capsys, monkeypatch):
    _interrupted(job, capsys, job / "X.tif", monkeypatch)
    state = json.loads((job / "X.partial.json").read_text())
    (job / "X.partial.json").write_text(json.dumps({"signature": state["signature"], "done": [0, 1, 2]}))
    before = tree_digest(job)
    code, _, err = predict(capsys, job, job / "stack.tif", job / "X.tif", "--resume")
    assert_refused(code, err, before, tree_digest(job), "X.partial.json", "not a valid prediction state")


HOSTILE_STATES = {
    "truncated": lambda s: json.dumps(s)[:40],
    "not-json": lambda s: "\x00\xff garbage",
    "list": lambda s: "[]",
    "deep-nesting": lambda s: "[" * 200_000 + "]" * 200_000,
    "plane-out-of-range": lambda s: json.dumps({**s, "planes": {"7": s["planes"]["0"]}}),
    "plane-not-a-number": lambda s: json.dumps({**s, "planes": {"x": s["planes"]["0"]}}),
    "plane-a-superscript-digit": lambda s: json.dumps({**s, "planes": {"\u00b2": s["planes"]["0"]}}),
    "checksum-wrong-type": lambda s: json.dumps({**s, "planes": {"0": ["abc"]}}),
    "too-many-checksums": lambda s: json.dumps({**s, "planes": {"0": s["planes"]["0"] * 2}}),
    "newer-version": lambda s: json.dumps({**s, "format_version": 99}),
    "signature-changed": lambda s: json.dumps({**s, "signature": {**s["signature"], "tile": 1}}),
    "extra-key": lambda s: json.dumps({**s, "surprise": 1}),
    "outputs-elsewhere": lambda s: json.dumps({**s, "outputs": [{**s["outputs"][0], "work": "/etc/passwd"}]}),
}


@pytest.mark.parametrize("case", HOSTILE_STATES)
def test_a_tampered_resume_state_is_a_plain_error(job, capsys, monkeypatch, case):
    _interrupted(job, capsys, job / "X.tif", monkeypatch)
    state = json.loads((job / "X.partial.json").read_text())
    (job / "X.partial.json").write_text(HOSTILE_STATES[case](state))
    before = tree_digest(job)
    code, _, err = predict(capsys, job, job / "stack.tif", job / "X.tif", "--resume")
    assert_refused(code, err, before, tree_digest(job), "X.partial.json")


# --- 3. one writer per output --------------------------------------------------------------------------------


def _start(job, out, *extra):
    return subprocess.Popen(
        [*CLI, "predict", job / "m.model", job / "stack.tif", "-o", out, "--backend", "torch", *map(str, extra)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition, proc, timeout=120.0):
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > end:
            return False
        time.sleep(0.002)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("resume", [False, True])
def test_a_second_run_on_a_busy_output_is_refused_naming_the_first(job, capsys, resume):
    out = job / "X.tif"
    # 24 planes: its state appears with the first one, and the rest takes far longer than the SIGSTOP below
    tifffile.imwrite(
        job / "stack.tif", np.tile(tifffile.imread(job / "stack.tif"), (8, 1, 1)), imagej=True, metadata={"axes": "ZYX"}
    )
    first = _start(job, out)
    try:
        assert _wait_for(lambda: (job / "X.partial.json").exists(), first)
        first.send_signal(signal.SIGSTOP)  # hold it mid-run, lock held, so the check cannot race its end
        code, _, err = predict(capsys, job, job / "stack.tif", out, *(["--resume"] if resume else []))
        assert code == 2
        assert f"being written by process {first.pid}" in err
    finally:
        first.send_signal(signal.SIGCONT)
        _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
    assert tifffile.imread(out).shape == (24, 2, 256, 256)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_of_a_dead_process_is_reported_and_taken_over(job, capsys):
    lock = {"host": socket.gethostname(), "pid": _dead_pid(), "started": "2026-01-01T00:00:00+00:00", "command": "x"}
    (job / "X.lock").write_text(json.dumps(lock))
    code, _, err = predict(capsys, job, job / "stack.tif", job / "X.tif")
    assert code == 0, err
    assert f"lock left by process {lock['pid']}" in err
    assert not (job / "X.lock").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (json.dumps({"host": "elsewhere.example", "pid": 1, "started": "?", "command": "x"}), "elsewhere.example"),
        ("my shopping list", "not a lock file"),
    ],
    ids=["other-host", "foreign-file"],
)
def test_a_lock_that_cannot_be_checked_is_refused_and_left_alone(job, capsys, content, message):
    (job / "X.lock").write_text(content)
    before = tree_digest(job)
    code, _, err = predict(capsys, job, job / "stack.tif", job / "X.tif")
    assert_refused(code, err, before, tree_digest(job), message, "X.lock")


# --- 4. killed at any point: nothing, or a valid resumable state -------------------------------------------------


def _scratch(d):
    return sorted(p.name for p in d.iterdir() if "partial" in p.name or p.name.endswith(".lock"))


def _kill_points(d):
    """Conditions to SIGKILL ``tem-ij predict`` at, from its start to its last rename."""

    def planes(n):
        def ready():
            try:
                return len(json.loads((d / "K.partial.json").read_text())["planes"]) >= n
            except (OSError, ValueError, KeyError):
                return False

        return ready

    return {
        "at-start": lambda: True,
        "lock-taken": lambda: (d / "K.lock").exists(),
        "state-saved": lambda: (d / "K.partial.json").exists(),
        "partial-created": lambda: (d / "K.partial.tif").exists(),
        "one-plane": planes(1),
        "two-planes": planes(2),
        "all-planes": planes(3),
        "final-renamed": lambda: (d / "K.tif").exists(),
    }


@pytest.mark.slow
def test_predict_killed_anywhere_resumes_to_identical_bytes(tmp_path, synthetic):
    rng = np.random.default_rng(0)
    planes = [np.roll(synthetic[0], int(s), axis=1) for s in rng.integers(0, 256, 3)]
    tifffile.imwrite(
        tmp_path / "stack.tif", np.stack([np.tile(p, (2, 2)) for p in planes]), imagej=True, metadata={"axes": "ZYX"}
    )
    save_random_model(tmp_path / "m.model")
    ref = _start(tmp_path, tmp_path / "ref.tif", "--tile", 256)
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err
    want = sha256(tmp_path / "ref.tif")
    killed = {}  # kill point -> what the killed process had left
    for name, condition in _kill_points(tmp_path).items():
        proc = _start(tmp_path, tmp_path / "K.tif", "--tile", 256, "--resume")
        if _wait_for(condition, proc):
            proc.kill()
        proc.communicate(timeout=300)
        left = _scratch(tmp_path)
        if proc.returncode == -signal.SIGKILL:  # killed before it ended by itself
            killed[name] = tuple(left) + (("K.tif",) if (tmp_path / "K.tif").exists() else ())
        if "K.partial.json" in left:  # whatever a kill leaves is described by a valid state ...
            JobStateFile.model_validate_json((tmp_path / "K.partial.json").read_bytes())
        else:  # ... or is nothing but a dead process's lock and a hidden temporary name, both taken over
            assert set(left) <= {"K.lock", ".K.partial.json.partial"}, name
        rerun = _start(tmp_path, tmp_path / "K.tif", "--tile", 256, "--resume")
        _, err = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, err
        assert sha256(tmp_path / "K.tif") == want, name
        assert _scratch(tmp_path) == [], name
        (tmp_path / "K.tif").unlink()
    assert len(killed) >= 5
    # The kills landed before, inside and after the job. The lock, the state and the partial file appear
    # within milliseconds of each other, so whether a kill falls between two of them is the scheduler's
    # call (it did in most runs, not in all): they count as one phase here.
    assert len(set(killed.values())) >= 3, killed


# --- folders of fixed file names --------------------------------------------------------------------------------


def test_the_demo_never_writes_into_a_folder_of_someone_elses_files(tmp_path, capsys):
    (tmp_path / "image.tif").write_bytes(b"a user's irreplaceable section")
    before = tree_digest(tmp_path)
    code, _, err = run_cli(capsys, "demo", "-o", tmp_path, "--minutes", 0.01)
    assert_refused(code, err, before, tree_digest(tmp_path), str(tmp_path), "did not write")


def test_an_experiment_never_writes_into_a_folder_of_someone_elses_files(files, capsys):
    d = files["dir"]
    truth = d / "truth.tif"
    tifffile.imwrite(truth, (tifffile.imread(files["image"]) > 128).astype(np.uint8))
    before = tree_digest(d)
    code, _, err = run_cli(
        capsys, "experiment", files["image"], "--labels", truth, "-o", d, "--config", files["config"]
    )
    assert_refused(code, err, before, tree_digest(d), str(d), "did not write")


def test_a_finished_output_records_its_job_and_only_that_job_counts_as_done(job, capsys):
    from tem_ij_plugin.apply import PredictJob

    assert predict(capsys, job, job / "stack.tif", job / "X.tif", "--kind", "both")[0] == 0
    same = PredictJob(job / "m.model", job / "stack.tif", job / "X.tif", kind="both")
    assert same.already_done()
    save_random_model(job / "other.model", seed=1)
    assert not PredictJob(job / "other.model", job / "stack.tif", job / "X.tif", kind="both").already_done()
    assert not PredictJob(job / "m.model", job / "stack.tif", job / "X.tif", kind="both", dtype="uint8").already_done()
    (job / "X_labels.tif").unlink()
    assert not same.already_done()


def test_a_run_killed_after_its_renames_is_complete_on_resume_without_predicting_again(job, capsys, monkeypatch):
    from tem_ij_plugin.stackio import JobState

    # A kill between moving the finished files into place and removing the state, simulated by a remove
    # that never happens.
    monkeypatch.setattr(JobState, "remove", lambda self: None)
    assert predict(capsys, job, job / "stack.tif", job / "X.tif")[0] == 0
    monkeypatch.undo()
    before = sha256(job / "X.tif")
    code, out, err = predict(capsys, job, job / "stack.tif", job / "X.tif", "--resume")
    assert code == 0, err
    assert "already complete" in out
    assert sha256(job / "X.tif") == before
    assert not (job / "X.partial.json").exists()


def test_a_demo_folder_of_version_0_2_is_recognised_and_nothing_else_is(tmp_path):
    from tem_ij_plugin.demo import _demo_of_version_0_2

    old = tmp_path / "tem-ij-demo"
    old.mkdir()
    save_random_model(old / "demo.model")
    tifffile.imwrite(old / "image.tif", np.zeros((8, 8), np.uint8))
    assert _demo_of_version_0_2(old)
    (old / "notes.txt").write_text("mine")
    assert not _demo_of_version_0_2(old)
    (old / "notes.txt").unlink()
    (old / "demo.model").write_bytes(b"not a model")
    assert not _demo_of_version_0_2(old)
