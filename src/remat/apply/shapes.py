"""The batch a plan was made for, and a warning when a larger one runs under it.

A plan is made for one batch: its peak, and which units it keeps, hold for that batch's shapes.
Activation memory grows with the batch (with batch size and sequence length), so a larger batch
under the same plan may not fit. :func:`remat.apply_` watches the model's grad-enabled forwards
and warns once when a batch has more elements than the plan's, with the peak predicted for it: the
plan's predicted peak with its part that grows with the batch (all but what is live before the
first unit runs: parameters, optimizer state, the batch) scaled by the ratio of input elements.
Plan on the largest batch you will train with.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from remat.apply.units import tensors_in
from remat.units import format_bytes

__all__ = ["BatchWatch", "batch_shapes", "scaled_peak_bytes", "watch_batches"]


def batch_shapes(batch: Any) -> list[list[int]]:
    """The shapes of the tensors in a batch (tuple, dict, nested), in order.

    Example:
        >>> import torch
        >>> batch_shapes({"input_ids": torch.zeros(2, 16, dtype=torch.long), "n": 3})
        [[2, 16]]
    """
    return [list(t.shape) for t in tensors_in(batch)]


def scaled_peak_bytes(peak_bytes: int, base_bytes: int, scale: float) -> int:
    """The peak of a step whose batch has ``scale`` times the elements: what does not grow
    with the batch (``base_bytes``, what is live before the first unit: parameters, optimizer
    state) as it is, the rest scaled. Linear in the batch: exact for what a batch's tokens each keep, low for
    attention that materialises its seq x seq scores.

    Example:
        >>> scaled_peak_bytes(1000, 400, 2.0)
        1600
    """
    return base_bytes + math.ceil(max(peak_bytes - base_bytes, 0) * scale)


def _elements(shapes: list[list[int]]) -> int:
    """Elements of a batch's tensors; 0-dim ones (a loss scale, the token count Hugging Face's
    Trainer passes as ``num_items_in_batch``) are not batch-sized and are left out."""
    return sum(math.prod(shape) for shape in shapes if shape)


class BatchWatch:
    """A forward pre-hook for the root model: warns once when a grad-enabled forward gets a
    batch with more elements than ``input_shapes`` (the plan's), with its predicted peak.

    Example:
        >>> import warnings
        >>> watch = BatchWatch([[2, 8]], predicted_peak_bytes=8192, base_bytes=4096)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     watch(torch.nn.Identity(), (torch.zeros(4, 8),), {})
        ...     watch(torch.nn.Identity(), (torch.zeros(8, 8),), {})  # said once
        >>> len(caught), "about 12.0 KiB" in str(caught[0].message)
        (1, True)
    """

    def __init__(
        self,
        input_shapes: list[list[int]],
        *,
        predicted_peak_bytes: int | None,
        base_bytes: int | None,
        budget_bytes: int | None = None,
    ) -> None:
        self.input_shapes = input_shapes
        self.planned_elements = _elements(input_shapes)
        self.predicted_peak_bytes = predicted_peak_bytes
        self.base_bytes = base_bytes
        self.budget_bytes = budget_bytes
        self.warned = False

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.warned or not torch.is_grad_enabled() or self.planned_elements == 0:
            return
        shapes = batch_shapes((args, kwargs))
        elements = _elements(shapes)
        if elements <= self.planned_elements:
            return
        self.warned = True
        warnings.warn(self.message(shapes, elements / self.planned_elements), stacklevel=3)

    def message(self, shapes: list[list[int]], scale: float) -> str:
        """What the warning says for a batch of ``shapes``, ``scale`` times the plan's."""
        text = (
            f"remat: this batch (tensor shapes {shapes}) has {scale:.2f}x the elements of the"
            f" batch the plan was made for ({self.input_shapes}); the plan's peak and its choice"
            " of units hold for that batch only."
        )
        if self.predicted_peak_bytes is not None and self.base_bytes is not None:
            peak = scaled_peak_bytes(self.predicted_peak_bytes, self.base_bytes, scale)
            text += (
                f" Predicted peak for this batch: about {format_bytes(peak)} (the plan's"
                f" {format_bytes(self.predicted_peak_bytes)}, all but its"
                f" {format_bytes(self.base_bytes)} of parameters and optimizer state"
                f" scaled by {scale:.2f})"
            )
            if self.budget_bytes is not None and peak > self.budget_bytes:
                text += f", over the plan's budget of {format_bytes(self.budget_bytes)}"
            text += "."
        return text + " Fix: plan on the largest batch you will train with."


def watch_batches(model: nn.Module, plan: Any) -> Callable[[], None] | None:
    """Register a :class:`BatchWatch` on ``model`` for ``plan`` (a :class:`remat.Plan` that knows
    its batch); returns the function that removes it, or ``None`` when the plan knows no batch.

    Example:
        >>> import torch
        >>> from remat.plan import Plan
        >>> remove = watch_batches(torch.nn.Linear(2, 2), Plan(actions={}, input_shapes=[[1, 2]]))
        >>> remove()
    """
    if not plan.input_shapes:
        return None
    hook = model.register_forward_pre_hook(
        BatchWatch(
            plan.input_shapes,
            predicted_peak_bytes=plan.predicted_peak_bytes,
            base_bytes=plan.base_bytes,
            budget_bytes=plan.budget_bytes,
        ),
        with_kwargs=True,
    )
    return hook.remove
