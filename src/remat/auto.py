"""The pipeline: a :class:`~remat.profiling.step.Step` profiled, solved and measured, in one place.

:func:`profile_step` profiles a step (measured where its model is, or estimated for its target),
:func:`measure_plan` measures its peak under a plan, :func:`plan_step` goes profile -> solve ->
measure and returns a :class:`Planned`; ``remat.auto_``, ``remat plan``, fit prediction, ``bench``
and ``verify`` call these and only format what they return.

The closed loop: after solving, the plan is applied and one training step is measured with the
tracker. If the measured peak exceeds the budget, the budget handed to the solver is lowered by the
amount of the misprediction and the solve repeats, so a plan that says it fits, fits.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from remat.apply.apply import Handle, _refuse_double_checkpointing, apply_
from remat.apply.units import UnitSpec
from remat.cost.model import Profile
from remat.feedback import as_progress
from remat.plan import Plan
from remat.profiling.profiler import check_estimate, estimate_via_meta, profile
from remat.profiling.step import Step, as_step, measure_step
from remat.profiling.tracker import current_capacity
from remat.solve.budget import Budget
from remat.solve.solver import ACTIONS, INFEASIBLE, SolveResult, solve

__all__ = [
    "InfeasibleBudgetError",
    "Planned",
    "auto_",
    "measure_plan",
    "plan_step",
    "profile_step",
    "solve_measured",
]

logger = logging.getLogger(__name__)


class InfeasibleBudgetError(ValueError):
    """No plan fits the budget; ``result.min_peak_bytes`` is the least achievable peak.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        >>> try:
        ...     auto_(model, (torch.randn(4, 8),), budget=1)
        ... except InfeasibleBudgetError as error:
        ...     error.result.status, error.result.min_peak_bytes > 1
        ('INFEASIBLE', True)
    """

    def __init__(self, result: SolveResult) -> None:
        self.result = result
        super().__init__(
            f"budget: no plan fits {result.budget_bytes:,} bytes; the least achievable peak is"
            f" {result.min_peak_bytes:,} bytes (at {result.where}). Raise the budget to at least"
            f" that, or reduce the batch, sequence or model size."
        )


def profile_options(actions: Sequence[str] | None, model: nn.Module | None = None) -> list[str]:
    """What :func:`remat.profile` must measure for a solver restricted to ``actions``: the
    selective policies if ``selective`` is allowed, and ``offload`` if asked for. ``None`` (the
    default everywhere) is every action, with offload on CUDA only: on the CPU it costs time and
    saves nothing, so it is measured there only when ``actions`` names it.

    Example:
        >>> profile_options(["keep", "recompute"])
        []
        >>> profile_options(None)
        ['selective:save_matmuls', 'selective:megatron', 'selective:auto']
        >>> profile_options(["keep", "offload"])
        ['offload']
    """
    on_cuda = model is not None and any(p.device.type == "cuda" for p in model.parameters())
    if actions is None:
        actions = [a for a in ACTIONS if a != "offload" or on_cuda]
    unknown = [a for a in actions if a not in ACTIONS]
    if unknown or "keep" not in actions:
        raise ValueError(
            f"actions: got {list(actions)}; expected a subset of {list(ACTIONS)} that includes"
            " keep (e.g. keep,recompute,selective)"
        )
    chosen: list[str] = []
    if "selective" in actions:
        chosen += ["selective:save_matmuls", "selective:megatron", "selective:auto"]
    if "offload" in actions:
        chosen.append("offload")
    return chosen


def solve_measured(
    step: Step,
    prof: Profile,
    budget: int | str | Budget,
    *,
    max_iterations: int = 3,
    actions: Sequence[str] = ACTIONS,
) -> SolveResult:
    """Solve, then measure the plan's peak on the step and re-solve tighter while it does not fit.

    Returns the last result with ``measured_peak_bytes`` and ``iterations`` set; its status is
    ``INFEASIBLE`` when no plan fits, or when the measured peak still exceeds the budget after
    ``max_iterations`` solves (a note says so). For ``"min"`` the least-peak plans with every
    action, without segments and with whole units only are each measured, and the lowest
    measured peak is the result (and its budget): the simulator's least peak is a prediction.
    A percentage is never ``INFEASIBLE``: if no plan meets it when measured, it is resolved again
    from the least measured peak when that is above the predicted one, and at worst the least
    measured plan is the result (its notes say so).

    Every measured step is ``step`` (:func:`measure_plan`: its optimizer, precision,
    accumulation and capacity).
    """
    parsed = Budget.parse(budget)
    if parsed.kind == "min":
        return _least_measured(step, prof, actions)
    first = solve(prof, parsed, actions=actions)
    result = _closed_loop(step, prof, first, max_iterations, actions)
    if result.status != INFEASIBLE or parsed.kind != "percent":
        return result
    return _percent_from_measured_least(step, prof, parsed, result, max_iterations, actions)


def _closed_loop(
    step: Step,
    prof: Profile,
    result: SolveResult,
    max_iterations: int,
    actions: Sequence[str],
) -> SolveResult:
    """Measure ``result``'s plan; while its peak is above ``result.budget_bytes``, solve again
    with the byte target lowered by the miss, up to ``max_iterations`` solves in all."""
    budget_bytes = result.budget_bytes
    target = budget_bytes
    for iteration in range(1, max_iterations + 1):
        if result.status == INFEASIBLE:
            return dataclasses.replace(result, budget_bytes=budget_bytes, iterations=iteration)
        measured = measure_plan(step, result.plan)
        result = dataclasses.replace(
            result, budget_bytes=budget_bytes, measured_peak_bytes=measured, iterations=iteration
        )
        if measured <= budget_bytes:
            return result
        miss = measured - result.predicted_peak_bytes
        logger.warning(
            "remat: measured peak %d exceeds the budget %d (predicted %d); solving again",
            measured,
            budget_bytes,
            result.predicted_peak_bytes,
        )
        target -= max(miss, measured - budget_bytes, 1)
        result = solve(prof, target, actions=actions)
    return dataclasses.replace(
        result,
        status=INFEASIBLE,
        budget_bytes=budget_bytes,
        notes=[
            *result.notes,
            f"measured peak still above the budget after {max_iterations} solves",
        ],
    )


def _percent_from_measured_least(
    step: Step,
    prof: Profile,
    parsed: Budget,
    missed: SolveResult,
    max_iterations: int,
    actions: Sequence[str],
) -> SolveResult:
    """A percentage the closed loop could not meet when measured. Its bytes are at least the
    least peak the simulator predicts, but the least plans may measure above that prediction.
    So the least-peak plans are measured (as for ``min``); when the least measured peak is the
    higher, the percentage is resolved again from it and the loop runs once more against those
    bytes. If that still misses, the least measured plan is the result: it fits the bytes by
    construction, so every percentage has a plan that fits when measured."""
    least = _least_measured(step, prof, actions)
    if least.status == INFEASIBLE or least.measured_peak_bytes is None:
        return missed
    notes = []
    budget_bytes = missed.budget_bytes
    if least.measured_peak_bytes > missed.min_peak_bytes:
        low = least.measured_peak_bytes
        budget_bytes = parsed.resolve(peak_bytes=prof.peak_bytes, min_peak_bytes=low)
        notes.append(
            f"{parsed.text} resolved from the least measured peak, {low:,} bytes: the least"
            f" predicted one, {missed.min_peak_bytes:,}, gave {missed.budget_bytes:,} bytes,"
            " which no plan met when measured"
        )
        again = solve(prof, budget_bytes, actions=actions)
        again = _closed_loop(step, prof, again, max_iterations, actions)
        if again.status != INFEASIBLE:
            return dataclasses.replace(again, notes=[*again.notes, *notes])
    notes.append("the least measured plan: no cheaper plan fit when measured")
    return dataclasses.replace(least, budget_bytes=budget_bytes, notes=[*least.notes, *notes])


def _least_measured(step: Step, prof: Profile, actions: Sequence[str]) -> SolveResult:
    """``min``: the least-peak plans with every allowed action, without the multi-unit blocks
    (``segment``, ``nested``: their peaks are the simulator's least certain, with skip tensors)
    and with whole units only, each measured; the lowest measured peak wins (then the lowest
    predicted time), and becomes the budget."""
    subsets = [
        list(actions),
        [a for a in actions if a not in ("segment", "nested")],
        [a for a in actions if a in ("keep", "recompute")],
    ]
    measured: list[tuple[int, float, SolveResult]] = []
    seen: set[tuple[tuple[str, str], ...]] = set()
    for subset in subsets:
        if "keep" not in subset:
            continue
        result = solve(prof, "min", actions=subset)
        key = tuple(sorted((fqn, str(a)) for fqn, a in result.plan.actions.items()))
        if result.status == INFEASIBLE or key in seen:
            continue
        seen.add(key)
        peak_bytes = measure_plan(step, result.plan)
        measured.append((peak_bytes, result.predicted_step_ms or 0.0, result))
    if not measured:
        return solve(prof, "min", actions=actions)
    peak_bytes, _, best = min(measured, key=lambda m: (m[0], m[1]))
    note = (
        f"min: the lowest measured peak of {len(measured)} least-peak plans"
        f" ({', '.join(f'{m[0]:,}' for m in measured)} bytes)"
    )
    return dataclasses.replace(
        best,
        budget_bytes=peak_bytes,
        measured_peak_bytes=peak_bytes,
        iterations=len(measured),
        notes=[*best.notes, note],
    )


def within_capacity(
    profile_: Profile, budget: int | str | Budget, actions: Sequence[str]
) -> Budget:
    """``budget``, or the simulated capacity (:func:`~remat.profiling.tracker.simulated_capacity`)
    where the budget resolves above it: no plan over the device's memory can run there.

    Example:
        >>> from remat.cost.model import example_profile
        >>> from remat.profiling.tracker import simulated_capacity
        >>> with simulated_capacity(5000):
        ...     within_capacity(example_profile(), "1GiB", ["keep", "recompute"]).value
        5000
    """
    budget = Budget.parse(budget)
    capacity = current_capacity()
    if capacity is None:
        return budget
    resolved = solve(profile_, budget, actions=actions).budget_bytes
    if resolved is None or resolved <= capacity:
        return budget
    logger.warning(
        "remat: budget %s (%d bytes) is over the capacity; planning for the capacity, %d bytes",
        budget.text,
        resolved,
        capacity,
    )
    return Budget.parse(capacity)


def profile_step(
    step: Step,
    *,
    options: Sequence[str] | None = None,
    progress: bool | Callable[[str], None] | None = None,
    warmup: int = 1,
    repeats: int = 3,
    timing: bool = True,
) -> Profile:
    """The step's profile: measured where its model is (:func:`remat.profile`), or estimated
    from shapes for ``step.target`` (:mod:`remat.profiling.estimate`); per rank when the step
    has ``world_size`` / ``fsdp``. The one place a step's properties reach the profiler.

    Args:
        step: the :class:`~remat.profiling.step.Step`.
        options: finer actions to measure (see :func:`remat.profile`; default there, none when
            estimating).
        progress: a line of text as each measured step starts: logged (``None``), on stderr
            (``True``) or to a callable (:func:`remat.feedback.as_progress`).
        warmup, repeats: untimed and timed steps for the medians (measured steps only).
        timing: estimates only: run the roofline step for times (``False``: bytes alone); with
            ``step.compile``, ``False`` skips timing the compiled path (the eager profile).

    A step with ``compile`` (a ``torch.compile`` backend) is profiled eagerly, then its times are
    measured on the compiled path (:func:`remat.profiling.compiled.compiled_profile`): what its
    plan costs when each unit is compiled with :func:`remat.compile_units_`.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(3)])
        >>> step = Step(model, (torch.randn(4, 16),), optimizer="sgd", accumulation_steps=2)
        >>> prof = profile_step(step, options=(), repeats=1)
        >>> prof.unit_fqns, prof.accumulation_steps
        (['0', '1', '2'], 2)
        >>> estimate = profile_step(step.replace(target="h100-80gb"), timing=False)
        >>> estimate.device, estimate.time_source
        ('h100-80gb', 'flops')
    """
    with step.context():
        if not step.estimated:
            eager = profile(
                step.model,
                step.batch,
                loss_fn=step.loss_fn,
                optimizer=step.optimizer,
                units=step.units,
                warmup=warmup,
                repeats=repeats,
                progress=progress,
                options=options,
                world_size=step.world_size,
                fsdp=step.fsdp,
                precision=step.precision,
            )
            if step.compile is None or not timing:
                return eager
            from remat.profiling.compiled import compiled_profile

            return compiled_profile(
                step, eager, backend=step.compile, warmup=warmup, repeats=repeats, progress=progress
            )
        check_estimate(step.precision, step.target)
        return estimate_via_meta(
            step.model,
            step.batch,
            device=step.target,
            dtype=step.dtype,
            attention=step.attention,
            loss_fn=step.loss_fn,
            optimizer=step.optimizer,
            units=step.units,
            progress=progress,
            options=() if options is None else options,
            world_size=step.world_size,
            fsdp=step.fsdp,
            precision=step.precision,
            timing=timing,
        )


def measure_plan(step: Step, plan: Plan | None = None) -> int:
    """The measured peak bytes of the whole step (optimizer step and state included, in its
    precision, its last micro-batch under accumulation, within its capacity) with ``plan``
    applied (``None``: unplanned). The model is left as it was.

    Example:
        >>> from torch import nn
        >>> from remat.solve.baselines import baseline_plan
        >>> model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(3)])
        >>> step = Step(model, (torch.randn(64, 16),), optimizer="sgd")
        >>> measure_plan(step, baseline_plan("full", ["0", "1", "2"])) < measure_plan(step)
        True
    """
    if step.estimated:
        raise ValueError(
            f"step: got a step estimated for {step.target!r}; expected one measured where its"
            " model is. Fix: step.replace(target=None) on a real device, or simulate the plan"
            " (remat.simulate(profile, plan))"
        )
    installed = apply_(step.model, plan) if plan is not None else nullcontext()
    with step.context(), installed:  # measure_step restores weights and gradients
        return measure_step(
            step.model,
            step.batch,
            loss_fn=step.loss_fn,
            optimizer=step.optimizer,
            precision=step.precision,
        ).peak_bytes


@dataclasses.dataclass
class Planned:
    """What :func:`plan_step` returns: the step, its profile and the solve's result (its
    ``measured_peak_bytes`` set when the plan was measured).

    Example:
        >>> from remat.cost.model import example_profile
        >>> from remat.solve.solver import solve
        >>> from torch import nn
        >>> planned = Planned(Step(nn.Linear(2, 2), ()), example_profile(),
        ...                   solve(example_profile(), "min"))
        >>> planned.status, planned.plan is planned.result.plan
        ('OPTIMAL', True)
    """

    step: Step
    profile: Profile
    result: SolveResult

    @property
    def plan(self) -> Plan:
        return self.result.plan

    @property
    def status(self) -> str:
        return self.result.status


def plan_step(
    step: Step,
    budget: int | str | Budget,
    *,
    actions: Sequence[str] | None = None,
    measure: bool = True,
    progress: bool | Callable[[str], None] | None = None,
    profile_: Profile | None = None,
) -> Planned:
    """The pipeline: profile ``step``, solve for ``budget`` (lowered to the step's capacity when
    it resolves above it), and measure the plan in a closed loop
    (:func:`solve_measured`). Estimated and distributed steps are solved, not measured (this
    process is not the target, nor a rank of the sharded run); ``measure=False`` skips it too.

    Args:
        step: the :class:`~remat.profiling.step.Step`.
        budget: bytes, ``"22GiB"``, ``"60%"``, ``"min"`` or ``"device"`` (see
            :class:`~remat.solve.budget.Budget`).
        actions: what the plan may use (default: all; offload on CUDA only).
        measure: measure the plan and re-solve tighter while it does not fit.
        progress: a line of text as each stage starts: logged (``None``, the ``remat`` logger
            at INFO), on stderr (``True``, a bar on a terminal) or to a callable.
        profile_: a profile of this step already taken (it is then not profiled again).

    With ``step.compile``, the plan uses only keep, recompute and selective (the actions the
    compiler applies as priced: :data:`remat.profiling.compiled.COMPILED_ACTIONS`), priced by the
    compiled path's times; its measured peak is the eager engine's (a compiled step's is not
    measured on the CPU).

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(4)])
        >>> planned = plan_step(Step(model, (torch.randn(16, 32),), optimizer="sgd"), "min")
        >>> planned.status, planned.result.measured_peak_bytes <= planned.result.budget_bytes
        ('OPTIMAL', True)
    """
    allowed = list(actions) if actions is not None else list(ACTIONS)
    if step.compile is not None:
        from remat.profiling.compiled import compiled_actions

        allowed = compiled_actions(allowed)
        actions = allowed
    say = as_progress(progress)
    with step.context():
        # An estimate measures no finer option unless asked: each is one more step on meta.
        options = profile_options(actions, step.model) if not step.estimated or actions else ()
        prof = profile_ or profile_step(step, options=options, progress=say)
        budget = within_capacity(prof, budget, allowed)
        distributed = step.world_size > 1 or step.fsdp
        if measure and not step.estimated and not distributed:
            say(f"plan: solving for {Budget.parse(budget).text}, measuring the plan's step")
            result = solve_measured(step, prof, budget, actions=allowed)
        else:
            say(f"plan: solving for {Budget.parse(budget).text}")
            result = solve(prof, budget, actions=allowed)
    return Planned(step=step, profile=prof, result=result)


def auto_(
    model: nn.Module | Step,
    example_inputs: Any = None,
    *,
    budget: int | str | Budget,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: Any = "adamw",
    units: UnitSpec = None,
    actions: Sequence[str] | None = None,
    precision: str = "32",
    capacity_bytes: int | None = None,
    accumulation_steps: int = 1,
    progress: bool | Callable[[str], None] | None = None,
    compile: bool | str = False,
) -> Handle:
    """Profile the model, solve for the cheapest plan within ``budget``, apply it in place.

    Args:
        model: the model, on the device it trains on; or a :class:`~remat.profiling.step.Step`
            that states the whole step (then give no ``example_inputs`` nor step arguments).
        example_inputs: one batch (tuple of positional arguments, dict of keyword arguments).
        budget: bytes, ``"22GiB"`` / ``"22GB"``, ``"60%"`` (60% of the way from the least peak
            any plan reaches to the unplanned peak; ``"0%"`` is ``"min"``), or ``"min"``.
        loss_fn: output -> scalar loss (default: the output if scalar, its ``loss`` field when it
            has one, as Hugging Face models return, else the mean of its floats).
        optimizer: whose step counts in the peak: ``"adamw"``, ``"sgd"``, ``"none"``, an
            optimizer instance (never changed) or a factory ``params -> Optimizer``.
        units: what the plan may act on (see :func:`remat.find_units`).
        actions: what the plan may use (``keep`` and any of ``recompute``, ``segment``,
            ``nested``, ``selective``, ``offload``); default: all, offload on CUDA only.
        precision: the step's precision: ``"32"``, ``"bf16-mixed"``, ``"fp16-mixed"`` (forward
            and loss under ``torch.autocast``; train under the same autocast) or ``"bf16-true"``
            (a model already in ``bfloat16``). The plan records it; applied under another
            autocast state, it warns once.
        capacity_bytes: the device's memory, simulated (see :func:`remat.profile`): profiling
            and the plan's measured step hold no more, and a budget above it is lowered to it.
        accumulation_steps: micro-batches whose gradients add up before each optimizer step:
            above 1, the step planned and measured is the last micro-batch, its forward and
            backward with the gradients alive (the accumulated step's peak).
        progress: what is being measured, as each stage starts: ``None`` (default) logs it to
            the ``remat`` logger at INFO (``logging.basicConfig(level=logging.INFO)`` shows it),
            ``True`` writes it to stderr with the seconds elapsed (a bar on a terminal), a
            callable receives each line.
        compile: ``True`` (inductor) or a ``torch.compile`` backend name: price the plan on the
            compiled path (:mod:`remat.profiling.compiled`), plan with keep, recompute and
            selective only, and compile each unit after applying it
            (:func:`remat.compile_units_`), so the compiler applies the plan when it traces
            each unit. Default ``False``: eager, remat's own engine. (With a
            :class:`~remat.profiling.step.Step`, set ``Step.compile`` instead.)

    Returns:
        The :class:`~remat.apply.apply.Handle`; ``handle.result`` is the
        :class:`~remat.solve.solver.SolveResult` (predicted and measured peak, overhead).

    Raises:
        InfeasibleBudgetError: no plan fits (a ``ValueError`` naming the least achievable peak).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(6)])
        >>> x = (torch.randn(32, 64),)
        >>> handle = auto_(model, x, budget="min", optimizer="sgd")
        >>> handle.result.measured_peak_bytes <= handle.result.budget_bytes
        True
        >>> handle.remove()
        >>> handle = auto_(Step(model, x, optimizer="sgd", accumulation_steps=4), budget="min")
        >>> handle.result.status
        'OPTIMAL'
        >>> handle.remove()
    """
    step = as_step(
        model,
        example_inputs,
        loss_fn=loss_fn,
        optimizer=optimizer,
        units=units,
        precision=precision,
        capacity_bytes=capacity_bytes,
        accumulation_steps=accumulation_steps,
        compile=compile or None,
    )
    # a model that checkpoints itself would be profiled wrongly, then refused by apply_: refuse now
    _refuse_double_checkpointing(step.model, dict(step.model.named_modules()), [])
    result = plan_step(step, budget, actions=actions, progress=progress).result
    if result.status == INFEASIBLE:
        raise InfeasibleBudgetError(result)
    handle = apply_(step.model, result.plan)
    handle.result = result
    if step.compile is not None:
        from remat.apply.compile import compile_units_

        compile_units_(step.model, result.plan.units or handle.actions, backend=step.compile)
    logger.info(
        "remat: %s plan, predicted peak %d (measured %s) within %d bytes, overhead %s",
        result.status,
        result.predicted_peak_bytes,
        result.measured_peak_bytes,
        result.budget_bytes,
        result.predicted_overhead,
    )
    return handle
