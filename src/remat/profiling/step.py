"""One training step (forward, loss, backward, optimizer step), run the same way everywhere.

Consumes a model, example inputs, an optional loss, an optimizer name and a precision; produces the
loss, or, with :func:`measure_step`, the tracker's :class:`~remat.profiling.tracker.MemoryReport`
for that step.

Precision, by Lightning's names (:data:`remat.plan.PRECISIONS`): ``"32"`` runs as the model is;
``"bf16-mixed"`` and ``"fp16-mixed"`` run the forward and the loss under
``torch.autocast(device_type, dtype)`` and the backward outside it, as ``torch.amp`` recommends, and
``"fp16-mixed"`` scales the loss with a ``torch.amp.GradScaler`` (it exists for the CPU as well);
``"bf16-true"`` runs a model whose parameters are already ``bfloat16``, without autocast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from remat.apply.apply import kv_cache_off, warn_eval_mode
from remat.apply.units import call_model, tensors_in
from remat.plan import PRECISIONS
from remat.profiling.target import current_target
from remat.profiling.tracker import (
    MemoryReport,
    current_capacity,
    simulated_capacity,
    track_memory,
)

__all__ = [
    "OPTIMIZERS",
    "PRECISIONS",
    "Step",
    "accumulating",
    "as_step",
    "backward_and_step",
    "check_optimizer",
    "check_precision",
    "current_accumulation",
    "default_loss",
    "make_optimizer",
    "make_scaler",
    "measure_step",
    "model_device",
    "optimizer_name",
    "optimizer_state_bytes",
    "step_autocast",
    "training_step",
]

OPTIMIZERS = ("adamw", "sgd", "none")
LossFn = Callable[[Any], torch.Tensor]
MIXED_DTYPES = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}
"""The autocast dtype of each mixed precision."""


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def check_precision(precision: str, model: nn.Module) -> None:
    """Refuse a precision remat cannot run the model's step in.

    Raises:
        ValueError: an unknown name; ``bf16-true`` for a model with a floating-point parameter
            that is not ``bfloat16``; a mixed precision on ``meta`` (autocast casts nothing
            there).

    Example:
        >>> check_precision("bf16-mixed", torch.nn.Linear(2, 2))
        >>> check_precision("bf16-true", torch.nn.Linear(2, 2))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: precision 'bf16-true': got parameter 'weight' in float32 ...
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: got {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "bf16-true":
        wrong = [
            (name, p.dtype)
            for name, p in model.named_parameters()
            if p.is_floating_point() and p.dtype != torch.bfloat16
        ]
        if wrong:
            name, dtype = wrong[0]
            raise ValueError(
                f"precision 'bf16-true': got parameter {name!r} in"
                f" {str(dtype).replace('torch.', '')} ({len(wrong)} parameters not bfloat16);"
                " expected every floating-point parameter in bfloat16. Fix: call"
                " model.to(torch.bfloat16) before planning, or use precision='bf16-mixed'"
            )
    if precision in MIXED_DTYPES and model_device(model).type == "meta":
        raise ValueError(
            f"precision {precision!r}: got a model on meta, where torch.autocast casts nothing;"
            " expected a model on cpu or cuda. Fix: profile on the CPU (bf16 and fp16 autocast"
            " run there), or plan a model already in the low dtype with precision='32'"
        )


def step_autocast(precision: str, device: torch.device | str) -> AbstractContextManager[Any]:
    """The autocast the forward and loss of a step in ``precision`` run under on ``device``
    (nothing for ``32`` and ``bf16-true``).

    Example:
        >>> with step_autocast("bf16-mixed", "cpu"):
        ...     torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype
        torch.bfloat16
    """
    dtype = MIXED_DTYPES.get(precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def make_scaler(precision: str, device: torch.device | str) -> Any:
    """A ``torch.amp.GradScaler`` for ``fp16-mixed`` on ``device`` (CPU included), else ``None``.

    Example:
        >>> make_scaler("fp16-mixed", "cpu") is not None, make_scaler("bf16-mixed", "cpu")
        (True, None)
    """
    if precision != "fp16-mixed":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


OptimizerSpec = str | torch.optim.Optimizer | Callable[[Any], torch.optim.Optimizer] | None
"""``"adamw"``, ``"sgd"``, ``"none"``, an optimizer instance, or a factory ``params -> optimizer``."""


def check_optimizer(spec: Any) -> None:
    """Refuse what is not an optimizer name, instance or factory.

    Example:
        >>> check_optimizer(lambda params: torch.optim.SGD(params, lr=0.1))
        >>> check_optimizer("adam")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: optimizer: got 'adam'; expected ...
    """
    if spec is None or isinstance(spec, torch.optim.Optimizer) or callable(spec):
        return
    if isinstance(spec, str) and spec in OPTIMIZERS:
        return
    raise ValueError(
        f"optimizer: got {spec!r}; expected one of {', '.join(OPTIMIZERS)}, a torch.optim"
        " optimizer instance, or a factory params -> optimizer (e.g. lambda p:"
        " torch.optim.Adam(p, lr=1e-3))"
    )


def optimizer_name(spec: OptimizerSpec, model: nn.Module) -> str:
    """How a profile records the optimizer: the shortcut's name, else the class name.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> optimizer_name("sgd", model), optimizer_name(torch.optim.RMSprop(model.parameters()), model)
        ('sgd', 'RMSprop')
    """
    if spec is None or isinstance(spec, str):
        return spec or "none"
    if isinstance(spec, torch.optim.Optimizer):
        return type(spec).__name__
    return type(make_optimizer(spec, model)).__name__


def make_optimizer(spec: OptimizerSpec, model: nn.Module) -> Any:
    """The optimizer a measured step runs, its state made: never the user's own.

    - ``"adamw"``: AdamW (lr 1e-3), its two moments made now, zero, as its first step would
      make them (that step then computes exactly what it computes from scratch);
    - ``"sgd"`` (no state), ``"none"`` / ``None`` (no step);
    - an optimizer instance: a new one of its class with its param groups' hyperparameters, over
      the same parameters (the instance and its state are not touched);
    - a factory: called with the model's trainable parameters.

    The state of an instance's or a factory's optimizer is made by one step of its own with zero
    gradients, the parameters put back afterwards: a measured step is then any step of training,
    whose forward and backward run with the state alive.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> type(make_optimizer("sgd", model)).__name__
        'SGD'
        >>> mine = torch.optim.Adam(model.parameters(), lr=0.5)
        >>> made = make_optimizer(mine, model)
        >>> made is mine, made.param_groups[0]["lr"], len(made.state), len(mine.state)
        (False, 0.5, 2, 0)
    """
    check_optimizer(spec)
    if spec is None or spec == "none":
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(spec, torch.optim.Optimizer):
        groups = [
            {**{k: v for k, v in group.items() if k != "params"}, "params": list(group["params"])}
            for group in spec.param_groups
        ]
        opt = type(spec)(groups)
    elif not isinstance(spec, str):
        opt = spec(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise ValueError(
                f"optimizer: the factory returned {type(opt).__name__}; expected a"
                " torch.optim.Optimizer built over the parameters it is given"
            )
    else:
        target = current_target()  # estimate mode: the optimizer path the modelled device takes
        foreach = (
            {}
            if target is None or target.optimizer_foreach is None
            else {"foreach": target.optimizer_foreach}
        )
        if spec == "adamw":
            opt = torch.optim.AdamW(params, lr=1e-3, **foreach)
            _materialize_adamw_state(opt)
        else:
            opt = torch.optim.SGD(params, lr=1e-3, **foreach)
        return _held_still(opt)
    _held_still(opt)
    _materialize_by_step(opt)
    return opt


LR_EXACT = tuple(
    getattr(torch.optim, name)
    for name in (
        "Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adafactor", "Adamax", "NAdam", "RAdam",
        "ASGD", "Adadelta",
    )
    if hasattr(torch.optim, name)
)  # fmt: skip
"""torch.optim's optimizers whose step with learning rate 0 leaves every parameter's value as
it was (weight decay is scaled by the learning rate too; checked in the tests). Rprop is not
one: its step sizes do not follow the learning rate once they adapt."""

_STILL: ContextVar[bool] = ContextVar("remat_parameters_still", default=False)


def _held_still(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Inside :func:`preserved_state` for an optimizer of :data:`LR_EXACT`: learning rate 0,
    so its step runs the same kernels on the same memory and moves no parameter, and non-finite
    gradients zeroed before it (``0 * nan`` would be ``nan``)."""
    if not _STILL.get():
        return opt
    if type(opt) not in LR_EXACT:
        raise RuntimeError(
            f"remat: preserved_state was told the optimizer holds still, but it is"
            f" {type(opt).__name__}; pass the same optimizer to both"
        )
    for group in opt.param_groups:
        lr = group.get("lr")
        group["lr"] = torch.zeros_like(lr) if isinstance(lr, torch.Tensor) else 0.0
    opt.register_step_pre_hook(_zero_non_finite_grads)
    return opt


def _zero_non_finite_grads(opt: torch.optim.Optimizer, *_: Any) -> None:
    with torch.no_grad():
        for group in opt.param_groups:
            for param in group["params"]:
                grad = param.grad
                if grad is not None and grad.device.type != "meta":
                    torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)


def _materialize_by_step(opt: torch.optim.Optimizer) -> None:
    """Make ``opt``'s state with one step of its own on zero gradients, then put the parameters
    and gradients back as they were (weight decay and momentum would move them)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    grads = [p.grad for p in params]
    with torch.no_grad():
        # held still (learning rate 0), the step moves nothing: no copy of the parameters
        saved = None if _STILL.get() else [p.detach().clone() for p in params]
        for param in params:
            param.grad = torch.zeros_like(param)
        opt.step()
        for index, (param, grad) in enumerate(zip(params, grads, strict=True)):
            if saved is not None:
                param.copy_(saved[index])
            param.grad = grad


def optimizer_state_bytes(opt: torch.optim.Optimizer | None) -> int:
    """Bytes of the optimizer's state on its parameters' devices, each storage counted once;
    scalar step counters (0-dim, a few bytes, kept on the host on CUDA) are left out.

    Example:
        >>> model = torch.nn.Linear(4, 4, bias=False)
        >>> optimizer_state_bytes(make_optimizer("adamw", model))  # two moments of 16 floats
        128
    """
    if opt is None:
        return 0
    storages: dict[int, int] = {}
    for group in opt.param_groups:
        for param in group["params"]:
            for value in opt.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    if value.device == param.device:
                        storage = value.untyped_storage()
                        storages[id(storage)] = storage.nbytes()
    return sum(storages.values())


def _materialize_adamw_state(opt: torch.optim.Optimizer) -> None:
    """Fill AdamW's per-parameter state as its first ``step`` would (``step`` 0, zero moments);
    that step then finds the state and computes exactly what it computes from scratch."""
    for group in opt.param_groups:
        for param in group["params"]:
            state = opt.state[param]
            if state:
                continue
            state["step"] = (
                torch.zeros((), dtype=torch.float32, device=param.device)
                if group.get("capturable") or group.get("fused")
                else torch.tensor(0.0, dtype=torch.float32, device="cpu")  # as AdamW's own
            )
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(
                    param, memory_format=torch.preserve_format
                )


def default_loss(output: Any) -> torch.Tensor:
    """The loss used when none is given: the output if it is a scalar; the ``loss`` of a mapping or
    object that carries a scalar one (Hugging Face's ``ModelOutput`` when labels are passed); else
    the sum of the means of its floating-point tensors.

    Example:
        >>> out = (torch.ones(2, 2, requires_grad=True), torch.zeros(3, requires_grad=True))
        >>> default_loss(out).item()
        1.0
        >>> default_loss({"loss": torch.tensor(0.5), "logits": torch.ones(2, 3)}).item()
        0.5
    """
    if isinstance(output, torch.Tensor) and output.dim() == 0:
        return output
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.dim() == 0:
        return loss
    floats = [t for t in tensors_in(output) if t.is_floating_point() and t.requires_grad]
    if not floats:
        raise ValueError(
            "loss: the model's output holds no floating-point tensor that requires grad; pass"
            " loss_fn= (a function from the output to a scalar loss)"
        )
    return sum((t.float().mean() for t in floats[1:]), floats[0].float().mean())


def training_step(
    model: nn.Module,
    example_inputs: Any,
    *,
    loss_fn: LossFn | None = None,
    optimizer: Any = None,
    precision: str = "32",
    scaler: Any = None,
) -> torch.Tensor:
    """Zero gradients, run forward, loss and backward, then the optimizer step if one is given.
    Within :func:`accumulating`, the step is the last micro-batch of an accumulation instead:
    the gradients are alive (zero) from the start, and backward adds into them.

    Under a mixed ``precision`` the forward and the loss run under :func:`step_autocast`, the
    backward outside it; ``fp16-mixed`` scales the loss with ``scaler`` (a new
    :func:`make_scaler` when ``None``) and steps through it.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> loss = training_step(model, (torch.ones(4, 3),), optimizer=make_optimizer("sgd", model))
        >>> loss.shape
        torch.Size([])
        >>> training_step(model, (torch.ones(4, 3),), precision="bf16-mixed").dtype
        torch.float32
    """
    if _ACCUMULATING.get() > 1:
        _gradients_alive(model)
    else:
        for param in model.parameters():
            param.grad = None
    device = model_device(model)
    with step_autocast(precision, device):
        output = call_model(model, example_inputs)
        loss = (loss_fn or default_loss)(output)
    backward_and_step(loss, optimizer, precision=precision, scaler=scaler, device=device)
    return loss.detach()


_ACCUMULATING: ContextVar[int] = ContextVar("remat_accumulating", default=1)


def current_accumulation() -> int:
    """The micro-batches of the enclosing :func:`accumulating` (1 outside any)."""
    return _ACCUMULATING.get()


@contextmanager
def accumulating(accumulation_steps: int) -> Iterator[None]:
    """Within, every step measured or profiled is the worst micro-batch of gradient
    accumulation over ``accumulation_steps`` micro-batches (1: no accumulation): the last one,
    whose forward and backward run with the gradients of the ones before alive, followed by the
    optimizer step. Its peak is the accumulated step's peak: the first micro-batch has no
    gradients in its forward, and the ones between hold the same and take no optimizer step.

    Example:
        >>> model = torch.nn.Linear(8, 8, bias=False)  # 256 bytes of weights, 256 of gradients
        >>> measure_step(model, (torch.ones(4, 8),), optimizer="sgd").peak_bytes
        904
        >>> with accumulating(4):  # the gradients alive, and the next one's beside them
        ...     measure_step(model, (torch.ones(4, 8),), optimizer="sgd").peak_bytes
        1160
    """
    if (
        isinstance(accumulation_steps, bool)
        or not isinstance(accumulation_steps, int)
        or accumulation_steps < 1
    ):
        raise ValueError(
            f"accumulation_steps: got {accumulation_steps!r}; expected an integer >= 1 (the"
            " micro-batches whose gradients add up before each optimizer step; 1: none)"
        )
    token = _ACCUMULATING.set(accumulation_steps if accumulation_steps > 1 else _ACCUMULATING.get())
    try:
        yield
    finally:
        _ACCUMULATING.reset(token)


def _gradients_alive(model: nn.Module) -> None:
    """Every trainable parameter's gradient alive, as after the micro-batches before: zero."""
    with torch.no_grad():
        for param in model.parameters():
            if not param.requires_grad:
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            else:
                param.grad.zero_()


def backward_and_step(
    loss: torch.Tensor,
    optimizer: Any,
    *,
    precision: str = "32",
    scaler: Any = None,
    device: torch.device | str = "cpu",
) -> None:
    """The second half of :func:`training_step`: backward (loss scaled for ``fp16-mixed``), then
    the optimizer step if one is given (through the scaler for ``fp16-mixed``).

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> backward_and_step(model(torch.ones(2, 3)).sum(), None)
        >>> model.weight.grad.shape
        torch.Size([1, 3])
    """
    if scaler is None:
        scaler = make_scaler(precision, device)
    if scaler is None:
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return
    scaler.scale(loss).backward()
    if optimizer is not None:
        scaler.step(optimizer)
        scaler.update()


class Preserved:
    """What :func:`preserved_state` holds while it is entered."""

    def __init__(self, held_bytes: int) -> None:
        self.held_bytes = held_bytes
        """Bytes it keeps on the model's device beside the model: its copies of parameters and
        buffers (none on CUDA, whose copies go to host memory; none on ``meta``) and the
        gradients the model had, kept to be put back."""


@contextmanager
def preserved_state(
    model: nn.Module, optimizer: OptimizerSpec | object = ...
) -> Iterator[Preserved]:
    """Put the model's parameters, buffers and gradients back as they were on exit, so that
    measuring or profiling training steps does not train the model; inside, the model runs as it
    trains under a plan: a Hugging Face KV cache is off (:func:`remat.apply.apply.kv_cache_off`).
    A model in eval mode is warned about once: its step is not the training step.

    ``optimizer``, the one the steps inside will run (:func:`make_optimizer` makes them): when it
    is ``"adamw"``, ``"sgd"``, ``"none"`` or an instance of :data:`LR_EXACT`, the optimizers made
    inside run with learning rate 0 and move no parameter, so the parameters are not copied
    (only any holding a negative zero, whose sign such a step may flip). Otherwise (a factory, or
    not given) every parameter is copied, in host memory for a CUDA model's, so the device holds
    no more than the step. Buffers are always copied.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> before = model.weight.detach().clone()
        >>> with preserved_state(model, "sgd") as kept:
        ...     _ = training_step(model, (torch.ones(1, 2),), optimizer=make_optimizer("sgd", model))
        >>> torch.equal(model.weight, before), model.weight.grad is None, kept.held_bytes
        (True, True, 0)
    """
    warn_eval_mode(model)
    still = optimizer is not ... and _holds_still(optimizer)
    tensors = [*model.buffers()] + [
        p for p in model.parameters() if not still or _has_negative_zero(p)
    ]
    saved = [_host_copy(t) for t in tensors]
    grads = [p.grad for p in model.parameters()]
    held = sum(c.untyped_storage().nbytes() for c in saved if c.device.type == "cpu")
    held *= all(t.device.type == "cpu" for t in tensors)  # else the copies left the device
    held += sum(g.untyped_storage().nbytes() for g in grads if g is not None)
    token = _STILL.set(still)
    try:
        with kv_cache_off(model):
            yield Preserved(held)
    finally:
        _STILL.reset(token)
        with torch.no_grad():
            for tensor, value in zip(tensors, saved, strict=True):
                tensor.copy_(value)
        for param, grad in zip(model.parameters(), grads, strict=True):
            param.grad = grad


def _holds_still(optimizer: OptimizerSpec | object) -> bool:
    """Whether the optimizers :func:`make_optimizer` makes for ``optimizer`` can step with
    learning rate 0 and leave every parameter as it was."""
    if optimizer is None or optimizer in OPTIMIZERS:
        return True
    return isinstance(optimizer, torch.optim.Optimizer) and type(optimizer) in LR_EXACT


def _has_negative_zero(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds a ``-0.0`` (a step with learning rate 0 may make it ``+0.0``);
    read in slices, so the check holds little memory. ``meta`` holds no values: ``False``; a
    tensor whose values cannot be read here (fake, or a sharded ``DTensor``): ``True``."""
    if tensor.device.type == "meta" or not tensor.is_floating_point():
        return False
    try:
        flat = tensor.detach().reshape(-1)
        for start in range(0, flat.numel(), 1 << 22):
            part = flat[start : start + (1 << 22)]
            if bool(((part == 0) & torch.signbit(part)).any()):
                return True
    except RuntimeError:  # values that cannot be read here (fake, sharded): copy it, to be safe
        return True
    return False


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` that leaves its device's memory alone: in host memory for an
    accelerator's tensor, beside it for the CPU's and ``meta``'s."""
    tensor = tensor.detach()
    if tensor.device.type in ("cpu", "meta"):
        return tensor.clone()
    return tensor.to("cpu", copy=True)


def measure_step(
    model: nn.Module,
    example_inputs: Any,
    *,
    loss_fn: LossFn | None = None,
    optimizer: OptimizerSpec = "adamw",
    time_ops: bool = False,
    precision: str = "32",
    accumulation_steps: int = 1,
) -> MemoryReport:
    """Run one training step under the tracker and return its report.

    ``precision``: as :func:`training_step` (the forward under autocast for a mixed one).
    ``accumulation_steps``: more than 1 measures the last micro-batch of a gradient accumulation
    (:func:`accumulating`), whose peak is the accumulated step's.

    The optimizer (if any) is made by :func:`make_optimizer` before the tracker is entered, its
    state made with it (zero, as training's first step makes it): the step measured is any step of
    training, whose forward and backward run with the state alive, and the tracker counts the state
    among the step's static bytes. The model's parameters, buffers and gradients are put back
    afterwards: measuring does not train it.

    Example:
        >>> model = torch.nn.Linear(8, 8, bias=False)
        >>> report = measure_step(model, (torch.ones(4, 8),), optimizer="sgd")
        >>> report.static_bytes, report.peak_by_category["gradient"]
        (384, 256)
    """
    check_precision(precision, model)
    device = model_device(model)
    with accumulating(accumulation_steps), preserved_state(model, optimizer):
        opt = make_optimizer(optimizer, model)
        roots = [model, example_inputs] + ([opt] if opt is not None else [])
        tracker = track_memory(
            *roots, device="cuda" if device.type == "cuda" else None, time_ops=time_ops
        )
        with tracker:
            training_step(
                model, example_inputs, loss_fn=loss_fn, optimizer=opt, precision=precision
            )
    return tracker.report()


def _check_count(name: str, value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: got {value!r}; expected an integer >= 1 ({what})")


@dataclass(frozen=True)
class Step:
    """One training step as it runs: what every entry point profiles, plans and measures.

    :func:`remat.auto_`, :func:`remat.profile_step`, :func:`remat.plan_step`,
    :func:`remat.bench`, :func:`remat.verify`, fit prediction and ``remat plan`` all take one
    (or build one from the same keyword arguments), so a property of the step is stated once.

    Attributes:
        model: the model, on the device it trains on (``meta`` for shapes alone).
        batch: one batch: a tuple of positional arguments, a dict of keyword arguments, or one
            object. With ``world_size`` > 1, one rank's batch.
        loss_fn: output -> scalar loss (default: :func:`default_loss`).
        optimizer: ``"adamw"``, ``"sgd"``, ``"none"``, a ``torch.optim.Optimizer`` instance or a
            factory ``params -> Optimizer``; its own step makes its state (never the real one).
        precision: ``"32"``, ``"bf16-mixed"``, ``"fp16-mixed"`` or ``"bf16-true"``.
        accumulation_steps: micro-batches whose gradients add up before each optimizer step.
        world_size, fsdp: one of ``world_size`` data-parallel ranks, under DDP or FSDP2.
        target: where it is measured: ``None`` on the model's own device (``meta``: shapes
            alone), or a device name from :mod:`remat.devices` (``"h100-80gb"``): estimated
            from shapes for that device, its kernels and a roofline.
        dtype, attention: the estimate's parameter dtype and attention kernel (with ``target``).
        capacity_bytes: the device's memory, simulated (see
            :func:`~remat.profiling.tracker.simulated_capacity`); default: none, or that of an
            enclosing ``simulated_capacity``.
        units: what plans may act on (see :func:`remat.find_units`).
        compile: the ``torch.compile`` backend the planned step will run under, each unit compiled
            with :func:`remat.compile_units_` (``True``: ``"inductor"``; default ``None``: eager).
            Profiling then times the compiled path (:mod:`remat.profiling.compiled`), and plans
            use keep, recompute and selective, the actions the compiler applies.

    Example:
        >>> step = Step(torch.nn.Linear(8, 8, bias=False), (torch.ones(4, 8),), optimizer="sgd",
        ...             accumulation_steps=4)
        >>> with step.context():
        ...     measure_step(step.model, step.batch, optimizer=step.optimizer).peak_bytes
        1160
        >>> Step(torch.nn.Linear(8, 8), (torch.ones(4, 8),), precision="bf16")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: precision: got 'bf16'; expected one of 32, bf16-mixed, ...
    """

    model: nn.Module
    batch: Any
    loss_fn: LossFn | None = None
    optimizer: Any = "adamw"
    precision: str = "32"
    accumulation_steps: int = 1
    world_size: int = 1
    fsdp: bool = False
    target: str | None = None
    dtype: str | torch.dtype | None = None
    attention: str = "auto"
    capacity_bytes: int | None = None
    units: Any = None
    compile: str | bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise ValueError(f"model: got {type(self.model).__name__}; expected a torch.nn.Module")
        if self.batch is None:
            raise ValueError(
                "batch: got None; expected one batch the model takes (a tuple of positional"
                " arguments, a dict of keyword arguments, or one tensor). Fix: pass it, e.g."
                " remat.auto_(model, (x,), budget=...) or remat.Step(model, {'input_ids': ids})"
            )
        check_optimizer(self.optimizer)
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision: got {self.precision!r}; expected one of {', '.join(PRECISIONS)}"
            )
        _check_count("accumulation_steps", self.accumulation_steps, "1: no accumulation")
        _check_count("world_size", self.world_size, "the number of data-parallel ranks")
        if self.capacity_bytes is not None:
            _check_count("capacity_bytes", self.capacity_bytes, "the simulated device memory")
        if self.target is None and (self.dtype is not None or self.attention != "auto"):
            raise ValueError(
                "dtype, attention: given without a target; expected them only with"
                " target='<device name>' (an estimate), as the model is measured where it is."
                " Fix: pass target='h100-80gb' (remat.devices.DEVICES), or drop them"
            )
        self._check_compile()

    def _check_compile(self) -> None:
        """``compile``: ``True`` is ``"inductor"``, ``False`` is ``None``; only where measured."""
        backend = self.compile
        if isinstance(backend, bool):
            backend = "inductor" if backend else None
        if backend is not None and (not isinstance(backend, str) or not backend):
            raise ValueError(
                f"compile: got {self.compile!r}; expected True, False, None or a torch.compile"
                " backend name ('inductor', 'aot_eager')"
            )
        if backend is not None and self.target is not None:
            raise ValueError(
                f"compile: got {backend!r} with target={self.target!r}; expected compile only for"
                " a step measured where its model is (an estimate runs no compiled kernels)."
                " Fix: drop compile, or target"
            )
        object.__setattr__(self, "compile", backend)

    @property
    def estimated(self) -> bool:
        """Whether the step is estimated for ``target`` rather than measured where it is."""
        return self.target is not None

    @contextmanager
    def context(self) -> Iterator[None]:
        """Within: the step's simulated capacity and gradient accumulation hold for every step
        measured or profiled (what :func:`measure_step` and :func:`remat.profile` read)."""
        capacity = self.capacity_bytes if self.capacity_bytes is not None else current_capacity()
        with ExitStack() as stack:
            stack.enter_context(simulated_capacity(capacity))
            stack.enter_context(accumulating(self.accumulation_steps))
            yield

    def replace(self, **changes: Any) -> Step:
        """A copy with ``changes`` (``step.replace(batch=larger)``), validated again."""
        return dataclasses.replace(self, **changes)


_STEP_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Step) if f.name != "model"}


def as_step(model: nn.Module | Step, batch: Any = None, **fields: Any) -> Step:
    """``model`` if it is a :class:`Step`, else ``Step(model, batch, **fields)``: how the entry
    points take either a Step or the model, batch and keyword arguments they always took.

    Raises:
        ValueError: a Step given with a batch or with a field that differs from its default
            (state it on the Step instead).

    Example:
        >>> step = as_step(torch.nn.Linear(2, 2), (torch.ones(1, 2),), optimizer="sgd")
        >>> as_step(step) is step, step.optimizer
        (True, 'sgd')
    """
    if not isinstance(model, Step):
        return Step(model, batch, **fields)
    given = [
        name
        for name, value in fields.items()
        if value is not _STEP_DEFAULTS.get(name) and value != _STEP_DEFAULTS.get(name)
    ]
    if batch is not None or given:
        names = ", ".join((["batch"] if batch is not None else []) + given)
        raise ValueError(
            f"{names}: got beside a Step; expected them on the Step, which describes the whole"
            f" step. Fix: step.replace({names.split(', ')[0]}=...)"
        )
    return model
