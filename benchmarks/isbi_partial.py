"""Partial-label accuracy on real ssTEM (ISBI 2012): the default model vs the random-forest peer.

Trains on simulated partial polygon annotations of 256x256 patches from sections 0-14 and scores
mIoU (mean IoU over both classes, background included) on every pixel of sections 15-29, for

* ``membrane``: cell interior vs membrane (``labels/``),
* ``profiles``: large profiles (>= 5000 px connected pieces of ``labels_cardona_neurites/``) vs the rest.

The random-forest peer (skimage ``multiscale_basic_features`` + sklearn ``RandomForestClassifier``, the
recipe of Trainable Weka Segmentation / ilastik / Labkit) learns from exactly the same labels in the
same run. Prints a table and writes JSON (``--json``).

    python benchmarks/isbi_partial.py                      # full run (default model, T=1, RF)
    python benchmarks/isbi_partial.py --minutes 2 --tasks membrane   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from tem_ij_plugin.metrics import miou

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "isbi2012"


def load(data: Path):
    import imageio.v3 as iio

    images = np.stack([iio.imread(data / "images" / f"{i:02d}.png") for i in range(30)])
    membrane = np.stack([iio.imread(data / "labels" / f"{i:02d}.png") for i in range(30)])
    neurites = np.stack([iio.imread(data / "labels_cardona_neurites" / f"{i:02d}.png") for i in range(30)])
    return images, membrane, neurites


def large_profiles(neurites: np.ndarray, min_size: int = 5000) -> np.ndarray:
    """1 where a pixel belongs to a connected piece (per ID) of at least ``min_size`` pixels."""
    from scipy import ndimage as ndi

    out = np.zeros(neurites.shape, np.uint8)
    for z, sec in enumerate(neurites):
        for ident in np.unique(sec):
            if ident in (0, 249):
                continue
            comp, n = ndi.label(sec == ident)
            sizes = np.bincount(comp.ravel())
            big = np.nonzero(sizes >= min_size)[0]
            big = big[big > 0]
            out[z][np.isin(comp, big)] = 1
    return out


def choose_patches(n: int, seed: int, n_sections: int = 15, size: int = 256, side: int = 512):
    rng = np.random.default_rng(seed)
    cells = [(z, y, x) for z in range(n_sections) for y in range(0, side, size) for x in range(0, side, size)]
    idx = rng.choice(len(cells), size=n, replace=False)
    return [cells[i] for i in sorted(idx)]


def partial_labels(truth, patches, seed, size=256, classes=("background", "cell")):
    from tem_ij_plugin.annotations import rasterize
    from tem_ij_plugin.synthetic import simulate_annotations

    rng = np.random.default_rng(seed)
    classes = list(classes)
    shapes = []
    for z, y, x in patches:
        shapes += simulate_annotations(truth[z], [(y, x, y + size, x + size)], classes, rng, slice_position=z + 1)
    return rasterize(shapes, truth.shape, classes=classes)


def rf_peer(train_img, labels, test_img, seed):
    """Fit the random-forest peer on the labelled pixels of ``train_img``; predict every pixel of ``test_img``."""
    from tem_ij_plugin.peer import RandomForestPeer

    t0 = time.perf_counter()
    clf = RandomForestPeer(train_img, seed).fit(labels)
    fit_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    test = RandomForestPeer(test_img, seed)
    preds = np.stack([test.predict(clf, z) for z in range(test_img.shape[0])])
    return preds, fit_s, time.perf_counter() - t1


def apply_overrides(settings, pairs):
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a Settings object."""
    import yaml

    for pair in pairs:
        key, _, value = pair.partition("=")
        section, _, field = key.partition(".")
        setattr(getattr(settings, section), field, yaml.safe_load(value))
    return settings


def run_model(train_img, labels, test_img, steps, minutes, seed, overrides=()):
    import torch

    from tem_ij_plugin.config import Settings
    from tem_ij_plugin.predict import predict_stack
    from tem_ij_plugin.train import train

    s = apply_overrides(Settings(), overrides)
    s.train.seed = seed
    if minutes is not None:
        s.train.max_minutes = minutes
    if steps is not None:
        s.model.steps = steps
    t0 = time.perf_counter()
    res = train(train_img, labels, s, device="cpu")
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    probs = predict_stack(res.model.net, test_img, res.model.normalization, torch.device("cpu"))
    pred_s = time.perf_counter() - t1
    rnd = res.model.last_round
    return probs.argmax(1), {
        "steps": s.model.steps,
        "train_s": round(train_s, 1),
        "predict_s": round(pred_s, 1),
        "iterations": rnd["iterations"],
        "stop_reason": res.stop_reason,
        "best_iteration": rnd["best_iteration"],
        "best_val": round(rnd["best_score"], 4),
        "backtracks": rnd["backtracks"],
        "curve": {
            "val_iteration": rnd["curves"]["val_iteration"],
            "val_score": rnd["curves"]["val_score"],
            "smoothed": rnd["curves"]["smoothed_score"],
        },
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--tasks", default="membrane,profiles")
    ap.add_argument("--patches", type=int, default=15)
    ap.add_argument("--steps", default="default,3", help="recurrent steps to compare ('default' = config default)")
    ap.add_argument("--minutes", type=float, default=None, help="training budget (default: config default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-rf", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "isbi_partial.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not (args.data / "images").is_dir():
        print(f"SKIP: ISBI 2012 data not found at {args.data}")
        return 0
    sys.path.insert(0, str(ROOT))
    images, membrane, neurites = load(args.data)
    truths = {"membrane": (membrane > 127).astype(np.uint8), "profiles": large_profiles(neurites)}
    train_img, test_img = images[:15], images[15:]
    results = {"patches": args.patches, "seed": args.seed, "overrides": args.set, "tasks": {}}
    for task in args.tasks.split(","):
        truth = truths[task]
        patches = choose_patches(args.patches, args.seed)
        lab = partial_labels(truth[:15], patches, args.seed)
        frac = float((lab.labels >= 0).sum() / (len(patches) * 256 * 256))
        agree = float((lab.labels[lab.labels >= 0] == truth[:15][lab.labels >= 0]).mean())
        row = {
            "labelled_fraction_of_patches": round(frac, 3),
            "label_agreement_with_truth": round(agree, 4),
            "class1_fraction_truth": round(float(truth[15:].mean()), 3),
        }
        if not args.no_rf:
            pred, fit_s, pred_s = rf_peer(train_img, lab.labels, test_img, args.seed)
            row["rf"] = {
                "miou": round(miou(pred, truth[15:]), 4),
                "pred_class1_fraction": round(float(pred.mean()), 3),
                "fit_s": round(fit_s, 1),
                "predict_s": round(pred_s, 1),
            }
            logging.info("%s RF peer mIoU %.4f", task, row["rf"]["miou"])
        for st in args.steps.split(","):
            steps = None if st == "default" else int(st)
            pred, info = run_model(train_img, lab, test_img, steps, args.minutes, args.seed, args.set)
            info["miou"] = round(miou(pred, truth[15:]), 4)
            info["pred_class1_fraction"] = round(float(pred.mean()), 3)
            row[f"model_T{info['steps']}"] = info
            logging.info(
                "%s model T=%d mIoU %.4f (%s, %d it, %.0f s)",
                task,
                info["steps"],
                info["miou"],
                info["stop_reason"],
                info["iterations"],
                info["train_s"],
            )
        results["tasks"][task] = row
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    print(
        f"\n{'task':10s} {'RF peer':>8s} "
        + " ".join(f"{k:>22s}" for k in next(iter(results["tasks"].values())) if k.startswith("model"))
    )
    for task, row in results["tasks"].items():
        cells = [
            f"{row[k]['miou']:.3f} ({row[k]['train_s']:.0f}s,{row[k]['stop_reason'][:5]})"
            for k in row
            if k.startswith("model")
        ]
        print(f"{task:10s} {row.get('rf', {}).get('miou', float('nan')):8.3f} " + " ".join(f"{c:>22s}" for c in cells))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
