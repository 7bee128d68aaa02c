"""Recording one training step op by op: live bytes by category and by unit, with names.

Consumes a :class:`~remat.profiling.step.Step` (and optionally a plan to apply while it runs);
produces a :class:`StepTimeline`: after every aten op of the step (forward, loss, backward,
optimizer step), the live bytes of each category (parameters, buffers and inputs, gradients,
optimizer state, activations of each unit, other activations, transients), the op, the module
running it, the phase, and the lifetimes of every storage, from the memory tracker
(:func:`remat.track_memory`) and its per-op ``observer``.

A storage's category is the tracker's (``activation`` is what a forward left alive for backward,
known only once that forward has ended), so the series is built after the step from the
storages' creation and death events, not while it runs.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from remat.apply.apply import apply_
from remat.plan import Plan
from remat.profiling.step import (
    Step,
    accumulating,
    make_optimizer,
    model_device,
    preserved_state,
    training_step,
)
from remat.profiling.tracker import MemoryTracker, simulated_capacity, track_memory

__all__ = [
    "KEYS",
    "StepTimeline",
    "Storage",
    "activation_key",
    "record_step",
    "target_context",
    "units_of",
]

KEYS = ("parameter", "other", "optimizer_state", "gradient", "transient")
"""The keys of the series besides the activations of each unit (``act:<unit>``) and the
activations outside every unit (``act:``); ``other`` holds buffers and inputs."""

_KEY_OF_CATEGORY = {
    "parameter": "parameter",
    "buffer": "other",
    "input": "other",
    "gradient": "gradient",
    "optimizer_state": "optimizer_state",
    "transient": "transient",
}


def activation_key(unit: str | None) -> str:
    """The series key of the activations of ``unit`` (``None``: outside every unit).

    Example:
        >>> activation_key("h.3"), activation_key(None)
        ('act:h.3', 'act:')
    """
    return f"act:{unit or ''}"


@dataclass(frozen=True)
class Storage:
    """One storage of the step: when it lived (op indices), its bytes and where it came from."""

    created: int
    """Index of the op that created it (0 for one alive before the step: the static base)."""
    died: int
    """Index of the first op after its death (the number of ops if alive at the end)."""
    nbytes: int
    key: str
    """Its series key (see :data:`KEYS`, :func:`activation_key`)."""
    module: str
    """The module running when it was created ("" for the model, or static)."""
    static: bool
    """Alive before the step began (parameters, optimizer state, the batch)."""
    recompute: bool
    """Created while a forward was replayed in backward (checkpoint recompute)."""


@dataclass
class StepTimeline:
    """One step, op by op. ``x`` is elapsed milliseconds on a real device, the op index on
    ``meta`` (``x_unit``). Every list has one entry per op.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
        >>> line = record_step(Step(model, (torch.ones(4, 8),), optimizer="sgd"), units=[])
        >>> line.peak_bytes == max(line.total_bytes), line.phases[0], "optimizer" in line.phases
        (True, 'forward', True)
    """

    label: str
    x_unit: str
    x: list[float]
    ops: list[str]
    modules: list[str]
    phases: list[str]
    recompute: list[bool]
    series: dict[str, list[int]]
    """Per key, the live bytes after each op."""
    storages: list[Storage] = field(repr=False)
    units: list[str] = field(default_factory=list)
    time_ms: list[float] | None = None
    """Milliseconds since the step began, after each op (``None`` on ``meta``): wall time
    under the tracker, synchronised per op on CUDA."""
    tracker_peak_bytes: int = 0
    """The tracker's own peak (equal to ``peak_bytes`` unless storages were resized between
    ops, as FSDP2 does)."""

    def __repr__(self) -> str:
        # The lists hold one entry per op (thousands): a REPL shows the step, not them.
        return (
            f"StepTimeline(label={self.label!r}, ops={len(self.ops)}, x_unit={self.x_unit!r},"
            f" peak_bytes={self.peak_bytes}, series={sorted(self.series)})"
        )

    @property
    def total_bytes(self) -> list[int]:
        """The live total after each op."""
        columns = list(self.series.values())
        return [sum(values) for values in zip(*columns, strict=True)] if columns else []

    @property
    def peak_index(self) -> int:
        """The op at the peak (the first, if it is reached more than once)."""
        totals = self.total_bytes
        return max(range(len(totals)), key=totals.__getitem__) if totals else 0

    @property
    def peak_bytes(self) -> int:
        totals = self.total_bytes
        return totals[self.peak_index] if totals else 0


class _Recorder:
    """The tracker's observer: per op its name, module, phase, event, time and recompute flag."""

    def __init__(self, tracker: MemoryTracker, timed: bool, cuda: bool) -> None:
        self.tracker = tracker
        self.timed = timed
        self.cuda = cuda
        self.start = time.perf_counter()
        self.ops: list[str] = []
        self.modules: list[str] = []
        self.phases: list[str] = []
        self.events: list[int] = []
        self.times_ms: list[float] = []
        self.recompute: list[bool] = []

    def __call__(self, func: Any, phase: str, fqn: str, event: int) -> None:
        packet = getattr(func, "overloadpacket", func)
        self.ops.append(f"aten::{getattr(packet, '__name__', str(func))}")
        self.modules.append(fqn)
        self.phases.append(phase)
        self.events.append(event)
        # Autograd runs backward ops with grad mode off; a forward replayed for a checkpoint
        # runs under enable_grad: that tells recompute from the gradients' own ops.
        self.recompute.append(phase == "backward" and torch.is_grad_enabled())
        if self.timed:
            if self.cuda:
                torch.cuda.synchronize()
            self.times_ms.append((time.perf_counter() - self.start) * 1e3)


def _unit_of(fqn: str, units: Sequence[str]) -> str | None:
    """The innermost unit that ``fqn`` is, or is inside of."""
    best = None
    for unit in units:
        if (fqn == unit or fqn.startswith(unit + ".") or unit == "") and (
            best is None or len(unit) > len(best)
        ):
            best = unit
    return best


def _storages(tracker: MemoryTracker, recorder: _Recorder, units: Sequence[str]) -> list[Storage]:
    """Every storage the tracker saw, placed on the op axis and keyed by category and unit.

    Reads the tracker's storage records (its ``_all`` and ``_category``): ``lifetimes()`` gives
    events and bytes but not categories or modules."""
    events = recorder.events
    n = len(events)
    out = []
    for info in tracker._all:
        category = tracker._category(info)
        unit = _unit_of(info.fqn, units)
        key = activation_key(unit) if category == "activation" else _KEY_OF_CATEGORY[category]
        static = info.created_at < 0
        created = 0 if static else bisect.bisect_left(events, info.created_at)
        died = n if info.died_at is None else bisect.bisect_left(events, info.died_at)
        recompute = not static and created < n and recorder.recompute[created]
        out.append(Storage(created, died, info.nbytes, key, info.fqn, static, recompute))
    return out


def _series(storages: Sequence[Storage], keys: Sequence[str], n: int) -> dict[str, list[int]]:
    """Per key, the bytes alive after each of ``n`` ops (a sweep over births and deaths)."""
    delta = {key: [0] * (n + 1) for key in keys}
    for s in storages:
        if s.created >= s.died or s.created >= n:
            continue
        column = delta[s.key]
        column[s.created] += s.nbytes
        column[s.died] -= s.nbytes
    series = {}
    for key in keys:
        running, values = 0, []
        for change in delta[key][:n]:
            running += change
            values.append(running)
        series[key] = values
    return series


@contextmanager
def target_context(step: Step, model: torch.nn.Module) -> Iterator[None]:
    """Within: ``step.target``'s kernels and the data-dependence guard on ``meta``, as estimate
    mode profiles it (:func:`remat.profiling.meta_target.estimate_on_meta`); nothing for a step
    measured where it is.

    Example:
        >>> with target_context(Step(torch.nn.Linear(2, 2), ()), torch.nn.Linear(2, 2)):
        ...     pass
    """
    if step.target is None:
        yield
        return
    from remat.devices import get_device
    from remat.profiling.guard import DataDependentGuard
    from remat.profiling.meta_target import model_kernels

    with ExitStack() as stack:
        stack.enter_context(DataDependentGuard(model, fast_meta=True))
        stack.enter_context(model_kernels(get_device(step.target), step.attention))
        yield


def units_of(step: Step) -> list[str]:
    """The units of ``step.model`` (:func:`remat.find_units` with ``step.units``); none for a
    model without any (it then has no per-unit series).

    Example:
        >>> units_of(Step(torch.nn.Linear(2, 2), ()))
        []
    """
    from remat.apply.units import NoUnitsError, find_units

    try:
        return find_units(step.model, step.units)
    except NoUnitsError:
        return []


def record_step(
    step: Step,
    plan: Plan | None = None,
    *,
    label: str | None = None,
    units: Sequence[str] | None = None,
    warmup: bool = True,
) -> StepTimeline:
    """Run one training step of ``step`` (with ``plan`` applied, if given) under the tracker and
    record it op by op. The model is left as it was (weights, gradients, no plan).

    Args:
        step: the step; an estimated one (``target``) must already hold a ``meta`` model (see
            :func:`remat.profiling.meta_target.to_meta`), and runs under its target's kernels.
        plan: applied for the step and removed after it.
        label: the step's name (default ``planned`` with a plan, else ``unplanned``).
        units: the units whose activations get a series each (default: ``plan.units``, else
            :func:`remat.find_units` with ``step.units``).
        warmup: on a real device, run the step once untracked first, so the times recorded are
            not the first call's; on the CPU, glibc's malloc is then asked to keep freed memory
            for the rest of the process, as :func:`remat.bench` does
            (:func:`remat.benchmarking.run.keep_freed_host_memory`), or a step would be timed
            paging its memory in again.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2)])
        >>> step = Step(model, (torch.ones(4, 8),), optimizer="sgd")
        >>> line = record_step(step, Plan(actions={"_default": "recompute"}))
        >>> line.label, line.units, any(line.recompute)
        ('planned', ['0', '1'], True)
    """
    model = step.model
    if units is None:
        units = plan.units if plan is not None and plan.units else units_of(step)
    units = list(units)
    device = model_device(model)
    timed = device.type != "meta"
    with ExitStack() as stack:
        # The step's accumulation, not its capacity: an unplanned step over it is drawn, not raised.
        stack.enter_context(accumulating(step.accumulation_steps))
        stack.enter_context(simulated_capacity(None))
        stack.enter_context(target_context(step, model))
        if plan is not None:
            stack.enter_context(apply_(model, plan))
        if warmup and timed:
            if device.type == "cpu":  # as remat.bench: time the ops, not page faults (see there)
                from remat.benchmarking.run import keep_freed_host_memory

                keep_freed_host_memory()
            with preserved_state(model, step.optimizer):
                opt = make_optimizer(step.optimizer, model)
                training_step(
                    model, step.batch, loss_fn=step.loss_fn, optimizer=opt, precision=step.precision
                )
                del opt
        with preserved_state(model, step.optimizer):
            opt = make_optimizer(step.optimizer, model)
            roots = [model, step.batch] + ([opt] if opt is not None else [])
            tracker = track_memory(*roots, device="cuda" if device.type == "cuda" else None)
            recorder = _Recorder(tracker, timed, device.type == "cuda")
            tracker.observer = recorder
            with tracker:
                recorder.start = time.perf_counter()  # x = 0 where the step's first op starts
                training_step(
                    model, step.batch, loss_fn=step.loss_fn, optimizer=opt, precision=step.precision
                )
            tracker.observer = None
            del opt
    storages = _storages(tracker, recorder, units)
    n = len(recorder.ops)
    keys = [*KEYS[:4], *(activation_key(u) for u in units), activation_key(None), KEYS[4]]
    return StepTimeline(
        label=label or ("planned" if plan is not None else "unplanned"),
        x_unit="ms" if timed else "op",
        x=recorder.times_ms if timed else [float(i) for i in range(n)],
        ops=recorder.ops,
        modules=recorder.modules,
        phases=recorder.phases,
        recompute=recorder.recompute,
        series=_series(storages, keys, n),
        storages=storages,
        units=units,
        time_ms=recorder.times_ms if timed else None,
        tracker_peak_bytes=tracker.peak_bytes,
    )
