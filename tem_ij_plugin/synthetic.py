"""Synthetic TEM-like images with ground truth, and a simulated annotator (demo, tests, benchmarks).

The images mimic a TEM section of tissue: irregular cells with dark membranes and grainy cytoplasm,
nuclei and dark mitochondria inside some cells, bright extracellular space with sparse specks,
uneven illumination, blur and shot noise. No file is downloaded; a seed gives the same image.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .annotations import Shape

SYNTHETIC_CLASSES = ["background", "cell"]


def _smooth_noise(rng, shape, sigma):
    if sigma >= 400:
        # Very smooth fields (illumination of large images) are drawn on a coarse grid and
        # interpolated: the same kind of field in seconds instead of minutes. Smaller images keep
        # the exact full-resolution path (and so their published numbers).
        f = int(sigma // 50)
        small = [max(2, -(-n // f)) for n in shape]
        n = ndi.gaussian_filter(rng.standard_normal(small).astype(np.float32), sigma / f)
        n = ndi.zoom(n, [a / b for a, b in zip(shape, small)], order=1)[: shape[0], : shape[1]]
    else:
        n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return n / (n.std() + 1e-8)


def _blob(rng, h, w, cy, cx, radius, wobble=0.25, harmonics=5):
    """Mask of a star-shaped blob around (cy, cx) with a wobbly radius, inside a bounding window."""
    r = int(radius * (1 + wobble * 2)) + 2
    y0, y1, x0, x1 = max(0, cy - r), min(h, cy + r + 1), max(0, cx - r), min(w, cx + r + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    theta = np.arctan2(yy - cy, xx - cx)
    rad = np.full(theta.shape, float(radius))
    for k in range(2, harmonics + 2):
        rad += radius * wobble / k * rng.uniform(0.3, 1.0) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    inside = np.hypot(yy - cy, xx - cx) < rad
    return (slice(y0, y1), slice(x0, x1)), inside


def make_tem_image(
    height: int = 1024, width: int = 1024, seed: int = 0, cell_radius: float = 55.0, density: float = 0.55
):
    """A TEM-like 8-bit image and its ground truth.

    Parameters
    ----------
    height, width : int
        Image size.
    seed : int
        Random seed (same seed, same image).
    cell_radius : float
        Mean cell radius in pixels.
    density : float
        Rough fraction of the area covered by cells.

    Returns
    -------
    image : ndarray of uint8, shape (height, width)
    truth : ndarray of uint8, shape (height, width)
        0 = background (extracellular space), 1 = cell (membrane included).
    """
    rng = np.random.default_rng(seed)
    h, w = height, width
    cells = np.zeros((h, w), dtype=np.int32)
    target = density * h * w
    covered = 0
    label = 0
    tries = 0
    while covered < target and tries < 400:
        tries += 1
        radius = cell_radius * rng.uniform(0.6, 1.4)
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        core = int(radius * 0.6)
        if cells[max(0, cy - core) : cy + core + 1, max(0, cx - core) : cx + core + 1].any():
            continue  # cheap rejection before drawing the blob
        sl, inside = _blob(rng, h, w, cy, cx, radius)
        # Cells keep a gap of extracellular space between them, as in fixed tissue.
        grown = ndi.binary_dilation(inside, iterations=4)
        if (cells[sl][grown] > 0).any():
            continue
        label += 1
        tries = 0
        cells[sl][inside] = label
        covered += int(inside.sum())
    truth = (cells > 0).astype(np.uint8)

    # Electron density: higher = darker. Extracellular resin is light, cytoplasm grainy grey.
    density_map = 0.22 + 0.06 * _smooth_noise(rng, (h, w), 6) + 0.04 * _smooth_noise(rng, (h, w), 1.5)
    grain = 0.07 * _smooth_noise(rng, (h, w), 1.2) + 0.04 * _smooth_noise(rng, (h, w), 3)
    cyto = 0.38 + grain
    density_map = np.where(truth > 0, cyto, density_map)
    specks = (rng.random((h, w)) < 0.0015) & (truth == 0)
    density_map += 0.35 * ndi.gaussian_filter(specks.astype(np.float32), 1.2) * 8
    for lab, box in enumerate(ndi.find_objects(cells), start=1):
        if box is None:
            continue
        own = cells[box] == lab
        ys, xs = np.nonzero(own)
        if ys.size < 200:
            continue
        ys, xs = ys + box[0].start, xs + box[1].start
        cy, cx = int(ys.mean()), int(xs.mean())
        r = np.sqrt(ys.size / np.pi)
        if rng.random() < 0.6:
            sl, nuc = _blob(
                rng,
                h,
                w,
                cy + int(rng.integers(-r // 4, r // 4 + 1)),
                cx + int(rng.integers(-r // 4, r // 4 + 1)),
                r * 0.45,
                wobble=0.12,
            )
            nuc &= cells[sl] == lab
            env = nuc & ~ndi.binary_erosion(nuc, iterations=2)
            density_map[sl][nuc] += 0.08 + 0.06 * rng.standard_normal(int(nuc.sum())).astype(np.float32)
            density_map[sl][env] += 0.25
        for _ in range(int(rng.integers(0, 4))):
            k = rng.integers(ys.size)
            sl, mito = _blob(rng, h, w, int(ys[k]), int(xs[k]), r * rng.uniform(0.1, 0.18), wobble=0.35, harmonics=2)
            mito &= cells[sl] == lab
            density_map[sl][mito] += 0.3
    # Membranes: a dark band on the inside edge of every cell.
    membrane = (truth > 0) & ~ndi.binary_erosion(truth > 0, iterations=2)
    density_map[membrane] += 0.38
    illumination = 1.0 + 0.08 * _smooth_noise(rng, (h, w), max(h, w) / 3)
    intensity = np.exp(-1.6 * density_map) * illumination
    intensity = ndi.gaussian_filter(intensity, 0.8)
    counts = rng.poisson(np.clip(intensity, 0, None) * 60.0) / 60.0
    counts = counts + rng.normal(0, 0.02, counts.shape)
    lo, hi = np.percentile(counts, [0.2, 99.8])
    image = np.clip((counts - lo) / (hi - lo) * 235 + 10, 0, 255).astype(np.uint8)
    return image, truth


def simulate_annotations(
    truth: np.ndarray,
    patches: list[tuple[int, int, int, int]],
    classes: list[str],
    rng: np.random.Generator,
    coverage: float = 1 / 3,
    margin: int = 2,
    slice_position: int = 0,
    focus: np.ndarray | None = None,
) -> list:
    """A careful but partial annotator: polygons that stay ``margin`` pixels inside true regions.

    For every patch, each class gets an equal share of ``coverage`` of the patch area, outlined as
    polygons around pieces of that class (eroded by ``margin``; thin classes that vanish at that
    margin fall back to 1 pixel). Most of each patch stays unlabelled, as when a person outlines a few
    cells and a few background areas.

    Parameters
    ----------
    truth : ndarray of int, shape (Y, X)
        Dense ground truth, class indices into ``classes``.
    patches : list of (y0, x0, y1, x1)
        Patch boxes to annotate.
    classes : list of str
        Class names; ROI names are ``<class>-<n>``.
    rng : numpy.random.Generator
    coverage : float
        Target labelled fraction of each patch.
    margin : int
        Distance the polygons keep from true boundaries.
    slice_position : int
        1-based slice for the ROI positions (0 for a 2-D image).
    focus : ndarray of bool, shape (Y, X), optional
        Where to draw first (the focus regions of a suggestion): each polygon starts at a pixel
        inside ``focus`` while there is one left for its class, elsewhere after that. The budget
        per class is the same, so focus changes where the labels are, not how many.

    Returns
    -------
    list of Shape
    """
    from skimage.measure import find_contours

    shapes = []
    count = {c: 0 for c in classes}
    for y0, x0, y1, x1 in patches:
        area = (y1 - y0) * (x1 - x0)
        for ci in rng.permutation(len(classes)):
            cls = classes[ci]
            region = truth[y0:y1, x0:x1] == ci
            avail = ndi.binary_erosion(region, iterations=margin, border_value=1)
            if not avail.any():
                avail = ndi.binary_erosion(region, iterations=1, border_value=1)
            budget = coverage * area / len(classes)
            done = 0
            for _ in range(40):
                if done >= budget or not avail.any():
                    break
                start = avail & focus[y0:y1, x0:x1] if focus is not None else avail
                ys, xs = np.nonzero(start if start.any() else avail)
                k = rng.integers(ys.size)
                sy, sx = ys[k], xs[k]
                size = int(rng.integers(24, 112))
                comp = None
                for _shrink in range(4):
                    by0, bx0 = max(0, sy - size // 2), max(0, sx - size // 2)
                    box = np.zeros_like(avail)
                    box[by0 : sy + size // 2 + 1, bx0 : sx + size // 2 + 1] = True
                    lab, _ = ndi.label(avail & box)
                    cand = lab == lab[sy, sx]
                    if (ndi.binary_fill_holes(cand) == cand).all():
                        comp = cand
                        break
                    size //= 2
                if comp is None or comp.sum() < 12:
                    avail[sy, sx] = False
                    continue
                contour = max(find_contours(np.pad(comp, 1).astype(np.float32), 0.5), key=len)
                # find_contours gives (row, col) on pixel centres of the padded mask; ImageJ wants (x, y)
                # with pixel corners at integers, hence -1 (padding) +0.5 (centre).
                xy = np.stack([contour[:, 1] - 0.5 + x0, contour[:, 0] - 0.5 + y0], axis=1)
                count[cls] += 1
                shapes.append(Shape(f"{cls}-{count[cls]}", "polygon", [xy], slice_position))
                avail &= ~ndi.binary_dilation(comp, iterations=2)
                done += int(comp.sum())
    return shapes
