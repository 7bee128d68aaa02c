"""A profile priced for the compiled path: the step times of plans that run under ``compile_units_``.

Consumes a :class:`~remat.profiling.step.Step` and its eager profile (:func:`remat.profile`);
produces the same profile with its *times* measured on the compiled path, so the solver prices what
will run when the plan is applied and each unit compiled with :func:`remat.compile_units_` (the
compiler applies recompute and selective save sets when it traces each unit: no op log nor replay
of remat's engine per op, whose cost the eager profile includes).

How: each unit is timed alone (:func:`time_compiled_units`): on the inputs the model gives it, on
a copy that shares its parameters (:func:`shared_copy`), compiled (``module.compile(backend=...)``)
kept, recomputed and under each of its ``selective`` options, the variants compiled side by side
and their forward and backward interleaved over ``repeats`` rounds (at least 3) after the
compiling one; an action's cost is its least time less the kept unit's (units with the same
structure are timed once). The profile's ``step_ms`` becomes the unplanned step's with every unit
compiled: the eager step's, each unit's time changed by what compiling it changes it by (the kept
unit compiled and eager, timed alone side by side; timing whole compiled steps put the CNN's at
53-68 ms where a compiled plan's measured 46-49); ``forward_ms``, ``backward_ms`` and
``time_resolution_ms`` (the solver's tie) are scaled by the ratio of that step to the eager one
(an estimate, used only where nothing else was measured). Until 2026-12-08 the costs were
differences of whole compiled steps under each configuration, shared among the units by their
eager costs: on the CPU two steps' difference moved by more than the options cost (the CNN's plan
priced 1.00 where it measured 1.15). That stays the fallback where a unit cannot run alone (no
output that needs a gradient). A cost below 0 (noise, or a recompute the compiler makes free) is 0.

What is not the compiled path's: the **bytes**. They stay the eager profile's. On the CPU a
compiled step's memory cannot be measured: inductor's kernels allocate outside the dispatcher, and
under the tracker's dispatch mode dynamo runs the unit's Python code eagerly instead of its compiled
graph (so even ``aot_eager`` measures the eager step); the CPU allocator keeps no statistics. The
compiled graphs of a plan save what ``torch.utils.checkpoint`` saves for it, which differs from the
eager engine by what the partitioner chooses (inductor's min-cut partitioner may recompute cheap
ops of a kept unit too, saving less). ``offload`` keeps its eager cost (it is compiled inside
remat's wrapper, its hooks eager); segments and ``nested`` regions are compiled unit by unit
(each unit keeps its input), which the cost model's segment does not describe: plan with
``actions`` keep, recompute and selective for the compiled path (:data:`COMPILED_ACTIONS`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from remat.cost.model import Profile, UnitProfile
from remat.feedback import as_progress
from remat.plan import Plan
from remat.profiling.step import (
    Step,
    make_optimizer,
    make_scaler,
    preserved_state,
    training_step,
)

__all__ = [
    "COMPILED_ACTIONS",
    "compiled_actions",
    "compiled_profile",
    "shared_copy",
    "time_compiled",
    "time_compiled_units",
]

logger = logging.getLogger(__name__)

COMPILED_OVER_EAGER = "compiled_over_eager"
"""The key of :func:`time_compiled_units`' answer for what compiling the kept unit changes its
forward and backward by (ms, negative where compiling makes it faster)."""

VARIANTS_PER_COMPILE = 5
"""Planned variants of one unit compiled side by side (with the kept one): remat's wrapper is one
code object for all of them, and dynamo keeps at most 8 compiled versions of a code object."""

COMPILED_ACTIONS = ("keep", "recompute", "selective")
"""The actions the compiler applies as the cost model describes them (see the module docstring)."""


def compiled_actions(actions: Sequence[str] | None) -> list[str]:
    """The actions a plan for the compiled path may use: ``actions`` (default all) less those
    the compiled path does not run as the cost model prices them (segments, nested, offload).

    Example:
        >>> compiled_actions(None)
        ['keep', 'recompute', 'selective']
        >>> compiled_actions(["keep", "recompute", "segment"])
        ['keep', 'recompute']
    """
    if actions is None:
        return list(COMPILED_ACTIONS)
    return [a for a in actions if a in COMPILED_ACTIONS]


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules that shares its parameters and buffers: a plan applied and
    units compiled on the copy leave ``model`` as it is, while both train the same tensors.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> copy_ = shared_copy(model)
        >>> copy_[0] is model[0], copy_[0].weight is model[0].weight
        (False, True)
    """
    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def time_compiled(
    step: Step,
    plans: dict[str, Plan | None],
    *,
    backend: str = "inductor",
    warmup: int = 1,
    repeats: int = 3,
    progress: bool | Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Median ms of ``step`` under each plan, every unit compiled with ``backend`` (what
    :func:`remat.compile_units_` runs); ``None``: no plan.

    Each plan runs on its own copy of the model's modules (:func:`shared_copy`), after dynamo's
    caches are reset, and its steps alternate with steps of the unplanned compiled copy (one of
    each per round, their order swapped every round), so that a drift of a busy machine touches
    both alike: a plan's time is the unplanned median plus the median of its rounds' differences.

    Example:
        >>> import remat
        >>> from torch import nn
        >>> model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2)])
        >>> step = Step(model, (torch.randn(4, 8),), optimizer="sgd", units=["0", "1"])
        >>> full = remat.Plan(actions={"0": "recompute", "1": "recompute"})
        >>> times = time_compiled(step, {"none": None, "full": full}, backend="eager", repeats=1)
        >>> sorted(times), all(ms > 0 for ms in times.values())
        (['full', 'none'], True)
    """
    from remat.apply.apply import apply_
    from remat.apply.units import find_units

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats: got {repeats} (warm-up {warmup}); expected >= 1 and >= 0")
    say = as_progress(progress)
    units = find_units(step.model, step.units)
    device = next((p.device for p in step.model.parameters()), torch.device("cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def compiled_copy(plan: Plan | None) -> torch.nn.Module:
        copy_ = shared_copy(step.model)
        if plan is not None:
            apply_(copy_, plan)
        modules = dict(copy_.named_modules())
        for fqn in units:
            modules[fqn].compile(backend=backend)
        return copy_

    base: list[float] = []
    extra: dict[str, float] = {}
    with step.context(), preserved_state(step.model, step.optimizer):
        opt = make_optimizer(step.optimizer, step.model)
        scaler = make_scaler(step.precision, device)

        def timed(model: torch.nn.Module) -> float:
            torch.manual_seed(0)
            sync()
            start = time.perf_counter()
            training_step(
                model,
                step.batch,
                loss_fn=step.loss_fn,
                optimizer=opt,
                precision=step.precision,
                scaler=scaler,
            )
            sync()
            return (time.perf_counter() - start) * 1e3

        for name, plan in [*[(n, p) for n, p in plans.items() if p is not None], ("none", None)]:
            if plan is None and base:
                break  # the unplanned step was timed beside every plan
            say(f"profile: compiled step ({backend}) under {name}")
            torch.compiler.reset()  # traced afresh: no cache limit, no eager fallback
            unplanned, planned = compiled_copy(None), compiled_copy(plan)
            differences = []
            for index in range(1 + warmup + repeats):  # the first round compiles
                first, second = (unplanned, planned) if index % 2 else (planned, unplanned)
                times = {id(first): timed(first), id(second): timed(second)}
                if index > warmup:
                    base.append(times[id(unplanned)])
                    differences.append(times[id(planned)] - times[id(unplanned)])
            if plan is not None:
                extra[name] = statistics.median(differences)
    torch.compiler.reset()
    median = statistics.median(base)
    return {name: median + extra.get(name, 0.0) for name in plans}


def time_compiled_units(
    step: Step,
    units: Sequence[str],
    actions: Sequence[Sequence[str]],
    *,
    backend: str = "inductor",
    rounds: int = 3,
    progress: bool | Callable[[str], None] | None = None,
) -> list[dict[str, float]] | None:
    """Per unit, what each of its ``actions`` (``recompute``, ``selective:<set>``) costs on the
    compiled path: the least of ``rounds`` forwards and backwards of the unit alone, compiled
    under the action, less the least of the kept unit's, in ms (never below 0); and, under
    :data:`COMPILED_OVER_EAGER`, the kept unit's compiled time less its eager time (what
    compiling it changes the step by). ``None`` when a unit cannot run alone (no output that
    needs a gradient).

    Each unit runs on the inputs the model gives it (one forward without autograd), on a copy that
    shares its parameters (:func:`shared_copy`), planned (:func:`remat.apply_`) and compiled with
    ``backend``; units with the same structure are timed once. A unit's variants are compiled
    side by side, at most :data:`VARIANTS_PER_COMPILE` at a time beside the kept one, and their
    rounds interleaved, so that a busy machine's drift touches them alike: the least of a few
    runs of one unit moves by a few percent, where a difference of two whole steps moves by more
    than a plan costs (how the eager profile's engine costs are timed too,
    :func:`remat.profiling.options.time_unit_engines`).

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2)])
        >>> step = Step(model, (torch.randn(4, 8),), optimizer="sgd", units=["0", "1"])
        >>> found = time_compiled_units(step, ["0", "1"], [["recompute"]] * 2, backend="eager")
        >>> found[0] == found[1], sorted(found[0]), found[0]["recompute"] >= 0
        (True, ['compiled_over_eager', 'recompute'], True)
    """
    from remat.profiling.options import _unit_inputs
    from remat.profiling.profiler import _structure  # what makes two units the same unit

    say = as_progress(progress)
    modules = dict(step.model.named_modules())
    first: dict[Any, int] = {}
    for j, fqn in enumerate(units):
        first.setdefault(_structure(modules[fqn]), j)
    found: dict[Any, dict[str, float]] = {}
    with step.context(), preserved_state(step.model, step.optimizer):
        captured = _unit_inputs(step.model, step.batch, [modules[units[j]] for j in first.values()])
        try:
            for (key, j), inputs in zip(first.items(), captured, strict=True):
                if inputs is None:
                    return None
                say(f"profile: compiled {units[j]} ({backend}) alone under each action")
                found[key] = _time_variants(
                    modules[units[j]], inputs, list(actions[j]), backend, rounds, step.precision
                )
        except Exception as error:  # a unit that does not run alone: price whole steps
            logger.debug("time_compiled_units: not timed alone (%r)", error)
            return None
        finally:
            torch.compiler.reset()  # the copies' compiled code goes with them
    return [found[_structure(modules[fqn])] for fqn in units]


def _time_variants(
    unit: torch.nn.Module,
    inputs: Any,
    actions: list[str],
    backend: str,
    rounds: int,
    precision: str,
) -> dict[str, float]:
    """``time_compiled_units`` for one unit: ms over the kept unit, per action."""
    from remat._compat import tree_map
    from remat.apply.apply import apply_
    from remat.apply.units import tensors_in
    from remat.profiling.options import _leaf
    from remat.profiling.step import step_autocast

    device = next((p.device for p in unit.parameters()), torch.device("cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def compiled(action: str) -> torch.nn.Module:
        if action == "eager":
            return shared_copy(unit)  # the kept unit, not compiled
        holder = torch.nn.ModuleDict({"unit": shared_copy(unit)})
        if action != "keep":
            apply_(holder, Plan(actions={"unit": action}, units=["unit"]))
        holder["unit"].compile(backend=backend)
        return holder["unit"]

    def run(module: torch.nn.Module) -> float:
        args, kwargs = tree_map(_leaf, inputs)  # a unit may write its inputs in place
        sync()
        start = time.perf_counter()
        with step_autocast(precision, device):
            out = module(*args, **kwargs)
        grads = [t for t in tensors_in(out) if t.requires_grad]
        if not grads:
            raise ValueError("no output needs a gradient")
        torch.autograd.backward(grads, [torch.ones_like(t) for t in grads])
        sync()
        return (time.perf_counter() - start) * 1e3

    extra: dict[str, float] = {}
    for at in range(0, len(actions), VARIANTS_PER_COMPILE):
        torch.compiler.reset()  # traced afresh: no cache limit, no eager fallback
        batch = ["keep", *actions[at : at + VARIANTS_PER_COMPILE], *(["eager"] if at == 0 else [])]
        variants = {action: compiled(action) for action in batch}
        best = dict.fromkeys(batch, float("inf"))
        for round_ in range(rounds + 1):  # the first round compiles
            for action, module in variants.items():
                elapsed = run(module)
                if round_ > 0:
                    best[action] = min(best[action], elapsed)
        for action in batch[1:]:
            if action == "eager":
                extra[COMPILED_OVER_EAGER] = best["keep"] - best["eager"]
            else:
                extra[action] = max(best[action] - best["keep"], 0.0)
    return extra


def compiled_profile(
    step: Step,
    prof: Profile,
    *,
    backend: str = "inductor",
    warmup: int = 1,
    repeats: int = 3,
    progress: bool | Callable[[str], None] | None = None,
) -> Profile:
    """``prof`` with its times measured on the compiled path (see the module docstring).

    Args:
        step: the step ``prof`` was measured for (its model is not changed).
        prof: its eager profile (:func:`remat.profile`).
        backend: the ``torch.compile`` backend the plan will run under (``"inductor"``,
            ``"aot_eager"``, ...).
        warmup, repeats: untimed and timed steps per configuration, after the compiling one.
        progress: as :func:`remat.profile`'s.

    Returns:
        A new :class:`~remat.cost.model.Profile`: ``step_ms``, each unit's ``recompute_ms`` and
        its ``selective`` options' ``cost_ms`` from compiled steps, bytes unchanged, a note saying
        so.

    Example:
        >>> import remat
        >>> from torch import nn
        >>> model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2)])
        >>> step = Step(model, (torch.randn(4, 8),), optimizer="sgd")
        >>> eager = remat.profile_step(step, options=(), repeats=1)
        >>> compiled = compiled_profile(step, eager, backend="eager", repeats=1)
        >>> compiled.peak_bytes == eager.peak_bytes, compiled.units[0].recompute_ms is not None
        (True, True)
    """
    labels: dict[str, list[int]] = {}
    for index, unit in enumerate(prof.units):
        for option in unit.options:
            if option.action.startswith("selective:"):
                labels.setdefault(option.action, []).append(index)
    fqns = prof.unit_fqns
    step = step.replace(units=fqns)
    alone = time_compiled_units(
        step,
        fqns,
        [["recompute", *(o.action for o in u.options if o.action in labels)] for u in prof.units],
        backend=backend,
        rounds=max(repeats, 3),
        progress=progress,
    )
    if alone is not None:
        # The step with every unit compiled: the eager one, each unit's time changed by what
        # compiling it changes it by (both timed alone, side by side).
        base_ms = (prof.step_ms or 0.0) + sum(extras[COMPILED_OVER_EAGER] for extras in alone)
        times: dict[str, float] = {"none": base_ms}
    else:  # whole steps under each configuration, their costs shared among units
        plans: dict[str, Plan | None] = {
            "none": None,
            "recompute": Plan(actions=dict.fromkeys(fqns, "recompute"), units=fqns),
        }
        for label, indices in labels.items():
            plans[label] = Plan(actions={fqns[i]: label for i in indices}, units=fqns)
        times = time_compiled(
            step, plans, backend=backend, warmup=warmup, repeats=repeats, progress=progress
        )
        base_ms = times["none"]
    ratio = base_ms / prof.step_ms if prof.step_ms else 1.0
    units = [_scaled(unit, ratio) for unit in prof.units]
    if alone is not None:
        for unit, extras in zip(units, alone, strict=True):
            unit.recompute_ms = extras["recompute"]
            for option in unit.options:
                if option.action in extras:
                    option.cost_ms = extras[option.action]
        how = "each unit timed alone under each action"
    else:
        _share_step_costs(prof, units, labels, times)
        how = "whole steps under each action, shared among the units"
    recompute_ms = sum(u.recompute_ms or 0.0 for u in units)
    note = (
        f"times from the compiled path (each unit torch.compile'd, backend {backend}; the"
        f" compiler applies recompute and selective; {how}): unplanned step {base_ms:.2f} ms"
        f" against {prof.step_ms or 0:.2f} ms eager, every unit recomputed"
        f" +{recompute_ms:.2f} ms; bytes are the eager step's"
    )
    logger.info("remat: %s", note)
    resolution = prof.time_resolution_ms
    return dataclasses.replace(
        prof,
        units=units,
        step_ms=base_ms,
        time_resolution_ms=None if resolution is None else resolution * ratio,
        notes=[*prof.notes, note],
    )


def _share_step_costs(
    prof: Profile,
    units: list[UnitProfile],
    labels: dict[str, list[int]],
    times: dict[str, float],
) -> None:
    """Where units could not be timed alone: each configuration's time above the unplanned
    compiled step, shared among its units in proportion to their eager costs."""
    base_ms = times["none"]
    extra = max(times["recompute"] - base_ms, 0.0)
    shares = _shares([u.recompute_cost(prof.time_source) for u in prof.units])
    for unit, share in zip(units, shares, strict=True):
        unit.recompute_ms = extra * share
    for label, indices in labels.items():
        extra = max(times[label] - base_ms, 0.0)
        options = [units[i].option(label) for i in indices]
        shares = _shares([o.cost(prof.time_source) if o is not None else 0.0 for o in options])
        for option, share in zip(options, shares, strict=True):
            if option is not None:
                option.cost_ms = extra * share


def _scaled(unit: UnitProfile, ratio: float) -> UnitProfile:
    """A copy of ``unit`` (its options copied too) with forward and backward times scaled."""
    options = [dataclasses.replace(o) for o in unit.options]
    changes: dict[str, Any] = {"options": options}
    for name in ("forward_ms", "backward_ms"):
        value = getattr(unit, name)
        if value is not None:
            changes[name] = value * ratio
    return dataclasses.replace(unit, **changes)


def _shares(costs: Sequence[float]) -> list[float]:
    """Each cost's share of their sum (equal shares when they sum to nothing)."""
    total = sum(max(c, 0.0) for c in costs)
    if total <= 0:
        return [1.0 / len(costs)] * len(costs) if costs else []
    return [max(c, 0.0) / total for c in costs]
