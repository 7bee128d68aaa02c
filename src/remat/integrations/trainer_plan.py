"""The planning the trainer callbacks share: plan once for the step a trainer will run, apply it,
save it beside the checkpoints, and on resume reuse it instead of profiling again.

Consumes a model (unwrapped, on its training device), one batch of the trainer's data and the
trainer's settings (precision, optimizer, gradient accumulation, world size, FSDP); produces the
:class:`~remat.apply.apply.Handle` of the plan installed in place, the plan as JSON in
``output_dir/remat_plan.json``, and a summary handed to the trainer's logging.

Framework-free: :class:`remat.integrations.hf.RematCallback` (Hugging Face ``Trainer``) and
:class:`remat.integrations.lightning.RematCallback` (Lightning) call :func:`plan_for_trainer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from remat import _compat
from remat.apply.apply import Handle, apply_, fingerprint
from remat.auto import auto_
from remat.plan import Plan
from remat.profiling.step import Step

__all__ = ["PLAN_FILE", "plan_for_trainer", "plan_summary", "trainer_settings"]

logger = logging.getLogger("remat")

PLAN_FILE = "remat_plan.json"
"""The plan's file name in the trainer's ``output_dir``."""


def trainer_settings(
    *,
    budget: Any,
    precision: str,
    optimizer: Any,
    accumulation_steps: int,
    world_size: int,
    fsdp: bool,
    batch: Any = None,
) -> dict[str, Any]:
    """What a saved plan was made for besides the model (whose fingerprint the plan holds): a
    saved plan is reused only when these are the same.

    Example:
        >>> trainer_settings(budget="min", precision="32", optimizer=None, accumulation_steps=1,
        ...                  world_size=1, fsdp=False)["optimizer"]
        'none'
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer_name = type(optimizer).__name__
    elif optimizer is None:
        optimizer_name = "none"
    elif isinstance(optimizer, str):
        optimizer_name = optimizer
    else:
        optimizer_name = getattr(optimizer, "__name__", type(optimizer).__name__)
    shapes = [list(t.shape) for t in _tensors(batch)]
    return {
        "budget": str(budget),
        "precision": precision,
        "optimizer": optimizer_name,
        "accumulation_steps": int(accumulation_steps),
        "world_size": int(world_size),
        "fsdp": bool(fsdp),
        "input_shapes": shapes,
    }


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def plan_summary(handle: Handle, *, reused: bool, path: Path | None) -> dict[str, Any]:
    """The plan in a trainer's log: flat ``remat/...`` keys with numbers (and a few strings).

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> handle = apply_(model, Plan(actions={"1": "recompute"}))
        >>> plan_summary(handle, reused=False, path=None)["remat/checkpointed_units"]
        1
        >>> handle.remove()
    """
    plan = handle.plan
    result = handle.result
    summary: dict[str, Any] = {
        "remat/strategy": plan.strategy,
        "remat/units": len(handle.units),
        "remat/checkpointed_units": len(handle.checkpointed),
        "remat/budget_bytes": plan.budget_bytes,
        "remat/predicted_peak_bytes": plan.predicted_peak_bytes,
        "remat/predicted_overhead": plan.predicted_overhead,
        "remat/plan_reused": reused,
    }
    if result is not None and getattr(result, "measured_peak_bytes", None) is not None:
        summary["remat/measured_peak_bytes"] = result.measured_peak_bytes
    if path is not None:
        summary["remat/plan_file"] = str(path)
    return summary


def _refuse_own_checkpointing(model: nn.Module) -> None:
    own = [  # as remat.integrations.hf.checkpointing_modules (which imports this module)
        name
        for name, module in model.named_modules()
        if getattr(module, "gradient_checkpointing", False) is True
    ]
    if own:
        raise ValueError(
            "remat trainer callback: got a model that checkpoints itself (gradient_checkpointing"
            f" is True on {', '.join(n or '<model>' for n in own[:3])}); expected a model"
            " without its own activation checkpointing, so that remat's plan decides what to"
            " recompute (both together recompute twice). Fix: turn the trainer's or model's"
            " gradient checkpointing off (TrainingArguments(gradient_checkpointing=False),"
            " model.gradient_checkpointing_disable()) and keep the remat callback"
        )


def _saved_plan(path: Path, model: nn.Module, settings: dict[str, Any]) -> Plan | None:
    """The plan saved at ``path`` when it is for this model (fingerprint) and these settings."""
    if not path.is_file():
        return None
    try:
        plan = Plan.load(path)
    except ValueError as error:
        logger.warning("remat: %s; planning again", error)
        return None
    actual = fingerprint(model)
    saved = plan.fingerprint or {}
    same_model = (
        saved.get("parameters_sha256") == actual["parameters_sha256"]
        and saved.get("model_class") == actual["model_class"]
    )
    if not same_model:
        logger.warning("remat: the plan in %s is for another model; planning again", path)
        return None
    if plan.metadata.get("trainer") != settings:
        logger.warning(
            "remat: the plan in %s was made for %s, this run is %s; planning again",
            path,
            plan.metadata.get("trainer"),
            settings,
        )
        return None
    return plan


@contextlib.contextmanager
def _rng_kept(model: nn.Module) -> Iterator[None]:
    """Planning runs steps (dropout draws numbers): training after it sees the same random
    numbers as without it."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        yield


def _solve_new(
    model: nn.Module,
    batch: Any,
    *,
    budget: Any,
    precision: str,
    optimizer: Any,
    accumulation_steps: int,
    world_size: int,
    fsdp: bool,
    auto_options: dict[str, Any],
) -> Handle:
    """``remat.auto_`` on the Trainer's step. Under DDP/FSDP the figures are one rank's,
    predicted (the pipeline measures this process only, so its closed loop is skipped)."""
    fields = {k: v for k, v in auto_options.items() if k in ("loss_fn", "units", "capacity_bytes")}
    rest = {k: v for k, v in auto_options.items() if k not in fields}
    step = Step(
        model,
        batch,
        optimizer=optimizer,
        precision=precision,
        accumulation_steps=accumulation_steps,
        world_size=world_size,
        fsdp=fsdp,
        **fields,
    )
    with _rng_kept(model):
        return auto_(step, budget=budget, **rest)


def plan_for_trainer(
    model: nn.Module,
    batch: Any,
    *,
    budget: int | str,
    output_dir: str | Path | None = None,
    precision: str = "32",
    optimizer: Any = "adamw",
    accumulation_steps: int = 1,
    world_size: int = 1,
    fsdp: bool = False,
    log: Callable[[dict[str, Any]], None] | None = None,
    **auto_options: Any,
) -> Handle:
    """Plan for the training step a trainer will run, apply the plan, save it, log it.

    Args:
        model: the model the trainer trains (not its DDP/compile wrapper), on its device.
        batch: one batch as the model takes it (a dict of keyword arguments, a tuple of
            positional ones, or one tensor), on the model's device.
        budget: as :func:`remat.auto_` (bytes, ``"22GiB"``, ``"60%"``, ``"min"``).
        output_dir: where ``remat_plan.json`` is saved (and read back on resume); ``None``:
            neither saved nor reused.
        precision: ``"32"``, ``"bf16-mixed"``, ``"fp16-mixed"`` or ``"bf16-true"``.
        optimizer: the trainer's optimizer instance (profiled on a new one of its class and
            hyperparameters; the instance and its state are not changed), or ``"adamw"`` /
            ``"sgd"`` / ``"none"``.
        accumulation_steps: the trainer's gradient accumulation steps.
        world_size, fsdp: plan for one of ``world_size`` ranks under DDP or FSDP2; then the
            step is profiled in this process, the figures made per rank, and the plan solved
            without the measured closed loop. Under ``torch.distributed`` rank 0 alone reads the
            saved plan or plans, writes the file, and every rank applies its plan
            (:func:`remat.integrations.distributed.broadcast_plan`).
        log: called once with :func:`plan_summary`'s dict (e.g. the trainer's ``log``).
        auto_options: more :func:`remat.auto_` options (``loss_fn``, ``units``, ``actions``,
            ``capacity_bytes``).

    Returns:
        The :class:`~remat.apply.apply.Handle` (``handle.remove()`` takes the plan off);
        ``handle.result`` is the solver's result when the plan was made now (on rank 0), ``None``
        when the saved plan was reused (then ``handle.plan.metadata["reused_from"]`` is its file).

    Raises:
        ValueError: the model checkpoints itself (Hugging Face ``gradient_checkpointing``);
            :class:`remat.InfeasibleBudgetError` when no plan fits.

    A saved plan is reused when its fingerprint matches the model and it was made for the same
    budget, precision, optimizer class, accumulation, world size, FSDP and batch shapes;
    otherwise the plan is made again and the file replaced. Random number generators are left
    as they were: the training after planning draws the same numbers as without it.

    Example:
        >>> import tempfile
        >>> from torch import nn
        >>> model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(6)])
        >>> batch = (torch.randn(64, 32),)
        >>> out = tempfile.mkdtemp()
        >>> options = {"budget": "min", "output_dir": out, "optimizer": "sgd", "actions": ["keep", "recompute"]}
        >>> handle = plan_for_trainer(model, batch, **options)
        >>> len(handle.checkpointed) > 0, (Path(out) / PLAN_FILE).is_file()
        (True, True)
        >>> handle.remove()
        >>> again = plan_for_trainer(model, batch, **options)
        >>> again.result is None, again.checkpointed == handle.checkpointed
        (True, True)
        >>> again.remove()
    """
    from remat.integrations.distributed import broadcast_plan, rank_and_world_size

    model = _compat.compiled_original(model)
    _refuse_own_checkpointing(model)
    settings = trainer_settings(
        budget=budget,
        precision=precision,
        optimizer=optimizer,
        accumulation_steps=accumulation_steps,
        world_size=world_size,
        fsdp=fsdp,
        batch=batch,
    )
    path = Path(output_dir) / PLAN_FILE if output_dir is not None else None
    rank, ranks = rank_and_world_size()
    made: list[Handle] = []

    def make() -> Plan:  # on rank 0 only: it decides, for every rank, reuse or plan
        saved = _saved_plan(path, model, settings) if path is not None else None
        if saved is not None:
            logger.info("remat: reusing the plan in %s (no profile)", path)
            return dataclasses.replace(saved, metadata={**saved.metadata, "reused_from": str(path)})
        made.append(
            _solve_new(
                model,
                batch,
                budget=budget,
                precision=precision,
                optimizer=optimizer,
                accumulation_steps=accumulation_steps,
                world_size=world_size,
                fsdp=fsdp,
                auto_options=dict(auto_options),
            )
        )
        made[0].plan.metadata["trainer"] = settings
        if path is not None:
            made[0].plan.save(path)
        return made[0].plan

    plan = broadcast_plan(make if rank == 0 else None)
    handle = made[0] if made else apply_(model, plan)
    summary = plan_summary(handle, reused="reused_from" in plan.metadata, path=path)
    logger.info(
        "remat: %s plan, %d of %d units checkpointed, predicted peak %s bytes (budget %s)%s",
        handle.plan.strategy,
        len(handle.checkpointed),
        len(handle.units),
        handle.plan.predicted_peak_bytes,
        handle.plan.budget_bytes,
        f" on {ranks} ranks" if ranks > 1 else "",
    )
    if log is not None:
        log(summary)
    return handle
