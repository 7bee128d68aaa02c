"""The type every model factory returns, and the argument checks the built-in factories share.

Consumes nothing of remat; produces :class:`BuiltModel` and the got / expected / fix checks. The
package (:mod:`remat.models`) and each built-in factory module import it, so that neither imports
the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BuiltModel"]


@dataclass(kw_only=True)
class BuiltModel:
    """A model with example inputs and a loss, as built-in factories and user factories return.

    Attributes:
        model: the module to train.
        example_inputs: positional arguments (a tuple) or keyword arguments (a dict) for
            ``model(...)``.
        loss_fn: maps the model's output to a scalar loss; ``None`` when the output is the loss.
        name: a short label for reports.

    Example:
        >>> import torch
        >>> built = BuiltModel(model=torch.nn.Linear(4, 2), example_inputs=(torch.randn(3, 4),),
        ...                    loss_fn=lambda out: out.square().mean(), name="linear")
        >>> built.loss_fn(built.model(*built.example_inputs)).shape
        torch.Size([])
    """

    model: torch.nn.Module
    example_inputs: tuple | dict
    loss_fn: Callable[[Any], torch.Tensor] | None = None
    name: str = ""


def _value_error(what: str, got: Any, expected: str, fix: str) -> ValueError:
    """A ValueError in the project's got / expected / fix form."""
    return ValueError(f"{what}: got {got!r}; expected {expected}; fix: {fix}")


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an int >= ``minimum`` (bools are refused), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _value_error(
            name, value, f"an int >= {minimum}", f"pass {name}={max(minimum, 1)} or larger"
        )
    return value


def _check_dropout(value: Any, name: str = "dropout") -> float:
    """``value`` as a float if it is a probability in [0, 1), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise _value_error(name, value, "a float in [0, 1)", f"pass e.g. {name}=0.1 (0 disables)")
    return float(value)


def _check_divisible(what: str, value: int, divisor_name: str, divisor: int) -> None:
    """A ValueError unless ``divisor`` divides ``value``."""
    if value % divisor:
        lower = value - value % divisor
        raise _value_error(
            what,
            value,
            f"a multiple of {divisor_name}={divisor}",
            f"use {what}={lower or divisor} or {lower + divisor}, or change {divisor_name}",
        )
