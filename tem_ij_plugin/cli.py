"""The ``tem-ij`` command line: ``demo``, ``train``, ``predict``, ``objects``, ``suggest``, ``export``, and more.

Heavy imports (torch, tifffile, ...) happen after argument parsing so that ``--help`` is instant.
Bad input ends with a one-line message on stderr and exit status 2; an interrupted training (Ctrl-C)
saves the best model so far and exits with 130.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("tem_ij_plugin")

EXIT_USAGE = 2
EXIT_CANCELLED = 130
#: One or two typical calls per subcommand, shown at the end of its --help.
EXAMPLES = {
    "demo": ["tem-ij demo --minutes 0.5 -o demo-out"],
    "train": ["tem-ij train stack.tif --rois RoiSet.zip -o cells.model",
              "tem-ij train stack.tif --rois RoiSet.zip --project cells-project/   (the next annotation round)"],
    "objects": ["tem-ij objects cells.model stack.tif --class cell -o cells.tif --measure cells.csv --rois cells.zip",
                "tem-ij objects probs.tif --class cell -o cells.tif"],
    "suggest": ["tem-ij suggest cells.model stack.tif --rois RoiSet.zip -o next.zip"],
    "history": ["tem-ij history cells-project/"],
    "revert": ["tem-ij revert cells-project/ 2"],
    "experiment": ["tem-ij experiment image.tif --labels dense.tif -o experiment/ --seeds 0,1"],
    "fiji": ["tem-ij fiji /opt/Fiji.app", "tem-ij fiji --imagej-jar /usr/share/java/ij.jar --macro batch.ijm"],
    "install-fiji": ["tem-ij install-fiji /opt/Fiji.app"],
    "doctor": ["tem-ij doctor --probe-seconds 2"],
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``tem-ij``."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="tem-ij",
        description="Learn to segment TEM images from a few partially annotated patches.",
    )
    parser.add_argument("--version", action="version", version=f"tem-ij {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _common_options()
    adders = (_add_demo, _add_train, _add_predict, _add_objects, _add_suggest, _add_project_tools, _add_experiment,
              _add_export)  # fmt: skip
    for add in (*adders, _add_fiji):
        add(sub, common)
    for name, command in sub.choices.items():
        if command.epilog is None:
            command.epilog = "example:\n  " + "\n  ".join(EXAMPLES[name])
            command.formatter_class = argparse.RawDescriptionHelpFormatter
        # Also after the subcommand (tem-ij predict ... -q); SUPPRESS keeps the value given before it.
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
        command.add_argument(
            "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings and errors only"
        )
    return parser


def _common_options() -> dict:
    """Options several subcommands share, as argparse parents: one spelling and one help text each."""
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps (default: auto)")
    channel = argparse.ArgumentParser(add_help=False)
    channel.add_argument("--channel", type=int, help="1-based channel to use of a multichannel hyperstack")
    rois = argparse.ArgumentParser(add_help=False)
    rois.add_argument(
        "--all-slices", action="store_true", help="let ROIs without a slice position label every slice of a stack"
    )
    rois.add_argument(
        "--group-names", metavar="N=NAME,...", help="class names of ImageJ ROI groups, e.g. 1=cell,2=background"
    )
    return {"device": device, "channel": channel, "rois": rois}


def _add_demo(sub, common) -> None:
    """``tem-ij demo``."""
    demo = sub.add_parser(
        "demo", parents=[common["device"]], help="train and predict on a built-in synthetic TEM image, write a figure"
    )
    demo.add_argument("-o", "--out", default="tem-ij-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--minutes", type=float, default=1.5, help="training budget (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")


def _add_train(sub, common) -> None:
    """``tem-ij train``."""
    tr = sub.add_parser(
        "train",
        parents=[common["device"], common["channel"], common["rois"]],
        help="train a model from an image and its ImageJ ROIs",
    )
    tr.add_argument("image", nargs="?", help="2-D image or Z stack (TIFF; PNG for 2-D)")
    tr.add_argument("--rois", help="ImageJ RoiSet.zip or .roi; ROI names give the classes")
    tr.add_argument(
        "--labels",
        metavar="LABELS.tif",
        help="a label image as partial labels (Weka, ilastik, napari): 0 unlabelled, value k the k-th class "
        "of --classes (or of the --init model); a Labkit labeling (NAME.labeling, or NAME.tif beside "
        "NAME.tif.labels), whose label names give the classes; or cellpose's NAME_seg.npy / NAME_cp_masks.tif, "
        "whose cells are the second class and the rest the first (default background,cell); combines with --rois",
    )
    tr.add_argument("-o", "--out", help="model file to write (e.g. cells.model); optional with --project")
    tr.add_argument("--init", metavar="MODEL", help="warm start from an earlier model (next annotation round)")
    tr.add_argument(
        "--project",
        metavar="DIR",
        help="keep this training as the next round of a project folder (created if new), warm-starting "
        "from its current round; see 'tem-ij history' and 'tem-ij revert'",
    )
    tr.add_argument("--max-minutes", type=float, help="wall-clock training budget (default from config: 10)")
    tr.add_argument("--seed", type=int, help="random seed (default from config: 0)")
    tr.add_argument("--config", metavar="FILE", help="YAML or JSON settings (see --print-config)")
    tr.add_argument("--print-config", action="store_true", help="print the effective settings as YAML and exit")
    tr.add_argument("--classes", help="comma-separated allowed classes in order, e.g. background,cell,mito")
    tr.add_argument(
        "--val-patches",
        type=int,
        help="annotated patches held out for validation (default: ~20%% once that is 2 or more, else 0)",
    )
    tr.add_argument("--overwrite", action="store_true", help="let -o replace a file that tem_ij_plugin did not write")


def _add_predict(sub, common) -> None:
    """``tem-ij predict``."""
    pr = sub.add_parser(
        "predict",
        parents=[common["device"], common["channel"]],
        help="probability maps (or labels) of an image, a stack or a batch of them",
        description="Predict an image or stack plane by plane (bounded memory). Output type from the suffix: "
        ".tif ImageJ hyperstack, .ome.tif OME-TIFF, .btf OME-BigTIFF, .zarr OME-Zarr. Ctrl-C keeps the finished "
        "planes in NAME.partial.* and the same command with --resume completes them. Several images, a folder "
        "or a quoted glob go to --out-dir, the model loaded once.",
        epilog="examples:\n  tem-ij predict cells.model stack.tif -o probs.tif\n"
        "  tem-ij predict cells.model raw/ --out-dir probs/ --name '{name}-cells.ome.tif' --kind both --resume",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pr.add_argument("model", help="model file from 'tem-ij train', or a package from 'tem-ij export'")
    pr.add_argument(
        "images", nargs="+", metavar="IMAGE", help="2-D image, Z/T stack or hyperstack (TIFF; PNG for 2-D); with "
        "--out-dir also several images, folders (their TIFFs) or quoted globs ('raw/*.tif')",
    )  # fmt: skip
    pr.add_argument("-o", "--out", help="output of one image: .tif, .ome.tif, .btf (OME-BigTIFF) or .zarr")
    pr.add_argument("--out-dir", metavar="DIR", help="output folder of a batch (created if new)")
    pr.add_argument(
        "--name",
        default=None,
        metavar="TEMPLATE",
        help="with --out-dir: output name, {name} the image's name and {kind} the output kind; the suffix picks "
        "the format (default: '{name}-{kind}.tif', as Fiji's TEM Apply Model To Stack)",
    )
    pr.add_argument(
        "--kind",
        choices=["probabilities", "labels", "both"],
        default=None,
        help="probabilities per class (default), the argmax label image, or both (labels to NAME_labels.*; "
        "an OME-Zarr keeps them in NAME.zarr/labels/classes)",
    )
    pr.add_argument("--output", dest="old_kind", help=argparse.SUPPRESS)  # the name of --kind before 0.3
    pr.add_argument(
        "--dtype",
        choices=["float32", "uint8", "uint16"],
        default="float32",
        help="probabilities as float32 (default) or scaled to 0..255 / 0..65535 (4x / 2x smaller)",
    )
    pr.add_argument("--classes", help="comma-separated classes to write (probabilities), e.g. cell")
    pr.add_argument(
        "--backend",
        choices=["auto", "torch", "onnx"],
        default="auto",
        help="auto: onnxruntime for fp32 on the CPU when installed ([onnx] extra), else torch (default: auto)",
    )
    pr.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16", "int8"],
        default="auto",
        help="auto: bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere; int8: onnxruntime on the CPU, "
        "calibrated on the image. A reduced precision is used only if it keeps the classes of fp32 on a probe "
        "region of the image (99.9%% of the pixels, every class IoU >= 0.99, changes only where fp32 was "
        "undecided) (default: auto)",
    )
    pr.add_argument(
        "--tta",
        choices=["off", "flips", "dihedral"],
        default="off",
        help="test-time augmentation: the mean over 4 flips or 8 flips and transposes of each tile, at 4x or 8x "
        "the time (default: off)",
    )
    pr.add_argument(
        "--tile",
        type=int,
        help="tile side in pixels (default on a CPU: 8x the overlap, 1024 to 2048, as the free memory allows, "
        "else 4x; on a GPU 1024 or 4x the overlap)",
    )
    pr.add_argument("--overlap", type=int, help="tile overlap (default: from the model's effective receptive field)")
    pr.add_argument(
        "--batch-size",
        type=int,
        help="tiles per forward pass (default: 4 on GPU; on CPU 1, or 2 with onnxruntime at tiles of 512 px or less)",
    )
    pr.add_argument("--resume", action="store_true", help="complete an interrupted prediction to the same output")
    pr.add_argument(
        "--pyramid", type=int, default=0, metavar="N",
        help="OME-Zarr output: add N resolution levels, each half the size of the one before (default: 0)",
    )  # fmt: skip
    pr.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files in the way that tem_ij_plugin did not write (an existing output, stray NAME.partial.* "
        "files, a file at NAME.lock); inputs are never replaced",
    )


def _add_objects(sub, common) -> None:
    """``tem-ij objects``."""
    ob = sub.add_parser(
        "objects",
        parents=[common["device"], common["channel"]],
        usage="tem-ij objects [-h] (MODEL IMAGE | PROBS.tif) [--class CLASS] [-o LABELS] [--measure CSV] "
        "[--rois ZIP] [options]",
        help="objects (cells) of one class: a label image, measurements and ROIs",
        description="Cut the objects of one class out of a model's prediction of IMAGE, or out of a probability map "
        "written earlier by `tem-ij predict`, plane by plane. Touching objects are split by a seeded watershed. "
        "Writes an instance label image (16-bit, 32-bit beyond 65535 objects; .tif, .btf or .zarr), a table with "
        "one row per object and NAME-slices.csv with one row per plane (--measure), and outlines as ImageJ ROIs "
        "CLASS-ID (--rois) that measure in ImageJ the area the table gives.",
    )
    ob.add_argument("paths", nargs="+", metavar="PATH", help="MODEL IMAGE (model file or project folder), or PROBS.tif")
    ob.add_argument("--class", dest="class_name", help="the class of the objects (default: the one not background)")
    ob.add_argument(
        "-o",
        "--out",
        help="the label image: .tif (ImageJ), .btf (BigTIFF), .zarr (OME-Zarr) or NAME_seg.npy (cellpose's GUI; "
        "name it after the image, beside it)",
    )
    ob.add_argument("--measure", metavar="CSV", help="object table NAME.csv (and NAME-slices.csv beside it)")
    ob.add_argument("--rois", metavar="ZIP", help="outlines as an ImageJ RoiSet.zip")
    ob.add_argument("--image", help="with PROBS.tif: the image it was predicted from (intensity columns)")
    ob.add_argument(
        "--min-area",
        type=int,
        help="smallest object in pixels (default: a quarter of the median annotated piece of the class, "
        "never below 1/1024 of the model's patch, which applies alone with fewer than 5 pieces)",
    )
    ob.add_argument(
        "--split",
        choices=["probability", "distance", "none"],
        default="probability",
        help="split touching objects where the class probability dips (default), at the distance map's "
        "watershed lines (Fiji's Watershed), or not at all",
    )
    ob.add_argument(
        "--seed-level",
        type=float,
        default=0.8,
        help="probability split: a seed is a region at least this sure of the class (default: %(default)s)",
    )
    ob.add_argument(
        "--seed-depth",
        type=float,
        default=2.0,
        help="distance split: a seed is a distance maximum at least this many pixels deep (default: %(default)s)",
    )
    ob.add_argument("--keep-holes", action="store_true", help="do not fill the holes inside objects")
    ob.add_argument(
        "--method",
        choices=["watershed", "cellpose"],
        default="watershed",
        help="cut objects with the seeded watershed (default) or with your cellpose model (--cellpose-model), "
        "its masks cut to the pixels of the class (needs the [cellpose] extra)",
    )
    ob.add_argument("--cellpose-model", metavar="FILE", help="with --method cellpose: your cellpose model file")
    ob.add_argument(
        "--proposals",
        action="store_true",
        help="name the ROIs proposal-N: outlines to review, which train ignores until you rename them (cell-N)",
    )
    ob.add_argument(
        "--overwrite", action="store_true", help="replace outputs in the way that tem_ij_plugin did not write"
    )


def _add_suggest(sub, common) -> None:
    """``tem-ij suggest``."""
    sg = sub.add_parser(
        "suggest",
        parents=[common["device"], common["channel"], common["rois"]],
        usage="tem-ij suggest [-h] [MODEL|PROJECT] IMAGE -o suggestions.zip [--rois ROIS] [-k K] [options]",
        help="which patches to annotate next (rectangles suggest-1..k for Fiji's ROI Manager)",
        description="Rank the candidate windows that hold no annotation yet and draw k suggestions: typical, "
        "diverse patches with no MODEL, else the most uncertain windows unlike the annotated ones, each with the "
        "focus regions to outline first. Writes a RoiSet.zip (rectangles suggest-N, polygons suggest-N-focus-M) "
        "plus NAME.csv and NAME.json with scores and reasons, and NAME-slices.csv with one row per plane.",
    )
    sg.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="[MODEL|PROJECT] IMAGE: a model file or project folder (optional), then the image",
    )
    sg.add_argument("--rois", help="the annotations so far (RoiSet.zip or .roi); their patches are never suggested")
    sg.add_argument("-k", type=int, default=5, help="number of suggestions (default: %(default)s)")
    sg.add_argument(
        "--probabilities",
        metavar="PROBS.tif",
        help="the model's probability map of IMAGE from `tem-ij predict` (all classes): skips recomputing it",
    )
    sg.add_argument("-o", "--out", required=True, help="RoiSet.zip to write (NAME.csv and NAME.json beside it)")
    sg.add_argument("--size", type=int, help="window side in pixels (default: the model's patch size, 256)")
    sg.add_argument("--stride", type=int, help="window step (default: the window size, i.e. the patch grid)")
    sg.add_argument(
        "--temperature", type=float, default=0.0, help="randomness of the draw, 0 = greedy (default: %(default)s)"
    )
    sg.add_argument("--seed", type=int, default=0, help="random seed of the draw (default: %(default)s)")
    sg.add_argument(
        "--overwrite", action="store_true", help="replace NAME.zip/.csv/.json even if tem_ij_plugin did not write them"
    )


def _add_project_tools(sub, common) -> None:
    """``tem-ij history`` and ``tem-ij revert``."""
    hi = sub.add_parser("history", help="the annotation rounds of a project folder")
    hi.add_argument("project", help="project folder (from 'tem-ij train --project DIR')")
    hi.add_argument("--json", action="store_true", help="print project.json instead of a table")

    rv = sub.add_parser(
        "revert", help="make an earlier round of a project current again (later rounds are kept, not deleted)"
    )
    rv.add_argument("project", help="project folder")
    rv.add_argument("round", type=int, help="round number (see 'tem-ij history')")


def _add_experiment(sub, common) -> None:
    """``tem-ij experiment``."""
    ex = sub.add_parser(
        "experiment",
        parents=[common["device"], common["channel"]],
        help="simulate annotation rounds on an image with full ground truth: random vs suggested patches",
        description="A simulated annotator outlines partial polygons on the patches each arm picks; each round "
        "retrains (warm start) and is scored on held-out patches. Writes learning_curves.png, per-round "
        "montages, GIFs of the rounds, experiment.json and experiment.csv.",
    )
    ex.add_argument("image", help="2-D image or stack (TIFF; PNG for 2-D)")
    ex.add_argument("--labels", required=True, help="dense ground truth of the same shape (class indices 0..C-1)")
    ex.add_argument("-o", "--out", default="tem-ij-experiment", help="output folder (default: %(default)s)")
    ex.add_argument("--classes", help="class names in index order (default: background,cell for two classes)")
    ex.add_argument(
        "--schedule", default="1,2,3,5,8,12,15", help="annotated patches after each round (default: %(default)s)"
    )
    ex.add_argument(
        "--arms",
        default="random,suggest",
        help="random, suggest, suggest-novel (suggest damping look-alikes of annotated patches) and/or "
        "suggest-mix (every second patch of a round typical and unlike the annotated ones; default: %(default)s)",
    )
    ex.add_argument("--seeds", default="0", help="comma-separated seeds, each runs every arm (default: %(default)s)")
    ex.add_argument(
        "--test-fraction", type=float, default=0.25, help="patches held out for scoring (default: %(default)s)"
    )
    ex.add_argument("--minutes-per-round", type=float, default=2.0, help="training budget per round (default: 2)")
    ex.add_argument("--iterations-per-round", type=int, help="cap on training iterations per round")
    ex.add_argument("--config", metavar="FILE", help="training settings of every round (YAML or JSON)")
    ex.add_argument("--no-rf", action="store_true", help="skip the random-forest peer")


def _add_export(sub, common) -> None:
    """``tem-ij export``."""
    ex = sub.add_parser(
        "export",
        help="a model as a bioimage.io package (deepImageJ, ilastik, bioimageio.core)",
        description="Write a BioImage Model Zoo package: TorchScript, ONNX and PyTorch weights, the input "
        "normalisation as the spec's preprocessing, a test input and its output, a cover and a README. Fill in the "
        "authors and citation in its rdf.yaml before sharing it.",
        epilog="example:\n  tem-ij export cells.model -o cells.zip --image stack.tif --name 'Zebrafish TEM cells'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument("model", help="model file (or project folder: its current round)")
    ex.add_argument("-o", "--out", required=True, help="the package to write, NAME.zip")
    ex.add_argument("--image", help="an image whose first plane's centre is the test input (default: synthetic TEM)")
    ex.add_argument("--name", help="the model's name in the Zoo (default: the file's name)")
    ex.add_argument("--license", default="CC-BY-4.0", help="SPDX licence of the weights (default: %(default)s)")
    ex.add_argument("--overwrite", action="store_true", help="let -o replace a file that tem_ij_plugin did not write")


def _add_fiji(sub, common) -> None:
    """``tem-ij fiji``, ``tem-ij install-fiji`` and ``tem-ij doctor``."""
    fj = sub.add_parser(
        "fiji",
        help="start Fiji (or a plain ImageJ) with the TEM Segmentation menu commands attached",
        description="Without --macro, ImageJ opens and this command returns when it quits. With --macro, the "
        "macro runs with the menu commands available and the exit status is 0 when it ran to its end, 1 when it "
        "aborted or a TEM command failed. On a server without a display use xvfb-run -a tem-ij fiji ...",
    )
    fj.add_argument("fiji_app", nargs="?", help="the Fiji.app folder (default: --imagej-jar)")
    fj.add_argument(
        "--imagej-jar", metavar="JAR", help="a plain ImageJ 1 jar instead of Fiji (default: /usr/share/java/ij.jar)"
    )
    fj.add_argument("--macro", metavar="FILE.ijm", help="run this macro, print ImageJ's log and exit")
    fj.add_argument("--config", metavar="FILE", help="training settings for TEM Train Model (YAML or JSON)")
    fj.add_argument(
        "--mem", metavar="SIZE", help="Java memory, e.g. 8g (default: the Fiji.app's own setting, else 75%% of the RAM)"
    )

    inf = sub.add_parser(
        "install-fiji", help="copy the menu commands into Fiji.app/plugins/TEM Segmentation/ (restart Fiji after)"
    )
    inf.add_argument("fiji_app", nargs="?", help="the Fiji.app folder")
    inf.add_argument(
        "--write-scripts", action="store_true", help="regenerate fiji_scripts/*.ijm from plugin.yml (developers)"
    )

    doc = sub.add_parser(
        "doctor",
        help="Python, torch, the device and a training-speed probe, with what to do when something is missing",
        description="The same report as Fiji's TEM Check Environment.",
    )
    doc.add_argument("--probe-seconds", type=float, default=5.0, help="length of the speed probe (default: 5)")


class _StderrHandler(logging.StreamHandler):
    """Logs to whatever ``sys.stderr`` is at the time (it may be replaced, e.g. by an embedding host)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("tem_ij_plugin")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _check_output(path: str, inputs, overwrite: bool = False, protect=()) -> Path:
    """Refuse an output (or its temporary name) that would touch an input or cannot be written, before slow work."""
    from .outputs import OutputPlan

    return OutputPlan(inputs, overwrite=overwrite, protect=protect).output(path)


class _Reporter:
    """Progress: a tqdm bar on a terminal, a log line every ``every_s`` seconds otherwise."""

    def __init__(self, interactive: bool | None = None, every_s: float = 15.0):
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.every_s = every_s
        self.bar = None
        self.last = 0.0

    def _bar(self, total, desc: str, unit: str):
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
        return self.bar

    def due(self, force: bool = False) -> bool:
        """Whether a log line is due now (and note that one is written)."""
        now = time.monotonic()
        if force or now - self.last >= self.every_s:
            self.last = now
            return True
        return False

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TrainReporter(_Reporter):
    """Training progress: a tqdm bar on a terminal, a log line every 15 s otherwise."""

    def __call__(self, ev: dict) -> None:
        """Show one training event: on the bar on a terminal, else as a log line when one is due."""

        def fmt(v):
            return "-" if v is None else f"{v:.3f}"

        fields = {
            "loss": fmt(ev["train_loss"]),
            "val": fmt(ev["val_score"]),
            "best": fmt(ev["best_score"]),
            "backtracks": ev["backtracks"],
        }
        if self.interactive:
            bar = self._bar(ev["max_iterations"], "training", "it")
            if ev["stage"] == "refit" and bar.total != ev["max_iterations"]:
                bar.total = ev["max_iterations"]
                bar.set_description("refit on every patch")
            bar.n = ev["iteration"]
            bar.set_postfix(fields, refresh=True)
            return
        if self.due():
            log.info(
                "%s iteration %d  %.0f/%.0f s  loss %s  val %s  best %s  backtracks %d",
                "refit" if ev["stage"] == "refit" else "training",
                ev["iteration"],
                ev["elapsed_s"],
                ev["max_seconds"],
                fields["loss"],
                fields["val"],
                fields["best"],
                ev["backtracks"],
            )


def _parse_group_names(text):
    from .errors import UserError

    if not text:
        return None
    out = {}
    for item in text.split(","):
        num, sep, name = item.partition("=")
        if not sep or not num.strip().isdigit() or not name.strip():
            raise UserError(f"--group-names expects N=NAME pairs like 1=cell,2=background; got {item!r}")
        out[int(num)] = name.strip()
    return out


def _check_seed(value: int, option: str) -> int:
    """A seed must be 0 .. 2**32 - 1 (what numpy and torch accept alike); anything else is a plain error."""
    from .config import SEED_MAX
    from .errors import UserError

    if not 0 <= value <= SEED_MAX:
        raise UserError(f"{option} {value} is out of range: a seed is an integer from 0 to {SEED_MAX} (2**32 - 1)")
    return value


def _settings(args):
    from pydantic import ValidationError

    from .config import Settings, load_settings
    from .errors import UserError

    s = load_settings(args.config) if args.config else Settings()
    if args.seed is not None:
        _check_seed(args.seed, "--seed")
    overrides = {
        "--max-minutes": ("max_minutes", args.max_minutes),
        "--seed": ("seed", args.seed),
        "--val-patches": ("validation_patches", args.val_patches),
    }
    for option, (key, value) in overrides.items():
        if value is None:
            continue
        try:
            setattr(s.train, key, value)
        except ValidationError as exc:
            raise UserError(f"{option} {value}: {exc.errors()[0]['msg']}") from exc
    return s


def _with_cancel_on_sigint(work):
    """Run ``work(cancel)``; the first Ctrl-C sets ``cancel`` (graceful stop), a second one interrupts."""
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return work(cancel), cancel

    def handler(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        log.warning("stopping after this step; the best model so far will be saved (Ctrl-C again to abort)")
        cancel.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        return work(cancel), cancel
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_train(args: argparse.Namespace) -> int:
    """``tem-ij train``; returns the exit status."""
    from .config import dump_settings
    from .errors import UserError
    from .io import read_image, read_rois
    from .modelio import load_model
    from .workflows import read_label_file, train_round, warm_start_path

    settings = _settings(args)
    if args.print_config:
        sys.stdout.write(dump_settings(settings))
        return 0
    if not args.image or not (args.rois or args.labels) or not (args.out or args.project):
        raise UserError(
            "train needs IMAGE, --rois FILE and/or --labels FILE, and -o MODEL or --project DIR (or --print-config)"
        )
    if args.labels and args.project:
        raise UserError("a project round keeps its ROI file, not a label image (yet): train from --labels with -o")
    project = None
    if args.project:
        from .project import Project

        project = Project.open(args.project, create=True)
        if args.init is None:
            args.init = warm_start_path(project)
    inputs = [args.image, args.rois, args.labels, args.init, args.config]
    protect = [args.project] if args.project else []
    out = _check_output(args.out, inputs, args.overwrite, protect) if args.out else None
    image = read_image(args.image, channel=args.channel)
    shapes = read_rois(args.rois) if args.rois else []
    init = load_model(args.init) if args.init else None
    classes = [c.strip().lower() for c in args.classes.split(",")] if args.classes else None
    label_image = read_label_file(args.labels, init.classes if init else classes) if args.labels else None
    log.info("image %s", args.image)
    reporter = TrainReporter()
    try:
        done, cancel = _with_cancel_on_sigint(
            lambda c: train_round(
                image,
                shapes,
                settings,
                init=init,
                classes=classes,
                all_slices=args.all_slices,
                group_names=_parse_group_names(args.group_names),
                project=project,
                out=out,
                image_path=args.image,
                rois_path=args.rois,
                label_image=label_image,
                device=args.device,
                progress=reporter,
                cancel=c,
            )
        )
    finally:
        reporter.close()
    if done.error:
        raise UserError(done.error)
    print(f"saved {' and '.join(done.saved)}: {done.result.summary()}")
    return EXIT_CANCELLED if cancel.is_set() else 0


class PredictReporter(_Reporter):
    """Prediction progress: a tqdm bar over planes on a terminal, a log line every 10 s otherwise."""

    def __init__(self, interactive: bool | None = None, every_s: float = 10.0):
        super().__init__(interactive, every_s)

    def __call__(self, ev: dict) -> None:
        """Show one prediction event: on the bar on a terminal, else as a log line when one is due."""
        frac = ev["done"] + (ev["tiles_done"] / ev["tiles_total"] if ev["tiles_done"] < ev["tiles_total"] else 0)
        if self.interactive:
            bar = self._bar(ev["total"], "predicting", "plane")
            bar.n = round(frac, 2)
            bar.set_postfix({"MP/s": f"{ev['megapixels_per_s']:.2f}"}, refresh=True)
            return
        if self.due(force=ev["done"] == ev["total"] and ev["tiles_done"] == ev["tiles_total"]):
            log.info(
                "plane %d/%d, tiles %d/%d, %.2f MP/s, %.0f s elapsed, ETA %.0f s",
                ev["plane"],
                ev["planes"],
                ev["tiles_done"],
                ev["tiles_total"],
                ev["megapixels_per_s"],
                ev["elapsed_s"],
                ev["eta_s"],
            )


def _predict_kind(args: argparse.Namespace) -> str:
    """``--kind``, or the deprecated ``--output`` it replaces (whose value was easy to take for a path)."""
    from .errors import UserError

    kinds = ("probabilities", "labels", "both")
    if args.old_kind is None:
        return args.kind or "probabilities"
    if args.old_kind not in kinds:
        raise UserError(
            f"--output {args.old_kind}: the output file is -o/--out (or --out-dir for a batch); --output was the "
            f"old name of --kind ({', '.join(kinds)})"
        )
    if args.kind is not None and args.kind != args.old_kind:
        raise UserError(f"--kind {args.kind} and --output {args.old_kind} disagree; give --kind only")
    log.warning("--output %s is deprecated: use --kind %s", args.old_kind, args.old_kind)
    return args.old_kind


def _predict_options(args: argparse.Namespace) -> dict:
    """The options of every prediction job, checked."""
    from .errors import UserError

    if args.tile is not None and args.tile < 32:
        raise UserError("--tile must be at least 32")
    if args.overlap is not None and args.overlap < 0:
        raise UserError("--overlap must be at least 0")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    classes = [c.strip().lower() for c in args.classes.split(",") if c.strip()] if args.classes else None
    return {
        "kind": _predict_kind(args), "dtype": args.dtype, "classes": classes, "channel": args.channel,
        "device": args.device, "backend": args.backend, "precision": args.precision, "tile": args.tile,
        "overlap": args.overlap, "batch_size": args.batch_size, "resume": args.resume, "overwrite": args.overwrite,
        "tta": args.tta, "pyramid": args.pyramid,
    }  # fmt: skip


def cmd_predict(args: argparse.Namespace) -> int:
    """``tem-ij predict``; returns the exit status."""
    from .workflows import model_file

    options = _predict_options(args)
    with model_file(args.model) as model:
        return _predict(args, model, options)


def _predict(args: argparse.Namespace, model: Path, options: dict) -> int:
    """``tem-ij predict`` with ``model`` a model file (a package's, extracted)."""
    from .apply import PredictJob
    from .errors import Cancelled, UserError
    from .workflows import is_image_path

    if args.out_dir:
        if args.out:
            raise UserError("give -o for one image or --out-dir for a batch, not both")
        return _predict_batch(args, model, options)
    if args.name:
        raise UserError("--name names the outputs of --out-dir; with -o the output is named already")
    single = len(args.images) == 1 and is_image_path(Path(args.images[0]))
    if len(args.images) == 1 and not Path(args.images[0]).exists() and not set("*?[") & set(args.images[0]):
        raise UserError(f"{args.images[0]}: no such file")
    if not args.out or not single:
        raise UserError(
            "predict needs -o OUTPUT for one image, or --out-dir DIR for several images, a folder or a glob"
            if single or not args.out
            else f"-o names one output, but {' '.join(args.images)} is not one image file: use --out-dir DIR"
        )
    job = PredictJob(model, args.images[0], Path(args.out), **options)
    reporter = PredictReporter()
    try:
        report, _ = _with_cancel_on_sigint(lambda c: job.run(progress=reporter, cancel=c))
    except Cancelled:
        reporter.close()
        print(
            f"tem-ij predict: cancelled with {job.planes_done} of {job.n_planes} plane(s) written to "
            f"{', '.join(map(str, job.partial_files))}; run the same command with --resume to complete it",
            file=sys.stderr,
        )
        return EXIT_CANCELLED
    finally:
        reporter.close()
    print(report)
    return 0


def _predict_batch(args: argparse.Namespace, model: Path, options: dict) -> int:
    """``tem-ij predict MODEL IMAGE... --out-dir DIR``: every image, the model loaded once."""
    from .errors import Cancelled
    from .workflows import DEFAULT_NAME, predict_files

    reporters = [PredictReporter()]

    def on_file(i: int, n: int, image: Path) -> None:
        reporters[-1].close()
        reporters.append(PredictReporter())
        log.info("file %d/%d: %s", i, n, image)

    def progress(ev: dict) -> None:
        reporters[-1](ev)

    def run(cancel):
        return predict_files(
            model, args.images, args.out_dir, args.name or DEFAULT_NAME, on_file=on_file, progress=progress,
            cancel=cancel, **options,
        )  # fmt: skip

    try:
        result, _ = _with_cancel_on_sigint(run)
    except Cancelled as exc:
        print(f"tem-ij predict: cancelled: {exc}; run the same command with --resume to complete it", file=sys.stderr)
        return EXIT_CANCELLED
    finally:
        reporters[-1].close()
    for line in result.summaries:
        print(line)
    kept = f", {len(result.skipped)} already done (--resume)" if result.skipped else ""
    print(f"{len(result.written)} file(s) written to {args.out_dir}{kept}")
    return 0


def _model_path(path: str) -> str:
    """A model file, or the current round's model when ``path`` is a project folder."""
    from .errors import UserError
    from .project import PROJECT_FILE, Project

    if Path(path).is_dir() and os.path.lexists(Path(path) / PROJECT_FILE):
        model = Project.open(path).current_model_path()  # project.json and round.json checked
        if model is None:
            raise UserError(f"the project {path} has no trained round yet")
        return str(model)
    return path


def cmd_export(args: argparse.Namespace) -> int:
    """``tem-ij export``; returns the exit status."""
    from .workflows import export_model

    done = export_model(_model_path(args.model), args.out, args.image, args.name, args.license, args.overwrite)
    print(f"wrote {done.path} ({len(done.files)} files); fill in {' and '.join(done.placeholders)} in its rdf.yaml")
    return 0


def cmd_objects(args: argparse.Namespace) -> int:
    """``tem-ij objects``; returns the exit status."""
    from .errors import UserError
    from .workflows import model_file

    if len(args.paths) > 2:
        raise UserError("objects takes MODEL IMAGE, or PROBS.tif: at most two paths")
    two = len(args.paths) == 2
    if two and args.image:
        raise UserError("--image goes with a probability map; with MODEL IMAGE the image is already given")
    options = {"split": args.split, "seed_level": args.seed_level, "seed_depth": args.seed_depth}
    options["fill_holes"] = not args.keep_holes
    if args.min_area is not None:
        options["min_area"] = args.min_area
    model_path = _model_path(args.paths[0]) if two else None
    if (args.method == "cellpose") != bool(args.cellpose_model):
        raise UserError(
            "--method cellpose goes with --cellpose-model FILE, and --cellpose-model with --method cellpose"
        )
    with model_file(model_path) if model_path else contextlib.nullcontext() as model:
        found = _objects(args, model, options)
    print(
        f"{found.count} {found.class_name} object(s) in {found.n_planes} plane(s) ({found.seconds:.1f} s); "
        f"wrote {', '.join(map(str, found.written))}"
    )
    return 0


def _objects(args: argparse.Namespace, model_path, options: dict):
    """``find_objects`` with the command line's progress and Ctrl-C."""
    from .workflows import find_objects

    two = len(args.paths) == 2
    reporter = _Reporter(interactive=False, every_s=10.0)

    def progress(ev):
        if ev["planes"] > 1 and reporter.due(force=ev["plane"] == ev["planes"]):
            log.info("objects: plane %d/%d", ev["plane"], ev["planes"])

    found, _ = _with_cancel_on_sigint(
        lambda c: find_objects(
            model_path=model_path,
            image_path=args.paths[1] if two else args.image,
            probabilities=None if two else args.paths[0],
            class_name=args.class_name,
            out=args.out,
            measure=args.measure,
            rois=args.rois,
            options=options,
            channel=args.channel,
            device=args.device,
            overwrite=args.overwrite,
            progress=progress,
            cancel=c,
            cellpose_model=args.cellpose_model,
            proposals=args.proposals,
        )
    )
    return found


def cmd_suggest(args: argparse.Namespace) -> int:
    """``tem-ij suggest``; returns the exit status."""
    from .errors import UserError
    from .io import read_image, read_rois
    from .modelio import load_model
    from .suggest import suggestion_paths, write_suggestions
    from .workflows import suggest_round

    if len(args.paths) > 2:
        raise UserError("suggest takes [MODEL] IMAGE: at most two paths")
    model_path = _model_path(args.paths[0]) if len(args.paths) == 2 else None
    protect = [args.paths[0]] if len(args.paths) == 2 and Path(args.paths[0]).is_dir() else []
    image_path = args.paths[-1]
    out = Path(args.out)
    if out.suffix.lower() != ".zip":
        raise UserError(f"the suggestions are a RoiSet .zip; got {out}")
    for o in suggestion_paths(out):
        _check_output(o, [image_path, args.rois, model_path, args.probabilities], args.overwrite, protect)
    _check_seed(args.seed, "--seed")
    if args.k < 1:
        raise UserError("-k must be at least 1")
    if not 0 <= args.temperature <= 10:
        raise UserError("--temperature must be between 0 and 10")
    if args.size is not None and args.size < 16:
        raise UserError("--size must be at least 16")
    model = load_model(model_path) if model_path else None
    image = read_image(image_path, channel=args.channel)
    shapes = read_rois(args.rois) if args.rois else []
    reporter = _Reporter(interactive=False, every_s=10.0)

    def progress(ev):
        if reporter.due(force=ev["plane"] == ev["planes"]) and ev["planes"] > 1:
            log.info("%s: plane %d/%d", ev["stage"], ev["plane"], ev["planes"])

    result, _ = _with_cancel_on_sigint(
        lambda c: suggest_round(
            image,
            shapes,
            model,
            k=args.k,
            size=args.size,
            all_slices=args.all_slices,
            group_names=_parse_group_names(args.group_names),
            probabilities=args.probabilities,
            device=args.device,
            progress=progress,
            cancel=c,
            stride=args.stride,
            temperature=args.temperature,
            seed=args.seed,
        )
    )
    files = write_suggestions(out, result, stack=image.data.shape[0] > 1)
    print(f"{len(result.candidates)} candidate windows scored ({result.phase}) in {result.timings['total_s']:.1f} s")
    for i, c in enumerate(result.suggestions, 1):
        why = ", ".join(f"{k} {v}" for k, v in c.reasons.items() if v is not None and not isinstance(v, dict))
        focus = f"; outline first: {len(c.focus)} focus region(s) suggest-{i}-focus-*" if c.focus else ""
        print(
            f"  suggest-{i}: slice {c.z + 1}, x {c.x0}, y {c.y0}, {c.x1 - c.x0}x{c.y1 - c.y0}, "
            f"score {c.score:.3f} ({why}){focus}"
        )
    novel = sorted((r for r in result.slices if r["novelty"] is not None), key=lambda r: -r["novelty"])[:5]
    if len(result.slices) > 1 and novel:
        print(
            "slices most unlike the annotated patches: "
            + ", ".join(f"{r['slice']} ({r['novelty']:.2f})" for r in novel)
        )
    print(f"wrote {', '.join(map(str, files))}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """``tem-ij history``; returns the exit status."""
    import json

    from .project import Project

    project = Project.open(args.project)
    print(json.dumps(project.data, indent=1) if args.json else project.history())
    return 0


def cmd_revert(args: argparse.Namespace) -> int:
    """``tem-ij revert``; returns the exit status."""
    from .project import Project

    project = Project.open(args.project)
    before = project.current
    record = project.revert(args.round)
    later = [r["round"] for r in project.rounds if r["round"] > args.round]
    print(
        f"round {record['round']} is current again (was {before}); the next 'tem-ij train --project "
        f"{args.project}' warm-starts from {record['model']}"
        + (f"; rounds {', '.join(map(str, later))} stay on disk and in the history" if later else "")
    )
    return 0


def _int_list(text: str, option: str) -> list:
    from .errors import UserError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise UserError(f"{option} expects comma-separated integers, got {text!r}") from exc
    if not values:
        raise UserError(f"{option} is empty")
    return values


def cmd_experiment(args: argparse.Namespace) -> int:
    """``tem-ij experiment``; returns the exit status."""
    import numpy as np

    from .config import Settings, load_settings
    from .errors import UserError
    from .experiment import plot_learning_curves, run_experiment, split_grid, write_tables
    from .io import read_image
    from .outputs import claim_folder

    schedule = _int_list(args.schedule, "--schedule")
    seeds = [_check_seed(v, "--seeds") for v in _int_list(args.seeds, "--seeds")]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    out = Path(args.out)
    if args.minutes_per_round <= 0:
        raise UserError("--minutes-per-round must be positive")
    image = read_image(args.image, channel=args.channel)
    truth = read_image(args.labels).data
    if truth.shape != image.data.shape:
        raise UserError(f"--labels has shape {truth.shape} but the image has {image.data.shape}")
    if (truth.dtype.kind == "f" and not np.array_equal(truth, np.round(truth))) or truth.min() < 0:
        raise UserError("--labels must hold class indices 0, 1, ... (a label image, not probabilities)")
    truth = truth.astype(np.int64)
    n_classes = int(truth.max()) + 1
    if n_classes < 2:
        raise UserError("--labels holds a single class; the ground truth needs at least two")
    if args.classes:
        classes = [c.strip().lower() for c in args.classes.split(",")]
    else:
        others = ["cell"] if n_classes == 2 else [f"class{i}" for i in range(1, n_classes)]
        classes = ["background"] + others
    if len(classes) != n_classes:
        raise UserError(f"--classes names {len(classes)} classes but --labels holds {n_classes}")
    settings = load_settings(args.config) if args.config else Settings()
    settings.train.max_minutes = args.minutes_per_round
    if args.iterations_per_round:
        settings.train.max_iterations = args.iterations_per_round
        settings.train.min_iterations = min(settings.train.min_iterations, args.iterations_per_round // 2)
    pool, test_mask = split_grid(truth.shape, settings.patches.size, args.test_fraction)
    claim_folder(out, "tem-ij experiment", [args.image, args.labels, args.config])
    bar = None

    def progress(ev):
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=ev["total"], desc="rounds", unit="round", dynamic_ncols=True)
        bar.update(ev["done"] - bar.n)
        bar.set_postfix({"arm": ev["arm"], "seed": ev["seed"], "patches": ev["patches"], "mIoU": ev["miou"]})

    try:
        result, _ = _with_cancel_on_sigint(
            lambda c: run_experiment(
                image.data,
                truth,
                classes,
                pool,
                test_mask,
                settings,
                arms=arms,
                schedule=schedule,
                seeds=seeds,
                rf=not args.no_rf,
                device=args.device,
                out_dir=out,
                progress=progress,
                cancel=c,
            )
        )
    finally:
        if bar is not None:
            bar.close()
    files = write_tables(result, out)
    plot_learning_curves(result, out / "learning_curves.png")
    for arm in arms:
        s = result["summary"][arm]
        print(f"{arm:8s} mIoU by patches {dict(zip(s['patches'], s['miou_mean']))}  AUC {s['auc_mean']:.3f}")
    if "rf" in result["summary"]:
        print(f"{'RF peer':8s} mIoU by patches {dict(zip(schedule, result['summary']['rf']['miou_mean']))}")
    print(f"wrote {out}/: learning_curves.png, montage-*.png, rounds-*.gif, {files[0].name}, {files[1].name}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``tem-ij demo``; returns the exit status."""
    from .demo import run_demo
    from .errors import UserError

    if args.minutes <= 0:
        raise UserError("--minutes must be positive")
    _check_seed(args.seed, "--seed")
    report = run_demo(Path(args.out), minutes=args.minutes, seed=args.seed, device=args.device)
    print(report)
    return 0


def cmd_fiji(args: argparse.Namespace) -> int:
    """``tem-ij fiji``; returns the exit status."""
    from .fiji.launcher import run_fiji

    status, log_text = run_fiji(args.fiji_app, args.imagej_jar, args.macro, args.config, args.mem)
    if log_text:
        print(log_text)
    return status


def cmd_doctor(args: argparse.Namespace) -> int:
    """``tem-ij doctor``; returns the exit status."""
    from .errors import UserError
    from .workflows import doctor

    if not 0 < args.probe_seconds <= 600:
        raise UserError(f"--probe-seconds {args.probe_seconds:g}: give a length in (0, 600] seconds")
    doctor(write=lambda line: print(line, flush=True), probe_seconds=args.probe_seconds)
    return 0


def cmd_install_fiji(args: argparse.Namespace) -> int:
    """``tem-ij install-fiji``; returns the exit status."""
    from .errors import UserError
    from .fiji.launcher import install_fiji, source_scripts_folder
    from .fiji.manifest import load_manifest, repo_root, write_scripts

    if args.write_scripts:
        folder = source_scripts_folder()
        for path in write_scripts(folder, load_manifest(repo_root() / "plugin.yml")):
            print(f"wrote {path}")
        if not args.fiji_app:
            return 0
    if not args.fiji_app:
        raise UserError("install-fiji needs the Fiji.app folder")
    target = install_fiji(args.fiji_app)
    print(f"installed the TEM Segmentation commands in {target}; restart Fiji, then start it with tem-ij fiji")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tem-ij``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    _setup_logging(args.verbose, args.quiet)
    from .errors import Cancelled, UserError

    try:
        commands = {
            "train": cmd_train,
            "predict": cmd_predict,
            "objects": cmd_objects,
            "demo": cmd_demo,
            "suggest": cmd_suggest,
            "history": cmd_history,
            "revert": cmd_revert,
            "experiment": cmd_experiment,
            "fiji": cmd_fiji,
            "install-fiji": cmd_install_fiji,
            "doctor": cmd_doctor,
            "export": cmd_export,
        }
        return commands[args.command](args)
    except UserError as exc:
        print(f"tem-ij {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError as exc:
        # Readers refuse sizes that can never fit; this is an allocation that failed anyway (free memory ran out).
        detail = f" ({exc})" if str(exc) else ""
        print(
            f"tem-ij {args.command}: error: out of memory{detail}; close other programs, or use a smaller image, "
            "tile (--tile) or batch size (--batch-size)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except (Cancelled, KeyboardInterrupt):
        print(f"tem-ij {args.command}: cancelled", file=sys.stderr)
        return EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
