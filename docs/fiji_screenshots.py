"""Screenshots of the Fiji commands for the README, taken in real ImageJ under Xvfb.

    xvfb-run -a -s "-screen 0 1280x900x24" python docs/fiji_screenshots.py [--minutes 1.5]

Writes docs/fiji_menu.png (Plugins > TEM Segmentation, opened with xdotool), docs/fiji_dialog.png
(the TEM Train Model dialog) and docs/fiji_probabilities.png (the probability of "cell" after
training on three partially annotated patches of ISBI 2012 section 0, with the patch grid overlay).
Needs Debian's libij-java and xdotool.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "isbi2012"


def wait_for(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError


def grab(window, path: Path, pad: int = 0, extra=None) -> None:
    """Save the screen area of ``window`` (and of ``extra`` windows) as PNG, via java.awt.Robot."""
    from scyjava import jimport

    Rectangle = jimport("java.awt.Rectangle")
    area = Rectangle(window.getLocationOnScreen(), window.getSize())
    for w in extra or []:
        area = area.union(Rectangle(w.getLocationOnScreen(), w.getSize()))
    area.grow(pad, pad)
    image = jimport("java.awt.Robot")().createScreenCapture(area)
    jimport("javax.imageio.ImageIO").write(image, "png", jimport("java.io.File")(str(path)))
    print("wrote", path)


def settle(window, quiet_s: float = 1.0) -> None:
    """Wait until ``window`` has stopped moving and resizing (ImageJ centres and packs dialogs after
    showing them), bring it to the front and let it paint."""
    last, since = None, time.monotonic()
    while time.monotonic() - since < quiet_s:
        now = (str(window.getLocationOnScreen()), str(window.getSize()))
        if now != last:
            last, since = now, time.monotonic()
        time.sleep(0.1)
    window.toFront()
    time.sleep(0.5)


def in_thread(fn):
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=1.5, help="training time (default: 1.5)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    args = ap.parse_args()

    from tem_ij_plugin.io import Calibration, write_hyperstack, write_rois
    from tem_ij_plugin.synthetic import simulate_annotations

    tmp = Path(tempfile.mkdtemp(prefix="tem-shots-"))
    image = iio.imread(DATA / "images" / "00.png")
    truth = (iio.imread(DATA / "labels" / "00.png") > 127).astype(np.uint8)  # 1 = cell interior
    write_hyperstack(tmp / "isbi-00.tif", image[None], Calibration(0.004, 0.004, "µm"))
    boxes = [(0, 0, 256, 256), (256, 256, 512, 512), (0, 256, 256, 512)]
    shapes = simulate_annotations(truth, boxes, ["background", "cell"], np.random.default_rng(0))
    write_rois(tmp / "RoiSet.zip", shapes)

    from tem_ij_plugin.fiji.bridge import Bridge
    from tem_ij_plugin.fiji.launcher import install_scripts, start_plain_imagej

    install_scripts(tmp / "plugins")
    start_plain_imagej("/usr/share/java/ij.jar", tmp)
    from scyjava import jimport

    IJ = jimport("ij.IJ")
    WindowManager = jimport("ij.WindowManager")
    Bridge().attach()
    ij = jimport("ij.ImageJ")()
    ij.setLocation(20, 20)
    run = lambda macro: in_thread(lambda: IJ.runMacro(macro))  # noqa: E731

    run(f'open("{tmp / "isbi-00.tif"}"); roiManager("Open", "{tmp / "RoiSet.zip"}"); roiManager("Show All");').join()
    imp = WindowManager.getCurrentImage()
    imp.getWindow().setLocation(20, 140)
    rm = jimport("ij.plugin.frame.RoiManager").getInstance()
    rm.setLocation(560, 140)

    # 1. the menu, opened the way a user does: click Plugins, then hover TEM Segmentation. The offsets
    # are those of ImageJ 1.53t's menu bar with Xvfb's default fonts (no window manager, no title bar).
    time.sleep(1.0)
    frame = ij.getLocationOnScreen()
    xdotool("mousemove", frame.x + 321, frame.y + 12, "click", 1)
    xdotool("mousemove", frame.x + 350, frame.y + 156, "click", 1)
    xdotool("mousemove", frame.x + 560, frame.y + 160)
    shot = jimport("java.awt.Robot")().createScreenCapture(jimport("java.awt.Rectangle")(frame.x, frame.y, 820, 400))
    jimport("javax.imageio.ImageIO").write(shot, "png", jimport("java.io.File")(str(args.out / "fiji_menu.png")))
    print("wrote", args.out / "fiji_menu.png")
    xdotool("key", "Escape")
    xdotool("mousemove", frame.x + 321, frame.y + 12, "click", 1)

    # 2. the TEM Train Model dialog
    t = run('selectImage("isbi-00.tif"); run("TEM Train Model...");')
    dialog = wait_for(lambda: showing("TEM Train Model"))[0]
    settle(dialog)
    grab(dialog, args.out / "fiji_dialog.png", pad=2)
    from jpype import JObject

    gd = JObject(dialog, jimport("ij.gui.GenericDialog"))
    ActionEvent = jimport("java.awt.event.ActionEvent")
    gd.getNumericFields().get(0).setText(str(args.minutes))
    queue = jimport("java.awt.Toolkit").getDefaultToolkit().getSystemEventQueue()
    queue.postEvent(ActionEvent(gd.getButtons()[0], ActionEvent.ACTION_PERFORMED, "OK"))  # as a click does
    print("training...")
    t.join()

    # 3. probabilities with the patch grid
    run(
        'selectImage("isbi-00.tif"); run("TEM Show Patch Grid...", "rois=[]"); '
        'run("TEM Predict Probabilities...", "output=probabilities device=auto");'
    ).join()
    prob = WindowManager.getImage("isbi-00-probabilities")
    prob.setOverlay(imp.getOverlay().duplicate())
    prob.setC(2)
    prob.getWindow().setLocation(560, 140)
    time.sleep(1.5)
    plot = showing("TEM training", prefix=True)
    grab(prob.getWindow(), args.out / "fiji_probabilities.png", pad=1)
    if plot:  # somewhere free on the screen: Xvfb has no window manager to stack windows
        plot[0].setLocation(560, 440)
        plot[0].toFront()
        time.sleep(1.0)
        grab(plot[0], args.out / "fiji_training_plot.png", pad=1)
    for w in jimport("java.awt.Window").getWindows():
        w.dispose()


def xdotool(*args) -> None:
    subprocess.run(["xdotool", *map(str, args)], check=True)
    time.sleep(1.0)


def showing(title: str, prefix: bool = False) -> list:
    """Visible frames and dialogs with this title."""
    from scyjava import jimport

    Frame, Dialog = jimport("java.awt.Frame"), jimport("java.awt.Dialog")
    found = []
    for w in jimport("java.awt.Window").getWindows():
        if w.isShowing() and isinstance(w, (Frame, Dialog)):
            t = str(w.getTitle())
            if t == title or (prefix and t.startswith(title)):
                found.append(w)
    return found


if __name__ == "__main__":
    main()
