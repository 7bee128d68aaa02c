"""On ``meta``, run attention with the kernel the CPU would choose, so shape-only bytes equal CPU bytes.

Consumes calls of ``F.scaled_dot_product_attention`` on meta tensors; produces their outputs from the
kernel a CPU run of the same call dispatches to. Without this, meta always takes PyTorch's math path,
which saves the whole score matrix for backward, while the CPU takes its flash kernel, which saves
only the output and the log-sum-exp: a ViT's step measured 23.0 MB on meta against 8.5 MB on the CPU.

Some meta kernels also lay out an output unlike the CPU kernel does: ``native_layer_norm_backward``
on meta gives the input gradient the strides of a non-contiguous output gradient, where the CPU
returns it contiguous, so a ``view`` behind the norm copies on meta only (a Swin step measured
32 KiB more on meta).
:class:`CpuLayoutsOnMeta` gives those outputs the CPU's layout.

The CPU's choice is asked of ``torch._fused_sdp_choice`` (through :mod:`remat._compat`) on small CPU
stand-ins with the same dtypes, heads, head size, strides' unit-ness, mask, dropout, causality and
grad requirement as the real arguments: the choice depends on those, not on the batch or sequence
lengths. Estimate mode for a named device has its own routing (:mod:`remat.profiling.estimate`);
this applies only to meta runs with no target.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from remat import _compat

__all__ = ["CpuKernelsOnMeta", "CpuLayoutsOnMeta", "mirror_cpu_on_meta"]

_SDPA_PARAMETERS = (  # F.scaled_dot_product_attention's order (a builtin: no inspect.signature)
    "query",
    "key",
    "value",
    "attn_mask",
    "dropout_p",
    "is_causal",
    "scale",
    "enable_gqa",
)
_SDPA_DEFAULTS = {
    "attn_mask": None,
    "dropout_p": 0.0,
    "is_causal": False,
    "scale": None,
    "enable_gqa": False,
}


def sdpa_arguments(args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's arguments of ``F.scaled_dot_product_attention`` by name, defaults filled in."""
    return {**_SDPA_DEFAULTS, **dict(zip(_SDPA_PARAMETERS, args, strict=False)), **kwargs}


def _stand_in(tensor: torch.Tensor) -> torch.Tensor:
    """A tiny CPU tensor like ``tensor`` for the kernel choice: each dimension but the head size
    (the last) and the heads (third from last) shrunk to 1, the last stride kept unit or not."""
    shape = [1] * tensor.dim()
    shape[-1] = tensor.shape[-1]
    if tensor.dim() >= 3:
        shape[-3] = tensor.shape[-3]
    wide = 1 if tensor.stride(-1) == 1 else 2  # a strided view (last stride 2) stays one
    base = torch.empty([*shape[:-1], wide * shape[-1]], dtype=tensor.dtype)
    return base.requires_grad_(tensor.requires_grad)[..., ::wide]


def _mask_stand_in(mask: Any) -> Any:
    if not isinstance(mask, torch.Tensor):
        return mask
    # A mask that needs a gradient rules the CPU's flash kernel out.
    return torch.zeros([1] * mask.dim(), dtype=mask.dtype).requires_grad_(mask.requires_grad)


def cpu_attention_kernel(arguments: dict[str, Any]) -> str:
    """The kernel the CPU picks for these (meta) arguments: ``flash_attention`` or ``math``.

    Example:
        >>> q = torch.empty(2, 4, 64, 16, device="meta", requires_grad=True)
        >>> cpu_attention_kernel(sdpa_arguments((q, q, q), {}))
        'flash_attention'
        >>> cpu_attention_kernel(sdpa_arguments((q, q, q), {"dropout_p": 0.1,
        ...                     "attn_mask": torch.ones(1, 1, 64, 64, dtype=torch.bool)}))
        'math'
    """
    # Outside every dispatch mode: a tracker must not count the stand-ins as tensors of the step.
    with _compat.no_dispatch_modes():
        q, k, v = (_stand_in(arguments[name]) for name in ("query", "key", "value"))
        if not torch.is_grad_enabled():
            q, k, v = q.detach(), k.detach(), v.detach()
        return _compat.sdpa_backend(
            q,
            k,
            v,
            _mask_stand_in(arguments["attn_mask"]),
            arguments["dropout_p"],
            arguments["is_causal"],
            arguments["scale"],
            enable_gqa=arguments["enable_gqa"],
        )


def cpu_attention(arguments: dict[str, Any]) -> tuple[str, torch.Tensor]:
    """Attention over (meta) arguments as the CPU computes it: the kernel's name and the output.
    Its flash kernel takes grouped keys and values as they are; elsewhere meta's own path is the
    CPU's math path."""
    kernel = cpu_attention_kernel(arguments)
    if kernel == "flash_attention":
        return kernel, _compat.attention_op("flash_cpu")(
            arguments["query"],
            arguments["key"],
            arguments["value"],
            arguments["dropout_p"],
            arguments["is_causal"],
            attn_mask=arguments["attn_mask"],
            scale=arguments["scale"],
        )[0]
    names = ("attn_mask", "dropout_p", "is_causal", "scale")
    extra = {"enable_gqa": True} if arguments["enable_gqa"] else {}  # new in torch 2.5
    return kernel, F.scaled_dot_product_attention(
        arguments["query"],
        arguments["key"],
        arguments["value"],
        **{n: arguments[n] for n in names},
        **extra,
    )


class CpuKernelsOnMeta(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` on meta tensors to the CPU's kernel choice.

    Example:
        >>> from remat.profiling.tracker import track_memory
        >>> q = torch.empty(2, 4, 64, 16, device="meta", requires_grad=True)
        >>> with CpuKernelsOnMeta(), track_memory() as tracker:
        ...     out = F.scaled_dot_product_attention(q, q, q)
        >>> out.grad_fn.name(), tracker.current_bytes  # output and log-sum-exp, no score matrix
        ('ScaledDotProductFlashAttentionForCpuBackward0', 67584)
    """

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        arguments = sdpa_arguments(args, kwargs)
        query = arguments["query"]
        if not isinstance(query, torch.Tensor) or query.device.type != "meta":
            return func(*args, **kwargs)
        return cpu_attention(arguments)[1]


_CONTIGUOUS_ON_CPU = {"native_layer_norm_backward.default": (0,)}
"""Ops whose CPU kernel returns these outputs contiguous while the meta kernel copies another
argument's strides (found by comparing op by op the CPU and meta steps of the test zoo's models)."""


class CpuLayoutsOnMeta(_compat.TorchDispatchMode):
    """Gives meta outputs of the ops in ``_CONTIGUOUS_ON_CPU`` the CPU's contiguous layout.

    Enter it beneath a memory tracker, so the tracker counts the corrected outputs.

    Example:
        >>> x = torch.empty(4, 8, 6, device="meta").transpose(1, 2)  # strides (48, 1, 6)
        >>> w = torch.empty(8, device="meta")
        >>> with CpuLayoutsOnMeta():
        ...     dx, _, _ = torch.ops.aten.native_layer_norm_backward(
        ...         x, x, [8], torch.empty(4, 6, 1, device="meta"), torch.empty(4, 6, 1,
        ...         device="meta"), w, w, [True, True, True])
        >>> dx.is_contiguous()
        True
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        positions = _CONTIGUOUS_ON_CPU.get(func.__name__ if hasattr(func, "__name__") else "")
        if positions is None:
            return out
        fixed = list(out) if isinstance(out, tuple | list) else [out]
        for index in positions:
            tensor = fixed[index]
            if (
                isinstance(tensor, torch.Tensor)
                and tensor.device.type == "meta"
                and not tensor.is_contiguous()
            ):
                fixed[index] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        return type(out)(fixed) if isinstance(out, tuple | list) else fixed[0]


_ACTIVE = threading.local()


def on_meta(roots: Iterable[Any]) -> bool:
    """True when a root module's first parameter or buffer, or a root tensor, is on ``meta``."""
    for root in roots:
        if isinstance(root, torch.nn.Module):
            first = next(itertools.chain(root.parameters(), root.buffers()), None)
            if first is not None and first.device.type == "meta":
                return True
        elif isinstance(root, torch.Tensor) and root.device.type == "meta":
            return True
    return False


@contextlib.contextmanager
def mirror_cpu_on_meta(*roots: Any) -> Iterator[bool]:
    """Run what is inside with the CPU's kernels and layouts when ``roots`` are on ``meta`` and no
    target device is modelled (estimate mode routes kernels itself); once, however deeply nested.

    Every pass of a profile must see the same ops (the selective save sets are named from one
    pass and matched in another), so :func:`remat.profile` enters it around all of its work and
    the memory tracker around each measured step. Yields whether it mirrors.

    Example:
        >>> q = torch.empty(1, 2, 8, 4, device="meta", requires_grad=True)
        >>> with mirror_cpu_on_meta(q) as mirrored:
        ...     out = F.scaled_dot_product_attention(q, q, q)
        >>> mirrored, out.grad_fn.name()
        (True, 'ScaledDotProductFlashAttentionForCpuBackward0')
    """
    from remat.profiling.target import current_target

    if getattr(_ACTIVE, "on", False) or current_target() is not None or not on_meta(roots):
        yield False
        return
    _ACTIVE.on = True
    try:
        with CpuKernelsOnMeta(), CpuLayoutsOnMeta():
            yield True
    finally:
        _ACTIVE.on = False
