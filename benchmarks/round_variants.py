"""Why did a round fall? Replay one arm's rounds of ``active_learning.py`` and retrain its last round.

The rounds before the last run as ``active_learning.py`` runs them (same pool, simulated annotator,
360 iterations, seed); the last round's patches are picked and annotated the same way, and then its
labels are trained several ways: ``warm`` (from the previous round's model, as shipped), ``fresh``
(from scratch), ``lrX`` (warm, learning rate X). Per variant: mIoU on the scored pixels of sections
15-29, the fraction of those pixels predicted as each class, and for ``warm`` the same without the
prior correction (the output bias shift towards the image's class priors). A fall that every variant
shares comes from the labels, not from the warm start.

    python benchmarks/round_variants.py --task profiles --arm suggest-mix --seed 2 --schedule 1,2,4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="profiles", choices=["membrane", "profiles", "mito"])
    ap.add_argument("--arm", default="suggest-mix")
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--schedule", default="1,2,4", help="patch counts; the last round is retrained")
    ap.add_argument("--variants", default="warm,fresh,lr0.0003")
    ap.add_argument("--iterations", type=int, default=360)
    ap.add_argument("--json", type=Path, help="write the rows here too")
    args = ap.parse_args(argv)

    import torch
    from isbi_partial import DATA, load
    from label_gap import CLASSES, truths

    from tem_ij_plugin.annotations import rasterize
    from tem_ij_plugin.config import Settings
    from tem_ij_plugin.experiment import _ArmRun, _Setup
    from tem_ij_plugin.metrics import miou
    from tem_ij_plugin.predict import predict_stack
    from tem_ij_plugin.priors import without_correction
    from tem_ij_plugin.suggest import candidate_boxes
    from tem_ij_plugin.train import train

    schedule = [int(v) for v in args.schedule.split(",")]
    classes = CLASSES[args.task]
    images = load(DATA)[0]
    truth = truths(DATA, images.shape)[args.task].astype(np.int64)
    pool = candidate_boxes((15,) + images.shape[1:], 256)
    scored = np.zeros(images.shape, bool)
    scored[15:, ::2, ::2] = True  # as active_learning.py scores
    settings = Settings()
    settings.train.max_iterations = args.iterations
    settings.train.min_iterations = args.iterations // 2
    settings.train.max_minutes = 30
    cpu = torch.device("cpu")
    run = _ArmRun(_Setup(images, truth, classes, pool, scored, settings, cpu, None), args.arm, args.seed, False)

    def score(net, normalization) -> dict:
        pred = predict_stack(net, images, normalization, cpu).argmax(1)[scored]
        frac = np.bincount(pred, minlength=len(classes)) / pred.size
        return {"miou": round(miou(pred, truth[scored], len(classes)), 4), "predicted": np.round(frac, 3).tolist()}

    rows = []

    def report(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    for target in schedule[:-1]:
        row, _, _ = run.round(target, None)
        report({"patches": target, "variant": "warm", "miou": row["miou"]})
    need = schedule[-1] - len(run.chosen)
    unused = np.array([i for i in range(len(pool)) if i not in run.chosen and i not in run.declined])
    order, _ = run._order(need, unused)
    picks = run._annotate(order, need)
    run.chosen += picks
    labels = rasterize(run.shapes, images.shape, classes=classes)
    true_frac = np.bincount(truth[scored], minlength=len(classes)) / scored.sum()
    for variant in args.variants.split(","):
        s = settings.model_copy(deep=True)
        s.train.seed = args.seed
        if variant.startswith("lr"):
            s.train.learning_rate = float(variant[2:])
        model = train(images, labels, s, init=None if variant == "fresh" else run.model, device="cpu").model
        row = {"patches": schedule[-1], "variant": variant, **score(model.net, model.normalization)}
        row["true"] = np.round(true_frac, 3).tolist()
        if variant == "warm":
            correction = model.last_round.get("prior_correction")
            if correction is not None:
                row["without_prior_correction"] = score(without_correction(model.net, correction), model.normalization)
            row["new_patches"] = [pool[i].tolist() for i in picks]
            row["new_patches_true_fraction"] = [
                np.round(
                    np.bincount(truth[z, y0:y1, x0:x1].ravel(), minlength=len(classes)) / (y1 - y0) / (x1 - x0), 3
                ).tolist()
                for z, y0, x0, y1, x1 in (pool[i] for i in picks)
            ]
        report(row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**vars(args), "json": str(args.json), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
