"""Network architectures (torch only; constructors take primitives, never config objects)."""

from .unet import RecurrentUNet

__all__ = ["RecurrentUNet"]
