"""The annotation patch grid: which grid cells hold labels, and the train/validation split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .annotations import UNLABELLED
from .errors import UserError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence


@dataclass(frozen=True)
class Patch:
    """A box in a (Z, Y, X) image: plane ``z`` (0-based), pixels ``[y0, y1) x [x0, x1)``.

    The one box type: grid cells, training and validation patches, and (with a score) suggestions.
    """

    z: int
    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def grid_index(self) -> tuple:
        """(z, y0, x0): the box's plane and top-left corner, which identify its grid cell."""
        return (self.z, self.y0, self.x0)

    def as_list(self) -> list:
        """The box as a JSON-able list [z, y0, x0, y1, x1]."""
        return [self.z, self.y0, self.x0, self.y1, self.x1]

    def box(self) -> tuple:
        """The box as a tuple (z, y0, x0, y1, x1)."""
        return self.z, self.y0, self.x0, self.y1, self.x1

    def overlaps(self, z: int, y0: int, x0: int, y1: int, x1: int) -> bool:
        """Whether the box ``[y0, y1) x [x0, x1)`` in plane ``z`` overlaps this one."""
        return z == self.z and y0 < self.y1 and self.y0 < y1 and x0 < self.x1 and self.x0 < x1


def grid_boxes(shape: tuple[int, ...], size: int, stride: int | None = None, drop_slivers: bool = False) -> np.ndarray:
    """Windows of side ``size`` starting every ``stride`` pixels of a (Z, Y, X) image (default: the patch grid).

    On the patch grid, cells are clipped at the image edge; ``drop_slivers`` drops edge cells less than
    half a window high or wide (suggestions), unless the image itself is smaller than a window. With a
    finer stride every window is whole, the last one flush with the image edge.

    Returns
    -------
    ndarray of int, shape (N, 5)
        Rows of (z, y0, x0, y1, x1).

    >>> grid_boxes((1, 300, 256), 256).tolist()
    [[0, 0, 0, 256, 256], [0, 256, 0, 300, 256]]
    >>> grid_boxes((1, 300, 256), 256, drop_slivers=True).tolist()
    [[0, 0, 0, 256, 256]]
    >>> grid_boxes((1, 300, 256), 256, stride=128).tolist()
    [[0, 0, 0, 256, 256], [0, 44, 0, 300, 256]]
    """
    nz, h, w = shape
    stride = stride or size

    def starts(n):
        if stride == size:  # the patch grid: cells as annotators see them
            keep = min(size, n) / 2 if drop_slivers else 0
            return [s for s in range(0, n, size) if min(s + size, n) - s >= keep]
        out = list(range(0, max(n - size, 0) + 1, stride))
        if out[-1] + size < n:
            out.append(n - size)
        return out

    rows = [(z, y, x, min(y + size, h), min(x + size, w)) for z in range(nz) for y in starts(h) for x in starts(w)]
    return np.array(rows, dtype=np.int64).reshape(-1, 5)


def grid(shape: tuple[int, ...], size: int) -> list:
    """Every grid cell of a (Z, Y, X) image as a :class:`Patch`; cells at the right/bottom edge may be smaller.

    >>> [p.as_list() for p in grid((1, 300, 256), 256)]
    [[0, 0, 0, 256, 256], [0, 256, 0, 300, 256]]
    """
    return [Patch(*map(int, b)) for b in grid_boxes(shape, size)]


def annotated_patches(labels: np.ndarray, size: int) -> list:
    """Grid cells of a (Z, Y, X) label map that hold at least one labelled pixel."""
    return [p for p in grid(labels.shape, size) if (labels[p.z, p.y0 : p.y1, p.x0 : p.x1] != UNLABELLED).any()]


MIN_VALIDATION = 2


def round_history(rounds: list) -> tuple[list, set]:
    """(earlier validation patches still unseen, patches a round learnt) from a model's training rounds.

    What :func:`split` keeps held out (``keep_val``) and avoids holding out (``trained``) for a round
    warm-started from that model. A refit trained on its validation patches too: they are learnt.
    """
    learnt = {
        tuple(t) for r in rounds for t in (r.get("train_patches") or []) + (r.get("refit") or {}).get("patches", [])
    }
    earlier = [v for r in rounds for v in r.get("val_patches") or [] if tuple(v) not in learnt]
    return earlier, learnt


def default_validation_count(n_patches: int) -> int:
    """About 20 % of the annotated patches once that makes ``MIN_VALIDATION`` (8 or more patches); else none.

    One partially labelled patch is too weak a judge: in warm-started rounds on ISBI it stopped a round
    early and preferred to its starting model a checkpoint that the dense truth scored 0.04 lower, and
    it held out a quarter of a 4-patch round's labels. Below two held-out patches every patch trains
    and the smoothed training loss drives stopping, as it always did below three patches (README,
    interactive rounds, for the measured effect).
    """
    n = int(round(0.2 * n_patches))
    return n if n >= MIN_VALIDATION else 0


def split(
    labels: np.ndarray,
    patches: list,
    n_val: int | None,
    seed: int,
    n_classes: int,
    keep_val: Iterable[Sequence[int]] = (),
    trained: Iterable[Sequence[int]] = (),
) -> tuple[list[Patch], list[Patch]]:
    """Choose validation patches; the rest train.

    The split is random (seeded) but keeps every class present in the training patches, and
    prefers validation patches that hold more than one class so that the score is informative.
    Patches in ``keep_val`` (as ``Patch.as_list()``: an earlier round's validation patches) stay in
    validation, so that a warm-started round is judged on everything held out before and never trains
    on it (unless ``n_val`` is 0); the validation set grows to the default size when they are fewer.
    Patches in ``trained`` (an earlier round's training patches) are held out only when no other patch
    can be: a warm start scored on a patch it learnt from would look better than it is.

    Returns
    -------
    (train, val) : tuple of lists of Patch
    """
    n = len(patches)
    if n == 0:
        raise UserError("no annotated patch found")
    kept = {tuple(k) for k in keep_val}
    forced = [i for i, p in enumerate(patches) if tuple(p.as_list()) in kept][: n - 1]
    # The default keeps every earlier held-out patch held out even below its own minimum; 0 asked for is 0.
    n_val = max(default_validation_count(n), len(forced)) if n_val is None else n_val
    if n_val >= n:
        raise UserError(f"{n_val} validation patches requested but only {n} patch(es) are annotated")
    if n_val == 0:
        return list(patches), []
    rng = np.random.default_rng(seed)
    seen = {tuple(k) for k in trained}
    learnt = {i for i, p in enumerate(patches) if tuple(p.as_list()) in seen}
    n_val = max(n_val, len(forced))

    def classes_in(ps):
        found = set()
        for p in ps:
            found |= set(np.unique(labels[p.z, p.y0 : p.y1, p.x0 : p.x1]).tolist())
        return found - {UNLABELLED}

    every = classes_in(patches)
    multi = [i for i, p in enumerate(patches) if len(classes_in([p])) > 1]
    best = None
    for _ in range(200):
        order = rng.permutation(n)
        # Multi-class patches first: a one-class validation patch cannot tell the classes apart.
        order = sorted(order, key=lambda i: (i not in forced, i in learnt, i not in multi, rng.random()))
        val_idx = set(order[:n_val])
        train = [p for i, p in enumerate(patches) if i not in val_idx]
        if classes_in(train) == every:
            best = val_idx
            break
        if best is None:
            best = val_idx
    val = [p for i, p in enumerate(patches) if i in best]
    train = [p for i, p in enumerate(patches) if i not in best]
    return train, val
