"""Training from partial labels: sampling, augmentation, validation, early stopping, backtracking.

The loop keeps an exponential moving average (EMA) of the weights and validates that average on
whole held-out patches. The validation score is smoothed again over time; when it stops improving for
``patience`` validations the trainer *backtracks*: it reloads the best weights, resets the optimiser
and lowers the learning rate, at most ``backtracks`` times, then stops. A wall-clock budget and an
iteration cap always apply, and a cancel event stops it at the next step. The model returned is
always the best one seen.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from .annotations import UNLABELLED, Labels
from .augment import Augmenter
from .config import Settings
from .errors import UserError
from .losses import class_weights, deep_supervision_loss
from .modelio import TrainedModel, build_network, software_versions
from .patches import Patch, annotated_patches, split
from .predict import (
    DEFAULT_NORMALIZATION,
    HALO_MASS,
    autocast_context,
    effective_receptive_field,
    fold_batchnorm,
    normalization_range,
    normalize,
    predict_plane,
)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    model : TrainedModel
        The best model seen, with its training round appended to ``meta["history"]``. Its weights are
        always finite.
    stop_reason : str
        ``early stopping``, ``time budget``, ``max iterations``, ``cancelled`` or ``non-finite loss``.
    train_patches, val_patches : list of Patch
    problem : str or None
        Set when training had to stop because the loss (or the averaged weights) became NaN/infinite:
        a message for the user. ``model`` is then the best finite model validated before that; the
        caller should save it and still report the failure (the CLI exits with status 2).
    """

    model: TrainedModel
    stop_reason: str
    train_patches: list
    val_patches: list
    problem: str | None = None


NON_FINITE = "non-finite loss"


def _expanded_box(p: Patch, context: int, shape, avoid: list) -> tuple:
    """The patch grown by ``context`` (clipped to the image), shrunk until it overlaps no patch in ``avoid``."""
    _, h, w = shape
    y0, x0 = max(0, p.y0 - context), max(0, p.x0 - context)
    y1, x1 = min(h, p.y1 + context), min(w, p.x1 + context)
    for v in avoid:
        if not v.overlaps(p.z, y0, x0, y1, x1):
            continue
        # Cut the side that loses least; cutting back to the patch's own edge always clears v.
        options = []
        if v.y1 <= p.y0:
            options.append(((p.y0 - max(y0, v.y1)) * (x1 - x0), "y0", max(y0, v.y1)))
        if v.y0 >= p.y1:
            options.append(((min(y1, v.y0) - p.y1) * (x1 - x0), "y1", min(y1, v.y0)))
        if v.x1 <= p.x0:
            options.append(((p.x0 - max(x0, v.x1)) * (y1 - y0), "x0", max(x0, v.x1)))
        if v.x0 >= p.x1:
            options.append(((min(x1, v.x0) - p.x1) * (y1 - y0), "x1", min(x1, v.x0)))
        _, side, value = max(options)
        y0, x0, y1, x1 = {
            "y0": (value, x0, y1, x1),
            "y1": (y0, x0, value, x1),
            "x0": (y0, value, y1, x1),
            "x1": (y0, x0, y1, value),
        }[side]
    return y0, x0, y1, x1


class _Sampler:
    """Draws training crops around the training patches, never touching validation patches."""

    def __init__(self, image, norm, labels, train, val, context, src_size, device, seed):
        self.src = src_size
        half = src_size // 2 + 1
        self.regions = []
        for p in train:
            y0, x0, y1, x1 = _expanded_box(p, context, image.shape, val)
            img = np.pad(norm(image[p.z, y0:y1, x0:x1]), half, mode="reflect")
            lab = np.pad(labels[p.z, y0:y1, x0:x1], half, mode="reflect")
            # Centres: anywhere in the box, or (more often) on a labelled pixel of the patch itself.
            ly, lx = np.nonzero(labels[p.z, p.y0 : p.y1, p.x0 : p.x1] != UNLABELLED)
            pts = np.stack([ly + p.y0 - y0 + half, lx + p.x0 - x0 + half], axis=1)
            self.regions.append(
                {
                    "img": torch.from_numpy(np.ascontiguousarray(img)).to(device),
                    "lab": torch.from_numpy(np.ascontiguousarray(lab).astype(np.int64)).to(device),
                    "pts": pts,
                    "box": (half, half, half + y1 - y0, half + x1 - x0),
                }
            )
        self.rng = np.random.default_rng(seed)

    def batch(self, n: int):
        imgs, labs = [], []
        r = self.src // 2
        for _ in range(n):
            reg = self.regions[self.rng.integers(len(self.regions))]
            if self.rng.random() < 0.7 and len(reg["pts"]):
                cy, cx = reg["pts"][self.rng.integers(len(reg["pts"]))]
            else:
                by0, bx0, by1, bx1 = reg["box"]
                cy, cx = self.rng.integers(by0, by1), self.rng.integers(bx0, bx1)
            ys, xs = slice(cy - r, cy - r + self.src), slice(cx - r, cx - r + self.src)
            imgs.append(reg["img"][ys, xs])
            labs.append(reg["lab"][ys, xs])
        return torch.stack(imgs)[:, None], torch.stack(labs)


class _Validator:
    """Mean IoU over classes on the labelled pixels of the validation patches."""

    def __init__(self, image, norm, labels, val, context, n_classes):
        self.items = []
        self.n_classes = n_classes
        _, h, w = image.shape
        for p in val:
            y0, x0 = max(0, p.y0 - context), max(0, p.x0 - context)
            y1, x1 = min(h, p.y1 + context), min(w, p.x1 + context)
            lab = labels[p.z, p.y0 : p.y1, p.x0 : p.x1]
            keep = lab != UNLABELLED
            region = norm(image[p.z, y0:y1, x0:x1])
            self.items.append((region, (p.y0 - y0, p.x0 - x0), keep, lab[keep].astype(np.int64)))

    def __call__(self, net, device, precision) -> float:
        conf = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)
        for img, (oy, ox), keep, truth in self.items:
            probs = predict_plane(net, img, device, precision)
            pred = probs[:, oy : oy + keep.shape[0], ox : ox + keep.shape[1]].argmax(0)[keep]
            conf += np.bincount(truth * self.n_classes + pred, minlength=self.n_classes**2).reshape(conf.shape)
        return mean_iou(conf)


def mean_iou(conf: np.ndarray) -> float:
    """Mean IoU over the classes that occur in truth or prediction of a confusion matrix (truth x pred)."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else 0.0


def _state(net) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _all_finite(net) -> bool:
    """Whether every floating-point weight and buffer of ``net`` is finite."""
    return all(bool(torch.isfinite(v).all()) for v in net.state_dict().values() if v.is_floating_point())


def train(
    image: np.ndarray,
    labels: Labels,
    settings: Settings | None = None,
    init: TrainedModel | None = None,
    device: str = "auto",
    progress=None,
    cancel=None,
    calibration: dict | None = None,
) -> TrainResult:
    """Train a recurrent U-Net on partial labels.

    Parameters
    ----------
    image : ndarray, shape (Z, Y, X)
        The raw image (any numeric dtype); it is normalised by percentiles, never modified.
    labels : Labels
        Partial labels of the same shape (-1 = unlabelled).
    settings : Settings, optional
        Defaults when omitted.
    init : TrainedModel, optional
        Warm start: its architecture and weights are used and its history continued. Its classes
        must equal ``labels.classes``.
    device : str
        ``auto``, ``cpu``, ``cuda[:N]`` or ``mps``.
    progress : callable, optional
        Called with a dict after every iteration (keys: stage, iteration, max_iterations, elapsed_s,
        max_seconds, train_loss, val_score, validated (a validation ran at this iteration), smoothed_score,
        best_score, best_iteration, backtracks, lr).
    cancel : threading.Event, optional
        When set, training stops after the current step and the best model so far is returned.
    calibration : dict, optional
        Pixel size of the training image, stored in the model file.

    Returns
    -------
    TrainResult
        When the loss becomes NaN/infinite, training stops at once (no step is taken with it) and
        the result holds the best finite model validated so far, with ``stop_reason`` ``non-finite
        loss`` and :attr:`TrainResult.problem` set.

    Raises
    ------
    UserError
        Bad inputs, or a non-finite loss before any finite model was validated (nothing to keep).
    """
    from .predict import resolve_device

    s = settings or Settings()
    tc = s.train
    dev = resolve_device(device)
    if image.shape != labels.labels.shape:
        raise UserError(f"labels of shape {labels.labels.shape} do not match the image {image.shape}")
    classes = labels.classes
    n_classes = len(classes)
    if init is not None and init.classes != classes:
        raise UserError(
            f"the starting model has classes {', '.join(init.classes)} but the annotations have "
            f"{', '.join(classes)}; annotate the same classes or train a new model without --init"
        )
    patches = annotated_patches(labels.labels, s.patches.size)
    train_p, val_p = split(labels.labels, patches, tc.validation_patches, tc.seed, n_classes)
    log.info("%d annotated patch(es): %d for training, %d for validation", len(patches), len(train_p), len(val_p))

    torch.manual_seed(tc.seed)
    if init is not None:
        arch = dict(init.meta["architecture"])
        net = build_network(arch)
        net.load_state_dict(init.net.state_dict())
    else:
        arch = {"name": "RecurrentUNet", "in_channels": 1, "n_classes": n_classes, **s.model.model_dump()}
        net = build_network(arch)
    net.to(dev).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)

    lo, hi = normalization_range(image)

    # Only the regions around annotated patches are normalised: a large stack is never copied whole.
    def norm(a):
        return normalize(a, lo, hi)

    augmenter = Augmenter(tc.crop_size, **s.augment.model_dump())
    src = augmenter.input_size()
    sampler = _Sampler(image, norm, labels.labels, train_p, val_p, tc.context, src, dev, tc.seed)
    validator = _Validator(image, norm, labels.labels, val_p, tc.context, n_classes) if val_p else None
    counts = np.bincount(
        np.concatenate([labels.labels[p.z, p.y0 : p.y1, p.x0 : p.x1].ravel() for p in train_p]) + 1,
        minlength=n_classes + 1,
    )[1:]
    weight = class_weights(counts, tc.class_balance).to(dev)
    gen = torch.Generator(device=dev).manual_seed(tc.seed)

    lr = tc.learning_rate
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=tc.weight_decay)

    curves = {"iteration": [], "train_loss": [], "val_iteration": [], "val_score": [], "smoothed_score": []}
    best = {"score": -np.inf, "iteration": 0, "state": None}  # set by evaluate() or after the loop
    # The latest finite weight average seen at a validation during warm-up: what a non-finite loss
    # during warm-up can still fall back to.
    fallback = {"score": None, "iteration": 0, "state": None}
    problem = None
    smoothed = None
    bad = 0
    backtracks = 0
    loss_ema = None
    last_val = None
    max_seconds = tc.max_minutes * 60.0
    start = time.perf_counter()
    stop_reason = "max iterations"
    it = 0

    def evaluate() -> bool:
        """Validate the weight average; False (and nothing recorded) when its weights are not finite."""
        nonlocal smoothed, bad, last_val
        if not _all_finite(ema):
            return False
        if validator is not None:
            score = validator(ema, dev, tc.precision)
        else:
            score = -float(loss_ema if loss_ema is not None else np.inf)
        last_val = score
        smoothed = score if smoothed is None else tc.smoothing * smoothed + (1 - tc.smoothing) * score
        curves["val_iteration"].append(it)
        curves["val_score"].append(round(score, 5))
        curves["smoothed_score"].append(round(smoothed, 5))
        if it < tc.min_iterations:
            # An early, barely trained score must not become the best to backtrack to.
            fallback.update(score=smoothed, iteration=it, state=_state(ema))
            return True
        if smoothed > best["score"] + 1e-4:
            best.update(score=smoothed, iteration=it, state=_state(ema))
            bad = 0
        else:
            bad += 1
        return True

    net.train()
    while True:
        if cancel is not None and cancel.is_set():
            stop_reason = "cancelled"
            break
        if time.perf_counter() - start > max_seconds:
            stop_reason = "time budget"
            break
        if it >= tc.max_iterations:
            stop_reason = "max iterations"
            break
        x, y = sampler.batch(tc.batch_size)
        with torch.no_grad():
            x, y = augmenter(x, y, gen)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(dev, tc.precision):
            outs = net(x, all_steps=True)
        loss = deep_supervision_loss(outs, y, weight, tc.step_decay, tc.dice_weight)
        lv = float(loss.detach())
        if not np.isfinite(lv):
            # Stop before this loss touches the weights: nothing non-finite ever reaches a saved model.
            problem = f"the training loss became non-finite ({lv}) at iteration {it + 1}"
            stop_reason = NON_FINITE
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        # Warm up the weight average quickly, then let it average over ~1/(1-decay) steps.
        d = min(tc.ema_decay, (1 + it) / (10 + it))
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1 - d)
            # BatchNorm statistics are averaged like the weights they belong to.
            for be, bn in zip(ema.buffers(), net.buffers()):
                if be.is_floating_point():
                    be.lerp_(bn, 1 - d)
                else:
                    be.copy_(bn)
        loss_ema = lv if loss_ema is None else 0.95 * loss_ema + 0.05 * lv
        curves["iteration"].append(it)
        curves["train_loss"].append(round(lv, 5))
        if it % tc.eval_every == 0:
            if not evaluate():
                problem = f"the averaged weights became non-finite (NaN or infinite) by iteration {it}"
                stop_reason = NON_FINITE
                break
            if bad >= tc.patience and it >= tc.min_iterations:
                if backtracks >= tc.backtracks:
                    stop_reason = "early stopping"
                    break
                backtracks += 1
                lr *= tc.backtrack_lr_factor
                net.load_state_dict(best["state"])
                ema.load_state_dict(best["state"])
                opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=tc.weight_decay)
                bad = 0
                log.info(
                    "backtrack %d at iteration %d: best from iteration %d, learning rate %.2g",
                    backtracks,
                    it,
                    best["iteration"],
                    lr,
                )
        if progress is not None:
            progress(
                {
                    "stage": "train",
                    "iteration": it,
                    "max_iterations": tc.max_iterations,
                    "elapsed_s": time.perf_counter() - start,
                    "max_seconds": max_seconds,
                    "train_loss": loss_ema,
                    "val_score": last_val,
                    "validated": it % tc.eval_every == 0,
                    "smoothed_score": smoothed,
                    "best_score": best["score"] if np.isfinite(best["score"]) else None,
                    "best_iteration": best["iteration"],
                    "backtracks": backtracks,
                    "lr": lr,
                }
            )
    if problem is None and (not curves["val_iteration"] or curves["val_iteration"][-1] != it):
        if not evaluate():
            problem = f"the averaged weights became non-finite (NaN or infinite) by iteration {it}"
            stop_reason = NON_FINITE
    if not np.isfinite(best["score"]):
        if problem is None:  # stopped during warm-up: the latest weights are all there is
            best.update(score=smoothed, iteration=it, state=_state(ema))
        elif fallback["state"] is not None:  # the last finite average validated during warm-up
            best.update(fallback)
    if problem is not None:
        advice = f"lower train.learning_rate (now {lr:g}) or check the image and the annotations"
        if best["state"] is None:
            raise UserError(
                f"training failed: {problem}, before any model with finite weights was validated; "
                f"nothing was saved ({advice})"
            )
        problem = (
            f"training stopped early: {problem}; kept the best model with finite weights, from iteration "
            f"{best['iteration']}; {advice}"
        )
        log.warning("%s", problem)
    elapsed = time.perf_counter() - start
    ema.load_state_dict(best["state"])
    ema.cpu()
    log.info(
        "training stopped (%s) after %d iterations in %.0f s; best %s %.3f at iteration %d",
        stop_reason,
        it,
        elapsed,
        "validation mIoU" if validator else "-train loss",
        best["score"],
        best["iteration"],
    )

    history = copy.deepcopy(init.meta.get("history", {"rounds": []})) if init is not None else {"rounds": []}
    history["rounds"].append(
        {
            "round": len(history["rounds"]) + 1,
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "iterations": it,
            "duration_s": round(elapsed, 1),
            "stop_reason": stop_reason,
            "best_iteration": best["iteration"],
            "best_score": float(best["score"]) if np.isfinite(best["score"]) else None,
            "score": "validation mIoU (smoothed)" if validator else "negative training loss (no validation patches)",
            "backtracks": backtracks,
            "device": str(dev),
            "train_patches": [p.as_list() for p in train_p],
            "val_patches": [p.as_list() for p in val_p],
            "labelled_pixels": {c: int(n) for c, n in zip(classes, counts)},
            "curves": curves,
        }
    )
    meta = {
        "classes": classes,
        "architecture": arch,
        "normalization": {**DEFAULT_NORMALIZATION, "training_range": [lo, hi]},
        "pixel_size": calibration or {},
        "patch_size": s.patches.size,
        "settings": s.model_dump(mode="json"),
        "history": history,
        "annotations_sha256": labels.digest(),
        "versions": software_versions(),
        # Prediction sizes its tile overlap from this; computed once here rather than at every start.
        "effective_receptive_field": {
            "mass": HALO_MASS,
            "radius": effective_receptive_field(fold_batchnorm(ema), HALO_MASS),
        },
    }
    return TrainResult(TrainedModel(net=ema, meta=meta), stop_reason, train_p, val_p, problem)
