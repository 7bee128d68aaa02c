"""Hugging Face accelerate: plan with remat *before* ``accelerator.prepare``.

The order is the one torchtitan uses for activation checkpointing (applied before ``torch.compile``
and ``fully_shard``): remat measures and plans the bare model, then ``prepare`` moves, wraps
(DDP, FSDP), compiles and autocasts it around the plan::

    accelerator = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=4)
    handle = plan_before_prepare(model, batch, accelerator, budget="60%", optimizer=optimizer)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

:func:`plan_before_prepare` reads what the step will be from the ``Accelerator``: its mixed
precision (``"no"``, ``"bf16"``, ``"fp16"`` -> remat's ``"32"``, ``"bf16-mixed"``,
``"fp16-mixed"``), its gradient accumulation, its number of processes and whether it shards with
FSDP, and plans that step (:func:`remat.integrations.trainer_plan.plan_for_trainer`, as the trainer
callbacks do: one rank's step under DDP or FSDP, the plan saved and reused when ``output_dir`` is
given).

The wrong order, a plan made on a model ``prepare`` already returned, measures something else: the
model under DDP or FSDP wrappers (sharded flat parameters under FSDP, whose units are not the
model's), with accelerate's autocast around its forward whatever precision the plan says.
:func:`check_unprepared` refuses it, naming the fix; :func:`plan_before_prepare` calls it first.
With one process and full precision, ``prepare`` returns the same module and a plan applied after
it still works; the check refuses it anyway, so that a script is right when it scales out.

Needs the ``accelerate`` extra (``pip install 'remat[accelerate]'``) only for the ``Accelerator``
itself: this module does not import accelerate.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from remat.apply.apply import Handle

__all__ = ["PRECISIONS", "accelerator_settings", "check_unprepared", "plan_before_prepare"]

PRECISIONS = {"no": "32", "bf16": "bf16-mixed", "fp16": "fp16-mixed"}
"""accelerate's ``mixed_precision`` -> remat's ``precision``."""

_WRAPPERS = ("DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule", "MpModelWrapper")


def check_unprepared(model: nn.Module) -> None:
    """Refuse a model that ``accelerator.prepare`` has returned: plan before ``prepare``.

    Raises:
        ValueError: the model was prepared (accelerate marks it), or is wrapped by DDP or FSDP.

    Example:
        >>> from torch import nn
        >>> model = nn.Linear(2, 2)
        >>> check_unprepared(model)
        >>> model._is_accelerate_prepared = True  # what accelerator.prepare(model) sets
        >>> check_unprepared(model)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: remat before accelerate: got a model accelerator.prepare already returned; ...
    """
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    wrapper = next(
        (c.__name__ for c in type(inner).__mro__ if c.__name__ in _WRAPPERS),
        None,
    )
    if getattr(model, "_is_accelerate_prepared", False) or wrapper is not None:
        what = f"a {wrapper}" if wrapper else "a model accelerator.prepare already returned"
        raise ValueError(
            f"remat before accelerate: got {what}; expected the bare model, before"
            " accelerator.prepare (which wraps it in DDP or FSDP, autocasts its forward and may"
            " compile it, so a plan made now measures another step). Fix: plan the model first,"
            " then prepare it: handle = plan_before_prepare(model, batch, accelerator,"
            " budget=...); model, optimizer, loader = accelerator.prepare(model, optimizer,"
            " loader)"
        )


def accelerator_settings(accelerator: Any) -> dict[str, Any]:
    """The step an ``Accelerator`` will run, as remat's planning arguments.

    Example:
        >>> from types import SimpleNamespace
        >>> acc = SimpleNamespace(mixed_precision="bf16", gradient_accumulation_steps=4,
        ...                       num_processes=1, distributed_type="NO")
        >>> accelerator_settings(acc)
        {'precision': 'bf16-mixed', 'accumulation_steps': 4, 'world_size': 1, 'fsdp': False}
    """
    mixed = str(getattr(accelerator, "mixed_precision", "no") or "no")
    if mixed not in PRECISIONS:
        raise ValueError(
            f"accelerator.mixed_precision: got {mixed!r}; expected one of {list(PRECISIONS)}"
            " (remat plans those steps). Fix: use one of them, or plan with remat.auto_ and"
            " the precision= your step runs in"
        )
    distributed = str(getattr(accelerator, "distributed_type", "NO"))
    return {
        "precision": PRECISIONS[mixed],
        "accumulation_steps": int(getattr(accelerator, "gradient_accumulation_steps", 1) or 1),
        "world_size": int(getattr(accelerator, "num_processes", 1) or 1),
        "fsdp": distributed.rsplit(".", 1)[-1] == "FSDP",
    }


def plan_before_prepare(
    model: nn.Module,
    batch: Any,
    accelerator: Any,
    *,
    budget: int | str,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: Any = "adamw",
    output_dir: str | Path | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> Handle:
    """Plan and apply remat on ``model`` for the step ``accelerator`` will run; then prepare it.

    Args:
        model: the bare model, on the device it trains on (``accelerator.device``), not yet
            passed to ``accelerator.prepare`` (refused if it was: :func:`check_unprepared`).
        batch: one batch as the model takes it (tuple of positional arguments, dict of keyword
            arguments), of the shapes training uses.
        accelerator: the ``accelerate.Accelerator``; its precision, gradient accumulation, number
            of processes and FSDP setting are the planned step's (:func:`accelerator_settings`).
        budget: as :func:`remat.auto_` takes it (bytes, ``"22GiB"``, ``"60%"``, ``"min"``).
        loss_fn: output -> scalar loss (default: the output's ``loss`` field, as Hugging Face
            models return, else as :func:`remat.auto_` says).
        optimizer: the optimizer instance training will use (not stepped: remat makes its own of
            the same class), or ``"adamw"`` / ``"sgd"``.
        output_dir: where the plan is saved as ``remat_plan.json`` and, on a later run of the
            same model and settings, reused without profiling; ``None``: neither.
        log: called once with the plan's summary (e.g. ``accelerator.log``).
        options: more :func:`remat.auto_` arguments (``units``, ``actions``, ...).

    Returns:
        The :class:`~remat.Handle`; ``handle.result`` is the solve (``None`` for a reused plan).
        The random number generators are as they were: planning runs steps but draws nothing
        that training would. With several processes rank 0 plans and every rank applies its
        plan (:func:`remat.integrations.trainer_plan.plan_for_trainer`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from types import SimpleNamespace
        >>> acc = SimpleNamespace(mixed_precision="no", gradient_accumulation_steps=1,
        ...                       num_processes=1, distributed_type="NO")
        >>> model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(6)])
        >>> batch = (torch.randn(64, 32),)
        >>> handle = plan_before_prepare(model, batch, acc, budget="min", optimizer="sgd")
        >>> len(handle.checkpointed) > 0
        True
        >>> handle.remove()
    """
    from remat.integrations.trainer_plan import plan_for_trainer

    check_unprepared(model)
    settings = accelerator_settings(accelerator)
    if loss_fn is not None:
        options["loss_fn"] = loss_fn
    return plan_for_trainer(
        model,
        batch,
        budget=budget,
        output_dir=output_dir,
        optimizer=optimizer,
        log=log,
        **settings,
        **options,
    )
