"""What each training term costs: the median time of one optimiser step, default settings vs each term on.

Uses the default network on the ISBI 2012 ``mito`` task's partial labels (see ``label_gap.py``) on the
CPU. Arms are interleaved (one step of each in turn), so a machine that gets busier or quieter
changes every arm alike; the median over ``--steps`` rounds is reported with its ratio to the
default's. Run it alone: two benchmarks at once on two cores measure each other.

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
    "band": ["train.band_weight=0.5"],
    "edge": ["train.edge_weight=1.0"],
    "pseudo": ["train.pseudo_weight=0.5", "train.min_iterations=0"],
}


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
    result = {a: {"median_s": round(med[a], 4), "ratio": round(med[a] / med["default"], 3)} for a in arms}
    for a, r in result.items():
        print(f"{a:8s} {r['median_s'] * 1000:7.1f} ms/step  x{r['ratio']:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"steps": args.steps, "arms": result}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
