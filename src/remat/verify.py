"""``remat.verify``: does a plan leave training unchanged, and did it take effect?

Consumes a model, a plan and example inputs; produces a :class:`VerifyReport`. One forward and
backward runs on a copy of the model without the plan and one on the model with it, from the same
seed: outputs of every module, the loss, the gradient of every parameter and input, and every buffer
are compared (bitwise by default). The first module whose output differs (or, failing that, the first
parameter whose gradient does) is named.

"Applied" is judged per planned unit from what was measured, not from a prediction: the tracker
attributes every storage to the module whose forward created it, and a unit's *kept* bytes are those
created in its forward (nested modules included), other than its own outputs, and still alive when
the whole forward ends: what it leaves for backward. Each unit's action bounds them (see
:class:`UnitCheck`); a unit that keeps more is named in ``not_applied``. Finally one full training
step (optimizer step and state included) is measured with and without the plan, exactly as
``remat plan`` measures a plan (:func:`~remat.profiling.step.measure_step`), so the two commands'
peaks can be compared to the byte.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from remat import _compat
from remat.apply.apply import apply_
from remat.apply.checkpoint import _last_offloader
from remat.apply.units import call_model, tensors_in
from remat.auto import measure_plan
from remat.cost.model import block_cost, blocks_of
from remat.plan import Plan
from remat.profiling.profiler import profile
from remat.profiling.step import (
    Step,
    as_step,
    check_precision,
    default_loss,
    model_device,
    optimizer_name,
    preserved_state,
    step_autocast,
)
from remat.profiling.tracker import track_memory
from remat.units import format_bytes

__all__ = ["UnitCheck", "VerifyReport", "verify"]

CUDA_BLOCK_BYTES = 512
"""The tracker rounds each CUDA storage up to this (the caching allocator's block)."""


@dataclass(frozen=True, kw_only=True)
class UnitCheck:
    """One planned unit: the bytes it kept for backward without and with the plan, and the most
    its action allows.

    ``allowed_bytes`` is ``unplanned_kept_bytes`` for ``keep``; for every other action it is the
    unit's *floor* (what it keeps in a forward where autograd saves nothing: tensors it stores
    itself, such as a KV cache) plus what the engine itself stores for it: for ``recompute``,
    ``segment`` and ``nested``, copies of the buffers its forward changes (replay restores them;
    its input is stored by reference, created before it, so not its own); for ``selective:<set>``,
    also the outputs of the ops its save set kept; for ``offload``, instead, the saved tensors the
    offloader leaves on the device by design (parameters and tensors under 1 KiB): everything else
    goes to host memory, which is not device memory. On the CPU the offloaded copies are made as
    host allocations, so the same check holds: the unit's device-side bytes fell to the floor.

    Example:
        >>> check = UnitCheck(fqn="blocks.2", action="recompute", unplanned_kept_bytes=2 << 20,
        ...                   planned_kept_bytes=1 << 20, allowed_bytes=64 << 10)
        >>> check.ok, check.describe()
        (False, 'blocks.2: kept 1.00 MiB, recompute allows 64.0 KiB')
    """

    fqn: str
    action: str
    unplanned_kept_bytes: int
    """Bytes the unit left for backward without the plan."""
    planned_kept_bytes: int
    """Bytes it left with the plan."""
    allowed_bytes: int
    """The most its action allows it to leave (see the class docstring)."""

    @property
    def ok(self) -> bool:
        """The unit kept no more than its action allows."""
        return self.planned_kept_bytes <= self.allowed_bytes

    def describe(self) -> str:
        """``"<fqn>: kept X, <action> allows Y"``."""
        return (
            f"{self.fqn}: kept {format_bytes(self.planned_kept_bytes)}, {self.action} allows"
            f" {format_bytes(self.allowed_bytes)}"
        )


@dataclass(frozen=True, kw_only=True)
class VerifyReport:
    """What :func:`verify` found. ``ok`` is True when everything matched and the plan took effect.

    Example:
        >>> report = VerifyReport(outputs_equal=True, loss_equal=True, grads_equal=True,
        ...                       buffers_equal=True, applied=True)
        >>> report.ok
        True
    """

    outputs_equal: bool
    loss_equal: bool
    grads_equal: bool
    """Every parameter's and input's gradient."""
    buffers_equal: bool
    applied: bool
    """Every planned unit kept no more than its action allows (see ``units``)."""
    first_mismatch: str | None = None
    """"output of blocks.3", "gradient of blocks.3.fc.weight", "buffer bn.running_mean", or None."""
    differing_grads: list[str] = field(default_factory=list)
    differing_buffers: list[str] = field(default_factory=list)
    units: list[UnitCheck] = field(default_factory=list)
    """Per planned unit (``keep`` ones included), in the plan's order: kept bytes without and with
    the plan, and what its action allows."""
    not_applied: list[str] = field(default_factory=list)
    """The units that kept more than their action allows, described
    (``"blocks.2: kept 1.2 MiB, recompute allows 64 KiB"``)."""
    predicted_saved_bytes: int = 0
    """Information only: bytes the plan should drop from what the forward leaves for backward,
    predicted from a profile."""
    measured_saved_bytes: int = 0
    """Information only: bytes it did drop (the whole forward's retention, without minus with)."""
    unplanned_peak_bytes: int = 0
    """Peak of one training step without the plan (optimizer step and state included), measured
    as ``remat plan`` measures."""
    measured_peak_bytes: int = 0
    """Peak of the same step with the plan: ``remat plan``'s ``measured_peak_bytes``."""
    optimizer: str = "adamw"
    """The optimizer whose step the peaks include."""
    checkpointed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.outputs_equal
            and self.loss_equal
            and self.grads_equal
            and self.buffers_equal
            and self.applied
        )

    def to_dict(self) -> dict[str, Any]:
        data = {**asdict(self), "ok": self.ok}
        data["units"] = [{**asdict(unit), "ok": unit.ok} for unit in self.units]
        return data


def _same(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if rtol == 0 and atol == 0:
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True)


def _prepared(example_inputs: Any) -> Any:
    """A copy of the inputs whose floating tensors require grad (input gradients are compared)."""
    inputs = copy.deepcopy(example_inputs)
    for tensor in tensors_in(inputs):
        if tensor.is_floating_point():
            tensor.requires_grad_(True)
    return inputs


def _device_bytes(nbytes: int, device: torch.device) -> int:
    """``nbytes`` as the tracker counts a storage of that size on ``device``."""
    block = CUDA_BLOCK_BYTES if device.type == "cuda" else 1
    return -(-nbytes // block) * block


def _engine_bytes(module: nn.Module) -> int:
    """What the engine itself stores for the call of ``module`` that just returned (see
    :class:`UnitCheck`); 0 for a module that carries no plan."""
    region = getattr(module.__dict__.get("forward"), "__remat_region__", None)
    if region is None:
        return 0
    if region.offload:
        offloader = _last_offloader()  # this call's: the unit's forward just set it
        left = {
            id(t.untyped_storage()): _device_bytes(t.untyped_storage().nbytes(), t.device)
            for entry in (offloader.entries if offloader is not None else [])
            if entry[0] is None
            and isinstance(t := entry[1], torch.Tensor)
            and not isinstance(t, nn.Parameter)
            and not isinstance(_compat.tensor_base(t), nn.Parameter)
        }
        return sum(left.values())
    position = next(i for i, (_, unit) in enumerate(region.units) if unit is module)
    copies = sum(
        _device_bytes(b.numel() * b.element_size(), b.device)
        for b in region.watched_buffers(position)  # learned: the buffers its forward changes
    )
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    # On CUDA each of a kept op's outputs is rounded to a block: one more block per op covers it.
    slack = CUDA_BLOCK_BYTES if device.type == "cuda" else 0
    kept = sum(_device_bytes(n, device) + slack for n in region.last_kept_bytes.values())
    return copies + (kept if region.policy is not None else 0)


class _UnitOutputs:
    """Per unit, weakly, the storages of the outputs its calls returned (its inputs' aside): the
    tracker counts a unit's activation bytes with its outputs, whose lifetime is not the unit's
    doing (they live on while the next unit saves them), so what is alive of them is taken off."""

    def __init__(self, units: list[str]) -> None:
        self._refs: dict[str, dict[int, tuple[Any, int]]] = {fqn: {} for fqn in units}

    def note(self, fqn: str, inputs: Any, output: Any) -> None:
        """A call of unit ``fqn`` with ``inputs`` returned ``output``."""
        given = {id(t.untyped_storage()) for t in tensors_in(inputs)}
        for tensor in tensors_in(output):
            storage = tensor.untyped_storage()
            if id(storage) not in given:
                size = _device_bytes(storage.nbytes(), tensor.device)
                self._refs[fqn][id(storage)] = (weakref.ref(storage), size)

    def alive_bytes(self) -> dict[str, int]:
        """Per unit, the bytes of its outputs alive now."""
        return {
            fqn: sum(size for ref, size in refs.values() if ref() is not None)
            for fqn, refs in self._refs.items()
        }


def _kept(modules: dict[str, Any], outputs: dict[str, int]) -> dict[str, int]:
    """Per unit, what it left for backward: the tracker's activation bytes (created in its
    forward, alive when the forward ended) less its outputs alive then."""
    return {
        fqn: max(modules[fqn].activation_bytes - alive, 0) if fqn in modules else 0
        for fqn, alive in outputs.items()
    }


def _run(
    model: nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor],
    seed: int,
    units: list[str],
    precision: str = "32",
) -> dict[str, Any]:
    """One forward and backward, recording module outputs, the forward's saved bytes, each unit's
    kept bytes and what the engine stored for it; the forward under ``precision``'s autocast."""
    outputs: dict[str, list[torch.Tensor]] = {}
    order: list[str] = []
    unit_outputs = _UnitOutputs(units)
    engine = dict.fromkeys(units, 0)
    handles = []
    for name, module in model.named_modules():

        def hook(mod: nn.Module, args: Any, kwargs: Any, output: Any, name: str = name) -> None:
            if name in engine and not _compat.in_backward():
                unit_outputs.note(name, (args, kwargs), output)
                engine[name] += _engine_bytes(mod)
            if name not in outputs and torch.is_grad_enabled():
                # Outside the dispatch modes: the copies are not the model's ops (a selective
                # unit numbers its ops, and its replay, which skips this hook, must match).
                with _compat.no_dispatch_modes():
                    outputs[name] = [t.detach().clone() for t in tensors_in(output)]
                order.append(name)

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    inputs = _prepared(example_inputs)
    for param in model.parameters():
        param.grad = None
    try:
        torch.manual_seed(seed)
        with track_memory(model, inputs) as tracker:
            start = tracker.current_bytes
            with step_autocast(precision, model_device(model)):
                loss = loss_fn(call_model(model, inputs))
            saved = tracker.current_bytes - start
            alive = unit_outputs.alive_bytes()  # when the forward ends
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return {
        "outputs": outputs,
        "order": order,
        "loss": loss.detach(),
        "saved": saved,
        "kept": _kept(tracker.report().modules, alive),
        "engine": engine,
        "input_grads": [t.grad for t in tensors_in(inputs) if t.is_floating_point()],
    }


def _drop(_: torch.Tensor) -> None:
    return None


def _unreachable(_: Any) -> torch.Tensor:
    raise AssertionError("the floor run's graph is never run backward")


def _floor(
    model: nn.Module, example_inputs: Any, seed: int, units: list[str], precision: str = "32"
) -> dict[str, int]:
    """Per unit, what it keeps in a forward where autograd saves nothing (every saved tensor is
    dropped): what no action can free. The model's state is put back afterwards."""
    modules = dict(model.named_modules())
    unit_outputs = _UnitOutputs(units)
    handles = [
        modules[fqn].register_forward_hook(
            lambda mod, args, kwargs, out, fqn=fqn: unit_outputs.note(fqn, (args, kwargs), out),
            with_kwargs=True,
        )
        for fqn in units
    ]
    inputs = _prepared(example_inputs)
    try:
        torch.manual_seed(seed)
        with (
            preserved_state(model),
            track_memory(model, inputs) as tracker,
            torch.autograd.graph.saved_tensors_hooks(_drop, _unreachable),
            step_autocast(precision, model_device(model)),
        ):
            output = call_model(model, inputs)
            # While the model's output is alive: the forward has just ended.
            kept = _kept(tracker.report().modules, unit_outputs.alive_bytes())
            del output
    finally:
        for handle in handles:
            handle.remove()
    return kept


def _unit_checks(
    actions: dict[str, str], plain: dict[str, Any], planned: dict[str, Any], floor: dict[str, int]
) -> list[UnitCheck]:
    checks = []
    for fqn, action in actions.items():
        kind = action.split(":", 1)[0]
        before = plain["kept"].get(fqn, 0)
        allowed = before if kind == "keep" else floor.get(fqn, 0) + planned["engine"].get(fqn, 0)
        checks.append(
            UnitCheck(
                fqn=fqn,
                action=action,
                unplanned_kept_bytes=before,
                planned_kept_bytes=planned["kept"].get(fqn, 0),
                allowed_bytes=allowed,
            )
        )
    return checks


def _predicted_saving(
    model: nn.Module, example_inputs: Any, plan: Plan, loss_fn: Any, precision: str = "32"
) -> int:
    """What the plan should drop from the forward's retention, from a profile (no timing) that
    measures exactly the plan's selective and offload actions. Information only."""
    options = sorted({str(a) for a in plan.actions.values() if a.kind in ("selective", "offload")})
    prof = profile(
        model,
        _prepared(example_inputs),
        loss_fn=loss_fn,
        optimizer="none",
        repeats=0,
        units=plan.units,
        options=options,
        precision=precision,
    )
    kept = sum(u.keep_bytes - u.keep_forward_only_bytes for u in prof.units)
    planned = sum(block_cost(prof, b).persistent_delta_bytes for b in blocks_of(prof, plan))
    return kept - planned


def _first_output_mismatch(
    plain: dict[str, Any], planned: dict[str, Any], rtol: float, atol: float
) -> str | None:
    for name in plain["order"]:
        if name not in planned["outputs"]:
            continue
        a, b = plain["outputs"][name], planned["outputs"][name]
        if len(a) != len(b) or not all(_same(x, y, rtol, atol) for x, y in zip(a, b, strict=False)):
            return name
    return None


def _differing_grads(
    reference: nn.Module,
    model: nn.Module,
    plain: dict[str, Any],
    planned: dict[str, Any],
    rtol: float,
    atol: float,
) -> list[str]:
    differing = [
        name
        for (name, a), (_, b) in zip(
            reference.named_parameters(), model.named_parameters(), strict=True
        )
        if (a.grad is None) != (b.grad is None)
        or (a.grad is not None and not _same(a.grad, b.grad, rtol, atol))
    ]
    if not all(
        (a is None) == (b is None) and (a is None or _same(a, b, rtol, atol))
        for a, b in zip(plain["input_grads"], planned["input_grads"], strict=True)
    ):
        differing.append("<inputs>")
    return differing


def verify(
    model: nn.Module | Step,
    plan: Plan,
    example_inputs: Any = None,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: Any = "adamw",
    rtol: float = 0.0,
    atol: float = 0.0,
    seed: int = 0,
    precision: str | None = None,
) -> VerifyReport:
    """Compare one training step with and without ``plan``; check the plan took effect.

    Outputs, loss, gradients and buffers are compared over one forward and backward. "Applied":
    every planned unit kept no more than its action allows (:class:`UnitCheck`). The reported
    peaks are those of one full training step with ``optimizer`` (its state included), measured
    as ``remat plan`` measures its plan. The model is left as it was (no plan installed,
    parameters, buffers and gradients restored).

    Args:
        model: the model (without the plan installed), or a :class:`~remat.profiling.step.Step`
            stating the whole step (then no ``example_inputs``, ``loss_fn``, ``optimizer`` or
            ``precision`` beside it): the peaks are then of that step, its accumulation and
            capacity included, as :func:`remat.measure_plan` measures them.
        plan: the plan to check.
        example_inputs: one batch; floating inputs are made to require grad so that input
            gradients are compared too.
        loss_fn: output -> scalar loss.
        optimizer: ``"adamw"`` (default), ``"sgd"`` or ``"none"``: the step the peaks include, as
            ``remat plan --optimizer``.
        rtol, atol: tolerances; both 0 (default) means bitwise.
        seed: seed for both steps (dropout draws the same masks).
        precision: the step's precision (default: the plan's, ``plan.precision``): both steps
            run their forward under its autocast, and the peaks are of that step.

    Returns:
        A :class:`VerifyReport`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.1), nn.GELU())
        ...                         for _ in range(4)])
        >>> report = verify(model, Plan(actions={"_default": "recompute"}), (torch.randn(8, 16),))
        >>> report.grads_equal, report.buffers_equal, report.applied, report.first_mismatch
        (True, True, True, None)
        >>> [(u.fqn, u.unplanned_kept_bytes, u.planned_kept_bytes) for u in report.units][:2]
        [('0', 1024, 0), ('1', 1024, 0)]
    """
    if isinstance(model, Step):
        step = as_step(
            model, example_inputs, loss_fn=loss_fn, optimizer=optimizer, precision=precision or "32"
        )
    else:
        step = Step(
            model,
            example_inputs,
            loss_fn=loss_fn,
            optimizer=optimizer,
            precision=plan.precision if precision is None else precision,
        )
    model, example_inputs, precision = step.model, step.batch, step.precision
    loss_fn, optimizer = step.loss_fn or default_loss, step.optimizer
    check_precision(precision, model)
    with preserved_state(model):
        # Copied inside: the reference runs the step the planned model runs (a Hugging Face KV
        # cache off, which changes what a layer keeps), and the notice about it is said once.
        reference = copy.deepcopy(model)
        with apply_(model, plan) as handle:
            units = list(handle.actions)
            checkpointed, actions = handle.checkpointed, dict(handle.actions)
            planned = _run(model, example_inputs, loss_fn, seed, units, precision)
            plain = _run(reference, example_inputs, loss_fn, seed, units, precision)
            differing_grads = _differing_grads(reference, model, plain, planned, rtol, atol)
            differing_buffers = [
                name
                for (name, a), (_, b) in zip(
                    reference.named_buffers(), model.named_buffers(), strict=True
                )
                if not _same(a, b, rtol, atol)
            ]
            first_output = _first_output_mismatch(plain, planned, rtol, atol)
            # The full steps last, from no gradients as remat plan measures (the model's own are
            # put back on exit): what they draw from a generator of the model's own cannot then
            # reach the comparison above.
            for param in model.parameters():
                param.grad = None
            planned_peak = measure_plan(step)  # the plan is installed
        unplanned_peak = measure_plan(step)
    floor = _floor(reference, example_inputs, seed, units, precision) if checkpointed else {}
    checks = _unit_checks(actions, plain, planned, floor)
    predicted = (
        _predicted_saving(model, example_inputs, plan, loss_fn, precision) if checkpointed else 0
    )
    first = None
    if first_output is not None:
        first = f"output of {first_output or '<model>'}"
    elif differing_grads:
        first = f"gradient of {differing_grads[0]}"
    elif differing_buffers:
        first = f"buffer {differing_buffers[0]}"
    not_applied = [check.describe() for check in checks if not check.ok]
    return VerifyReport(
        outputs_equal=first_output is None,
        loss_equal=_same(plain["loss"], planned["loss"], rtol, atol),
        grads_equal=not differing_grads,
        buffers_equal=not differing_buffers,
        applied=not not_applied,
        first_mismatch=first,
        differing_grads=differing_grads,
        differing_buffers=differing_buffers,
        units=checks,
        not_applied=not_applied,
        predicted_saved_bytes=predicted,
        measured_saved_bytes=plain["saved"] - planned["saved"],
        unplanned_peak_bytes=unplanned_peak,
        measured_peak_bytes=planned_peak,
        optimizer=optimizer_name(optimizer, model),
        checkpointed=checkpointed,
    )
