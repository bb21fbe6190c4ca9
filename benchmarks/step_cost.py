"""What each training term costs: the median time of one optimiser step, default settings vs each term on;
and what test-time augmentation costs at prediction.

Uses the default network on the ISBI 2012 ``mito`` task's partial labels (see ``label_gap.py``) on the
CPU. Arms are interleaved (one step of each in turn), so a machine that gets busier or quieter
changes every arm alike; the median over ``--steps`` rounds is reported with its ratio to the
0.2 step ("no band": the current default without its band term; "default" includes it). Also timed:
the prior correction that ends every training (median of 3). Prediction:
the median of 3 passes over 5 sections of 512x512 with ``tta`` off and ``flips``. Run it alone: two
benchmarks at once on two cores measure each other.

    python benchmarks/step_cost.py --steps 30
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from isbi_partial import DATA, apply_overrides, choose_patches, load, partial_labels  # noqa: E402
from label_gap import CLASSES, truths  # noqa: E402

ARMS = {
    "default": [],
    "no band": ["train.band_weight=0"],
    "band": ["train.band_weight=0.5"],
    "edge": ["train.edge_weight=1.0"],
    "pseudo": ["train.pseudo_weight=0.5", "train.min_iterations=0"],
}


def prior_cost(trainer) -> float:
    """Median seconds of 3 estimates of the prior correction (what a training does once, at its end)."""
    from tem_ij_plugin.priors import estimate_correction

    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        estimate_correction(trainer.ema, trainer.image, trainer.norm, trainer.training_prior(), trainer.dev, max_iter=1)
        runs.append(time.perf_counter() - t0)
    return round(float(np.median(runs)), 3)


def tta_cost(net, sections) -> dict:
    """Median seconds of 3 predictions of ``sections`` per test-time augmentation mode."""
    import torch

    from tem_ij_plugin.normalization import DEFAULT_NORMALIZATION
    from tem_ij_plugin.predict import predict_stack

    out = {}
    for mode in ("off", "flips"):
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            predict_stack(net.eval(), sections, DEFAULT_NORMALIZATION, torch.device("cpu"), tta=mode)
            runs.append(time.perf_counter() - t0)
        out[mode] = round(float(np.median(runs)), 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "step_cost.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not (args.data / "images").is_dir():
        print(f"SKIP: ISBI 2012 data not found at {args.data}")
        return 0
    from tem_ij_plugin.config import Settings
    from tem_ij_plugin.train import Trainer

    images = load(args.data)[0]
    truth = truths(args.data, images.shape)["mito"]
    labels = partial_labels(truth[:15], choose_patches(15, 0), 0, classes=CLASSES["mito"])
    arms = args.arms.split(",")
    trainers = {a: Trainer(images[:15], labels, apply_overrides(Settings(), ARMS[a]), device="cpu") for a in arms}
    for t in trainers.values():  # warm-up: allocator and thread pools
        t.net.train()
        t.step()
    times = {a: [] for a in arms}
    for _ in range(args.steps):
        for a, t in trainers.items():
            t0 = time.perf_counter()
            t.step()
            times[a].append(time.perf_counter() - t0)
    med = {a: float(np.median(v)) for a, v in times.items()}
    base = med.get("no band", med["default"])  # the 0.2 step: what the 1.5x budget is measured against
    result = {a: {"median_s": round(med[a], 4), "ratio_to_0.2": round(med[a] / base, 3)} for a in arms}
    for a, r in result.items():
        print(f"{a:8s} {r['median_s'] * 1000:7.1f} ms/step  x{r['ratio_to_0.2']:.2f} of the 0.2 step")
    prior_s = prior_cost(trainers["default"])
    print(f"prior correction (once per training): {prior_s:.2f} s = {prior_s / med['default']:.0f} default steps")
    tta = tta_cost(trainers["default"].ema, images[15:20])
    for mode, sec in tta.items():
        print(f"predict 5 sections, tta {mode:5s} {sec:6.2f} s  x{sec / tta['off']:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"steps": args.steps, "arms": result, "prior_correction_s": prior_s, "predict_5_sections_s": tta}, indent=1
        )
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
