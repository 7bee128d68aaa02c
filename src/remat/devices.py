"""Device specs for estimating without the hardware: memory, peak FLOP/s and bandwidths.

Consumes a device name (``h100-80gb``, ``a100-40gb``, ``cpu``, ...); produces a :class:`DeviceSpec`
with the figures that estimate mode (:func:`remat.profile` with ``mode="estimate"``) and the
``device`` budget need. Imports no torch.

Every figure is the vendor's datasheet or architecture whitepaper figure, dense (without the 2:4
sparsity that datasheets often quote as the headline), named beside the number. Memory is what
``nvidia-smi`` reports where that differs from the datasheet's round figure; GPU memory sizes are
binary (an "80 GB" HBM part holds 80 GiB). Host link is the PCIe bandwidth in one direction.

The **reserve** is what a training process cannot give to tensors: the CUDA context with the
cuBLAS / cuDNN workspaces and kernels loaded (outside PyTorch's allocator, so outside
``max_memory_allocated``), plus a share for the caching allocator's fragmentation (blocks rounded up
and split, so reserved memory exceeds allocated memory). ``usable_bytes`` is the capacity less the
reserve; the ``device`` budget resolves to it.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass

__all__ = [
    "CUDA_CONTEXT_BYTES",
    "DEVICES",
    "FRAGMENTATION_SHARE",
    "DeviceSpec",
    "get_device",
    "is_device_name",
]

GiB = 1024**3

CUDA_CONTEXT_BYTES = 1 * GiB
"""The CUDA context, kernels and library workspaces a PyTorch process holds outside its allocator.
With CUDA 12's lazy module loading it is typically 0.3-0.6 GiB and grows with cuBLAS / cuDNN
workspaces (cuBLAS alone may take up to 32 MiB per stream on Hopper); 1 GiB is a round upper figure."""
FRAGMENTATION_SHARE = 0.05
"""Share of the capacity kept back for the caching allocator's fragmentation: reserved minus
allocated memory is a few percent in steady training; 5% is the stated margin."""


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """One device's figures, with the source they come from.

    Example:
        >>> spec = get_device("a100-80gb")
        >>> spec.memory_bytes // 2**30, spec.peak_flops("bfloat16") / 1e12
        (80, 312.0)
        >>> spec.usable_bytes == spec.memory_bytes - spec.reserve_bytes
        True
    """

    name: str
    description: str
    kind: str
    """``cuda`` or ``cpu``: which kernels the estimate models (see ``remat.profiling.estimate``)."""
    memory_bytes: int
    bf16_flops: float
    """Peak dense bfloat16 FLOP/s (tensor cores, FP32 accumulate, as PyTorch's matmuls use)."""
    fp16_flops: float
    """Peak dense float16 FLOP/s (tensor cores, FP32 accumulate)."""
    fp32_flops: float
    """Peak float32 FLOP/s without tensor cores (PyTorch's matmul default: no TF32)."""
    memory_bandwidth_bytes_per_s: float
    host_link_bytes_per_s: float
    """Device-host bandwidth, one direction (what offloading saved tensors moves over)."""
    compute_capability: tuple[int, int] | None = None
    """CUDA compute capability: which attention kernels PyTorch can run (flash needs 8.0)."""
    context_bytes: int = CUDA_CONTEXT_BYTES
    fragmentation_share: float = FRAGMENTATION_SHARE
    source: str = ""

    @property
    def reserve_bytes(self) -> int:
        """The context plus the fragmentation share of the capacity."""
        return self.context_bytes + int(self.memory_bytes * self.fragmentation_share)

    @property
    def usable_bytes(self) -> int:
        """What tensors may use: the capacity less the reserve."""
        return max(self.memory_bytes - self.reserve_bytes, 0)

    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s for matmuls in ``dtype`` (``bfloat16``, ``float16``, ``float32``)."""
        return {
            "bfloat16": self.bf16_flops,
            "float16": self.fp16_flops,
        }.get(_dtype_name(dtype), self.fp32_flops)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict, the reserve and usable bytes included."""
        return {
            "name": self.name,
            "description": self.description,
            "kind": self.kind,
            "memory_bytes": self.memory_bytes,
            "reserve_bytes": self.reserve_bytes,
            "usable_bytes": self.usable_bytes,
            "bf16_flops": self.bf16_flops,
            "fp16_flops": self.fp16_flops,
            "fp32_flops": self.fp32_flops,
            "memory_bandwidth_bytes_per_s": self.memory_bandwidth_bytes_per_s,
            "host_link_bytes_per_s": self.host_link_bytes_per_s,
            "compute_capability": self.compute_capability,
            "source": self.source,
        }


def _dtype_name(dtype: object) -> str:
    text = str(dtype).replace("torch.", "")
    return {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}.get(
        text, text
    )


# PCIe one direction: Gen3 x16 16 GB/s, Gen4 x16 32 GB/s, Gen5 x16 64 GB/s (datasheets quote the
# bidirectional sum: 32 / 64 / 128 GB/s).
_PCIE3, _PCIE4, _PCIE5 = 16e9, 32e9, 64e9

_H100 = "https://www.nvidia.com/en-us/data-center/h100/ (H100 Tensor Core GPU datasheet, SXM)"
_H200 = "https://www.nvidia.com/en-us/data-center/h200/ (H200 Tensor Core GPU datasheet, SXM)"
_A100 = (
    "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
    "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf (A100 datasheet, SXM)"
)
_A40 = "https://www.nvidia.com/en-us/data-center/a40/ (NVIDIA A40 datasheet)"
_L4 = "https://www.nvidia.com/en-us/data-center/l4/ (NVIDIA L4 Tensor Core GPU datasheet)"
_GA102 = (
    "https://www.nvidia.com/content/PDF/nvidia-ampere-ga-102-gpu-architecture-whitepaper-v2.pdf"
    " (NVIDIA Ampere GA102 GPU Architecture whitepaper, GeForce RTX 3090 column)"
)
_ADA = (
    "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf"
    " (NVIDIA Ada GPU Architecture whitepaper, GeForce RTX 4090 column)"
)
_V100 = (
    "https://images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf"
    " (NVIDIA V100 datasheet, SXM2)"
)
_T4 = (
    "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf"
    " (NVIDIA T4 datasheet)"
)


def _cpu_spec() -> DeviceSpec:
    """A generic CPU sized to this machine: its physical memory and core count."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: a stated generic figure
        memory = 16 * GiB
    cores = os.cpu_count() or 1
    # Generic x86-64 core: 2.5 GHz, two 256-bit FMA pipes = 32 fp32 FLOP per cycle (AVX2; Intel
    # 64-ia-32 optimization manual, Skylake/Zen "two FMA units"); bf16 runs at the same rate
    # without AMX. Bandwidth: one DDR4-3200 channel, 25.6 GB/s (JEDEC JESD79-4). These make CPU
    # times rough; the CPU target is for checking memory, not for predicting time.
    flops = cores * 2.5e9 * 32
    return DeviceSpec(
        name="cpu",
        description=f"this machine's CPU ({cores} cores, generic figures)",
        kind="cpu",
        memory_bytes=memory,
        bf16_flops=flops,
        fp16_flops=flops,
        fp32_flops=flops,
        memory_bandwidth_bytes_per_s=25.6e9,
        host_link_bytes_per_s=25.6e9,
        compute_capability=None,
        # The interpreter, torch and the OS: no CUDA context, but not all RAM is the process's.
        context_bytes=1 * GiB,
        fragmentation_share=0.05,
        source="generic x86-64 (see remat/devices.py); memory from os.sysconf on this machine",
    )


_GPUS: tuple[DeviceSpec, ...] = (
    DeviceSpec(
        name="h100-80gb",
        description="NVIDIA H100 80GB SXM5",
        kind="cuda",
        # Datasheet: 80 GB HBM3; nvidia-smi reports 81559 MiB.
        memory_bytes=81559 * 1024**2,
        bf16_flops=989.4e12,  # datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity
        fp16_flops=989.4e12,  # datasheet: FP16 Tensor Core 1,979 TFLOPS with sparsity
        fp32_flops=66.9e12,  # datasheet: FP32 67 TFLOPS (SXM)
        memory_bandwidth_bytes_per_s=3.35e12,  # datasheet: 3.35 TB/s
        host_link_bytes_per_s=_PCIE5,  # datasheet: PCIe Gen5 128 GB/s (both directions)
        compute_capability=(9, 0),
        source=_H100,
    ),
    DeviceSpec(
        name="h200",
        description="NVIDIA H200 141GB SXM",
        kind="cuda",
        # Datasheet: 141 GB HBM3e; nvidia-smi reports 143771 MiB.
        memory_bytes=143771 * 1024**2,
        bf16_flops=989.4e12,  # datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity
        fp16_flops=989.4e12,  # datasheet: FP16 Tensor Core 1,979 TFLOPS with sparsity
        fp32_flops=67e12,  # datasheet: FP32 67 TFLOPS
        memory_bandwidth_bytes_per_s=4.8e12,  # datasheet: 4.8 TB/s
        host_link_bytes_per_s=_PCIE5,  # datasheet: PCIe Gen5 128 GB/s (both directions)
        compute_capability=(9, 0),
        source=_H200,
    ),
    DeviceSpec(
        name="a100-80gb",
        description="NVIDIA A100 80GB SXM4",
        kind="cuda",
        memory_bytes=80 * GiB,  # datasheet: 80 GB HBM2e (nvidia-smi: 81920 MiB)
        bf16_flops=312e12,  # datasheet: BFLOAT16 Tensor Core 312 TFLOPS (624 with sparsity)
        fp16_flops=312e12,  # datasheet: FP16 Tensor Core 312 TFLOPS
        fp32_flops=19.5e12,  # datasheet: FP32 19.5 TFLOPS
        memory_bandwidth_bytes_per_s=2.039e12,  # datasheet: 2,039 GB/s
        host_link_bytes_per_s=_PCIE4,  # datasheet: PCIe Gen4 64 GB/s (both directions)
        compute_capability=(8, 0),
        source=_A100,
    ),
    DeviceSpec(
        name="a100-40gb",
        description="NVIDIA A100 40GB SXM4",
        kind="cuda",
        memory_bytes=40 * GiB,  # datasheet: 40 GB HBM2 (nvidia-smi: 40960 MiB)
        bf16_flops=312e12,  # datasheet: BFLOAT16 Tensor Core 312 TFLOPS
        fp16_flops=312e12,  # datasheet: FP16 Tensor Core 312 TFLOPS
        fp32_flops=19.5e12,  # datasheet: FP32 19.5 TFLOPS
        memory_bandwidth_bytes_per_s=1.555e12,  # datasheet: 1,555 GB/s
        host_link_bytes_per_s=_PCIE4,  # datasheet: PCIe Gen4 64 GB/s (both directions)
        compute_capability=(8, 0),
        source=_A100,
    ),
    DeviceSpec(
        name="a40",
        description="NVIDIA A40 48GB",
        kind="cuda",
        memory_bytes=48 * GiB,  # datasheet: 48 GB GDDR6 with ECC
        bf16_flops=149.7e12,  # datasheet: BF16 Tensor 149.7 TFLOPS (299.4 with sparsity)
        fp16_flops=149.7e12,  # datasheet: FP16 Tensor 149.7 TFLOPS
        fp32_flops=37.4e12,  # datasheet: FP32 37.4 TFLOPS
        memory_bandwidth_bytes_per_s=696e9,  # datasheet: 696 GB/s
        host_link_bytes_per_s=_PCIE4,  # datasheet: PCIe Gen4 x16 64 GB/s (both directions)
        compute_capability=(8, 6),
        source=_A40,
    ),
    DeviceSpec(
        name="l4",
        description="NVIDIA L4 24GB",
        kind="cuda",
        memory_bytes=24 * GiB,  # datasheet: 24 GB GDDR6
        bf16_flops=121e12,  # datasheet: BF16 Tensor Core 242 TFLOPS with sparsity
        fp16_flops=121e12,  # datasheet: FP16 Tensor Core 242 TFLOPS with sparsity
        fp32_flops=30.3e12,  # datasheet: FP32 30.3 TFLOPS
        memory_bandwidth_bytes_per_s=300e9,  # datasheet: 300 GB/s
        host_link_bytes_per_s=_PCIE4,  # datasheet: PCIe Gen4 x16 64 GB/s (both directions)
        compute_capability=(8, 9),
        source=_L4,
    ),
    DeviceSpec(
        name="rtx-3090",
        description="NVIDIA GeForce RTX 3090 24GB",
        kind="cuda",
        memory_bytes=24 * GiB,  # whitepaper: 24 GB GDDR6X
        bf16_flops=71e12,  # whitepaper: Peak BF16 Tensor TFLOPS with FP32 Accumulate 71
        fp16_flops=71e12,  # whitepaper: Peak FP16 Tensor TFLOPS with FP32 Accumulate 71
        fp32_flops=35.6e12,  # whitepaper: Peak FP32 TFLOPS (non-Tensor) 35.6
        memory_bandwidth_bytes_per_s=936e9,  # whitepaper: 936 GB/sec
        host_link_bytes_per_s=_PCIE4,  # PCIe Gen4 x16
        compute_capability=(8, 6),
        source=_GA102,
    ),
    DeviceSpec(
        name="rtx-4090",
        description="NVIDIA GeForce RTX 4090 24GB",
        kind="cuda",
        memory_bytes=24 * GiB,  # whitepaper: 24 GB GDDR6X
        bf16_flops=165.2e12,  # whitepaper: Peak BF16 Tensor TFLOPS with FP32 Accumulate 165.2
        fp16_flops=165.2e12,  # whitepaper: Peak FP16 Tensor TFLOPS with FP32 Accumulate 165.2
        fp32_flops=82.6e12,  # whitepaper: Peak FP32 TFLOPS (non-Tensor) 82.6
        memory_bandwidth_bytes_per_s=1008e9,  # whitepaper: 1008 GB/sec
        host_link_bytes_per_s=_PCIE4,  # PCIe Gen4 x16
        compute_capability=(8, 9),
        source=_ADA,
    ),
    DeviceSpec(
        name="v100-32gb",
        description="NVIDIA V100 32GB SXM2",
        kind="cuda",
        memory_bytes=32 * GiB,  # datasheet: 32 GB HBM2
        # Volta's tensor cores have no bfloat16: bf16 matmuls run at the FP32 rate.
        bf16_flops=15.7e12,
        fp16_flops=125e12,  # datasheet: Tensor Performance 125 TFLOPS (SXM2)
        fp32_flops=15.7e12,  # datasheet: Single-Precision 15.7 TFLOPS (SXM2)
        memory_bandwidth_bytes_per_s=900e9,  # datasheet: 900 GB/sec
        host_link_bytes_per_s=_PCIE3,  # datasheet: PCIe 32 GB/sec (both directions)
        compute_capability=(7, 0),
        source=_V100,
    ),
    DeviceSpec(
        name="v100-16gb",
        description="NVIDIA V100 16GB SXM2",
        kind="cuda",
        memory_bytes=16 * GiB,  # datasheet: 16 GB HBM2
        bf16_flops=15.7e12,  # no bfloat16 tensor cores: the FP32 rate
        fp16_flops=125e12,  # datasheet: Tensor Performance 125 TFLOPS (SXM2)
        fp32_flops=15.7e12,  # datasheet: Single-Precision 15.7 TFLOPS (SXM2)
        memory_bandwidth_bytes_per_s=900e9,  # datasheet: 900 GB/sec
        host_link_bytes_per_s=_PCIE3,  # datasheet: PCIe 32 GB/sec (both directions)
        compute_capability=(7, 0),
        source=_V100,
    ),
    DeviceSpec(
        name="t4",
        description="NVIDIA T4 16GB",
        kind="cuda",
        memory_bytes=16 * GiB,  # datasheet: 16 GB GDDR6
        bf16_flops=8.1e12,  # Turing's tensor cores have no bfloat16: the FP32 rate
        fp16_flops=65e12,  # datasheet: Mixed Precision (FP16/FP32) 65 TFLOPS
        fp32_flops=8.1e12,  # datasheet: Single-Precision 8.1 TFLOPS
        memory_bandwidth_bytes_per_s=320e9,  # datasheet: 320+ GB/s
        host_link_bytes_per_s=_PCIE3,  # datasheet: PCIe Gen3 x16 32 GB/s (both directions)
        compute_capability=(7, 5),
        source=_T4,
    ),
)

DEVICES: dict[str, DeviceSpec] = {spec.name: spec for spec in _GPUS}
"""The GPUs by name; ``cpu`` is built on lookup (it is sized to this machine)."""

_ALIASES = {
    "h100": "h100-80gb",
    "h100-sxm": "h100-80gb",
    "h200-141gb": "h200",
    "a100": "a100-80gb",
    "v100": "v100-32gb",
    "3090": "rtx-3090",
    "4090": "rtx-4090",
}


def _names() -> list[str]:
    return [*DEVICES, "cpu"]


def is_device_name(name: str) -> bool:
    """Whether ``name`` names a device of the table (or an alias of one).

    Example:
        >>> is_device_name("h100-80gb"), is_device_name("H100"), is_device_name("cuda")
        (True, True, False)
    """
    key = str(name).strip().lower()
    return key in DEVICES or key in _ALIASES or key == "cpu"


def get_device(name: str | DeviceSpec) -> DeviceSpec:
    """The spec of the device called ``name`` (case-insensitive; ``h100`` means ``h100-80gb``).

    Raises:
        ValueError: an unknown name; the message lists the closest names and all of them.

    Example:
        >>> get_device("H100").name, get_device("cpu").kind
        ('h100-80gb', 'cpu')
        >>> get_device("h10-80gb")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: device: got 'h10-80gb'; expected one of ...; fix: did you mean 'h100-80gb'...
    """
    if isinstance(name, DeviceSpec):
        return name
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key == "cpu":
        return _cpu_spec()
    if key in DEVICES:
        return DEVICES[key]
    close = difflib.get_close_matches(key, _names() + list(_ALIASES), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(_ALIASES.get(c, c)) for c in close)}? " if close else ""
    raise ValueError(
        f"device: got {name!r}; expected one of {', '.join(_names())}; fix: {hint}pass one of"
        " the listed names (remat/devices.py has their figures)"
    )
