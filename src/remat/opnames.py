"""Device-independent names for the aten ops that ``selective:ops.<op>...`` save sets name.

The same PyTorch call dispatches to different aten kernels on different devices:
``F.scaled_dot_product_attention`` runs ``_scaled_dot_product_flash_attention_for_cpu`` on the
CPU and ``_scaled_dot_product_flash_attention``, ``_scaled_dot_product_efficient_attention`` or
``_scaled_dot_product_cudnn_attention`` on CUDA; batch norm in training is ``native_batch_norm`` on
the CPU and ``cudnn_batch_norm`` on CUDA. A save set names each op by its *family*
(:data:`OP_FAMILIES`: ``attention``, ``softmax``, ``layer_norm``...), so a plan made on one device
keeps the same tensors on another; ops outside the families keep their aten overload packet's
name (``addmm``, ``gelu``, ``add``), which is the same on every device. Save sets that name raw
kernels (plans written before the families) still work: each name is mapped to its family when
the plan is read and when ops are matched at run time.

Not mapped: dropout on the CPU is three ops (``empty_like``, ``bernoulli_``, ``div_`` for the mask,
then ``mul``), where CUDA runs one fused ``native_dropout``; a CPU save set that keeps the mask with
``div_`` keeps nothing of dropout on CUDA (the mask is drawn again there instead).

This module imports no torch: the plan reads labels with it.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["OP_FAMILIES", "canonical_op", "canonical_ops", "is_family"]

OP_FAMILIES: dict[str, frozenset[str]] = {
    "attention": frozenset(
        {
            "scaled_dot_product_attention",
            "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention",
            "_scaled_dot_product_fused_attention_overrideable",
            "_scaled_dot_product_attention_math_for_mps",
            "_flash_attention_forward",
            "_efficient_attention_forward",
        }
    ),
    "softmax": frozenset({"softmax", "_softmax", "_safe_softmax"}),
    "log_softmax": frozenset({"log_softmax", "_log_softmax"}),
    "layer_norm": frozenset({"layer_norm", "native_layer_norm"}),
    "rms_norm": frozenset({"rms_norm", "_fused_rms_norm"}),
    "group_norm": frozenset({"group_norm", "native_group_norm"}),
    "batch_norm": frozenset(
        {
            "batch_norm",
            "native_batch_norm",
            "_native_batch_norm_legit",
            "_native_batch_norm_legit_no_training",
            "_batch_norm_with_update",
            "_batch_norm_no_update",
            "cudnn_batch_norm",
            "miopen_batch_norm",
        }
    ),
    "dropout": frozenset({"dropout", "native_dropout", "_fused_dropout"}),
}
"""Family name -> the aten overload packets (per device, fused or not) that compute it."""

_FAMILY_OF = {kernel: family for family, kernels in OP_FAMILIES.items() for kernel in kernels}


def canonical_op(name: str) -> str:
    """The device-independent name of an aten op: its family, or the name itself.

    Example:
        >>> canonical_op("_scaled_dot_product_flash_attention_for_cpu")
        'attention'
        >>> canonical_op("_scaled_dot_product_cudnn_attention"), canonical_op("_safe_softmax")
        ('attention', 'softmax')
        >>> canonical_op("addmm"), canonical_op("layer_norm")
        ('addmm', 'layer_norm')
    """
    return _FAMILY_OF.get(name, name)


def canonical_ops(names: Iterable[str]) -> tuple[str, ...]:
    """Each name's :func:`canonical_op`, in order, each once.

    Example:
        >>> canonical_ops(["_safe_softmax", "addmm", "_softmax", "native_layer_norm"])
        ('softmax', 'addmm', 'layer_norm')
    """
    return tuple(dict.fromkeys(canonical_op(name) for name in names))


def is_family(name: str) -> bool:
    """Whether ``name`` is a family of :data:`OP_FAMILIES` (a name no single kernel has to have).

    Example:
        >>> is_family("attention"), is_family("addmm")
        (True, False)
    """
    return name in OP_FAMILIES
