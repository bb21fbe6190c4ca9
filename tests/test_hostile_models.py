"""Hostile model files and project folders, refused with one plain message; trainings never lost.

Every file here is written by the test: a real model (trained once per module) or project is copied and
then its bytes are tampered with. Each case runs through the real command line in-process. A comment
"guard" marks a case that the code before these checks already refused in a plain way (a regression
guard); every other case crashed with a traceback, allocated gigabytes or was silently accepted.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_refused, run_cli, tiny_settings, tree_digest

from tem_ij_plugin.config import dump_settings
from tem_ij_plugin.modelio import FORMAT_VERSION, TrainedModel, build_network, load_model, save_model
from tem_ij_plugin.project import RESERVATION_FILE, Project


# -- a real model and a real two-round project, made once ---------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory, synthetic):
    """image.tif, RoiSet.zip, tiny.yaml, proj/ (two rounds) and good.model (round 2's model)."""
    from tem_ij_plugin.cli import main
    from tem_ij_plugin.io import Calibration, write_hyperstack, write_rois

    d = tmp_path_factory.mktemp("hostile")
    image, _, shapes = synthetic
    write_hyperstack(d / "image.tif", image[None], Calibration(0.005, 0.005, "µm"))
    write_rois(d / "RoiSet.zip", shapes)
    (d / "tiny.yaml").write_text(dump_settings(tiny_settings(2)))
    args = ["train", d / "image.tif", "--rois", d / "RoiSet.zip", "--config", d / "tiny.yaml", "--project", d / "proj"]
    for _ in range(2):
        assert main([str(a) for a in args]) == 0
    shutil.copy(d / "proj" / "round-002" / "round.model", d / "good.model")
    return d


@pytest.fixture()
def work(tmp_path, base):
    """A private copy of ``base``."""
    dst = tmp_path / "w"
    shutil.copytree(base, dst, symlinks=True)
    return dst


# -- safetensors bytes ---------------------------------------------------------------------------------------------
def split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header, body: bytes, raw_header: bytes | None = None, length: int | None = None) -> bytes:
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def with_meta(change):
    """A tamper function editing the JSON description (``change(meta)`` edits it in place or returns a new one)."""

    def tamper(data):
        header, body = split(data)
        meta = json.loads(header["__metadata__"]["tem_ij_plugin"])
        meta = change(meta) or meta
        header["__metadata__"]["tem_ij_plugin"] = json.dumps(meta)
        return join(header, body)

    return tamper


def with_header(change):
    def tamper(data):
        header, body = split(data)
        header = change(header) or header
        return join(header, body)

    return tamper


def tensors(header):
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def arch(**kw):
    return with_meta(lambda m: m["architecture"].update(kw))


def norm(**kw):
    return with_meta(lambda m: m["normalization"].update(kw))


def poke_float(value, kind="weight"):
    """Write ``value`` into the first float32 element of the first tensor whose name ends with ``kind``."""

    def tamper(data):
        header, body = split(data)
        name = next(k for k in tensors(header) if k.endswith(kind) and header[k]["dtype"] == "F32")
        begin = header[name]["data_offsets"][0]
        body = body[:begin] + struct.pack("<f", value) + body[begin + 4 :]
        return join(header, body)

    return tamper


def negative_offsets(header):
    name = tensors(header)[0]
    header[name]["data_offsets"] = [-4, header[name]["data_offsets"][1]]


def overlapping_offsets(header):
    names = tensors(header)
    sizes = {}
    for k in names:
        b, e = header[k]["data_offsets"]
        sizes.setdefault((header[k]["dtype"], e - b), []).append(k)
    a, b = next(v for v in sizes.values() if len(v) >= 2)[:2]
    header[b]["data_offsets"] = list(header[a]["data_offsets"])


def drop_last_tensor(data):
    header, body = split(data)
    last = tensors(header)[-1]
    begin = header.pop(last)["data_offsets"][0]
    return join(header, body[:begin])


def nested_description(data):
    header, body = split(data)
    header["__metadata__"]["tem_ij_plugin"] = "[" * 200_000 + "]" * 200_000
    return join(header, body)


def nested_header(data):
    raw = b"[" * 200_000 + b"]" * 200_000
    return join(None, b"", raw_header=raw)


def header_length(value):
    def tamper(data):
        return struct.pack("<Q", value if value >= 0 else len(data)) + data[8:]

    return tamper


PRIOR = {"method": "mean", "train_prior": [0.5, 0.5], "image_prior": [0.5, 0.5], "logit_shift": [0.0, 0.0]}


def history_rounds(value):
    return with_meta(lambda m: m["history"].update(rounds=value))


def last_round(**kw):
    return with_meta(lambda m: m["history"]["rounds"][-1].update(kw))


HUGE_RF = {"mass": 0.99, "radius": 10**9}
NEWER = FORMAT_VERSION + 1

# (id, how the file is used, tamper, words the one error line must hold besides the file name)
HOSTILE_MODELS = [
    # Memory bombs: the old code built the network from these numbers (2 GB / >23 GB); refused from the header.
    ("base_channels_1024", "predict", arch(base_channels=1024), ["base_channels"]),
    ("depth_40", "predict", arch(depth=40), ["depth"]),
    ("depth_40_as_init", "init", arch(depth=40), ["depth"]),
    ("base_channels_1024_as_init", "init", arch(base_channels=1024), ["base_channels"]),
    ("steps_100", "predict", arch(steps=100), ["steps"]),  # same weights: was accepted and ran 100 steps
    ("unknown_norm", "predict", arch(norm="layer"), ["norm"]),  # guard: build_network's ValueError was caught
    ("in_channels_bool", "predict", arch(in_channels=True), ["in_channels"]),
    ("architecture_is_a_list", "predict", with_meta(lambda m: m.update(architecture=[])), ["architecture"]),
    ("classes_beyond_outputs", "predict", with_meta(lambda m: m["classes"].append("mito")), ["n_classes"]),
    ("duplicate_class", "predict", with_meta(lambda m: m.update(classes=["cell", "cell"])), ["duplicate"]),
    ("blank_class_name", "predict", with_meta(lambda m: m.update(classes=["background", " "])), ["blank"]),
    ("classes_a_string", "predict", with_meta(lambda m: m.update(classes="background,cell")), ["classes"]),
    ("percentiles_reversed", "predict", norm(low=99.8, high=1.0), ["percentile"]),
    ("percentile_above_100", "predict", norm(high=250.0), ["normalization.high"]),
    ("percentile_nan", "predict", norm(low=math.nan), ["normalization.low", "finite"]),
    ("receptive_field_huge", "predict", with_meta(lambda m: m.update(effective_receptive_field=HUGE_RF)), ["radius"]),
    (
        "object_area_negative",
        "predict",
        with_meta(lambda m: m.update(object_areas={"cell": {"count": 9, "median_px": -5.0}})),
        ["object_areas"],
    ),
    ("object_areas_a_list", "predict", with_meta(lambda m: m.update(object_areas=[1, 2])), ["object_areas"]),
    ("description_nested_200000", "predict", nested_description, ["nested"]),
    ("header_nested_200000", "predict", nested_header, ["nested"]),
    ("metadata_not_a_mapping", "predict", with_header(lambda h: h.update(__metadata__=["x"])), ["__metadata__"]),
    (
        "metadata_value_not_a_string",
        "predict",
        with_header(lambda h: h.update(__metadata__={"tem_ij_plugin": {"format": "tem_ij_plugin.model"}})),
        ["__metadata__"],
    ),
    ("description_is_a_list", "predict", with_meta(lambda m: [m]), ["not a mapping"]),
    ("huge_header_length", "predict", header_length(2**62), ["header length"]),  # guard (other words)
    ("header_length_past_end", "predict", header_length(-1), ["past the end"]),  # guard (other words)
    ("negative_data_offsets", "predict", with_header(negative_offsets), ["data_offsets"]),
    ("overlapping_data_offsets", "predict", with_header(overlapping_offsets), ["overlaps"]),
    ("truncated_weights", "predict", lambda d: d[:-64], ["truncated"]),  # guard: safetensors refused it
    ("trailing_bytes", "predict", lambda d: d + b"\0" * 64, ["after the last tensor"]),
    ("unknown_dtype", "predict", with_header(lambda h: h[tensors(h)[0]].update(dtype="F33")), ["dtype"]),
    ("tensor_entry_a_list", "predict", with_header(lambda h: h.update({tensors(h)[0]: [1, 2]})), ["dtype, shape"]),
    ("missing_tensor", "predict", drop_last_tensor, ["missing"]),  # guard: load_state_dict(strict) refused it
    ("weights_smaller_than_described", "predict", arch(base_channels=16), ["shape"]),  # guard, now pre-allocation
    ("nan_weight", "predict", poke_float(math.nan), ["non-finite"]),
    ("inf_running_var_as_init", "init", poke_float(math.inf, "running_var"), ["non-finite"]),
    ("format_version_a_string", "predict", with_meta(lambda m: m.update(format_version="2")), ["format_version"]),
    # guard: the one refusal the old code already made plainly
    ("format_version_newer", "predict", with_meta(lambda m: m.update(format_version=NEWER)), ["newer tem_ij_plugin"]),
    ("history_rounds_a_mapping_as_init", "init", history_rounds({"1": {}}), ["history.rounds"]),
    ("history_finished_not_a_time_as_init", "init", last_round(finished="yesterday"), ["finished"]),
    ("history_iterations_a_string_as_init", "init", last_round(iterations="12"), ["iterations"]),
    (
        "prior_shift_for_other_classes_as_init",
        "init",
        last_round(prior_correction={**PRIOR, "logit_shift": [0.1, 0.2, 0.3]}),
        ["prior correction", "3 logit"],
    ),
    (
        "prior_shift_huge_as_init",
        "init",
        last_round(prior_correction={**PRIOR, "logit_shift": [1e30, 0.0]}),
        ["logit_shift"],
    ),
    (
        "prior_relative_without_reference",
        "predict",
        last_round(prior_correction={**PRIOR, "method": "relative"}),
        ["reference"],
    ),
    (
        "prior_reference_zero",
        "predict",
        last_round(prior_correction={**PRIOR, "method": "relative", "reference": [0.0, 1.0]}),
        ["reference"],
    ),
    (
        "prior_reference_for_other_classes",
        "predict",
        last_round(prior_correction={**PRIOR, "method": "relative", "reference": [0.2, 0.3, 0.5]}),
        ["reference"],
    ),
    (
        "refit_patches_not_boxes_as_init",
        "init",
        last_round(refit={"iterations": 2, "from_iteration": 4, "patches": [[0, 0]]}),
        ["refit"],
    ),
]


@pytest.mark.parametrize(
    ("via", "tamper", "needles"), [c[1:] for c in HOSTILE_MODELS], ids=[c[0] for c in HOSTILE_MODELS]
)
def test_hostile_model_file_is_refused(via, tamper, needles, work, capsys):
    bad = work / "bad.model"
    bad.write_bytes(tamper((work / "good.model").read_bytes()))
    before = tree_digest(work)
    if via == "predict":
        code, _, err = run_cli(capsys, "predict", bad, work / "image.tif", "-o", work / "out.tif")
    else:
        out = ["--rois", work / "RoiSet.zip", "--config", work / "tiny.yaml", "-o", work / "new.model"]
        code, _, err = run_cli(capsys, "train", work / "image.tif", *out, "--init", bad)
    assert_refused(code, err, before, tree_digest(work), "bad.model", *needles)


def test_the_corpus_starts_from_a_good_file(work, capsys):
    """The same split/join round trip, untampered, predicts: the refusals above are about the tampering."""
    (work / "same.model").write_bytes(with_meta(lambda m: None)((work / "good.model").read_bytes()))
    code, _, err = run_cli(capsys, "predict", work / "same.model", work / "image.tif", "-o", work / "out.tif")
    assert code == 0, err
    assert len(HOSTILE_MODELS) >= 16


def test_memory_bombs_are_refused_before_any_network_is_built(work, monkeypatch):
    """The architecture is checked (and the weights fitted on torch's meta device) before allocating."""
    import tem_ij_plugin.modelio as modelio

    built = []
    real = modelio.build_network
    monkeypatch.setattr(modelio, "build_network", lambda a: built.append(a) or real(a))
    for name, change in (("wide", arch(base_channels=1024)), ("deep", arch(depth=40))):
        (work / f"{name}.model").write_bytes(change((work / "good.model").read_bytes()))
        with pytest.raises(modelio.ModelFileError, match="base_channels|depth"):
            load_model(work / f"{name}.model")
    assert built == []


def test_version_1_groupnorm_file_still_loads(tmp_path):
    """Guard: files of format 1 have no "norm" (GroupNorm) and must keep loading."""
    arch1 = {"n_classes": 2, "depth": 2, "base_channels": 8, "steps": 1, "norm": "group"}
    net = build_network(arch1)
    arch1.pop("norm")
    meta = {"classes": ["background", "cell"], "architecture": arch1, "normalization": {"method": "percentile"}}
    save_model(tmp_path / "v1.model", TrainedModel(net, meta))
    header, body = split((tmp_path / "v1.model").read_bytes())
    m = json.loads(header["__metadata__"]["tem_ij_plugin"])
    m["format_version"] = 1
    header["__metadata__"]["tem_ij_plugin"] = json.dumps(m)
    (tmp_path / "v1.model").write_bytes(join(header, body))
    model = load_model(tmp_path / "v1.model")
    assert model.net.norm == "group"
    assert model.meta["format_version"] == 1


# -- hostile project folders ---------------------------------------------------------------------------------------
def edit_project(change):
    def tamper(proj: Path):
        data = json.loads((proj / "project.json").read_text())
        change(data)
        (proj / "project.json").write_text(json.dumps(data))

    return tamper


def write(name, text):
    return lambda proj: (proj / name).write_text(text)


def outside_model(data):
    data["rounds"][-1]["model"] = "../good.model"  # a real, valid model just outside the project


def symlinked_round(proj: Path):
    """round-002 replaced by a link to an outside copy of it: the paths look inside but lead outside."""
    shutil.move(proj / "round-002", proj.parent / "elsewhere")
    os.symlink(proj.parent / "elsewhere", proj / "round-002")


def del_key(key):
    return edit_project(lambda d: d["rounds"][0].pop(key))


def round_json(change):
    def tamper(proj):
        path = proj / "round-001" / "round.json"
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return tamper


def remove(name):
    return lambda proj: (proj / name).unlink()


def truncate(name):
    return lambda proj: (proj / name).write_bytes((proj / name).read_bytes()[: (proj / name).stat().st_size // 2])


HOSTILE_PROJECTS = [
    ("truncated_project_json", "history", truncate("project.json"), ["project.json", "corrupt"]),  # guard
    ("project_json_nested_200000", "history", write("project.json", "[" * 200_000), ["project.json", "nested"]),
    ("rounds_a_mapping", "history", edit_project(lambda d: d.update(rounds={"1": d["rounds"][0]})), ["rounds"]),
    ("round_without_best_score", "history", del_key("best_score"), ["rounds.0.best_score"]),
    ("train_s_a_string", "history", edit_project(lambda d: d["rounds"][0].update(train_s="fast")), ["train_s"]),
    ("current_not_a_round", "history", edit_project(lambda d: d.update(current=9)), ["current round 9"]),
    ("format_version_a_string", "history", edit_project(lambda d: d.update(format_version="1")), ["format_version"]),
    ("duplicate_round_numbers", "history", edit_project(lambda d: d["rounds"][1].update(round=1)), ["repeat"]),
    (
        "revert_event_without_from",
        "history",
        edit_project(lambda d: d["events"].append({"time": d["created"], "action": "revert", "round": 1})),
        ["from"],
    ),
    (
        "annotations_outside",
        "history",
        edit_project(lambda d: d["rounds"][0].update(annotations="../../etc/passwd")),
        ["outside"],
    ),
    ("model_outside_warm_start", "train", edit_project(outside_model), ["outside"]),
    (
        "model_absolute_path",
        "suggest",
        edit_project(lambda d: d["rounds"][-1].update(model="/etc/passwd")),
        ["outside"],
    ),
    ("round_folder_symlinked_outside", "suggest", symlinked_round, ["outside"]),
    ("current_round_json_missing", "suggest", remove("round-002/round.json"), ["round.json", "missing"]),
    ("events_a_string", "train", edit_project(lambda d: d.update(events="none")), ["events"]),
    ("revert_to_deleted_model", "revert", remove("round-001/round.model"), ["round.model", "missing"]),
    ("revert_to_truncated_model", "revert", truncate("round-001/round.model"), ["round 1", "truncated"]),
    ("revert_round_json_edited", "revert", round_json(lambda r: r.update(iterations=999)), ["does not agree"]),
    ("revert_round_json_truncated", "revert", truncate("round-001/round.json"), ["round.json", "corrupt"]),
    (
        "revert_round_json_wrong_type",
        "revert",
        round_json(lambda r: r.update(labelled_pixels=[1, 2])),
        ["round.json", "labelled_pixels"],
    ),
]


@pytest.mark.parametrize(
    ("via", "tamper", "needles"), [c[1:] for c in HOSTILE_PROJECTS], ids=[c[0] for c in HOSTILE_PROJECTS]
)
def test_hostile_project_is_refused(via, tamper, needles, work, capsys):
    proj = work / "proj"
    tamper(proj)
    before = tree_digest(work)
    if via == "history":
        code, _, err = run_cli(capsys, "history", proj)
    elif via == "revert":
        code, _, err = run_cli(capsys, "revert", proj, 1)
    elif via == "suggest":
        code, _, err = run_cli(capsys, "suggest", proj, work / "image.tif", "-o", work / "s.zip")
    else:
        rois = ["--rois", work / "RoiSet.zip", "--config", work / "tiny.yaml"]
        code, _, err = run_cli(capsys, "train", work / "image.tif", *rois, "--project", proj)
    assert_refused(code, err, before, tree_digest(work), *needles)
    assert len(HOSTILE_PROJECTS) >= 8


# -- a finished training is never thrown away ----------------------------------------------------------------------
def train_args(work, *extra):
    return ["train", work / "image.tif", "--rois", work / "RoiSet.zip", "--config", work / "tiny.yaml", *extra]


def assert_consistent(proj: Path, strays=()) -> Project:
    """Every listed round is complete and loadable; every other round folder (but ``strays``, put there by the
    test) is a recognisable leftover of a training."""
    project = Project.open(proj)
    listed = set()
    for r in project.rounds:
        project.verified_round(r["round"])
        load_model(proj / r["model"])
        listed.add(Path(r["model"]).parent.name)
    for folder in proj.glob("round-*"):
        if folder.name not in listed and folder.name not in strays:
            names = {p.name for p in folder.iterdir()}
            # mkdir and the marker are microseconds apart: an empty folder is the only other leftover
            assert not names or RESERVATION_FILE in names or f".{RESERVATION_FILE}.partial" in names, names
    return project


@pytest.mark.parametrize("stray", ["folder", "file", "killed_reservation"])
def test_a_stray_round_folder_does_not_cost_the_training(stray, work, capsys):
    proj = work / "proj"
    third = proj / "round-003"
    if stray == "file":
        third.write_text("not ours")
    else:
        third.mkdir()
        (third / "notes.txt").write_text("kept by hand")
        if stray == "killed_reservation":
            (third / RESERVATION_FILE).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "time": "then"}))
    stray_before = tree_digest(proj / "round-003") if third.is_dir() else third.read_bytes()
    code, out, err = run_cli(capsys, *train_args(work, "--project", proj, "-o", work / "also.model"))
    # The old code trained, then threw the model (and -o) away with exit 2 because round-003 existed.
    assert code == 0, err
    assert "round 4 of" in out
    assert "round-003" in err
    assert "skipped" in err
    assert (tree_digest(third) if third.is_dir() else third.read_bytes()) == stray_before, "never touched"
    project = assert_consistent(proj, strays=["round-003"] if stray != "killed_reservation" else [])
    assert [r["round"] for r in project.rounds] == [1, 2, 4]
    assert project.current == 4
    assert project.round(4)["parent"] == 2
    assert not (proj / "round-004" / RESERVATION_FILE).exists()
    load_model(work / "also.model")


def test_project_write_failure_after_training_keeps_the_model(work, capsys, monkeypatch):
    """Saving project.json fails after training (simulated disk failure: as root, chmod stops nothing)."""
    from tem_ij_plugin.errors import UserError

    proj = work / "proj"
    listed = (proj / "project.json").read_bytes()

    def full_disk(self):
        raise UserError(f"cannot write {self.root / 'project.json'}: No space left on device")

    monkeypatch.setattr(Project, "save", full_disk)
    code, _, err = run_cli(capsys, *train_args(work, "--project", proj, "-o", work / "out.model"))
    # The old code saved the round's model but said nothing of it, and never wrote -o.
    assert code == 2
    assert "Traceback" not in err
    assert err.count(": error: ") == 1
    assert "No space left on device" in err
    assert str(proj / "round-003" / "round.model") in err
    assert str(work / "out.model") in err
    load_model(proj / "round-003" / "round.model")
    load_model(work / "out.model")
    assert (proj / "project.json").read_bytes() == listed
    assert (proj / "round-003" / RESERVATION_FILE).is_file(), "recognisable as an unregistered round"
    monkeypatch.undo()
    assert_consistent(proj)
    code, out, err = run_cli(capsys, *train_args(work, "--project", proj))
    assert code == 0, err
    assert "round 4 of" in out, err
    assert "round-003" in err, err


def test_output_write_failure_after_training_keeps_the_round(work, capsys, monkeypatch):
    """-o cannot be written after training (simulated: the model writer fails for that path only)."""
    import tem_ij_plugin.modelio as modelio
    from tem_ij_plugin.errors import UserError

    proj, out = work / "proj", work / "out.model"
    real = modelio.save_model

    def failing(path, model):
        if Path(path) == out:
            raise UserError(f"cannot write model file {path}: Input/output error")
        real(path, model)

    monkeypatch.setattr(modelio, "save_model", failing)
    code, _, err = run_cli(capsys, *train_args(work, "--project", proj, "-o", out))
    # The old code registered the round, then failed on -o without saying that the round holds the model.
    assert code == 2
    assert "Traceback" not in err
    assert err.count(": error: ") == 1
    assert "Input/output error" in err
    assert str(proj / "round-003" / "round.model") in err
    assert not out.exists()
    project = assert_consistent(proj)
    assert project.current == 3


def test_a_refused_training_gives_its_round_back(work, capsys, monkeypatch):
    import tem_ij_plugin.train as train_mod
    from tem_ij_plugin.errors import UserError

    def refuse(*a, **k):
        raise UserError("the annotations hold a single class")

    monkeypatch.setattr(train_mod, "train", refuse)
    before = tree_digest(work)
    code, _, err = run_cli(capsys, *train_args(work, "--project", work / "proj"))
    assert_refused(code, err, before, tree_digest(work), "single class")
    # A new project folder is only written once a training starts: a refusal leaves nothing behind.
    code, _, err = run_cli(capsys, *train_args(work, "--project", work / "new", "--classes", "x"))
    assert code == 2
    assert not (work / "new").exists()


# -- SIGKILL at chosen points --------------------------------------------------------------------------------------
def _after(seconds: float) -> bool:
    """True once ``seconds`` have passed since it was first asked (reset with ``_after.start = None``)."""
    if _after.start is None:
        _after.start = time.monotonic()
    return time.monotonic() - _after.start >= seconds


_after.start = None


def _wait_for(predicate, proc, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.002)
    return False


@pytest.mark.slow
def test_killed_training_leaves_a_consistent_project(tmp_path, files):
    """``tem-ij train --project`` killed with SIGKILL at five points; each time the project stays usable."""
    s = tiny_settings(40)
    s.train.eval_every = 10
    cfg = tmp_path / "kill.yaml"
    cfg.write_text(dump_settings(s))
    proj = tmp_path / "proj"
    cmd = [sys.executable, "-m", "tem_ij_plugin", "train", str(files["image"]), "--rois", str(files["rois"])]
    cmd += ["--project", str(proj), "--config", str(cfg)]

    def new_folders(old):
        return [f for f in proj.glob("round-*") if f.name not in old]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    points = {
        "immediately": lambda has: True,
        "round reserved": lambda has: has(RESERVATION_FILE),
        "0.5 s into training": lambda has: has(RESERVATION_FILE) and _after(0.5),
        "1.5 s into training": lambda has: has(RESERVATION_FILE) and _after(1.5),
        "model being saved": lambda has: has(".round.model.partial", "round.model"),
        "round.json written": lambda has: has("round.json"),
    }
    landed = []
    for point, ready in points.items():
        old = {f.name for f in proj.glob("round-*")}
        rounds_before = len(Project.open(proj).rounds) if (proj / "project.json").is_file() else 0

        def has(*names, old=old):
            return any(any((f / n).exists() for n in names) for f in new_folders(old))

        _after.start = None
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            _wait_for(lambda ready=ready: ready(has), proc)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
        left = {f.name: sorted(p.name for p in f.iterdir()) for f in new_folders(old)}
        print(f"killed {point}: exit {proc.returncode}, new round folders {left}")  # shown with -s or on failure
        registered = (proj / "project.json").is_file() and len(Project.open(proj).rounds) > rounds_before
        if proc.returncode == -signal.SIGKILL:
            landed.append(point)
        if (proj / "project.json").is_file():
            assert_consistent(proj)
        # The same command again finishes a round.
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, (point, r.stderr[-2000:])
        project = assert_consistent(proj)
        assert len(project.rounds) == rounds_before + 1 + registered, point
    assert len(landed) >= 5, landed  # killed mid-run, not after it had ended by itself
