"""Hostile and broken inputs, written by the tests and run through the real ``tem-ij`` CLI in-process.

Every case is refused the way users are promised (see ``conftest.assert_refused``): exit status 2, one
plain ``error:`` message naming the file and the problem, no traceback, and nothing written. Cases
marked "regression guard" already passed before the hostile-input work; every other case failed then
(traceback, silent acceptance, minutes of CPU or gigabytes of memory).
"""

from __future__ import annotations

import io as _io
import json
import logging
import struct
import time
import zipfile
import zlib

import numpy as np
import pytest
import roifile
import tifffile
from conftest import assert_refused, run_cli, tiny_settings, tree_digest

from tem_ij_plugin.config import Settings, dump_settings

# --------------------------------------------------------------------------------------------------
# TIFF corpus


def _tiff(width, height, *, compression=1, strip=None, payload=b"", next_ifd=0):
    """A little-endian classic TIFF with one 8-bit IFD at offset 8 and one strip.

    ``strip`` is ``(offset, bytecount)``; offset None means "at the start of ``payload``".
    """
    tags = [
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, compression),
        (262, 3, 1),
        (277, 3, 1),
        (278, 4, height),
        (273, 4, None),
        (279, 4, None),
    ]
    data_start = 8 + 2 + 12 * len(tags) + 4
    offset, count = strip if strip is not None else (None, width * height)
    offset = data_start if offset is None else offset
    out = b"II*\0" + struct.pack("<IH", 8, len(tags))
    for tag, typ, value in tags:
        value = {273: offset, 279: count}.get(tag, value)
        out += struct.pack("<HHIHH", tag, typ, 1, value, 0) if typ == 3 else struct.pack("<HHII", tag, typ, 1, value)
    return out + struct.pack("<I", next_ifd) + payload


def _imagej_stack(path, planes=5, size=32, dtype=np.uint16):
    data = np.arange(planes * size * size).reshape(planes, size, size).astype(dtype)
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZYX"})
    return path


def _described(path, description, planes=5, size=32):
    """A plain TIFF whose first page carries the given (ImageJ-looking) description."""
    data = np.arange(planes * size * size, dtype=np.uint16).reshape(planes, size, size)
    tifffile.imwrite(path, data if planes > 1 else data[0], description=description, metadata=None)
    return path


def truncated_stack(d):
    p = _imagej_stack(d / "truncated.tif")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # 2 of 5 planes survive; later IFDs are lost
    return p


def truncated_plain(d):
    p = d / "cut.tif"
    tifffile.imwrite(p, np.ones((256, 256), np.uint8))
    p.write_bytes(p.read_bytes()[:-1000])
    return p


def imagej_lies_images(d):
    return _described(d / "lies.tif", "ImageJ=1.53t\nimages=9\nslices=9\n")


def imagej_huge_page_count(d):
    return _described(d / "billion.tif", "ImageJ=1.53t\nimages=1000000000\nslices=1000000000\n", planes=1)


def imagej_czt_mismatch(d):
    return _described(d / "frames.tif", "ImageJ=1.53t\nimages=5\nframes=3\n")


def huge_dims(d):
    p = d / "huge.tif"
    p.write_bytes(_tiff(200000, 200000, strip=(None, 4_000_000_000), payload=bytes(64)))
    return p


def huge_dims_compressed_past_eof(d):
    p = d / "hugez.tif"
    p.write_bytes(_tiff(200000, 200000, compression=8, strip=(10**9, 100), payload=bytes(16)))
    return p


def huge_dims_compressed_in_file(d):
    p = d / "hugez2.tif"
    z = zlib.compress(bytes(1000))
    p.write_bytes(_tiff(2**31, 2**31, compression=8, strip=(None, len(z)), payload=z))
    return p


def garbage_header(d):
    p = d / "garbage.tif"
    p.write_bytes(b"II*\0" + bytes(range(256)) * 4)
    return p


def not_a_tiff(d):
    p = d / "text.tif"
    p.write_bytes(b"this is not a tiff at all")
    return p


def ifd_loop(d):
    p = d / "loop.tif"
    p.write_bytes(_tiff(4, 4, strip=(None, 16), payload=bytes(16), next_ifd=8))  # the IFD points at itself
    return p


def zero_size(d):
    p = d / "empty.tif"
    p.write_bytes(b"")
    return p


def nan_pixels(d):
    p = d / "nan.tif"
    data = np.ones((2, 64, 64), np.float32)
    data[0, 1, 2] = np.nan
    data[1, 3, 4] = np.inf
    data[1, 5, 6] = -np.inf
    tifffile.imwrite(p, data, imagej=True, metadata={"axes": "ZYX"})
    return p


TIFF_CASES = [
    # (make, needles, before the change)
    (truncated_stack, ["truncated.tif", "declares 5 planes", "holds only 2"], "read 1 plane silently"),
    (truncated_plain, ["cut.tif", "file is only"], "regression guard: tifffile raised, plain message"),
    (imagej_lies_images, ["lies.tif", "declares 9 planes", "holds only 5"], "read 5 planes silently"),
    (imagej_huge_page_count, ["billion.tif", "declares 1000000000 planes"], "read as a 2-D image"),
    (imagej_czt_mismatch, ["frames.tif", "does not add up"], "read 3 of 5 planes silently"),
    (huge_dims, ["huge.tif", "200000x200000", "bytes long"], "MemoryError traceback / OOM"),
    (huge_dims_compressed_past_eof, ["hugez.tif", "page 1", "file is only"], "MemoryError traceback / OOM"),
    (huge_dims_compressed_in_file, ["hugez2.tif", "memory"], "MemoryError / OverflowError traceback"),
    (garbage_header, ["garbage.tif", "damaged"], "plain 'empty stack' message: regression guard for exit 2"),
    (not_a_tiff, ["text.tif", "not a readable TIFF"], "regression guard"),
    (ifd_loop, ["loop.tif", "circular reference"], "read silently"),
    (zero_size, ["empty.tif", "0 bytes"], "plain 'not a TIFF' message (regression guard for exit 2)"),
    (nan_pixels, ["nan.tif", "3 NaN or infinite"], "NaN silently read as 0"),
]


@pytest.mark.parametrize(
    ("make", "needles", "before"), TIFF_CASES, ids=[c[0].__name__.replace("_", "-") for c in TIFF_CASES]
)
def test_hostile_tiff_is_refused(tmp_path, capsys, make, needles, before):
    image = make(tmp_path)
    state = tree_digest(tmp_path)
    code, _, err = run_cli(capsys, "suggest", image, "-o", tmp_path / "s.zip")
    assert_refused(code, err, state, tree_digest(tmp_path), *needles)


def test_tifffile_log_is_kept_off_the_console(tmp_path, capsys, caplog):
    """tifffile's own log lines about the damage are folded into our one message, not printed."""
    image = truncated_stack(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="tifffile"):
        run_cli(capsys, "suggest", image, "-o", tmp_path / "s.zip")
    assert not [r for r in caplog.records if r.name == "tifffile"]


def test_memory_error_is_a_plain_message(tmp_path, capsys, monkeypatch, files):
    """An allocation that fails anyway (free memory ran out) ends in exit 2 and a message, not a traceback."""
    import tem_ij_plugin.io

    def explode(*a, **k):
        raise MemoryError("Unable to allocate 37.3 GiB for an array with shape (200000, 200000) and data type uint8")

    monkeypatch.setattr(tem_ij_plugin.io, "read_image", explode)
    state = tree_digest(tmp_path)
    code, _, err = run_cli(capsys, "suggest", files["image"], "-o", tmp_path / "s.zip")
    assert_refused(code, err, state, tree_digest(tmp_path), "out of memory", "37.3 GiB")


# --------------------------------------------------------------------------------------------------
# RoiSet corpus


def _roi_bytes(points, name):
    with np.errstate(invalid="ignore"):  # roifile also stores rounded integer coordinates: NaN -> garbage
        return roifile.ImagejRoi.frompoints(np.asarray(points, np.float32), name=name).tobytes()


def _roiset(d, extra: dict, name="RoiSet.zip", keep=True):
    """The fixture's RoiSet.zip plus ``extra`` entries (entry name -> bytes)."""
    src = d / "RoiSet.zip"
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as out:
        if keep:
            with zipfile.ZipFile(src) as zf:
                for info in zf.infolist():
                    out.writestr(info.filename, zf.read(info))
        for entry, data in extra.items():
            out.writestr(entry, data)
    p = d / name
    p.write_bytes(buf.getvalue())
    return p


def nan_coords(d):
    return _roiset(d, {"cell-99.roi": _roi_bytes([[1, 1], [np.nan, 5], [9, 9]], "cell-99")}, "nan.zip")


def inf_coords(d):
    return _roiset(d, {"bg-98.roi": _roi_bytes([[1, 1], [np.inf, 5], [9, 9]], "bg-98")}, "inf.zip")


def truncated_entry(d):
    return _roiset(d, {"broken-cell.roi": _roi_bytes([[1, 1], [20, 5], [9, 9]], "cell-77")[:30]}, "cut.zip")


def foreign_roi_entry(d):
    return _roiset(
        d, {"foreign-cell.roi": b"not an ImageJ ROI, but long enough to pass the size test." * 2}, "foreign.zip"
    )


def zip_bomb(d):
    """An entry that declares 4 GB uncompressed (the header is patched; a real bomb would declare the same)."""
    p = _roiset(d, {"bomb.roi": bytes(1000)}, "bomb.zip")
    data = bytearray(p.read_bytes())
    central = data.rindex(b"PK\x01\x02")  # the last central directory entry is bomb.roi
    data[central + 24 : central + 28] = struct.pack("<I", 0xFFFFFFFE)
    p.write_bytes(bytes(data))
    return p


def only_readme(d):
    return _roiset(d, {"README.txt": b"these are my ROIs"}, "readme.zip", keep=False)


def not_a_zip(d):
    p = d / "text.zip"
    p.write_text("not a zip")
    return p


ROI_CASES = [
    (nan_coords, ["nan.zip", "cell-99", "NaN or infinite"], "NaN reached rasterisation silently"),
    (inf_coords, ["inf.zip", "bg-98", "NaN or infinite"], "OverflowError/ValueError traceback"),
    (truncated_entry, ["cut.zip", "broken-cell.roi", "not a readable ImageJ ROI"], "message without the entry name"),
    (foreign_roi_entry, ["foreign.zip", "foreign-cell.roi", "not a readable ImageJ ROI"], "message without the entry"),
    (zip_bomb, ["bomb.zip", "bomb.roi", "not decompressed"], "decompressed up to 256 MB per entry"),
    (only_readme, ["readme.zip", "holds no ImageJ ROI"], "message without the entry name"),
    (not_a_zip, ["text.zip", "not a zip file"], "regression guard"),
]


@pytest.mark.parametrize(
    ("make", "needles", "before"), ROI_CASES, ids=[c[0].__name__.replace("_", "-") for c in ROI_CASES]
)
def test_hostile_roiset_is_refused(files, capsys, make, needles, before):
    d = files["dir"]
    rois = make(d)
    state = tree_digest(d)
    code, _, err = run_cli(capsys, "suggest", files["image"], "--rois", rois, "-o", d / "s.zip")
    assert_refused(code, err, state, tree_digest(d), *needles)


def test_non_roi_entries_are_skipped_with_a_warning(files, caplog):
    """Decision: like ImageJ's ROI Manager, entries not named *.roi are skipped (and, unlike it, named).

    Before: the whole RoiSet was refused with "not an ImageJ ROI b'draw'", naming no entry.
    """
    from tem_ij_plugin.io import read_rois

    d = files["dir"]
    rois = _roiset(d, {"README.txt": b"drawn by A. on Monday", "__MACOSX/._cell.roi.txt": b"\0\5"}, "extra.zip")
    logger = logging.getLogger("tem_ij_plugin.io")  # the CLI may have made tem_ij_plugin stop propagating
    logger.addHandler(caplog.handler)
    try:
        shapes = read_rois(rois)
    finally:
        logger.removeHandler(caplog.handler)
    assert len(shapes) == len(read_rois(files["rois"])) > 0
    assert "README.txt" in caplog.text
    assert "skipped 2 entries" in caplog.text


def test_nan_shape_from_any_source_is_refused():
    """Shapes from the Fiji bridge never pass through read_rois: rasterize checks them too."""
    from tem_ij_plugin.annotations import Shape, rasterize
    from tem_ij_plugin.errors import UserError

    shapes = [
        Shape("cell-1", "polygon", [np.array([[1, 1], [np.nan, 5], [9, 9]])], 1),
        Shape("bg", "rect", [np.array([[0, 0], [4, 0], [4, 4], [0, 4]], float)], 1),
    ]
    with pytest.raises(UserError, match="cell-1.*NaN or infinite"):
        rasterize(shapes, (1, 16, 16))


# --------------------------------------------------------------------------------------------------
# Config corpus


def _alias_bomb() -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 9):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\n"


CONFIG_CASES = [
    # (file name, content, needles, before)
    ("latin1.yaml", "train:\n  seed: 1  # café\n".encode("latin-1"), ["UTF-8"], "UnicodeDecodeError traceback"),
    ("bomb.yaml", _alias_bomb().encode(), ["aliases"], "83 s and 3.8 GB inside pydantic's error formatting"),
    ("inf.yaml", b"train:\n  learning_rate: .inf\n", ["train.learning_rate", "finite"], "accepted"),
    ("infinity.yaml", b"train:\n  learning_rate: Infinity\n", ["train.learning_rate", "finite"], "accepted"),
    ("nan.yaml", b"augment:\n  noise: .nan\n", ["augment.noise", "finite"], "refused as 'not >= 0', input dump"),
    ("inf.json", b'{"train": {"max_minutes": Infinity}}', ["Infinity"], "accepted: training never timed out"),
    (
        "nan.json",
        b'{"augment": {"gamma": NaN}}',
        ["non-finite number NaN"],
        "refused via gamma < 1, with an input dump",
    ),
    ("zero.yaml", b"0\n", ["mapping", "the number 0"], "silently all defaults"),
    ("list.yaml", b"[]\n", ["mapping", "a list"], "silently all defaults"),
    ("text.yaml", b"learning_rate\n", ["mapping", "the text"], "pydantic error"),
    ("deep.json", b'{"train": ' + b"[" * 50000 + b"]" * 50000 + b"}", ["nested too deeply"], "guard: 'max recursion'"),
    ("deep.yaml", b"train: " + b"[" * 3000 + b"]" * 3000 + b"\n", ["nested more than 16"], "guard: 'max recursion'"),
    ("big.yaml", b"# padding\n" * 120_000, ["larger than 1 MB"], "all defaults"),
    ("typo.yaml", b"train:\n  learning_rat: 0.1\n", ["train.learning_rat", "extra inputs"], "regression guard"),
    ("1e999.yaml", b"train:\n  learning_rate: 1e999\n", ["train.learning_rate", "finite"], "accepted as inf"),
    ("tiling.yaml", b"tiling:\n  tile: 64\n", ["tiling", "--tile"], "accepted and silently ignored"),
]


@pytest.mark.parametrize(("name", "content", "needles", "before"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_hostile_config_is_refused(files, capsys, name, content, needles, before):
    d = files["dir"]
    cfg = d / name
    cfg.write_bytes(content)
    state = tree_digest(d)
    start = time.perf_counter()
    code, _, err = run_cli(
        capsys, "train", files["image"], "--rois", files["rois"], "-o", d / "m.model", "--config", cfg
    )
    assert time.perf_counter() - start < 10.0  # the alias bomb took 83 s before; margin for a loaded machine
    assert_refused(code, err, state, tree_digest(d), name, *needles)
    assert len(err) < 2000


def test_config_errors_are_short_and_bounded(files, capsys):
    """Many errors and huge values: the first few locations only, never a dump of the input."""
    d = files["dir"]
    cfg = d / "many.json"
    cfg.write_text(json.dumps({"train": {f"key{i}": list(range(2000)) for i in range(40)}}))
    state = tree_digest(d)
    code, _, err = run_cli(
        capsys, "train", files["image"], "--rois", files["rois"], "-o", d / "m.model", "--config", cfg
    )
    assert_refused(code, err, state, tree_digest(d), "train.key0", "and 35 more")
    assert len(err) < 1000
    assert "1999" not in err


@pytest.mark.parametrize("content", [b"", b"# nothing set yet\n", b"train:\n"], ids=["empty", "comments", "section"])
def test_empty_config_means_defaults(tmp_path, capsys, content):
    """Decision: an empty file, or an empty section, means the defaults (it is what a fresh template holds)."""
    cfg = tmp_path / "empty.yaml"
    cfg.write_bytes(content)
    code, out, err = run_cli(capsys, "train", "--print-config", "--config", cfg)
    assert code == 0, err
    assert out == dump_settings(Settings())


# --------------------------------------------------------------------------------------------------
# Numbers: seeds


SEED_CASES = [
    ("config-negative", "config", -1, ["train.seed", "greater than or equal to 0"]),
    ("config-2**32", "config", 2**32, ["train.seed", "4294967295"]),
    ("train-seed-negative", "train", -1, ["--seed -1", "0 to 4294967295"]),
    ("train-seed-2**32", "train", 2**32, ["--seed 4294967296", "0 to 4294967295"]),
    ("suggest-seed-negative", "suggest", -1, ["--seed -1", "0 to 4294967295"]),
    ("suggest-seed-2**32", "suggest", 2**32, ["--seed 4294967296"]),
    ("demo-seed-negative", "demo", -5, ["--seed -5", "0 to 4294967295"]),
    ("experiment-seeds", "experiment", 2**32, ["--seeds 4294967296", "0 to 4294967295"]),
]


@pytest.mark.parametrize(("how", "seed", "needles"), [c[1:] for c in SEED_CASES], ids=[c[0] for c in SEED_CASES])
def test_seed_out_of_range_is_refused(files, capsys, how, seed, needles):
    """Before: negative seeds crashed in numpy (traceback) or were accepted by torch; 2**32 likewise."""
    d = files["dir"]
    if how == "config":
        (d / "seed.yaml").write_text(f"train:\n  seed: {seed}\n")
        argv = ["train", files["image"], "--rois", files["rois"], "-o", d / "m.model", "--config", d / "seed.yaml"]
    elif how == "train":
        argv = ["train", files["image"], "--rois", files["rois"], "-o", d / "m.model", "--seed", seed]
    elif how == "suggest":
        argv = ["suggest", files["image"], "-o", d / "s.zip", "--seed", seed]
    elif how == "demo":
        argv = ["demo", "-o", d / "demo", "--seed", seed, "--minutes", "0.01"]
    else:
        argv = ["experiment", files["image"], "--labels", files["image"], "-o", d / "exp", "--seeds", f"0,{seed}"]
    state = tree_digest(d)
    code, _, err = run_cli(capsys, *argv)
    assert_refused(code, err, state, tree_digest(d), *needles)
    assert not (d / "demo").exists()
    assert not (d / "exp").exists()


def test_largest_seed_is_accepted(capsys):
    code, out, err = run_cli(capsys, "train", "--print-config", "--seed", 2**32 - 1)
    assert code == 0, err
    assert "seed: 4294967295" in out


# --------------------------------------------------------------------------------------------------
# Numbers: a loss that becomes non-finite during training (real divergence, no mocking)


def _diverging_config(d, learning_rate, iterations=12):
    s = tiny_settings(iterations)
    s.train.learning_rate = learning_rate
    cfg = d / "diverge.yaml"
    cfg.write_text(dump_settings(s))
    return cfg


def test_nan_loss_before_any_finite_model_writes_nothing(files, capsys):
    """lr 1e30 is finite (so legal) but the loss is NaN at iteration 2, before any validation: plain error."""
    d = files["dir"]
    cfg = _diverging_config(d, 1e30)
    state = tree_digest(d)
    code, _, err = run_cli(
        capsys, "train", files["image"], "--rois", files["rois"], "-o", d / "m.model", "--config", cfg
    )
    assert_refused(code, err, state, tree_digest(d), "loss became non-finite", "nothing was saved", "learning_rate")


def test_divergence_keeps_the_best_finite_model(files, synthetic):
    """lr 1e5 validates a finite model at iteration 4, then the weights blow up: training stops there and
    returns that model, with finite weights, the stop reason recorded and a problem for the caller."""
    import torch

    from tem_ij_plugin.annotations import rasterize
    from tem_ij_plugin.io import read_image, read_rois
    from tem_ij_plugin.train import NON_FINITE, train

    image = read_image(files["image"]).data
    labels = rasterize(read_rois(files["rois"]), image.shape)
    s = tiny_settings(24)
    s.train.learning_rate = 1e5
    result = train(image, labels, s, device="cpu")
    last = result.model.meta["history"]["rounds"][-1]
    assert result.stop_reason == NON_FINITE == last["stop_reason"]
    assert "non-finite" in result.problem
    assert "kept the best model" in result.problem
    assert last["iterations"] < 24
    assert 0 < last["best_iteration"] < last["iterations"]
    assert all(torch.isfinite(v).all() for v in result.model.net.state_dict().values() if v.is_floating_point())


def test_divergence_through_the_cli_saves_then_exits_2(files, capsys):
    """Nothing lost, nothing silent: the best finite model is saved and the command still fails, saying where."""
    from tem_ij_plugin.modelio import load_model

    d = files["dir"]
    cfg = _diverging_config(d, 1e5, iterations=24)
    code, _, err = run_cli(
        capsys, "train", files["image"], "--rois", files["rois"], "-o", d / "m.model", "--config", cfg
    )
    assert code == 2
    assert err.count(": error: ") == 1
    assert "Traceback" not in err
    assert "non-finite" in err
    assert "m.model" in err
    model = load_model(d / "m.model")
    assert model.meta["history"]["rounds"][-1]["stop_reason"] == "non-finite loss"
