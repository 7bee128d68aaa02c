"""Transformers models on ``meta``: the value reads of their mask code answered as for a full batch.

Split from :mod:`remat.integrations.hf` (which re-exports :func:`prepare_meta`) so that estimate
mode (:mod:`remat.profiling.meta_target`) can ready a transformers model without importing the
Trainer callback, which imports the planning pipeline. transformers itself is never imported here:
only a model of an already loaded transformers is readied.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["prepare_meta"]


_VALUE_READS = {
    torch.Tensor.__bool__: "bool()",
    torch.Tensor.item: "Tensor.item()",
    torch.Tensor.tolist: "Tensor.tolist()",
    torch.Tensor.__int__: "int()",
    torch.Tensor.__float__: "float()",
    torch.Tensor.__index__: "an index",
}
_MASK_CODE = "transformers.masking_utils"
"""The module whose value reads ask whether the batch is full (``padding_mask.all()``: no padding,
the mask may be skipped; ``(...).all()`` on the positions: no packed sequences)."""


def _reader() -> str:
    """The module (``__name__``) of the code that read a value: the first frame outside torch and
    this file."""
    frame = inspect.currentframe()
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name != __name__ and not name.startswith("torch"):
            return name
        frame = frame.f_back
    return ""


class _MetaValues(TorchFunctionMode):
    """While a transformers model runs on ``meta``: the values transformers' mask code reads to pick
    a path are answered True, as for a full batch (mask all ones: no mask is built; no packed
    sequences); any other read of a value raises
    :class:`~remat.profiling.estimate.NotEstimableError` naming the module and the op."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        read = _VALUE_READS.get(func)
        if read is not None and args and _is_meta(args[0]) and args[0].numel() == 1:
            if _reader() == _MASK_CODE:
                self.model.__dict__["_remat_meta_assumed"] = True
                return func(torch.ones((), dtype=torch.bool))  # True, as the read asks
            raise self._error(read)
        return func(*args, **(kwargs or {}))

    def _error(self, read: str) -> Exception:
        from remat.profiling.guard import NotEstimableError, module_running

        names = {id(m): n for n, m in self.model.named_modules()}
        return NotEstimableError(
            f"meta: got a model whose module {module_running(names)!r} reads a tensor's value"
            f" ({read}, in {_reader()}), which meta tensors do not have; expected code that runs"
            " on shapes alone (transformers' mask checks are answered as for a batch without"
            " padding). Fix: measure on a real device (--device cpu with a smaller --set size,"
            " or mode='measure'), or avoid the read on this path"
        )


def _is_meta(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "meta"


def _enter_meta_values(module: nn.Module, args: tuple, kwargs: dict) -> None:
    from remat.profiling.guard import DataDependentGuard

    if not any(_is_meta(p) for p in module.parameters()):
        module.__dict__.setdefault("_remat_meta_modes", []).append(None)
        return
    modes = (_MetaValues(module), DataDependentGuard(module))
    for mode in modes:
        mode.__enter__()
    module.__dict__.setdefault("_remat_meta_modes", []).append(modes)


def _exit_meta_values(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    stack = module.__dict__.get("_remat_meta_modes")
    modes = stack.pop() if stack else None
    for mode in reversed(modes or ()):
        mode.__exit__(None, None, None)


def prepare_meta(model: nn.Module) -> list[str]:
    """Ready the transformers models in ``model`` to run on ``meta``, in place; returns the FQNs
    of the models readied (the outermost ``PreTrainedModel`` modules; ``""`` is ``model``).

    transformers reads a few tensor values to pick a path, which meta tensors do not have: whether
    the attention mask is all ones (then no mask is built, and attention runs causal or unmasked,
    as PyTorch's fused kernels want) and whether the positions hold packed sequences. While such a
    model runs on meta those checks are answered as for a full, unpadded batch, the step a real
    device runs with an all-ones mask, so the bytes are the same to the byte; any other read of a
    value (``.item()``, ``nonzero``, ...) raises
    :class:`~remat.profiling.estimate.NotEstimableError` naming the module and the op. On other
    devices nothing changes. Idempotent; hooks, so a deep copy keeps it.

    Example:
        >>> import torch
        >>> from remat.integrations.hf import build
        >>> with torch.device("meta"):
        ...     built = build("llama", batch=2, seq=16, num_hidden_layers=2, hidden_size=64)
        >>> prepare_meta(built.model)
        ['']
        >>> built.model(**built.example_inputs).loss.device.type
        'meta'
    """
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return []
    readied: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, transformers.PreTrainedModel):
            continue
        if any(r == "" or name.startswith(r + ".") for r in readied):
            continue
        if not module.__dict__.get("_remat_meta_values"):
            module.register_forward_pre_hook(_enter_meta_values, with_kwargs=True)
            module.register_forward_hook(_exit_meta_values, with_kwargs=True, always_call=True)
            module.__dict__["_remat_meta_values"] = True
        readied.append(name)
    return readied
