"""``compile_units_``: ``torch.compile`` per unit on a model that carries a remat plan.

Consumes a model with a plan applied (:func:`remat.apply_`) and ``torch.compile`` options; compiles
each unit in place. A unit the plan keeps is compiled with ``module.compile()``. A unit the plan
recomputes is compiled *inside* remat's wrapper: its original ``forward`` becomes the compiled one,
so the forward and its replay in backward run the same compiled graph and save the same tensors.

``module.compile()`` on a planned unit, and whole-model compile (``torch.compile(model)``,
``model.compile()``: what HF Trainer's ``torch_compile=True`` and accelerate do), work too, another
way: when dynamo traces remat's wrapper (``torch.compiler.is_compiling()``), the wrapper calls
:func:`checkpoint_traced` instead of its own engine, a non-reentrant ``torch.utils.checkpoint``
(with selective-checkpoint contexts for a ``selective`` unit) that dynamo turns into a region that
AOTAutograd's partitioner recomputes in the compiled backward. (remat's engine cannot be traced: its
replay in backward would run eagerly and save other tensors than the compiled forward did.) Two
differences from the engine: a segment is checkpointed unit by unit, and ``megatron`` recomputes only
the attention core ops. An ``offload`` unit keeps its hooks (dynamo breaks the graph around them).
``apply_`` on ``torch.compile(model)`` plans the model inside it: dynamo traces that model's forward
and traces it again when a unit's ``forward`` changes, so the plan reaches the compiled graph at the
next call, as ``handle.remove()`` does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from remat import _compat
from remat.apply.selective import op_name, policy_for

__all__ = ["checkpoint_traced", "compile_units_", "selective_contexts"]


def compile_units_(
    model: nn.Module, units: Iterable[str] | Any, **compile_kwargs: Any
) -> list[str]:
    """``torch.compile`` each unit of ``model`` in place, around or inside remat's wrapper.

    Call it after :func:`remat.apply_` and before ``fully_shard`` / DDP. (``torch.compile(model)``
    over the whole planned model works too: see the module's docstring.) Removing the plan
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
            with ``module.compile()`` (two nested compiles: use one).

    Example:
        >>> import torch, remat
        >>> from torch import nn
        >>> model = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(2)])
        >>> handle = remat.apply_(model, remat.Plan(actions={"0": "recompute"}))
        >>> compile_units_(model, handle, backend="eager")
        ['0']
        >>> model(torch.randn(3, 4, requires_grad=True)).sum().backward()
    """
    model = _compat.compiled_original(model)
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
                f"compile_units_: {fqn} was already compiled with module.compile() (which runs"
                " its plan as torch.utils.checkpoint inside the compiled graph); compiling its"
                " forward again inside remat's wrapper would nest two compiles. Use one of them:"
                " module.compile() alone, or compile_units_ on a module not compiled yet."
            )
        position = next(i for i, (_, m) in enumerate(region.units) if m is module)
        compiled = torch.compile(wrapper.__wrapped__, **compile_kwargs)
        module.__dict__["forward"] = region.make_forward(position, compiled)
        inside.append(fqn)
    return inside


def checkpoint_traced(
    context_fn: Callable[[], Any] | None, forward: Callable[..., Any], args: Any, kwargs: Any
) -> Any:
    """A planned unit's call while dynamo traces the whole model: ``torch.utils.checkpoint``.

    remat's wrapper calls this instead of its own engine when ``torch.compiler.is_compiling()``:
    its saved-tensor hooks and replay cannot be traced, while dynamo turns a non-reentrant
    ``checkpoint`` into a region that AOTAutograd's partitioner recomputes in the compiled backward.
    A ``selective`` unit passes ``context_fn`` from :func:`selective_contexts`. A segment is
    checkpointed unit by unit (each unit's input is kept, not only the first). With
    ``backend="eager"`` torch runs such a region without restoring the RNG state in backward
    (pytorch/pytorch#160773): a unit that draws random numbers (dropout) then recomputes with other
    draws; ``aot_eager`` and ``inductor`` save or replay them exactly.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(4, 4)
        >>> x = torch.randn(2, 4, requires_grad=True)
        >>> checkpoint_traced(selective_contexts("save_matmuls"), layer, (x,), {}).shape
        torch.Size([2, 4])
    """
    from torch.utils.checkpoint import checkpoint

    if context_fn is None:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def selective_contexts(policy: str) -> Callable[[], Any]:
    """``torch.utils.checkpoint``'s ``context_fn`` that saves the ops a ``selective`` policy keeps.

    ``megatron`` keeps every op but the attention core here: a compiled trace's policy sees each
    op's inputs, not which ops the core feeds.

    Example:
        >>> import torch
        >>> contexts = selective_contexts("save_matmuls")
        >>> forward_context, recompute_context = contexts()
    """
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    rule = policy_for(policy)

    def decide(_ctx: Any, func: Any, *_args: Any, **_kwargs: Any) -> CheckpointPolicy:
        if rule(op_name(func), False):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, decide)
