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

import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from remat._compat import in_backward
from remat.apply.apply import apply_, fingerprint
from remat.apply.units import UnitSpec, call_model, execution_order, find_units, tensors_in
from remat.cost.model import Profile, UnitProfile
from remat.profiling.step import OPTIMIZERS, default_loss, make_optimizer, training_step
from remat.profiling.tracker import Mark, track_memory
from remat.solve.baselines import baseline_plan

__all__ = ["profile"]

logger = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _UnitMarks:
    """Hooks on the units that mark interval boundaries in a tracker, or take timestamps."""

    def __init__(self, modules: list[nn.Module], on_event: Callable[[tuple[str, int]], None]):
        self.on_event = on_event
        self.handles: list[Any] = []
        self.outputs: dict[int, set[int]] = {}
        self.inputs: dict[int, list[tuple[int, int]]] = {}
        for index, module in enumerate(modules):
            self.handles.append(module.register_forward_pre_hook(self._pre(index)))
            self.handles.append(module.register_forward_hook(self._post(index)))

    def _pre(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if in_backward():
                return
            self.on_event(("forward", index))
            self.inputs[index] = [
                (id(t.untyped_storage()), t.untyped_storage().nbytes()) for t in tensors_in(args)
            ]

        return hook

    def _post(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if in_backward():
                return
            self.on_event(("after", index))
            tensors = tensors_in(output)
            self.outputs[index] = {id(t.untyped_storage()) for t in tensors}
            needing = [t for t in tensors if t.requires_grad]
            if needing and torch.is_grad_enabled():
                torch.autograd.graph.register_multi_grad_hook(
                    needing, lambda _grad: self.on_event(("backward", index)), mode="any"
                )

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _tracked_step(
    model: nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor],
    optimizer: str,
    unit_modules: list[nn.Module],
) -> tuple[int, int, list[Mark], _UnitMarks]:
    opt = make_optimizer(optimizer, model)
    for param in model.parameters():
        param.grad = None
    roots = [model, example_inputs] + ([opt] if opt is not None else [])
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with track_memory(*roots, device="cuda" if device.type == "cuda" else None) as tracker:
        marks = _UnitMarks(unit_modules, tracker.mark)
        handle = None
        if opt is not None:
            handle = opt.register_step_pre_hook(lambda *_: tracker.mark(("optimizer", -1)))
        try:
            tracker.mark(("start", -1))
            training_step(model, example_inputs, loss_fn=loss_fn, optimizer=opt)
        finally:
            marks.remove()
            if handle is not None:
                handle.remove()
    report = tracker.report()
    static = report.static_bytes + report.peak_by_category["gradient"]
    state = 0
    if opt is not None:
        state = sum(
            v.untyped_storage().nbytes()
            for s in opt.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor)
        )
    for param in model.parameters():
        param.grad = None
    return report.peak_bytes, static + state, tracker.marks, marks


def _intervals(marks: list[Mark], num_units: int) -> dict[tuple[str, int], Mark]:
    found: dict[tuple[str, int], Mark] = {}
    for mark in marks:
        key = tuple(mark.label)
        if key in found and key[0] != "start":
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
) -> tuple[float, list[float], list[float]]:
    opt = make_optimizer(optimizer, model)
    events: list[tuple[tuple[str, int], float]] = []

    def stamp(label: tuple[str, int]) -> None:
        _sync(device)
        events.append((label, time.perf_counter()))

    step_ms: list[float] = []
    forward: list[list[float]] = [[] for _ in unit_modules]
    backward: list[list[float]] = [[] for _ in unit_modules]
    marks = _UnitMarks(unit_modules, stamp)
    try:
        for step in range(warmup + repeats):
            events.clear()
            for param in model.parameters():
                param.grad = None
            _sync(device)
            start = time.perf_counter()
            loss = loss_fn(call_model(model, example_inputs))
            stamp(("loss", -1))
            loss.backward()
            stamp(("backward_end", -1))
            if opt is not None:
                opt.step()
            _sync(device)
            end = time.perf_counter()
            if step < warmup:
                continue
            step_ms.append((end - start) * 1e3)
            times = {label: t for label, t in events}
            order = [label for label, _ in events]
            for index in range(len(unit_modules)):
                if ("forward", index) in times and ("after", index) in times:
                    forward[index].append(
                        (times[("after", index)] - times[("forward", index)]) * 1e3
                    )
                if ("backward", index) in times:
                    position = order.index(("backward", index))
                    following = events[position + 1][1] if position + 1 < len(events) else end
                    backward[index].append((following - times[("backward", index)]) * 1e3)
    finally:
        marks.remove()
        for param in model.parameters():
            param.grad = None
    median = lambda xs: statistics.median(xs) if xs else 0.0  # noqa: E731
    return median(step_ms), [median(x) for x in forward], [median(x) for x in backward]


def profile(
    model: nn.Module,
    example_inputs: Any,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: str = "adamw",
    units: UnitSpec = None,
    warmup: int = 1,
    repeats: int = 3,
) -> Profile:
    """Measure a model's training step for the planner.

    Args:
        model: the model, on the device to plan for (``meta`` for shapes alone).
        example_inputs: a tuple of positional arguments, a dict of keyword arguments, or one object.
        loss_fn: output -> scalar loss; default: the output if scalar, else the sum of the means of
            its floating tensors.
        optimizer: ``"adamw"``, ``"sgd"`` or ``"none"``: whose step (and state) is part of the step.
        units: what plans may act on (see :func:`remat.find_units`).
        warmup, repeats: untimed and timed steps for the medians (real devices only).

    Returns:
        A :class:`~remat.cost.model.Profile`; units are in execution order.

    Raises:
        ValueError: bad arguments, a unit that runs twice or never in one step.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(4)])
        >>> prof = profile(model, (torch.randn(8, 32),), optimizer="sgd", repeats=1)
        >>> prof.unit_fqns, prof.units[0].keep_bytes > prof.units[0].recompute_bytes
        (['0', '1', '2', '3'], True)
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: got {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    loss_fn = loss_fn or default_loss
    unit_fqns = execution_order(model, find_units(model, units), example_inputs)
    modules = dict(model.named_modules())
    unit_modules = [modules[fqn] for fqn in unit_fqns]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n = len(unit_fqns)

    runs = {}
    for strategy in ("none", "full"):
        with apply_(model, baseline_plan(strategy, unit_fqns)):
            peak, _, marks, unit_marks = _tracked_step(
                model, example_inputs, loss_fn, optimizer, unit_modules
            )
        runs[strategy] = (peak, _intervals(marks, n), marks, unit_marks)
    none_peak, none, none_marks, none_units = runs["none"]
    full_peak, full, full_marks, _ = runs["full"]

    def retention(run: dict[tuple[str, int], Mark], i: int) -> int:
        return run[("after", i)].start_bytes - run[("forward", i)].start_bytes

    keep = [retention(none, i) for i in range(n)]
    rec = [retention(full, i) for i in range(n)]
    prefix_keep = [sum(keep[:i]) for i in range(n + 1)]
    prefix_rec = [sum(rec[:i]) for i in range(n + 1)]
    missing = Mark(None, 0, 0)
    # Intervals outside every unit's reach: before the first unit, and the optimizer step.
    fixed = max(
        [m.peak_bytes for m in none_marks if m.label[0] in ("start", "optimizer")]
        + [m.peak_bytes for m in full_marks if m.label[0] in ("start", "optimizer")]
    )
    # Ops after the last backward mark (unit 0's backward, then the context before the units)
    # belong to unit 0's backward interval; both measured runs are equal there but for unit 0.

    none_report_units = _unit_sizes(none_units, n)
    times = (None, [None] * n, [None] * n)
    if device.type != "meta" and repeats > 0:
        times = _time_steps(
            model, example_inputs, loss_fn, optimizer, unit_modules, device, warmup, repeats
        )
    flops = _forward_flops(model, example_inputs, loss_fn, unit_modules)
    cross = _cross_unit(none_units, unit_fqns)
    skips = _skip_outputs(cross, unit_fqns)
    for link in cross:
        del link["storage"]
    units_out = []
    for i, fqn in enumerate(unit_fqns):
        input_bytes, output_bytes = none_report_units[i]
        units_out.append(
            UnitProfile(
                fqn=fqn,
                class_name=type(unit_modules[i]).__name__,
                input_bytes=input_bytes,
                output_bytes=output_bytes,
                saved_bytes=max(keep[i] - rec[i], 0),
                keep_bytes=keep[i],
                skip_outputs=skips[i],
                recompute_bytes=rec[i],
                forward_need_keep_bytes=none[("forward", i)].peak_bytes - prefix_keep[i],
                forward_need_recompute_bytes=full[("forward", i)].peak_bytes - prefix_rec[i],
                gap_need_bytes=max(
                    none[("after", i)].peak_bytes - prefix_keep[i + 1],
                    full[("after", i)].peak_bytes - prefix_rec[i + 1],
                ),
                backward_need_keep_bytes=none.get(("backward", i), missing).peak_bytes
                - prefix_keep[i],
                backward_need_recompute_bytes=full.get(("backward", i), missing).peak_bytes
                - prefix_rec[i],
                backward_start_recompute_bytes=full.get(("backward", i), missing).start_bytes
                - prefix_rec[i],
                forward_excess_bytes=none[("forward", i)].peak_bytes
                - none[("forward", i)].start_bytes,
                forward_ms=times[1][i],
                backward_ms=times[2][i],
                forward_flops=flops[i],
            )
        )
    static_bytes = runs["none"][0] and _static_bytes(model, example_inputs, optimizer)
    return Profile(
        units=units_out,
        static_bytes=static_bytes,
        fixed_peak_bytes=fixed,
        peak_bytes=none_peak,
        full_peak_bytes=full_peak,
        step_ms=times[0],
        time_source="measured" if times[0] is not None else "flops",
        model_class=type(model).__name__,
        device=str(device),
        dtype=str(next((p.dtype for p in model.parameters()), torch.float32)).replace("torch.", ""),
        optimizer=optimizer,
        torch_version=torch.__version__,
        fingerprint=fingerprint(model, unit_fqns),
        cross_unit=cross,
    )


def _unit_sizes(marks: _UnitMarks, n: int) -> list[tuple[int, int]]:
    sizes = []
    for i in range(n):
        inputs = marks.inputs.get(i, [])
        input_bytes = sum(dict(inputs).values())
        sizes.append((input_bytes, 0))
    return sizes


def _cross_unit(marks: _UnitMarks, fqns: list[str]) -> list[dict[str, Any]]:
    """Inputs of a unit produced by an earlier, non-adjacent unit (skip connections)."""
    found = []
    for i in range(len(fqns)):
        for storage_id, nbytes in dict(marks.inputs.get(i, [])).items():
            for j in range(i - 1):
                if storage_id in marks.outputs.get(j, set()):
                    found.append(
                        {"from": fqns[j], "to": fqns[i], "bytes": nbytes, "storage": storage_id}
                    )
    return found


def _skip_outputs(cross: list[dict[str, Any]], fqns: list[str]) -> list[list[list[int]]]:
    """Per unit, [last reader's index, bytes] for each of its output storages that a later
    non-adjacent unit reads: a segment ending before that reader cannot drop them."""
    per_unit: list[dict[int, list[int]]] = [{} for _ in fqns]
    index = {fqn: i for i, fqn in enumerate(fqns)}
    for link in cross:
        entry = per_unit[index[link["from"]]].setdefault(link["storage"], [0, link["bytes"]])
        entry[0] = max(entry[0], index[link["to"]])
    return [sorted(d.values()) for d in per_unit]


def _static_bytes(model: nn.Module, example_inputs: Any, optimizer: str) -> int:
    """Parameters, buffers and inputs, plus a gradient per trainable parameter and the optimizer
    state (two per parameter for AdamW)."""
    storages: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers(), *tensors_in(example_inputs)]:
        storage = tensor.untyped_storage()
        storages[id(storage)] = storage.nbytes()
    trainable = sum(p.untyped_storage().nbytes() for p in model.parameters() if p.requires_grad)
    states = {"adamw": 2, "sgd": 0, "none": 0}[optimizer]
    return sum(storages.values()) + trainable * (1 + states)


def _forward_flops(
    model: nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor],
    unit_modules: list[nn.Module],
) -> list[int]:
    """Forward FLOPs per unit from one forward under the tracker (no backward)."""
    names = {id(m): f"unit{i}" for i, m in enumerate(unit_modules)}
    with torch.no_grad(), track_memory(model) as tracker:
        call_model(model, example_inputs)
    report = tracker.report()
    fqn_of = {id(m): name for name, m in model.named_modules()}
    del names
    return [
        report.modules.get(fqn_of[id(m)], None).forward_flops  # type: ignore[union-attr]
        if fqn_of[id(m)] in report.modules
        else 0
        for m in unit_modules
    ]
