"""Paired image/label augmentation for TEM, batched on the training device.

Geometry (dihedral group, rotation, scale, elastic field) is one sampling grid per crop, applied with
a single ``grid_sample`` (bilinear for the image, nearest for labels). Photometric changes act on the
image only. Everything draws from a ``torch.Generator`` so a seed gives the same result on the CPU.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def _uniform(gen, n, lo, hi, device):
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, 2r+1) normalised 1-D Gaussian kernels; sigma 0 gives a delta."""
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    s = sigma.clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (x[None] / s) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of each image of (B, 1, H, W) with its own sigma (B,), separable, reflect padded."""
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    k = _gaussian_kernels(sigma, radius)
    b = x.shape[0]
    y = x.reshape(1, b, *x.shape[2:])
    y = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, :, None], groups=b)
    return y.reshape_as(x)


class Augmenter:
    """Random paired augmentations.

    Parameters
    ----------
    out_size : int
        Side of the augmented crops.
    dihedral : bool
    rotation_deg, scale, elastic_alpha : float
        Geometric ranges (see :class:`~tem_ij_plugin.config.AugmentConfig`).
    elastic_grid : int
    brightness, contrast, gamma, noise, blur, low_resolution, probability : float
        Photometric ranges; each is applied to a crop with ``probability``.
    """

    def __init__(
        self,
        out_size: int,
        dihedral=True,
        rotation_deg=15.0,
        scale=0.15,
        elastic_alpha=6.0,
        elastic_grid=6,
        brightness=0.1,
        contrast=0.25,
        gamma=0.3,
        noise=0.06,
        blur=1.2,
        low_resolution=2.0,
        probability=0.5,
    ):
        self.out_size = out_size
        self.dihedral = dihedral
        self.rotation = math.radians(rotation_deg)
        self.scale = scale
        self.alpha = elastic_alpha
        self.grid = elastic_grid
        self.brightness = brightness
        self.contrast = contrast
        self.gamma = gamma
        self.noise = noise
        self.blur = blur
        self.low_resolution = low_resolution
        self.p = probability

    def input_size(self) -> int:
        """Side of the source crops to draw, large enough that rotation and zoom out stay inside."""
        reach = math.sqrt(2.0) * (1.0 + self.scale)
        return int(math.ceil(self.out_size * reach + 2 * self.alpha)) + 1

    def geometry(self, img: torch.Tensor, lab: torch.Tensor, gen: torch.Generator):
        """Apply random geometry to (B, 1, S, S) images and (B, S, S) labels, returning ``out_size`` crops."""
        b, _, s, _ = img.shape
        dev = img.device
        angle = _uniform(gen, b, -self.rotation, self.rotation, dev)
        if self.dihedral:
            angle = angle + (math.pi / 2) * torch.randint(0, 4, (b,), generator=gen, device=dev)
        zoom = torch.exp(_uniform(gen, b, -math.log1p(self.scale), math.log1p(self.scale), dev))
        flip = torch.ones(b, device=dev)
        if self.dihedral:
            flip = torch.where(torch.rand(b, generator=gen, device=dev) < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # Output coordinates in [-1, 1] over out_size map to source coords in [-1, 1] over s.
        k = (self.out_size / s) / zoom
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0] = cos * k * flip
        theta[:, 0, 1] = -sin * k
        theta[:, 1, 0] = sin * k * flip
        theta[:, 1, 1] = cos * k
        grid = F.affine_grid(theta, (b, 1, self.out_size, self.out_size), align_corners=False)
        if self.alpha > 0:
            coarse = torch.randn(b, 2, self.grid, self.grid, generator=gen, device=dev)
            field = F.interpolate(coarse, size=(self.out_size, self.out_size), mode="bicubic", align_corners=True)
            grid = grid + field.permute(0, 2, 3, 1) * (2.0 * self.alpha / s) * 0.5
        img = F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        # Shift labels so that "unlabelled" (-1) becomes 0, the value grid_sample gives outside.
        lab = F.grid_sample((lab.float() + 1)[:, None], grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return img, lab[:, 0].round().long() - 1

    def photometric(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Brightness, contrast, gamma, blur, low resolution and noise on (B, 1, H, W) images in ~[0, 1]."""
        b = img.shape[0]
        dev = img.device

        def chosen():
            return (torch.rand(b, generator=gen, device=dev) < self.p).float()[:, None, None, None]

        def rnd(lo, hi):
            return _uniform(gen, b, lo, hi, dev)[:, None, None, None]

        if self.gamma > 0:
            g = torch.exp(rnd(-math.log1p(self.gamma), math.log1p(self.gamma)))
            c = chosen()
            img = c * img.clamp(0, 1) ** g + (1 - c) * img
        if self.contrast > 0:
            mean = img.mean(dim=(2, 3), keepdim=True)
            img = mean + (img - mean) * (1 + chosen() * rnd(-self.contrast, self.contrast))
        if self.brightness > 0:
            img = img + chosen() * rnd(-self.brightness, self.brightness)
        if self.blur > 0:
            sigma = _uniform(gen, b, 0.0, self.blur, dev) * chosen().flatten()
            if float(sigma.max()) > 0.05:
                img = blur(img, sigma)
        if self.low_resolution > 1:
            f = float(_uniform(gen, 1, 1.0, self.low_resolution, dev))
            c = chosen()
            if f > 1.1:
                h, w = img.shape[-2:]
                small = F.interpolate(img, size=(max(8, int(h / f)), max(8, int(w / f))), mode="area")
                img = c * F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False) + (1 - c) * img
        if self.noise > 0:
            sigma = rnd(0.0, self.noise) * chosen()
            img = img + sigma * torch.randn(img.shape, generator=gen, device=dev)
        return img

    def __call__(self, img: torch.Tensor, lab: torch.Tensor, gen: torch.Generator):
        """Geometry then photometry; returns ``(image, labels)`` of side ``out_size``."""
        img, lab = self.geometry(img, lab, gen)
        return self.photometric(img, gen), lab
