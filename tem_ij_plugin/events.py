"""The contracts between the engine and its front ends: progress events, the progress sink, the cancel token.

Every slow function takes ``progress`` (a :data:`ProgressSink`, called with one event after each step)
and ``cancel`` (a :class:`CancelToken`: a ``threading.Event`` is one). Events are plain dicts at run
time, typed here so that the CLI, Fiji and (next) Qt read the same keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol, TypedDict


class CancelToken(Protocol):
    """Set by the user (Ctrl-C, Esc, TEM Stop Training); slow work checks it between steps."""

    def is_set(self) -> bool:
        """Whether the user asked the work to stop."""
        ...


def check_cancel(cancel: CancelToken | None) -> None:
    """Raise :class:`~tem_ij_plugin.errors.Cancelled` when the user asked to stop (between steps)."""
    from .errors import Cancelled

    if cancel is not None and cancel.is_set():
        raise Cancelled()


class TrainEvent(TypedDict):
    """After every training step (:meth:`tem_ij_plugin.train.Trainer.event`)."""

    stage: Literal["train", "refit"]
    iteration: int
    max_iterations: int  # the stage's last iteration
    elapsed_s: float
    max_seconds: float
    train_loss: float | None
    val_score: float | None
    validated: bool  # a validation ran at this iteration
    smoothed_score: float | None
    best_score: float | None
    best_iteration: int
    backtracks: int
    lr: float


class PlaneEvent(TypedDict):
    """After each plane of a per-plane stage (suggestions: ``statistics``, ``probabilities``, ...)."""

    stage: str
    plane: int  # 1-based
    planes: int


class PredictEvent(PlaneEvent):
    """After each batch of tiles of a prediction (stage ``predict``)."""

    tiles_done: int
    tiles_total: int
    done: int  # planes finished, resumed ones included
    total: int
    elapsed_s: float
    megapixels_per_s: float
    eta_s: float


Event = TrainEvent | PlaneEvent | PredictEvent
ProgressSink = Callable[[Event], None]
