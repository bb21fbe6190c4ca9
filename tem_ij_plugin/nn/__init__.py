"""Network architectures (torch only; constructors take primitives, never config objects)."""

from .unet import ProbabilityUNet, RecurrentUNet

__all__ = ["ProbabilityUNet", "RecurrentUNet"]
