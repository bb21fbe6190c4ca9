"""Do the suggestion scores find the patches the model gets wrong? Acquisition on real ssTEM (ISBI 2012).

Per task (``membrane``, ``profiles``, ``mito`` of ``label_gap.py``) and seed, the 60 patches of
sections 0-14 are put in a random order and the simulated annotator outlines the first 2, 4 and 8 of
them (a chain of warm-started trainings, ``--iterations`` each, as ``tem-ij train --project`` rounds
do). For the model at each count, every unannotated patch of the pool is a candidate and its *true
error* is the fraction of its pixels the model gets wrong (dense truth). Per score:

* **top-5 ratio**: mean true error of the 5 best-scored candidates / the mean candidate's; beside it
  the oracle's (the 5 with the highest true error) and the issue's target ``1 + 0.6 (oracle - 1)``;
* **Spearman** rank correlation of the score with the true error over all candidates.

Scores (window aggregates of the probabilities; ``cal_`` = after temperature scaling fitted on the
labelled pixels of the model's validation patches; T = 1 without any):
``entropy`` (mean normalised entropy), ``entropy_p90`` (its 90th percentile), ``margin`` (mean of
1 - (p1 - p2)), ``expected_error`` (mean of 1 - max p: the error rate the probabilities predict),
``ambiguous`` (fraction with p1 - p2 < 0.3), ``focus`` (mean of the top 10 % of the smoothed entropy:
the broad uncertain areas that :mod:`tem_ij_plugin.focus` outlines), ``tta`` (flip disagreement),
``product`` (the score :func:`tem_ij_plugin.suggest.suggest` ranks by; its top 5 are its 5 drawn
suggestions) and, from the second count on, a committee of the chain's last two models (the previous
round's model is free in a project): ``round_change`` (mean total-variation distance between their
probabilities), ``round_flips`` (fraction of pixels whose class changed), ``round_mix_entropy`` (entropy
of their mean) and ``entropy_plus_change``; and ``learnt_error``, the mean probability of an error under
a logistic regression of per-pixel features (uncertainty, distance to a predicted boundary, image
intensity and contrast), fitted on the pixels labelled since the previous model, which never saw
them (:func:`error_model`). ``band_entropy`` is the mean entropy within 3 px of a predicted
boundary.

``--focus`` adds the focus-region experiment: from the 2-patch model the next patches (the same ones
as the chain's) are annotated *focus-first* (each polygon starts inside the patch's focus regions
while it can) instead of at random inside the patch, with the same budget per class; dense test
mIoU (sections 15-29) at 4 and 8 patches, and the labelled pixels of both arms. ``--redraw`` annotates
the same patches at random once more, from the focus arm's random stream: the difference between
two random annotations of the same patches, against which the focus arm's difference is judged.
``--spread`` adds a third arm, focus-first on *spread* focus (:func:`spread_focus`): disks around up to
8 peaks of the smoothed uncertainty at least 64 px apart, as much of the window as the focus regions
(10 %) but spread over its uncertain places instead of its few most uncertain areas.
``--uncorrected`` also scores every model with its class-prior correction taken out
(``test_miou_uncorrected``), ``--relative`` with it estimated again against the network's own mean
posterior on its labelled pixels, as the ``relative`` default does (``test_miou_relative``; the same
annotations: models trained before that default came in are rescored, not retrained). ``--shifts
rel1,bbse`` scores other class-prior corrections of the same networks after the fact
(``test_miou_<name>``, :mod:`prior_shifts`). ``--as-shipped`` scores the chain's models, candidates
and test sections, with the correction the shipped default gives them, where they were trained (and
cached) under another one.

    python benchmarks/acquisition.py --tasks membrane --seeds 0 --counts 2,4
    python benchmarks/acquisition.py --focus --json benchmarks/results/acquisition.json

Trained models are kept in ``--cache`` (reused when present), so a second run with other scores
costs only the scoring; ``--keep-probs DIR`` also keeps each model's pool probabilities (float16),
labels and candidates, so that new window scores can be tried without a network pass.
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

from isbi_partial import DATA, load  # noqa: E402
from label_gap import CLASSES, dense_score, truths  # noqa: E402
from prior_shifts import METHODS, labelled_posteriors, shift_scores  # noqa: E402

SIZE, SECTIONS = 256, 15
ARMS = ("focus", "redraw", "spread")  # the annotation arms from the 2-patch model on (--focus, --redraw, --spread)
SCORES = ("entropy", "entropy_p90", "margin", "expected_error", "ambiguous", "focus", "band_entropy")
BAND = 3  # px either side of a predicted class boundary: where the boundary errors are
OTHERS = ("uncorrected", "relative", *METHODS)  # test mIoU under other class-prior corrections


def pool_boxes() -> np.ndarray:
    """The 60 patches of sections 0-14, rows (z, y0, x0, y1, x1)."""
    from tem_ij_plugin.suggest import candidate_boxes

    return candidate_boxes((SECTIONS, 512, 512), SIZE)


def annotate(truth, boxes, classes, rng, focus_masks=None) -> list:
    """Simulated partial polygons on ``boxes`` (one rng for all, as ``isbi_partial.partial_labels``)."""
    from tem_ij_plugin.synthetic import simulate_annotations

    shapes = []
    for i, (z, y0, x0, y1, x1) in enumerate(boxes):
        focus = None if focus_masks is None else focus_masks[i]
        shapes += simulate_annotations(
            truth[z], [(y0, x0, y1, x1)], classes, rng, slice_position=int(z) + 1, focus=focus
        )
    return shapes


def train_cached(path: Path, image, shapes, classes, seed, iterations, init):
    """Train (warm start from ``init``) unless ``path`` holds the model already."""
    from tem_ij_plugin.annotations import rasterize
    from tem_ij_plugin.config import Settings
    from tem_ij_plugin.modelio import load_model, save_model
    from tem_ij_plugin.train import train

    labels = rasterize(shapes, image.shape, classes=classes)
    if path.exists():
        return load_model(path), labels
    s = Settings()
    s.train.seed, s.train.max_iterations, s.train.max_minutes = seed, iterations, 60.0
    model = train(image, labels, s, init=init, device="cpu").model
    save_model(path, model)
    return model, labels


def fit_temperature(probs, labels, patches) -> float:
    """Temperature minimising the NLL of the labelled pixels of ``patches`` (1.0 without any)."""
    logp, target = [], []
    for z, y0, x0, y1, x1 in patches:
        lab = labels[z, y0:y1, x0:x1]
        keep = lab >= 0
        logp.append(np.log(np.clip(probs[z, :, y0:y1, x0:x1][:, keep], 1e-7, 1)).T)
        target.append(lab[keep])
    if not logp:
        return 1.0
    logp, target = np.concatenate(logp).astype(np.float64), np.concatenate(target)
    best = (np.inf, 1.0)
    for t in np.exp(np.linspace(-1.5, 1.5, 61)):
        z = logp / t
        z -= z.max(1, keepdims=True)
        nll = -(z[np.arange(len(z)), target] - np.log(np.exp(z).sum(1))).mean()
        best = min(best, (nll, float(t)))
    return best[1]


def tempered(p: np.ndarray, t: float) -> np.ndarray:
    """Probabilities (C, ...) with logits divided by ``t``."""
    z = np.log(np.clip(p, 1e-7, 1)) / t
    z -= z.max(0, keepdims=True)
    e = np.exp(z)
    return e / e.sum(0, keepdims=True)


def entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-7, 1))).sum(0) / np.log(p.shape[0])


def window_stats(p: np.ndarray) -> dict:
    """The window aggregates of one window's probabilities (C, H, W)."""
    from scipy import ndimage as ndi

    ent = entropy(p)
    top = np.sort(p, 0)
    gap = top[-1] - top[-2]
    smooth = ndi.gaussian_filter(ent.astype(np.float32), 4.0).ravel()
    band = ndi.binary_dilation(class_edges(p.argmax(0)), iterations=BAND)
    return {
        "entropy": float(ent.mean()),
        "entropy_p90": float(np.quantile(ent, 0.9)),
        "margin": float((1 - gap).mean()),
        "expected_error": float((1 - top[-1]).mean()),
        "ambiguous": float((gap < 0.3).mean()),
        "focus": float(np.sort(smooth)[-len(smooth) // 10 :].mean()),
        "band_entropy": float(ent[band].mean()) if band.any() else 0.0,
    }


def class_edges(pred: np.ndarray) -> np.ndarray:
    """Pixels of a class map (H, W) with a 4-neighbour of another class."""
    from skimage.segmentation import find_boundaries

    return find_boundaries(pred, connectivity=1, mode="thick")


def acquisition_metrics(scores: np.ndarray, errors: np.ndarray, top: np.ndarray | None = None) -> dict:
    """Top-5 ratio (``top``: the indices to use instead of the 5 best scores) and Spearman rho."""
    from scipy.stats import spearmanr

    top = np.argsort(-scores, kind="stable")[:5] if top is None else top
    rho = spearmanr(scores, errors).statistic
    return {"top5_ratio": round(float(errors[top].mean() / errors.mean()), 3), "spearman": round(float(rho), 3)}


def committee_stats(p: np.ndarray, q: np.ndarray) -> dict:
    """How one window's probabilities ``p`` (C, H, W) differ from the previous round's ``q``."""
    change = 0.5 * np.abs(p - q).sum(0).mean()
    return {
        "round_change": float(change),
        "round_flips": float((p.argmax(0) != q.argmax(0)).mean()),
        "round_mix_entropy": float(entropy(0.5 * (p + q)).mean()),
        "entropy_plus_change": float(entropy(p).mean() + change),
    }


def pixel_features(p: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Features (F, H, W) of each pixel of a plane: from its probabilities (C, H, W) and its image.

    Entropy, top-two margin, entropy smoothed at 4 and 16 px, distance to the nearest predicted class
    boundary (up to 32 px), the standardised image, its local mean and contrast (8 px) and the
    predicted class: what :func:`error_model` may learn the model's errors from.
    """
    from scipy import ndimage as ndi

    ent = entropy(p)
    top = np.sort(p, 0)
    pred = p.argmax(0)
    to_edge = np.minimum(ndi.distance_transform_edt(~class_edges(pred)), 32) / 32
    im = (image - image.mean()) / (image.std() + 1e-6)
    local = ndi.gaussian_filter(im, 8)
    contrast = np.sqrt(np.maximum(ndi.gaussian_filter(im * im, 8) - local * local, 0))
    smooth = [ndi.gaussian_filter(ent, sigma) for sigma in (4, 16)]
    onehot = [pred == c for c in range(p.shape[0])]
    return np.stack([ent, top[-1] - top[-2], *smooth, to_edge, im, local, contrast, *onehot]).astype(np.float32)


def error_model(previous: np.ndarray, labels: np.ndarray, previous_labels: np.ndarray, images: np.ndarray):
    """P(wrong | :func:`pixel_features`), learnt where the previous model met pixels it never trained on.

    The pixels labelled since the previous model (in ``labels``, not in ``previous_labels``) were
    held out from it; whether its ``previous`` probabilities (Z, C, H, W) got them wrong trains a
    logistic regression. None when it got them all right or all wrong.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    new = (labels >= 0) & (previous_labels < 0)
    x, wrong = [], []
    for z in np.unique(np.nonzero(new)[0]):
        x.append(pixel_features(previous[z], images[z].astype(np.float32))[:, new[z]].T)
        wrong.append(previous[z].argmax(0)[new[z]] != labels[z][new[z]])
    if not x:
        return None
    x, wrong = np.concatenate(x), np.concatenate(wrong)
    if wrong.all() or not wrong.any():
        return None
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, wrong)


def learnt_error(fitted, probs: np.ndarray, images: np.ndarray, cand: np.ndarray) -> list:
    """Each candidate's mean P(wrong) under the :func:`error_model` ``fitted``."""
    features, out = {}, []
    for z, y0, x0, y1, x1 in cand:
        if z not in features:
            features[z] = pixel_features(probs[z], images[z].astype(np.float32))
        window = features[z][:, y0:y1, x0:x1]
        out.append(float(fitted.predict_proba(window.reshape(len(window), -1).T)[:, 1].mean()))
    return out


def score_model(model, labels, images, truth, boxes, cand, seed, tta=True, previous=None, previous_labels=None):
    """Every score's top-5 ratio and Spearman rho for one model, with the oracle's ratio.

    ``previous``: the pool's probabilities from the chain's previous model (adds the committee scores),
    ``previous_labels`` the labels it was trained on (adds ``learnt_error``, :func:`error_model`).
    Returns the row and the pool's probabilities.
    """
    import torch

    from tem_ij_plugin.normalization import sampled_range
    from tem_ij_plugin.predict import predict_stack
    from tem_ij_plugin.receptive import fold_batchnorm
    from tem_ij_plugin.suggest import _window_disagreement, suggest

    pool_img = images[:SECTIONS]
    probs = predict_stack(model.net, pool_img, model.normalization, torch.device("cpu"))
    pred = probs.argmax(1)
    errors = np.array([(pred[z, y0:y1, x0:x1] != truth[z, y0:y1, x0:x1]).mean() for z, y0, x0, y1, x1 in cand])
    t = fit_temperature(probs, labels.labels, model.last_round["val_patches"])
    rows = {name: [] for name in SCORES}
    rows.update({f"cal_{name}": [] for name in SCORES})
    for z, y0, x0, y1, x1 in cand:
        p = probs[z, :, y0:y1, x0:x1]
        for name, v in window_stats(p).items():
            rows[name].append(v)
        for name, v in window_stats(tempered(p, t)).items():
            rows[f"cal_{name}"].append(v)
        if previous is not None:
            for name, v in committee_stats(p, previous[z, :, y0:y1, x0:x1]).items():
                rows.setdefault(name, []).append(v)
    fitted = None if previous_labels is None else error_model(previous, labels.labels, previous_labels, pool_img)
    if fitted is not None:
        rows["learnt_error"] = learnt_error(fitted, probs, pool_img, cand)
    net = fold_batchnorm(model.net).float()
    lo_hi = sampled_range(lambda i: pool_img[i], SECTIONS, model.normalization)
    if tta:  # three network passes per candidate: the most expensive score
        rows["tta"] = [_window_disagreement(net, pool_img, box, lo_hi, torch.device("cpu"))[0] for box in cand]
    out = {name: acquisition_metrics(np.asarray(v), errors) for name, v in rows.items()}
    res = suggest(pool_img, labels.labels, model, k=5, seed=seed, device="cpu", probabilities=probs.__getitem__,
                  candidates=cand)  # fmt: skip
    index = {tuple(map(int, b)): i for i, b in enumerate(cand)}
    product = np.zeros(len(cand))
    for c in res.candidates:
        product[index[c.box()]] = c.score
    drawn = np.array([index[c.box()] for c in res.suggestions])
    out["product"] = acquisition_metrics(product, errors, drawn)
    oracle = np.sort(errors)[-5:].mean() / errors.mean()
    # Every candidate's numbers, so that other combinations can be evaluated without retraining.
    raw = {name: np.round(np.asarray(v, float), 5).tolist() for name, v in rows.items()}
    raw["product"] = np.round(product, 6).tolist()
    for term in ("typicality", "novelty", "uncertainty", "disagreement"):
        values = np.zeros(len(cand))
        for c in res.candidates:
            values[index[c.box()]] = c.reasons.get(term) or 0.0
        raw[term] = values.tolist()
    row = {"temperature": round(t, 3), "oracle_ratio": round(float(oracle), 3),
           "mean_error": round(float(errors.mean()), 4), "scores": out,
           "candidates": {"errors": np.round(errors, 5).tolist(), **raw}}  # fmt: skip
    return row, probs


def spread_focus(uncertainty, points=8, radius=16, spacing=64, sigma=4.0, relative=0.5, floor=0.05):
    """Disks of ``radius`` px around up to ``points`` peaks of the smoothed ``uncertainty`` (bool mask).

    Peaks are taken greedily, each at least ``spacing`` px from those before (non-maximum
    suppression), and only while they reach ``relative`` of the window's peak and ``floor``, as
    :func:`tem_ij_plugin.focus.focus_mask` does.
    """
    from tem_ij_plugin.focus import smoothed

    u = smoothed(uncertainty, sigma)
    limit = max(relative * float(u.max()), floor)
    yy, xx = np.indices(u.shape)
    free, mask = np.ones(u.shape, bool), np.zeros(u.shape, bool)
    for _ in range(points):
        y, x = np.unravel_index(np.argmax(np.where(free, u, -np.inf)), u.shape)
        if not free[y, x] or u[y, x] < limit:
            break
        d2 = (yy - y) ** 2 + (xx - x) ** 2
        mask |= d2 <= radius**2
        free &= d2 > spacing**2
    return mask


def focus_masks(model, labels, images, boxes, spread=False) -> list:
    """The union of each box's focus regions (calibrated entropy of ``model``) as plane masks.

    With ``spread``, :func:`spread_focus` of each box instead.
    """
    import torch
    from skimage.draw import polygon2mask

    from tem_ij_plugin.focus import focus_regions
    from tem_ij_plugin.predict import predict_stack

    probs = predict_stack(model.net, images[:SECTIONS], model.normalization, torch.device("cpu"))
    t = fit_temperature(probs, labels.labels, model.last_round["val_patches"])
    masks = []
    for z, y0, x0, y1, x1 in boxes:
        mask = np.zeros(images.shape[1:], bool)
        u = entropy(tempered(probs[z, :, y0:y1, x0:x1], t))
        if spread:
            mask[y0:y1, x0:x1] = spread_focus(u)
        else:
            for r in focus_regions(u, origin=(y0, x0)):
                mask |= polygon2mask(mask.shape, r.polygon[:, ::-1] + 0.5)  # corners -> centres, (y, x)
        masks.append(mask)
    return masks


def test_scores(model, labels, images, truth, n_classes, seed, args) -> dict:
    """Dense test mIoU (sections 15-29); also with the class-prior correction taken out (``--uncorrected``)
    and estimated again against the network's own reference (``--relative``)."""
    from tem_ij_plugin.priors import without_correction

    test_img, test_truth = images[SECTIONS:], truth[SECTIONS:]
    out = {"test_miou": dense_score(model.net, test_img, test_truth, model, n_classes)}
    correction = (model.last_round or {}).get("prior_correction")
    if args.uncorrected and correction:
        net = without_correction(model.net, correction)
        out["test_miou_uncorrected"] = dense_score(net, test_img, test_truth, model, n_classes)
    if args.relative and correction:
        net, _ = relative_corrected(model, correction, labels, images[:SECTIONS], seed)
        out["test_miou_relative"] = dense_score(net, test_img, test_truth, model, n_classes)
    if args.shifts and correction:
        out.update(shifted_scores(model, correction, labels, images[:SECTIONS], test_img, test_truth, args.shifts))
    return out


def shifted_scores(model, correction, labels, train_img, test_img, test_truth, wanted) -> dict:
    """Test mIoU of ``model``'s raw network under each class-prior correction of ``wanted`` (post hoc)."""
    import torch

    from tem_ij_plugin.patches import Patch
    from tem_ij_plugin.predict import predict_stack
    from tem_ij_plugin.priors import without_correction

    net = without_correction(model.net, correction)
    run = lambda img: predict_stack(net, img, model.normalization, torch.device("cpu"))  # noqa: E731
    train_probs, test_probs = run(train_img), run(test_img)
    patches = [Patch(*p) for p in model.last_round["train_patches"]]
    by_class = labelled_posteriors(train_probs, labels.labels, patches)
    scores, _ = shift_scores(train_probs, test_probs, test_truth, by_class, correction["train_prior"], wanted)
    return {f"test_miou_{name}": v for name, v in scores.items()}


def relative_corrected(model, correction, labels, train_img, seed):
    """``model``'s network with its class-prior correction estimated again as ``relative`` does (same labels),
    and the correction's record."""
    import torch

    from tem_ij_plugin.normalization import normalization_range, normalize
    from tem_ij_plugin.patches import Patch
    from tem_ij_plugin.priors import estimate_relative_correction, shift_output_bias, without_correction

    net = without_correction(model.net, correction)
    lo, hi = normalization_range(train_img)
    patches = [Patch(*p) for p in model.last_round["train_patches"]]
    rec = estimate_relative_correction(
        net,
        train_img,
        lambda a: normalize(a, lo, hi),
        labels.labels,
        patches,
        correction["train_prior"],
        torch.device("cpu"),
        seed=seed,
    )
    shift_output_bias(net, rec["logit_shift"])
    return net, rec


def as_shipped(model, labels, train_img, seed):
    """``model`` corrected as the shipped default (``relative``) does, network and record (a copy), if it
    was trained under another class-prior correction; else ``model`` itself."""
    import copy

    from tem_ij_plugin.modelio import TrainedModel

    correction = (model.last_round or {}).get("prior_correction")
    if not correction or correction.get("method") == "relative":
        return model
    net, rec = relative_corrected(model, correction, labels, train_img, seed)
    meta = copy.deepcopy(model.meta)
    meta["history"]["rounds"][-1]["prior_correction"] = {"method": "relative", **rec}
    return TrainedModel(net, meta)


def run(task, truth, images, seed, args) -> dict:
    classes = CLASSES[task]
    boxes = pool_boxes()
    order = np.random.default_rng(seed).permutation(len(boxes))
    n_max = max(args.counts)
    shapes_by_patch = []
    rng = np.random.default_rng(seed)
    for i in order[:n_max]:  # one annotation per patch, so that every count sees the same outlines
        shapes_by_patch.append(annotate(truth, boxes[[i]], classes, rng))
    out, model, models, probs, seen = {"counts": {}}, None, {}, None, None
    for k in sorted(args.counts):
        shapes = [s for group in shapes_by_patch[:k] for s in group]
        path = args.cache / f"{task}-s{seed}-k{k}-it{args.iterations}.model"
        model, labels = train_cached(path, images[:SECTIONS], shapes, classes, seed, args.iterations, model)
        models[k] = (model, labels, shapes)
        scored = as_shipped(model, labels, images[:SECTIONS], seed) if args.as_shipped else model
        row, probs = score_model(
            scored, labels, images, truth, boxes, boxes[order[k:]], seed, not args.no_tta, probs, seen
        )
        seen = labels.labels
        row.update(test_scores(scored, labels, images, truth, len(classes), seed, args))
        row["labelled_px"] = int((labels.labels >= 0).sum())
        out["counts"][str(k)] = row
        log_row(task, seed, k, row)
        if args.keep_probs:  # for scores not thought of yet, without retraining or predicting again
            args.keep_probs.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(
                args.keep_probs / f"{task}-s{seed}-k{k}.npz",
                probs=probs.astype(np.float16),
                labels=labels.labels,
                candidates=boxes[order[k:]],
            )
    for arm in ARMS:
        if getattr(args, arm) and {2, 4, 8} <= set(args.counts):
            out[arm] = focus_arm(task, truth, images, seed, args, boxes, order, models, arm)
    return out


def focus_arm(task, truth, images, seed, args, boxes, order, models, arm="focus") -> dict:
    """Focus-first annotation of the chain's patches 3-4 and 5-8, from the 2-patch model on.

    ``arm`` is one of :data:`ARMS`: ``focus`` (the focus regions), ``spread`` (:func:`spread_focus`) or
    ``redraw``, the same patches annotated at random again from the focus arm's random stream: how far
    two random annotations of the same patches differ.
    """
    classes = CLASSES[task]
    model, labels, shapes = models[2]
    rng = np.random.default_rng(seed + 1000)
    out = {}
    for lo, hi in ((2, 4), (4, 8)):
        new_boxes = boxes[order[lo:hi]]
        masks = None if arm == "redraw" else focus_masks(model, labels, images, new_boxes, spread=arm == "spread")
        shapes = shapes + annotate(truth, new_boxes, classes, rng, masks)
        path = args.cache / f"{task}-s{seed}-k{hi}-it{args.iterations}-{arm}.model"
        model, labels = train_cached(path, images[:SECTIONS], shapes, classes, seed, args.iterations, model)
        out[str(hi)] = test_scores(model, labels, images, truth, len(classes), seed, args)
        out[str(hi)]["labelled_px"] = int((labels.labels >= 0).sum())
        logging.info("%s seed %d: %d patches, %s: mIoU %.4f", task, seed, hi, arm, out[str(hi)]["test_miou"])
    return out


def log_row(task, seed, k, row) -> None:
    best = max(row["scores"].items(), key=lambda kv: kv[1]["top5_ratio"])
    logging.info(
        "%s seed %d, %d patches: test mIoU %.4f, T %.2f, oracle %.2f, product %.2f (rho %.2f), best %s %.2f",
        task, seed, k, row["test_miou"], row["temperature"], row["oracle_ratio"],
        row["scores"]["product"]["top5_ratio"], row["scores"]["product"]["spearman"], best[0],
        best[1]["top5_ratio"],
    )  # fmt: skip


def _mean(values) -> float:
    return float(np.mean(list(values)))


def summary(results: dict, counts) -> dict:
    """Mean over seeds per task and count: every score's ratio and rho, the oracle's ratio, the target."""
    out = {}
    for task, by_seed in results.items():
        for k in map(str, counts):
            rows = [r["counts"][k] for r in by_seed.values() if k in r["counts"]]
            if not rows:
                continue
            oracle = _mean(r["oracle_ratio"] for r in rows)
            entry = {"oracle_ratio": round(oracle, 3), "target_ratio": round(1 + 0.6 * (oracle - 1), 3), "scores": {}}
            for name in dict.fromkeys(n for r in rows for n in r["scores"]):
                metrics = ("top5_ratio", "spearman")
                have = [r for r in rows if name in r["scores"]]  # tta may be left out (--no-tta)
                entry["scores"][name] = {m: round(_mean(r["scores"][name][m] for r in have), 3) for m in metrics}
                entry["scores"][name]["seeds"] = len(have)
            for key in ("test_miou", *(f"test_miou_{o}" for o in OTHERS)):
                if all(key in r for r in rows):
                    entry[key] = round(_mean(r[key] for r in rows), 4)
            out.setdefault(task, {})[k] = entry
        for arm in ARMS:
            with_arm = [r for r in by_seed.values() if arm in r]
            if with_arm:
                out[task][arm] = {k: _arm_means(with_arm, arm, k) for k in ("4", "8")}
    return out


def _arm_means(results: list, arm: str, k: str) -> dict:
    """Mean test mIoU of ``arm`` and of the random chain at ``k`` patches (and with other prior corrections)."""
    out = {"seeds": len(results)}
    for suffix in ("", *(f"_{o}" for o in OTHERS)):
        key = "test_miou" + suffix
        if all(key in r[arm][k] and key in r["counts"][k] for r in results):
            out[f"{arm}_miou{suffix}"] = round(_mean(r[arm][k][key] for r in results), 4)
            out[f"random_miou{suffix}"] = round(_mean(r["counts"][k][key] for r in results), 4)
    return out


def print_table(summ: dict) -> None:
    for task, by_k in summ.items():
        for k, e in by_k.items():
            if k in ARMS:
                for n, f in e.items():
                    line = f"{task} at {n} patches: {k} {f[k + '_miou']:.4f}, random {f['random_miou']:.4f}"
                    for other in OTHERS:
                        if f"{k}_miou_{other}" in f:
                            line += f" ({other}: {f[f'{k}_miou_{other}']:.4f}, {f[f'random_miou_{other}']:.4f})"
                    print(line)
                continue
            others = "".join(f", {o} {e[f'test_miou_{o}']:.4f}" for o in OTHERS if f"test_miou_{o}" in e)
            print(
                f"{task}, {k} patches: test mIoU {e['test_miou']:.4f}{others}; "
                f"oracle {e['oracle_ratio']:.2f}, target {e['target_ratio']:.2f}"
            )
            for name, m in sorted(e["scores"].items(), key=lambda kv: -kv[1]["top5_ratio"]):
                print(f"    {name:20s} top-5 ratio {m['top5_ratio']:5.2f}  rho {m['spearman']:+.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--tasks", default="membrane,profiles,mito")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--counts", default="2,4,8")
    ap.add_argument("--iterations", type=int, default=200, help="training iterations per round")
    ap.add_argument("--focus", action="store_true", help="also run the focus-first annotator")
    ap.add_argument("--redraw", action="store_true", help="also annotate the focus arm's patches at random again")
    ap.add_argument("--spread", action="store_true", help="also run the focus-first annotator on spread focus")
    ap.add_argument("--uncorrected", action="store_true", help="also score every model without its prior correction")
    ap.add_argument(
        "--relative",
        action="store_true",
        help="also score every model with its prior correction estimated again as 'relative' (the default) does",
    )
    ap.add_argument(
        "--shifts",
        default="",
        metavar="A,B",
        help="also score these class-prior corrections after the fact: " + ", ".join(METHODS),
    )
    ap.add_argument(
        "--as-shipped",
        action="store_true",
        help="score the chain's models (candidates and test) with the class-prior correction the default "
        "('relative') gives them, where they were trained under another one",
    )
    ap.add_argument("--no-tta", action="store_true", help="leave out the flip-disagreement score (the slowest)")
    ap.add_argument("--append", action="store_true", help="add to the results already in --json (same args)")
    ap.add_argument("--report", type=Path, nargs="+", help="print the summary of these result files together")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/tem-ij-acquisition"))
    ap.add_argument("--keep-probs", type=Path, help="keep each model's pool probabilities, labels and candidates here")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "acquisition.json")
    args = ap.parse_args(argv)
    args.counts = [int(c) for c in args.counts.split(",")]
    args.shifts = [m for m in args.shifts.split(",") if m]
    if set(args.shifts) - set(METHODS):
        ap.error(f"--shifts: choose from {', '.join(METHODS)}")
    if args.report:
        merged: dict = {}
        for path in args.report:  # seeds of one task from several runs side by side
            for task, by_seed in json.loads(path.read_text())["tasks"].items():
                merged.setdefault(task, {}).update(by_seed)
        print_table(summary(merged, args.counts))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tem_ij_plugin.train").setLevel(logging.WARNING)
    if not (args.data / "images").is_dir():
        print(f"SKIP: ISBI 2012 data not found at {args.data}")
        return 0
    args.cache.mkdir(parents=True, exist_ok=True)
    images = load(args.data)[0]
    all_truths = truths(args.data, images.shape)
    results, t0 = {}, time.perf_counter()
    if args.append and args.json.is_file():
        results = json.loads(args.json.read_text())["tasks"]
    for seed in (int(s) for s in args.seeds.split(",")):
        for task in args.tasks.split(","):
            results.setdefault(task, {})[str(seed)] = run(task, all_truths[task], images, seed, args)
            report = {
                "args": {k: str(v) for k, v in vars(args).items()},
                "minutes": round((time.perf_counter() - t0) / 60, 1),
                "summary": summary(results, args.counts),
                "tasks": results,
            }
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1))
    print_table(summary(results, args.counts))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
