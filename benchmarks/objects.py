"""Objects from 15 partially annotated patches: object F1 on ISBI 2012 large profiles, against the forest.

Per seed (patches, annotations and training), as in ``isbi_partial.py``: 15 partially annotated 256x256
patches of sections 0-14, a model trained for ``--iterations`` steps (iterations rather than minutes,
so a busy machine changes the time, not the result), objects cut by ``tem_ij_plugin.objects`` with its
defaults on sections 15-29 (the minimum area a quarter of the median annotated piece). The peer in the
same run: the random forest on the same labels, its class map (a 0.5 threshold), then distance map +
watershed (``split="distance"``: what a Fiji user does with Trainable Weka Segmentation, Distance Map
and Watershed), with the same minimum area. Scored against the Cardona neurite pieces of
at least 5000 px:

* object F1 at IoU >= 0.5 (one-to-one matching, as StarDist and cellpose count it) and the mean IoU of
  the matched objects;
* on the membrane task (cell interior vs membrane), the objects against every neurite piece with the
  ISBI challenge's adapted Rand error and variation of information (split + merge), lower is better.

``--speed`` instead times ``find_objects`` on a synthetic 3840x2920 probability map read from disk,
with the label image, the table and the ROIs written. ``--memory`` runs ``tem-ij objects`` on uint8
probability stacks of 2048x2048 planes (``--planes``, default 4 and 40) as a child process,
with every output written, and reports the peak resident memory of each: flat means the same for
both depths.

    python benchmarks/objects.py --seeds 0,1,2
    python benchmarks/objects.py --speed
    python benchmarks/objects.py --memory --planes 4,40
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from isbi_partial import DATA, choose_patches, large_profiles, load, partial_labels, rf_peer  # noqa: E402
from predict_memory import time_and_peak_memory  # noqa: E402

MIN_PROFILE = 5000


def truth_instances(neurites: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Per section, one id per connected piece of one neurite id (``min_size`` px or more), 0 elsewhere."""
    from scipy import ndimage as ndi

    out = np.zeros(neurites.shape, np.int32)
    for z, sec in enumerate(neurites):
        n = 0
        for ident in np.unique(sec):
            if ident in (0, 249):  # the membrane and unlabelled pixels of the Cardona labels
                continue
            comp, k = ndi.label(sec == ident)
            sizes = np.bincount(comp.ravel())
            for c in range(1, k + 1):
                if sizes[c] >= min_size:
                    n += 1
                    out[z][comp == c] = n
    return out


def match(pred: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> dict:
    """One-to-one matching of two label planes at IoU >= ``threshold``: TP, FP, FN and the matched IoUs."""
    from scipy.optimize import linear_sum_assignment

    n_p, n_t = int(pred.max()), int(truth.max())
    if n_p == 0 or n_t == 0:
        return {"tp": 0, "fp": n_p, "fn": n_t, "ious": []}
    both = np.bincount(pred.ravel().astype(np.int64) * (n_t + 1) + truth.ravel(), minlength=(n_p + 1) * (n_t + 1))
    inter = both.reshape(n_p + 1, n_t + 1)[1:, 1:].astype(float)
    area_p, area_t = np.bincount(pred.ravel(), minlength=n_p + 1)[1:], np.bincount(truth.ravel(), minlength=n_t + 1)[1:]
    iou = inter / (area_p[:, None] + area_t[None, :] - inter)
    rows, cols = linear_sum_assignment(-iou)
    good = iou[rows, cols] >= threshold
    tp = int(good.sum())
    return {"tp": tp, "fp": n_p - tp, "fn": n_t - tp, "ious": iou[rows, cols][good].tolist()}


def object_scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    """F1 at IoU >= 0.5 and the mean IoU of matched objects, over every plane."""
    per = [match(p, t) for p, t in zip(pred, truth)]
    tp, fp, fn = (sum(m[k] for m in per) for k in ("tp", "fp", "fn"))
    ious = [i for m in per for i in m["ious"]]
    return {
        "f1": round(2 * tp / max(2 * tp + fp + fn, 1), 4),
        "matched_iou": round(float(np.mean(ious)), 4) if ious else None,
        "predicted": tp + fp,
        "true": tp + fn,
    }


def boundary_scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Adapted Rand error and variation of information (split, merge), averaged over planes; truth 0 ignored."""
    from skimage.metrics import adapted_rand_error, variation_of_information

    are, split, merge = [], [], []
    for p, t in zip(pred, truth):
        keep = t > 0
        are.append(adapted_rand_error(t[keep], p[keep].astype(np.int64))[0])
        s, m = variation_of_information(t[keep], p[keep].astype(np.int64))
        split.append(s)
        merge.append(m)
    return {
        "adapted_rand_error": round(float(np.mean(are)), 4),
        "vi_split": round(float(np.mean(split)), 4),
        "vi_merge": round(float(np.mean(merge)), 4),
    }


def _objects(probs: np.ndarray, settings) -> np.ndarray:
    from tem_ij_plugin.objects import label_plane

    return np.stack([label_plane(p, 1, settings) for p in probs])


def _one_hot(classes: np.ndarray) -> np.ndarray:
    """A class map (Z, Y, X) as certain probabilities (Z, 2, Y, X)."""
    return np.stack([classes == 0, classes == 1], 1).astype(np.float32)


def run_seed(images, truth, instances, seed, args, boundary: bool) -> dict:
    import torch

    from tem_ij_plugin.config import Settings
    from tem_ij_plugin.objects import ObjectSettings
    from tem_ij_plugin.predict import predict_stack
    from tem_ij_plugin.train import train

    patches = choose_patches(15, seed)
    labels = partial_labels(truth[:15], patches, seed)
    s = Settings()
    s.train.seed, s.train.max_iterations, s.train.max_minutes = seed, args.iterations, 60.0
    t0 = time.perf_counter()
    model = train(images[:15], labels, s, device="cpu").model
    train_s = time.perf_counter() - t0
    probs = predict_stack(model.net, images[15:], model.normalization, torch.device("cpu"))
    settings = ObjectSettings.for_annotations(256, model.meta.get("object_areas"), "cell")
    t1 = time.perf_counter()
    ours = _objects(probs, settings)
    objects_s = time.perf_counter() - t1
    forest = rf_peer(images[:15], labels.labels, images[15:], seed)[0]
    # The same minimum area: a Fiji user sets Analyze Particles' size from the cells too.
    peer = _objects(_one_hot(forest), replace(settings, split="distance"))
    row = {
        "seed": seed,
        "train_s": round(train_s, 1),
        "objects_s": round(objects_s, 2),
        "min_area": settings.min_area,
        "ours": object_scores(ours, instances[15:]),
        "peer": object_scores(peer, instances[15:]),
    }
    if boundary:
        row["ours"].update(boundary_scores(ours, instances[15:]))
        row["peer"].update(boundary_scores(peer, instances[15:]))
    return row


def previous_report(path: Path, iterations: int) -> dict:
    """The rows an earlier run with the same iteration count kept, so that a run of more seeds adds to them."""
    if path.is_file():
        report = json.loads(path.read_text())
        if report.get("iterations") == iterations:
            return report
    return {"iterations": iterations, "tasks": {}}


def speed(args) -> dict:
    """``find_objects`` from a probability TIFF of 3840x2920 (synthetic cells), every output written."""
    from scipy import ndimage as ndi

    from tem_ij_plugin.io import write_hyperstack
    from tem_ij_plugin.synthetic import make_tem_image
    from tem_ij_plugin.workflows import find_objects

    _, truth = make_tem_image(2920, 3840, seed=7)
    cell = ndi.gaussian_filter((truth == 1).astype(np.float32), 2)
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        probs = Path(tmp) / "probs.tif"
        write_hyperstack(probs, np.stack([1 - cell, cell])[None], channel_names=["background", "cell"])
        for i in range(args.repeats):
            t0 = time.perf_counter()
            found = find_objects(
                probabilities=probs, out=Path(tmp) / "cells.tif", measure=Path(tmp) / "cells.csv",
                rois=Path(tmp) / "cells.zip", overwrite=True,
            )  # fmt: skip
            times.append(time.perf_counter() - t0)
            print(f"  run {i + 1}: {times[-1]:.2f} s, {found.count} objects", flush=True)
    return {"image": [2920, 3840], "objects": found.count, "seconds": [round(t, 2) for t in times],
            "median_s": round(float(np.median(times)), 2)}  # fmt: skip


def write_probability_stack(path: Path, planes: int, size: int = 2048) -> None:
    """A uint8 probability map of ``planes`` planes (background, cell) as ``tem-ij predict`` writes one,
    written plane by plane so that the benchmark itself never holds the stack."""
    import tifffile
    from scipy import ndimage as ndi

    from tem_ij_plugin.synthetic import make_tem_image

    _, truth = make_tem_image(size, size, seed=7)
    cell = np.rint(255 * ndi.gaussian_filter((truth == 1).astype(np.float32), 2)).astype(np.uint8)

    def channels():
        for z in range(planes):
            shifted = np.roll(cell, 16 * z, axis=1)
            yield 255 - shifted
            yield shifted

    labels = ["background", "cell"] * planes
    with tifffile.TiffWriter(path, imagej=True) as tif:
        tif.write(channels(), shape=(planes, 2, size, size), dtype=np.uint8,
                  metadata={"axes": "ZCYX", "Labels": labels, "mode": "grayscale"})  # fmt: skip


def memory(args) -> dict:
    """Peak memory of ``tem-ij objects`` (label image, table and ROIs written) for each stack depth."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(p) for p in args.planes.split(",")):
            probs = Path(tmp) / f"probs{n}.tif"
            write_probability_stack(probs, n)
            outs = [Path(tmp) / f"cells{n}.tif", Path(tmp) / f"cells{n}.csv", Path(tmp) / f"cells{n}.zip"]
            wall, rss, _ = time_and_peak_memory(
                ["objects", str(probs), "--class", "cell", "-o", str(outs[0]), "--measure", str(outs[1]),
                 "--rois", str(outs[2])]
            )  # fmt: skip
            objects = sum(1 for _ in open(outs[1])) - 1
            rows.append({"planes": n, "input_mb": round(probs.stat().st_size / 2**20), "objects": objects,
                         "wall_s": round(wall, 1), "max_rss_mb": round(rss / 1024)})  # fmt: skip
            print(rows[-1], flush=True)
            for f in [probs, *outs, outs[1].with_name(f"cells{n}-slices.csv")]:
                f.unlink(missing_ok=True)
    return {"plane": [2048, 2048], "runs": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tasks", default="profiles,membrane")
    ap.add_argument("--iterations", type=int, default=700, help="training iterations per model")
    ap.add_argument("--speed", action="store_true", help="time find_objects on a 3840x2920 map instead")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory", action="store_true", help="peak memory of tem-ij objects on probability stacks")
    ap.add_argument("--planes", default="4,40", help="with --memory: the stack depths")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "objects.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.speed:
        res = speed(args)
        print(f"find_objects on 3840x2920: median {res['median_s']} s ({res['objects']} objects)")
        args.json.with_name("objects_speed.json").write_text(json.dumps(res, indent=1))
        return 0
    if args.memory:
        res = memory(args)
        args.json.with_name("objects_memory.json").write_text(json.dumps(res, indent=1))
        return 0
    if not (args.data / "images").is_dir():
        print(f"SKIP: ISBI 2012 data not found at {args.data}")
        return 0
    images, membrane, neurites = load(args.data)
    tasks = {
        "profiles": (large_profiles(neurites, MIN_PROFILE).astype(np.int64), truth_instances(neurites, MIN_PROFILE)),
        "membrane": ((membrane > 127).astype(np.int64), truth_instances(neurites)),
    }
    report = previous_report(args.json, args.iterations)
    for task in args.tasks.split(","):
        truth, instances = tasks[task]
        for seed in (int(s) for s in args.seeds.split(",")):
            r = run_seed(images, truth, instances, seed, args, boundary=task == "membrane")
            rows = [row for row in report["tasks"].get(task, []) if row["seed"] != seed] + [r]
            report["tasks"][task] = rows = sorted(rows, key=lambda row: row["seed"])
            print(f"{task} seed {seed}: ours {r['ours']}  peer {r['peer']}", flush=True)
            args.json.write_text(json.dumps(report, indent=1))
        for arm in ("ours", "peer"):
            f1 = [r[arm]["f1"] for r in rows]
            print(f"{task} {arm}: F1 mean {np.mean(f1):.3f} (sd {np.std(f1):.3f}) over {len(f1)} seed(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
