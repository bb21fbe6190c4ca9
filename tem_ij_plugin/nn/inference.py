"""The U-Net's inference form on the CPU: the same function with less memory traffic.

Profiled on a 2048-px tile of the default model (bf16 autocast, BatchNorm folded), the convolutions,
which are the work, took 71 % of the time, and bilinear upsampling, the concatenation of the skips and
the casts between fp32 and bf16 23 %. Here
the decoder never builds the upsampled map: a 3x3 convolution of a 2x bilinear upsample is, for each of
the four output phases, a 3x3 convolution of the low-resolution map with a kernel mixed from the
original one (sub-pixel convolution), and a convolution of a concatenation is the sum of the
convolutions of its parts. Only the outermost row and column of each upsampled map differ (the
upsample clamps at the border, the convolution pads with zeros); they are recomputed exactly from
two-pixel strips. In bf16 the image enters the first convolution as two bf16 parts (high and low
bits), so it keeps ~16 bits: on a 1024-px crop of a trained model's image, probabilities moved at most
0.017 from fp32, against 0.039 with the image rounded to bf16.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.nn import functional as F

from .unet import RecurrentUNet

log = logging.getLogger(__name__)
CL = torch.channels_last

# Weights of x[i-1], x[i], x[i+1] (rows) per kernel tap k[-1], k[0], k[1] (columns) for output 2i
# (EVEN) and 2i+1 (ODD) of a 2x bilinear upsample (align_corners=False) followed by a 3-tap filter.
_EVEN = ((0.75, 0.25, 0.0), (0.25, 0.75, 0.75), (0.0, 0.0, 0.25))
_ODD = ((0.25, 0.0, 0.0), (0.75, 0.75, 0.25), (0.0, 0.25, 0.75))


def subpixel_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """A (4 Cout, Cin, 3, 3) kernel on a map equal to ``kernel`` (Cout, Cin, 3, 3) on its 2x upsample.

    Output channel ``4 c + 2 py + px`` is output channel ``c`` at row phase ``py`` and column phase
    ``px``, the order :func:`torch.nn.functional.pixel_shuffle` expects. Exact away from the border.
    """
    phases = [torch.tensor(p, dtype=torch.float64) for p in (_EVEN, _ODD)]
    k = kernel.detach().double()
    out = torch.stack([py @ k @ px.T for py in phases for px in phases], dim=1)  # (Cout, 4, Cin, 3, 3)
    return out.reshape(-1, *k.shape[1:]).to(kernel.dtype)


def _conv_relu(block: nn.Sequential) -> list | None:
    """The two convolutions of a folded ConvBlock (conv, identity, ReLU, twice), or None if it is not one."""
    kinds = [type(m) for m in block]
    if kinds != [nn.Conv2d, nn.Identity, nn.ReLU] * 2:
        return None
    convs = [block[0], block[3]]
    if any(c.bias is None or c.kernel_size != (3, 3) or c.padding != (1, 1) or c.stride != (1, 1) for c in convs):
        return None
    return convs


@functools.cache
def _fused_convolution(dtype: torch.dtype):
    """The convolution of oneDNN with its ReLU and addition fused in (what ``torch.compile`` emits), or None.

    It is an internal operator of torch, so it is used only after it computed what the public operators
    do in ``dtype``, in each way :class:`_Conv` calls it, on a small case here (it raises, for one, in
    bf16 on CPUs without AVX-512 BW/VL/DQ or AVX-NE-CONVERT, where the public operators still compute).
    """
    op = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)
    gen = torch.Generator().manual_seed(0)
    x, other = torch.randn(2, 4, 8, 6, generator=gen), torch.randn(2, 3, 8, 6, generator=gen)
    w, b = torch.randn(3, 4, 3, 3, generator=gen), torch.randn(3, generator=gen)
    x, other, w = (t.to(dtype).contiguous(memory_format=CL) for t in (x, other, w))
    b = b.to(dtype)
    one = [1, 1]
    try:
        got = [
            op.default(x, w, b, one, one, one, 1, "relu", [], ""),
            op.default(x, w, None, [0, 0], one, one, 1, "none", [], ""),
            op.binary(x, other, w, b, one, one, one, 1, "add", None, "relu", [], ""),
        ]
    except Exception:  # absent, built without oneDNN, or not for this CPU and dtype
        return None
    ref = [F.conv2d(x, w, b, padding=1).relu(), F.conv2d(x, w), (F.conv2d(x, w, b, padding=1) + other).relu()]
    tol = 1e-4 if dtype == torch.float32 else 0.05  # bf16: 8 bits, values up to ~10
    if all(g.shape == r.shape and torch.allclose(g.float(), r.float(), atol=tol, rtol=tol) for g, r in zip(got, ref)):
        return op
    return None


class _Conv:
    """A 3x3 (or 1x1) convolution's weight and bias in the compute dtype and layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, padding: int | None = None):
        self.weight = weight.detach().to(dtype).contiguous(memory_format=CL)
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.padding = weight.shape[-1] // 2 if padding is None else padding

    def __call__(self, x: torch.Tensor, relu: bool = True, add: torch.Tensor | None = None) -> torch.Tensor:
        """``ReLU(conv(x) + add)``, without the ReLU when ``relu`` is false and the sum when ``add`` is None."""
        fused = _fused_convolution(self.weight.dtype)
        if fused is not None:
            args = (self.weight, self.bias, [self.padding] * 2, [1, 1], [1, 1], 1)
            if add is None:
                return fused.default(x, *args, "relu" if relu else "none", [], "")
            return fused.binary(x, add, *args, "add", None, "relu" if relu else None, [], "")
        y = F.conv2d(x, self.weight, self.bias, padding=self.padding)
        y = y if add is None else y.add_(add)
        return y.relu_() if relu else y


class _UpBlock:
    """A decoder block: ReLU(conv(concat(upsample(low), skip))) without the upsample or the concatenation."""

    def __init__(self, first: nn.Conv2d, second: nn.Conv2d, up_channels: int, dtype: torch.dtype):
        w = first.weight.detach()
        self.up = _Conv(w[:, :up_channels], None, dtype)  # for the border strips
        self.phases = _Conv(subpixel_kernel(w[:, :up_channels].float()), None, dtype, padding=0)
        self.skip = _Conv(w[:, up_channels:], first.bias, dtype)
        self.second = _Conv(second.weight, second.bias, dtype)

    def _upsampled_conv(self, low: torch.Tensor) -> torch.Tensor:
        """``conv(upsample(low))`` with zero padding, as the trained network computed it."""
        h, w = low.shape[-2:]
        phases = self.phases(F.pad(low, (1, 1, 1, 1), mode="replicate"), relu=False)
        out = F.pixel_shuffle(phases, 2).contiguous(memory_format=CL)
        # The outermost rows and columns, from the exact upsample of the two rows (columns) next to them
        rows, cols = min(2, h), min(2, w)
        top = F.interpolate(low[:, :, :rows], size=(2 * rows, 2 * w), mode="bilinear", align_corners=False)
        bottom = F.interpolate(low[:, :, -rows:], size=(2 * rows, 2 * w), mode="bilinear", align_corners=False)
        left = F.interpolate(low[:, :, :, :cols], size=(2 * h, 2 * cols), mode="bilinear", align_corners=False)
        right = F.interpolate(low[:, :, :, -cols:], size=(2 * h, 2 * cols), mode="bilinear", align_corners=False)
        out[:, :, 0] = self.up(top[:, :, :2], relu=False)[:, :, 0]
        out[:, :, -1] = self.up(bottom[:, :, -2:], relu=False)[:, :, -1]
        out[:, :, :, 0] = self.up(left[:, :, :, :2], relu=False)[:, :, :, 0]
        out[:, :, :, -1] = self.up(right[:, :, :, -2:], relu=False)[:, :, :, -1]
        return out

    def __call__(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.second(self.skip(skip, add=self._upsampled_conv(low)))


class InferenceUNet:
    """A plain (one-step) :class:`RecurrentUNet` with BatchNorm folded, as the same function for inference.

    Parameters
    ----------
    net : RecurrentUNet
        With ``steps == 1`` and every BatchNorm folded into its convolution
        (:func:`~tem_ij_plugin.receptive.fold_batchnorm`); see :func:`inference_form`.
    dtype : torch.dtype
        ``torch.float32`` or ``torch.bfloat16`` (the whole network computes in it, but the image keeps
        its precision in the first convolution).

    Called, it returns float32 class probabilities of a float32 (B, C, H, W) batch whose sides are
    multiples of ``net.size_multiple``.
    """

    def __init__(self, net: RecurrentUNet, dtype: torch.dtype = torch.float32):
        unet = net.unet
        blocks = [_conv_relu(b) for b in list(unet.down) + list(unet.up)]
        if any(b is None for b in blocks):
            raise ValueError("the inference form needs a BatchNorm-folded network")
        self.dtype = dtype
        down, up = blocks[: len(unet.down)], blocks[len(unet.down) :]
        first, second = down[0]
        if dtype == torch.float32:
            self.first = _Conv(first.weight, first.bias, dtype)
        else:
            # conv(x) = w (x_hi + x_lo) ~ w_hi x_hi + w_lo x_hi + w_hi x_lo: input [x_hi, x_hi, x_lo]
            w_hi = first.weight.detach().to(dtype)
            w_lo = (first.weight.detach() - w_hi.float()).to(dtype)
            self.first = _Conv(torch.cat([w_hi, w_lo, w_hi], dim=1), first.bias, dtype)
        self.second = _Conv(second.weight, second.bias, dtype)
        self.down = [(_Conv(a.weight, a.bias, dtype), _Conv(b.weight, b.bias, dtype)) for a, b in down[1:]]
        widths = [b[1].out_channels for b in down]
        self.up = [_UpBlock(a, b, widths[-1 - i], dtype) for i, (a, b) in enumerate(up)]
        # In bf16 too: the logits in fp32 moved probabilities less on average (1.0e-4 against 1.4e-4 on
        # a trained model's image) but cost 4 % of the time and 230 MB more per 2048-px tile.
        self.out = _Conv(unet.out.weight, unet.out.bias, dtype)
        self.multiple = net.size_multiple

    def accepts(self, x: torch.Tensor) -> bool:
        """Whether ``x``'s height and width are multiples of the network's (what the decoder relies on)."""
        return x.shape[-2] % self.multiple == 0 and x.shape[-1] % self.multiple == 0

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.float32:
            return x.contiguous(memory_format=CL)
        hi = x.to(self.dtype)
        lo = (x - hi.float()).to(self.dtype)
        return torch.cat([hi, hi, lo], dim=1).contiguous(memory_format=CL)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (float32) of the normalised batch ``x``."""
        if not self.accepts(x):
            raise ValueError(f"height and width must be multiples of {self.multiple}, got {tuple(x.shape[-2:])}")
        h = self.second(self.first(self._input(x.float())))
        skips = [h]
        for a, b in self.down:
            h = b(a(F.max_pool2d(h, 2)))
            skips.append(h)
        h = skips.pop()
        for block in self.up:
            h = block(h, skips.pop())
        return torch.softmax(self.out(h, relu=False).float(), dim=1)


def inference_form(net: nn.Module, dtype: torch.dtype) -> InferenceUNet | None:
    """:class:`InferenceUNet` of a folded network, or None where it does not apply.

    It applies to one-step networks whose blocks are plain convolutions and ReLUs after folding
    (BatchNorm models; GroupNorm ones keep their normalisation layers), in fp32 and bf16, where it
    computes on this machine (a trial on a small input).
    """
    if type(net) is not RecurrentUNet or net.steps != 1 or dtype not in (torch.float32, torch.bfloat16):
        return None  # (a ProbabilityUNet ends in a softmax of its own)
    try:
        form = InferenceUNet(net, dtype)
        form(torch.rand(1, net.in_channels, 2 * net.size_multiple, 2 * net.size_multiple))
    except (ValueError, RuntimeError) as exc:
        log.debug("no inference form for this network (%s); running it eager", exc)
        return None
    return form
