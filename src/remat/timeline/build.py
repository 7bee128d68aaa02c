"""``remat.timeline``: one training step without and with a plan, op by op, as a page.

Consumes a :class:`~remat.profiling.step.Step` (or a model and a batch), and a plan or a budget
(solved by :func:`remat.plan_step`); records the unplanned step and the planned one with the memory
tracker (:func:`~remat.timeline.record.record_step`), on the model's device or, for an estimated
step, on ``meta`` under the target's kernels; produces a :class:`Timeline`, which writes the HTML
page and PyTorch's snapshot format.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from remat.feedback import as_progress
from remat.plan import Plan
from remat.profiling.step import Step, as_step, model_device
from remat.solve.budget import Budget
from remat.timeline.record import StepTimeline, record_step, units_of
from remat.timeline.render import DEFAULT_MAX_POINTS, payload, render_html, summary_lines
from remat.timeline.snapshot import save_snapshot, to_snapshot

__all__ = ["Timeline", "timeline", "write_timelines"]


@dataclass
class Timeline:
    """The recorded steps (the unplanned one first), the budget and what to call them.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(3)])
        >>> line = timeline(model, (torch.randn(8, 16),), plan=Plan(actions={"_default": "recompute"}),
        ...                 optimizer="sgd")
        >>> [s.label for s in line.steps], line.planned.peak_bytes < line.unplanned.peak_bytes
        (['unplanned', 'planned'], True)
        >>> "http" in line.to_html(), sorted(line.to_snapshot())[::2]
        (False, ['device_traces', 'segments'])
    """

    steps: list[StepTimeline]
    budget_bytes: int | None
    title: str
    device: str
    plan: Plan | None = None

    def __repr__(self) -> str:
        plan = None if self.plan is None else dict(self.plan.to_dict().get("actions", {}))
        return (
            f"Timeline(title={self.title!r}, device={self.device!r},"
            f" budget_bytes={self.budget_bytes}, steps={self.steps!r}, plan={plan!r})"
        )

    @property
    def unplanned(self) -> StepTimeline:
        return self.steps[0]

    @property
    def planned(self) -> StepTimeline | None:
        return self.steps[1] if len(self.steps) > 1 else None

    def summary(self) -> list[str]:
        """Each step's peak and where it is, what the plan changed, the budget, the device."""
        return summary_lines(self.steps, self.budget_bytes, self.device)

    def to_dict(self, max_points: int = DEFAULT_MAX_POINTS, x_axis: str = "auto") -> dict[str, Any]:
        """What the page draws (see :func:`remat.timeline.render.payload`)."""
        return payload(
            self.steps,
            budget_bytes=self.budget_bytes,
            title=self.title,
            device=self.device,
            max_points=max_points,
            x_axis=x_axis,
            actions=(
                {u: str(self.plan.action_for(u)) for u in self.steps[0].units}
                if self.plan is not None
                else None
            ),
        )

    def to_html(self, max_points: int = DEFAULT_MAX_POINTS, x_axis: str = "auto") -> str:
        """The self-contained page (inline script and style; nothing fetched); ``x_axis``:
        ``"time"``, ``"op"`` or ``"auto"`` (time when measured)."""
        return render_html(self.to_dict(max_points, x_axis))

    def save(
        self,
        path: str | os.PathLike[str],
        max_points: int = DEFAULT_MAX_POINTS,
        x_axis: str = "auto",
    ) -> Path:
        """Write the page to ``path`` (its folder made if missing)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(max_points, x_axis), encoding="utf-8")
        return path

    def to_snapshot(self) -> dict[str, Any]:
        """PyTorch's memory snapshot of the steps (see :mod:`remat.timeline.snapshot`)."""
        return to_snapshot(self.steps)

    def save_snapshot(self, path: str | os.PathLike[str]) -> Path:
        """Pickle :meth:`to_snapshot` to ``path``, as ``torch.cuda.memory._dump_snapshot`` does."""
        return save_snapshot(self.steps, path)


def _device_text(step: Step) -> str:
    if step.target is not None:
        return f"{step.target}, estimated from shapes on meta"
    device = model_device(step.model).type
    return "meta (shapes alone)" if device == "meta" else f"{device}, measured"


def _plan_of(plan: Plan | str | os.PathLike[str] | None) -> Plan | None:
    if plan is None or isinstance(plan, Plan):
        return plan
    if isinstance(plan, str | os.PathLike):
        return Plan.load(plan)
    raise ValueError(
        f"plan: got {type(plan).__name__}; expected a remat.Plan, a path to a plan's JSON, or"
        " None. Fix: remat.Plan.load(path), or pass budget= to solve one"
    )


def _recording_step(step: Step) -> Step:
    """The step recorded: an estimated one moved to ``meta`` (as estimate mode profiles it)."""
    if step.target is None:
        return step
    import sys

    from remat.profiling.meta_target import to_meta
    from remat.profiling.profiler import check_estimate

    check_estimate(step.precision, step.target)
    model, batch = to_meta(step.model, step.batch, step.dtype)
    if "transformers" in sys.modules:
        from remat.integrations.hf import prepare_meta

        prepare_meta(model)
    return step.replace(model=model, batch=batch)


def timeline(
    model_or_step: nn.Module | Step,
    batch: Any = None,
    *,
    plan: Plan | str | os.PathLike[str] | None = None,
    budget: int | str | Budget | None = None,
    out: str | os.PathLike[str] | None = None,
    snapshot: str | os.PathLike[str] | None = None,
    loss_fn: Callable[[Any], Any] | None = None,
    optimizer: Any = "adamw",
    precision: str = "32",
    units: Any = None,
    target: str | None = None,
    dtype: Any = None,
    attention: str = "auto",
    accumulation_steps: int = 1,
    capacity_bytes: int | None = None,
    actions: Sequence[str] | None = None,
    title: str | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
    x_axis: str = "auto",
    progress: bool | Callable[[str], None] | None = None,
) -> Timeline:
    """Record one training step (forward, loss, backward, optimizer step) without a plan and
    with one, op by op, and draw both on one page: live bytes as a stacked area by category
    (parameters, gradients, optimizer state, activations per unit, transients), each peak marked
    with its module and op, the budget as a line; hover for an op's bytes, click a unit for the
    lifetimes of its saved tensors and their recompute in backward.

    Args:
        model_or_step: the model (on the device it trains on; ``meta`` for shapes alone), or a
            :class:`~remat.Step` (then no ``batch`` nor step arguments beside it).
        batch: one batch, as :class:`~remat.Step` takes it.
        plan: the plan to draw (a :class:`~remat.Plan` or a path to its JSON); its budget is the
            line.
        budget: solve a plan for this budget instead (``"50%"``, ``"22GiB"``, ``"min"``,
            ``"device"``; see :func:`remat.plan_step`). Neither: the unplanned step alone.
        out: write the page here (HTML).
        snapshot: write PyTorch's memory snapshot of the steps here (a pickle
            ``torch.cuda.memory._dump_snapshot`` could have written; one device per step).
        loss_fn, optimizer, precision, units, target, dtype, attention, accumulation_steps,
            capacity_bytes: the step, as :class:`~remat.Step` states it; ``target``
            (``"h100-80gb"``) estimates on ``meta`` for that device: the x axis is then the op
            index instead of time. ``capacity_bytes`` holds for the solve (a budget above it is
            lowered to it); the steps drawn are not held to it (a step over it is drawn, not
            raised).
        actions: what a solved plan may use (see :func:`remat.plan_step`).
        title: the page's title (default: the model's class and device).
        max_points: points kept per step in the page (longer steps are downsampled, every peak
            kept).
        x_axis: the page's x axis: ``"time"`` (milliseconds, measured steps), ``"op"`` (the op
            index, always the case on ``meta``) or ``"auto"`` (time when measured).
        progress: a line per stage: ``None`` logs to the ``remat`` logger, ``True`` prints to
            stderr, or a callable.

    Returns:
        The :class:`Timeline` (the steps recorded, the budget in bytes).

    Raises:
        ValueError: both ``plan`` and ``budget``; no plan fits ``budget``
            (:class:`~remat.InfeasibleBudgetError`); a distributed step (``world_size``,
            ``fsdp``); what :class:`~remat.Step` refuses.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(4)])
        >>> out = tempfile.mkdtemp() + "/timeline.html"
        >>> line = timeline(model, (torch.randn(64, 32),), optimizer="sgd", out=out,
        ...                 plan=Plan(actions={"_default": "recompute"}, budget_bytes=90_000))
        >>> line.planned.peak_bytes <= line.budget_bytes < line.unplanned.peak_bytes
        True
        >>> "http" in open(out).read()
        False
    """
    from remat.auto import InfeasibleBudgetError, plan_step
    from remat.solve.solver import INFEASIBLE

    step = as_step(
        model_or_step,
        batch,
        loss_fn=loss_fn,
        optimizer=optimizer,
        precision=precision,
        units=units,
        target=target,
        dtype=dtype,
        attention=attention,
        accumulation_steps=accumulation_steps,
        capacity_bytes=capacity_bytes,
    )
    if step.world_size > 1 or step.fsdp:
        raise ValueError(
            f"step: got world_size={step.world_size}, fsdp={step.fsdp}; expected one process's"
            " step (a timeline records the step this process runs, not a rank of a sharded or"
            " replicated one). Fix: step.replace(world_size=1, fsdp=False)"
        )
    if plan is not None and budget is not None:
        raise ValueError(
            "plan, budget: got both; expected one (a plan to draw, or a budget to solve one for)."
            " Fix: drop budget (the plan's own budget is drawn), or drop plan"
        )
    say = as_progress(progress)
    the_plan = _plan_of(plan)
    budget_bytes = the_plan.budget_bytes if the_plan is not None else None
    if budget is not None:
        result = plan_step(step, budget, actions=actions, progress=progress).result
        if result.status == INFEASIBLE:
            raise InfeasibleBudgetError(result)
        the_plan, budget_bytes = result.plan, result.budget_bytes
    recorded = _recording_step(step)
    unit_fqns = (
        list(the_plan.units) if the_plan is not None and the_plan.units else units_of(recorded)
    )
    say("timeline: recording the unplanned step")
    steps = [record_step(recorded, units=unit_fqns)]
    if the_plan is not None:
        say("timeline: recording the planned step")
        steps.append(record_step(recorded, the_plan, units=unit_fqns))
    device = _device_text(step)
    result_line = Timeline(
        steps=steps,
        budget_bytes=budget_bytes,
        title=title or f"remat timeline: {type(step.model).__name__} on {device.split(',')[0]}",
        device=device,
        plan=the_plan,
    )
    if out is not None:
        result_line.save(out, max_points, x_axis)
    if snapshot is not None:
        result_line.save_snapshot(snapshot)
    return result_line


def write_timelines(
    step: Step,
    plans: dict[str, tuple[Plan, int | None]],
    paths: dict[str, str | os.PathLike[str]],
    *,
    title: str = "remat timeline",
    max_points: int = DEFAULT_MAX_POINTS,
) -> dict[str, Path]:
    """One page per plan (``plans``: name -> (plan, budget bytes)), written to ``paths[name]``,
    each beside the same unplanned step (recorded once): what ``remat bench --timelines`` writes.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2)])
        >>> step = Step(model, (torch.ones(4, 8),), optimizer="sgd")
        >>> folder = tempfile.mkdtemp()
        >>> written = write_timelines(step, {"full": (Plan(actions={"_default": "recompute"}), None)},
        ...                           {"full": folder + "/full.html"})
        >>> written["full"].name
        'full.html'
    """
    recorded = _recording_step(step)
    first = next(iter(plans.values()))[0] if plans else None
    unit_fqns = list(first.units) if first is not None and first.units else units_of(recorded)
    unplanned = record_step(recorded, units=unit_fqns)
    device = _device_text(step)
    written = {}
    for name, (plan, budget_bytes) in plans.items():
        line = Timeline(
            steps=[unplanned, record_step(recorded, plan, units=unit_fqns, label=name)],
            budget_bytes=budget_bytes,
            title=f"{title}: {name}",
            device=device,
            plan=plan,
        )
        written[name] = line.save(paths[name], max_points)
    return written
