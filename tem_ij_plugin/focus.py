"""Where to draw inside a suggested window: the sub-regions the model is least sure about.

A suggestion is a whole patch, but people outline only part of it. The focus regions are the
connected areas of the window where the smoothed uncertainty is highest, ranked by their total
uncertainty, so that a person outlines the objects there first instead of the easy interior.
Smoothing matters: every predicted boundary is a thin line of high entropy, which teaches little;
a broad uncertain area (a structure the model has not seen, a texture it confuses) survives the
smoothing and is what the regions pick out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_AREA = 64  # pixels: smaller regions are not worth an outline


@dataclass(frozen=True)
class FocusRegion:
    """One region to outline first: a polygon in image pixels and how unsure the model is there.

    Attributes
    ----------
    polygon : ndarray of float, shape (N, 2)
        Vertices as (x, y) image coordinates, pixel corners at integers (ImageJ's convention).
    uncertainty : float
        Mean smoothed uncertainty (0-1) inside the region.
    area : int
        Pixels inside the region.
    """

    polygon: np.ndarray
    uncertainty: float
    area: int

    def as_dict(self) -> dict:
        """JSON-ready form: polygon vertices rounded to 0.1 px."""
        return {
            "polygon": np.round(self.polygon, 1).tolist(),
            "uncertainty": round(self.uncertainty, 4),
            "area_px": self.area,
        }


def smoothed(uncertainty: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    """The uncertainty map smoothed by a Gaussian of ``sigma`` pixels (float32)."""
    from scipy import ndimage as ndi

    return ndi.gaussian_filter(uncertainty.astype(np.float32), sigma)


def focus_mask(
    uncertainty: np.ndarray, area_fraction: float = 0.1, sigma: float = 4.0, floor: float = 0.05
) -> np.ndarray:
    """Pixels of the window that belong to a focus region (bool, same shape as ``uncertainty``).

    A pixel counts where the smoothed uncertainty reaches the window's ``1 - area_fraction``
    quantile, half its maximum (so that a region ends at the half-height of its uncertainty, not
    wherever the area allowance runs out) and ``floor``.

    Parameters
    ----------
    uncertainty : ndarray of float, shape (H, W)
        Per-pixel uncertainty in [0, 1] (the normalised entropy of the probabilities).
    area_fraction : float
        At most this fraction of the window is marked.
    sigma : float
        Smoothing (pixels) before thresholding; removes thin boundary lines.
    floor : float
        Smoothed uncertainty below this never counts: a window the model is sure about gets no focus.
    """
    u = smoothed(uncertainty, sigma)
    threshold = max(float(np.quantile(u, 1 - area_fraction)), 0.5 * float(u.max()), floor)
    return u >= threshold


def focus_regions(
    uncertainty: np.ndarray,
    origin: tuple[int, int] = (0, 0),
    max_regions: int = 3,
    area_fraction: float = 0.1,
    sigma: float = 4.0,
    relative: float = 0.5,
) -> list[FocusRegion]:
    """The ``max_regions`` most uncertain connected areas of a window, most uncertain (in total) first.

    Parameters
    ----------
    uncertainty : ndarray of float, shape (H, W)
        Per-pixel uncertainty of the window, in [0, 1].
    origin : (int, int)
        The window's (y0, x0) in the image: polygons come back in image coordinates.
    max_regions : int
    area_fraction, sigma : float
        See :func:`focus_mask`.
    relative : float
        A region whose mean uncertainty is below this fraction of the most uncertain region's is
        dropped: the mask's area limit must not pad the list with near-certain areas.

    Returns
    -------
    list of FocusRegion
    """
    from scipy import ndimage as ndi
    from skimage.measure import approximate_polygon, find_contours

    # Ranked on the smoothed map too: on the raw one a thin line of full entropy would outrank a
    # broad uncertain area.
    u = smoothed(uncertainty, sigma)
    lab, n = ndi.label(focus_mask(uncertainty, area_fraction, sigma))
    if n == 0:
        return []
    ids = np.arange(1, n + 1)
    areas = ndi.sum_labels(np.ones_like(u), lab, ids)
    mass = ndi.sum_labels(u, lab, ids)
    mean = mass / areas
    big = areas >= MIN_AREA
    if not big.any():
        return []
    keep = [i for i in ids[np.argsort(-mass)] if big[i - 1] and mean[i - 1] >= relative * mean[big].max()]
    regions = []
    for i in keep[:max_regions]:
        comp = ndi.binary_fill_holes(lab == i)
        contour = max(find_contours(np.pad(comp, 1).astype(np.float32), 0.5), key=len)
        contour = approximate_polygon(contour, tolerance=1.0)[:-1]  # closed: the last vertex repeats the first
        # (row, col) on pixel centres of the padded mask -> ImageJ (x, y): -1 (padding) +0.5 (centre).
        xy = np.stack([contour[:, 1] - 0.5 + origin[1], contour[:, 0] - 0.5 + origin[0]], axis=1)
        regions.append(FocusRegion(xy, float(mean[i - 1]), int(areas[i - 1])))
    return regions
