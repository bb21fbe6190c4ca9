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
from typing import TYPE_CHECKING

import numpy as np
import torch

from .annotations import UNLABELLED, Labels, annotated_areas, boundary_band
from .augment import Augmenter
from .config import Settings
from .errors import UserError
from .events import CancelToken, ProgressSink, TrainEvent
from .losses import class_weights, deep_supervision_loss, edge_potts_loss, masked_cross_entropy, pseudo_label_loss
from .metrics import mean_iou
from .modelio import TrainedModel, build_network, software_versions
from .normalization import DEFAULT_NORMALIZATION, normalization_range, normalize
from .patches import Patch, annotated_patches, round_history, split
from .predict import predict_plane
from .priors import (
    effective_training_prior,
    estimate_correction,
    estimate_relative_correction,
    shift_output_bias,
)
from .receptive import HALO_MASS, effective_receptive_field, fold_batchnorm
from .runtime import autocast_context

if TYPE_CHECKING:
    from collections.abc import Callable

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

    def summary(self) -> str:
        """One line for the user: iterations, time, why it stopped, the best score and the split."""
        last = self.model.last_round
        best = "n/a" if last["best_score"] is None else f"{last['best_score']:.3f}"
        text = (
            f"{last['iterations']} iterations in {last['duration_s']:.0f} s ({self.stop_reason}); "
            f"best {last['score']} {best} at iteration {last['best_iteration']}; "
            f"{len(self.train_patches)} training / {len(self.val_patches)} validation patches"
        )
        if last.get("kept_previous_model"):
            text += "; kept the starting model: this round's model did not score better on the validation patches"
        return text


NON_FINITE = "non-finite loss"
NO_VALIDATION_SCORE = "negative training loss (no validation patches)"


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

    def __init__(self, image, norm, labels, train, val, context, src_size, device, seed, band=None):
        """``band``: None, or (n_classes, width): band pixels then carry ``n_classes + class``."""
        self.src = src_size
        half = src_size // 2 + 1
        self.regions = []
        for p in train:
            y0, x0, y1, x1 = _expanded_box(p, context, image.shape, val)
            img = np.pad(norm(image[p.z, y0:y1, x0:x1]), half, mode="reflect")
            lab = labels[p.z, y0:y1, x0:x1]
            if band is not None:
                b = boundary_band(lab, *band)
                lab = np.where(b >= 0, band[0] + b, lab)
            lab = np.pad(lab, half, mode="reflect")
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


def labelled_criterion(labelled: np.ndarray, band: np.ndarray) -> float:
    """Selection score: mIoU on the labelled pixels of the held-out patches (confusion matrices in)."""
    return mean_iou(labelled)


def band_criterion(labelled: np.ndarray, band: np.ndarray) -> float:
    """Selection score: mIoU on the labelled pixels plus their boundary band (nearer outline's class)."""
    return mean_iou(labelled + band)


# ``train.selection`` -> criterion; the validator reports every one of them.
SELECTION = {"labelled": labelled_criterion, "band": band_criterion}


class _Validator:
    """Scores of the weight average on whole held-out patches (see :meth:`scores`)."""

    def __init__(self, image, norm, labels, val, context, n_classes, band_width=6.0):
        self.items = []
        self.n_classes = n_classes
        _, h, w = image.shape
        for p in val:
            y0, x0 = max(0, p.y0 - context), max(0, p.x0 - context)
            y1, x1 = min(h, p.y1 + context), min(w, p.x1 + context)
            lab = labels[p.z, p.y0 : p.y1, p.x0 : p.x1]
            # The labelled pixels, then the boundary band with the nearer outline's class.
            truth = np.where(lab != UNLABELLED, lab, boundary_band(lab, n_classes, band_width))
            keep = truth != UNLABELLED
            in_band = (lab == UNLABELLED)[keep]
            region = norm(image[p.z, y0:y1, x0:x1])
            self.items.append((region, (p.y0 - y0, p.x0 - x0), keep, truth[keep].astype(np.int64), in_band))

    def scores(self, net, device, precision) -> dict:
        """``labelled``: mIoU on the labelled pixels; ``band``: on those and their boundary band."""
        n = self.n_classes
        labelled = np.zeros((n, n), dtype=np.int64)
        band = np.zeros((n, n), dtype=np.int64)
        for img, (oy, ox), keep, truth, in_band in self.items:
            probs = predict_plane(net, img, device, precision)
            pred = probs[:, oy : oy + keep.shape[0], ox : ox + keep.shape[1]].argmax(0)[keep]
            pairs = truth * n + pred
            labelled += np.bincount(pairs[~in_band], minlength=n * n).reshape(n, n)
            band += np.bincount(pairs[in_band], minlength=n * n).reshape(n, n)
        return {name: criterion(labelled, band) for name, criterion in SELECTION.items()}

    def __call__(self, net, device, precision) -> float:
        """Mean IoU on the labelled pixels of the validation patches."""
        return self.scores(net, device, precision)["labelled"]


def _state(net) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _all_finite(net) -> bool:
    """Whether every floating-point weight and buffer of ``net`` is finite."""
    return all(bool(torch.isfinite(v).all()) for v in net.state_dict().values() if v.is_floating_point())


@dataclass
class Batch:
    """One augmented training batch, as the loss terms see it.

    Attributes
    ----------
    x : torch.Tensor, shape (B, 1, H, W)
        The augmented, normalised crops.
    y : torch.Tensor of int64, shape (B, H, W)
        Labels (-1 = unlabelled).
    band : torch.Tensor of int64 or None
        The boundary band's nearer-outline classes (-1 elsewhere), when ``train.band_weight`` is set.
    teacher : torch.Tensor or None
        The weight average's probabilities on ``x``, when the pseudo-label term is active.
    """

    x: torch.Tensor
    y: torch.Tensor
    band: torch.Tensor | None = None
    teacher: torch.Tensor | None = None


def supervised_term(outs: list[torch.Tensor], batch: Batch, trainer: Trainer) -> torch.Tensor:
    """Masked cross-entropy (+ soft Dice) on the labelled pixels, over every recurrent step."""
    tc = trainer.tc
    return deep_supervision_loss(outs, batch.y, trainer.weight, tc.step_decay, tc.dice_weight)


def band_term(outs: list[torch.Tensor], batch: Batch, trainer: Trainer) -> torch.Tensor:
    """Cross-entropy on the boundary band, towards the nearer outline's class (last step)."""
    return masked_cross_entropy(outs[-1], batch.band, trainer.weight)


def edge_term(outs: list[torch.Tensor], batch: Batch, trainer: Trainer) -> torch.Tensor:
    """The edge-aware Potts term on every pixel of the crop (last step)."""
    return edge_potts_loss(torch.softmax(outs[-1].float(), dim=1), batch.x, trainer.tc.edge_sigma)


def pseudo_term(outs: list[torch.Tensor], batch: Batch, trainer: Trainer) -> torch.Tensor:
    """Cross-entropy towards the weight average's confident predictions on unlabelled pixels (last step)."""
    y = batch.y if batch.band is None else torch.where(batch.band >= 0, batch.band, batch.y)
    return pseudo_label_loss(outs[-1], batch.teacher, y, trainer.tc.pseudo_threshold, trainer.weight)


class Trainer:
    """One training round: set-up, :meth:`step`, :meth:`evaluate`, :meth:`backtrack` and :meth:`result`.

    :func:`train` runs it; the parts are separate so each can be tested and timed on its own. The loss
    is a weighted sum of named terms (:attr:`terms`): ``supervised`` always; ``band``, ``edge`` and
    ``pseudo`` when their weights are set.
    """

    def __init__(self, image, labels: Labels, settings: Settings, init=None, device="auto", calibration=None):
        from .runtime import resolve_device

        self.s = settings
        self.tc = tc = settings.train
        self.dev = resolve_device(device)
        if image.shape != labels.labels.shape:
            raise UserError(f"labels of shape {labels.labels.shape} do not match the image {image.shape}")
        self.image, self.labels, self.init, self.calibration = image, labels, init, calibration
        self.classes = classes = labels.classes
        n_classes = len(classes)
        if init is not None and init.classes != classes:
            raise UserError(
                f"the starting model has classes {', '.join(init.classes)} but the annotations have "
                f"{', '.join(classes)}; annotate the same classes or train a new model without --init"
            )
        self._build_network(init, n_classes)
        self._build_data(n_classes)
        self.terms = {"supervised": (1.0, supervised_term)}
        if tc.band_weight:
            self.terms["band"] = (tc.band_weight, band_term)
        if tc.edge_weight:
            self.terms["edge"] = (tc.edge_weight, edge_term)
        if tc.pseudo_weight:
            self.terms["pseudo"] = (tc.pseudo_weight, pseudo_term)
        self.lr = tc.learning_rate
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=tc.weight_decay)
        self.it = 0
        self.curves = {"iteration": [], "train_loss": [], "val_iteration": [], "val_score": [], "smoothed_score": []}
        self.best = {"score": -np.inf, "iteration": 0, "state": None}
        # The latest finite weight average seen at a validation that could not compete (warm-up, or any
        # but the last of a final-only round): what a non-finite loss can still fall back to.
        self.fallback = {"score": None, "iteration": 0, "state": None}
        self.smoothed = None
        self.bad = 0
        self.backtracks = 0
        self.loss_ema = None
        self.last_val = None
        self.start_score = None  # the warm start's validation score, when there is one
        # A warm start's early checkpoints still carry much of the starting model, and a few partially
        # labelled patches judge them poorly: with 'final' only the round's end competes with its start.
        self.final_only = init is not None and tc.warm_selection == "final"
        self.refitted = None  # the refit's record, once it has run
        # The warm start competes only on patches it never trained on: elsewhere its score flatters it.
        fresh = not any(tuple(p.as_list()) in self.learnt for p in self.val_p)
        if init is not None and self.validator is not None and fresh:
            self._start_from_previous()

    def _build_network(self, init, n_classes: int) -> None:
        """The network (new, or the warm start's, uncorrected) and its weight average."""
        torch.manual_seed(self.tc.seed)
        if init is not None:
            self.arch = dict(init.meta["architecture"])
            self.net = build_network(self.arch)
            self.net.load_state_dict(init.net.state_dict())
            last = init.last_round
            if "prior_correction" in last:
                # Continue from the network as it was trained: this round estimates its own correction.
                shift_output_bias(self.net, -np.asarray(last["prior_correction"]["logit_shift"]))
        else:
            self.arch = {"name": "RecurrentUNet", "in_channels": 1, "n_classes": n_classes}
            self.arch.update(self.s.model.model_dump())
            self.net = build_network(self.arch)
        self.net.to(self.dev).to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.net).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def _build_data(self, n_classes: int) -> None:
        """The train/validation split, the crop sampler, the augmenter, the validator and class weights."""
        tc, labels, image = self.tc, self.labels.labels, self.image
        patches = annotated_patches(labels, self.s.patches.size)
        earlier, self.learnt = round_history(self.init.rounds if self.init is not None else [])
        self.train_p, self.val_p = split(
            labels, patches, tc.validation_patches, tc.seed, n_classes, earlier, self.learnt
        )
        log.info("%d annotated patch(es): %d for training, %d for validation", len(patches), *map(len, self.split))
        self.lo, self.hi = normalization_range(image)
        self.augmenter = Augmenter(tc.crop_size, **self.s.augment.model_dump())
        # Only the regions around annotated patches are normalised: a large stack is never copied whole.
        self.sampler = self._sampler(self.train_p, self.val_p, tc.seed)
        self.validator = (
            _Validator(image, self.norm, labels, self.val_p, tc.context, n_classes, tc.band_width)
            if self.val_p
            else None
        )
        self.counts = np.bincount(
            np.concatenate([labels[p.z, p.y0 : p.y1, p.x0 : p.x1].ravel() for p in self.train_p]) + 1,
            minlength=n_classes + 1,
        )[1:]
        self.weight = class_weights(self.counts, tc.class_balance).to(self.dev)
        self.gen = torch.Generator(device=self.dev).manual_seed(tc.seed)

    def _sampler(self, train: list, avoid: list, seed: int) -> _Sampler:
        tc, n_classes = self.tc, len(self.classes)
        band = (n_classes, tc.band_width) if tc.band_weight else None
        src = self.augmenter.input_size()
        return _Sampler(self.image, self.norm, self.labels.labels, train, avoid, tc.context, src, self.dev, seed, band)

    @property
    def split(self) -> tuple:
        """(training patches, validation patches)."""
        return self.train_p, self.val_p

    def norm(self, a: np.ndarray) -> np.ndarray:
        """``a`` normalised with the training range (see :func:`~tem_ij_plugin.normalization.normalize`)."""
        return normalize(a, self.lo, self.hi)

    def loss(self, outs: list[torch.Tensor], batch: Batch) -> torch.Tensor:
        """The weighted sum of :attr:`terms` on one augmented batch."""
        if "pseudo" in self.terms and self.it >= self.tc.min_iterations and batch.teacher is None:
            with torch.no_grad(), autocast_context(self.dev, self.tc.precision):
                batch.teacher = torch.softmax(self.ema(batch.x).float(), dim=1)
        total = 0.0
        for name, (w, term) in self.terms.items():
            if name == "pseudo" and batch.teacher is None:
                continue  # the average is not worth learning from during warm-up
            total = total + w * term(outs, batch, self)
        return total

    def batch(self) -> Batch:
        """Draw and augment a batch; band pixels (encoded as ``n_classes + class``) are split off."""
        x, y = self.sampler.batch(self.tc.batch_size)
        with torch.no_grad():
            x, y = self.augmenter(x, y, self.gen)
        x = x.contiguous(memory_format=torch.channels_last)
        if "band" not in self.terms:
            return Batch(x, y)
        n = len(self.classes)
        band = torch.where(y >= n, y - n, torch.full_like(y, UNLABELLED))
        return Batch(x, torch.where(y >= n, torch.full_like(y, UNLABELLED), y), band)

    def step(self) -> float:
        """One optimiser step; returns the loss. A non-finite loss is returned without touching the weights."""
        batch = self.batch()
        with autocast_context(self.dev, self.tc.precision):
            outs = self.net(batch.x, all_steps=True)
        loss = self.loss(outs, batch)
        lv = float(loss.detach())
        if not np.isfinite(lv):
            return lv
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.it += 1
        self._average()
        self.loss_ema = lv if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * lv
        self.curves["iteration"].append(self.it)
        self.curves["train_loss"].append(round(lv, 5))
        return lv

    def _average(self) -> None:
        # Warm up the weight average quickly, then let it average over ~1/(1-decay) steps.
        d = min(self.tc.ema_decay, (1 + self.it) / (10 + self.it))
        with torch.no_grad():
            for pe, pn in zip(self.ema.parameters(), self.net.parameters()):
                pe.lerp_(pn, 1 - d)
            # BatchNorm statistics are averaged like the weights they belong to.
            for be, bn in zip(self.ema.buffers(), self.net.buffers()):
                if be.is_floating_point():
                    be.lerp_(bn, 1 - d)
                else:
                    be.copy_(bn)

    def _validate(self) -> None:
        """Score the weight average and record it (raw and smoothed) in the curves."""
        tc = self.tc
        if self.validator is not None:
            scores = self.validator.scores(self.ema, self.dev, tc.precision)
            score = scores[tc.selection]
            for k, v in scores.items():  # both criteria, whichever selects: model files show how they compare
                self.curves.setdefault(f"val_{k}", []).append(round(v, 5))
        else:
            score = -float(self.loss_ema if self.loss_ema is not None else np.inf)
        self.last_val = score
        self.smoothed = score if self.smoothed is None else tc.smoothing * self.smoothed + (1 - tc.smoothing) * score
        self.curves["val_iteration"].append(self.it)
        self.curves["val_score"].append(round(score, 5))
        self.curves["smoothed_score"].append(round(self.smoothed, 5))

    def _start_from_previous(self) -> None:
        """A warm start is scored first and is the best so far: a round that does not beat it keeps it."""
        self._validate()
        self.best.update(score=self.smoothed, iteration=0, state=_state(self.ema))
        self.start_score = self.smoothed

    def evaluate(self, final: bool = False) -> bool:
        """Validate the weight average; False (and nothing recorded) when its weights are not finite.

        ``final``: the training's last validation, the only one a ``final_only`` round lets compete.
        """
        if not _all_finite(self.ema):
            return False
        self._validate()
        self._consider(final)
        return True

    def _consider(self, final: bool) -> None:
        """Let the latest validation compete for best, or keep it as the fallback while it may not.

        A final-only round's end competes (with its smoothed score, as every checkpoint does) even
        inside the warm-up, which only keeps barely trained checkpoints from becoming backtracking targets.
        """
        may_compete = final if self.final_only else self.it >= self.tc.min_iterations
        if not may_compete:
            self.fallback.update(score=self.smoothed, iteration=self.it, state=_state(self.ema))
            return
        if self.smoothed > self.best["score"] + 1e-4:
            self.best.update(score=self.smoothed, iteration=self.it, state=_state(self.ema))
            self.bad = 0
        else:
            self.bad += 1

    def stalled(self) -> bool:
        """Whether the smoothed score has not improved for ``patience`` validations after warm-up."""
        return self.bad >= self.tc.patience and self.it >= self.tc.min_iterations

    def backtrack(self) -> bool:
        """Reload the best weights with a lower learning rate; False when no backtrack is left."""
        tc = self.tc
        if self.backtracks >= tc.backtracks:
            return False
        self.backtracks += 1
        self.lr *= tc.backtrack_lr_factor
        self.net.load_state_dict(self.best["state"])
        self.ema.load_state_dict(self.best["state"])
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=tc.weight_decay)
        self.bad = 0
        log.info(
            "backtrack %d at iteration %d: best from iteration %d, learning rate %.2g",
            self.backtracks,
            self.it,
            self.best["iteration"],
            self.lr,
        )
        return True

    def event(self, elapsed: float, max_seconds: float, stage: str = "train", last: int | None = None) -> TrainEvent:
        """The progress record after an iteration (see :func:`train`); ``last``: the stage's final iteration."""
        return TrainEvent(
            stage=stage,
            iteration=self.it,
            max_iterations=self.tc.max_iterations if last is None else last,
            elapsed_s=elapsed,
            max_seconds=max_seconds,
            train_loss=self.loss_ema,
            val_score=self.last_val,
            validated=self.it % self.tc.eval_every == 0,
            smoothed_score=self.smoothed,
            best_score=self.best["score"] if np.isfinite(self.best["score"]) else None,
            best_iteration=self.best["iteration"],
            backtracks=self.backtracks,
            lr=self.lr,
        )

    def run(self, progress: ProgressSink | None = None, cancel: CancelToken | None = None) -> TrainResult:
        """Train until early stopping, the time budget, the iteration cap, a cancel or a non-finite loss."""
        tc = self.tc
        max_seconds = tc.max_minutes * 60.0
        # A refit continues for up to `refit` x the selected length: selection gets its share of the budget.
        select_seconds = max_seconds / (1 + tc.refit) if self.val_p else max_seconds
        start = time.perf_counter()
        stop_reason, problem = "max iterations", None
        self.net.train()
        while True:
            if cancel is not None and cancel.is_set():
                stop_reason = "cancelled"
                break
            if time.perf_counter() - start > select_seconds:
                stop_reason = "time budget"
                break
            if self.it >= tc.max_iterations:
                stop_reason = "max iterations"
                break
            lv = self.step()
            if not np.isfinite(lv):
                # Stopped before this loss touched the weights: nothing non-finite reaches a saved model.
                problem = f"the training loss became non-finite ({lv}) at iteration {self.it + 1}"
                stop_reason = NON_FINITE
                break
            if self.it % tc.eval_every == 0:
                if not self.evaluate():
                    problem = f"the averaged weights became non-finite (NaN or infinite) by iteration {self.it}"
                    stop_reason = NON_FINITE
                    break
                if self.stalled() and not self.backtrack():
                    stop_reason = "early stopping"
                    break
            if progress is not None:
                progress(self.event(time.perf_counter() - start, max_seconds))
        if problem is None and (not self.curves["val_iteration"] or self.curves["val_iteration"][-1] != self.it):
            if not self.evaluate(final=True):
                problem = f"the averaged weights became non-finite (NaN or infinite) by iteration {self.it}"
                stop_reason = NON_FINITE
        elif problem is None and self.final_only:
            self._consider(final=True)  # the loop's last validation was the final one
        if problem is None and stop_reason != "cancelled":
            self._settle_best(None)
            self.refit(lambda: time.perf_counter() - start, max_seconds, progress, cancel)
        return self.result(stop_reason, problem, time.perf_counter() - start)

    def refit(
        self,
        elapsed: Callable[[], float],
        max_seconds: float,
        progress: ProgressSink | None = None,
        cancel: CancelToken | None = None,
    ) -> None:
        """Continue the selected model on every annotated patch, validation patches included (``train.refit``).

        Early stopping needed the held-out patches unseen; the final model need not leave their labels
        unused. The continuation runs ``refit`` x the selected model's iterations at the current learning
        rate, or until the time budget. Nothing can validate it: a cancel or a non-finite loss keeps the
        selected model, and a warm start from it never competes on those patches (they count as learnt).
        """
        tc, best = self.tc, self.best
        n = round(tc.refit * best["iteration"])
        if n == 0 or not self.val_p or self.kept_previous or best["state"] is None:
            return
        log.info(
            "refit: %d iterations on all %d patches from iteration %d",
            n,
            len(self.train_p) + len(self.val_p),
            best["iteration"],
        )
        first = self.it
        if self.continue_selected(self.train_p + self.val_p, n, elapsed, max_seconds, progress, cancel):
            best["state"] = _state(self.ema)
            self.refitted = {"iterations": self.it - first, "from_iteration": best["iteration"]}

    def continue_selected(
        self,
        patches: list,
        iterations: int,
        elapsed: Callable[[], float],
        max_seconds: float,
        progress: ProgressSink | None = None,
        cancel: CancelToken | None = None,
    ) -> bool:
        """Train on from the selected model on ``patches`` for ``iterations`` steps (progress stage ``refit``).

        A fresh optimiser at the current learning rate and a new sampler seed; the weight average restarts
        from the selected weights. The benchmarks also call it on the training patches alone: the control
        that tells the refit's extra labels from its extra iterations.

        Returns
        -------
        bool
            True when the continuation ended with finite weights (at ``iterations`` or at the time
            budget); False on a cancel or a non-finite loss, and :attr:`ema` must then not be kept.
        """
        self.sampler = self._sampler(patches, [], self.tc.seed + 1)
        self.net.load_state_dict(self.best["state"])
        self.ema.load_state_dict(self.best["state"])
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.tc.weight_decay)
        last = self.it + iterations
        while self.it < last and elapsed() <= max_seconds:
            if cancel is not None and cancel.is_set():
                log.info("refit cancelled: kept the selected model")
                return False
            if not np.isfinite(self.step()):
                log.warning("refit stopped: the loss became non-finite; kept the selected model")
                return False
            if progress is not None:
                progress(self.event(elapsed(), max_seconds, "refit", last))
        if not _all_finite(self.ema):
            log.warning("refit stopped: the averaged weights became non-finite; kept the selected model")
            return False
        return True

    def _settle_best(self, problem):
        """The model to keep, and the user's message when a non-finite loss cut training short."""
        best = self.best
        if not np.isfinite(best["score"]):
            if problem is None:  # stopped during warm-up: the latest weights are all there is
                best.update(score=self.smoothed, iteration=self.it, state=_state(self.ema))
            elif self.fallback["state"] is not None:  # the last finite average validated during warm-up
                best.update(self.fallback)
        if problem is None:
            return None
        advice = f"lower train.learning_rate (now {self.lr:g}) or check the image and the annotations"
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
        return problem

    def training_prior(self) -> np.ndarray:
        """The class mix of the labelled pixels, as weighted by the loss: what the posteriors are calibrated to.

        The boundary band's pixels are left out: counting them (by the band term's weight) gave worse
        corrections on ISBI (band + ``mean``, seed 0: mito 0.640 vs 0.655, membrane 0.759 vs 0.765).
        """
        return effective_training_prior(self.counts, self.weight.cpu().numpy())

    @property
    def kept_previous(self) -> bool:
        """Whether the result is the warm start itself: nothing this round trained scored better."""
        return self.start_score is not None and self.best["iteration"] == 0

    def correct_priors(self) -> dict | None:
        """Shift the kept model's output towards the image's class priors (``train.prior_correction``)."""
        mode = self.tc.prior_correction
        if mode == "off":
            return None
        labelled_mix = self.training_prior()
        image, norm, dev, precision, seed = self.image, self.norm, self.dev, self.tc.precision, self.tc.seed
        if mode == "relative":
            labels = self.labels.labels
            rec = estimate_relative_correction(
                self.ema, image, norm, labels, self.train_p, labelled_mix, dev, precision, seed
            )
        else:
            max_iter = 200 if mode == "em" else 1
            rec = estimate_correction(self.ema, image, norm, labelled_mix, dev, precision, seed, max_iter=max_iter)
        shift_output_bias(self.ema, rec["logit_shift"])
        log.info(
            "class priors: labelled mix %s, estimated on the image %s",
            rec["train_prior"],
            rec["image_prior"],
        )
        if "reference" in rec:
            log.info("class priors: the network's mean posterior on its labelled pixels %s", rec["reference"])
        return {"method": mode, **rec}

    def result(self, stop_reason: str, problem: str | None, elapsed: float) -> TrainResult:
        """The best model with its history record and metadata."""
        problem = self._settle_best(problem)
        best = self.best
        if self.kept_previous:
            log.info(
                "this round's model did not beat the starting model on the validation patches (%.3f); kept it",
                self.start_score,
            )
        self.ema.load_state_dict(best["state"])
        priors = self.correct_priors()
        self.ema.cpu()
        log.info(
            "training stopped (%s) after %d iterations in %.0f s; best %s %.3f at iteration %d",
            stop_reason,
            self.it,
            elapsed,
            "validation mIoU" if self.validator else "-train loss",
            best["score"],
            best["iteration"],
        )
        init = self.init
        history = copy.deepcopy(init.meta.get("history", {"rounds": []})) if init is not None else {"rounds": []}
        record = {
            "round": len(history["rounds"]) + 1,
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "iterations": self.it,
            "duration_s": round(elapsed, 1),
            "stop_reason": stop_reason,
            "best_iteration": best["iteration"],
            "best_score": float(best["score"]) if np.isfinite(best["score"]) else None,
            "score": "validation mIoU (smoothed)"
            if self.validator
            else "negative training loss (no validation patches)",
            "backtracks": self.backtracks,
            "device": str(self.dev),
            "loss_terms": {name: w for name, (w, _) in self.terms.items()},
            "train_patches": [p.as_list() for p in self.train_p],
            "val_patches": [p.as_list() for p in self.val_p],
            "labelled_pixels": {c: int(n) for c, n in zip(self.classes, self.counts)},
            "curves": self.curves,
        }
        if self.refitted is not None:
            record["refit"] = {**self.refitted, "patches": [p.as_list() for p in self.val_p]}
        if priors is not None:
            record["prior_correction"] = priors
        if self.kept_previous:
            record["kept_previous_model"] = True
        history["rounds"].append(record)
        meta = {
            "classes": self.classes,
            "architecture": self.arch,
            "normalization": {**DEFAULT_NORMALIZATION, "training_range": [self.lo, self.hi]},
            "pixel_size": self.calibration or {},
            "patch_size": self.s.patches.size,
            # The object scale as annotated: tem-ij objects' minimum area.
            "object_areas": annotated_areas(self.labels.labels, self.classes),
            "settings": self.s.model_dump(mode="json"),
            "history": history,
            "annotations_sha256": self.labels.digest(),
            "versions": software_versions(),
            # Prediction sizes its tile overlap from this; computed once here rather than at every start.
            "effective_receptive_field": {
                "mass": HALO_MASS,
                "radius": effective_receptive_field(fold_batchnorm(self.ema), HALO_MASS),
            },
        }
        return TrainResult(TrainedModel(net=self.ema, meta=meta), stop_reason, self.train_p, self.val_p, problem)


def train(
    image: np.ndarray,
    labels: Labels,
    settings: Settings | None = None,
    init: TrainedModel | None = None,
    device: str = "auto",
    progress: ProgressSink | None = None,
    cancel: CancelToken | None = None,
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
    trainer = Trainer(image, labels, settings or Settings(), init, device, calibration)
    return trainer.run(progress, cancel)
