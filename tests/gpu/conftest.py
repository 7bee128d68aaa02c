"""GPU tests: run only where CUDA is available (scripts/gpu_check.sh on a lent machine).

Without CUDA every test here is skipped at collection, before any of them touches the device.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# cuBLAS is deterministic only with a fixed workspace configuration, read when its handle is first
# made: set here, at collection, before any test runs a matmul on the device.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

collect_ignore_glob: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)


@pytest.fixture
def deterministic() -> Iterator[None]:
    """Deterministic kernels for tests that compare gradients bit for bit.

    The fused attention backward kernels (flash, memory-efficient) accumulate with atomics unless
    ``torch.use_deterministic_algorithms(True)`` (not ``warn_only``) is set; then they take their
    deterministic path, and cuDNN's attention, which has none, is not chosen. Without it two runs
    of the same model need not give equal gradients, remat or not.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)
