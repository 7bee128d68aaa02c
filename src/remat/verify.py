"""``remat.verify``: does a plan leave training unchanged, and did it take effect?

Consumes a model, a plan and example inputs; produces a :class:`VerifyReport`. One training step runs
on a copy of the model without the plan and one on the model with it, from the same seed: outputs of
every module, the loss, the gradient of every parameter and input, and every buffer are compared
(bitwise by default). The first module whose output differs (or, failing that, the first parameter
whose gradient does) is named. "Applied" means the bytes the forward leaves for backward fell by what
the plan predicts (within 5%): a plan that silently did nothing fails it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from remat import _compat
from remat.apply.apply import apply_
from remat.apply.units import call_model, tensors_in
from remat.cost.model import block_cost, blocks_of
from remat.plan import Plan
from remat.profiling.profiler import profile
from remat.profiling.step import default_loss, preserved_state
from remat.profiling.tracker import track_memory

__all__ = ["VerifyReport", "verify"]

APPLIED_TOLERANCE = 0.05


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
    """The forward's saved bytes fell as predicted (within 5%)."""
    first_mismatch: str | None = None
    """"output of blocks.3", "gradient of blocks.3.fc.weight", "buffer bn.running_mean", or None."""
    differing_grads: list[str] = field(default_factory=list)
    differing_buffers: list[str] = field(default_factory=list)
    predicted_saved_bytes: int = 0
    """Bytes the plan should drop from what the forward leaves for backward."""
    measured_saved_bytes: int = 0
    unplanned_peak_bytes: int = 0
    measured_peak_bytes: int = 0
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
        return {**asdict(self), "ok": self.ok}


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


def _run(
    model: nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor],
    seed: int,
) -> dict[str, Any]:
    """One forward and backward, recording module outputs, the forward's saved bytes and the peak."""
    outputs: dict[str, list[torch.Tensor]] = {}
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():

        def hook(mod: nn.Module, args: Any, output: Any, name: str = name) -> None:
            if name not in outputs and torch.is_grad_enabled():
                # Outside the dispatch modes: the copies are not the model's ops (a selective
                # unit numbers its ops, and its replay, which skips this hook, must match).
                with _compat.no_dispatch_modes():
                    outputs[name] = [t.detach().clone() for t in tensors_in(output)]
                order.append(name)

        handles.append(module.register_forward_hook(hook))
    inputs = _prepared(example_inputs)
    for param in model.parameters():
        param.grad = None
    try:
        torch.manual_seed(seed)
        with track_memory(model, inputs) as tracker:
            start = tracker.current_bytes
            loss = loss_fn(call_model(model, inputs))
            saved = tracker.current_bytes - start
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return {
        "outputs": outputs,
        "order": order,
        "loss": loss.detach(),
        "saved": saved,
        "peak": tracker.peak_bytes,
        "input_grads": [t.grad for t in tensors_in(inputs) if t.is_floating_point()],
    }


def _predicted_saving(model: nn.Module, example_inputs: Any, plan: Plan, loss_fn: Any) -> int:
    """What the plan should drop from the forward's retention, from a profile (no timing) that
    measures exactly the plan's selective and offload actions."""
    options = sorted({str(a) for a in plan.actions.values() if a.kind in ("selective", "offload")})
    prof = profile(
        model,
        _prepared(example_inputs),
        loss_fn=loss_fn,
        optimizer="none",
        repeats=0,
        units=plan.units,
        options=options,
    )
    kept = sum(u.keep_bytes - u.keep_forward_only_bytes for u in prof.units)
    planned = sum(block_cost(prof, b).persistent_delta_bytes for b in blocks_of(prof, plan))
    return kept - planned


def verify(
    model: nn.Module,
    plan: Plan,
    example_inputs: Any,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    rtol: float = 0.0,
    atol: float = 0.0,
    seed: int = 0,
) -> VerifyReport:
    """Compare one training step with and without ``plan``; check the plan took effect.

    The model is left as it was (no plan installed, parameters and gradients restored).

    Args:
        model: the model (without the plan installed).
        plan: the plan to check.
        example_inputs: one batch; floating inputs are made to require grad so that input
            gradients are compared too.
        loss_fn: output -> scalar loss.
        rtol, atol: tolerances; both 0 (default) means bitwise.
        seed: seed for both steps (dropout draws the same masks).

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
    """
    loss_fn = loss_fn or default_loss
    reference = copy.deepcopy(model)
    with preserved_state(model):
        plain = _run(reference, example_inputs, loss_fn, seed)
        with apply_(model, plan) as handle:
            planned = _run(model, example_inputs, loss_fn, seed)
            checkpointed = handle.checkpointed
        differing_grads = [
            name
            for (name, a), (_, b) in zip(
                reference.named_parameters(), model.named_parameters(), strict=True
            )
            if (a.grad is None) != (b.grad is None)
            or (a.grad is not None and not _same(a.grad, b.grad, rtol, atol))
        ]
        input_grads_equal = all(
            (a is None) == (b is None) and (a is None or _same(a, b, rtol, atol))
            for a, b in zip(plain["input_grads"], planned["input_grads"], strict=True)
        )
        if not input_grads_equal:
            differing_grads.append("<inputs>")
        differing_buffers = [
            name
            for (name, a), (_, b) in zip(
                reference.named_buffers(), model.named_buffers(), strict=True
            )
            if not _same(a, b, rtol, atol)
        ]
        first_output = next(
            (
                name
                for name in plain["order"]
                if name in planned["outputs"]
                and (
                    len(plain["outputs"][name]) != len(planned["outputs"][name])
                    or not all(
                        _same(a, b, rtol, atol)
                        for a, b in zip(
                            plain["outputs"][name], planned["outputs"][name], strict=False
                        )
                    )
                )
            ),
            None,
        )
    predicted = _predicted_saving(model, example_inputs, plan, loss_fn) if checkpointed else 0
    measured = plain["saved"] - planned["saved"]
    applied = (
        abs(measured - predicted) <= APPLIED_TOLERANCE * max(predicted, 1)
        if checkpointed
        else measured == 0
    )
    first = None
    if first_output is not None:
        first = f"output of {first_output or '<model>'}"
    elif differing_grads:
        first = f"gradient of {differing_grads[0]}"
    elif differing_buffers:
        first = f"buffer {differing_buffers[0]}"
    return VerifyReport(
        outputs_equal=first_output is None,
        loss_equal=_same(plain["loss"], planned["loss"], rtol, atol),
        grads_equal=not differing_grads,
        buffers_equal=not differing_buffers,
        applied=applied,
        first_mismatch=first,
        differing_grads=differing_grads,
        differing_buffers=differing_buffers,
        predicted_saved_bytes=predicted,
        measured_saved_bytes=measured,
        unplanned_peak_bytes=plain["peak"],
        measured_peak_bytes=planned["peak"],
        checkpointed=checkpointed,
    )
