"""Masked losses: unlabelled pixels (label -1) contribute exactly zero loss and zero gradient."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from .annotations import UNLABELLED

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy as np


def class_weights(counts: np.ndarray, power: float) -> torch.Tensor:
    """Loss weights ``(1 / frequency) ** power``, normalised to a labelled-pixel mean of 1.

    ``power`` 0 gives equal weights; 1 makes every class contribute equally however little of it was
    labelled. Annotators outline big regions more than thin ones, so the labelled mix under-states
    thin classes such as membranes; a partial correction counters that.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64).clamp_min(1.0)
    freq = counts / counts.sum()
    w = freq ** (-power)
    w = w / (w * freq).sum()
    return w.float()


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None):
    """Cross-entropy over labelled pixels only.

    Parameters
    ----------
    logits : torch.Tensor, shape (B, C, H, W)
    labels : torch.Tensor of int64, shape (B, H, W)
        Class index, or -1 for unlabelled.
    weight : torch.Tensor, shape (C,), optional

    Returns
    -------
    torch.Tensor
        Scalar: the weighted mean over labelled pixels (0 when nothing is labelled).
    """
    valid = labels != UNLABELLED
    if not bool(valid.any()):
        return logits.sum() * 0.0
    loss = F.cross_entropy(logits.float(), labels, weight=weight, ignore_index=UNLABELLED, reduction="sum")
    if weight is None:
        return loss / valid.sum()
    return loss / weight[labels[valid]].sum()


def masked_soft_dice(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over classes, computed on labelled pixels only."""
    valid = (labels != UNLABELLED).unsqueeze(1).float()
    probs = torch.softmax(logits.float(), dim=1) * valid
    onehot = F.one_hot(labels.clamp_min(0), logits.shape[1]).permute(0, 3, 1, 2).float() * valid
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    present = onehot.sum(dim=(0, 2, 3)) > 0
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return 1.0 - dice[present].mean() if bool(present.any()) else logits.sum() * 0.0


def deep_supervision_loss(
    outs: list[torch.Tensor],
    labels: torch.Tensor,
    weight: torch.Tensor | None = None,
    decay: float = 0.4,
    dice_weight: float = 0.0,
) -> torch.Tensor:
    """Loss over every recurrent step, step t weighted ``decay ** (T - 1 - t)`` (later steps more)."""
    steps = len(outs)
    total = 0.0
    norm = 0.0
    for t, logits in enumerate(outs):
        wt = decay ** (steps - 1 - t)
        step_loss = masked_cross_entropy(logits, labels, weight)
        if dice_weight:
            step_loss = step_loss + dice_weight * masked_soft_dice(logits, labels)
        total = total + wt * step_loss
        norm += wt
    return total / norm


# Neighbour offsets of the edge-aware Potts term: 4 directions at distances 1 and 2 pixels. Longer jumps
# would pair the bright pixels on both sides of a thin dark membrane and so charge for the membrane itself.
EDGE_OFFSETS = tuple((d * dy, d * dx) for d in (1, 2) for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)))


def _shifted_pairs(t: torch.Tensor, dy: int, dx: int):
    """Views ``a``, ``b`` of ``t`` (..., H, W) such that ``b[..., i, j]`` is ``t[..., i + dy, j + dx]``."""
    h, w = t.shape[-2:]
    ys_a, ys_b = slice(0, h - dy), slice(dy, h)
    if dx >= 0:
        xs_a, xs_b = slice(0, w - dx), slice(dx, w)
    else:
        xs_a, xs_b = slice(-dx, w), slice(0, w + dx)
    return t[..., ys_a, xs_a], t[..., ys_b, xs_b]


def edge_potts_loss(
    probs: torch.Tensor, image: torch.Tensor, sigma: float = 0.1, offsets: Sequence[tuple[int, int]] = EDGE_OFFSETS
) -> torch.Tensor:
    """Edge-aware Potts relaxation on every pixel, labelled or not (a local CRF loss; Tang et al. 2018).

    For neighbouring pixels i, j it charges ``w_ij * (1 - p_i . p_j)``, the expected chance that their
    labels differ, weighted by ``w_ij = exp(-(I_i - I_j)^2 / (2 sigma^2))``: a label change costs
    little across an image edge and much inside a uniform region. It pulls the unlabelled boundary
    band between outlines of different classes onto the image's edges.

    Parameters
    ----------
    probs : torch.Tensor, shape (B, C, H, W)
        Softmax probabilities.
    image : torch.Tensor, shape (B, 1, H, W)
        The (augmented, normalised) input image.
    sigma : float
        Intensity difference (normalised units) at which a pair's weight falls to exp(-1/2).
    offsets : sequence of (dy, dx), dy >= 0

    Returns
    -------
    torch.Tensor
        Scalar: the mean over pixel pairs, in [0, 1).
    """
    image = image.float()
    probs = probs.float()
    total = probs.new_zeros(())
    count = 0
    for dy, dx in offsets:
        pa, pb = _shifted_pairs(probs, dy, dx)
        ia, ib = _shifted_pairs(image, dy, dx)
        w = torch.exp(-((ia - ib) ** 2) / (2 * sigma**2))[:, 0]
        total = total + (w * (1.0 - (pa * pb).sum(dim=1))).sum()
        count += w.numel()
    return total / max(count, 1)


def pseudo_label_loss(
    logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    labels: torch.Tensor,
    threshold: float,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy towards a teacher's confident predictions on the *unlabelled* pixels only.

    Parameters
    ----------
    logits : torch.Tensor, shape (B, C, H, W)
        The student's output.
    teacher_probs : torch.Tensor, shape (B, C, H, W)
        The teacher's probabilities on the same input (no gradient).
    labels : torch.Tensor of int64, shape (B, H, W)
        Labelled pixels (>= 0) are left to the supervised loss.
    threshold : float
        Minimum teacher confidence for a pixel to become a pseudo-label.
    weight : torch.Tensor, shape (C,), optional
        Per-class weights (the supervised loss's), so pseudo-labels of a frequent class do not drown a
        rare one.

    Returns
    -------
    torch.Tensor
        Scalar: the weighted mean over the pseudo-labelled pixels (0 when there are none).
    """
    conf, target = teacher_probs.max(dim=1)
    target = torch.where((labels == UNLABELLED) & (conf >= threshold), target, torch.full_like(target, UNLABELLED))
    return masked_cross_entropy(logits, target, weight)
