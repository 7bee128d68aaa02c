"""remat under ``torchrun``: one plan on every rank, and the documented order of transforms.

Consumes a :class:`~remat.plan.Plan` (solved on one rank) or a model; produces the same plan on
every rank (:func:`broadcast_plan`) and a model sharded with FSDP2 per unit (:func:`fully_shard_units`).

Every rank must install the same plan: a checkpointed unit that one rank recomputes and another keeps
still gives the same gradients, but a plan solved on each rank from its own timings can differ (timing
noise), and the memory each rank needs then differs too. Solve once, on rank 0, and broadcast it.

The order (see ``docs/distributed.md``): apply remat, then ``torch.compile`` per block (optional),
then ``fully_shard`` per unit and on the root (or wrap the model in DDP).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from remat.plan import Plan

__all__ = ["broadcast_plan", "fully_shard_units", "is_distributed", "rank_and_world_size"]

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    """Whether a default process group is initialised (``torchrun`` with ``init_process_group``).

    Example:
        >>> is_distributed()
        False
    """
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world_size(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (default: the default group); ``(0, 1)`` without one.

    Example:
        >>> rank_and_world_size()
        (0, 1)
    """
    if not is_distributed():
        return 0, 1
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def broadcast_plan(
    plan: Plan | Callable[[], Plan] | None, *, src: int = 0, group: Any = None
) -> Plan:
    """The plan of rank ``src`` on every rank.

    Args:
        plan: on rank ``src``, the plan, or a function that makes it (so that only ``src`` profiles
            and solves); ignored on the other ranks (pass ``None``).
        src: the rank whose plan wins (a global rank, as ``torch.distributed.broadcast_object_list``
            takes).
        group: the process group (default: the default group).

    Returns:
        The plan, rebuilt from its JSON form on the receiving ranks. Without an initialised process
        group (a single process), ``plan`` itself (called if it is a function).

    Raises:
        ValueError: on rank ``src``, ``plan`` is not a plan (or the function returned something
            else); on the others, rank ``src`` sent something that is not a plan.

    Example:
        >>> plan = Plan(actions={"_default": "recompute"})
        >>> broadcast_plan(plan) is plan
        True
        >>> broadcast_plan(lambda: plan) is plan
        True
    """
    if not is_distributed():
        made = plan() if callable(plan) else plan
        return _checked(made, "broadcast_plan")
    rank = torch.distributed.get_rank()
    payload: list[Any] = [None]
    if rank == src:
        made = _checked(plan() if callable(plan) else plan, "broadcast_plan")
        payload = [made.to_dict()]
    # Pickles a plain dict (the plan's JSON form), not the Plan object: receivers rebuild it
    # through the same validation as a plan file.
    torch.distributed.broadcast_object_list(payload, src=src, group=group)
    if rank == src:
        return made
    return Plan.from_dict(payload[0], source=f"plan broadcast from rank {src}")


def _checked(plan: Any, where: str) -> Plan:
    if not isinstance(plan, Plan):
        raise ValueError(
            f"{where}: got {type(plan).__name__} on the source rank; expected a remat.Plan (or a"
            " function returning one), e.g. remat.solve(profile, budget).plan"
        )
    return plan


def fully_shard_units(
    model: nn.Module, units: Iterable[str] | Plan, **fsdp_kwargs: Any
) -> nn.Module:
    """FSDP2 ``fully_shard`` on each unit, in order, then on the root: the wrapping the planner's
    distributed model assumes (one all-gather per unit; see ``docs/distributed.md``).

    Call it after :func:`remat.apply_` (and after per-block ``torch.compile``). Needs an
    initialised process group, or ``mesh=`` in ``fsdp_kwargs``.

    Args:
        model: the model, with its plan applied.
        units: unit FQNs, or a plan whose ``units`` are used.
        fsdp_kwargs: passed to every ``fully_shard`` call (``mesh``, ``mp_policy``, ...).

    Returns:
        The model (``fully_shard`` changes modules in place).

    Raises:
        ValueError: a unit is not a module of the model, the plan lists no units, or a unit is in a
            remat segment (which cannot replay under FSDP2).

    Example:
        >>> from torch import nn
        >>> fully_shard_units(nn.Linear(2, 2), ["nope"])
        Traceback (most recent call last):
        ...
        ValueError: fully_shard_units: 'nope' is not a module of Linear; expected unit FQNs as in model.named_modules() (e.g. plan.units)
    """
    if isinstance(units, Plan):
        if units.units is None:
            raise ValueError(
                "fully_shard_units: the plan lists no units; pass unit FQNs (remat.find_units)"
            )
        units = units.units
    modules = dict(model.named_modules())
    names = list(units)
    for fqn in names:
        if fqn not in modules:
            raise ValueError(
                f"fully_shard_units: {fqn!r} is not a module of {type(model).__name__}; expected"
                " unit FQNs as in model.named_modules() (e.g. plan.units)"
            )
    for fqn in names:
        region = getattr(modules[fqn].__dict__.get("forward"), "__remat_region__", None)
        if region is not None and len(region.units) > 1:
            raise ValueError(
                f"fully_shard_units: {fqn} is in a remat segment of {len(region.units)} units"
                f" ({region.name}); under FSDP2 a segment's replay runs its earlier units while"
                " their parameters are sharded, which fails. Solve with fsdp=True (plans without"
                " segments: remat.solve(profile, budget, world_size=N, fsdp=True)) or use the"
                " 'full' or 'every_n:K' baseline."
            )
    from torch.distributed.fsdp import fully_shard

    for fqn in names:
        fully_shard(modules[fqn], **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    logger.info("remat: fully_shard on %d units and the root", len(names))
    return model
