"""Which patches to annotate next: candidate windows scored on probability maps and features.

Acquisition follows DESIGN.md section 5. With no model (nothing annotated yet) the candidates are
described by image statistics and the suggestions are *typical and diverse*: dense regions of that
description, each one unlike those already chosen. With a model, every candidate gets

* **uncertainty**: mean normalised entropy of the predicted class probabilities;
* **disagreement**: how much the prediction changes under test-time flips/transposition (and between
  recurrent steps when the model has several), computed for the drawn suggestions;
* **typicality**: how densely the candidate's region of the model's feature space (its bottleneck
  features, averaged over the window) is populated: a typical patch teaches about many others;
* **novelty**: distance in that space to the nearest annotated patch.

The score is ``typicality`` without a model and ``uncertainty`` with one; the other terms then only
describe a window (``reasons``): weighting by typicality or novelty, or adding disagreement, made the
top suggestions' true error lower in ``benchmarks/acquisition.py``. Disagreement is computed for
the drawn suggestions only. Suggestions are drawn one at a time, the best first (or with
probability ``score ** (1 / temperature)``), each draw damping candidates that look like it
(feature distance) or overlap it, so that the k suggestions are not near-duplicates of each other;
windows holding annotations are never candidates. Each suggestion drawn with a model carries its
focus regions (:mod:`tem_ij_plugin.focus`): where inside it to outline first.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .annotations import UNLABELLED
from .errors import UserError
from .events import PlaneEvent, check_cancel
from .outputs import SUGGESTIONS_FORMAT, atomic_write
from .patches import Patch, grid_boxes

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import torch

    from .events import CancelToken, ProgressSink
    from .modelio import TrainedModel

log = logging.getLogger(__name__)

MAX_REFERENCE = 2000  # candidates used as the reference set for densities (keeps memory bounded)


@dataclass(frozen=True)
class Candidate(Patch):
    """One scored window (a :class:`~tem_ij_plugin.patches.Patch`), its score and the reasons for it.

    ``focus``: for a drawn suggestion with a model, where inside the window to outline first
    (:class:`~tem_ij_plugin.focus.FocusRegion`, most uncertain first); empty otherwise.
    """

    score: float = 0.0
    reasons: dict = field(default_factory=dict)
    focus: tuple = ()


@dataclass
class SuggestResult:
    """What :func:`suggest` returns.

    Attributes
    ----------
    suggestions : list of Candidate
        The chosen windows in the order to annotate them (``suggest-1`` first).
    candidates : list of Candidate
        Every candidate that was scored (annotated windows excluded).
    phase : str
        ``typical-diverse (no model yet)``, or ``uncertainty``.
    timings : dict
        Seconds per stage.
    slices : list of dict
        One row per plane that holds candidates (see :func:`slice_table`).
    """

    suggestions: list
    candidates: list
    phase: str
    timings: dict
    slices: list = field(default_factory=list)


def candidate_boxes(shape: tuple[int, ...], size: int, stride: int | None = None) -> np.ndarray:
    """Candidate windows: :func:`~tem_ij_plugin.patches.grid_boxes` without edge slivers (rows z, y0, x0, y1, x1)."""
    return grid_boxes(shape, size, stride, drop_slivers=True)


def window_means(maps: np.ndarray, boxes: np.ndarray, scale: int = 1) -> np.ndarray:
    """Mean of each map over each box, by summed-area tables.

    Parameters
    ----------
    maps : ndarray, shape (K, H, W)
    boxes : ndarray of int, shape (N, 4)
        (y0, x0, y1, x1) in pixels of the full-resolution image.
    scale : int
        ``maps`` are ``scale`` times smaller than the image (boxes are scaled down, rounding outwards).

    Returns
    -------
    ndarray of float64, shape (N, K)
    """
    k, h, w = maps.shape
    y0 = np.clip(boxes[:, 0] // scale, 0, h - 1)
    x0 = np.clip(boxes[:, 1] // scale, 0, w - 1)
    y1 = np.clip(-(-boxes[:, 2] // scale), y0 + 1, h)
    x1 = np.clip(-(-boxes[:, 3] // scale), x0 + 1, w)
    # A summed-area table is only needed at the boxes' rows: sum the bands of rows between them
    # (one pass over the maps, accumulated in float64, which holds float32 sums exactly), then
    # take cumulative sums over the few bands and along x.
    edges = np.unique(np.concatenate([[0], y0, y1]))
    starts = edges[edges < h]
    bands = np.add.reduceat(maps, starts, axis=1, dtype=np.float64)
    sat = np.zeros((k, len(starts) + 1, w + 1))
    sat[:, 1:, 1:] = bands.cumsum(1).cumsum(2)
    row_of = np.append(starts, h)  # sat[:, i] sums the rows above row_of[i]
    iy0, iy1 = np.searchsorted(row_of, y0), np.searchsorted(row_of, y1)
    total = sat[:, iy1, x1] - sat[:, iy0, x1] - sat[:, iy1, x0] + sat[:, iy0, x0]
    return (total / ((y1 - y0) * (x1 - x0))).T


def image_descriptor_maps(plane: np.ndarray) -> np.ndarray:
    """Per-pixel statistics that describe a normalised plane without a model (K, H, W), float32.

    Intensity and its square (window mean and spread), gradient magnitude at two scales and
    band-pass energy at three: brightness, texture and structure size, the things that make two
    TEM regions look alike.
    """
    from scipy import ndimage as ndi

    x = plane.astype(np.float32)
    maps = [x, x * x]
    for sigma in (1.0, 3.0):
        maps.append(ndi.gaussian_gradient_magnitude(x, sigma))
    previous = x
    for sigma in (1.0, 4.0, 12.0):
        g = ndi.gaussian_filter(x, sigma)
        maps.append(np.abs(previous - g))
        previous = g
    return np.stack(maps)


def _image_descriptors(maps_means: np.ndarray) -> np.ndarray:
    """Window means of :func:`image_descriptor_maps` -> descriptors (spread instead of mean square)."""
    d = maps_means.copy()
    d[:, 1] = np.sqrt(np.maximum(d[:, 1] - d[:, 0] ** 2, 0))
    return d


def feature_maps(net: torch.nn.Module, plane: np.ndarray, device: torch.device, tile: int = 1024) -> np.ndarray:
    """The network's bottleneck features of a normalised plane, computed tile by tile.

    Returns
    -------
    ndarray of float32, shape (C, ceil(H / s), ceil(W / s)) with ``s = net.size_multiple``
    """
    import torch

    from .tiling import pad_amounts

    s = net.size_multiple
    h, w = plane.shape
    ph, pw = pad_amounts(h, w, 1, s)
    padded = np.pad(plane, ((0, ph), (0, pw)), mode="reflect" if min(h, w) > 1 else "edge")
    tile = max(s, tile // s * s)
    out = None
    with torch.no_grad():
        for y in range(0, padded.shape[0], tile):
            for x in range(0, padded.shape[1], tile):
                t = torch.from_numpy(np.ascontiguousarray(padded[y : y + tile, x : x + tile]))[None, None]
                f = net.encode(t.to(device)).float().cpu().numpy()[0]
                if out is None:
                    out = np.zeros((f.shape[0], padded.shape[0] // s, padded.shape[1] // s), np.float32)
                out[:, y // s : y // s + f.shape[1], x // s : x // s + f.shape[2]] = f
    return out


def uncertainty_maps(probs: np.ndarray, margin: float = 0.3) -> tuple:
    """Normalised entropy (H, W) and, per class pair, where the top two classes are within ``margin``.

    Returns
    -------
    entropy : ndarray of float32, shape (H, W), in [0, 1]
    ambiguous : dict mapping (a, b) class-index pairs (a < b) to float32 masks of shape (H, W)
    """
    c = probs.shape[0]
    p = np.clip(probs, 1e-7, 1.0)
    plogp = np.log(p)
    plogp *= p
    entropy = (-plogp.sum(0) / np.log(c)).astype(np.float32)
    first, second, i1, i2 = _top_two(probs)
    close = (first - second) < margin
    pair = np.where(close, np.minimum(i1, i2) * c + np.maximum(i1, i2), -1)  # a * c + b for pair (a, b)
    return entropy, {(a, b): (pair == a * c + b).astype(np.float32) for a in range(c) for b in range(a + 1, c)}


def _top_two(probs: np.ndarray) -> tuple:
    """The largest and second-largest probability per pixel and their classes (ties: the higher class first).

    A pass per class over contiguous planes: several times faster than an argsort over the class axis.
    """
    first, second = probs[0].copy(), np.full(probs.shape[1:], -1.0, probs.dtype)
    i1 = np.zeros(probs.shape[1:], np.int16)
    i2 = np.zeros_like(i1)
    for k in range(1, probs.shape[0]):
        p = probs[k]
        above = p >= first
        runner = ~above & (p >= second)
        second = np.where(above, first, np.where(runner, p, second))
        i2 = np.where(above, i1, np.where(runner, np.int16(k), i2))
        first = np.where(above, p, first)
        i1 = np.where(above, np.int16(k), i1)
    return first, second, i1, i2


def _tta_disagreement(net, crop: np.ndarray, inner: tuple, device) -> tuple[float, np.ndarray]:
    """Mean total-variation distance between test-time variants (and recurrent steps) and their mean.

    Returns
    -------
    disagreement : float
    probs : ndarray of float32, shape (C, h, w)
        The last step's probabilities averaged over the variants, inside ``inner``.
    """
    import torch

    from .tiling import pad_amounts

    s = net.size_multiple
    h, w = crop.shape
    ph, pw = pad_amounts(h, w, 1, s)
    x = np.pad(crop, ((0, ph), (0, pw)), mode="reflect")
    if x.shape[0] != x.shape[1]:  # the transposed variant needs a square input
        n = max(x.shape)
        x = np.pad(x, ((0, n - x.shape[0]), (0, n - x.shape[1])), mode="reflect")
    t = torch.from_numpy(np.ascontiguousarray(x))[None, None].to(device)
    variants = torch.cat([t, t.flip(2, 3), t.transpose(2, 3)])
    with torch.no_grad():
        steps = net(variants, all_steps=True)
    maps = []
    for logits in steps[-2:]:
        pr = torch.softmax(logits.float(), 1)
        maps += [pr[0], pr[1].flip(1, 2), pr[2].transpose(1, 2)]
    stack = torch.stack(maps)[:, :, inner[0] : inner[2], inner[1] : inner[3]]
    tv = 0.5 * (stack - stack.mean(0, keepdim=True)).abs().sum(1)
    return float(tv.mean()), stack[-3:].mean(0).cpu().numpy()


def _pca(x: np.ndarray, dims: int = 16) -> np.ndarray:
    """Standardised, PCA-reduced descriptors (at most ``dims`` components)."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    if x.shape[0] < 3:
        return x[:, :dims]
    _, sv, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    keep = max(1, min(dims, int((sv > 1e-6 * sv[0]).sum())))
    return x @ vt[:keep].T


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(d, 0))


def _typicality(desc: np.ndarray, rng, k: int = 10) -> tuple:
    """Rank-based density in descriptor space, in (0, 1], and the typical nearest-neighbour distance."""
    n = len(desc)
    if n == 1:
        return np.ones(1), 1.0
    ref = desc if n <= MAX_REFERENCE else desc[rng.choice(n, MAX_REFERENCE, replace=False)]
    d = _distances(desc, ref)
    k = min(k, len(ref) - 1)
    d.sort(axis=1)
    knn = d[:, 1 : k + 1].mean(1)  # column 0 is (about) the candidate itself
    ranks = np.argsort(np.argsort(-knn))
    nn = d[:, 1]
    return (ranks + 1) / n, float(np.median(nn[nn > 0])) if (nn > 0).any() else 1.0


def annotated_boxes(labels: np.ndarray | None, boxes: np.ndarray) -> np.ndarray:
    """Which candidate boxes hold at least one labelled pixel (bool, shape (N,))."""
    if labels is None:
        return np.zeros(len(boxes), bool)
    out = np.zeros(len(boxes), bool)
    for z in np.unique(boxes[:, 0]):
        rows = np.nonzero(boxes[:, 0] == z)[0]
        counts = window_means((labels[z] != UNLABELLED)[None].astype(np.float32), boxes[rows, 1:])[:, 0]
        out[rows] = counts > 0
    return out


def _overlap(boxes: np.ndarray, j: int) -> np.ndarray:
    b = boxes[j]
    return (
        (boxes[:, 0] == b[0])
        & (boxes[:, 1] < b[3])
        & (b[1] < boxes[:, 3])
        & (boxes[:, 2] < b[4])
        & (b[2] < boxes[:, 4])
    )


def draw(
    score: np.ndarray,
    desc: np.ndarray,
    boxes: np.ndarray,
    k: int,
    scale: float,
    temperature: float,
    rng: np.random.Generator,
    taken: Sequence[int] = (),
) -> list[int]:
    """Draw ``k`` candidates one at a time, damping look-alikes and overlapping windows after each draw.

    Parameters
    ----------
    score : ndarray, shape (N,)
        Non-negative acquisition scores.
    desc : ndarray, shape (N, D)
        Descriptors; a candidate at distance ``d`` from a drawn one keeps ``1 - exp(-(d / scale)**2)``
        of its score.
    boxes : ndarray, shape (N, 5)
    temperature : float
        0 = always the best remaining; larger = more random (weights ``score ** (1 / temperature)``).
    taken : sequence of int
        Candidates already chosen by another ranking: damped as if drawn first, never drawn again.

    Returns
    -------
    list of int
        Indices in draw order.
    """
    s = score.astype(np.float64).copy()

    def damp(j: int) -> None:
        d = np.sqrt(((desc - desc[j]) ** 2).sum(1))
        s[:] *= 1 - np.exp(-((d / max(scale, 1e-9)) ** 2))
        s[_overlap(boxes, j)] = 0
        s[j] = 0

    for j in taken:
        damp(j)
    chosen = []
    for _ in range(min(k, len(s))):
        if not (s > 0).any():
            break
        if temperature <= 0:
            j = int(np.argmax(s))
        else:
            # Scores are scaled to the best one first so that the power cannot underflow.
            w = (s / s.max()) ** (1.0 / temperature)
            j = int(rng.choice(len(s), p=w / w.sum()))
        chosen.append(j)
        damp(j)
    return chosen


def suggest(
    image: np.ndarray,
    labels: np.ndarray | None = None,
    model: TrainedModel | None = None,
    k: int = 5,
    size: int = 256,
    stride: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    device: str = "auto",
    probabilities: Callable[[int], np.ndarray] | None = None,
    candidates: np.ndarray | None = None,
    progress: ProgressSink | None = None,
    cancel: CancelToken | None = None,
    novelty: bool = False,
    explore: float = 0.0,
) -> SuggestResult:
    """Rank candidate windows that hold no annotation and draw ``k`` suggestions.

    Parameters
    ----------
    image : ndarray, shape (Z, Y, X)
        The image (any numeric dtype); never modified.
    labels : ndarray of int, shape (Z, Y, X), optional
        Partial labels (-1 = unlabelled); windows holding a label are never suggested.
    model : TrainedModel, optional
        Without one the suggestions are typical, diverse starting patches.
    k : int
        Suggestions to draw.
    size, stride : int
        Window side and step (default step: ``size``, the patch grid).
    temperature : float
        Randomness of the draw (0 = greedy, the default: window scores lie close together, and a
        draw at 0.2 cost up to 0.33 of the top-5 error ratio in ``benchmarks/acquisition.py``).
    seed : int
    device : str
    probabilities : callable, optional
        ``probabilities(z) -> (C, Y, X)`` when the caller already has the model's maps.
    candidates : ndarray of int, shape (N, 5), optional
        Explicit candidate windows (z, y0, x0, y1, x1) instead of the grid/stride windows.
    progress : callable, optional
        Called with ``{"stage", "plane", "planes"}`` after each plane.
    cancel : threading.Event, optional
    novelty : bool
        With a model, also damp windows that look like annotated ones (score times the novelty
        term), as the draw damps look-alikes of each drawn window. Off by default (see
        ``benchmarks/active_learning.py``).
    explore : float
        With a model, the fraction of the ``k`` suggestions (rounded down) drawn by typicality times
        novelty (typical windows unlike the annotated ones) instead of uncertainty, alternating with
        the uncertain ones from the second suggestion on; their ``score`` is still their uncertainty.
        0 by default (see ``benchmarks/active_learning.py``).

    Returns
    -------
    SuggestResult
    """
    _check_request(image, labels, k, size, stride)
    if not 0 <= explore <= 1:
        raise UserError(f"explore must be between 0 and 1, got {explore}")
    rng = np.random.default_rng(seed)
    timings = {}
    t0 = time.perf_counter()
    boxes, n_cand, n_annotated = _windows(image.shape, labels, size, stride, candidates)
    if model is None:
        sc = _typical_diverse(image, boxes, n_cand, rng, timings, progress, cancel)
    else:
        sc = _uncertain(image, boxes, n_cand, n_annotated, model, device, probabilities, rng, timings, progress, cancel)
        if novelty:
            sc.score = sc.score * sc.nov
    chosen = _draw_mixed(sc, boxes[:n_cand], k, explore if model is not None else 0.0, temperature, rng)
    candidates = [
        Candidate(*map(int, boxes[j]), score=float(sc.score[j]), reasons=_reasons(sc, j)) for j in range(n_cand)
    ]
    t1 = time.perf_counter()
    drawn = [_drawn(candidates[j], sc) for j in chosen]
    timings["focus_s"] = time.perf_counter() - t1
    timings["total_s"] = time.perf_counter() - t0
    return SuggestResult(drawn, candidates, sc.phase, timings, slice_table(candidates, drawn))


def _draw_mixed(sc: _Scores, boxes: np.ndarray, k: int, explore: float, temperature: float, rng) -> list[int]:
    """Draw ``k`` windows: a fraction ``explore`` by typicality x novelty, the rest by score, alternating."""
    desc = sc.desc[: len(boxes)]
    n_explore = int(k * explore)  # rounded down: k=1 stays the most uncertain window
    by_score = draw(sc.score, desc, boxes, k - n_explore, sc.scale, temperature, rng)
    if not n_explore:
        return by_score
    typical = draw(sc.typ * sc.nov, desc, boxes, n_explore, sc.scale, temperature, rng, taken=by_score)
    order, rest = by_score[:1], by_score[1:]
    for i in range(max(len(typical), len(rest))):
        order += typical[i : i + 1] + rest[i : i + 1]
    return order


@dataclass
class _Scores:
    """A ranking of the candidate windows and what it was made of (the ``reasons`` of each)."""

    score: np.ndarray
    desc: np.ndarray  # descriptors of every window (candidates first, then annotated grid cells)
    scale: float
    typ: np.ndarray
    phase: str
    classes: list = field(default_factory=list)
    unc: np.ndarray | None = None
    nov: np.ndarray | None = None
    unc_means: np.ndarray | None = None  # entropy, pairwise ambiguity, mean class probabilities
    pairs: list = field(default_factory=list)
    tta: Callable | None = None  # box -> (flip disagreement, the model's probabilities (C, h, w) there)


def _check_request(image, labels, k, size, stride) -> None:
    if image.ndim != 3:
        raise UserError(f"expected a (Z, Y, X) image, got shape {image.shape}")
    if k < 1:
        raise UserError("the number of suggestions must be at least 1")
    if stride is not None and not 1 <= stride <= size:
        raise UserError(f"the stride must be between 1 and the window size {size}")
    if labels is not None and labels.shape != image.shape:
        raise UserError(f"labels of shape {labels.shape} do not match the image {image.shape}")


def _windows(shape, labels, size, stride, candidates) -> tuple:
    """The free candidate windows, then the annotated grid cells (for novelty only), and their counts."""
    boxes = candidate_boxes(shape, size, stride) if candidates is None else np.asarray(candidates, np.int64)
    taken = annotated_boxes(labels, boxes)
    grid_boxes = candidate_boxes(shape, size)
    grid_taken = grid_boxes[annotated_boxes(labels, grid_boxes)]
    if taken.all():
        raise UserError("every candidate window already holds annotations; nothing left to suggest")
    return np.concatenate([boxes[~taken], grid_taken]), int((~taken).sum()), len(grid_taken)


def _typical_diverse(image, boxes, n_cand, rng, timings, progress, cancel) -> _Scores:
    """Without a model: rank by typicality of image descriptors (the draw keeps them diverse)."""
    from .normalization import normalization_range, normalize

    t0 = time.perf_counter()
    nz = image.shape[0]
    lo, hi = normalization_range(image)
    means = np.zeros((len(boxes), 7))
    for z in range(nz):
        check_cancel(cancel)
        rows = np.nonzero(boxes[:, 0] == z)[0]
        if len(rows):
            means[rows] = window_means(image_descriptor_maps(normalize(image[z], lo, hi)), boxes[rows, 1:])
        _report(progress, "describe", z, nz)
    desc = _pca(_image_descriptors(means))
    timings["describe_s"] = time.perf_counter() - t0
    typ, scale = _typicality(desc[:n_cand], rng)
    return _Scores(typ.copy(), desc, scale, typ, "typical-diverse (no model yet)")


def _uncertain(
    image, boxes, n_cand, n_annotated, model, device, probabilities, rng, timings, progress, cancel
) -> _Scores:
    """With a model: rank by uncertainty (mean entropy); typicality and novelty are described."""
    from .normalization import sampled_range
    from .receptive import fold_batchnorm
    from .runtime import resolve_device

    dev = resolve_device(device)
    net = fold_batchnorm(model.net.to(dev)).float()
    lo, hi = sampled_range(lambda i: image[i], image.shape[0], model.normalization)
    classes = model.classes
    pairs = [(a, b) for a in range(len(classes)) for b in range(a + 1, len(classes))]
    plane_probs, window_probs = _probability_sources(image, model, dev, (lo, hi), probabilities, cancel)
    unc_means, feat_means = _model_window_means(
        image, boxes, model, net, dev, (lo, hi), pairs, plane_probs, timings, progress, cancel
    )
    desc = _pca(feat_means)
    typ, scale = _typicality(desc[:n_cand], rng)
    if n_annotated:
        nearest = _distances(desc[:n_cand], desc[n_cand:]).min(1)
        nov = 1 - np.exp(-((nearest / scale) ** 2))
    else:
        nov = np.ones(n_cand)
    unc = unc_means[:n_cand, 0]
    # Once there is a model the score is its uncertainty alone. Measured on the ISBI tasks
    # (benchmarks/acquisition.py): weighting by typicality (0.2 did, fully below four patches) pulled
    # the top 5 towards easy, common windows, damping look-alikes of annotated patches (novelty) cost
    # up to 0.29 of the top-5 error ratio, and adding flip disagreement up to 0.23. All three stay in
    # the reasons; the draw keeps the suggestions apart from each other.
    tta = _tta_source(net, image, (lo, hi), dev, window_probs)
    return _Scores(
        unc.copy(),
        desc,
        scale,
        typ,
        "uncertainty",
        classes,
        unc=unc,
        nov=nov,
        unc_means=unc_means,
        pairs=pairs,
        tta=tta,
    )


def _tta_source(net, image, lo_hi, dev, exact):
    """``box -> (disagreement, probabilities)`` for a drawn window.

    The probabilities are the flip variants' mean, or the caller's exact maps (``exact``) when given.
    """

    def tta(box):
        dis, averaged = _window_disagreement(net, image, box, lo_hi, dev)
        return dis, (averaged if exact is None else exact(box))

    return tta


def _probability_sources(image, model, dev, lo_hi, probabilities, cancel) -> tuple:
    """``plane_probs(z, normalised_plane)``, and ``window_probs(box)`` when the caller gave the maps (else None)."""
    from .normalization import normalize
    from .predict import make_predictor, probe_crop

    if probabilities is not None:

        def window(box):
            z, y0, x0, y1, x1 = box
            return probabilities(z)[:, y0:y1, x0:x1]

        return (lambda z, _plane: probabilities(z)), window
    halo = (model.meta.get("effective_receptive_field") or {}).get("radius")
    probe = normalize(probe_crop(image[0]), *lo_hi)
    predictor = make_predictor(model.net, dev, probe=probe, halo=halo)
    return (lambda _z, plane: predictor.plane(plane, cancel=cancel)), None


def _model_window_means(image, boxes, model, net, dev, lo_hi, pairs, plane_probs, timings, progress, cancel):
    """Per window: mean entropy, pairwise ambiguity and class probabilities; and mean network features."""
    from .normalization import normalize

    lo, hi = lo_hi
    nz = image.shape[0]
    unc_means = np.zeros((len(boxes), 1 + len(pairs) + len(model.classes)))
    feat_means = None
    t_prob = t_feat = 0.0
    for z in range(nz):
        check_cancel(cancel)
        rows = np.nonzero(boxes[:, 0] == z)[0]
        if not len(rows):
            continue
        plane = normalize(image[z], lo, hi)
        t1 = time.perf_counter()
        probs = plane_probs(z, plane)
        entropy, amb = uncertainty_maps(probs)
        maps = np.concatenate([entropy[None], np.stack([amb[p] for p in pairs]), probs])
        unc_means[rows] = window_means(maps, boxes[rows, 1:])
        t2 = time.perf_counter()
        fm = feature_maps(net, plane, dev)
        # Square roots tame the heavy tails of ReLU features before they are compared.
        f = np.sqrt(np.maximum(window_means(fm, boxes[rows, 1:], scale=net.size_multiple), 0))
        if feat_means is None:
            feat_means = np.zeros((len(boxes), f.shape[1]))
        feat_means[rows] = f
        t_prob += t2 - t1
        t_feat += time.perf_counter() - t2
        _report(progress, "score", z, nz)
    timings["probabilities_s"], timings["features_s"] = t_prob, t_feat
    return unc_means, feat_means


def _window_disagreement(net, image, box, lo_hi, dev, ctx: int = 32) -> tuple[float, np.ndarray]:
    """Flip disagreement of one window and its averaged probabilities (see :func:`_tta_disagreement`).

    Computed on the window with ``ctx`` pixels of context.
    """
    from .normalization import normalize

    z, y0, x0, y1, x1 = box
    cy0, cx0 = max(0, y0 - ctx), max(0, x0 - ctx)
    cy1, cx1 = min(image.shape[1], y1 + ctx), min(image.shape[2], x1 + ctx)
    crop = normalize(image[z, cy0:cy1, cx0:cx1], *lo_hi)
    return _tta_disagreement(net, crop, (y0 - cy0, x0 - cx0, y1 - cy0, x1 - cx0), dev)


def _drawn(c: Candidate, sc: _Scores) -> Candidate:
    """A drawn suggestion with its flip disagreement and focus regions (unchanged without a model).

    Both come from one pass over the window's flip variants; the focus regions are outlined on the
    variants' mean probabilities, or on the caller's maps when given.
    """
    from dataclasses import replace

    from .focus import focus_regions

    if sc.tta is None:
        return c
    dis, probs = sc.tta(c.box())
    entropy, _ = uncertainty_maps(probs)
    reasons = {**c.reasons, "disagreement": round(dis, 4)}
    return replace(c, reasons=reasons, focus=tuple(focus_regions(entropy, origin=(c.y0, c.x0))))


def slice_table(candidates: list, suggestions: list) -> list[dict]:
    """Per plane holding candidates: how many, the best score, mean uncertainty and novelty, suggestions drawn.

    Novelty (0-1) is the distance in the model's feature space to the nearest annotated patch: the
    planes with the highest mean novelty differ most from what was annotated. Uncertainty and
    novelty are None without a model (and novelty is 1 everywhere with nothing annotated).

    Returns
    -------
    list of dict
        Keys ``slice`` (1-based), ``candidates``, ``best_score``, ``uncertainty``, ``novelty``,
        ``novelty_max``, ``suggestions``.
    """
    by_plane: dict = {}
    for c in candidates:
        by_plane.setdefault(c.z, []).append(c)
    drawn = [c.z for c in suggestions]
    rows = []
    for z in sorted(by_plane):
        cs = by_plane[z]
        unc = [c.reasons["uncertainty"] for c in cs if "uncertainty" in c.reasons]
        nov = [c.reasons["novelty"] for c in cs if "novelty" in c.reasons]
        rows.append(
            {
                "slice": z + 1,
                "candidates": len(cs),
                "best_score": round(max(c.score for c in cs), 5),
                "uncertainty": round(float(np.mean(unc)), 4) if unc else None,
                "novelty": round(float(np.mean(nov)), 4) if nov else None,
                "novelty_max": round(float(np.max(nov)), 4) if nov else None,
                "suggestions": drawn.count(z),
            }
        )
    return rows


def _reasons(sc: _Scores, j: int) -> dict:
    """Why candidate ``j`` scored as it did: the terms of its score, the most confused classes, the prediction."""
    reasons = {"typicality": round(float(sc.typ[j]), 4)}
    if sc.unc is None:
        return reasons
    reasons["uncertainty"] = round(float(sc.unc[j]), 4)
    reasons["disagreement"] = None  # computed for the drawn suggestions only (see _drawn)
    reasons["novelty"] = round(float(sc.nov[j]), 4)
    row = sc.unc_means[j]
    if sc.pairs:
        best = int(np.argmax(row[1 : 1 + len(sc.pairs)]))
        a, b = sc.pairs[best]
        reasons["confused"] = f"{sc.classes[a]}/{sc.classes[b]}"
        reasons["ambiguous_fraction"] = round(float(row[1 + best]), 4)
    reasons["predicted"] = {c: round(float(v), 3) for c, v in zip(sc.classes, row[1 + len(sc.pairs) :])}
    return reasons


def _report(progress, stage: str, z: int, nz: int) -> None:
    if progress is not None:
        progress(PlaneEvent(stage=stage, plane=z + 1, planes=nz))


def suggestion_paths(path: str | Path) -> list[Path]:
    """What :func:`write_suggestions` writes for ``NAME.zip``: it, ``NAME.csv``, ``NAME.json``, ``NAME-slices.csv``."""
    path = Path(path)
    return [path, path.with_suffix(".csv"), path.with_suffix(".json"), path.with_name(f"{path.stem}-slices.csv")]


def suggestion_rois(result: SuggestResult, stack: bool) -> list:
    """``suggest-N`` rectangles, each followed by its ``suggest-N-focus-M`` polygons (roifile ROIs).

    Parameters
    ----------
    result : SuggestResult
    stack : bool
        Whether the image has several planes (ROIs then carry their 1-based slice position).

    Returns
    -------
    list of roifile.ImagejRoi
    """
    import roifile

    rois = []
    for i, c in enumerate(result.suggestions, 1):
        position = c.z + 1 if stack else 0
        rect = roifile.ImagejRoi(
            roitype=roifile.ROI_TYPE.RECT, name=f"suggest-{i}", top=c.y0, left=c.x0, bottom=c.y1, right=c.x1
        )
        rect.position = position
        rois.append(rect)
        for m, region in enumerate(c.focus, 1):
            roi = roifile.ImagejRoi.frompoints(region.polygon, name=f"suggest-{i}-focus-{m}")
            roi.roitype = roifile.ROI_TYPE.POLYGON
            roi.position = position
            rois.append(roi)
    return rois


def suggestion_rows(result: SuggestResult) -> list[dict]:
    """One row per suggestion: name, 1-based slice, box, score, its reasons and its focus regions."""
    rows = []
    for i, c in enumerate(result.suggestions, 1):
        rows.append(
            {
                "name": f"suggest-{i}",
                "slice": c.z + 1,
                "x": c.x0,
                "y": c.y0,
                "width": c.x1 - c.x0,
                "height": c.y1 - c.y0,
                "score": round(c.score, 5),
                **c.reasons,
                "focus": [{"name": f"suggest-{i}-focus-{m}", **r.as_dict()} for m, r in enumerate(c.focus, 1)],
            }
        )
    return rows


def _write_csv(tmp: Path, rows: list[dict]) -> None:
    """Rows as CSV; nested values (dicts, lists) as JSON text in their cell."""
    flat = [{k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()} for r in rows]
    keys = list(dict.fromkeys(k for r in flat for k in r))
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(flat)


def write_suggestions(path: str | Path, result: SuggestResult, stack: bool) -> list:
    """Write the ROIs of :func:`suggestion_rois` to a RoiSet.zip, and the ranking and slice table beside it.

    Parameters
    ----------
    path : path
        The ``.zip`` to write; the other files of :func:`suggestion_paths` go next to it: ``NAME.csv``
        (one row per suggestion, focus polygons as JSON), ``NAME.json`` (the same with the phase,
        timings and the slice table) and ``NAME-slices.csv`` (:func:`slice_table`).
    result : SuggestResult
    stack : bool
        Whether the image has several planes (ROIs then carry their 1-based slice position).

    Returns
    -------
    list of Path
        The files written.
    """
    import roifile

    paths = suggestion_paths(path)
    rois, rows = suggestion_rois(result, stack), suggestion_rows(result)
    summary = {
        "format": SUGGESTIONS_FORMAT,
        "phase": result.phase,
        "timings_s": result.timings,
        "suggestions": rows,
        "slices": result.slices,
    }
    # Each file is written under its temporary name (planned by the caller) and renamed into place.
    atomic_write(paths[0], lambda tmp: roifile.roiwrite(tmp, rois, mode="w"))
    atomic_write(paths[1], lambda tmp: _write_csv(tmp, rows))
    atomic_write(paths[2], lambda tmp: tmp.write_text(json.dumps(summary, indent=1), encoding="utf-8"))
    atomic_write(paths[3], lambda tmp: _write_csv(tmp, result.slices))
    return paths
