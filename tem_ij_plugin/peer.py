"""The random-forest peer: what Trainable Weka Segmentation, ilastik and Labkit do, as a baseline.

Multiscale intensity, edge and texture features (scikit-image) per pixel and a random forest
(scikit-learn) fitted on the labelled pixels. Needs the ``[experiment]`` extra (scikit-learn).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import UserError

if TYPE_CHECKING:
    from sklearn.ensemble import RandomForestClassifier

MAX_SAMPLES = 300_000  # ilastik/Labkit train on far fewer; this keeps a fit under a minute on 2 cores


def _require_sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise UserError("the random-forest peer needs scikit-learn: pip install 'tem-ij-plugin[experiment]'") from exc


class RandomForestPeer:
    """Random-forest pixel classifier on one image; features are computed once per plane and kept.

    Parameters
    ----------
    image : ndarray, shape (Z, Y, X)
        The whole image (features of every plane may be needed to fit or predict).
    seed : int
    n_estimators : int
    """

    def __init__(self, image: np.ndarray, seed: int = 0, n_estimators: int = 100):
        _require_sklearn()
        from .normalization import normalization_range

        self.image = image
        self.seed = seed
        self.n_estimators = n_estimators
        self.lo, self.hi = normalization_range(image)
        self._features: dict = {}

    def features(self, z: int) -> np.ndarray:
        """Per-pixel features of plane ``z``, shape (Y, X, F), float32 (cached)."""
        if z not in self._features:
            from skimage.feature import multiscale_basic_features

            from .normalization import normalize

            f = multiscale_basic_features(
                normalize(self.image[z], self.lo, self.hi),
                intensity=True,
                edges=True,
                texture=True,
                sigma_min=1,
                sigma_max=16,
            )
            self._features[z] = f.astype(np.float32)
        return self._features[z]

    def fit(self, labels: np.ndarray) -> RandomForestClassifier:
        """Fit on the labelled pixels of a (Z, Y, X) partial label map; returns the classifier."""
        from sklearn.ensemble import RandomForestClassifier

        xs, ys = [], []
        for z in range(labels.shape[0]):
            m = labels[z] >= 0
            if m.any():
                xs.append(self.features(z)[m])
                ys.append(labels[z][m])
        if not xs:
            raise UserError("the random-forest peer needs labelled pixels")
        x, y = np.concatenate(xs), np.concatenate(ys)
        if len(y) > MAX_SAMPLES:
            keep = np.random.default_rng(self.seed).choice(len(y), MAX_SAMPLES, replace=False)
            x, y = x[keep], y[keep]
        clf = RandomForestClassifier(n_estimators=self.n_estimators, n_jobs=-1, random_state=self.seed)
        clf.fit(x, y)
        return clf

    def predict(self, clf: RandomForestClassifier, z: int, mask: np.ndarray | None = None) -> np.ndarray:
        """Class of every pixel of plane ``z`` (Y, X), or of the pixels where ``mask`` is true (1-D)."""
        f = self.features(z)
        if mask is not None:
            return clf.predict(f[mask])
        return clf.predict(f.reshape(-1, f.shape[-1])).reshape(f.shape[:2])
