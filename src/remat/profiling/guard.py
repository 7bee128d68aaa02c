"""Shape-only steps: the error for ops that have no shape-only form, and the guard that raises it.

Consumes a model running on ``meta`` (estimate mode, or a transformers model readied by
:func:`remat.integrations.hf.prepare_meta`); produces :class:`NotEstimableError`, naming the module
that ran an op whose output shape depends on tensor values, before the op runs. Both estimate mode
(:mod:`remat.profiling.estimate`) and the transformers integration use it, so it imports neither.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from remat._compat import TorchDispatchMode, tree_flatten
from remat.profiling.tracker import DATA_DEPENDENT_OPS

__all__ = ["DataDependentGuard", "NotEstimableError", "module_running"]


class NotEstimableError(ValueError):
    """The model runs an op whose output shape depends on tensor values, so shapes alone cannot
    say how much memory it takes.

    Example:
        >>> issubclass(NotEstimableError, ValueError)
        True
    """


def module_running(names: dict[int, str]) -> str:
    """The innermost module whose ``forward`` is on the Python stack, named by ``names`` (``id``
    of a module -> its FQN); found without hooks (global ones would make every recomputed unit
    warn that they run twice).

    Example:
        >>> module_running({})
        '(outside the model)'
    """
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            return names[id(owner)] or "(the model)"
        frame = frame.f_back
    return "(outside the model)"


class DataDependentGuard(TorchDispatchMode):
    """Raises :class:`NotEstimableError` before an op whose output shape depends on values.

    Example:
        >>> model = nn.Linear(2, 2, device="meta")
        >>> with DataDependentGuard(model):
        ...     torch.nonzero(torch.ones(3, device="meta"))
        Traceback (most recent call last):
        ...
        remat.profiling.guard.NotEstimableError: estimate: got a model whose module ...
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {id(m): name for name, m in model.named_modules()}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(getattr(func, "overloadpacket", func), "__name__", str(func))
        suspect = name in DATA_DEPENDENT_OPS or (
            name == "index"
            and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in tree_flatten(args[1:])[0]
            )
        )
        # An optimizer's step counter lives on the CPU and may be read with .item().
        if suspect and any(
            isinstance(t, torch.Tensor) and t.device.type == "meta"
            for t in tree_flatten((args, kwargs))[0]
        ):
            fqn = module_running(self.names)
            raise NotEstimableError(
                f"estimate: got a model whose module {fqn!r} runs {name}, whose output shape"
                " depends on tensor values (data-dependent routing such as mixture-of-experts"
                " dispatch); expected ops with shape-only forms. Fix: profile it on a real device"
                " (mode='measure'), or make the op's shapes static (e.g. capacity-padded expert"
                " dispatch)"
            )
        return func(*args, **(kwargs or {}))
