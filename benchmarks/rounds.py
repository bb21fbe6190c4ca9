"""Short interactive rounds vs one long training, on ISBI 2012 (the annotate -> train -> annotate loop).

Per task and seed, 15 patches of sections 0-14 are annotated once by the simulated annotator (see
``isbi_partial.py``); round k sees the first 1, 2, 4, 8, 15 of them and warm-starts from round k-1's
model (as ``tem-ij train --project`` does), for ``--round-iterations`` steps each. The reference is
one training on all 15 patches for ``--long-iterations`` steps. Iterations rather than minutes (90 s
and 10 minutes of the 2-core CPU are about 360 and 2400), so that a busy machine changes the time,
not the result. Every model is scored (mIoU) on every pixel of sections 15-29.

    python benchmarks/rounds.py --tasks mito --seeds 0
    python benchmarks/rounds.py --set train.prior_correction=mean
    python benchmarks/rounds.py --rounds-only --tasks membrane --seeds 2   # rounds alone

Prints a table and writes JSON (``--json``) after every round.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from isbi_partial import DATA, apply_overrides, choose_patches, load, miou, partial_labels, rf_peer  # noqa: E402
from label_gap import CLASSES, dense_score, truths  # noqa: E402

SCHEDULE = (1, 2, 4, 8, 15)


def first_patches(labels, patches, k: int, size: int = 256):
    """The annotations of the first ``k`` patches only (the rest unlabelled)."""
    from tem_ij_plugin.annotations import Labels

    out = np.full(labels.labels.shape, -1, labels.labels.dtype)
    for z, y, x in patches[:k]:
        out[z, y : y + size, x : x + size] = labels.labels[z, y : y + size, x : x + size]
    return Labels(labels=out, classes=labels.classes)


def score(model, test_img, test_truth) -> float:
    return dense_score(model.net, test_img, test_truth, model, len(model.classes))


def run(task, truth, images, seed, args, row: dict, save) -> dict:
    """Fill ``row`` with the rounds, the long training and the forests of one task and seed, saving after each."""
    from tem_ij_plugin.config import Settings
    from tem_ij_plugin.train import train

    train_img, test_img, test_truth = images[:15], images[15:], truth[15:]
    patches = choose_patches(15, seed)
    patches = [patches[i] for i in np.random.default_rng(seed).permutation(15)]  # the order they are annotated
    labels = partial_labels(truth[:15], patches, seed, classes=CLASSES[task])

    def settings(iterations):
        s = apply_overrides(Settings(), args.set)
        s.train.seed, s.train.max_iterations, s.train.max_minutes = seed, iterations, 60.0
        return s

    row["rounds"] = []
    model = None
    for k in SCHEDULE:
        res = train(
            train_img, first_patches(labels, patches, k), settings(args.round_iterations), init=model, device="cpu"
        )
        model = res.model
        last = model.last_round
        row["rounds"].append(
            {
                "patches": k,
                "miou": score(model, test_img, test_truth),
                "kept_previous": bool(last.get("kept_previous_model")),
                "best_iteration": last["best_iteration"],
                "val_patches": len(last["val_patches"]),
            }
        )
        logging.info("%s seed %d: %d patches, mIoU %.4f", task, seed, k, row["rounds"][-1]["miou"])
        save()
    if args.rounds_only:  # the long training and the forests do not depend on the round rules
        return row
    long = train(train_img, labels, settings(args.long_iterations), device="cpu")
    row["long"] = score(long.model, test_img, test_truth)
    save()
    for k in (4, 15):
        pred, *_ = rf_peer(train_img, first_patches(labels, patches, k).labels, test_img, seed)
        row[f"rf_{k}"] = round(miou(pred, test_truth, len(CLASSES[task])), 4)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--tasks", default="mito,membrane")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--round-iterations", type=int, default=360)
    ap.add_argument("--long-iterations", type=int, default=2400)
    ap.add_argument("--rounds-only", action="store_true", help="skip the long training and the forests")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "rounds.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not (args.data / "images").is_dir():
        print(f"SKIP: ISBI 2012 data not found at {args.data}")
        return 0
    images = load(args.data)[0]
    all_truths = truths(args.data, images.shape)
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "tasks": {}}
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every round, so that a stopped run keeps what it finished
        args.json.write_text(json.dumps(results, indent=1))

    for seed in (int(s) for s in args.seeds.split(",")):
        for task in args.tasks.split(","):
            row = results["tasks"].setdefault(task, {}).setdefault(str(seed), {})
            run(task, all_truths[task], images, seed, args, row, save)
            save()
    print(
        f"{'task':9s} {'seed':>4s} "
        + " ".join(f"{k:>6d}" for k in SCHEDULE)
        + f" {'long':>6s} {'rf4':>6s} {'rf15':>6s}"
    )
    for task, by_seed in results["tasks"].items():
        for seed, row in by_seed.items():
            cells = " ".join(f"{r['miou']:6.3f}{'*' if r['kept_previous'] else ' '}" for r in row["rounds"])
            rest = " ".join(f"{row[k]:6.3f}" if k in row else f"{'-':>6s}" for k in ("long", "rf_4", "rf_15"))
            print(f"{task:9s} {seed:>4s} {cells} {rest}")
    print("* = the round kept its starting model")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
