"""``remat.profile``: measure what the planner needs, on the model's own device.

Two tracked training steps give the memory figures: one with every unit kept (``none``) and one with
every unit recomputed (``full``). Unit boundaries are marked in the tracker (forward start, forward
end, backward start), so each interval's start and peak are known exactly; see
:mod:`remat.cost.model` for how they become retentions and needs. Then untracked steps (after
warm-up) give median times: the whole step, and each unit's forward and backward.

On ``meta`` (or under ``FakeTensorMode``) nothing runs, so there are no times: the profile's
``time_source`` is ``flops`` and the solver weighs recompute by forward FLOPs.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import logging
import statistics
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from remat.apply.apply import apply_, fingerprint, precision_check_off
from remat.apply.selective import is_op_name, lenient_save_sets, op_name, save_name
from remat.apply.shapes import batch_shapes
from remat.apply.units import (
    UnitSpec,
    call_model,
    execution_order,
    find_units_with_inputs,
    tensors_in,
)
from remat.cost.distributed import per_rank
from remat.cost.model import OptionProfile, Profile, UnitProfile
from remat.feedback import as_progress
from remat.plan import Action, Plan
from remat.profiling.marks import UnitMarks
from remat.profiling.meta_kernels import mirror_cpu_on_meta
from remat.profiling.meta_target import estimate_on_meta
from remat.profiling.options import (
    EngineCost,
    UnitEngine,
    copy_bandwidth,
    engine_cost,
    kept_by_policy,
    save_set_candidates,
    time_unit_engines,
    time_unit_ops,
)
from remat.profiling.pieces import Released, Run, combine_windows, halve
from remat.profiling.shared import share_op_times, share_unit_times
from remat.profiling.step import (
    MIXED_DTYPES,
    accumulating,
    check_optimizer,
    check_precision,
    current_accumulation,
    default_loss,
    make_optimizer,
    make_scaler,
    optimizer_name,
    optimizer_state_bytes,
    preserved_state,
    step_autocast,
    training_step,
)
from remat.profiling.tracker import Mark, current_capacity, simulated_capacity, track_memory
from remat.solve.baselines import baseline_plan

__all__ = ["profile"]

logger = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tracked_step(
    model: nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor],
    optimizer: str,
    unit_modules: list[nn.Module],
    precision: str = "32",
    forward_only: bool = False,
) -> Run:
    """One training step under the tracker with unit boundaries marked, and the loss: marks
    ``("loss", -1)`` once it is computed (autocast, if any, exits next and drops its cache) and
    ``("head", -1)`` when its backward starts.

    Returns the peak, the marks, the unit hooks (inputs and outputs seen), per unit the bytes of
    its inputs produced by the previous unit that died before the next unit's forward, and per
    unit the forward-only bytes and autocast's cache (see ``_forward_only``).

    The last unit's input from the unit before it may outlive the last unit's forward only because
    the parent still holds it (``x = block(x)`` rebinds ``x`` after the call returns). When it dies
    before the model's forward returns, its bytes are forward-only for the last unit, which did
    not store it, not for the unit that made it: that unit's output is stored when the last unit
    is kept or recomputed and does not end a segment with it.
    """
    opt = make_optimizer(optimizer, model)
    for param in model.parameters():
        param.grad = None
    roots = [model, example_inputs] + ([opt] if opt is not None else [])
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    freed: dict[int, int] = {}
    last = len(unit_modules) - 1
    watching: dict[int, list[tuple[Any, int]]] = {}
    held_by_parent: list[tuple[Any, int]] = []
    dead_by_end: list[int] = []
    with track_memory(*roots, device="cuda" if device.type == "cuda" else None) as tracker:

        def on_event(label: tuple[str, int]) -> None:
            kind, index = label
            done = index - 1 if kind == "forward" else index if kind == "after" else None
            if done is not None and (kind == "forward" or done == last) and done in watching:
                entries = watching.pop(done)
                freed[done] = sum(n for ref, n in entries if ref() is None)
                if kind == "after":  # made by the unit before (not its own inputs passed on)
                    own = {key for key, _ in marks.inputs.get(done - 1, [])}
                    held_by_parent.extend(
                        (ref, n) for ref, n in entries if ref() is not None and id(ref()) not in own
                    )
            tracker.mark(label)
            if kind == "forward" and index > 0:
                chain = marks.outputs.get(index - 1, {})
                watching[index] = [
                    (weakref.ref(t.untyped_storage()), t.untyped_storage().nbytes())
                    for t in marks.last_inputs
                    if id(t.untyped_storage()) in chain
                ]

        def on_end(*_: Any) -> None:
            dead_by_end.append(sum(n for ref, n in held_by_parent if ref() is None))
            tracker.mark(("end", -1))

        def marked_loss(output: Any) -> torch.Tensor:
            loss = loss_fn(output)
            tracker.mark(("loss", -1))
            if loss.requires_grad:
                loss.register_hook(lambda _grad: tracker.mark(("head", -1)))
            return loss

        marks = UnitMarks(unit_modules, on_event)
        marks.handles.append(model.register_forward_hook(on_end))
        handle = None
        if opt is not None:
            handle = opt.register_step_pre_hook(lambda *_: tracker.mark(("optimizer", -1)))
        try:
            tracker.mark(("start", -1))
            training_step(
                model, example_inputs, loss_fn=marked_loss, optimizer=opt, precision=precision
            )
        except torch.OutOfMemoryError:
            if not forward_only or not dead_by_end:
                raise
            # past the forward, which is all that is read of this run
            logger.info("profile: the step ran out of memory after its forward; forward kept")
        finally:
            marks.remove()
            if handle is not None:
                handle.remove()
    alive_by_end, cache = _forward_only(tracker, len(unit_modules))
    moved = dead_by_end[0] if dead_by_end and last > 0 else 0
    if moved and alive_by_end[last - 1] >= moved:
        alive_by_end[last - 1] -= moved
        alive_by_end[last] += moved
    marks.data_dependent = tracker.report().data_dependent_ops
    released = _released(tracker, len(unit_modules))
    return tracker.peak_bytes, tracker.marks, marks, freed, alive_by_end, cache, released


def _in_windows(
    step: Callable[[], Run],
    unit_fqns: list[str],
    action: str,
    collect: Callable[[range], None] | None = None,
) -> tuple[Run, list[range], int]:
    """``step()`` with every unit under ``action``; if it runs out of memory, in windows of
    units under ``action`` with the others recomputed, halved until each fits, and combined
    (:mod:`remat.profiling.pieces`). ``collect(window)`` reads the regions while a window's
    plan is on. Returns the run, the windows taken and the highest peak measured."""
    n = len(unit_fqns)
    pending, pieces = [range(n)], []
    while pending:
        window = pending.pop(0)
        try:
            with apply_(model_of(step), _window_plan(unit_fqns, window, action)):
                run = step()
                if collect is not None:
                    collect(window)
        except torch.OutOfMemoryError as error:
            if len(window) == 1:
                raise torch.OutOfMemoryError(
                    f"{error}. remat cannot profile {unit_fqns[window.start]!r} under {action}"
                    " even with every other unit recomputed: the device is too small for this"
                    " step. Fix: a smaller batch, or a device with more memory."
                ) from error
            logger.info("profile: every unit %s does not fit; windows %s", action, halve(window))
            pending[:0] = halve(window)
            continue
        pieces.append((window, run))
    measured = max(run[0] for _, run in pieces)
    return combine_windows(pieces, n), [window for window, _ in pieces], measured


def check_estimate(precision: str, device: str | None) -> None:
    """Refuse what estimate mode cannot model: a mixed precision, or no target device."""
    if precision in MIXED_DTYPES:
        raise ValueError(
            f"precision: got {precision!r} with an estimate; expected '32' or 'bf16-true'"
            " (estimate mode does not model autocast yet: pass dtype='bfloat16' for a bf16"
            " model, or measure the mixed step on the CPU)"
        )
    if device is None:
        raise ValueError(
            "device: got None with mode='estimate'; expected a device name such as"
            " 'h100-80gb' (remat.devices.DEVICES lists them)"
        )


def estimate_via_meta(
    model: nn.Module,
    example_inputs: Any,
    *,
    device: str | Any,
    dtype: str | torch.dtype | None,
    attention: str,
    loss_fn: Callable[[Any], torch.Tensor] | None,
    optimizer: Any,
    units: UnitSpec,
    progress: Callable[[str], None] | None,
    options: Sequence[str],
    world_size: int,
    fsdp: bool,
    precision: str = "32",
    capacity_bytes: int | None = None,
    timing: bool = True,
) -> Profile:
    """What ``profile(mode="estimate")`` and :func:`remat.profiling.estimate.estimate_profile`
    run: this profiler's measurement on a meta copy under the target's kernels
    (:func:`~remat.profiling.meta_target.estimate_on_meta`), ``per_rank`` applied at its end as
    for a measured profile, and the roofline times when ``timing``."""

    def measure(meta_model: nn.Module, meta_inputs: Any) -> Profile:
        return profile(
            meta_model,
            meta_inputs,
            loss_fn=loss_fn,
            optimizer=optimizer,
            units=units,
            progress=progress,
            options=options,
            world_size=world_size,
            fsdp=fsdp,
            precision=precision,
            capacity_bytes=capacity_bytes,
        )

    return estimate_on_meta(
        measure,
        model,
        example_inputs,
        device=device,
        dtype=dtype,
        attention=attention,
        loss_fn=loss_fn,
        optimizer=optimizer,
        timing=timing,
        progress=progress,
    )


def _step_capacity(capacity_bytes: int | None, held_bytes: int) -> int | None:
    """What a tracked step may hold under ``capacity_bytes`` (or the enclosing simulated
    capacity) while profiling keeps ``held_bytes`` beside it."""
    capacity = capacity_bytes if capacity_bytes is not None else current_capacity()
    if capacity is None:
        return None
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(
            f"capacity_bytes: got {capacity!r}; expected a number of bytes >= 1. Fix: pass an"
            " int, e.g. remat.units.parse_bytes('40GiB')"
        )
    if held_bytes >= capacity:
        raise torch.OutOfMemoryError(
            f"remat simulated capacity: the capacity of {capacity:,} bytes is full before any"
            f" step runs (profiling keeps {held_bytes:,} bytes of the model's gradients and"
            " copies). Fix: a device with more memory."
        )
    return capacity - held_bytes


def _window_plan(unit_fqns: list[str], window: range, action: str) -> Plan:
    """``action`` on the units of ``window``, the others recomputed (every unit: no plan for
    ``keep``)."""
    actions = {f: action if j in window else "recompute" for j, f in enumerate(unit_fqns)}
    return Plan(actions=actions, units=unit_fqns)


def _unplanned_times(
    windows: list[range], timed: list[tuple[float, list[float], list[float]]]
) -> tuple[float, list[float], list[float]]:
    """The unplanned step's times from its windows' (one window: its own). A unit's forward and
    backward are those of the run that kept it; the step's, each window's step less what its
    recomputed units' backward took over their kept backward, averaged over the windows."""
    if len(windows) == 1:
        return timed[0]
    n = sum(len(w) for w in windows)
    forward, backward = [0.0] * n, [0.0] * n
    for window, (_, forward_w, backward_w) in zip(windows, timed, strict=True):
        for j in window:
            forward[j], backward[j] = forward_w[j], backward_w[j]
    steps = [
        step_w - sum(backward_w[j] - backward[j] for j in range(n) if j not in window)
        for window, (step_w, _, backward_w) in zip(windows, timed, strict=True)
    ]
    return statistics.fmean(steps), forward, backward


def model_of(step: Callable[[], Run]) -> nn.Module:
    """The model a ``functools.partial`` of :func:`_tracked_step` runs."""
    return step.args[0]  # type: ignore[attr-defined]


@contextlib.contextmanager
def _fits_or_says(what: str) -> Iterator[None]:
    """A tracked step that must fit whole (every unit recomputed, one segment): out of memory
    there means no plan fits, which is said."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise torch.OutOfMemoryError(
            f"{error}. remat cannot profile this step: it does not fit even with {what}, the"
            " least memory a plan takes. Fix: a smaller batch, or a device with more memory."
        ) from error


def _forward_only(tracker: Any, n: int) -> tuple[list[int], list[int]]:
    """Per unit, bytes created between its forward's start and the next unit's that were alive
    then but died before the model's forward returned (held by the parent only, such as a list of
    skip tensors): they count against forward moments, not backward ones. And per unit, those
    that died between the loss and its backward: autocast's cache, dropped when autocast exits
    (casts of parameters that nothing saved), which count in the loss but not in backward."""
    events = {tuple(m.label): m.event for m in tracker.marks}
    end, loss = events.get(("end", -1)), events.get(("loss", -1))
    head = events.get(("head", -1), float("inf"))
    bounds = [events.get(("forward", j)) for j in range(n)] + [events.get(("after", n - 1))]
    result, cache = [0] * n, [0] * n
    if end is None or any(b is None for b in bounds):
        return result, cache
    for created, died, nbytes in tracker.lifetimes():
        # Deaths inside a later unit's interval are already in that unit's retention; only those
        # between the last unit's end and the forward's return are forward-only.
        if died is None or created >= bounds[-1]:
            continue
        if bounds[-1] < died <= end:
            found = result
        elif loss is not None and loss <= died < head:
            found = cache
        else:
            continue
        for j in range(n):
            if bounds[j] <= created < bounds[j + 1]:
                found[j] += nbytes
                break
    return result, cache


def _released(tracker: Any, n: int) -> Released:
    """What each unit's backward frees of what the units before it left alive, from the
    storages' lifetimes (see :class:`~remat.profiling.pieces.Released`).

    Of unit ``j - 1``'s retention, unit ``j``'s backward may free what unit ``j - 1`` made (its
    output, which only unit ``j`` saved) and what the parent made between the two (a skip's sum
    that is unit ``j``'s input). A plan where something else holds them (a kept unit whose last op
    saves its output; a segment's checkpoint, which holds its inner units' inputs) keeps them
    alive through that backward: how much higher its peak is then is measured here too, for
    either part and both. And per unit, what its forward made that died in its own backward: a
    checkpoint's state (clones of the buffers its forward changed)."""
    events = {tuple(m.label): m.event for m in tracker.marks}
    result = Released.empty(n)
    forward = [events.get(("forward", j)) for j in range(n)]
    after = [events.get(("after", j)) for j in range(n)]
    if any(e is None for e in forward + after):
        return result
    # each unit's backward interval: from its mark to the next mark's event
    bounds: list[tuple[int, int, int]] = []
    for position, mark in enumerate(tracker.marks):
        label = tuple(mark.label)
        if label[0] == "backward" and 0 <= label[1] < n:
            following = tracker.marks[position + 1] if position + 1 < len(tracker.marks) else None
            bounds.append((mark.event, following.event if following else 1 << 62, label[1]))
    bounds.sort()
    starts = [b[0] for b in bounds]

    def interval(event: int) -> int | None:
        k = bisect.bisect_left(starts, event) - 1  # start < event
        return k if k >= 0 and event <= bounds[k][1] else None

    # per interval: event -> [change of the live total, dying made by the previous unit, by
    # the parent between the two]
    changes: list[dict[int, list[int]]] = [{} for _ in bounds]
    last_own = [0] * len(bounds)  # the last death of what the forward made (up to the unit)
    for created, died, nbytes in tracker.lifetimes():
        k = interval(created)
        if k is not None:
            changes[k].setdefault(created, [0, 0, 0])[0] += nbytes
        k = interval(died) if died is not None else None
        if k is None:
            continue
        change = changes[k].setdefault(died, [0, 0, 0])
        change[0] -= nbytes
        j = bounds[k][2]
        if created <= after[j]:  # saved for its backward, or held by a checkpoint of it
            last_own[k] = max(last_own[k], died)
        if forward[j] < created <= after[j]:
            result.state[j] += nbytes
        elif j > 0 and forward[j - 1] < created <= after[j - 1]:
            change[1] += nbytes
            result.released[j - 1] += nbytes
        elif j > 0 and after[j - 1] < created <= forward[j]:
            change[2] += nbytes
            result.released_between[j - 1] += nbytes
    for (_, _, j), found, own in zip(bounds, changes, last_own, strict=True):
        live = made = between = 0
        best = [0, 0, 0, 0]  # as it was; with what the unit made alive; the parent's; both
        result.rise_after[j] = None
        for event in sorted(found):
            live += found[event][0]
            made += found[event][1]
            between += found[event][2]
            for which, value in enumerate((0, made, between, made + between)):
                best[which] = max(best[which], live + value)
            if event < own:
                result.rise_before[j] = max(result.rise_before[j], live)
            else:
                result.rise_after[j] = max(result.rise_after[j] or 0, live)
        result.held_made[j] = best[1] - best[0]
        result.held_between[j] = best[2] - best[0]
        result.held_both[j] = best[3] - best[0]
    return result


def _intervals(marks: list[Mark], num_units: int) -> dict[tuple[str, int], Mark]:
    found: dict[tuple[str, int], Mark] = {}
    for mark in marks:
        key = tuple(mark.label)
        if key in found and key[0] not in ("start", "end"):
            raise ValueError(
                f"profile: unit #{key[1]} ran its {key[0]} twice in one step; a unit must run once"
                " per step. Pass units= naming modules that run once (a module called twice"
                " cannot be planned as a unit)."
            )
        found[key] = mark  # type: ignore[index]
    missing = [i for i in range(num_units) if ("forward", i) not in found]
    if missing:
        raise ValueError(
            f"profile: {len(missing)} unit(s) never ran in the example step (#{missing[:5]});"
            " pass units= naming modules that the forward calls"
        )
    return found


def _time_steps(
    model: nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor],
    optimizer: str,
    unit_modules: list[nn.Module],
    device: torch.device,
    warmup: int,
    repeats: int,
    plans: Sequence[Plan] = (),
    precision: str = "32",
    first: Plan | None = None,
) -> list[tuple[float, list[float], list[float]]]:
    """Medians of step time and of each unit's forward and backward time: first for the model as
    it is (or under ``first``, for a step that does not fit unplanned), then for each of
    ``plans`` applied to it. The plans' steps are interleaved with the first (one round runs
    each once), so drift of the machine touches all alike; the warm-up rounds run each (a plan's
    first step pays for what the engine sets up once). The steps run in ``precision`` (see :func:`remat.profiling.step.training_step`)."""
    opt = make_optimizer(optimizer, model)
    scaler = make_scaler(precision, device)
    events: list[tuple[tuple[str, int], float]] = []

    def stamp(label: tuple[str, int]) -> None:
        _sync(device)
        events.append((label, time.perf_counter()))

    variants: list[Plan | None] = [first, *plans]
    step_ms: list[list[float]] = [[] for _ in variants]
    forward = [[[] for _ in unit_modules] for _ in variants]
    backward = [[[] for _ in unit_modules] for _ in variants]
    marks = UnitMarks(unit_modules, stamp)
    try:
        for step in range(warmup + repeats):
            for which, plan in enumerate(variants):
                events.clear()
                for param in model.parameters():
                    param.grad = None
                with apply_(model, plan) if plan is not None else nullcontext():
                    _sync(device)
                    start = time.perf_counter()
                    with step_autocast(precision, device):
                        loss = loss_fn(call_model(model, example_inputs))
                    stamp(("loss", -1))
                    (loss if scaler is None else scaler.scale(loss)).backward()
                    stamp(("backward_end", -1))
                    if opt is not None and scaler is not None:
                        scaler.step(opt)
                        scaler.update()
                    elif opt is not None:
                        opt.step()
                    _sync(device)
                    end = time.perf_counter()
                if step < warmup:
                    continue
                step_ms[which].append((end - start) * 1e3)
                times = {label: t for label, t in events}
                order = [label for label, _ in events]
                for index in range(len(unit_modules)):
                    if ("forward", index) in times and ("after", index) in times:
                        forward[which][index].append(
                            (times[("after", index)] - times[("forward", index)]) * 1e3
                        )
                    if ("backward", index) in times:
                        position = order.index(("backward", index))
                        following = events[position + 1][1] if position + 1 < len(events) else end
                        backward[which][index].append(
                            (following - times[("backward", index)]) * 1e3
                        )
    finally:
        marks.remove()
        for param in model.parameters():
            param.grad = None
    median = lambda xs: statistics.median(xs) if xs else 0.0  # noqa: E731
    return [
        (median(step_ms[w]), [median(x) for x in forward[w]], [median(x) for x in backward[w]])
        for w in range(len(variants))
    ]


def _mirrored(function: Callable[..., Profile]) -> Callable[..., Profile]:
    """Run ``function(model, ...)`` with the CPU's kernels on a meta model, in every pass: save
    sets are named from one pass and matched in another, so all must see the same ops."""

    @functools.wraps(function)
    def mirrored(model: nn.Module, *args: Any, **kwargs: Any) -> Profile:
        with mirror_cpu_on_meta(model):
            return function(model, *args, **kwargs)

    return mirrored


@_mirrored
def profile(
    model: nn.Module,
    example_inputs: Any,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: Any = "adamw",
    units: UnitSpec = None,
    warmup: int = 1,
    repeats: int = 3,
    progress: bool | Callable[[str], None] | None = None,
    options: Sequence[str] | None = None,
    mode: str = "measure",
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    attention: str = "auto",
    world_size: int = 1,
    fsdp: bool = False,
    precision: str = "32",
    capacity_bytes: int | None = None,
    accumulation_steps: int = 1,
) -> Profile:
    """Measure a model's training step for the planner, or estimate it for a target device.

    Args:
        model: the model, on the device to plan for (``meta`` for shapes alone).
        example_inputs: a tuple of positional arguments, a dict of keyword arguments, or one object.
        loss_fn: output -> scalar loss; default: the output if scalar, else the sum of the means of
            its floating tensors.
        optimizer: whose step (and state) is part of the step: ``"adamw"``, ``"sgd"``, ``"none"``,
            a ``torch.optim.Optimizer`` instance (profiled on a new one of its class and
            hyperparameters; the instance and its state are never changed) or a factory
            ``params -> Optimizer``. Its state bytes come from running its own step.
        units: what plans may act on (see :func:`remat.find_units`).
        warmup, repeats: untimed and timed steps for the medians (real devices only).
        progress: what to do with a line of text as each measured step starts: ``None`` logs it
            (the ``remat`` logger, INFO), ``True`` writes it to stderr (a bar on a terminal), a
            callable receives it (:func:`remat.feedback.as_progress`).
        options: actions finer than recompute to measure, each with one more tracked step:
            ``selective:<policy>``, ``selective:auto`` (save sets chosen from the ops' measured
            times and bytes) and ``offload``. Default: ``selective:save_matmuls``,
            ``selective:megatron``, ``selective:auto``, and ``offload`` on CUDA. ``()``: none.
            In estimate mode the default is none (each option is one more step on ``meta``).
        mode: ``"measure"`` (default: run on the model's own device) or ``"estimate"``: run on
            ``meta`` for ``device`` (a name from :mod:`remat.devices`) in ``dtype``, modelling the
            target's kernels, with times from a roofline (see :mod:`remat.profiling.estimate`).
        device, dtype, attention: the target, for ``mode="estimate"`` only.
        world_size, fsdp: plan for one of ``world_size`` data-parallel ranks, under DDP
            (``fsdp=False``) or FSDP2 (``fsdp=True``: parameters, gradients and optimizer state
            sharded). ``example_inputs`` is then one rank's batch; the step is measured in this
            process and the figures are made per rank by :func:`remat.cost.distributed.per_rank`.
        precision: the step's precision, by Lightning's names: ``"32"`` (as the model is),
            ``"bf16-mixed"`` / ``"fp16-mixed"`` (forward and loss under ``torch.autocast``,
            backward outside it; fp16 with a ``GradScaler``) or ``"bf16-true"`` (parameters
            already ``bfloat16``). Every step profiling runs, tracked or timed, runs so.
        capacity_bytes: the device's memory, simulated (default: none, or that of an enclosing
            :func:`~remat.profiling.tracker.simulated_capacity`): a tracked step that would hold
            more raises ``torch.OutOfMemoryError``. Profiling holds no more than it: a step that
            does not fit whole is measured in windows of units and combined exactly
            (:mod:`remat.profiling.pieces`); ``Profile.profiling_peak_bytes`` says what it held.
        accumulation_steps: micro-batches whose gradients add up before each optimizer step;
            above 1 the step profiled is the last micro-batch, with the gradients alive from the
            start (:func:`remat.profiling.step.accumulating`). Default: 1, or that of an
            enclosing ``accumulating``.

    Returns:
        A :class:`~remat.cost.model.Profile`; units are in execution order.

    Raises:
        ValueError: bad arguments, a unit that runs twice or never in one step, ``bf16-true``
            for a model not in ``bfloat16`` (fix: ``model.to(torch.bfloat16)``).
        torch.OutOfMemoryError: the step does not fit even with every unit recomputed (or with
            a unit kept while the rest are recomputed): no plan fits, and the message says so.
        NotEstimableError: in estimate mode, a data-dependent op (a ``ValueError``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(4)])
        >>> prof = profile(model, (torch.randn(8, 32),), optimizer="sgd", repeats=1)
        >>> prof.unit_fqns, prof.units[0].keep_bytes > prof.units[0].recompute_bytes
        (['0', '1', '2', '3'], True)
        >>> est = profile(model, (torch.randn(8, 32),), mode="estimate", device="a100-80gb",
        ...               dtype="bfloat16", optimizer="sgd")
        >>> est.device, est.time_source, est.units[0].keep_bytes < prof.units[0].keep_bytes
        ('a100-80gb', 'roofline', True)
    """
    progress = as_progress(progress)  # once: the meta copy's steps share one clock
    if mode == "estimate":
        check_estimate(precision, device)
        return estimate_via_meta(
            model,
            example_inputs,
            device=device,
            dtype=dtype,
            attention=attention,
            loss_fn=loss_fn,
            optimizer=optimizer,
            units=units,
            progress=progress,
            options=() if options is None else options,
            world_size=world_size,
            fsdp=fsdp,
            precision=precision,
            capacity_bytes=capacity_bytes,
        )
    if mode != "measure":
        raise ValueError(f"mode: got {mode!r}; expected 'measure' or 'estimate'")
    if device is not None or dtype is not None or attention != "auto":
        raise ValueError(
            "device, dtype, attention: given with mode='measure', which profiles the model where"
            " it is; pass mode='estimate' to estimate for a target device"
        )
    check_optimizer(optimizer)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(
            f"world_size: got {world_size!r}; expected an integer >= 1 (the number of"
            " data-parallel ranks)"
        )
    check_precision(precision, model)
    loss_fn = loss_fn or default_loss
    option_actions = _option_actions(options, next((p.device for p in model.parameters()), None))
    found = find_units_with_inputs(model, units, example_inputs)  # lists bytes if none repeat
    unit_fqns = execution_order(model, found, example_inputs)
    modules = dict(model.named_modules())
    unit_modules = [modules[fqn] for fqn in unit_fqns]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n = len(unit_fqns)
    autocast = functools.partial(step_autocast, precision, device)  # forward-only passes

    # Three tracked steps: every unit kept (K), every unit recomputed (R), and all units in one
    # segment (S), which shows what a unit leaves alive when it is inside a segment.
    plans = {
        "K": baseline_plan("none", unit_fqns),
        "R": baseline_plan("full", unit_fqns),
        "S": Plan(actions=dict.fromkeys(unit_fqns, "segment:all"), units=unit_fqns),
    }
    runs: dict[str, Any] = {}
    windows: dict[str, list[range]] = {}  # runs that did not fit whole: the windows taken
    measured: list[int] = []  # the tracked steps' measured peaks
    step = functools.partial(
        _tracked_step, model, example_inputs, loss_fn, optimizer, unit_modules, precision
    )
    say = as_progress(progress)
    names = {"K": "every unit kept", "R": "every unit recomputed", "S": "one segment"}
    times: tuple[Any, list[Any], list[Any]] = (None, [None] * n, [None] * n)
    engine: EngineCost | None = None  # what the engines add per unit and per op (timed only)
    alone: list[UnitEngine | None] = [None] * n  # the same, per unit, timed alone
    # profiling runs optimizer steps, which must not train the model; each save set is measured
    # on every unit, though some units do not run all its ops (each unit's option names its own)
    # (its own plans, made without a precision, run under the step's autocast: not warned about)
    with (
        preserved_state(model, optimizer) as preserved,
        lenient_save_sets(),
        precision_check_off(),
        simulated_capacity(_step_capacity(capacity_bytes, preserved.held_bytes)),
        accumulating(accumulation_steps),
    ):
        for number, (key, plan) in enumerate(plans.items(), start=1):
            say(f"profile: tracked step {number}/{3 + len(option_actions)} ({names[key]})")
            if key == "S" and n < 2:
                runs["S"] = runs["R"]
                continue
            if key == "K":  # the unplanned step: in windows if it does not fit
                runs[key], windows[key], held = _in_windows(step, unit_fqns, "keep")
                measured.append(held)
                continue
            with _fits_or_says(names[key]), apply_(model, plan):
                runs[key] = step(forward_only=key == "S")  # S: its forward is what is read
            measured.append(runs[key][0])
        op_times: list[dict[Any, tuple[float, int]]] = [{} for _ in range(n)]
        auto_actions: set[str] = set()
        if any(a.startswith("selective:") for a in option_actions):
            with autocast():
                op_times = time_unit_ops(model, example_inputs, unit_modules)
            op_times = share_op_times(op_times, [_structure(m) for m in unit_modules])
        if "selective:auto" in option_actions:
            every_op = sorted({op_name(key[0]) for unit in op_times for key in unit})
            graphs: list[Any] = []
            with autocast():
                kept_by_policy(
                    model, example_inputs, unit_fqns, "ops." + ".".join(every_op), graphs=graphs
                )
            auto = save_set_candidates(
                op_times,
                graphs,
                count=AUTO_SAVE_SETS,
                time_source="measured" if device.type != "meta" else "flops",
            )
            index = option_actions.index("selective:auto")
            option_actions[index : index + 1] = [
                f"selective:{label}" for label in auto if f"selective:{label}" not in option_actions
            ]
        kept_bytes: dict[str, list[dict[Any, int]]] = {}
        offloaded: dict[str, list[int]] = {}
        replayed: dict[str, list[set[Any]]] = {}
        for number, action in enumerate(option_actions, start=4):
            say(f"profile: tracked step {number}/{3 + len(option_actions)} (every unit {action})")
            kept_bytes[action], replayed[action], offloaded[action] = [{}] * n, [set()] * n, [0] * n

            def collect(window: range, action: str = action) -> None:
                for j in window:
                    region = unit_modules[j].__dict__["forward"].__remat_region__
                    kept_bytes[action][j] = dict(region.last_kept_bytes)
                    replayed[action][j] = set(region.last_replayed)
                    offloaded[action][j] = region.last_offloaded_bytes

            runs[action], windows[action], held = _in_windows(step, unit_fqns, action, collect)
            measured.append(held)
        if device.type != "meta" and repeats > 0:
            # a step that did not fit whole is timed in the windows it was measured in
            window_plans = [_window_plan(unit_fqns, w, "keep") for w in windows["K"]]
            say(f"profile: timing {warmup} warm-up and {repeats} measured steps (unplanned)")
            timed = _time_steps(
                model,
                example_inputs,
                loss_fn,
                optimizer,
                unit_modules,
                device,
                warmup,
                repeats,
                plans=window_plans[1:],
                precision=precision,
                first=window_plans[0] if len(window_plans) > 1 else None,
            )
            times = _unplanned_times(windows["K"], timed)
            say("profile: timing the engines on each distinct unit alone")
            engine = engine_cost(device)
            every_op = [
                "ops." + ".".join(sorted({op_name(key[0]) for key in unit})) if unit else None
                for unit in op_times
            ]
            alone = time_unit_engines(
                model,
                example_inputs,
                unit_fqns,
                every_op,
                [_structure(m) for m in unit_modules],
                context=autocast,
            )
    none_peak, _, k_units, _, fo_k, ca_k, rel_k = runs["K"]
    full_peak, _, _, _, fo_r, ca_r, rel_r = runs["R"]
    _, _, _, s_freed, fo_s, ca_s, _ = runs["S"]
    K, R, S = (_intervals(runs[x][1], n) for x in "KRS")
    fixed = max(
        m.peak_bytes for x in "KRS" for m in runs[x][1] if m.label[0] in ("start", "optimizer")
    )
    start_peak = max(m.peak_bytes for x in "KRS" for m in runs[x][1] if m.label[0] == "start")
    optimizer_marks = [m for x in "KRS" for m in runs[x][1] if m.label[0] == "optimizer"]
    optimizer_mark = max(optimizer_marks, key=lambda m: m.peak_bytes, default=None)
    base = K[("forward", 0)].start_bytes

    def starts(run: dict[tuple[str, int], Mark]) -> list[int]:
        """Live bytes when each unit's forward starts, and when the last one's forward ends."""
        return [run[("forward", j)].start_bytes for j in range(n)] + [
            run[("after", n - 1)].start_bytes
        ]

    def forward_peaks(run: dict[tuple[str, int], Mark]) -> list[int]:
        """Peak from each unit's forward start to the next unit's (the last: to the model's end)."""
        return [max(run[("forward", j)].peak_bytes, run[("after", j)].peak_bytes) for j in range(n)]

    def persistent(starts_: list[int], forward_only: list[int], cache: list[int]) -> list[int]:
        """Live bytes at each unit's start that are alive in the backward (relative to the base):
        they outlive the forward, and autocast's cache, which dies after the loss."""
        return [starts_[j] - base - sum(forward_only[:j]) - sum(cache[:j]) for j in range(n + 1)]

    LK, LR, LS = starts(K), starts(R), starts(S)
    PK, PR, PS = forward_peaks(K), forward_peaks(R), forward_peaks(S)
    QK, QR = persistent(LK, fo_k, ca_k), persistent(LR, fo_r, ca_r)
    missing = Mark(None, 0, 0)
    cached = any(any(runs[x][5]) for x in ["K", "R", "S", *option_actions])
    end_need, loss_need = _end_needs(K, base + QK[n], sum(ca_k), cached)

    none_report_units = _unit_sizes(k_units, n)
    with autocast():
        flops = _forward_flops(model, example_inputs, unit_fqns)
    cross = _cross_unit(k_units, unit_fqns)
    notes = []
    for fqn in unit_fqns:
        ops = sorted(
            {
                op
                for name, found in k_units.data_dependent.items()
                if name == fqn or name.startswith(fqn + ".")
                for op in found
            }
        )
        if ops:
            notes.append(
                f"{fqn} runs data-dependent ops ({', '.join(ops)}); recomputing it replays them on"
                " the same inputs with the same RNG, so the result is the same, and remat checks"
                " on replay that it saved the same shapes (CheckpointMismatchError naming the unit"
                " otherwise). If its routing can change between forward and backward, keep it."
            )
    if device.type == "meta" and notes:
        notes.append(
            "data-dependent ops have no shape-only form: this profile ran them on meta"
            " only as far as their meta kernels allow"
        )
    units_out = []
    for j, fqn in enumerate(unit_fqns):
        input_bytes, output_bytes = none_report_units[j]
        k_bwd, r_bwd = K.get(("backward", j), missing), R.get(("backward", j), missing)
        units_out.append(
            UnitProfile(
                fqn=fqn,
                class_name=type(unit_modules[j]).__name__,
                input_bytes=input_bytes,
                output_bytes=output_bytes,
                keep_bytes=LK[j + 1] - LK[j],
                recompute_bytes=LR[j + 1] - LR[j],
                inner_bytes=LS[j + 1] - LS[j],
                keep_forward_only_bytes=fo_k[j],
                recompute_forward_only_bytes=fo_r[j],
                inner_forward_only_bytes=fo_s[j],
                keep_cache_bytes=ca_k[j],
                recompute_cache_bytes=ca_r[j],
                inner_cache_bytes=ca_s[j],
                input_freed_bytes=s_freed.get(j, 0),
                forward_need_keep_bytes=PK[j] - LK[j],
                forward_need_recompute_bytes=PR[j] - LR[j],
                forward_need_inner_bytes=PS[j] - LS[j],
                forward_excess_bytes=K[("forward", j)].peak_bytes - LK[j],
                backward_need_keep_bytes=k_bwd.peak_bytes - base - QK[j] if k_bwd.label else None,
                backward_need_recompute_bytes=(
                    r_bwd.peak_bytes - base - QR[j] if r_bwd.label else None
                ),
                backward_start_recompute_bytes=(
                    r_bwd.start_bytes - base - QR[j] if r_bwd.label else None
                ),
                buffer_bytes=_buffer_bytes(unit_modules[j]),
                backward_keep_split_bytes=_split(k_bwd, rel_k, j, base + QK[j]),
                backward_recompute_split_bytes=_split(r_bwd, rel_r, j, base + QR[j]),
                keep_call_bytes=K[("after", j)].start_bytes - LK[j],
                keep_released_bytes=rel_k.released[j],
                keep_released_between_bytes=rel_k.released_between[j],
                recompute_released_bytes=rel_r.released[j],
                recompute_released_between_bytes=rel_r.released_between[j],
                recompute_state_bytes=rel_r.state[j],
                backward_keep_held_made_bytes=rel_k.held_made[j],
                backward_keep_held_between_bytes=rel_k.held_between[j],
                backward_keep_held_both_bytes=rel_k.held_both[j],
                backward_recompute_held_made_bytes=rel_r.held_made[j],
                backward_recompute_held_between_bytes=rel_r.held_between[j],
                backward_recompute_held_both_bytes=rel_r.held_both[j],
                forward_ms=times[1][j],
                backward_ms=times[2][j],
                recompute_ms=_recompute_ms(times[1][j], engine, alone[j]),
                forward_flops=flops[j],
            )
        )
    bandwidth = copy_bandwidth(device) if any(a == "offload" for a in option_actions) else None
    ran = [{save_name(key[0]) for key in unit_ops} for unit_ops in op_times]
    for action in option_actions:
        run = _intervals(runs[action][1], n)
        starts_x = starts(run)
        peaks_x = forward_peaks(run)
        held_x = persistent(starts_x, runs[action][4], runs[action][5])
        for j, unit in enumerate(units_out):
            unit_action = _unit_action(action, ran[j])
            if unit_action is None or unit.option(unit_action) is not None:
                continue  # keeps nothing in this unit, or another option measured the same set
            bwd = run.get(("backward", j), missing)
            option = OptionProfile(
                action=unit_action,
                retain_bytes=starts_x[j + 1] - starts_x[j],
                forward_only_bytes=runs[action][4][j],
                cache_bytes=runs[action][5][j],
                forward_need_bytes=peaks_x[j] - starts_x[j],
                backward_need_bytes=bwd.peak_bytes - base - held_x[j] if bwd.label else None,
                released_bytes=runs[action][6].released[j],
                backward_held_extra_bytes=runs[action][6].held_made[j],
            )
            if action == "offload":
                option.saved_bytes = offloaded[action][j]
                option.cost_ms = _offload_ms(option.saved_bytes, bandwidth, device, times, j)
            else:
                kept = kept_bytes[action][j]
                option.saved_bytes = sum(kept.values())
                # The replay runs only the ops whose outputs lead to a saved tensor not kept.
                ops = op_times[j]
                total_ms = sum(ms for ms, _ in ops.values())
                replay_ms = sum(ops[key][0] for key in replayed[action][j] if key in ops)
                replay_flops = sum(ops[key][1] for key in replayed[action][j] if key in ops)
                if unit.forward_ms is not None and engine is not None:
                    option.cost_ms = _selective_ms(
                        unit.forward_ms,
                        replay_ms / total_ms if total_ms > 0 else 1.0,
                        len(ops),
                        engine,
                        alone[j],
                    )
                option.cost_flops = float(replay_flops)
            unit.options.append(option)
    time_source = "measured" if times[0] is not None else "flops"
    share_unit_times(units_out, [_structure(m) for m in unit_modules])  # identical: one time
    resolution_ms = TIME_RESOLUTION * times[0] if times[0] is not None else None
    for unit in units_out:
        unit.options = _pareto_options(unit, time_source, auto_actions, resolution_ms or 0.0)
    static_bytes, state_bytes = _static_bytes(model, example_inputs, optimizer)
    result = Profile(
        units=units_out,
        static_bytes=static_bytes,
        base_bytes=base,
        end_need_bytes=end_need,
        loss_need_bytes=loss_need,
        fixed_peak_bytes=fixed,
        peak_bytes=none_peak,
        full_peak_bytes=full_peak,
        step_ms=times[0],
        time_resolution_ms=resolution_ms,
        time_source="measured" if times[0] is not None else "flops",
        model_class=type(model).__name__,
        input_shapes=batch_shapes(example_inputs),
        device=str(device),
        dtype=str(next((p.dtype for p in model.parameters()), torch.float32)).replace("torch.", ""),
        optimizer=optimizer_name(optimizer, model),
        optimizer_state_bytes=state_bytes,
        accumulation_steps=max(accumulation_steps, current_accumulation()),
        precision=precision,
        torch_version=torch.__version__,
        fingerprint=fingerprint(model, unit_fqns),
        cross_unit=cross,
        notes=notes,
        parameters=_parameters(model, unit_fqns),
        start_peak_bytes=start_peak,
        optimizer_peak_bytes=optimizer_mark.peak_bytes if optimizer_mark else None,
        optimizer_start_bytes=optimizer_mark.start_bytes if optimizer_mark else None,
        profiling_peak_bytes=preserved.held_bytes + max(measured),
        capacity_bytes=capacity_bytes if capacity_bytes is not None else current_capacity(),
    )
    return per_rank(result, world_size=world_size, fsdp=fsdp)


def _split(mark: Mark, released: Released, j: int, held_bytes: int) -> list[int] | None:
    """Unit ``j``'s backward need (over ``held_bytes``) before the last tensor the forward made
    (up to this unit) died in it, and from then on (``None``: no backward, or none died)."""
    after = released.rise_after[j]
    if mark.label is None or after is None:
        return None
    start = mark.start_bytes - held_bytes
    return [start + released.rise_before[j], start + after]


def _buffer_bytes(module: nn.Module) -> int:
    """Bytes of clones of a module's buffers, as the tracker counts them (rounded on CUDA)."""
    buffers = list(module.buffers())
    if not buffers:
        return 0
    device = "cuda" if buffers[0].device.type == "cuda" else None
    with torch.no_grad(), track_memory(device=device) as tracker:
        clones = [buffer.clone() for buffer in buffers]
        made = tracker.current_bytes - tracker.static_bytes  # the buffers read: static
    del clones
    return made


def _structure(module: nn.Module) -> tuple[Any, ...]:
    """What makes two units the same unit, short of what they measured: their module classes,
    parameters and buffers (names, shapes, dtypes, whether they train)."""
    return (
        tuple(type(m).__name__ for m in module.modules()),
        tuple(
            (name, tuple(p.shape), str(p.dtype), p.requires_grad)
            for name, p in module.named_parameters()
        ),
        tuple((name, tuple(b.shape), str(b.dtype)) for name, b in module.named_buffers()),
    )


def _end_needs(
    K: dict[tuple[str, int], Mark], held_bytes: int, cache_bytes: int, cached: bool
) -> tuple[int, int | None]:
    """``Profile.end_need_bytes`` and ``loss_need_bytes`` from the run with every unit kept,
    where ``held_bytes`` were alive into the backward and ``cache_bytes`` more until autocast's
    exit. Without autocast's cache in any run, the loss is part of the end need (``None``)."""
    end, loss, head = (K.get((kind, -1)) for kind in ("end", "loss", "head"))
    before = max((m.peak_bytes for m in (end, loss) if m is not None), default=None)
    after = head.peak_bytes if head is not None else None
    if not cached or before is None or after is None:
        peaks = [p for p in (before, after) if p is not None]
        return (max(peaks) - held_bytes if peaks else 0), None
    return after - held_bytes, before - held_bytes - cache_bytes


def _recompute_ms(
    forward_ms: float | None, engine: EngineCost | None, alone: UnitEngine | None
) -> float | None:
    """What recomputing a unit adds to the step: its forward times what recomputing it took
    over its forward when timed alone (:func:`~remat.profiling.options.time_unit_engines`: the
    forward again, in backward, and the checkpoint's work); a unit that was not timed alone, its
    forward and the probe's :attr:`EngineCost.unit_ms`. Modelled on the unit's forward, not a
    difference of timed steps: that moves with the machine's load by more than a cheap unit
    costs, and a plan chosen on it changed from run to run.

    Example:
        >>> probe = EngineCost(unit_ms=0.25, op_ms=0.01)
        >>> _recompute_ms(12.0, probe, UnitEngine(recompute_share=1.5, engine_share=None))
        18.0
        >>> _recompute_ms(12.0, probe, None)
        12.25
        >>> _recompute_ms(None, None, None) is None
        True
    """
    if forward_ms is None or engine is None:
        return None
    if alone is not None:
        return forward_ms * max(alone.recompute_share, 1.0)
    return forward_ms + engine.unit_ms


def _selective_ms(
    forward_ms: float, share: float, ops: int, engine: EngineCost, alone: UnitEngine | None
) -> float:
    """What a save set adds to a unit's step: the ``share`` of its forward's op time that the
    replay runs, run again in backward (as recompute's forward is), and the engine: the op
    log and the replay's dispatch, as timed on the unit alone (a save set that replays no op),
    or the probe's cost per op for the unit's ``ops``.

    Example:
        >>> probe = EngineCost(unit_ms=0.25, op_ms=0.01)
        >>> _selective_ms(20.0, 0.25, 40, probe, None)  # 5 ms of replay, 40 ops of engine
        5.4
        >>> _selective_ms(20.0, 0.25, 40, probe, UnitEngine(recompute_share=1.2, engine_share=0.1))
        8.0
    """
    share = min(max(share, 0.0), 1.0)
    if alone is None or alone.engine_share is None:
        return forward_ms * share + engine.op_ms * ops
    return forward_ms * (share * max(alone.recompute_share, 1.0) + alone.engine_share)


def _parameters(model: nn.Module, unit_fqns: list[str]) -> list[dict[str, Any]]:
    """Each parameter once: its owner unit (``""`` outside units), dim 0 and bytes per row of it,
    and whether it trains: what :func:`remat.cost.distributed.per_rank` shards."""
    found = []
    for name, param in model.named_parameters():
        owner = next((u for u in unit_fqns if name.startswith(u + ".")), "")
        dim0 = param.shape[0] if param.dim() > 0 else 1
        row_bytes = param.numel() // dim0 * param.element_size() if dim0 else 0
        found.append(
            {"owner": owner, "dim0": dim0, "row_bytes": row_bytes, "trainable": param.requires_grad}
        )
    return found


AUTO_SAVE_SETS = 4
TIME_RESOLUTION = 0.02
"""The share of the measured step time under which two plans' costs are a tie for the solver
(``Profile.time_resolution_ms``): repeated profiles of the same step differ by more."""
"""How many solver-chosen save sets ``selective:auto`` measures at most (every set the walk passes
through, or those at a fifth, two fifths... of the bytes that can be freed): each is one more
tracked step."""
_DEFAULT_OPTIONS = ("selective:save_matmuls", "selective:megatron", "selective:auto")


def _option_actions(options: Sequence[str] | None, device: torch.device | None) -> list[str]:
    """The option actions to measure, validated (``selective:auto`` is expanded later)."""
    if options is None:
        chosen = list(_DEFAULT_OPTIONS)
        if device is not None and device.type == "cuda":
            chosen.append("offload")
        return chosen
    if isinstance(options, str):
        options = [options]
    chosen = []
    for text in options:
        if text == "selective:auto":
            chosen.append(text)
            continue
        try:
            action = Action.parse(text)
        except ValueError as error:
            raise ValueError(f"profile options: {error}") from None
        if action.kind not in ("selective", "offload"):
            raise ValueError(
                f"profile options: got {text!r}; expected selective:<policy>, selective:auto or"
                " offload (keep, recompute and segments are always measured)"
            )
        if str(action) not in chosen:
            chosen.append(str(action))
    return chosen


def _offload_ms(
    saved_bytes: int,
    bandwidth: float | None,
    device: torch.device,
    times: tuple[Any, list[Any], list[Any]],
    j: int,
) -> float | None:
    """Transfer time of one unit's saved bytes, out and back, less what overlaps compute on CUDA
    (the copy out with the next unit's forward, the copy back with the following unit's backward)."""
    if bandwidth is None or times[0] is None:
        return None
    one_way = saved_bytes / bandwidth
    if device.type != "cuda":
        return 2 * one_way  # synchronous copies
    forward_next = times[1][j + 1] if j + 1 < len(times[1]) else 0.0
    backward_after = times[2][j + 1] if j + 1 < len(times[2]) else 0.0
    return max(one_way - (forward_next or 0.0), 0.0) + max(one_way - (backward_after or 0.0), 0.0)


def _unit_action(action: str, ran: set[str]) -> str | None:
    """A ``selective:ops.<op>...`` option as one unit ran it: its save set without the real ops
    the unit did not run (names that are no op stay, to be refused where the plan is applied);
    ``None`` if it keeps nothing there. Other actions are returned as they are.

    Example:
        >>> _unit_action("selective:ops.addmm.max_pool2d_with_indices.gelu", {"addmm", "gelu"})
        'selective:ops.addmm.gelu'
        >>> _unit_action("selective:ops.max_pool2d_with_indices", {"addmm"}) is None
        True
        >>> _unit_action("selective:save_matmuls", {"addmm"})
        'selective:save_matmuls'
    """
    saved = Action.parse(action).saved_ops
    if saved is None:
        return action
    names = [name for name in saved if name in ran or not is_op_name(name)]
    if not any(name in ran for name in names):
        return None
    return "selective:ops." + ".".join(names)


def _pareto_options(
    unit: UnitProfile, time_source: str, auto_actions: set[str], tie_ms: float = 0.0
) -> list[OptionProfile]:
    """Options asked for by name stay; save sets that ``selective:auto`` chose stay only if no
    other choice for the unit (keep, recompute, another option) retains no more for a cost lower
    by more than ``tie_ms`` (the solver's timing resolution: an option within it of another may
    win the solver's tie on FLOPs, so dropping it would let noise pick the plan)."""
    choices = [(unit.keep_bytes, 0.0), (unit.recompute_bytes, unit.recompute_cost(time_source))]
    choices += [(o.retain_bytes, o.cost(time_source)) for o in unit.options]
    kept = []
    for option in unit.options:
        point = (option.retain_bytes, option.cost(time_source))
        dominated = any(
            other[0] <= point[0] and other[1] <= point[1] - tie_ms and other != point
            for other in choices
        )
        if not dominated or option.action not in auto_actions:
            kept.append(option)
    return kept


def _unit_sizes(marks: UnitMarks, n: int) -> list[tuple[int, int]]:
    """(input bytes, output bytes) per unit, each storage counted once."""
    return [
        (sum(dict(marks.inputs.get(i, [])).values()), sum(marks.outputs.get(i, {}).values()))
        for i in range(n)
    ]


def _cross_unit(marks: UnitMarks, fqns: list[str]) -> list[dict[str, Any]]:
    """Inputs of a unit produced by an earlier, non-adjacent unit (skip connections)."""
    found = []
    for i in range(len(fqns)):
        for storage_id, nbytes in dict(marks.inputs.get(i, [])).items():
            for j in range(i - 1):
                if storage_id in marks.outputs.get(j, {}):
                    found.append({"from": fqns[j], "to": fqns[i], "bytes": nbytes})
    return found


def _static_bytes(model: nn.Module, example_inputs: Any, optimizer: Any) -> tuple[int, int]:
    """Parameters, buffers and inputs, plus a gradient per trainable parameter and the optimizer
    state, counted on a fresh optimizer whose state its own step made
    (:func:`remat.profiling.step.optimizer_state_bytes`: two moments per parameter for AdamW);
    and the optimizer state's part of it."""
    storages: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers(), *tensors_in(example_inputs)]:
        storage = tensor.untyped_storage()
        storages[id(storage)] = storage.nbytes()
    trainable = sum(p.untyped_storage().nbytes() for p in model.parameters() if p.requires_grad)
    with preserved_state(model, optimizer):
        state_bytes = optimizer_state_bytes(make_optimizer(optimizer, model))
    return sum(storages.values()) + trainable + state_bytes, state_bytes


def _forward_flops(model: nn.Module, example_inputs: Any, unit_fqns: list[str]) -> list[int]:
    """Forward FLOPs per unit from one forward under the tracker (no backward)."""
    with torch.no_grad(), track_memory(model) as tracker:
        call_model(model, example_inputs)
    modules = tracker.report().modules
    return [modules[fqn].forward_flops if fqn in modules else 0 for fqn in unit_fqns]
