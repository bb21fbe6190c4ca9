"""Class-prior corrections scored after the fact, on the raw network's probabilities.

Adding a shift to the log-probabilities of a one-step network is exactly shifting its output bias, so
every correction below is scored from one prediction of the training and test images, without
predicting again. Used by ``label_gap.py`` (full trainings) and ``acquisition.py`` (short rounds).

* ``rel1`` (the shipped ``relative`` correction): the image's mean posterior against the network's own
  mean posterior on its labelled training pixels (classes weighted as in the loss);
* ``rel1h``: half of ``rel1``'s shift;
* ``relem``: Saerens' EM run to convergence (not one step) against the same reference, on every
  4th pixel in y and x of the training image;
* ``relplane``: ``rel1`` shrunk per class by how much the training planes agree on it: the centred
  per-plane shifts have mean ``m`` and variance ``v`` over the planes, and the shift is ``rel1``'s
  times ``m**2 / (m**2 + v)`` (a class whose mix varies from plane to plane gets less);
* ``bbse``: black-box shift estimation with soft confusions (Lipton et al. 2018), against the labelled
  mix the loss saw (:func:`bbse_prior`);
* ``trel`` / ``tplane``: as ``rel1``, with the mean posterior of the whole test stack / of each test
  plane;
* ``toracle``: a ceiling, not a method: the best shift of a grid (steps of 0.2 from -2 to 2 per class
  against the first), chosen on the test truth.
"""

from __future__ import annotations

import itertools

import numpy as np

from tem_ij_plugin.metrics import miou
from tem_ij_plugin.priors import em_priors

SHIFTS = np.linspace(-2.0, 2.0, 21)  # the grid ``toracle`` searches, per class
METHODS = ("rel1", "rel1h", "relem", "relplane", "bbse", "trel", "tplane", "toracle")


def labelled_posteriors(probs: np.ndarray, labels: np.ndarray, patches) -> np.ndarray:
    """Row ``c``: the mean posterior (C,) on the labelled pixels of class ``c`` inside ``patches``.

    ``probs`` (Z, C, Y, X) and ``labels`` (Z, Y, X; -1 unlabelled) cover the same planes; ``patches``
    have ``z, y0, x0, y1, x1``.
    """
    inside = np.zeros(labels.shape, bool)
    for p in patches:
        inside[p.z, p.y0 : p.y1, p.x0 : p.x1] = True
    by_class = probs.transpose(1, 0, 2, 3)
    return np.stack([by_class[:, inside & (labels == c)].mean(axis=1) for c in range(probs.shape[1])])


def bbse_prior(image_mean: np.ndarray, by_class: np.ndarray, floor: float = 0.01) -> np.ndarray:
    """The image's class priors by black-box shift estimation with soft confusions.

    ``by_class[c]`` is the network's mean posterior on the labelled pixels of class ``c``, so the image's
    mean posterior is ``q @ by_class`` for its priors ``q``: solved by least squares, kept at ``floor``
    or above and normalised.
    """
    q, *_ = np.linalg.lstsq(by_class.T, image_mean, rcond=None)
    q = np.clip(q, floor, None)
    return q / q.sum()


def plane_agreement(train_probs: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per class, ``m**2 / (m**2 + v)`` of the centred per-plane shifts against ``reference`` (see the module)."""
    per_plane = np.log(train_probs.mean(axis=(2, 3), dtype=np.float64)) - np.log(reference)
    per_plane -= per_plane.mean(axis=1, keepdims=True)
    m, v = per_plane.mean(axis=0), per_plane.var(axis=0)
    return m**2 / np.maximum(m**2 + v, 1e-12)


def every_4th_pixel(probs: np.ndarray) -> np.ndarray:
    """Every 4th pixel in y and x of ``probs`` (Z, C, Y, X) as rows (N, C): EM needs pixels, not all of them."""
    return probs[:, :, ::4, ::4].transpose(0, 2, 3, 1).reshape(-1, probs.shape[1])


def shift_scores(train_probs, test_probs, test_truth, by_class, train_prior, wanted) -> tuple:
    """Test mIoU of each correction in ``wanted`` (see the module), and the ``rel1`` reference.

    Parameters
    ----------
    train_probs, test_probs : ndarray, shape (Z, C, Y, X)
        The raw network's probabilities on the training image and on the test stack.
    test_truth : ndarray of int, shape (Z, Y, X)
    by_class : ndarray, shape (C, C)
        :func:`labelled_posteriors` of the training image.
    train_prior : array-like, shape (C,)
        The labelled mix as the loss weighs it.
    wanted : iterable of str
        Names from :data:`METHODS`.
    """
    n = by_class.shape[0]
    train_prior = np.asarray(train_prior, np.float64)
    reference = train_prior @ by_class
    log_p = np.log(np.clip(test_probs, 1e-30, None))

    def shifted(shift):  # (C,) or (Z, C): added to the log-probabilities
        shift = np.broadcast_to(shift, (len(test_probs), n))[:, :, None, None]
        return round(miou((log_p + shift).argmax(1), test_truth, n), 4)

    def score(image_prior):  # (C,) or (Z, C), against the network's own reference
        return shifted(np.log(image_prior) - np.log(reference))

    image_mean = train_probs.mean(axis=(0, 2, 3))
    rel1 = np.log(image_mean) - np.log(reference)
    methods = {
        "rel1": lambda: shifted(rel1),
        "rel1h": lambda: score(np.sqrt(image_mean * reference)),
        "relem": lambda: score(em_priors(every_4th_pixel(train_probs), reference)[0]),
        "relplane": lambda: shifted(plane_agreement(train_probs, reference) * (rel1 - rel1.mean())),
        "bbse": lambda: shifted(np.log(bbse_prior(image_mean, by_class)) - np.log(train_prior)),
        "trel": lambda: score(test_probs.mean(axis=(0, 2, 3))),
        "tplane": lambda: score(test_probs.mean(axis=(2, 3))),
        "toracle": lambda: max(shifted(np.array((0.0, *d))) for d in itertools.product(SHIFTS, repeat=n - 1)),
    }
    return {v: methods[v]() for v in wanted}, [round(float(v), 5) for v in reference]
