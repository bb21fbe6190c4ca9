"""Masked losses: unlabelled pixels (label -1) contribute exactly zero loss and zero gradient."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .annotations import UNLABELLED


def class_weights(counts, power: float) -> torch.Tensor:
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


def deep_supervision_loss(outs, labels, weight=None, decay: float = 0.4, dice_weight: float = 0.0):
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
