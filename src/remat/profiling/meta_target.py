"""Estimate mode's machinery: a training step on ``meta`` that runs the target device's kernels.

Consumes a model and example inputs (on any device, or on ``meta``), a device from
:mod:`remat.devices` and a dtype, and a ``measure`` function (the profiler's, passed in by the
caller: this module does not import :mod:`remat.profiling.profiler`, which dispatches to it);
produces the :class:`~remat.cost.model.Profile` that ``measure`` returns for a ``meta`` copy of the
model run under the target's kernels, with roofline times (:func:`estimate_on_meta`). What is
modelled, and why, is in :mod:`remat.profiling.estimate`, the public face of estimate mode.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from remat._compat import (
    TorchDispatchMode,
    attention_op,
    flop_formula,
    tree_flatten,
    tree_unflatten,
)
from remat.apply.units import call_model
from remat.cost.model import Profile
from remat.cost.roofline import op_time_ms
from remat.devices import DeviceSpec, get_device
from remat.feedback import as_progress
from remat.profiling.guard import DataDependentGuard
from remat.profiling.marks import UnitMarks
from remat.profiling.meta_kernels import CpuLayoutsOnMeta, cpu_attention, sdpa_arguments
from remat.profiling.step import default_loss, make_optimizer, preserved_state
from remat.profiling.target import TargetDefaults, target_defaults

__all__ = [
    "ATTENTION_KERNELS",
    "attention_kernel",
    "estimate_on_meta",
    "model_kernels",
    "roofline_times",
    "to_meta",
]

logger = logging.getLogger(__name__)

ATTENTION_KERNELS = ("auto", "flash", "efficient", "math")
"""What ``attention=`` accepts: ``auto`` (what the target chooses) or a forced kernel."""

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_STORES = {
    "flash": "stores the output and log-sum-exp, no score matrix",
    "flash_attention": "stores the output and log-sum-exp, no score matrix",
    "efficient": "stores the output and log-sum-exp, no score matrix",
    "math": "stores the softmax output, dropout mask and dropped-out scores (b*h*s*s each)",
}


def attention_kernel(
    spec: DeviceSpec, dtype: torch.dtype, head_dim: int, has_mask: bool, requested: str = "auto"
) -> str:
    """Which scaled-dot-product attention kernel a CUDA device runs, as PyTorch chooses it
    (``torch/backends/cuda`` ``sdp_kernel`` order: flash, memory-efficient, math).

    Flash needs compute capability 8.0+, float16 or bfloat16, no attention mask and a head
    dimension at most 256 and a multiple of 8; memory-efficient needs 5.0+ (bfloat16: 8.0+) and a
    head dimension that is a multiple of 8 (float32: 4).

    Example:
        >>> from remat.devices import get_device
        >>> attention_kernel(get_device("h100-80gb"), torch.bfloat16, 128, False)
        'flash'
        >>> attention_kernel(get_device("h100-80gb"), torch.float32, 64, False)
        'efficient'
        >>> attention_kernel(get_device("t4"), torch.bfloat16, 64, False)
        'math'
    """
    if requested != "auto":
        return requested
    major_minor = spec.compute_capability or (0, 0)
    sixteen = dtype in (torch.float16, torch.bfloat16)
    if major_minor >= (8, 0) and sixteen and not has_mask and head_dim <= 256 and head_dim % 8 == 0:
        return "flash"
    dtype_ok = dtype in (torch.float32, torch.float16) or (
        dtype == torch.bfloat16 and major_minor >= (8, 0)
    )
    if major_minor >= (5, 0) and dtype_ok and head_dim % (8 if sixteen else 4) == 0:
        return "efficient"
    return "math"


def _math_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """PyTorch's math path (``_scaled_dot_product_attention_math``) with CUDA's fused dropout:
    scaled q and k, scores, softmax, dropout with a bool mask, then the product with v."""
    length, source = query.size(-2), key.size(-2)
    factor = math.sqrt(1.0 / math.sqrt(query.size(-1)) if scale is None else scale)
    query = query * factor
    bias = None
    if is_causal:
        causal = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        bias = torch.zeros(length, source, dtype=query.dtype, device=query.device)
        bias = bias.masked_fill(~causal, float("-inf"))
    elif attn_mask is not None:
        bias = (
            torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else attn_mask
        )
    scores = query @ (key * factor).transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        weights = torch.native_dropout(weights, dropout_p, True)[0]
    return weights @ value


_DROPOUTS = {F.dropout, torch.dropout, torch.nn.functional.dropout}


class _TargetKernels(TorchFunctionMode):
    """Replaces the device-dependent kernels by the target's (see the module docstring) and
    records which it assumed."""

    def __init__(self, spec: DeviceSpec, attention: str) -> None:
        super().__init__()
        self.spec = spec
        self.attention = attention
        self.assumed: dict[str, str] = {}

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._attention(args, kwargs)
        if func in _DROPOUTS and self.spec.kind == "cuda":
            return self._dropout(func, args, kwargs)
        return func(*args, **kwargs)

    def _attention(self, args: tuple, kwargs: dict) -> Any:
        a = sdpa_arguments(args, kwargs)
        if self.spec.kind != "cuda" and self.attention == "auto":
            return self._cpu_attention(a)
        q, k, v = a["query"], a["key"], a["value"]
        if a["enable_gqa"] and q.size(-3) != k.size(-3):
            repeat = q.size(-3) // k.size(-3)
            k, v = k.repeat_interleave(repeat, -3), v.repeat_interleave(repeat, -3)
        if self.spec.kind != "cuda":  # math, as asked
            self._record("scaled_dot_product_attention", "math", q.dtype)
            return attention_op("math")(
                q, k, v, a["attn_mask"], a["dropout_p"], a["is_causal"], scale=a["scale"]
            )[0]
        kernel = attention_kernel(
            self.spec, q.dtype, q.size(-1), a["attn_mask"] is not None, self.attention
        )
        self._record("scaled_dot_product_attention", kernel, q.dtype)
        dropout_p, is_causal, scale = a["dropout_p"], a["is_causal"], a["scale"]
        if kernel == "flash":
            return attention_op("flash")(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
        if kernel == "efficient":
            needs_grad = any(t.requires_grad for t in (q, k, v)) and torch.is_grad_enabled()
            return attention_op("efficient")(
                q, k, v, a["attn_mask"], needs_grad, dropout_p, is_causal, scale=scale
            )[0]
        return _math_attention(q, k, v, a["attn_mask"], dropout_p, is_causal, scale)

    def _cpu_attention(self, a: dict[str, Any]) -> Any:
        """The kernel the CPU chooses (meta alone would always take the math path)."""
        kernel, out = cpu_attention(a)
        self._record("scaled_dot_product_attention", kernel, a["query"].dtype)
        return out

    def _dropout(self, func: Any, args: tuple, kwargs: dict) -> Any:
        names = (
            ("input", "p", "training", "inplace")
            if func is not torch.dropout
            else (
                "input",
                "p",
                "train",
            )
        )
        a = dict(zip(names, args, strict=False))
        a.update(kwargs)
        p = a.get("p", 0.5)
        training = a.get("training", a.get("train", True))
        if not training or not 0 < p < 1 or a.get("inplace", False):
            return func(*args, **kwargs)
        self.assumed["dropout"] = (
            "dropout: CUDA's fused native_dropout, a 1-byte bool mask per element"
        )
        return torch.native_dropout(a["input"], p, True)[0]

    def _record(self, op: str, kernel: str, dtype: torch.dtype) -> None:
        where = self.spec.name
        text = f"{op}: {kernel} on {where} ({str(dtype).replace('torch.', '')})"
        stores = _STORES.get(kernel)
        self.assumed[f"{op}:{kernel}"] = f"{text}: {stores}" if stores else text


@contextmanager
def model_kernels(spec: DeviceSpec, attention: str = "auto") -> Iterator[_TargetKernels]:
    """Inside the block, run the target's device-dependent kernels on ``meta`` tensors (see the
    module docstring); the yielded object's ``assumed`` lists what was assumed.

    Example:
        >>> from remat.devices import get_device
        >>> q = torch.empty(1, 2, 16, 64, device="meta", dtype=torch.bfloat16)
        >>> with model_kernels(get_device("a100-80gb")) as kernels:
        ...     out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        >>> out.shape, list(kernels.assumed)
        (torch.Size([1, 2, 16, 64]), ['scaled_dot_product_attention:flash'])
    """
    if attention not in ATTENTION_KERNELS:
        raise ValueError(
            f"attention: got {attention!r}; expected one of {', '.join(ATTENTION_KERNELS)}"
        )
    if spec.kind != "cuda" and attention not in ("auto", "math"):
        raise ValueError(
            f"attention: got {attention!r} for the {spec.name} target; expected auto or math"
            " (the fused CUDA kernels need a CUDA target)"
        )
    defaults = (
        TargetDefaults(round_bytes=512, optimizer_foreach=True)
        if spec.kind == "cuda"
        else TargetDefaults()
    )
    kernels = _TargetKernels(spec, attention)
    with ExitStack() as stack:
        stack.enter_context(target_defaults(defaults))
        if spec.kind != "cuda":  # the CPU's output layouts, beneath any tracker entered inside
            stack.enter_context(CpuLayoutsOnMeta())
        stack.enter_context(kernels)
        yield kernels


def to_meta(
    model: nn.Module, example_inputs: Any, dtype: str | torch.dtype | None = None
) -> tuple[nn.Module, Any]:
    """A copy of ``model`` and ``example_inputs`` on ``meta`` in ``dtype`` (floating tensors only),
    sharing nothing with the originals and copying no data; tied parameters stay tied. A model
    already on ``meta`` in that dtype is returned as it is.

    Example:
        >>> model = nn.Linear(4, 4)
        >>> meta, inputs = to_meta(model, (torch.ones(2, 4),), "bfloat16")
        >>> meta.weight.device.type, meta.weight.dtype, inputs[0].dtype, model.weight.device.type
        ('meta', torch.bfloat16, torch.bfloat16, 'cpu')
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: got {dtype!r}; expected one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        cast = dtype if dtype is not None and tensor.is_floating_point() else None
        return tensor.detach().to(device="meta", dtype=cast)

    tensors = [*model.parameters(), *model.buffers()]
    if all(
        t.device.type == "meta" and (dtype is None or not t.is_floating_point() or t.dtype == dtype)
        for t in tensors
    ):
        meta_model = model
    else:
        memo: dict[int, Any] = {}
        for tensor in tensors:
            if id(tensor) in memo:
                continue
            converted = convert(tensor)
            if isinstance(tensor, nn.Parameter):
                converted = nn.Parameter(converted, requires_grad=tensor.requires_grad)
            memo[id(tensor)] = converted
        meta_model = copy.deepcopy(model, memo)
    leaves, spec = tree_flatten(example_inputs)
    converted: dict[int, torch.Tensor] = {}  # one input passed twice (labels = input_ids) stays one
    moved = [
        converted.setdefault(id(leaf), convert(leaf)) if isinstance(leaf, torch.Tensor) else leaf
        for leaf in leaves
    ]
    return meta_model, tree_unflatten(moved, spec)


class _Roofline(TorchDispatchMode):
    """Sums each op's roofline time into the bucket the unit hooks say is running."""

    def __init__(self, spec: DeviceSpec) -> None:
        super().__init__()
        self.spec = spec
        self.label: tuple[str, int] = ("start", -1)
        self.buckets: dict[tuple[str, int], float] = {}
        self.total_ms = 0.0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "is_view", False):
            return out
        tensors_in = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        tensors_out = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        moved = sum(_nbytes(t) for t in tensors_in) + sum(_nbytes(t) for t in tensors_out)
        flops = 0
        formula = flop_formula(func)
        if formula is not None:
            try:
                flops = int(formula(*args, **kwargs, out_val=out))
            except Exception:  # a formula that cannot read these arguments counts nothing
                flops = 0
        dtype = next((t.dtype for t in tensors_in if t.is_floating_point()), torch.float32)
        ms = op_time_ms(flops, moved, self.spec, str(dtype).replace("torch.", ""))
        self.buckets[self.label] = self.buckets.get(self.label, 0.0) + ms
        self.total_ms += ms
        return out


def _nbytes(tensor: torch.Tensor) -> int:
    """Bytes an op reads or writes through ``tensor`` (a broadcast view reads its storage once)."""
    logical = tensor.numel() * tensor.element_size()
    try:
        return min(logical, tensor.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return logical


def _roofline_step(
    model: nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor],
    optimizer: str,
    unit_modules: list[nn.Module],
    spec: DeviceSpec,
) -> tuple[float, list[float], list[float]]:
    """One training step under the roofline: (step ms, forward ms per unit, backward ms per unit)."""
    roofline = _Roofline(spec)

    def on_event(label: tuple[str, int]) -> None:
        roofline.label = label

    opt = make_optimizer(optimizer, model)
    marks = UnitMarks(unit_modules, on_event)
    try:
        with preserved_state(model), roofline:
            output = call_model(model, example_inputs)
            roofline.label = ("loss", -1)
            loss = loss_fn(output)
            loss.backward()
            roofline.label = ("optimizer", -1)
            if opt is not None:
                opt.step()
    finally:
        marks.remove()
        for param in model.parameters():
            param.grad = None
    n = len(unit_modules)
    forward = [roofline.buckets.get(("forward", i), 0.0) for i in range(n)]
    backward = [roofline.buckets.get(("backward", i), 0.0) for i in range(n)]
    return roofline.total_ms, forward, backward


def estimate_on_meta(
    measure: Callable[[nn.Module, Any], Profile],
    model: nn.Module,
    example_inputs: Any,
    *,
    device: str | DeviceSpec,
    dtype: str | torch.dtype | None = None,
    attention: str = "auto",
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: str = "adamw",
    timing: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Profile:
    """``measure(meta_model, meta_inputs)`` on a ``meta`` copy of the model in ``dtype``, under
    ``device``'s kernels and the data-dependence guard, then roofline times for ``device``.

    ``measure`` is the profiler's one-process measurement (with its ``loss_fn``, ``optimizer``,
    ``units``, ``options``, ``world_size`` and ``fsdp`` bound by the caller); whatever it makes
    of the profile (per-rank figures included) is kept, and only times, the device and the kernels
    assumed are filled in here.

    Args:
        measure: measures a model and its inputs; called once, on ``meta``.
        model, example_inputs: the model and one batch (any device).
        device, dtype, attention: the target (see :func:`remat.profiling.estimate.estimate_profile`).
        loss_fn, optimizer: the step's, for the roofline step (the same ``measure`` runs).
        timing: run the roofline step (``False``: bytes only, ``time_source`` stays ``flops``).
        progress: called with a line of text before the roofline step.

    Example:
        >>> from remat.profiling.profiler import profile
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        >>> prof = estimate_on_meta(lambda m, x: profile(m, x, optimizer="sgd"), model,
        ...                         (torch.ones(2, 8),), device="h100-80gb", optimizer="sgd")
        >>> prof.device, prof.time_source, prof.unit_fqns
        ('h100-80gb', 'roofline', ['0', '1'])
    """
    spec = get_device(device)
    loss_fn = loss_fn or default_loss
    meta_model, meta_inputs = to_meta(model, example_inputs, dtype)
    _prepare_transformers(meta_model)
    say = as_progress(progress)
    with ExitStack() as stack:
        # beneath every other dispatch mode, so that it may answer pointwise ops itself
        stack.enter_context(DataDependentGuard(meta_model, fast_meta=True))
        kernels = stack.enter_context(model_kernels(spec, attention))
        prof = measure(meta_model, meta_inputs)
        if timing:
            say(f"estimate: roofline step on {spec.name}")
            _add_roofline_times(prof, meta_model, meta_inputs, loss_fn, optimizer, spec)
    prof.device = spec.name
    prof.kernels = sorted(kernels.assumed.values(), key=lambda t: (t.startswith("dropout"), t)) or [
        "no device-dependent kernels ran (attention, dropout): none assumed"
    ]
    if spec.kind == "cuda":
        prof.kernels.append(
            f"optimizer: {prof.optimizer} foreach path; every storage rounded up to 512 bytes"
            " (CUDA caching allocator)"
        )
    if any(m.__dict__.get("_remat_meta_assumed") for m in meta_model.modules()):
        prof.kernels.append(
            "attention mask: taken as all ones (no padding, no packed sequences), as transformers"
            " reads it on a real device; it then builds no mask (a padded batch would build one)"
        )
    return prof


def roofline_times(
    prof: Profile,
    model: nn.Module,
    example_inputs: Any,
    *,
    device: str | DeviceSpec,
    dtype: str | torch.dtype | None = None,
    attention: str = "auto",
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: str = "adamw",
) -> Profile:
    """A copy of ``prof``, an estimate of this model and batch made with ``timing=False``, with the
    roofline times that ``timing=True`` would have given it: only the roofline step runs (a search
    over sizes times the one size it reports without measuring it again).

    Example:
        >>> from remat.profiling.profiler import profile
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        >>> kw = {"device": "h100-80gb", "optimizer": "sgd"}
        >>> bytes_only = estimate_on_meta(lambda m, x: profile(m, x, optimizer="sgd"), model,
        ...                               (torch.ones(2, 8),), timing=False, **kw)
        >>> timed = roofline_times(bytes_only, model, (torch.ones(2, 8),), **kw)
        >>> bytes_only.time_source, timed.time_source, timed.step_ms > 0
        ('flops', 'roofline', True)
    """
    spec = get_device(device)
    meta_model, meta_inputs = to_meta(model, example_inputs, dtype)
    _prepare_transformers(meta_model)
    timed = copy.deepcopy(prof)
    with DataDependentGuard(meta_model, fast_meta=True), model_kernels(spec, attention):
        _add_roofline_times(
            timed, meta_model, meta_inputs, loss_fn or default_loss, optimizer, spec
        )
    return timed


def _add_roofline_times(
    prof: Profile,
    model: nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor],
    optimizer: str,
    spec: DeviceSpec,
) -> None:
    """Fill the profile's step and per-unit times (and selective options' costs) from the
    roofline step, in place."""
    modules = dict(model.named_modules())
    step_ms, forward_ms, backward_ms = _roofline_step(
        model, example_inputs, loss_fn, optimizer, [modules[fqn] for fqn in prof.unit_fqns], spec
    )
    for unit, fwd, bwd in zip(prof.units, forward_ms, backward_ms, strict=True):
        unit.forward_ms, unit.backward_ms = fwd, bwd
        for option in unit.options:  # the replayed share of the forward's FLOPs
            if option.action.startswith("selective:") and unit.forward_flops > 0:
                share = min(option.cost_flops / unit.forward_flops, 1.0)
                option.cost_ms = fwd * share
    prof.step_ms = step_ms
    prof.time_source = "roofline"


def _prepare_transformers(model: nn.Module) -> None:
    """Transformers models read a few mask values to pick a path; ready them for ``meta``
    (:func:`remat.integrations.hf_meta.prepare_meta`). Nothing to do if transformers is not loaded."""
    if "transformers" in sys.modules:
        from remat.integrations.hf_meta import prepare_meta

        prepare_meta(model)
