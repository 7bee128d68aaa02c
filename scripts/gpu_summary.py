"""The two ends of scripts/gpu_check.sh: the versions it found, and its JSON summary.

``versions --out PATH``: prints the interpreter, torch (CUDA, cuDNN), the GPU and the libraries the
GPU machine holds, and writes them as JSON.

``summary --out DIR --work DIR [--rehearse]``: reads what the steps left (their exit codes and
seconds, the tests' JUnit XML, the bench JSONs, the estimate comparison) and writes
``DIR/summary.json``. Every field the GPU run fills is present in a rehearsal too, ``null`` where
only a GPU can fill it, so a rehearsal checks the summary's shape.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = (
    "transformers",
    "peft",
    "timm",
    "lightning",
    "accelerate",
    "pytest",
    "hypothesis",
    "matplotlib",
    "numpy",
)
OUT_FILES = (
    "summary.json",
    "run.log",
    "gpu-tests.log",
    "estimate.json",
    "estimate.md",
    "bench.json",
    "bench.md",
    "bench.png",
)
"""Everything gpu_check.sh leaves under $OUT (the device tool brings back at most 8 files)."""
STEPS = ("versions", "tests", "estimate", "bench", "bench_compile")


def versions() -> dict[str, Any]:
    """Versions of the interpreter, torch, CUDA, cuDNN, the GPU, remat and the libraries found
    (``None``: not installed)."""
    import torch

    found: dict[str, Any] = {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_memory_bytes": (
            torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
        ),
        "compute_capability": (
            list(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None
        ),
    }
    for name in LIBRARIES:
        try:  # the installed distribution's version: importing them all takes seconds
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    import remat  # from src/ on the GPU machine, where it is not installed

    found["remat"] = f"{remat.__version__} ({Path(remat.__file__).parent})"
    return found


def _tests(junit: Path) -> dict[str, Any]:
    counts: dict[str, Any] = {"passed": None, "failed": None, "errors": None, "skipped": None}
    counts["not_passed"] = []
    if not junit.is_file():
        return counts
    root = ET.parse(junit).getroot()
    cases = list(root.iter("testcase"))
    failed = [c for c in cases if c.find("failure") is not None]
    errors = [c for c in cases if c.find("error") is not None]
    skipped = [c for c in cases if c.find("skipped") is not None]
    counts.update(
        passed=len(cases) - len(failed) - len(errors) - len(skipped),
        failed=len(failed),
        errors=len(errors),
        skipped=len(skipped),
        not_passed=[f"{c.get('classname')}::{c.get('name')}" for c in failed + errors],
    )
    return counts


def _bench(path: Path) -> list[dict[str, Any]] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    keys = ("strategy", "status", "peak_bytes", "allocator_peak_bytes", "predicted_peak_bytes")
    keys += ("step_ms", "overhead", "budget_met", "notes")
    return [{key: row.get(key) for key in keys} for row in data.get("results", [])]


def _estimate(path: Path) -> dict[str, Any]:
    empty: dict[str, Any] = {"device": None, "cases": [], "max_abs_relative_error": None}
    if not path.is_file():
        return empty
    data = json.loads(path.read_text())
    rows, errors = [], []
    for case in data.get("cases", []):
        for plan, row in case.get("plans", {}).items():
            rows.append(
                {
                    "case": case["case"],
                    "plan": plan,
                    "attention_kernel_on_device": case.get("attention_kernel_on_device"),
                    "predicted_peak_bytes": row.get("predicted_peak_bytes"),
                    "measured_peak_bytes": row.get("measured_peak_bytes"),
                    "relative_error": row.get("relative_error"),
                }
            )
            if row.get("relative_error") is not None:
                errors.append(abs(row["relative_error"]))
    return {
        "device": data.get("device"),
        "cases": rows,
        "errors": data.get("errors", []),
        "max_abs_relative_error": max(errors) if errors else None,
    }


def _steps(path: Path) -> dict[str, Any]:
    steps: dict[str, Any] = {name: None for name in STEPS}
    if path.is_file():
        for line in path.read_text().splitlines():
            name, code, seconds, limit = line.split("\t")
            if code == "skipped":  # not run in a rehearsal (torch.compile takes minutes on a CPU)
                steps[name] = {"exit_code": None, "skipped": True, "seconds": 0, "limit_s": 0}
            else:
                steps[name] = {
                    "exit_code": int(code),
                    "seconds": int(seconds),
                    "limit_s": int(limit),
                }
    return steps


def summary(out: Path, work: Path, rehearse: bool) -> dict[str, Any]:
    """The summary of one gpu_check.sh run, from what its steps left in ``out`` and ``work``."""
    found = (
        json.loads((work / "versions.json").read_text())
        if (work / "versions.json").is_file()
        else {}
    )
    steps = _steps(work / "steps.tsv")
    result = {
        "kind": "remat.gpu_check",
        "rehearsal": rehearse,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gpu": found.get("gpu"),
        "versions": found,
        "steps": steps,
        "ok": all(
            step is not None and (step.get("skipped") or step["exit_code"] == 0)
            for step in steps.values()
        ),
        "tests": _tests(work / "gpu-tests.xml"),
        "estimate": _estimate(out / "estimate.json"),
        "bench": _bench(out / "bench.json"),
        "bench_compile": _bench(work / "bench-compile" / "bench.json"),
    }
    result["files"] = sorted({*(p.name for p in out.iterdir() if p.is_file()), "summary.json"})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("versions", help="print and write the versions found")
    v.add_argument("--out", required=True, type=Path)
    s = sub.add_parser("summary", help="write OUT/summary.json")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--work", required=True, type=Path)
    s.add_argument("--rehearse", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "versions":
        found = versions()
        args.out.write_text(json.dumps(found, indent=1) + "\n")
        for key, value in found.items():
            print(f"{key:>20}: {value}")
        return 0
    result = summary(args.out, args.work, args.rehearse)
    (args.out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    print(
        json.dumps({k: result[k] for k in ("rehearsal", "gpu", "ok", "tests", "files")}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
