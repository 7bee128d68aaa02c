"""scripts/gpu_check.sh --rehearse, so that the GPU check cannot rot between GPU leases: every step
the CPU can run (versions, tests/gpu collected and skipped, the estimate half, a tiny bench, the
summary), the files it leaves, and the summary's fields with ``null`` where only a GPU fills them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXPECTED_FILES = {
    "summary.json",
    "run.log",
    "gpu-tests.log",
    "estimate.json",
    "estimate.md",
    "bench.json",
    "bench.md",
    "bench.png",
}


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _without_network() -> list[str]:
    """``unshare -rn`` where this machine allows it: the rehearsal then runs in a network
    namespace of its own, with no interface up, so any use of the network fails it."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    probe = subprocess.run([unshare, "-rn", "true"], capture_output=True)
    return [unshare, "-rn"] if probe.returncode == 0 else []


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("gpu-check")
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        # no network: pip (unused) and Hugging Face are told so; the script sets them too
        "PIP_NO_INDEX": "1",
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    done = subprocess.run(
        [*_without_network(), "bash", "scripts/gpu_check.sh", "--rehearse"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    return done, out


def test_rehearsal_passes_and_leaves_the_eight_files(rehearsal: tuple) -> None:
    done, out = rehearsal
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert names == EXPECTED_FILES
    assert len(names) <= 8  # what the device tool brings back
    assert "torch: " + torch.__version__ in done.stdout  # the versions it found are printed


def test_rehearsal_summary_has_the_fields_the_gpu_run_fills(rehearsal: tuple) -> None:
    _, out = rehearsal
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rehearsal"] is True and summary["ok"] is True
    assert summary["gpu"] is None  # only a GPU fills it
    assert summary["versions"]["torch"] == torch.__version__
    assert summary["files"] == sorted(EXPECTED_FILES)
    steps = summary["steps"]
    assert set(steps) == {"versions", "tests", "estimate", "bench", "bench_compile"}
    assert all(steps[s]["exit_code"] == 0 for s in ("versions", "tests", "estimate", "bench"))
    assert steps["bench_compile"]["skipped"] is True
    # tests/gpu is collected and skipped without CUDA; the _compat checks run on any torch
    tests = summary["tests"]
    assert tests["skipped"] > 0 and tests["passed"] > 0
    assert tests["failed"] == 0 and tests["errors"] == 0 and tests["not_passed"] == []
    log = (out / "gpu-tests.log").read_text()
    assert "SKIPPED" in log and "needs CUDA" in log
    # the estimate half ran: every case and plan predicted; measured is left to the GPU
    estimate = summary["estimate"]
    assert estimate["device"] == "h100-80gb"
    assert {(row["case"], row["plan"]) for row in estimate["cases"]} == {
        (case, plan) for case in ("gpt", "llama") for plan in ("none", "full", "solver")
    }
    for row in estimate["cases"]:
        assert row["predicted_peak_bytes"] > 0
        assert row["measured_peak_bytes"] is None and row["relative_error"] is None
    assert estimate["max_abs_relative_error"] is None
    assert [row["strategy"] for row in summary["bench"]][:1] == ["none"]
    assert summary["bench_compile"] is None


def test_rehearsal_estimate_equals_remat_plan_run_alone(rehearsal: tuple) -> None:
    """The comparison's predicted peaks are what ``remat plan ... --json`` prints by itself."""
    _, out = rehearsal
    report = json.loads((out / "estimate.json").read_text())
    case = next(c for c in report["cases"] if c["case"] == "gpt")
    argv = case["estimate"]["command"].split()[1:]
    done = subprocess.run(
        [sys.executable, "-m", "remat.cli.main", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    payload = json.loads(done.stdout)
    assert case["plans"]["none"]["predicted_peak_bytes"] == payload["table"][0]["none_peak_bytes"]
    assert case["plans"]["solver"]["predicted_peak_bytes"] == payload["predicted_peak_bytes"]


def test_unknown_argument_is_refused() -> None:
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--rehears"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2 and "--rehearse" in done.stderr


@pytest.mark.parametrize(
    ("name", "memory_gib", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 79.6, "h100-80gb"),
        ("NVIDIA H100 PCIe", 79.6, "h100-80gb"),
        ("NVIDIA H200", 139.8, "h200"),
        ("NVIDIA A100-SXM4-40GB", 39.4, "a100-40gb"),
        ("NVIDIA A100 80GB PCIe", 79.2, "a100-80gb"),
        ("Tesla V100-SXM2-16GB", 15.8, "v100-16gb"),
        ("NVIDIA GeForce GTX 1080", 8.0, None),
    ],
)
def test_device_for_gpu(name: str, memory_gib: float, expected: str | None) -> None:
    check = _script("gpu_estimate_check")
    assert check.device_for_gpu(name, int(memory_gib * 2**30)) == expected


def test_measure_subtracts_what_the_step_did_not_allocate(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA half of the measurement, with the allocator's counters replaced: the peak is the
    allocator's less what was allocated before the step beyond the step's own tensors (here
    counted by hand: each storage rounded up to 512 bytes, as CUDA's allocator does)."""
    check = _script("gpu_estimate_check")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))  # 64 B, 16 B each
    built = SimpleNamespace(model=model, example_inputs=(torch.ones(2, 4),), loss_fn=None)
    # parameters 4 x 512, AdamW's two moments of each 8 x 512, the batch 512
    step_tensors_bytes = 4 * 512 + 8 * 512 + 512
    workspace_bytes = 1 << 20
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(
        torch.cuda, "memory_allocated", lambda: step_tensors_bytes + workspace_bytes
    )
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 5 * 2**20)
    import remat

    measured = check.measure(built, remat.Plan(actions={}), on_cuda=True)
    assert measured["allocator_peak_bytes"] == 5 * 2**20
    assert measured["untracked_bytes"] == workspace_bytes
    assert measured["peak_bytes"] == 5 * 2**20 - workspace_bytes
    assert all(p.grad is None for p in model.parameters())
