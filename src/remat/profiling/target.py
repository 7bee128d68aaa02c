"""Defaults that a modelled target device changes in the tracker and the training step.

Estimate mode (:mod:`remat.profiling.estimate`) runs on ``meta`` but models a CUDA target: the
caching allocator rounds every block up to 512 bytes, and ``torch.optim.AdamW`` takes its
``foreach`` path there (one temporary per parameter for the whole group, not per parameter). The
tracker and :func:`~remat.profiling.step.make_optimizer` read these defaults from here while a
:func:`target_defaults` block is active.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["TargetDefaults", "current_target", "target_defaults"]


@dataclass(frozen=True, kw_only=True)
class TargetDefaults:
    """What the modelled device changes.

    Example:
        >>> with target_defaults(TargetDefaults(round_bytes=512, optimizer_foreach=True)):
        ...     current_target().round_bytes
        512
        >>> current_target() is None
        True
    """

    round_bytes: int | None = None
    """Round each storage up to this many bytes (512: CUDA's caching allocator)."""
    optimizer_foreach: bool | None = None
    """Build optimizers with ``foreach=`` this (``None``: torch's default for the tensors' device)."""


_CURRENT: ContextVar[TargetDefaults | None] = ContextVar("remat_target_defaults", default=None)


def current_target() -> TargetDefaults | None:
    """The active defaults, or ``None`` outside :func:`target_defaults`."""
    return _CURRENT.get()


@contextmanager
def target_defaults(defaults: TargetDefaults) -> Iterator[TargetDefaults]:
    """Make ``defaults`` active inside the block (see :class:`TargetDefaults` for an example)."""
    token = _CURRENT.set(defaults)
    try:
        yield defaults
    finally:
        _CURRENT.reset(token)
