"""``compile_units_``: ``torch.compile`` per unit on a model that carries a remat plan.

Consumes a model with a plan applied (:func:`remat.apply_`) and ``torch.compile`` options; compiles
each unit in place with ``module.compile()``, so the compiler applies the plan when it traces the
unit. When dynamo traces remat's wrapper (``torch.compiler.is_compiling()``), the wrapper calls
:func:`checkpoint_traced` instead of its own engine: a non-reentrant ``torch.utils.checkpoint``
(with :func:`selective_contexts` for a ``selective`` unit: torch's
``create_selective_checkpoint_contexts``, ``MUST_SAVE`` for the ops the save set keeps and
``PREFER_RECOMPUTE`` for the rest) that dynamo turns into a region AOTAutograd's partitioner
recomputes in the compiled backward. So a compiled planned unit runs nothing of remat per op: no op
log, no saved-tensor hooks, no replay bookkeeping. (remat's engine cannot be traced: its replay in
backward would run eagerly and save other tensors than the compiled forward did.)

Whole-model compile (``torch.compile(model)``, ``model.compile()``: what HF Trainer's
``torch_compile=True`` and accelerate do) works the same way. Differences from the eager engine: a
segment or ``nested`` region is checkpointed unit by unit (each unit keeps its input, not only the
first), ``megatron`` recomputes only the attention core ops, and an op the compiled trace names
otherwise than the CPU's eager engine (``native_dropout``) is matched through
:data:`COMPILED_ALIASES`. An ``offload`` unit is compiled inside remat's wrapper (its hooks run
eagerly, around the compiled forward). ``apply_`` on ``torch.compile(model)`` plans the model
inside it: dynamo traces that model's forward and traces it again when a unit's ``forward``
changes, so the plan reaches the compiled graph at the next call, as ``handle.remove()`` does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from remat import _compat
from remat.apply.selective import op_name, policy_for

__all__ = [
    "COMPILED_ALIASES",
    "checkpoint_traced",
    "compile_units_",
    "compiled_saves",
    "selective_contexts",
]


def compile_units_(
    model: nn.Module, units: Iterable[str] | Any, **compile_kwargs: Any
) -> list[str]:
    """``torch.compile`` each unit of ``model`` in place, so the compiler applies its plan.

    Call it after :func:`remat.apply_` and before ``fully_shard`` / DDP. Each unit is compiled
    with ``module.compile()``. Dynamo then traces remat's wrapper of a planned unit, which runs the
    unit as :func:`checkpoint_traced` (``torch.utils.checkpoint``, with
    :func:`selective_contexts` for a ``selective`` save set): AOTAutograd's partitioner recomputes
    it inside the compiled backward, when the graph is traced, so nothing of remat's engine (op
    log, saved-tensor hooks, replay) runs per op. A segment or ``nested`` region is checkpointed
    unit by unit (each unit keeps its input). An ``offload`` unit is compiled *inside* remat's
    wrapper instead (its original ``forward`` becomes the compiled one; the offload hooks run
    eagerly around it). ``torch.compile(model)`` over the whole planned model works the same way
    (see the module's docstring).

    Removing the plan (``handle.remove()``) restores each unit's own ``forward``; the units stay
    compiled (``module.compile()``) and dynamo traces them again, unplanned, at their next call.

    Args:
        model: the model, with its plan applied (or none: then every unit is compiled as it is,
            the compiled unplanned model).
        units: unit FQNs, or anything with a ``units`` list (a :class:`remat.Plan`, a
            :class:`remat.Handle`).
        compile_kwargs: passed to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ...).

    Returns:
        The FQNs whose plan the compiler applies (every planned unit but ``offload`` ones).

    Raises:
        ValueError: a unit is not a module of the model, or an ``offload`` unit was already
            compiled with ``module.compile()`` (two nested compiles: use one).

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
    traced: list[str] = []
    for fqn in names:
        module = modules.get(fqn)
        if module is None:
            raise ValueError(
                f"compile_units_: {fqn!r} is not a module of {type(model).__name__}; expected"
                " unit FQNs as in model.named_modules()"
            )
        wrapper = module.__dict__.get("forward")
        region = getattr(wrapper, "__remat_region__", None)
        if region is not None and region.offload:
            _compile_inside(fqn, module, wrapper, region, compile_kwargs)
            continue
        module.compile(**compile_kwargs)
        if region is not None:
            traced.append(fqn)
    return traced


def _compile_inside(
    fqn: str, module: nn.Module, wrapper: Any, region: Any, compile_kwargs: dict[str, Any]
) -> None:
    """An ``offload`` unit: its original ``forward`` compiled, remat's hooks around it."""
    if _compat.is_module_compiled(module):
        raise ValueError(
            f"compile_units_: {fqn} was already compiled with module.compile(), around its"
            " offload hooks; compiling its forward again inside remat's wrapper would nest two"
            " compiles. Use one of them: module.compile() alone, or compile_units_ on a module"
            " not compiled yet."
        )
    position = next(i for i, (_, m) in enumerate(region.units) if m is module)
    compiled = torch.compile(wrapper.__wrapped__, **compile_kwargs)
    module.__dict__["forward"] = region.make_forward(position, compiled)


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


COMPILED_ALIASES: dict[str, tuple[str, ...]] = {"native_dropout": ("bernoulli_", "div_")}
"""Ops a compiled trace runs where remat's eager engine on the CPU names others: dropout is one
``native_dropout`` (output and mask) under compile, while the CPU's eager dropout draws its mask
with ``bernoulli_`` and scales it with ``div_``. A save set naming either keeps ``native_dropout``
under compile (as the ``dropout`` family does everywhere)."""


def selective_contexts(policy: str) -> Callable[[], Any]:
    """``torch.utils.checkpoint``'s ``context_fn`` that saves the ops a ``selective`` policy keeps.

    Each op the trace runs is named as remat's eager engine names it (:func:`op_name`, matched
    by family as the engine's :class:`~remat.apply.selective.SaveRule` does, so ``ops.attention``
    and ``ops.layer_norm`` keep the kernels this device runs); an op the policy keeps is
    ``MUST_SAVE``, every other ``PREFER_RECOMPUTE``. Ops the compiled trace names otherwise than
    the CPU's eager engine are matched through :data:`COMPILED_ALIASES`. ``megatron`` keeps every
    op but the attention core here: a compiled trace's policy sees each op's inputs, not which ops
    the core feeds.

    Example:
        >>> import torch
        >>> contexts = selective_contexts("ops.addmm.div_")
        >>> forward_context, recompute_context = contexts()
        >>> saves = compiled_saves("ops.addmm.div_")
        >>> saves(torch.ops.aten.addmm.default), saves(torch.ops.aten.native_dropout.default)
        (True, True)
        >>> saves(torch.ops.aten.gelu.default)
        False
    """
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saves = compiled_saves(policy)

    def decide(_ctx: Any, func: Any, *_args: Any, **_kwargs: Any) -> CheckpointPolicy:
        if saves(func):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, decide)


def compiled_saves(policy: str) -> Callable[[Any], bool]:
    """Whether a ``selective`` policy keeps the output of an aten op a compiled trace runs
    (see :func:`selective_contexts`).

    Example:
        >>> import torch
        >>> compiled_saves("save_matmuls")(torch.ops.aten.mm.default)
        True
    """
    rule = policy_for(policy)

    def saves(func: Any) -> bool:
        name = op_name(func)
        if rule(name, False):
            return True
        return any(rule(alias, False) for alias in COMPILED_ALIASES.get(name, ()))

    return saves
