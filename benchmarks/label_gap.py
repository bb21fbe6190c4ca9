"""The gap partial labels leave: dense-label ceiling vs partial labels vs the random forest, on ISBI 2012.

For each task and seed, on sections 0-14 (training) and every pixel of sections 15-29 (test):

* ``dense``: the default network trained on the *dense* labels of the training sections (the ceiling;
  ``--set`` overrides apply to it as to ``partial``, so both train under the same budget);
* ``partial``: the same network on simulated partial polygons of 15 random 256x256 patches (the product);
* ``rf``: the random-forest peer on exactly the same partial labels.

For the networks it also records what the trainer saw: its best (smoothed) validation score, on the
labelled pixels of its held-out patches, next to the dense test score. A trainer whose validation score
is far above the test score selects its checkpoints on the easy pixels (issue "Learn the pixels nobody
labelled").

Tasks: ``membrane`` (cell interior vs membrane), ``profiles`` (large profiles vs rest) and ``mito``
(background / membrane / mitochondria, from ``labels_cardona_mitochondria``).

    python benchmarks/label_gap.py --minutes 2 --seeds 0            # a short look (about 20 min on 2 cores)
    python benchmarks/label_gap.py --seeds 0,1,2                   # the full table (hours on 2 cores)

Prints a table (mean and spread over seeds) and writes JSON (``--json``). ``--save-models DIR`` keeps
the partial arm's trained (uncorrected) models; ``--rescore DIR`` scores more variants of them later,
without training (same tasks, seeds and ``--set``).
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

from isbi_partial import (  # noqa: E402
    DATA,
    apply_overrides,
    choose_patches,
    large_profiles,
    load,
    miou,
    partial_labels,
    rf_peer,
)
from prior_shifts import METHODS, labelled_posteriors, shift_scores  # noqa: E402

CLASSES = {
    "membrane": ["background", "cell"],
    "profiles": ["background", "cell"],
    "mito": ["background", "membrane", "mito"],
}


def truths(data: Path, images_shape) -> dict:
    """Dense class-index truth per task, shape (30, 512, 512)."""
    import imageio.v3 as iio

    _, membrane, neurites = load(data)
    mito = np.stack([iio.imread(data / "labels_cardona_mitochondria" / f"{i:02d}.png") for i in range(30)])
    three = np.zeros(images_shape, np.uint8)  # background (cell interior and everything else)
    three[membrane <= 127] = 1
    three[mito > 0] = 2  # a mitochondrion's own membrane counts as mitochondrion
    return {"membrane": (membrane > 127).astype(np.uint8), "profiles": large_profiles(neurites), "mito": three}


def dense_labels(truth: np.ndarray, classes: list):
    """Every pixel labelled: the ceiling's annotations."""
    from tem_ij_plugin.annotations import Labels

    return Labels(labels=truth.astype(np.int16), classes=list(classes))


def dense_score(net, test_img, test_truth, model, n_classes, tta="off") -> float:
    """Dense test mIoU of ``net`` (normalised as ``model`` was) on ``test_img``."""
    import torch

    from tem_ij_plugin.predict import predict_stack

    probs = predict_stack(net, test_img, model.normalization, torch.device("cpu"), tta=tta)
    return round(miou(probs.argmax(1), test_truth, n_classes), 4)


def prior_corrected(trainer, model, max_iter=200):
    """A copy of the trained network with the Saerens prior correction (estimated on the training image)."""
    import copy

    import torch

    from tem_ij_plugin.priors import estimate_correction, shift_output_bias

    net = copy.deepcopy(model.net).eval()
    seed = trainer.tc.seed
    prior = trainer.training_prior()
    rec = estimate_correction(
        net, trainer.image, trainer.norm, prior, torch.device("cpu"), seed=seed, max_iter=max_iter
    )
    shift_output_bias(net, rec["logit_shift"])
    return net, rec


CHECKPOINT_SECTIONS = (0, 5, 10)  # of the test sections: the dense score followed over checkpoints


def _checkpoint_recorder(trainer, test_img, test_truth, every: int):
    """A progress callback that scores the weight average on a few dense test sections every ``every``
    validations, next to both validation scores: how well each criterion ranks checkpoints."""
    import torch

    from tem_ij_plugin.normalization import normalize
    from tem_ij_plugin.predict import predict_plane

    rows = []
    n = len(trainer.classes)

    def record(ev):
        if not ev["validated"] or (ev["iteration"] // trainer.tc.eval_every) % every:
            return
        preds = [
            predict_plane(trainer.ema, normalize(test_img[i], trainer.lo, trainer.hi), torch.device("cpu")).argmax(0)
            for i in CHECKPOINT_SECTIONS
        ]
        test = miou(np.stack(preds), test_truth[list(CHECKPOINT_SECTIONS)], n)
        c = trainer.curves
        rows.append([ev["iteration"], c["val_labelled"][-1], c["val_band"][-1], round(test, 4)])

    return rows, record


def rank_correlations(checkpoints) -> dict:
    """Spearman correlation over checkpoints between each validation criterion and the dense test score."""
    from scipy.stats import spearmanr

    if len(checkpoints) < 4:
        return {}
    a = np.asarray(checkpoints, dtype=np.float64)
    return {name: round(float(spearmanr(a[:, k], a[:, 3])[0]), 3) for k, name in ((1, "labelled"), (2, "band"))}


def train_and_score(
    train_img,
    labels,
    test_img,
    test_truth,
    minutes,
    seed,
    overrides=(),
    variants=("raw",),
    checkpoints=0,
    refits=(),
    refit_control=False,
    save_to=None,
) -> dict:
    """Train the default network on ``labels``; its dense test mIoU and what its trainer validated.

    ``variants`` are scored from the same training: ``raw``, ``prior`` (Saerens prior correction
    estimated on the training image), ``prior1`` (one EM step: the mean posterior), ``tta`` (flip
    test-time augmentation), ``prior+tta`` / ``prior1+tta``, and the post-hoc shifts of
    :mod:`prior_shifts` (``rel1``, ``bbse``, ...). ``checkpoints`` > 0 follows the dense
    score of a few test sections every that many validations (it costs training time). ``save_to``:
    a path for the trained, uncorrected model (to score further variants later without training).
    """
    from tem_ij_plugin.config import Settings
    from tem_ij_plugin.modelio import save_model
    from tem_ij_plugin.train import Trainer

    s = apply_overrides(Settings(), overrides)
    s.train.seed = seed
    s.train.prior_correction = "off"  # scored as variants below, from the same training
    s.train.refit = 0.0  # likewise (refit_scores)
    if minutes is not None:
        s.train.max_minutes = minutes
    trainer = Trainer(train_img, labels, s, device="cpu")
    rows, record = _checkpoint_recorder(trainer, test_img, test_truth, checkpoints) if checkpoints else ([], None)
    res = trainer.run(progress=record)
    if save_to is not None:
        save_model(save_to, res.model)
    rnd = res.model.last_round
    out = {
        "best_val": None if rnd["best_score"] is None else round(rnd["best_score"], 4),
        "iterations": rnd["iterations"],
        "train_s": rnd["duration_s"],
        "stop_reason": res.stop_reason,
        "val_patches": len(rnd["val_patches"]),
        "variants": {},
    }
    if rows:
        out["checkpoints"] = {"columns": ["iteration", "val_labelled", "val_band", "test_3_sections"], "rows": rows}
        out["rank_correlation"] = rank_correlations(rows)
    out["variants"], corrections = score_variants(trainer, res.model, test_img, test_truth, variants)
    out.update(corrections)
    out["miou"] = out["variants"][variants[0]]
    if refits:
        out["refit"] = refit_scores(trainer, res.model, test_img, test_truth, refits, variants, refit_control)
    return out


def rescore(train_img, labels, test_img, test_truth, seed, overrides, variants, path) -> dict:
    """:func:`train_and_score` on a model it saved (``--save-models``): the variants, no training."""
    from tem_ij_plugin.config import Settings
    from tem_ij_plugin.modelio import load_model
    from tem_ij_plugin.train import Trainer

    s = apply_overrides(Settings(), overrides)
    s.train.seed = seed
    trainer = Trainer(train_img, labels, s, device="cpu")  # the same split and class weights, untrained
    model = load_model(path)
    rnd = model.last_round
    if "prior_correction" in rnd:
        raise ValueError(f"{path} was saved with a prior correction; rescoring needs the raw network")
    best = rnd["best_score"]
    out = {"best_val": None if best is None else round(best, 4), "iterations": rnd["iterations"], "rescored": str(path)}
    out["variants"], corrections = score_variants(trainer, model, test_img, test_truth, variants)
    out.update(corrections)
    out["miou"] = out["variants"][variants[0]]
    return out


POSTHOC = METHODS  # variants scored by shifting the raw network's test probabilities


def score_variants(trainer, model, test_img, test_truth, variants) -> tuple:
    """Dense test mIoU of each variant of ``model`` (see :func:`train_and_score`), and the corrections."""
    nets, corrections = {"raw": model.net}, {}
    for kind, iters in (("prior", 200), ("prior1", 1)):
        if any(v.split("+")[0] == kind for v in variants):
            nets[kind], corrections[f"{kind}_correction"] = prior_corrected(trainer, model, iters)
    scores = {}
    if any(v in POSTHOC for v in variants):
        wanted = [v for v in variants if v in POSTHOC]
        posthoc, corrections["reference"] = posthoc_scores(trainer, model, test_img, test_truth, wanted)
        scores.update(posthoc)
    for v in variants:
        if v in POSTHOC:
            continue
        net = nets[v.split("+")[0].replace("tta", "raw")]
        tta = "flips" if v.endswith("tta") else "off"
        scores[v] = dense_score(net, test_img, test_truth, model, len(trainer.classes), tta)
    return scores, corrections


def posthoc_scores(trainer, model, test_img, test_truth, wanted) -> tuple:
    """Test mIoU of the class-prior corrections ``wanted`` (:mod:`prior_shifts`), and the reference."""
    import torch

    from tem_ij_plugin.predict import predict_stack

    if getattr(model.net, "steps", 1) != 1:
        raise ValueError("post-hoc prior shifts need a one-step network (train.steps=1)")
    run = lambda img: predict_stack(model.net, img, model.normalization, torch.device("cpu"))  # noqa: E731
    train_probs, test_probs = run(trainer.image), run(test_img)
    by_class = labelled_posteriors(train_probs, trainer.labels.labels, trainer.train_p)
    return shift_scores(train_probs, test_probs, test_truth, by_class, trainer.training_prior(), wanted)


def refit_scores(trainer, model, test_img, test_truth, fractions, variants, control=False) -> dict:
    """Continue the selected model on every patch (``Trainer.refit``) and score it at each fraction.

    The refit runs at a constant learning rate, so one continuation to the largest fraction passes
    through every shorter one: the weight average is copied on the way. ``control`` adds the same
    continuation on the training patches alone (key ``control``): what the extra iterations give
    without the validation patches' labels.
    """
    import copy

    best_it = trainer.best["iteration"]
    selected = copy.deepcopy(trainer.best["state"])
    scores = {
        str(f): s
        for f, s in _continuation_scores(trainer, model, test_img, test_truth, fractions, variants, None).items()
    }
    if control:
        trainer.best["state"] = selected
        n = round(max(fractions) * best_it)
        scores["control"] = _continuation_scores(
            trainer, model, test_img, test_truth, fractions, variants, (trainer.train_p, n)
        )
    return scores


def _continuation_scores(trainer, model, test_img, test_truth, fractions, variants, control) -> dict:
    """Scores at each fraction of one continuation: the refit, or ``control`` = (patches, iterations)."""
    import copy

    marks = {trainer.it + round(f * trainer.best["iteration"]): f for f in fractions}
    snaps = {}

    def snapshot(ev):
        if ev["iteration"] in marks:
            snaps[marks[ev["iteration"]]] = copy.deepcopy(trainer.ema.state_dict())

    if control is None:
        trainer.tc.refit = max(fractions)
        trainer.refit(lambda: 0.0, float("inf"), snapshot)
    else:
        trainer.continue_selected(*control, lambda: 0.0, float("inf"), snapshot)
    scores = {}
    for f, state in sorted(snaps.items()):
        model.net.load_state_dict(state)
        scores[str(f)] = score_variants(trainer, model, test_img, test_truth, variants)[0]
    return scores


def run_task(
    task,
    truth,
    images,
    seed,
    minutes,
    arms,
    overrides=(),
    variants=("raw",),
    checkpoints=0,
    refits=(),
    refit_control=False,
    save_dir=None,
    rescore_dir=None,
) -> dict:
    classes = CLASSES[task]
    train_img, test_img, test_truth = images[:15], images[15:], truth[15:]
    lab = partial_labels(truth[:15], choose_patches(15, seed), seed, classes=classes)
    row = {"labelled_fraction_of_15_patches": round(float((lab.labels >= 0).sum() / (15 * 256 * 256)), 3)}
    if "rf" in arms:
        pred, *_ = rf_peer(train_img, lab.labels, test_img, seed)
        row["rf"] = {"miou": round(miou(pred, test_truth, len(classes)), 4)}
    name = f"{task}_s{seed}_partial.model"
    if "partial" in arms and rescore_dir is not None:
        row["partial"] = rescore(train_img, lab, test_img, test_truth, seed, overrides, variants, rescore_dir / name)
    elif "partial" in arms:
        row["partial"] = train_and_score(
            train_img,
            lab,
            test_img,
            test_truth,
            minutes,
            seed,
            overrides,
            variants,
            checkpoints,
            refits,
            refit_control,
            None if save_dir is None else save_dir / name,
        )
    if "dense" in arms:
        row["dense"] = train_and_score(
            train_img, dense_labels(truth[:15], classes), test_img, test_truth, minutes, seed, overrides
        )
    logging.info("%s seed %d: %s", task, seed, {k: v.get("miou") for k, v in row.items() if isinstance(v, dict)})
    return row


def _columns(by_seed: dict, arms) -> dict:
    """Column name -> test mIoU per seed; the partial arm has a column per scored variant."""
    cols = {}
    for arm in arms:
        for r in by_seed.values():
            if arm not in r:
                continue
            for v, score in (r[arm].get("variants") or {"": r[arm]["miou"]}).items():
                cols.setdefault(f"{arm}:{v}" if v else arm, []).append(score)
    return cols


def summary(results: dict, arms) -> list:
    """Table rows: per task and arm (and variant), mean and spread (min-max) of the test mIoU over seeds."""
    lines = []
    for task, by_seed in results["tasks"].items():
        cols = _columns(by_seed, arms)
        seen = [r["partial"]["best_val"] for r in by_seed.values() if "partial" in r and r["partial"]["best_val"]]
        cols["partial: val seen"] = seen
        for crit in ("labelled", "band"):
            rho = [
                r["partial"]["rank_correlation"][crit]
                for r in by_seed.values()
                if "partial" in r and r["partial"].get("rank_correlation")
            ]
            if rho:
                cols[f"rho {crit} vs test"] = rho
        if not lines:
            lines.append(f"{'task':9s} " + " ".join(f"{c:>22s}" for c in cols))
        cells = [f"{np.mean(v):.3f} [{min(v):.3f}-{max(v):.3f}]" if v else "-" for v in cols.values()]
        lines.append(f"{task:9s} " + " ".join(f"{c:>22s}" for c in cells))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--tasks", default="membrane,profiles,mito")
    ap.add_argument("--arms", default="rf,partial,dense")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of patches, annotation and training")
    ap.add_argument("--minutes", type=float, default=None, help="training budget (default: config default, 10)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    ap.add_argument(
        "--variants",
        default="raw,prior",
        help="scores of each partial training: raw, prior, prior1, tta, prior+tta; post hoc: " + ", ".join(POSTHOC),
    )
    ap.add_argument(
        "--checkpoints",
        type=int,
        default=0,
        metavar="K",
        help="follow the dense score of 3 test sections every K validations of the partial arm (0 = off)",
    )
    ap.add_argument(
        "--refit",
        default="",
        metavar="F,F",
        help="also score the partial arm refitted on every patch for these fractions of its iterations",
    )
    ap.add_argument(
        "--refit-control",
        action="store_true",
        help="with --refit: also continue on the training patches alone as long (more steps, no more labels)",
    )
    ap.add_argument("--save-models", type=Path, default=None, metavar="DIR", help="keep the partial arm's models here")
    ap.add_argument(
        "--rescore",
        type=Path,
        default=None,
        metavar="DIR",
        help="score the variants of the partial arm's models saved in DIR by --save-models (no training)",
    )
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "label_gap.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not (args.data / "images").is_dir():
        print(f"SKIP: ISBI 2012 data not found at {args.data}")
        return 0
    arms = args.arms.split(",")
    if args.rescore is not None and args.save_models is not None:
        ap.error("--rescore reads models that --save-models wrote: give one of them")
    if args.save_models is not None:
        args.save_models.mkdir(parents=True, exist_ok=True)
    images = load(args.data)[0]
    all_truths = truths(args.data, images.shape)
    variants = tuple(args.variants.split(","))
    refits = tuple(float(f) for f in args.refit.split(",") if f)
    results = {"minutes": args.minutes, "seeds": args.seeds, "overrides": args.set, "variants": variants, "tasks": {}}
    for seed in (int(s) for s in args.seeds.split(",")):
        for task in args.tasks.split(","):
            row = run_task(
                task,
                all_truths[task],
                images,
                seed,
                args.minutes,
                arms,
                args.set,
                variants,
                args.checkpoints,
                refits,
                args.refit_control,
                args.save_models,
                args.rescore,
            )
            results["tasks"].setdefault(task, {})[str(seed)] = row
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))  # after every run: a long table survives a stop
    print("\n".join(summary(results, arms)))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
