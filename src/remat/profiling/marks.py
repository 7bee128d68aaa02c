"""Unit boundaries in a training step: hooks on the units that report when each unit's forward
starts and ends and when its backward starts.

Consumes the unit modules (in execution order) and a callback; produces events
``("forward", i)``, ``("after", i)`` and ``("backward", i)``, and records the storages of each
unit's inputs and outputs. The profiler (:mod:`remat.profiling.profiler`) marks the tracker's
intervals with them; estimate mode's roofline (:mod:`remat.profiling.meta_target`) buckets op
times by them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from remat._compat import in_backward
from remat.apply.units import tensors_in

__all__ = ["UnitMarks"]


class UnitMarks:
    """Hooks on the units that mark interval boundaries in a tracker, or take timestamps.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> seen = []
        >>> marks = UnitMarks([model[0], model[1]], seen.append)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> marks.remove()
        >>> seen
        [('forward', 0), ('after', 0), ('forward', 1), ('after', 1), ('backward', 1), ('backward', 0)]
    """

    def __init__(self, modules: list[nn.Module], on_event: Callable[[tuple[str, int]], None]):
        self.on_event = on_event
        self.handles: list[Any] = []
        self.outputs: dict[int, dict[int, int]] = {}
        self.inputs: dict[int, list[tuple[int, int]]] = {}
        self.last_inputs: list[torch.Tensor] = []
        self.data_dependent: dict[str, list[str]] = {}
        for index, module in enumerate(modules):
            self.handles.append(module.register_forward_pre_hook(self._pre(index)))
            self.handles.append(module.register_forward_hook(self._post(index)))

    def _pre(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if in_backward():
                return
            self.last_inputs = tensors_in(args)
            self.inputs[index] = [
                (id(t.untyped_storage()), t.untyped_storage().nbytes()) for t in self.last_inputs
            ]
            self.on_event(("forward", index))
            self.last_inputs = []

        return hook

    def _post(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if in_backward():
                return
            self.on_event(("after", index))
            tensors = tensors_in(output)
            self.outputs[index] = {
                id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors
            }
            needing = [t for t in tensors if t.requires_grad]
            if needing and torch.is_grad_enabled():
                torch.autograd.graph.register_multi_grad_hook(
                    needing, lambda _grad: self.on_event(("backward", index)), mode="any"
                )

        return hook

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()
