"""A roofline for one op: the slower of its arithmetic and its memory traffic on a device.

Consumes an op's FLOPs, the bytes it reads and writes, and a
:class:`~remat.devices.DeviceSpec`; produces milliseconds. Estimate mode
(:mod:`remat.profiling.estimate`) sums it over the ops of each unit's forward and backward and of
the whole step. It is a lower bound on time (Williams et al. 2009, "Roofline: an insightful visual
performance model"): kernels reach a share of peak, launches cost microseconds, and nothing
overlaps here. Imports no torch.
"""

from __future__ import annotations

from remat.devices import DeviceSpec

__all__ = ["op_time_ms"]


def op_time_ms(flops: float, bytes_moved: float, spec: DeviceSpec, dtype: str) -> float:
    """Roofline time of one op: ``max(flops / peak(dtype), bytes / bandwidth)``, in ms.

    Example:
        >>> from remat.devices import get_device
        >>> h100 = get_device("h100-80gb")
        >>> round(op_time_ms(2 * 8192**3, 3 * 2 * 8192**2, h100, "bfloat16"), 3)  # compute-bound
        1.111
        >>> round(op_time_ms(0, 3.35e9, h100, "bfloat16"), 3)  # memory-bound: 3.35 GB at 3.35 TB/s
        1.0
    """
    compute_s = flops / spec.peak_flops(dtype) if flops else 0.0
    memory_s = bytes_moved / spec.memory_bandwidth_bytes_per_s if bytes_moved else 0.0
    return max(compute_s, memory_s) * 1e3
