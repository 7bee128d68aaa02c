"""One training step (forward, loss, backward, optimizer step), run the same way everywhere.

Consumes a model, example inputs, an optional loss and an optimizer name; produces the loss, or, with
:func:`measure_step`, the tracker's :class:`~remat.profiling.tracker.MemoryReport` for that step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from remat.apply.apply import kv_cache_off, warn_eval_mode
from remat.apply.units import call_model, tensors_in
from remat.profiling.target import current_target
from remat.profiling.tracker import MemoryReport, track_memory

__all__ = ["OPTIMIZERS", "default_loss", "make_optimizer", "measure_step", "training_step"]

OPTIMIZERS = ("adamw", "sgd", "none")
LossFn = Callable[[Any], torch.Tensor]


def make_optimizer(name: str | torch.optim.Optimizer | None, model: nn.Module) -> Any:
    """``"adamw"`` (two states per parameter), ``"sgd"`` (none), ``"none"`` (no step), or an
    optimizer instance passed through.

    AdamW's states are made now, zero, as its first step would make them: a measured step is then
    any step of training, whose forward and backward run with the states alive (the first step's
    peak would miss them), and the numbers computed are those of a first step all the same.

    Example:
        >>> type(make_optimizer("sgd", torch.nn.Linear(2, 2))).__name__
        'SGD'
    """
    if name is None or isinstance(name, torch.optim.Optimizer):
        return name
    params = [p for p in model.parameters() if p.requires_grad]
    target = current_target()  # estimate mode: the optimizer path the modelled device takes
    foreach = (
        {}
        if target is None or target.optimizer_foreach is None
        else {"foreach": target.optimizer_foreach}
    )
    if name == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-3, **foreach)
        _materialize_adamw_state(opt)
        return opt
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, **foreach)
    if name == "none":
        return None
    raise ValueError(f"optimizer: got {name!r}; expected one of {', '.join(OPTIMIZERS)}")


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
) -> torch.Tensor:
    """Zero gradients, run forward, loss and backward, then the optimizer step if one is given.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> loss = training_step(model, (torch.ones(4, 3),), optimizer=make_optimizer("sgd", model))
        >>> loss.shape
        torch.Size([])
    """
    for param in model.parameters():
        param.grad = None
    output = call_model(model, example_inputs)
    loss = (loss_fn or default_loss)(output)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return loss.detach()


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Put the model's parameters, buffers and gradients back as they were on exit, so that
    measuring or profiling training steps does not train the model; inside, the model runs as it
    trains under a plan: a Hugging Face KV cache is off (:func:`remat.apply.apply.kv_cache_off`).
    A model in eval mode is warned about once: its step is not the training step.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> before = model.weight.detach().clone()
        >>> with preserved_state(model):
        ...     _ = training_step(model, (torch.ones(1, 2),), optimizer=make_optimizer("sgd", model))
        >>> torch.equal(model.weight, before), model.weight.grad is None
        (True, True)
    """
    warn_eval_mode(model)
    tensors = [*model.parameters(), *model.buffers()]
    saved = [t.detach().clone() for t in tensors]
    grads = [p.grad for p in model.parameters()]
    try:
        with kv_cache_off(model):
            yield
    finally:
        with torch.no_grad():
            for tensor, value in zip(tensors, saved, strict=True):
                tensor.copy_(value)
        for param, grad in zip(model.parameters(), grads, strict=True):
            param.grad = grad


def measure_step(
    model: nn.Module,
    example_inputs: Any,
    *,
    loss_fn: LossFn | None = None,
    optimizer: str | torch.optim.Optimizer | None = "adamw",
    time_ops: bool = False,
) -> MemoryReport:
    """Run one training step under the tracker and return its report.

    The optimizer (if any) is created before the tracker is entered; its states are created inside
    the step, as in the first step of training, so the step's peak includes them. The model's
    parameters, buffers and gradients are put back afterwards: measuring does not train it.

    Example:
        >>> model = torch.nn.Linear(8, 8, bias=False)
        >>> report = measure_step(model, (torch.ones(4, 8),), optimizer="sgd")
        >>> report.static_bytes, report.peak_by_category["gradient"]
        (384, 256)
    """
    opt = make_optimizer(optimizer, model)
    roots = [model, example_inputs] + ([opt] if opt is not None else [])
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with (
        preserved_state(model),
        track_memory(
            *roots, device="cuda" if device.type == "cuda" else None, time_ops=time_ops
        ) as tracker,
    ):
        training_step(model, example_inputs, loss_fn=loss_fn, optimizer=opt)
    return tracker.report()
