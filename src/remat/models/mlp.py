"""Deep MLP, the classic activation-checkpointing example.

The shape is the textbook one used to introduce ``torch.utils.checkpoint.checkpoint_sequential``:
flattened 28x28 images (784 features) go through an input Linear to a width of 512, then a
stack of identical blocks (Linear-GELU-Linear-GELU, ten by default) in an ``nn.Sequential`` named
``blocks``, then a Linear head to 10 classes. Every block stores the same amount of activation
memory, which makes the planner's choices easy to check by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from remat.models.base import BuiltModel, _check_int

__all__ = ["MLP", "MLPBlock", "build"]


class MLPBlock(nn.Module):
    """Linear, GELU, Linear, GELU at a constant width.

    Example:
        >>> import torch
        >>> MLPBlock(8)(torch.randn(3, 8)).shape
        torch.Size([3, 8])
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.act1 = nn.GELU()
        self.fc2 = nn.Linear(width, width)
        self.act2 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape (batch, width)."""
        return self.act2(self.fc2(self.act1(self.fc1(x))))


class MLP(nn.Module):
    """``stem`` (Linear + GELU), ``blocks`` (an ``nn.Sequential`` of :class:`MLPBlock`), ``head``.

    Example:
        >>> import torch
        >>> model = MLP(in_features=12, width=8, n_blocks=3, n_classes=4)
        >>> model(torch.randn(5, 12)).shape
        torch.Size([5, 4])
        >>> len(model.blocks)
        3
    """

    def __init__(self, *, in_features: int, width: int, n_blocks: int, n_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(in_features, width), nn.GELU())
        self.blocks = nn.Sequential(*(MLPBlock(width) for _ in range(n_blocks)))
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (batch, n_classes) for features ``x`` of shape (batch, in_features)."""
        return self.head(self.blocks(self.stem(x)))


def build(
    *,
    batch: int = 256,
    width: int = 512,
    n_blocks: int = 10,
    in_features: int = 784,
    n_classes: int = 10,
) -> BuiltModel:
    """The built-in ``mlp``: an :class:`MLP` on random features (batch, in_features).

    The loss is cross-entropy against random class labels drawn at build time.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> built = build(batch=4, width=8, n_blocks=2, in_features=12)
        >>> logits = built.model(*built.example_inputs)
        >>> logits.shape
        torch.Size([4, 10])
        >>> bool(torch.isfinite(built.loss_fn(logits)))
        True
    """
    for key, value in (
        ("batch", batch),
        ("width", width),
        ("n_blocks", n_blocks),
        ("in_features", in_features),
        ("n_classes", n_classes),
    ):
        _check_int(key, value)
    model = MLP(in_features=in_features, width=width, n_blocks=n_blocks, n_classes=n_classes)
    x = torch.randn(batch, in_features)
    targets = torch.randint(n_classes, (batch,))

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets.to(logits.device))

    return BuiltModel(model=model, example_inputs=(x,), loss_fn=loss_fn, name="mlp")
