"""Estimate mode: a :class:`~remat.cost.model.Profile` for a target device, from shapes alone.

Consumes a model (on any device, or on ``meta``), example inputs, a device name from
:mod:`remat.devices` and a dtype; produces the same :class:`~remat.cost.model.Profile` that
:func:`remat.profile` measures on real hardware, with:

- **bytes** measured exactly by the tracker while the training step runs on ``meta`` (no memory, no
  compute), with the kernels that depend on the device modelled as the target runs them:

  - on a CUDA target, ``F.scaled_dot_product_attention`` takes PyTorch's own order (flash when the
    compute capability is 8.0 or more, the dtype 16-bit, the head dimension at most 256 and there is
    no mask; else memory-efficient; else math): the fused kernels store the output and the
    log-sum-exp, never the score matrix; the math path stores the softmax output, a one-byte dropout
    mask and the dropped-out scores;
  - on a CUDA target, dropout is CUDA's fused ``native_dropout`` (a one-byte bool mask; on CPU and
    ``meta`` it is a mask of the input's dtype);
  - on a CUDA target, AdamW and SGD take their ``foreach`` path and every storage is rounded up to
    512 bytes, as the caching allocator does;
  - on the ``cpu`` target, attention takes the kernel the CPU chooses (its flash kernel where it
    applies; meta alone would take the math path) and outputs take the CPU's layouts
    (:mod:`remat.profiling.meta_kernels`), so the bytes are the CPU's.

  Which kernels were assumed is listed in the profile's ``kernels``.
- **time** from a roofline of every op (:func:`remat.cost.roofline.op_time_ms` over its FLOPs and
  the bytes it reads and writes) summed per unit's forward and backward and over the whole step, so
  the solver's costs and ``simulate``'s ``step_ms`` are in milliseconds (``time_source`` is
  ``roofline``).

Ops whose output shapes depend on tensor values (``nonzero``, boolean-mask indexing, top-k routing
by index as in the built-in ``moe``) have no shape-only form: estimate mode raises
:class:`NotEstimableError` naming the module and the op, rather than guessing. Hugging Face
transformers models read a few mask values to choose a path; those reads are answered as for a
batch without padding (:func:`remat.integrations.hf.prepare_meta`), and the profile's ``kernels``
says so.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from remat._compat import TorchDispatchMode, flop_formula, tree_flatten
from remat.apply.units import UnitSpec, call_model
from remat.cost.model import Profile
from remat.cost.roofline import op_time_ms
from remat.devices import DeviceSpec, get_device
from remat.profiling.meta_kernels import CpuLayoutsOnMeta, cpu_attention, sdpa_arguments
from remat.profiling.step import default_loss, make_optimizer, preserved_state
from remat.profiling.target import TargetDefaults, target_defaults
from remat.profiling.tracker import DATA_DEPENDENT_OPS

__all__ = [
    "ATTENTION_KERNELS",
    "NotEstimableError",
    "attention_kernel",
    "estimate_profile",
    "model_kernels",
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


class NotEstimableError(ValueError):
    """The model runs an op whose output shape depends on tensor values, so shapes alone cannot
    say how much memory it takes.

    Example:
        >>> issubclass(NotEstimableError, ValueError)
        True
    """


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
            return torch.ops.aten._scaled_dot_product_attention_math(
                q, k, v, a["attn_mask"], a["dropout_p"], a["is_causal"], scale=a["scale"]
            )[0]
        kernel = attention_kernel(
            self.spec, q.dtype, q.size(-1), a["attn_mask"] is not None, self.attention
        )
        self._record("scaled_dot_product_attention", kernel, q.dtype)
        dropout_p, is_causal, scale = a["dropout_p"], a["is_causal"], a["scale"]
        if kernel == "flash":
            return torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, dropout_p, is_causal, False, scale=scale
            )[0]
        if kernel == "efficient":
            needs_grad = any(t.requires_grad for t in (q, k, v)) and torch.is_grad_enabled()
            return torch.ops.aten._scaled_dot_product_efficient_attention(
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


def module_running(names: dict[int, str]) -> str:
    """The innermost module whose ``forward`` is on the Python stack, named by ``names`` (``id``
    of a module -> its FQN); found without hooks (global ones would make every recomputed unit
    warn that they run twice).

    Example:
        >>> module_running({})
        '(outside the model)'
    """
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            return names[id(owner)] or "(the model)"
        frame = frame.f_back
    return "(outside the model)"


class _Guard(TorchDispatchMode):
    """Raises :class:`NotEstimableError` before an op whose output shape depends on values."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {id(m): name for name, m in model.named_modules()}

    def _module_running(self) -> str:
        return module_running(self.names)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(getattr(func, "overloadpacket", func), "__name__", str(func))
        suspect = name in DATA_DEPENDENT_OPS or (
            name == "index"
            and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in tree_flatten(args[1:])[0]
            )
        )
        # An optimizer's step counter lives on the CPU and may be read with .item().
        if suspect and any(
            isinstance(t, torch.Tensor) and t.device.type == "meta"
            for t in tree_flatten((args, kwargs))[0]
        ):
            fqn = self._module_running()
            raise NotEstimableError(
                f"estimate: got a model whose module {fqn!r} runs {name}, whose output shape"
                " depends on tensor values (data-dependent routing such as mixture-of-experts"
                " dispatch); expected ops with shape-only forms. Fix: profile it on a real device"
                " (mode='measure'), or make the op's shapes static (e.g. capacity-padded expert"
                " dispatch)"
            )
        return func(*args, **(kwargs or {}))


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
    leaves, spec = torch.utils._pytree.tree_flatten(example_inputs)
    converted: dict[int, torch.Tensor] = {}  # one input passed twice (labels = input_ids) stays one
    moved = [
        converted.setdefault(id(leaf), convert(leaf)) if isinstance(leaf, torch.Tensor) else leaf
        for leaf in leaves
    ]
    return meta_model, torch.utils._pytree.tree_unflatten(moved, spec)


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
    from remat.profiling.profiler import _UnitMarks

    roofline = _Roofline(spec)

    def on_event(label: tuple[str, int]) -> None:
        roofline.label = label

    opt = make_optimizer(optimizer, model)
    marks = _UnitMarks(unit_modules, on_event)
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


def estimate_profile(
    model: nn.Module,
    example_inputs: Any,
    *,
    device: str | DeviceSpec,
    dtype: str | torch.dtype | None = None,
    attention: str = "auto",
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: str = "adamw",
    units: UnitSpec = None,
    timing: bool = True,
    progress: Callable[[str], None] | None = None,
    options: Sequence[str] = (),
) -> Profile:
    """Profile ``model`` for ``device`` from shapes alone (``remat.profile(..., mode="estimate")``
    calls this; see the module docstring for what is modelled).

    Args:
        model, example_inputs, loss_fn, optimizer, units, progress: as :func:`remat.profile`.
        device: a name from :mod:`remat.devices` (``h100-80gb``, ``a100-40gb``, ``cpu``, ...).
        dtype: parameters' and floating inputs' dtype on the target (default: as they are).
        attention: ``auto`` (the target's choice) or ``flash``, ``efficient``, ``math``.
        timing: also run the roofline step for times (``False``: bytes only, ``time_source``
            ``flops``; what a search over sizes needs).

    Raises:
        NotEstimableError: the step runs a data-dependent op (the message names the module).
        ValueError: an unknown device, dtype or attention kernel.

    Example:
        >>> from remat.models.spec import load_model
        >>> built = load_model("gpt", device="meta", batch=2, seq=64,
        ...                    overrides={"n_layer": 2, "d_model": 64, "n_head": 4, "vocab": 128})
        >>> prof = estimate_profile(built.model, built.example_inputs, loss_fn=built.loss_fn,
        ...                         device="h100-80gb", dtype="bfloat16")
        >>> prof.device, prof.dtype, prof.time_source, prof.step_ms > 0
        ('h100-80gb', 'bfloat16', 'roofline', True)
        >>> prof.kernels[0]  # doctest: +ELLIPSIS
        'scaled_dot_product_attention: flash on h100-80gb (bfloat16): stores the output and ...'
    """
    from remat.profiling.profiler import profile

    spec = get_device(device)
    loss_fn = loss_fn or default_loss
    meta_model, meta_inputs = to_meta(model, example_inputs, dtype)
    _prepare_transformers(meta_model)
    say = progress or (lambda text: logger.info("%s", text))
    with ExitStack() as stack:
        kernels = stack.enter_context(model_kernels(spec, attention))
        stack.enter_context(_Guard(meta_model))
        prof = profile(
            meta_model,
            meta_inputs,
            loss_fn=loss_fn,
            optimizer=optimizer,
            units=units,
            progress=progress,
            options=options,
        )
        if timing:
            say(f"estimate: roofline step on {spec.name}")
            modules = dict(meta_model.named_modules())
            step_ms, forward_ms, backward_ms = _roofline_step(
                meta_model,
                meta_inputs,
                loss_fn,
                optimizer,
                [modules[fqn] for fqn in prof.unit_fqns],
                spec,
            )
            for unit, fwd, bwd in zip(prof.units, forward_ms, backward_ms, strict=True):
                unit.forward_ms, unit.backward_ms = fwd, bwd
                for option in unit.options:  # the replayed share of the forward's FLOPs
                    if option.action.startswith("selective:") and unit.forward_flops > 0:
                        share = min(option.cost_flops / unit.forward_flops, 1.0)
                        option.cost_ms = fwd * share
            prof.step_ms = step_ms
            prof.time_source = "roofline"
    prof.device = spec.name
    prof.kernels = sorted(kernels.assumed.values(), key=lambda t: (t.startswith("dropout"), t)) or [
        "no device-dependent kernels ran (attention, dropout): none assumed"
    ]
    if spec.kind == "cuda":
        prof.kernels.append(
            f"optimizer: {optimizer} foreach path; every storage rounded up to 512 bytes"
            " (CUDA caching allocator)"
        )
    if any(m.__dict__.get("_remat_meta_assumed") for m in meta_model.modules()):
        prof.kernels.append(
            "attention mask: taken as all ones (no padding, no packed sequences), as transformers"
            " reads it on a real device; it then builds no mask (a padded batch would build one)"
        )
    return prof


def _prepare_transformers(model: nn.Module) -> None:
    """Transformers models read a few mask values to pick a path; ready them for ``meta``
    (:func:`remat.integrations.hf.prepare_meta`). Nothing to do if transformers is not loaded."""
    if "transformers" in sys.modules:
        from remat.integrations.hf import prepare_meta

        prepare_meta(model)
