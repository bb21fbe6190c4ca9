"""Class-prior correction (Saerens, Latinne & Decaestecker 2002) for partially labelled training.

A network trained on partial labels learns the class mix of the *labelled* pixels, and annotators
outline classes in about equal amounts however rare they are in the image (thin membranes, small
mitochondria, the background between cells). Its posteriors are then calibrated to the wrong
priors. Bayes' rule says how posteriors change with the priors::

    p_new(c | x)  ∝  p_train(c | x) * prior_new(c) / prior_train(c)

and the EM algorithm of Saerens et al. estimates ``prior_new`` from the unlabelled pixels of the
image itself. For a softmax network the correction is a constant shift of the output logits,
``log(prior_new / prior_train)``, which :func:`shift_output_bias` folds into the output layer's bias,
so prediction costs nothing more and every front end (and an exported model) sees the same model.

A network also has a bias of its own: trained briefly or on few patches, it may predict a class on
fewer of its labelled pixels than were labelled. Measured against the labelled mix, such a network's
mean posterior on the image says the class is rarer than it is, and the correction pushes it further
down. The default (``relative``) therefore measures the image's mean posterior against the network's
own mean posterior on its labelled pixels (:func:`labelled_reference`), weighted as in the loss: for
a network calibrated to the labelled mix the two are the same, and otherwise its bias cancels (the
diagonal of black-box shift estimation; Lipton, Wang & Smola 2018). README *Class priors against
the network's own reference*.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from numpy.typing import ArrayLike

    from .nn.unet import RecurrentUNet

# Priors below this are not trusted: EM may drive a class the network never predicts towards 0, and
# log(0) would remove it for good.
MIN_PRIOR = 1e-3


def effective_training_prior(counts: ArrayLike, weight: ArrayLike) -> np.ndarray:
    """The class mix a network sees when it learns from ``counts`` labelled pixels with loss ``weight``.

    Parameters
    ----------
    counts : array-like, shape (C,)
        Labelled pixels per class.
    weight : array-like, shape (C,)
        Per-class loss weights (see :func:`tem_ij_plugin.losses.class_weights`).

    Returns
    -------
    ndarray, shape (C,)
        Sums to 1; every entry at least :data:`MIN_PRIOR` (then renormalised).
    """
    mass = np.asarray(counts, np.float64) * np.asarray(weight, np.float64)
    return _normalised(mass)


def _normalised(p: np.ndarray) -> np.ndarray:
    p = np.clip(p / p.sum(), MIN_PRIOR, None)
    return p / p.sum()


def em_priors(probs: np.ndarray, train_prior: ArrayLike, max_iter: int = 200, tol: float = 1e-6) -> tuple:
    """Class priors of unlabelled pixels under a classifier calibrated to ``train_prior`` (Saerens EM).

    Parameters
    ----------
    probs : ndarray, shape (N, C)
        The classifier's posteriors on N unlabelled pixels.
    train_prior : array-like, shape (C,)
        The priors its posteriors are calibrated to.
    max_iter : int
    tol : float
        Stop when no prior moves by more than this.

    Returns
    -------
    prior : ndarray, shape (C,)
        The estimated priors of the pixels (sum 1, each at least :data:`MIN_PRIOR`).
    iterations : int
    """
    p = np.asarray(probs, np.float64)
    base = _normalised(np.asarray(train_prior, np.float64))
    prior = base.copy()
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        adj = p * (prior / base)
        adj /= adj.sum(axis=1, keepdims=True)
        new = _normalised(adj.mean(axis=0))
        moved = float(np.abs(new - prior).max())
        prior = new
        if moved < tol:
            break
    return prior, iterations


def logit_shift(image_prior: ArrayLike, train_prior: ArrayLike) -> np.ndarray:
    """The constant added to the logits that turns ``train_prior`` posteriors into ``image_prior`` ones."""
    return np.log(_normalised(np.asarray(image_prior, np.float64))) - np.log(
        _normalised(np.asarray(train_prior, np.float64))
    )


def output_layer(net: RecurrentUNet) -> torch.nn.Conv2d:
    """The final 1x1 convolution of a :class:`~tem_ij_plugin.nn.unet.RecurrentUNet`."""
    return net.unet.out


def shift_output_bias(net: RecurrentUNet, shift: ArrayLike) -> None:
    """Add ``shift`` (C,) to the output logits of ``net`` for good, by changing its output bias.

    With more than one recurrent step every step's softmax is shifted, the fed-back ones included.
    """
    import torch

    layer = output_layer(net)
    with torch.no_grad():
        layer.bias.add_(torch.as_tensor(np.asarray(shift), dtype=layer.bias.dtype, device=layer.bias.device))


def without_correction(net: RecurrentUNet, record: dict | None) -> RecurrentUNet:
    """A copy of ``net`` with a round's prior correction (``record``, or None) taken out of its output bias."""
    import copy

    net = copy.deepcopy(net)
    if record:
        shift_output_bias(net, -np.asarray(record["logit_shift"]))
    return net


def sample_posteriors(
    predict: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    norm: Callable[[np.ndarray], np.ndarray],
    n_crops: int = 16,
    size: int = 256,
    seed: int = 0,
) -> np.ndarray:
    """Posteriors of pixels drawn from the whole image: ``n_crops`` random crops of ``size``.

    Parameters
    ----------
    predict : callable
        Normalised 2-D array -> probabilities (C, H, W).
    image : ndarray, shape (Z, Y, X)
        The raw image (only the crops are read and normalised).
    norm : callable
        Raw crop -> normalised crop.
    n_crops, size : int
    seed : int

    Returns
    -------
    ndarray of float32, shape (N, C)
    """
    rng = np.random.default_rng(seed)
    z_n, h, w = image.shape
    sy, sx = min(size, h), min(size, w)
    out = []
    for _ in range(n_crops):
        z, y, x = rng.integers(z_n), rng.integers(h - sy + 1), rng.integers(w - sx + 1)
        probs = predict(norm(image[z, y : y + sy, x : x + sx]))
        out.append(probs.reshape(probs.shape[0], -1).T)
    return np.concatenate(out).astype(np.float32)


def estimate_correction(
    net: RecurrentUNet,
    image: np.ndarray,
    norm: Callable[[np.ndarray], np.ndarray],
    train_prior: ArrayLike,
    device: torch.device,
    precision: str = "fp32",
    seed: int = 0,
    n_crops: int = 16,
    max_iter: int = 200,
) -> dict:
    """Saerens EM on pixels sampled from ``image``: the priors there and the logit shift towards them.

    Parameters
    ----------
    net : RecurrentUNet
        The trained network (eval mode; not modified).
    image : ndarray, shape (Z, Y, X)
        The raw training image; its unlabelled pixels are what the priors are estimated from.
    norm : callable
        Raw crop -> normalised crop, as in training.
    train_prior : array-like, shape (C,)
        The class mix the network learnt (:func:`effective_training_prior`).
    device : torch.device
    precision : str
    seed : int
    n_crops : int
        Random 256x256 crops to sample (16 = about a million pixels).
    max_iter : int
        EM iterations; 1 is the plain mean of the posteriors, a cautious estimate that stays nearer
        the training prior.

    Returns
    -------
    dict
        ``train_prior``, ``image_prior``, ``logit_shift`` (lists of floats, one per class) and
        ``em_iterations``.
    """
    from .predict import predict_plane

    base = _normalised(np.asarray(train_prior, np.float64))
    probs = sample_posteriors(lambda a: predict_plane(net, a, device, precision), image, norm, n_crops, seed=seed)
    prior, iterations = em_priors(probs, base, max_iter=max_iter)
    return {
        "train_prior": [round(float(v), 5) for v in base],
        "image_prior": [round(float(v), 5) for v in prior],
        "logit_shift": [round(float(v), 5) for v in logit_shift(prior, base)],
        "em_iterations": iterations,
    }


def labelled_reference(
    predict: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    norm: Callable[[np.ndarray], np.ndarray],
    labels: np.ndarray,
    patches: list,
    train_prior: ArrayLike,
    margin: int = 32,
) -> np.ndarray:
    """The network's mean posterior on the labelled pixels of ``patches``, classes mixed as in the loss.

    A network calibrated to ``train_prior`` would give ``train_prior`` back; what it gives instead is
    its own bias, which a prior shift measured against this reference cancels.

    Parameters
    ----------
    predict : callable
        Normalised 2-D array -> probabilities (C, H, W).
    image : ndarray, shape (Z, Y, X)
        The raw training image.
    norm : callable
        Raw crop -> normalised crop.
    labels : ndarray, shape (Z, Y, X)
        Class index per pixel, -1 where unlabelled.
    patches : list of :class:`~tem_ij_plugin.patches.Patch`
        The training patches (each predicted with ``margin`` pixels of context where the image has them).
    train_prior : array-like, shape (C,)
        How the loss weighs the classes (:func:`effective_training_prior`).
    margin : int

    Returns
    -------
    ndarray, shape (C,)
        Sums to 1; every entry at least :data:`MIN_PRIOR`.
    """
    weight = np.asarray(train_prior, np.float64)
    n = len(weight)
    sums, counts = np.zeros((n, n)), np.zeros(n)
    _, h, w = image.shape
    for p in patches:
        y0, x0, y1, x1 = max(0, p.y0 - margin), max(0, p.x0 - margin), min(h, p.y1 + margin), min(w, p.x1 + margin)
        probs = predict(norm(image[p.z, y0:y1, x0:x1]))[:, p.y0 - y0 : p.y1 - y0, p.x0 - x0 : p.x1 - x0]
        lab = labels[p.z, p.y0 : p.y1, p.x0 : p.x1]
        for c in range(n):
            inside = lab == c
            counts[c] += inside.sum()
            sums[c] += probs[:, inside].sum(axis=1)
    by_class = sums / np.maximum(counts, 1)[:, None]  # row c: the mean posterior where class c is labelled
    return _normalised(np.where(counts > 0, weight, 0.0) @ by_class)


def estimate_relative_correction(
    net: RecurrentUNet,
    image: np.ndarray,
    norm: Callable[[np.ndarray], np.ndarray],
    labels: np.ndarray,
    patches: list,
    labelled_mix: ArrayLike,
    device: torch.device,
    precision: str = "fp32",
    seed: int = 0,
) -> dict:
    """One EM step on ``image`` measured against the network's own reference (``relative``).

    The parameters are those of :func:`labelled_reference` and :func:`estimate_correction`
    (``labelled_mix`` is the loss-weighted labelled mix, :func:`effective_training_prior`).

    Returns
    -------
    dict
        As :func:`estimate_correction` (``train_prior`` is the labelled mix), with ``reference``, what
        ``logit_shift`` is measured against.
    """
    from .predict import predict_plane

    reference = labelled_reference(
        lambda a: predict_plane(net, a, device, precision), image, norm, labels, patches, labelled_mix
    )
    rec = estimate_correction(net, image, norm, reference, device, precision, seed, max_iter=1)
    rec["train_prior"] = [round(float(v), 5) for v in _normalised(np.asarray(labelled_mix, np.float64))]
    rec["reference"] = [round(float(v), 5) for v in reference]
    return rec
