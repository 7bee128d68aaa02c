"""U-Net with skip connections that live across stages.

The shape is the U-Net of Ronneberger et al. (2015) with the normalisation of diffusion-model
U-Nets: an encoder of ``down`` stages (:class:`DownStage`: 2x2 max-pool except in the first
stage, then conv-GroupNorm-SiLU twice; each stage's output is kept as a skip), a ``mid`` block at
the lowest resolution, a decoder of ``up`` stages (:class:`UpStage`: a stride-2 ConvTranspose2d,
concatenation with the matching skip, conv-GroupNorm-SiLU twice) and a 1x1 conv ``head``.
Channels double at every level from ``base_channels``.

The skips are held by the parent's forward from the encoder until the decoder uses them, so
checkpointing a stage cannot free them: the zoo's model for activations that outlive a block.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from remat.models.base import BuiltModel, _check_divisible, _check_int

__all__ = ["ConvBlock", "DownStage", "MidBlock", "UNet", "UpStage", "build"]


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups (the largest count that divides ``channels``)."""
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ConvBlock(nn.Module):
    """Two 3x3 conv-GroupNorm-SiLU layers.

    Example:
        >>> import torch
        >>> ConvBlock(3, 8)(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 8, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm1 = _group_norm(out_channels)
        self.act1 = nn.SiLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.act2 = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply both layers to ``x`` of shape (batch, in_channels, height, width)."""
        x = self.act1(self.norm1(self.conv1(x)))
        return self.act2(self.norm2(self.conv2(x)))


class DownStage(nn.Module):
    """Encoder stage: optional 2x2 max-pool, then a :class:`ConvBlock`; its output is a skip.

    Example:
        >>> import torch
        >>> DownStage(4, 8, downsample=True)(torch.randn(2, 4, 8, 8)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, *, downsample: bool) -> None:
        super().__init__()
        self.pool: nn.Module = nn.MaxPool2d(2) if downsample else nn.Identity()
        self.conv = ConvBlock(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool (if downsampling) and convolve ``x``."""
        return self.conv(self.pool(x))


class MidBlock(nn.Module):
    """The bottleneck: 2x2 max-pool, then a :class:`ConvBlock` at the lowest resolution.

    Example:
        >>> import torch
        >>> MidBlock(4, 8)(torch.randn(2, 4, 8, 8)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = ConvBlock(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool and convolve ``x``."""
        return self.conv(self.pool(x))


class UpStage(nn.Module):
    """Decoder stage: 2x upsampling by ConvTranspose2d, concatenation with the skip, ConvBlock.

    Example:
        >>> import torch
        >>> stage = UpStage(8, 4)
        >>> stage(torch.randn(2, 8, 4, 4), torch.randn(2, 4, 8, 8)).shape
        torch.Size([2, 4, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv = ConvBlock(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Upsample ``x`` to the resolution of ``skip``, concatenate them and convolve."""
        return self.conv(torch.cat([self.upsample(x), skip], dim=1))


class UNet(nn.Module):
    """``down`` (ModuleList of :class:`DownStage`), ``mid``, ``up`` (ModuleList of
    :class:`UpStage`), ``head``. Maps (batch, in_channels, H, W) to (batch, out_channels, H, W);
    H and W must be multiples of ``2 ** depth``.

    Example:
        >>> import torch
        >>> model = UNet(in_channels=3, out_channels=2, base_channels=4, depth=2)
        >>> model(torch.randn(1, 3, 8, 8)).shape
        torch.Size([1, 2, 8, 8])
    """

    def __init__(
        self, *, in_channels: int, out_channels: int, base_channels: int, depth: int
    ) -> None:
        super().__init__()
        widths = [base_channels * 2**level for level in range(depth)]
        self.down = nn.ModuleList()
        previous = in_channels
        for level, width in enumerate(widths):
            self.down.append(DownStage(previous, width, downsample=level > 0))
            previous = width
        self.mid = MidBlock(previous, 2 * previous)
        previous = 2 * previous
        self.up = nn.ModuleList()
        for width in reversed(widths):
            self.up.append(UpStage(previous, width))
            previous = width
        self.head = nn.Conv2d(previous, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the U-Net to images ``x``; the skips are held here across stages."""
        skips: list[torch.Tensor] = []
        for stage in self.down:
            x = stage(x)
            skips.append(x)
        x = self.mid(x)
        for stage in self.up:
            x = stage(x, skips.pop())
        return self.head(x)


def build(
    *,
    batch: int = 4,
    image_size: int = 64,
    base_channels: int = 16,
    depth: int = 3,
    in_channels: int = 3,
    out_channels: int = 3,
) -> BuiltModel:
    """The built-in ``unet``: a :class:`UNet` on random images (batch, in_channels, size, size).

    The loss is the mean squared error to a random target image drawn at build time.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> built = build(batch=1, image_size=8, base_channels=4, depth=2)
        >>> out = built.model(*built.example_inputs)
        >>> out.shape
        torch.Size([1, 3, 8, 8])
        >>> bool(torch.isfinite(built.loss_fn(out)))
        True
    """
    for key, value in (
        ("batch", batch),
        ("image_size", image_size),
        ("base_channels", base_channels),
        ("depth", depth),
        ("in_channels", in_channels),
        ("out_channels", out_channels),
    ):
        _check_int(key, value)
    _check_divisible("image_size", image_size, "2 ** depth", 2**depth)
    model = UNet(
        in_channels=in_channels,
        out_channels=out_channels,
        base_channels=base_channels,
        depth=depth,
    )
    x = torch.randn(batch, in_channels, image_size, image_size)
    target = torch.randn(batch, out_channels, image_size, image_size)

    def loss_fn(out: torch.Tensor) -> torch.Tensor:
        # Not F.mse_loss: on CPU it returns a 0-dim view of an input-sized storage (meta: 4 bytes),
        # which would make CPU and meta measurements of this model differ.
        return (out - target.to(out.device)).square().mean()

    return BuiltModel(model=model, example_inputs=(x,), loss_fn=loss_fn, name="unet")
