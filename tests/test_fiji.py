"""The Fiji commands on real ImageJ (Debian's libij-java) under Xvfb: one JVM for the whole test run.

Nothing of ImageJ is mocked. These tests skip when ij.jar or a display is missing, except with
``TEM_IJ_REQUIRE_FIJI=1`` (set by .ci/run), where they fail instead: a broken install never passes silently.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import run_cli, tiny_settings

pytestmark = pytest.mark.fiji
IJ_JAR = Path("/usr/share/java/ij.jar")


def _missing() -> str | None:
    if not IJ_JAR.is_file():
        return f"{IJ_JAR} missing (apt-get install libij-java)"
    if not os.environ.get("DISPLAY"):
        return "no display (install xvfb; pytest-xvfb starts it)"
    try:
        import scyjava  # noqa: F401
    except ImportError:
        return "scyjava missing"
    return None


@pytest.fixture(scope="session")
def imagej(tmp_path_factory):
    """ImageJ with its menus (our commands installed) and the bridge attached."""
    reason = _missing()
    if reason:
        if os.environ.get("TEM_IJ_REQUIRE_FIJI") == "1":
            pytest.fail(f"real ImageJ is required in CI: {reason}")
        pytest.skip(reason)
    from scyjava import jimport

    from tem_ij_plugin.fiji.bridge import Bridge, dispose_windows
    from tem_ij_plugin.fiji.launcher import install_scripts, start_plain_imagej

    root = tmp_path_factory.mktemp("imagej")
    install_scripts(root / "plugins")
    start_plain_imagej(IJ_JAR, root)
    bridge = Bridge(tiny_settings()).attach()
    ij = jimport("ij.ImageJ")()
    yield {"ij": ij, "bridge": bridge, "IJ": jimport("ij.IJ")}
    bridge.detach()
    dispose_windows()


@pytest.fixture()
def clean(imagej):
    """Close images, the ROI Manager, dialogs and the log before and after a test."""
    from scyjava import jimport

    def reset():
        IJ = imagej["IJ"]
        _macro(imagej, "setBatchMode(false); while (nImages > 0) { selectImage(nImages); close(); }")
        rm = jimport("ij.plugin.frame.RoiManager").getRawInstance()
        if rm is not None:
            rm.reset()
        for w in _dialogs():
            w.dispose()
        IJ.log("\\Clear")
        imagej["bridge"].errors.clear()

    reset()
    yield imagej
    reset()


def _dialogs(title: str | None = None) -> list:
    from scyjava import jimport

    Dialog = jimport("java.awt.Dialog")
    return [
        w
        for w in jimport("java.awt.Window").getWindows()
        if isinstance(w, Dialog) and w.isShowing() and (title is None or str(w.getTitle()) == title)
    ]


def _wait_for(predicate, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def _log(imagej) -> str:
    text = imagej["IJ"].getLog()
    return "" if text is None else str(text)


def _in_thread(target):
    """Run ImageJ work in a thread of its own: ImageJ renames a thread that runs a macro and may later
    stop every such thread (Interpreter.abortAllMacroThreads), which must never be the test's main thread."""
    errors = []

    def run():
        try:
            target()
        except Exception as exc:  # pragma: no cover - surfaced by the assertion below
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


# -- pixels and ROIs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_numpy_imageplus_round_trip_is_bit_exact(imagej, dtype):
    from tem_ij_plugin.fiji.convert import to_image, to_imageplus
    from tem_ij_plugin.io import Calibration

    rng = np.random.default_rng(1)
    if dtype == np.float32:
        data = rng.normal(size=(3, 37, 53)).astype(np.float32)
        data[0, 0, 0] = np.float32(1e-38)  # subnormal-adjacent values survive too
    else:
        data = rng.integers(0, np.iinfo(dtype).max, size=(3, 37, 53), endpoint=True).astype(dtype)
    cal = Calibration(0.0042, 0.0051, "µm", 0.05)
    imp = to_imageplus(data, "round trip", cal)
    assert (imp.getWidth(), imp.getHeight(), imp.getStackSize()) == (53, 37, 3)
    assert imp.getBitDepth() == {np.uint8: 8, np.uint16: 16, np.float32: 32}[dtype]
    back = to_image(imp)
    assert back.data.dtype == data.dtype
    assert np.array_equal(back.data.view(np.uint8), data.view(np.uint8))
    assert back.calibration == cal
    # and ImageJ itself sees the same values
    assert float(imp.getStack().getProcessor(2).getPixelValue(7, 5)) == pytest.approx(float(data[1, 5, 7]))


def test_colour_and_multichannel_images_are_refused(imagej):
    from scyjava import jimport

    from tem_ij_plugin.errors import UserError
    from tem_ij_plugin.fiji.convert import to_image, to_imageplus

    rgb = jimport("ij.IJ").createImage("rgb", "RGB black", 8, 8, 1)
    with pytest.raises(UserError, match="colour"):
        to_image(rgb)
    two = to_imageplus(np.zeros((1, 2, 8, 8), np.float32), "two", channel_labels=["a", "b"])
    with pytest.raises(UserError, match="2 channels"):
        to_image(two)


def _java_rois():
    from jpype import JArray, JFloat, JInt
    from scyjava import jimport

    Roi = jimport("ij.gui.Roi")
    PolygonRoi = jimport("ij.gui.PolygonRoi")
    OvalRoi = jimport("ij.gui.OvalRoi")
    ShapeRoi = jimport("ij.gui.ShapeRoi")

    def poly(xs, ys, kind):
        return PolygonRoi(JArray(JInt)(xs), JArray(JInt)(ys), len(xs), kind)

    sub = PolygonRoi(JArray(JFloat)([10.3, 40.7, 33.2, 12.9]), JArray(JFloat)([50.5, 52.1, 70.8, 66.4]), 4, Roi.POLYGON)
    composite = ShapeRoi(Roi(20, 10, 40, 30)).xor(ShapeRoi(OvalRoi(30, 15, 30, 30)))
    return {
        "polygon": poly([5, 60, 70, 12, 30], [4, 8, 50, 70, 35], Roi.POLYGON),
        "subpixel polygon": sub,
        "freehand": poly([3, 9, 20, 31, 28, 15, 6], [40, 33, 31, 42, 60, 66, 55], Roi.FREEROI),
        "traced": poly([10, 30, 30, 20, 20, 10], [10, 10, 30, 30, 20, 20], Roi.TRACED_ROI),
        "rectangle": Roi(7, 9, 33, 21),
        "oval": OvalRoi(11, 6, 41, 29),
        "small oval": OvalRoi(50, 40, 7, 5),
        "composite": composite,
    }


@pytest.mark.parametrize(
    "kind",
    ["polygon", "subpixel polygon", "freehand", "traced", "rectangle", "oval", "small oval", "composite"],
)
def test_roi_labels_equal_imagej_masks(imagej, kind):
    from scyjava import jimport

    from tem_ij_plugin.annotations import rasterize
    from tem_ij_plugin.fiji.convert import to_shapes

    roi = _java_rois()[kind]
    roi.setName("cell-1")
    other = jimport("ij.gui.Roi")(94, 84, 5, 5)  # training needs two classes; this one is far away
    other.setName("background-1")
    h, w = 90, 100
    labels = rasterize(to_shapes([roi, other]), (1, h, w)).labels[0] == 1
    expected = np.zeros((h, w), bool)
    mask = roi.getMask()
    b = roi.getBounds()
    if mask is None:  # a rectangle has no mask: all of its bounds
        expected[b.y : b.y + b.height, b.x : b.x + b.width] = True
    else:
        m = np.frombuffer(memoryview(mask.getPixels()), np.int8).reshape(mask.getHeight(), mask.getWidth()) != 0
        expected[b.y : b.y + m.shape[0], b.x : b.x + m.shape[1]] = m
    assert expected.sum() > 10
    assert np.array_equal(labels, expected), f"{kind}: {labels.sum()} vs ImageJ {expected.sum()} pixels"


def test_roi_slice_positions_label_their_plane_only(imagej):
    from scyjava import jimport

    from tem_ij_plugin.annotations import rasterize
    from tem_ij_plugin.fiji.convert import to_shapes

    Roi = jimport("ij.gui.Roi")
    a, b = Roi(5, 5, 10, 10), Roi(20, 20, 8, 8)
    a.setName("cell-1")
    a.setPosition(2)
    b.setName("background-1")
    b.setPosition(3)
    labels = rasterize(to_shapes([a, b]), (3, 40, 40))
    assert labels.classes == ["background", "cell"]
    assert (labels.labels[0] >= 0).sum() == 0
    assert (labels.labels[1] == 1).sum() == 100
    assert (labels.labels[1] == 0).sum() == 0
    assert (labels.labels[2] == 0).sum() == 64


def _hyperstack_rois(tmp_path):
    """A T x Z hyperstack (2 frames of 3 slices) in ImageJ and a RoiSet.zip that ImageJ encoded of ROIs
    drawn on (slice 2, frame 2) and (slice 3, frame 1); returns (ImagePlus, zip path, [(roi, stack index)])."""
    from scyjava import jimport

    from tem_ij_plugin.fiji.convert import write_roiset

    IJ, Roi = jimport("ij.IJ"), jimport("ij.gui.Roi")
    imp = IJ.createHyperStack("tz", 40, 40, 1, 3, 2, 8)
    placed = []
    for name, box, (z, t) in (("cell-1", (5, 5, 10, 10), (2, 2)), ("background-1", (20, 20, 8, 8), (3, 1))):
        roi = Roi(*box)
        roi.setName(name)
        roi.setPosition(1, z, t)  # what the ROI Manager records on a hyperstack
        placed.append((roi, int(imp.getStackIndex(1, z, t))))
    write_roiset(tmp_path / "RoiSet.zip", [r for r, _ in placed])
    return imp, tmp_path / "RoiSet.zip", placed


def test_hyperstack_rois_from_imagej_label_the_plane_of_their_slice_and_frame(imagej, tmp_path):
    from tem_ij_plugin.annotations import rasterize
    from tem_ij_plugin.fiji.convert import to_image
    from tem_ij_plugin.io import read_rois

    imp, zip_path, placed = _hyperstack_rois(tmp_path)
    image = to_image(imp)
    labels = rasterize(read_rois(zip_path), image.data.shape, stack=image.stack).labels
    labelled = [int(z) + 1 for z in np.flatnonzero((labels >= 0).any(axis=(1, 2)))]
    assert labelled == sorted(index for _, index in placed)  # ImageJ's own stack index of each (slice, frame)


def test_the_cli_reads_a_hyperstack_roiset_from_imagej_onto_the_same_planes(imagej, tmp_path):
    from tem_ij_plugin.annotations import rasterize
    from tem_ij_plugin.fiji.convert import to_image
    from tem_ij_plugin.io import read_image, read_rois

    imp, zip_path, _ = _hyperstack_rois(tmp_path)
    image = to_image(imp)
    tifffile.imwrite(tmp_path / "tz.tif", image.data.reshape(2, 3, 40, 40), imagej=True, metadata={"axes": "TZYX"})
    from_file = read_image(tmp_path / "tz.tif")
    in_fiji = rasterize(read_rois(zip_path), image.data.shape, stack=image.stack).labels
    from_cli = rasterize(read_rois(zip_path), from_file.data.shape, stack=from_file.stack).labels
    assert np.array_equal(from_cli, in_fiji)


# -- menus and macros --------------------------------------------------------------------------------
def test_every_command_is_in_the_plugins_menu(imagej):
    from scyjava import jimport

    from tem_ij_plugin.fiji.manifest import load_manifest

    names = [c.menu_name for c in load_manifest()["commands"]]
    table = jimport("ij.Menus").getCommands()
    for name in names:
        assert table.get(name) is not None, name
    sub = _tem_menu()
    assert sorted(str(sub.getItem(i).getLabel()) for i in range(sub.getItemCount())) == sorted(names)


def test_the_menu_marks_commands_with_a_dialog_with_dots(imagej):
    sub = _tem_menu()
    labels = {str(sub.getItem(i).getLabel()) for i in range(sub.getItemCount())}
    assert {"TEM Train Model...", "TEM Load Model...", "TEM Stop Training", "TEM Check Environment"} <= labels


def test_macros_of_0_2_still_run_the_commands_by_their_old_names(clean, data, tmp_path):
    """Macros recorded before the "..." (``run("TEM Save Model", ...)``) still work, with their options."""
    model = tmp_path / "old-name.model"
    macro = (
        f'setBatchMode(true); open("{data["image"]}"); '
        f'run("TEM Train Model", "max=1 device=cpu new rois=[{data["rois"]}]"); '
        f'run("TEM Save Model", "model=[{model}]"); print("after the old names");'
    )
    assert _macro(clean, macro) != "[aborted]", _log(clean)
    assert model.is_file()
    assert clean["bridge"].last["TEM Train Model"]["stop_reason"] == "max iterations"
    assert "after the old names" in _log(clean)


def _tem_menu():
    """Plugins > TEM Segmentation of ImageJ's menu bar."""
    from scyjava import jimport

    def child(menu, label, count, get):
        return next(get(i) for i in range(count) if str(get(i).getLabel()) == label)

    bar = jimport("ij.Menus").getMenuBar()
    plugins = child(bar, "Plugins", bar.getMenuCount(), bar.getMenu)
    return child(plugins, "TEM Segmentation", plugins.getItemCount(), plugins.getItem)


@pytest.fixture()
def data(files):
    return files


def _macro(imagej, text: str, timeout: float = 300.0):
    """Run a macro; an error dialog that opens meanwhile is closed and fails the test (never a hang)."""
    results = []
    thread, errors = _in_thread(lambda: results.append(imagej["IJ"].runMacro(text)))
    end = time.monotonic() + timeout
    while thread.is_alive():
        thread.join(0.1)
        for dialog in _dialogs():
            if dialog.isModal():
                message = f"{dialog.getTitle()}: {_dialog_text(dialog)}"
                dialog.dispose()
                thread.join(30)
                raise AssertionError(f"an ImageJ dialog opened: {message}\nlog: {_log(imagej)}")
        if time.monotonic() > end:
            raise AssertionError(f"macro still running after {timeout} s")
    assert not errors, errors
    return None if results[0] is None else str(results[0])


def test_macro_train_predict_suggest_grid(clean, data, tmp_path):
    from scyjava import jimport

    imagej = clean
    bridge = imagej["bridge"]
    image, rois = data["image"], data["rois"]
    out = tmp_path / "prob.tif"
    result = _macro(
        imagej,
        f"""
        setBatchMode(true);
        open("{image}");
        roiManager("Open", "{rois}");
        run("TEM Train Model...", "max=1 device=cpu");
        run("TEM Predict Probabilities...", "output=probabilities device=cpu");
        saveAs("Tiff", "{out}");
        setBatchMode("exit and display");
        """,
    )
    assert result != "[aborted]", _log(imagej)
    assert bridge.last["TEM Train Model"]["stop_reason"] == "max iterations"
    import tifffile

    from tem_ij_plugin.io import read_image

    # probability image: 2 channels x 1 plane of 256x256, 32-bit, class names as labels, same calibration
    with tifffile.TiffFile(out) as tif:
        data = tif.asarray()
        meta = tif.imagej_metadata
    assert data.shape == (2, 256, 256)
    assert data.dtype == np.float32
    assert meta["channels"] == 2
    assert meta["Labels"] == ["background", "cell"]
    cal = read_image(out, channel=1).calibration
    assert cal.pixel_width == pytest.approx(0.005)
    assert cal.unit == "µm"
    assert np.allclose(data.sum(axis=0), 1.0, atol=1e-4)
    # the same numbers as the engine gives for the same model
    from tem_ij_plugin.predict import predict_stack
    from tem_ij_plugin.runtime import resolve_device

    raw = read_image(image).data
    model = bridge.model
    expected = predict_stack(model.net, raw, model.normalization, resolve_device("cpu"))[0]
    assert np.allclose(data, expected, atol=1e-5)

    # suggestions and the grid on the (visible) original image
    imp = jimport("ij.WindowManager").getImage(str(image.name))
    assert imp is not None
    imp.getWindow().toFront()
    jimport("ij.WindowManager").setCurrentWindow(imp.getWindow())
    # the visible ROI Manager this time, with the annotations of the top two 128-px patches only, so the
    # bottom two are the candidates
    assert _macro(imagej, f'roiManager("Open", "{rois}");') is None
    rm = jimport("ij.plugin.frame.RoiManager").getInstance()
    for i in reversed(range(rm.getCount())):
        if rm.getRoi(i).getBounds().y >= 128:
            rm.select(i)
            rm.runCommand("Delete")
    kept = rm.getCount()
    assert 0 < kept < 18
    result = _macro(imagej, 'selectImage("image.tif"); run("TEM Suggest Next Patches...", "number=2 device=cpu");')
    assert result != "[aborted]", _log(imagej)
    names = [str(rm.getName(i)) for i in range(rm.getCount())]
    ours = [n for n in names if n.startswith("suggest-")]
    assert [n for n in ours if "-focus-" not in n] == ["suggest-1", "suggest-2"]
    assert len(names) == kept + len(ours)  # the annotations are all still there
    boxes = sorted(tuple(b) for b in bridge.last["TEM Suggest Next Patches"]["suggestions"])
    assert boxes == [(0, 128, 0, 256, 128), (0, 128, 128, 256, 256)]
    overlay = imp.getOverlay()
    drawn = [str(overlay.get(i).getName()) for i in range(overlay.size())]
    assert drawn == ours
    # running it again replaces our suggestions instead of piling them up
    again_macro = 'selectImage("image.tif"); run("TEM Suggest Next Patches...", "number=1 device=cpu");'
    assert _macro(imagej, again_macro) is None
    again = [str(rm.getName(i)) for i in range(rm.getCount())][kept:]
    assert [n for n in again if "-focus-" not in n] == ["suggest-1"]

    result = _macro(imagej, f'selectImage("image.tif"); run("TEM Show Patch Grid...", "rois=[{rois}]");')
    assert result != "[aborted]", _log(imagej)
    counts = bridge.last["TEM Show Patch Grid"]
    assert counts == {"train": 3, "validation": 1, "unused": 0}  # all four 128-px patches of the RoiSet
    # the same split training made
    train = bridge.last["TEM Train Model"]
    assert (train["train_patches"], train["val_patches"]) == (3, 1)
    grid = [overlay_roi for overlay_roi in _overlay_names(imp) if overlay_roi.startswith("tem-grid")]
    assert sorted(grid) == sorted(["tem-grid-train"] * 3 + ["tem-grid-validation"])


def _overlay_names(imp) -> list:
    overlay = imp.getOverlay()
    return [str(overlay.get(i).getName()) for i in range(overlay.size())]


def test_labels_output_save_load_apply_check(clean, data, tmp_path):
    from tem_ij_plugin.io import read_image

    imagej = clean
    bridge = imagej["bridge"]
    model = tmp_path / "m.model"
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.tif", "b.tif"):
        (folder / name).write_bytes(data["image"].read_bytes())
    out = tmp_path / "out"
    result = _macro(
        imagej,
        f"""
        setBatchMode(true);
        open("{data["image"]}");
        run("TEM Train Model...", "max=1 device=cpu rois=[{data["rois"]}] new show=cell");
        print("shown " + getTitle() + " " + nSlices + " " + getInfo("slice.label"));
        selectImage("image.tif");
        run("TEM Save Model...", "model=[{model}]");
        run("TEM Load Model...", "model=[{model}]");
        run("TEM Predict Probabilities...", "output=labels device=cpu");
        print("labels " + bitDepth() + " " + nSlices + " " + getTitle());
        run("TEM Apply Model To Stack...", "input=[{folder}] output=[{out}] kind=probabilities device=cpu");
        run("TEM Check Environment");
        run("TEM Stop Training");
        """,
    )
    assert result != "[aborted]", _log(imagej)
    assert model.is_file()
    assert bridge.model_path == model
    assert "labels 8 1 image-labels" in _log(imagej)
    assert "shown image-probabilities 1 cell" in _log(imagej)  # show=cell: the cell channel only
    written = sorted(p.name for p in out.iterdir())
    assert written == ["a-probabilities.tif", "b-probabilities.tif"]
    assert read_image(out / "a-probabilities.tif", channel=2).data.shape == (1, 256, 256)
    report = bridge.last["TEM Check Environment"]["report"]
    assert "torch" in report
    assert "speed probe" in report
    assert "ImageJ 1." in report
    assert bridge.last["TEM Stop Training"]["running"] is False


def test_apply_to_stack_cancelled_then_resumed(clean, data, synthetic, tmp_path, monkeypatch):
    """Esc during the second file of a folder; a run with Resume keeps the first file and completes."""
    from scyjava import jimport

    from tem_ij_plugin.apply import PredictJob
    from tem_ij_plugin.fiji import commands
    from tem_ij_plugin.io import Calibration, read_image, write_hyperstack

    imagej = clean
    bridge = imagej["bridge"]
    image = synthetic[0]
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    write_hyperstack(folder / "a.tif", image[None], Calibration(0.005, 0.005, "µm"))
    write_hyperstack(folder / "b.tif", np.stack([image, image[::-1], image[:, ::-1]]), Calibration(0.005, 0.005, "µm"))
    model = tmp_path / "m.model"
    train = (
        f'setBatchMode(true); open("{data["image"]}"); '
        f'run("TEM Train Model...", "max=1 device=cpu new rois=[{data["rois"]}]"); '
        f'run("TEM Save Model...", "model=[{model}]");'
    )
    assert _macro(imagej, train) != "[aborted]", _log(imagej)
    real = commands._predict_progress

    def esc_after_first_plane_of_b(ctx, label):
        inner = real(ctx, label)

        def progress(ev):
            inner(ev)
            if "b.tif" in label and ev["done"] >= 1:
                jimport("ij.IJ").setKeyDown(jimport("java.awt.event.KeyEvent").VK_ESCAPE)  # what Esc sets

        return progress

    monkeypatch.setattr(commands, "_predict_progress", esc_after_first_plane_of_b)
    apply = f'setBatchMode(true); run("TEM Apply Model To Stack...", "input=[{folder}] output=[{out}] device=cpu'
    assert _macro(imagej, apply + '");') == "[aborted]"
    assert "1 of 2 file(s) done" in _log(imagej)
    assert "Resume" in _log(imagej)
    assert (out / "a-probabilities.tif").is_file()
    assert not (out / "b-probabilities.tif").exists()
    monkeypatch.setattr(commands, "_predict_progress", real)
    assert _macro(imagej, apply + ' resume");') != "[aborted]", _log(imagej)
    done = bridge.last["TEM Apply Model To Stack"]
    assert done["skipped"] == [str(out / "a-probabilities.tif")]
    assert done["files"] == [str(out / "b-probabilities.tif")]
    assert sorted(p.name for p in out.iterdir()) == ["a-probabilities.tif", "b-probabilities.tif"]
    fresh = tmp_path / "fresh.tif"
    PredictJob(model, folder / "b.tif", fresh, device="cpu").run()
    resumed = read_image(out / "b-probabilities.tif", channel=2).data
    assert resumed.shape == (3, 256, 256)
    np.testing.assert_allclose(resumed, read_image(fresh, channel=2).data, atol=1e-5)


def test_fiji_and_the_cli_apply_a_model_to_a_folder_alike(clean, synthetic, tmp_path, capsys):
    """TEM Apply Model To Stack and `tem-ij predict --out-dir` run the same batch: same files, same pixels."""
    from test_predict import save_random_model

    from tem_ij_plugin.io import write_hyperstack

    folder = tmp_path / "in"
    folder.mkdir()
    write_hyperstack(folder / "a.tif", synthetic[0][None])
    write_hyperstack(folder / "b.tif", synthetic[0][None, ::-1])
    model = save_random_model(tmp_path / "m.model", {"patch_size": 256})
    macro = (
        f'setBatchMode(true); run("TEM Load Model...", "model=[{model}]"); '
        f'run("TEM Apply Model To Stack...", "input=[{folder}] output=[{tmp_path / "fiji"}] kind=both device=cpu");'
    )
    assert _macro(clean, macro) != "[aborted]", _log(clean)
    cli = tmp_path / "cli"
    code, _, err = run_cli(capsys, "predict", model, folder, "--out-dir", cli, "--kind", "both", "--device", "cpu")
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "fiji").iterdir())
    assert names == sorted(p.name for p in cli.iterdir())
    for name in names:
        assert np.array_equal(tifffile.imread(tmp_path / "fiji" / name), tifffile.imread(cli / name)), name


def test_a_time_series_comes_back_as_frames_and_labels_in_colour(clean, tmp_path):
    """TEM Predict Probabilities on a T stack: the result has its frames as frames (not slices), and
    the label image a colour LUT."""
    from test_predict import save_random_model

    model = save_random_model(tmp_path / "m.model", {"patch_size": 256})
    macro = f"""
        setBatchMode(true);
        newImage("t", "8-bit ramp", 64, 64, 1, 1, 3);
        run("TEM Load Model...", "model=[{model}]");
        selectImage("t");
        run("TEM Predict Probabilities...", "output=probabilities device=cpu");
        Stack.getDimensions(w, h, c, z, f);
        print("probabilities c=" + c + " z=" + z + " t=" + f);
        selectImage("t");
        run("TEM Predict Probabilities...", "output=labels device=cpu");
        Stack.getDimensions(w, h, c, z, f);
        getLut(r, g, b);
        print("labels z=" + z + " t=" + f + " class 1 colour " + r[1] + "," + g[1] + "," + b[1]);
    """
    assert _macro(clean, macro) != "[aborted]", _log(clean)
    log = _log(clean)
    assert "probabilities c=2 z=1 t=3" in log
    assert "labels z=1 t=3" in log
    assert "class 1 colour 1,1,1" not in log  # a grey LUT maps 1 to (1, 1, 1)


def test_the_not_attached_message_names_this_imagej_folder(clean):
    """The message a command shows in an ImageJ not started by tem-ij fiji, as ImageJ's macro language
    evaluates it: the line to paste names this very ImageJ folder."""
    from tem_ij_plugin.fiji.manifest import NOT_ATTACHED

    assert _macro(clean, f"print({NOT_ATTACHED});") != "[aborted]", _log(clean)
    folder = str(clean["IJ"].getDirectory("imagej"))
    assert f'tem-ij fiji "{folder}"' in _log(clean)


def test_real_menu_click_dialog_and_recorder(clean, data):
    """Click Plugins > TEM Segmentation > TEM Predict Probabilities, press OK, read the Recorder."""
    from jpype import JObject
    from scyjava import jimport

    imagej = clean
    assert _macro(imagej, f'open("{data["image"]}");') != "[aborted]"
    # trained with its window showing: the live plot must not stay the current image afterwards
    train = f'run("TEM Train Model...", "max=1 device=cpu new rois=[{data["rois"]}]");'
    assert _macro(imagej, train) != "[aborted]"
    assert str(jimport("ij.WindowManager").getCurrentImage().getTitle()) == "image.tif"
    plot = jimport("ij.WindowManager").getImage("TEM training: image.tif")  # the live plot, kept
    assert plot is not None
    assert plot.getWindow() is not None
    IJ = imagej["IJ"]
    IJ.run("Record...")
    Recorder = jimport("ij.plugin.frame.Recorder")
    recorder = _wait_for(Recorder.getInstance)
    before = str(recorder.getText())
    sub = _tem_menu()
    item = next(
        sub.getItem(i)
        for i in range(sub.getItemCount())
        if str(sub.getItem(i).getLabel()) == "TEM Predict Probabilities..."
    )
    ActionEvent = jimport("java.awt.event.ActionEvent")
    # Both clicks go through the AWT event queue, so ImageJ handles them on the event thread as it does
    # a person's clicks (calling the listeners from this thread would race differently).
    queue = jimport("java.awt.Toolkit").getDefaultToolkit().getSystemEventQueue()
    try:
        queue.postEvent(ActionEvent(item, ActionEvent.ACTION_PERFORMED, item.getActionCommand()))
        dialog = _wait_for(lambda: _dialogs("TEM Predict Probabilities"))[0]
        ok = JObject(dialog, jimport("ij.gui.GenericDialog")).getButtons()[0]
        queue.postEvent(ActionEvent(ok, ActionEvent.ACTION_PERFORMED, "OK"))
        _wait_for(lambda: jimport("ij.WindowManager").getImage("image-probabilities") is not None)
        recorded = _wait_for(lambda: str(recorder.getText())[len(before) :].strip())
    finally:
        recorder.close()
    assert 'run("TEM Predict Probabilities...", "output=probabilities device=auto");' in recorded
    assert "TEM Bridge" not in recorded


def test_recorder_line_is_completed_when_the_dialog_recorded_nothing(clean):
    """ImageJ's GenericDialog can miss recording its fields under load (it decides after waking the
    macro); the bridge then records them itself, in the menu's order and ImageJ's format."""
    from scyjava import jimport

    from tem_ij_plugin.fiji.bridge import complete_recording

    imagej = clean
    imagej["IJ"].run("Record...")
    Recorder = jimport("ij.plugin.frame.Recorder")
    recorder = _wait_for(Recorder.getInstance)
    command = imagej["bridge"].commands["TEM Train Model"]  # every field type
    options = {"interactive": "1"}
    values = {"number": "3", "string": "", "file": "", "folder": "", "checkbox": True}
    for arg in command.args:
        options[arg.key] = arg.choices[-1] if arg.type == "choice" else values[arg.type]
    try:
        before = str(recorder.getText())
        # what ImageJ's Executer does for a menu command, from a thread that is not a macro's
        t, errors = _in_thread(lambda: Recorder.setCommand(command.menu_name))
        t.join(10)
        assert not errors
        assert str(Recorder.getCommand()) == command.menu_name
        second = command.args[1].key
        Recorder.recordOption(second, options[second])  # only a later field got recorded: order must still hold
        complete_recording(command, options)
        Recorder.saveCommand()
        recorded = str(recorder.getText())[len(before) :].strip()
    finally:
        recorder.close()
    expected = []
    for arg in command.args:
        value = options[arg.key]
        expected.append(arg.key if value is True else f"{arg.key}={value or '[]'}")
    assert recorded == f'run("{command.menu_name}", "{" ".join(expected)}");'


def test_rois_without_slice_position_on_a_stack_need_all_slices(clean, data, synthetic, tmp_path):
    from tem_ij_plugin.io import Calibration, write_hyperstack

    imagej = clean
    bridge = imagej["bridge"]
    image = synthetic[0]
    stack = tmp_path / "stack.tif"
    write_hyperstack(stack, np.stack([image, image[:, ::-1]]), Calibration(0.005, 0.005, "µm"))
    train = f'setBatchMode(true); open("{stack}"); '
    train += f'run("TEM Train Model...", "max=1 device=cpu new rois=[{data["rois"]}]'
    assert _macro(imagej, train + '");') == "[aborted]"
    assert "no slice position" in _log(imagej)
    assert "All slices" in _log(imagej)
    assert _macro(imagej, train + ' all");') != "[aborted]", _log(imagej)
    done = bridge.last["TEM Train Model"]
    assert done["train_patches"] + done["val_patches"] == 8  # the 4 annotated patches, on both slices


def test_train_with_a_project_folder_keeps_rounds(clean, data, tmp_path):
    from tem_ij_plugin.project import Project

    imagej = clean
    project = tmp_path / "project"
    train = f'run("TEM Train Model...", "max=1 device=cpu rois=[{data["rois"]}] project=[{project}]");'
    macro = f"""
        setBatchMode(true);
        open("{data["image"]}");
        {train.replace("device=cpu", "device=cpu new")}
        run("Duplicate...", "title=unsaved");
        {train}
        """
    assert _macro(imagej, macro) != "[aborted]", _log(imagej)
    rounds = Project.open(project).rounds
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[1]["parent"] == 1
    assert rounds[0]["image"] == str(data["image"].resolve())
    assert rounds[1]["image"] is None  # an image never saved is not given a made-up path
    assert all((project / r["model"]).is_file() and (project / r["annotations"]).is_file() for r in rounds)
    assert imagej["bridge"].model_path == project / rounds[1]["model"]


@pytest.fixture()
def project_and_grid(clean, data, synthetic, tmp_path, capsys):
    """A project whose one round held out another patch than the session's settings would; the grid macro."""
    from tem_ij_plugin.annotations import rasterize
    from tem_ij_plugin.patches import annotated_patches, split
    from tem_ij_plugin.project import Project

    image, _, shapes = synthetic
    labels = rasterize(shapes, (1,) + image.shape)
    patches = annotated_patches(labels.labels, 128)

    def held_out(seed):
        return [p.as_list() for p in split(labels.labels, patches, 1, seed, len(labels.classes))[1]]

    seed = next(k for k in range(1, 50) if held_out(k) != held_out(0))
    project = tmp_path / "project"
    train = ["train", data["image"], "--rois", data["rois"], "--config", data["config"], "--seed", seed]
    assert run_cli(capsys, *train, "--project", project)[0] == 0
    bridge, model = clean["bridge"], clean["bridge"].model
    bridge.model = None  # the grid without a project then splits as a new training with seed 0
    grid = f'open("{data["image"]}"); run("TEM Show Patch Grid...", "rois=[{data["rois"]}]'
    held = Project.open(project).rounds[0]["val_patches"]
    yield {"imagej": clean, "macro": grid, "project": project, "held": held, "new": held_out(0)}
    bridge.model = model


def _blue(imagej) -> list:
    """The validation patches of the grid on the current image, as [z, y0, x0, y1, x1]."""
    imp = imagej["IJ"].getImage()
    overlay = imp.getOverlay()
    rois = [overlay.get(i) for i in range(overlay.size()) if str(overlay.get(i).getName()) == "tem-grid-validation"]
    boxes = [r.getBounds() for r in rois]
    return [[0, int(b.y), int(b.x), int(b.y + b.height), int(b.x + b.width)] for b in boxes]


def test_patch_grid_with_a_project_splits_as_its_next_round(project_and_grid):
    imagej, macro, project = project_and_grid["imagej"], project_and_grid["macro"], project_and_grid["project"]
    assert _macro(imagej, f'{macro} project=[{project}]");') != "[aborted]", _log(imagej)
    assert _blue(imagej) == project_and_grid["held"]


def test_patch_grid_without_a_project_splits_as_a_new_training(project_and_grid):
    imagej, macro = project_and_grid["imagej"], project_and_grid["macro"]
    assert _macro(imagej, f'{macro}");') != "[aborted]", _log(imagej)
    assert _blue(imagej) == project_and_grid["new"]


@pytest.fixture()
def grid_of_a_missing_project(project_and_grid, tmp_path):
    imagej, macro, missing = project_and_grid["imagej"], project_and_grid["macro"], tmp_path / "not-yet"
    assert _macro(imagej, f'{macro} project=[{missing}]");') != "[aborted]", _log(imagej)
    return _blue(imagej), missing, project_and_grid["new"]


def test_patch_grid_with_a_project_not_yet_trained_splits_as_a_new_training(grid_of_a_missing_project):
    blue, _, new = grid_of_a_missing_project
    assert blue == new


def test_patch_grid_creates_no_project_folder(grid_of_a_missing_project):
    assert not grid_of_a_missing_project[1].exists()


def test_fiji_and_the_cli_train_the_same_model_from_the_same_inputs(clean, data, tmp_path, capsys):
    """Both front ends call workflows.train_round: same image, ROIs, settings and seed give the same weights."""
    import torch

    from tem_ij_plugin.modelio import load_model

    code, _, err = run_cli(
        capsys, "train", data["image"], "--rois", data["rois"], "--config", data["config"], "--device", "cpu",
        "-o", tmp_path / "cli.model",
    )  # fmt: skip
    assert code == 0, err
    macro = (
        f'setBatchMode(true); open("{data["image"]}"); '
        f'run("TEM Train Model...", "max=10 device=cpu new rois=[{data["rois"]}] settings=[{data["config"]}]");'
    )
    assert _macro(clean, macro) != "[aborted]", _log(clean)
    cli, fiji = load_model(tmp_path / "cli.model").net.state_dict(), clean["bridge"].model.net.state_dict()
    differ = [k for k in cli if not torch.equal(cli[k], fiji[k])]
    assert differ == []


def _suggest_in_both(clean, data, synthetic, tmp_path, capsys) -> tuple:
    """`tem-ij suggest` and TEM Suggest Next Patches on the same model, image and ROIs.

    Returns the CLI's RoiSet.zip and the ROI Manager as Fiji saved it after the command.
    """
    from tem_ij_plugin.io import write_rois

    model = tmp_path / "m.model"
    train = ["train", data["image"], "--rois", data["rois"], "--config", data["config"], "-o", model]
    assert run_cli(capsys, *train)[0] == 0
    # Annotations on the first 128 px patch only: three patches are left to suggest from
    rois = tmp_path / "first-patch.zip"
    write_rois(rois, [sh for sh in synthetic[2] if all(c.max() < 128 for c in sh.polygons)])
    out = tmp_path / "s.zip"
    code, _, err = run_cli(capsys, "suggest", model, data["image"], "--rois", rois, "-k", 2, "-o", out)
    assert code == 0, err
    saved = tmp_path / "fiji.zip"
    macro = (
        f'setBatchMode(true); open("{data["image"]}"); run("TEM Load Model...", "model=[{model}]"); '
        f'run("TEM Suggest Next Patches...", "number=2 rois=[{rois}] device=cpu"); roiManager("Save", "{saved}");'
    )
    assert _macro(clean, macro) != "[aborted]", _log(clean)
    return out, saved


def test_fiji_and_the_cli_suggest_the_same_windows(clean, data, synthetic, tmp_path, capsys):
    """Both front ends call workflows.suggest_round: same model, image and ROIs give the same windows."""
    import json

    out, _ = _suggest_in_both(clean, data, synthetic, tmp_path, capsys)
    rows = json.loads(out.with_suffix(".json").read_text())["suggestions"]
    cli = [(r["slice"] - 1, r["y"], r["x"], r["y"] + r["height"], r["x"] + r["width"]) for r in rows]
    fiji = [tuple(b) for b in clean["bridge"].last["TEM Suggest Next Patches"]["suggestions"]]
    assert fiji == cli


def test_suggestion_scores_go_to_a_results_table_as_in_the_cli_csv(clean, data, synthetic, tmp_path, capsys):
    import csv

    from scyjava import jimport

    out, _ = _suggest_in_both(clean, data, synthetic, tmp_path, capsys)
    with open(out.with_suffix(".csv"), newline="") as f:
        cli = [float(r["score"]) for r in csv.DictReader(f)]
    table = jimport("ij.WindowManager").getWindow("TEM Suggestions").getResultsTable()
    fiji = [float(table.getValue("score", i)) for i in range(int(table.size()))]
    assert fiji == pytest.approx(cli, abs=1e-5)


def test_fiji_and_the_cli_give_the_same_focus_regions(clean, data, synthetic, tmp_path, capsys):
    """The ROI Manager holds the CLI's suggestion ROIs, focus polygons included, as ImageJ decoded them."""
    import roifile

    out, saved = _suggest_in_both(clean, data, synthetic, tmp_path, capsys)
    cli = {r.name: r for r in roifile.roiread(out)}
    fiji = {r.name: r for r in roifile.roiread(saved) if r.name.startswith("suggest-")}
    assert sorted(fiji) == sorted(cli)
    assert any("-focus-" in name for name in cli)
    for name, r in cli.items():
        np.testing.assert_allclose(fiji[name].coordinates(), r.coordinates(), atol=1e-3)


def _objects_in_both(clean, data, tmp_path, capsys) -> tuple:
    """`tem-ij objects` and TEM Find Objects on the same model and image.

    Returns the CLI's table rows, its RoiSet.zip and what the Fiji command reported.
    """
    import csv

    from tem_ij_plugin.config import dump_settings

    model, config = tmp_path / "m.model", tmp_path / "objects.yaml"
    config.write_text(dump_settings(tiny_settings(40)))  # 12 iterations call the whole image one cell
    train = ["train", data["image"], "--rois", data["rois"], "--config", config, "-o", model]
    assert run_cli(capsys, *train)[0] == 0
    table, zipped = tmp_path / "c.csv", tmp_path / "c.zip"
    code, _, err = run_cli(capsys, "objects", model, data["image"], "--measure", table, "--rois", zipped)
    assert code == 0, err
    macro = (
        f'setBatchMode(true); open("{data["image"]}"); run("TEM Load Model...", "model=[{model}]"); '
        'run("TEM Find Objects...", "class=cell split=probability minimum=0 device=cpu");'
    )
    assert _macro(clean, macro) != "[aborted]", _log(clean)
    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return rows, zipped, clean["bridge"].last["TEM Find Objects"]


def test_fiji_and_the_cli_find_the_same_objects(clean, data, tmp_path, capsys):
    """Both front ends call workflows.objects_in_planes: the same outlines, in the same order, measuring the same."""
    import roifile

    rows, zipped, fiji = _objects_in_both(clean, data, tmp_path, capsys)
    assert fiji["names"] == [r.name for r in roifile.roiread(zipped)]
    assert [r["pixels"] for r in fiji["rows"]] == [int(r["pixels"]) for r in rows]


def test_fiji_proposals_are_named_as_the_cli_names_them(clean, data, tmp_path, capsys):
    """TEM Find Objects with `proposals`: the ROI Manager holds proposal-N outlines, as `objects --proposals`."""
    import roifile

    _, zipped, _ = _objects_in_both(clean, data, tmp_path, capsys)
    model = tmp_path / "m.model"
    code, _, err = run_cli(capsys, "objects", model, data["image"], "--rois", tmp_path / "p.zip", "--proposals")
    assert code == 0, err
    macro = (
        f'setBatchMode(true); open("{data["image"]}"); run("TEM Load Model...", "model=[{model}]"); '
        'run("TEM Find Objects...", "class=cell split=probability minimum=0 device=cpu proposals");'
    )
    assert _macro(clean, macro) != "[aborted]", _log(clean)
    names = clean["bridge"].last["TEM Find Objects"]["names"]
    assert names == [r.name for r in roifile.roiread(tmp_path / "p.zip")]
    assert names[0] == "proposal-1"


def test_imagej_measures_the_area_the_table_gives(clean, data, tmp_path, capsys):
    """Each outline ROI, decoded and measured by ImageJ (pixel count and calibrated area), against the table."""
    import roifile
    from scyjava import jimport

    from tem_ij_plugin.fiji.convert import from_roi_bytes

    rows, zipped, _ = _objects_in_both(clean, data, tmp_path, capsys)
    imp = clean["IJ"].openImage(str(data["image"]))
    area = jimport("ij.measure.Measurements").AREA
    measured = []
    for r in roifile.roiread(zipped):
        imp.setRoi(from_roi_bytes(r.tobytes()))
        stats = imp.getStatistics(area)
        measured.append((int(stats.pixelCount), round(float(stats.area), 9)))
    imp.close()
    assert len(rows) > 3
    assert measured == [(int(r["pixels"]), round(float(r["area_um2"]), 9)) for r in rows]


def test_tem_ij_doctor_prints_the_check_environment_report(clean, capsys):
    """One report from one function (workflows.doctor), both front ends; the speed figure varies."""
    code, out, _ = run_cli(capsys, "doctor", "--probe-seconds", "0.2")
    assert code == 0
    assert _macro(clean, 'run("TEM Check Environment", "x");') != "[aborted]", _log(clean)
    fiji = clean["bridge"].last["TEM Check Environment"]["report"]

    def steady(text):
        return [line for line in text.splitlines() if not line.startswith(("speed probe:", "ImageJ "))]

    assert steady(out) == steady(fiji)


def test_stop_training_cancels_and_keeps_the_best_model(clean, data, tmp_path):
    from tem_ij_plugin.config import dump_settings

    imagej = clean
    bridge = imagej["bridge"]
    long = tiny_settings(iterations=100_000)
    long.train.patience = 100_000  # only the stop command may end it, however busy the machine
    cfg = tmp_path / "long.yaml"
    cfg.write_text(dump_settings(long))
    macro = (
        f'setBatchMode(true); open("{data["image"]}"); '
        f'run("TEM Train Model...", "max=10 device=cpu new rois=[{data["rois"]}] settings=[{cfg}]"); '
        'print("after training");'
    )
    results = []
    thread, errors = _in_thread(lambda: results.append(_macro(imagej, macro)))
    _wait_for(lambda: bridge.training.locked() and (bridge.progress or {}).get("iteration", 0) >= 2, timeout=60)
    start = time.monotonic()
    # a second command while training runs is never blocked
    assert _macro(imagej, 'run("TEM Stop Training");', timeout=30) is None
    assert bridge.last["TEM Stop Training"]["running"]
    assert bridge.last["TEM Stop Training"]["iteration"] >= 2
    thread.join(60)
    assert not thread.is_alive()
    assert not errors
    assert time.monotonic() - start < 30
    assert bridge.last["TEM Train Model"]["stop_reason"] == "cancelled"
    assert 2 <= bridge.last["TEM Train Model"]["iterations"] < 100_000
    assert bridge.model is not None
    assert "after training" in _log(imagej)


def test_escape_cancels_training_and_keeps_the_model(clean, data, tmp_path, monkeypatch):
    """Esc pressed in ImageJ (a key event on ImageJ's window, through the event queue) stops training.

    ImageJ answers Esc by stopping the command's thread outright when its macro has not ended 2 s later;
    a training step can take longer than that on a CPU (simulated here by a 3 s pause after training),
    and the command must still finish: cancelled, model kept, no error.
    """
    from scyjava import jimport

    import tem_ij_plugin.train as engine
    from tem_ij_plugin.config import dump_settings

    imagej = clean
    bridge = imagej["bridge"]
    cfg = tmp_path / "long.yaml"
    long = tiny_settings(iterations=100_000)
    long.train.patience = 100_000  # only Esc may end it, however slowly a busy machine delivers the key
    cfg.write_text(dump_settings(long))
    real_train = engine.train

    def slow_to_stop(*args, **kwargs):
        result = real_train(*args, **kwargs)
        time.sleep(3.0)
        return result

    monkeypatch.setattr(engine, "train", slow_to_stop)
    assert _macro(imagej, f'open("{data["image"]}");') != "[aborted]"
    bridge.model = None
    options = f"max=10 device=cpu new rois=[{data['rois']}] settings=[{cfg}]"
    # as a menu command runs: ImageJ's Executer and Macro_Runner in this thread, no calling macro
    thread, errors = _in_thread(lambda: imagej["IJ"].run("TEM Train Model...", options))
    _wait_for(lambda: bridge.training.locked() and (bridge.progress or {}).get("iteration", 0) >= 2, timeout=60)
    KeyEvent = jimport("java.awt.event.KeyEvent")
    esc = KeyEvent(imagej["ij"], KeyEvent.KEY_PRESSED, 0, 0, KeyEvent.VK_ESCAPE, KeyEvent.CHAR_UNDEFINED)
    jimport("java.awt.Toolkit").getDefaultToolkit().getSystemEventQueue().postEvent(esc)
    thread.join(60)
    dialogs = [f"{d.getTitle()}: {_dialog_text(d)}" for d in _dialogs()]
    # IJ.run tells its caller that Esc aborted it ("Macro canceled"); nothing else may surface
    assert not thread.is_alive(), dialogs
    assert not dialogs, dialogs
    assert all(str(e).endswith("Macro canceled") for e in errors), errors
    assert not bridge.errors, bridge.errors
    assert bridge.last["TEM Train Model"]["stop_reason"] == "cancelled"
    assert 2 <= bridge.last["TEM Train Model"]["iterations"] < 100_000
    assert bridge.model is not None
    assert _macro(imagej, 'print("still alive");') is None
    assert "still alive" in _log(imagej)


def test_errors_reach_the_log_in_batch_mode_and_abort_the_macro(clean, data, tmp_path):
    imagej = clean
    result = _macro(
        imagej,
        f'setBatchMode(true); open("{data["image"]}"); '
        f'run("TEM Train Model...", "max=1 rois=[{tmp_path / "missing.zip"}]"); print("must not run");',
    )
    assert result == "[aborted]"
    log = _log(imagej)
    assert "TEM Train Model" in log
    assert "missing.zip: no such file" in log
    assert "must not run" not in log
    # unknown classes in the ROI Manager
    result = _macro(
        imagej,
        f'setBatchMode(true); open("{data["image"]}"); makeRectangle(1, 1, 20, 20); roiManager("Add"); '
        'roiManager("Select", 0); roiManager("Rename", "mitochondrion-1"); run("TEM Train Model...", "max=1 new");',
    )
    assert result == "[aborted]"
    assert "mitochondrion" in _log(imagej)
    assert _macro(imagej, 'print("still alive");') is None
    assert "still alive" in _log(imagej)


def test_python_error_shows_an_imagej_error_dialog_and_imagej_lives_on(clean, data, monkeypatch):
    from tem_ij_plugin.fiji import commands

    imagej = clean

    def broken(ctx):
        raise RuntimeError("a bug")

    monkeypatch.setattr(commands, "check_environment", broken)
    IJ = imagej["IJ"]
    thread, errors = _in_thread(lambda: IJ.runMacro('run("TEM Check Environment"); print("must not run");'))
    dialog = _wait_for(lambda: _dialogs("TEM Check Environment"))[0]
    assert dialog.isModal()
    dialog.dispose()  # the user presses OK
    thread.join(30)
    assert not thread.is_alive()
    assert not errors
    log = _log(imagej)
    assert "RuntimeError: a bug" in log
    assert "must not run" not in log
    assert imagej["bridge"].errors[-1][1].startswith("internal error: RuntimeError: a bug")
    assert _macro(imagej, "print(1 + 1);") is None
    assert "2" in _log(imagej)


def test_without_the_bridge_the_menu_says_how_to_start_it(clean):
    imagej = clean
    bridge = imagej["bridge"]
    bridge.detach()
    try:
        thread, errors = _in_thread(lambda: imagej["IJ"].runMacro('run("TEM Check Environment");'))
        dialog = _wait_for(lambda: [d for d in _dialogs() if "tem-ij fiji" in _dialog_text(d)])[0]
        dialog.dispose()
        thread.join(30)
        assert not thread.is_alive()
        assert not errors
    finally:
        bridge.attach()


def _dialog_text(dialog) -> str:
    """The text of an ImageJ message dialog (its MultiLineLabel keeps the lines in a private field)."""
    from scyjava import jimport

    Container = jimport("java.awt.Container")
    Label = jimport("java.awt.Label")
    MultiLineLabel = jimport("ij.gui.MultiLineLabel")
    parts = []

    def walk(c):
        for child in c.getComponents():
            if isinstance(child, Label):
                parts.append(str(child.getText()))
            elif isinstance(child, MultiLineLabel):
                field = MultiLineLabel.class_.getDeclaredField("lines")
                field.setAccessible(True)
                parts.extend(str(line) for line in field.get(child))
            if isinstance(child, Container):
                walk(child)

    walk(dialog)
    return "\n".join(parts)


# -- the macro runner in its own process ---------------------------------------------------------------
@pytest.mark.slow
def test_tem_ij_fiji_runs_a_macro_and_exits_with_its_status(imagej, data, tmp_path):
    out = tmp_path / "prob.tif"
    good = tmp_path / "good.ijm"
    good.write_text(
        f'open("{data["image"]}");\nroiManager("Open", "{data["rois"]}");\n'
        'run("TEM Train Model...", "max=1 device=cpu");\n'
        'run("TEM Predict Probabilities...", "output=probabilities");\n'
        f'saveAs("Tiff", "{out}");\nprint("done " + nSlices);\n'
    )
    bad = tmp_path / "bad.ijm"
    bad.write_text(f'open("{data["image"]}");\nrun("TEM Predict Probabilities...", "output=probabilities");\n')
    cmd = [
        sys.executable,
        "-m",
        "tem_ij_plugin.cli",
        "fiji",
        "--imagej-jar",
        str(IJ_JAR),
        "--config",
        str(data["config"]),
    ]
    ok = subprocess.run([*cmd, "--macro", str(good)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "done 2" in ok.stdout
    assert out.is_file()
    failed = subprocess.run([*cmd, "--macro", str(bad)], capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1
    assert "there is no current model" in failed.stdout


def test_tem_ij_fiji_gives_java_the_memory_asked_for(imagej, tmp_path):
    macro = tmp_path / "mem.ijm"
    macro.write_text('print("max " + call("ij.IJ.maxMemory"));\n')
    cmd = [sys.executable, "-m", "tem_ij_plugin.cli", "fiji", "--imagej-jar", str(IJ_JAR), "--mem", "700m"]
    res = subprocess.run([*cmd, "--macro", str(macro)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    reported = int(next(line for line in res.stdout.splitlines() if line.startswith("max ")).split()[1])
    assert 600 << 20 < reported <= 700 << 20  # the JVM reports a little less than -Xmx
