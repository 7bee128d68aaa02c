"""Third-party models through remat's CLI, as a user runs it: plan at a budget, then verify.

    .venv/bin/python benchmarks/zoo_check.py                       # the ten zoo models
    .venv/bin/python benchmarks/zoo_check.py gpt2_124m llama_shaped --budget 50%

For each model of ``examples/zoo.py`` (library defaults, train mode, dict batches) it runs
``remat plan zoo:NAME --budget B --json --out plan.json`` with every action the solver has, then
``remat verify zoo:NAME --plan plan.json --json``, each in its own process, and records the
unplanned, least and budget bytes, the plan's measured peak, whether verify found gradients and
buffers bitwise equal and the plan applied, and the wall time of each. Writes
``benchmarks/results/zoo_check.json`` and ``.md`` (with the date, torch and transformers versions).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ZOO = ("gpt2", "llama", "qwen2", "bert", "t5", "vit", "convnext", "swin", "unet2d", "lora")


def _remat(*argv: str) -> tuple[int, dict, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "examples")}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "remat.cli.main", *argv],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    seconds = time.perf_counter() - start
    try:
        payload = json.JSONDecoder().raw_decode(done.stdout)[0]
    except json.JSONDecodeError:
        payload = {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return done.returncode, payload, seconds


def check(name: str, budget: str, sizes: list[str], actions: str | None) -> dict:
    """Plan ``zoo:NAME`` at ``budget`` and verify the plan; a row of the results. ``sizes`` are
    ``--batch N`` / ``--seq N`` arguments for both commands; ``actions`` limits the solver."""
    with tempfile.TemporaryDirectory() as folder:
        plan_path = str(Path(folder) / "plan.json")
        extra = [*sizes, *(["--actions", actions] if actions else [])]
        plan_code, plan, plan_s = _remat(
            "plan", f"zoo:{name}", "--budget", budget, "--json", "--out", plan_path, *extra
        )
        row = {
            "model": name,
            "budget": budget,
            "plan_exit": plan_code,
            "plan_s": round(plan_s, 1),
            **{
                key: plan.get(key)
                for key in (
                    "status",
                    "unplanned_peak_bytes",
                    "min_peak_bytes",
                    "budget_bytes",
                    "predicted_peak_bytes",
                    "measured_peak_bytes",
                )
            },
            "actions": sorted(set((plan.get("plan") or {}).get("actions", {}).values())),
        }
        if plan_code != 0:
            return {**row, "error": plan.get("error")}
        verify_code, verified, verify_s = _remat(
            "verify", f"zoo:{name}", "--plan", plan_path, "--json", *sizes
        )
    return {
        **row,
        "verify_exit": verify_code,
        "verify_s": round(verify_s, 1),
        "bitwise": bool(verified.get("grads_equal") and verified.get("buffers_equal")),
        "applied": verified.get("applied"),
        "verify_planned_peak_bytes": verified.get("measured_peak_bytes"),
    }


def _markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| model | unplanned | least | budget | measured | fits | actions | bitwise | applied"
        " | plan s | verify s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fits = r.get("measured_peak_bytes") is not None and r["measured_peak_bytes"] <= (
            r.get("budget_bytes") or 0
        )
        lines.append(
            f"| {r['model']} | {r.get('unplanned_peak_bytes')} | {r.get('min_peak_bytes')} |"
            f" {r.get('budget_bytes')} | {r.get('measured_peak_bytes')} | {'yes' if fits else 'NO'}"
            f" | {', '.join(r.get('actions', []))} | {r.get('bitwise')} | {r.get('applied')}"
            f" | {r.get('plan_s')} | {r.get('verify_s')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(ZOO), help="zoo factory names")
    parser.add_argument("--budget", default="50%")
    parser.add_argument("--batch", type=int, help="batch size for every model (factory default)")
    parser.add_argument("--seq", type=int, help="sequence length, for the models that take one")
    parser.add_argument("--actions", help="what the solver may use (default: every action)")
    parser.add_argument("--out", default=str(RESULTS / "zoo_check"), help="path without suffix")
    args = parser.parse_args(argv)
    import torch
    import transformers

    sizes = [*(["--batch", str(args.batch)] if args.batch else [])]
    sizes += ["--seq", str(args.seq)] if args.seq else []
    rows = []
    for name in args.models:
        row = check(name, args.budget, sizes, args.actions)
        print(json.dumps(row), flush=True)
        rows.append(row)
    header = (
        f"Measured {datetime.date.today().isoformat()} on {platform.machine()} CPU"
        f" ({os.cpu_count()} cores), torch {torch.__version__}, transformers"
        f" {transformers.__version__}: `remat plan zoo:NAME --budget {args.budget}"
        f"{' ' + ' '.join(sizes) if sizes else ''}"
        f"{' --actions ' + args.actions if args.actions else ''}` then `remat verify`."
        " Bytes are the full training step's (AdamW)."
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"format_version": 1, "note": header, "rows": rows}, indent=1) + "\n"
    )
    out.with_suffix(".md").write_text(_markdown(rows, header))
    ok = all(r.get("plan_exit") == 0 and r.get("verify_exit") == 0 for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
