"""A recurrent U-Net: one U-Net applied T times, each step seeing the previous step's softmax.

Recurrence follows the output-feedback variant of Wang et al. 2019 (Recurrent U-Net): the weights
are shared across steps and every step's logits are returned so that the loss can supervise each
of them (deep supervision, later steps weighted more).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _groups(channels: int, max_groups: int) -> int:
    """Largest divisor of ``channels`` not above ``max_groups`` (GroupNorm needs a divisor)."""
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return g


def _norm(kind: str, channels: int, max_groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(_groups(channels, max_groups), channels)
    raise ValueError(f"unknown normalisation '{kind}' (batch or group)")


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by a normalisation and ReLU."""

    def __init__(self, cin: int, cout: int, norm_groups: int, norm: str = "batch"):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            _norm(norm, cout, norm_groups),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            _norm(norm, cout, norm_groups),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """Plain U-Net with max-pool down, bilinear up and concatenated skips.

    Parameters
    ----------
    in_channels : int
        Input channels.
    out_channels : int
        Output channels (logits).
    depth : int
        Number of resolution levels (``depth - 1`` poolings).
    base_channels : int
        Channels at the first level; doubled per level.
    norm_groups : int
        Maximum GroupNorm groups (``norm="group"`` only).
    norm : str
        ``"batch"`` or ``"group"`` (see :class:`RecurrentUNet`).
    last_extra : int
        Extra channels concatenated to the input of the finest decoder block (see :meth:`head`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        depth: int,
        base_channels: int,
        norm_groups: int,
        last_extra: int = 0,
        norm: str = "batch",
    ):
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth)]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(ConvBlock(cin, w, norm_groups, norm))
            cin = w
        self.up = nn.ModuleList()
        for i, w_skip in enumerate(reversed(widths[:-1])):
            extra = last_extra if i == depth - 2 else 0
            self.up.append(ConvBlock(cin + w_skip + extra, w_skip, norm_groups, norm))
            cin = w_skip
        self.out = nn.Conv2d(cin, out_channels, 1)

    def _encoder(self, x: torch.Tensor) -> list:
        """Every encoder level's output, finest first."""
        levels = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            levels.append(x)
        return levels

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The deepest encoder level's features, shape (B, C, H / 2**(depth-1), W / 2**(depth-1))."""
        return self._encoder(x)[-1]

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Everything up to the finest decoder block: its concatenated input, shape (B, C', H, W)."""
        skips = self._encoder(x)[::-1]
        x = skips[0]
        for i, block in enumerate(self.up):
            skip = skips[i + 1]
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, skip], dim=1)
            if i < len(self.up) - 1:
                x = block(x)
        return x

    def head(self, trunk: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """The finest decoder block and the 1x1 output, optionally seeing ``extra`` channels."""
        if extra is not None:
            trunk = torch.cat([trunk, extra], dim=1)
        return self.out(self.up[-1](trunk))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of ``x`` (no softmax): :meth:`head` of :meth:`trunk`."""
        return self.head(self.trunk(x))


class RecurrentUNet(nn.Module):
    """U-Net with output feedback over ``steps`` iterations and shared weights.

    Parameters
    ----------
    in_channels : int
        Image channels (1 for greyscale TEM).
    n_classes : int
        Number of classes (output channels).
    depth : int
        U-Net levels (at least 2); the input size must be divisible by ``2 ** (depth - 1)``.
    base_channels : int
        Channels at the first level.
    steps : int
        Recurrent steps T; ``steps=1`` is a plain U-Net.
    norm_groups : int
        Maximum GroupNorm groups (``norm="group"`` only).
    norm : str
        ``"batch"`` (default): BatchNorm, whose fixed statistics at inference make the network
        translation-equivariant, so a tile's prediction does not depend on the tile size or position
        (seam-free tiling) and folds into the convolutions. ``"group"``: GroupNorm, whose per-tile
        statistics make predictions depend on the tile size (models of version 0.1 use it).
    feedback : str
        Where the previous step's softmax re-enters. ``"input"``: the whole U-Net runs again on
        image + softmax (Wang et al. 2019), T times the cost of one pass. ``"head"``: the encoder and
        coarse decoder run once and only the finest decoder block re-runs on its features + softmax,
        so each extra step costs a fraction of a pass.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 2,
        depth: int = 4,
        base_channels: int = 16,
        steps: int = 3,
        norm_groups: int = 8,
        feedback: str = "input",
        norm: str = "batch",
    ):
        super().__init__()
        if steps < 1 or depth < 2 or base_channels < 1 or n_classes < 2:
            raise ValueError("need steps >= 1, depth >= 2, base_channels >= 1 and n_classes >= 2")
        if feedback not in ("input", "head"):
            raise ValueError("feedback must be 'input' or 'head'")
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.depth = depth
        self.base_channels = base_channels
        self.steps = steps
        self.feedback = feedback
        self.norm = norm
        fb = n_classes if steps > 1 else 0
        self.unet = UNet(
            in_channels + (fb if feedback == "input" else 0),
            n_classes,
            depth,
            base_channels,
            norm_groups,
            last_extra=fb if feedback == "head" else 0,
            norm=norm,
        )

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (self.depth - 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck features of the first step (what the network "sees"), shape (B, C, H/s, W/s).

        ``s`` is :attr:`size_multiple`. With input feedback the first step sees a uniform prior, as in
        :meth:`forward`.
        """
        if self.steps > 1 and self.feedback == "input":
            b, _, h, w = x.shape
            x = torch.cat([x, x.new_full((b, self.n_classes, h, w), 1.0 / self.n_classes)], dim=1)
        return self.unet.encode(x)

    def forward(self, x: torch.Tensor, all_steps: bool = False):
        """Run the recurrence.

        Parameters
        ----------
        x : torch.Tensor, shape (B, in_channels, H, W)
            Normalised image.
        all_steps : bool
            Return the list of every step's logits (for deep supervision) instead of the last.

        Returns
        -------
        torch.Tensor of shape (B, n_classes, H, W), or a list of ``steps`` such tensors.
        """
        if self.steps == 1:
            out = self.unet(x)
            return [out] if all_steps else out
        b, _, h, w = x.shape
        # Step 0 sees a uniform prior, so every step runs the same network on the same kind of input.
        probs = x.new_full((b, self.n_classes, h, w), 1.0 / self.n_classes)
        trunk = self.unet.trunk(x) if self.feedback == "head" else None
        outs = []
        for _ in range(self.steps):
            if trunk is None:
                logits = self.unet(torch.cat([x, probs], dim=1))
            else:
                logits = self.unet.head(trunk, probs.to(trunk.dtype))
            outs.append(logits)
            probs = torch.softmax(logits.float(), dim=1).to(x.dtype)
        return outs if all_steps else outs[-1]


class ProbabilityUNet(RecurrentUNet):
    """A :class:`RecurrentUNet` whose output is the class probabilities (the softmax of the last step).

    The same parameters as the network it extends, so its weights load as they are: what exported
    models (bioimage.io packages) run, this file being their architecture source.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities, shape (B, n_classes, H, W)."""
        return torch.softmax(super().forward(x).float(), dim=1)
