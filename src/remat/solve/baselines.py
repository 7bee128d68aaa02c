"""Baseline strategies as plans, built by the same code as every other plan.

- ``none``: keep everything (no checkpointing);
- ``full``: recompute every unit (what Hugging Face's ``gradient_checkpointing_enable`` does);
- ``every_n:K``: recompute every K-th unit (units K-1, 2K-1, ...; torchtitan's selective layer mode);
- ``sqrt_n``: about sqrt(n) segments of consecutive units, the last one kept, as
  ``torch.utils.checkpoint.checkpoint_sequential`` does (Chen et al. 2016, arXiv 1604.06174);
- ``megatron``: every unit ``selective:megatron`` (recompute the attention core only; Korthikanti
  et al. 2022, arXiv 2205.05198);
- ``save_matmuls``: every unit ``selective:save_matmuls`` (torchtitan's op-level selective mode);
- ``offload``: every unit ``offload`` (torchtune's activation offloading).

Consumes unit FQNs in execution order; produces a :class:`~remat.plan.Plan`. Imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from remat.plan import Plan

__all__ = ["STRATEGIES", "baseline_plan", "parse_strategy"]

STRATEGIES = ("none", "full", "every_n:K", "sqrt_n", "megatron", "save_matmuls", "offload")
_FORMS = (
    "none, full, every_n:K (K a positive integer, e.g. every_n:2), sqrt_n, megatron, save_matmuls"
    " or offload"
)
_EVERY_UNIT = {
    "full": "recompute",
    "megatron": "selective:megatron",
    "save_matmuls": "selective:save_matmuls",
    "offload": "offload",
}


def parse_strategy(text: str) -> tuple[str, int | None]:
    """Split a strategy name into its kind and argument; a bad name is a ``ValueError``.

    Example:
        >>> parse_strategy("every_n:3"), parse_strategy("full")
        (('every_n', 3), ('full', None))
    """
    if not isinstance(text, str):
        raise ValueError(f"strategy: got {text!r}; expected {_FORMS}")
    kind, sep, argument = text.strip().partition(":")
    if kind == "every_n":
        if not sep or not argument.strip().isdigit() or int(argument) < 1:
            raise ValueError(
                f"strategy: got {text!r}; every_n needs a positive integer K after a colon, e.g."
                " every_n:2"
            )
        return kind, int(argument)
    if (kind == "none" or kind == "sqrt_n" or kind in _EVERY_UNIT) and not sep:
        return kind, None
    raise ValueError(f"strategy: got {text!r}; expected {_FORMS}")


def baseline_plan(strategy: str, units: Sequence[str]) -> Plan:
    """The plan of a baseline strategy over ``units`` (FQNs in execution order).

    Example:
        >>> units = [f"blocks.{i}" for i in range(5)]
        >>> baseline_plan("every_n:2", units).actions
        {'blocks.1': Action(kind='recompute', label=None), 'blocks.3': Action(kind='recompute', label=None)}
        >>> [str(a) for a in baseline_plan("sqrt_n", units).actions.values()]
        ['segment:0', 'segment:0']
        >>> str(baseline_plan("megatron", units).action_for("blocks.4"))
        'selective:megatron'
    """
    kind, argument = parse_strategy(strategy)
    units = list(units)
    actions: dict[str, str] = {}
    if kind in _EVERY_UNIT:
        actions = dict.fromkeys(units, _EVERY_UNIT[kind])
    elif kind == "every_n":
        assert argument is not None
        actions = {u: "recompute" for i, u in enumerate(units) if (i + 1) % argument == 0}
    elif kind == "sqrt_n":
        actions = _sqrt_segments(units)
    return Plan(actions=actions, units=units, strategy=strategy.strip())


def _sqrt_segments(units: list[str]) -> dict[str, str]:
    count = len(units)
    if count < 2:
        return dict.fromkeys(units, "recompute")
    num_segments = max(2, round(math.sqrt(count)))
    bounds = [round(i * count / num_segments) for i in range(num_segments + 1)]
    actions: dict[str, str] = {}
    for segment in range(num_segments - 1):  # the last segment is kept, as checkpoint_sequential
        for unit in units[bounds[segment] : bounds[segment + 1]]:
            actions[unit] = f"segment:{segment}"
    return actions
