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

``world_size`` and ``fsdp`` make the figures those of one rank, exactly as when measuring: the
estimate runs the profiler's own measurement on ``meta``, which ends with
:func:`remat.cost.distributed.per_rank`.

Where the pieces live (so that no two modules import each other): the target's kernels, ``meta``
copies and the roofline are in :mod:`remat.profiling.meta_target`, the data-dependence guard in
:mod:`remat.profiling.guard`; this module joins them to the profiler's measurement, and
:func:`remat.profile` with ``mode="estimate"`` does the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from remat.apply.units import UnitSpec
from remat.cost.model import Profile
from remat.devices import DeviceSpec
from remat.profiling.guard import NotEstimableError, module_running
from remat.profiling.meta_target import (
    ATTENTION_KERNELS,
    attention_kernel,
    model_kernels,
    to_meta,
)
from remat.profiling.profiler import estimate_via_meta

__all__ = [
    "ATTENTION_KERNELS",
    "NotEstimableError",
    "attention_kernel",
    "estimate_profile",
    "model_kernels",
    "module_running",
    "to_meta",
]


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
    world_size: int = 1,
    fsdp: bool = False,
) -> Profile:
    """Profile ``model`` for ``device`` from shapes alone (what ``remat.profile(...,
    mode="estimate")`` does, with ``timing`` besides; see the module docstring for what is
    modelled).

    Args:
        model, example_inputs, loss_fn, optimizer, units, progress: as :func:`remat.profile`.
        device: a name from :mod:`remat.devices` (``h100-80gb``, ``a100-40gb``, ``cpu``, ...).
        dtype: parameters' and floating inputs' dtype on the target (default: as they are).
        attention: ``auto`` (the target's choice) or ``flash``, ``efficient``, ``math``.
        timing: also run the roofline step for times (``False``: bytes only, ``time_source``
            ``flops``; what a search over sizes needs).
        options: finer actions to profile (default none: each is one more step on ``meta``).
        world_size, fsdp: per-rank figures for one of ``world_size`` ranks under DDP or FSDP2,
            as :func:`remat.profile`; ``example_inputs`` is then one rank's batch.

    Raises:
        NotEstimableError: the step runs a data-dependent op (the message names the module).
        ValueError: an unknown device, dtype or attention kernel, or a bad ``world_size``.

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
        >>> sharded = estimate_profile(built.model, built.example_inputs, loss_fn=built.loss_fn,
        ...                            device="h100-80gb", dtype="bfloat16", timing=False,
        ...                            world_size=8, fsdp=True)
        >>> sharded.world_size, sharded.fsdp, sharded.static_bytes < prof.static_bytes
        (8, True, True)
    """

    return estimate_via_meta(
        model,
        example_inputs,
        device=device,
        dtype=dtype,
        attention=attention,
        loss_fn=loss_fn,
        optimizer=optimizer,
        units=units,
        progress=progress,
        options=options,
        world_size=world_size,
        fsdp=fsdp,
        timing=timing,
    )
