"""Is my environment ready? torch, CUDA, cuDNN and NCCL versions, the devices, what remat uses.

:func:`collect_env` gathers an :class:`EnvReport`; ``remat env`` prints it. Collecting is cheap and
never initialises CUDA on a machine where ``torch.cuda.is_available()`` is False (it only reads
device properties where CUDA is available). Nothing here prints; problems are logged and noted.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import platform
from dataclasses import dataclass, field
from typing import Any

import torch

from remat._compat import MIN_TORCH

__all__ = ["DeviceInfo", "EnvReport", "collect_env"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of :meth:`EnvReport.to_dict`'s layout; bumped when a key changes meaning or goes away."""

_MIN_TORCH = MIN_TORCH  # pyproject.toml: torch>=2.11


@dataclass(frozen=True, kw_only=True)
class DeviceInfo:
    """One accelerator that torch can see.

    Attributes:
        index: the device index (``cuda:<index>``); 0 for MPS.
        name: the device name as the driver reports it, e.g. ``"NVIDIA H100 80GB HBM3"``.
        total_memory_bytes: the device's total memory, or None where torch cannot tell (MPS).
        compute_capability: ``"9.0"`` for CUDA devices, None otherwise.
        bf16_supported: whether bfloat16 runs natively (CUDA compute capability 8.0 or newer).
        kind: ``"cuda"``, ``"mps"`` or ``"cpu"``.

    Example:
        >>> gpu = DeviceInfo(index=0, name="NVIDIA H100", total_memory_bytes=80 * 2**30,
        ...                  compute_capability="9.0", bf16_supported=True, kind="cuda")
        >>> gpu.kind, gpu.compute_capability, gpu.total_memory_bytes // 2**30
        ('cuda', '9.0', 80)
    """

    index: int
    name: str
    total_memory_bytes: int | None
    compute_capability: str | None
    bf16_supported: bool
    kind: str


@dataclass(frozen=True, kw_only=True)
class EnvReport:
    """What :func:`collect_env` found: versions, CPU facts, devices and remat's default device.

    Attributes:
        format_version: layout version of :meth:`to_dict` (currently 1).
        remat_version: the installed remat's version, ``"0+unknown"`` when not installed.
        python_version: e.g. ``"3.11.7"``.
        platform: ``platform.platform()``, e.g. ``"Linux-6.8.0-x86_64-with-glibc2.35"``.
        torch_version: ``torch.__version__``.
        cuda_version: the CUDA version torch was built with (``torch.version.cuda``), or None.
        cudnn_version: ``torch.backends.cudnn.version()`` (e.g. 90100) when CUDA is available.
        nccl_version: e.g. ``"2.21.5"`` when CUDA is available and torch has NCCL, else None.
        cpu_threads: ``torch.get_num_threads()``, the intra-op threads torch uses on CPU.
        cpu_count: ``os.cpu_count()``, or None where the OS cannot tell.
        cpu_bf16_supported: whether a bfloat16 matmul runs on this CPU.
        devices: the CUDA (or MPS) devices torch can see; empty on a CPU-only machine.
        default_device: the device remat uses: ``"cuda:0"``, ``"mps"`` or ``"cpu"``.
        notes: advice for the reader, e.g. what remat does without a GPU.

    Example:
        >>> report = collect_env()
        >>> report.format_version, report.default_device in ("cuda:0", "mps", "cpu")
        (1, True)
        >>> sorted(report.to_dict())[:3]
        ['cpu_bf16_supported', 'cpu_count', 'cpu_threads']
    """

    format_version: int = FORMAT_VERSION
    remat_version: str
    python_version: str
    platform: str
    torch_version: str
    cuda_version: str | None
    cudnn_version: int | None
    nccl_version: str | None
    cpu_threads: int
    cpu_count: int | None
    cpu_bf16_supported: bool
    devices: list[DeviceInfo] = field(default_factory=list)
    default_device: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (devices become dicts); keeps ``format_version``.

        Example:
            >>> import json
            >>> data = collect_env().to_dict()
            >>> data["format_version"], isinstance(data["devices"], list)
            (1, True)
            >>> json.loads(json.dumps(data)) == data
            True
        """
        return dataclasses.asdict(self)


def collect_env() -> EnvReport:
    """Gather versions, devices and remat's default device; fast, and safe on CPU-only machines.

    CUDA is touched (device properties, cuDNN, NCCL) only where ``torch.cuda.is_available()`` is
    True, so on a machine without a GPU CUDA stays uninitialised.

    Returns:
        An :class:`EnvReport`.

    Example:
        >>> import torch
        >>> report = collect_env()
        >>> report.torch_version == torch.__version__
        True
        >>> report.cpu_threads >= 1, isinstance(report.devices, list)
        (True, True)
    """
    notes: list[str] = []
    cuda_available = _cuda_available()
    mps_available = _mps_available()
    cuda_version = getattr(torch.version, "cuda", None)
    hip_version = getattr(torch.version, "hip", None)

    devices: list[DeviceInfo] = []
    cudnn_version: int | None = None
    nccl_version: str | None = None
    if cuda_available:
        devices = _cuda_devices(hip=hip_version is not None)
        cudnn_version = _cudnn_version()
        nccl_version = _nccl_version()
        if cudnn_version is None:
            notes.append("CUDA is available but cuDNN is not: convolutions will be slow")
    elif mps_available:
        devices = [_mps_device()]

    if cuda_available and devices:
        default_device = "cuda:0"
    elif mps_available:
        default_device = "mps"
    else:
        default_device = "cpu"

    if not cuda_available:
        notes.append("no CUDA device: remat measures on CPU, or from shapes with --device meta")
        if cuda_version is None and hip_version is None:
            notes.append("this torch is a CPU-only build (torch.version.cuda is None)")
        else:
            notes.append(
                f"this torch is built with CUDA {cuda_version or hip_version} but no device or "
                "driver was found (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
            )
    if hip_version is not None:
        notes.append(f"ROCm build (HIP {hip_version}): devices are reported through torch.cuda")
    if mps_available and not cuda_available:
        notes.append("MPS (Apple GPU): peak-memory measurements are less precise than on CUDA")
    for device in devices:
        if device.kind == "cuda" and not device.bf16_supported:
            notes.append(
                f"cuda:{device.index} ({device.name}) has no native bfloat16: "
                "use float16 or float32"
            )
    cpu_bf16 = _cpu_bf16_supported()
    if not cpu_bf16:
        notes.append("bfloat16 matmul fails on this CPU: measure CPU runs in float32")
    if _torch_too_old(torch.__version__):
        notes.append(
            f"torch {torch.__version__} is older than remat supports "
            f"(torch>={_MIN_TORCH[0]}.{_MIN_TORCH[1]})"
        )

    return EnvReport(
        remat_version=_remat_version(),
        python_version=platform.python_version(),
        platform=platform.platform(),
        torch_version=str(torch.__version__),
        cuda_version=cuda_version,
        cudnn_version=cudnn_version,
        nccl_version=nccl_version,
        cpu_threads=int(torch.get_num_threads()),
        cpu_count=os.cpu_count(),
        cpu_bf16_supported=cpu_bf16,
        devices=devices,
        default_device=default_device,
        notes=notes,
    )


def _remat_version() -> str:
    try:
        return importlib.metadata.version("remat")
    except importlib.metadata.PackageNotFoundError:
        logger.debug("remat is not installed (no package metadata); version unknown")
        return "0+unknown"


def _cuda_available() -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver can raise here
        logger.debug("torch.cuda.is_available() raised", exc_info=True)
        return False


def _mps_available() -> bool:
    try:
        return bool(torch.backends.mps.is_available())
    except Exception:
        logger.debug("torch.backends.mps.is_available() raised", exc_info=True)
        return False


def _cuda_devices(*, hip: bool) -> list[DeviceInfo]:
    try:
        count = int(torch.cuda.device_count())
    except Exception:
        logger.warning("CUDA is available but torch.cuda.device_count() failed", exc_info=True)
        return []
    devices = []
    for index in range(count):
        try:
            props = torch.cuda.get_device_properties(index)
        except Exception:
            logger.warning("could not read the properties of cuda:%d", index, exc_info=True)
            continue
        major = int(getattr(props, "major", 0))
        minor = int(getattr(props, "minor", 0))
        # Native bfloat16 needs Ampere (8.0) or newer; ROCm devices that torch sees support it.
        # (torch.cuda.is_bf16_supported() answers only for the current device, so it is not used.)
        bf16 = hip or major >= 8
        devices.append(
            DeviceInfo(
                index=index,
                name=str(props.name),
                total_memory_bytes=int(props.total_memory),
                compute_capability=f"{major}.{minor}",
                bf16_supported=bf16,
                kind="cuda",
            )
        )
    return devices


def _mps_device() -> DeviceInfo:
    total: int | None = None
    try:
        total = int(torch.mps.recommended_max_memory())
    except Exception:
        logger.debug("torch.mps.recommended_max_memory() is unavailable", exc_info=True)
    return DeviceInfo(
        index=0,
        name="Apple MPS",
        total_memory_bytes=total,
        compute_capability=None,
        bf16_supported=_mps_bf16_supported(),
        kind="mps",
    )


def _mps_bf16_supported() -> bool:
    try:
        x = torch.ones(2, 2, dtype=torch.bfloat16, device="mps")
        (x @ x).cpu()
    except Exception:
        return False
    return True


def _cudnn_version() -> int | None:
    try:
        version = torch.backends.cudnn.version()
    except Exception:
        logger.debug("torch.backends.cudnn.version() raised", exc_info=True)
        return None
    return None if version is None else int(version)


def _nccl_version() -> str | None:
    try:
        version = torch.cuda.nccl.version()
    except Exception:  # torch built without NCCL (Windows, macOS, some ROCm builds)
        logger.debug("torch.cuda.nccl.version() raised", exc_info=True)
        return None
    return _format_nccl(version)


def _format_nccl(version: Any) -> str | None:
    """``(2, 21, 5)`` or ``(2, 21, 5, "suffix")`` or the old integer codes -> ``"2.21.5"``."""
    if isinstance(version, tuple | list):
        numbers = [str(part) for part in version[:3]]
        suffix = f"-{version[3]}" if len(version) > 3 and version[3] else ""
        return ".".join(numbers) + suffix
    if isinstance(version, int):
        # NCCL >= 2.9 encodes major*10000 + minor*100 + patch, older ones major*1000 + minor*100.
        if version >= 10000:
            return f"{version // 10000}.{version % 10000 // 100}.{version % 100}"
        return f"{version // 1000}.{version % 1000 // 100}.{version % 100}"
    return None if version is None else str(version)


def _cpu_bf16_supported() -> bool:
    try:
        x = torch.ones(2, 2, dtype=torch.bfloat16)
        result = x @ x
    except Exception:
        logger.debug("bfloat16 matmul failed on CPU", exc_info=True)
        return False
    return bool(result.dtype == torch.bfloat16)


def _torch_too_old(version: str) -> bool:
    try:
        major, minor = (int(part) for part in version.split("+")[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) < _MIN_TORCH
