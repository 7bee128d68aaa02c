"""``compile_units_``: ``torch.compile`` per unit on a model that carries a remat plan.

Consumes a model with a plan applied (:func:`remat.apply_`) and ``torch.compile`` options; compiles
each unit in place. A unit the plan keeps is compiled with ``module.compile()``. A unit the plan
recomputes is compiled *inside* remat's wrapper: its original ``forward`` becomes the compiled one,
so the forward and its replay in backward run the same compiled graph and save the same tensors.

Why not ``module.compile()`` on a planned unit: dynamo then traces remat's wrapper, breaks the graph
at its ``saved_tensors_hooks`` and compiles the original ``forward`` as a nested frame, whose saved
tensors are those of AOTAutograd's partition; the replay in backward runs outside any compiled
region, eagerly, and saves eager's tensors, which differ in shape. remat detects that and raises
``CheckpointMismatchError`` rather than compute wrong gradients (see ``docs/distributed.md``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from remat import _compat

__all__ = ["compile_units_"]


def compile_units_(
    model: nn.Module, units: Iterable[str] | Any, **compile_kwargs: Any
) -> list[str]:
    """``torch.compile`` each unit of ``model`` in place, around or inside remat's wrapper.

        Call it after :func:`remat.apply_` and before ``fully_shard`` / DDP. Removing the plan
        (``handle.remove()``) restores the units' uncompiled ``forward``; units the plan kept stay
        compiled (``module.compile()``).

        Args:
            model: the model, with its plan applied (or none: then every unit is ``module.compile()``-d).
            units: unit FQNs, or anything with a ``units`` list (a :class:`remat.Plan`, a
                :class:`remat.Handle`).
            compile_kwargs: passed to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ...).

        Returns:
            The FQNs compiled inside remat's wrapper (the recomputed units).

        Raises:
            ValueError: a unit is not a module of the model, or a planned unit was already compiled
                with ``module.compile()`` (its replay would not run the compiled graph).

        Example:
            >>> import torch, remat
            >>> from torch import nn

    from remat import _compat
            >>> model = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(2)])
            >>> handle = remat.apply_(model, remat.Plan(actions={"0": "recompute"}))
            >>> compile_units_(model, handle, backend="eager")
            ['0']
            >>> model(torch.randn(3, 4, requires_grad=True)).sum().backward()
    """
    names = getattr(units, "units", units)
    if names is None:
        raise ValueError(
            "compile_units_: the plan lists no units; pass unit FQNs (remat.find_units(model))"
        )
    modules = dict(model.named_modules())
    inside: list[str] = []
    for fqn in names:
        module = modules.get(fqn)
        if module is None:
            raise ValueError(
                f"compile_units_: {fqn!r} is not a module of {type(model).__name__}; expected"
                " unit FQNs as in model.named_modules()"
            )
        wrapper = module.__dict__.get("forward")
        region = getattr(wrapper, "__remat_region__", None)
        if region is None:
            module.compile(**compile_kwargs)
            continue
        if _compat.is_module_compiled(module):
            raise ValueError(
                f"compile_units_: {fqn} was compiled with module.compile() after remat's plan was"
                " applied; its replay in backward would run eagerly and save other tensors."
                " Rebuild the module (or skip module.compile()) and call compile_units_ instead."
            )
        position = next(i for i, (_, m) in enumerate(region.units) if m is module)
        compiled = torch.compile(wrapper.__wrapped__, **compile_kwargs)
        module.__dict__["forward"] = region.make_forward(position, compiled)
        inside.append(fqn)
    return inside
