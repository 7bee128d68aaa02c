"""Small ResNet-style CNN with BatchNorm and residual connections.

The shape is a scaled-down ResNet (He et al., 2016) for CIFAR-sized images: a 3x3
conv-BN-ReLU ``stem``, then ``layers``, an ``nn.Sequential`` of basic :class:`ResidualBlock` s
(conv-BN-ReLU-conv-BN plus the skip, ReLU after the sum), grouped in stages whose first block
halves the resolution and changes the channel count (the skip then goes through a 1x1 conv-BN
downsample), then global average pooling and a Linear ``head``. BatchNorm keeps running
statistics, which makes it the zoo's model for "recomputation must not update state twice".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from remat.models.base import BuiltModel, _check_int, _value_error

__all__ = ["ResNet", "ResidualBlock", "build"]


class ResidualBlock(nn.Module):
    """Basic ResNet block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    The shortcut is the identity, or a strided 1x1 conv-BN when the stride or channels change.

    Example:
        >>> import torch
        >>> ResidualBlock(4, 8, stride=2)(torch.randn(2, 4, 8, 8)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape (batch, in_channels, height, width)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNet(nn.Module):
    """``stem``, ``layers`` (an ``nn.Sequential`` of :class:`ResidualBlock`), ``pool``, ``head``.

    Stage ``i`` has ``blocks_per_stage`` blocks with ``channels[i]`` output channels; every stage
    after the first starts with a stride-2 block.

    Example:
        >>> import torch
        >>> model = ResNet(in_channels=3, channels=(4, 8), blocks_per_stage=1, n_classes=5)
        >>> model(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 5])
        >>> len(model.layers)
        2
    """

    def __init__(
        self,
        *,
        in_channels: int,
        channels: Sequence[int],
        blocks_per_stage: int,
        n_classes: int,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        previous = channels[0]
        for stage, width in enumerate(channels):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(ResidualBlock(previous, width, stride))
                previous = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(previous, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (batch, n_classes) for images ``x`` of shape (batch, C, H, W)."""
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))


def build(
    *,
    batch: int = 16,
    image_size: int = 32,
    channels: Sequence[int] = (32, 64),
    blocks_per_stage: int = 2,
    n_classes: int = 10,
    in_channels: int = 3,
) -> BuiltModel:
    """The built-in ``cnn``: a :class:`ResNet` on random images (batch, in_channels, size, size).

    The loss is cross-entropy against random class labels drawn at build time.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> built = build(batch=2, image_size=8, channels=(4, 8), blocks_per_stage=1)
        >>> logits = built.model(*built.example_inputs)
        >>> logits.shape
        torch.Size([2, 10])
        >>> bool(torch.isfinite(built.loss_fn(logits)))
        True
    """
    for key, value in (
        ("batch", batch),
        ("image_size", image_size),
        ("blocks_per_stage", blocks_per_stage),
        ("n_classes", n_classes),
        ("in_channels", in_channels),
    ):
        _check_int(key, value)
    if isinstance(channels, int) or not isinstance(channels, Sequence) or not channels:
        raise _value_error(
            "channels", channels, "a non-empty sequence of ints", "pass e.g. channels=(32, 64)"
        )
    channels = tuple(channels)
    for width in channels:
        _check_int("channels[i]", width)
    model = ResNet(
        in_channels=in_channels,
        channels=channels,
        blocks_per_stage=blocks_per_stage,
        n_classes=n_classes,
    )
    x = torch.randn(batch, in_channels, image_size, image_size)
    targets = torch.randint(n_classes, (batch,))

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets.to(logits.device))

    return BuiltModel(model=model, example_inputs=(x,), loss_fn=loss_fn, name="cnn")
