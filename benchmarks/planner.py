"""Planner claims that are about time, measured in one run on this machine.

1. Solve time for 96 units (issue: under 1 s), on the profile of a 96-layer GPT built on meta.
2. Predicted against measured step-time overhead of solver plans on the built-in GPT and CNN (issue:
   within 10%, relative): every plan is timed in the same run as the unplanned step, interleaved
   (A B C A B C ...), medians of several steps after a warm-up; overhead = planned / unplanned.

Run (takes a few minutes on 2 cores; run it alone, CPU timing is noisy):

    .venv/bin/python benchmarks/planner.py --out benchmarks/results/planner.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date

import torch

import remat
from remat.benchmarking.run import keep_freed_host_memory
from remat.models import build_builtin
from remat.profiling.step import make_optimizer, preserved_state, training_step

BUDGETS = ["80%", "60%", "40%", "25%"]


def solve_time_96() -> dict:
    torch.manual_seed(0)
    with torch.device("meta"):
        built = build_builtin("gpt", n_layer=96, d_model=512, n_head=8, seq=512, batch=4)
    prof = remat.profile(built.model, built.example_inputs, loss_fn=built.loss_fn)
    timings = []
    for budget in BUDGETS:
        start = time.perf_counter()
        result = remat.solve(prof, budget)
        timings.append(
            {"budget": budget, "status": result.status, "solve_time_s": time.perf_counter() - start}
        )
    return {
        "units": len(prof.units),
        "solves": timings,
        "max_solve_time_s": max(t["solve_time_s"] for t in timings),
    }


def step_ms(built, optimizer) -> float:
    start = time.perf_counter()
    training_step(built.model, built.example_inputs, loss_fn=built.loss_fn, optimizer=optimizer)
    return (time.perf_counter() - start) * 1e3


def overheads(name: str, steps: int) -> list[dict]:
    torch.manual_seed(0)
    built = build_builtin(name)
    prof = remat.profile(built.model, built.example_inputs, loss_fn=built.loss_fn, repeats=steps)
    plans = {"none": remat.baseline_plan("none", prof.unit_fqns)}
    predicted = {"none": 1.0}
    for budget in BUDGETS:
        result = remat.solve(prof, budget)
        if result.status != "INFEASIBLE":
            plans[f"remat:{budget}"] = result.plan
            predicted[f"remat:{budget}"] = result.predicted_overhead
    samples: dict[str, list[float]] = {label: [] for label in plans}
    with preserved_state(built.model):
        optimizer = make_optimizer("adamw", built.model)
        for round_ in range(steps + 1):  # round 0 is warm-up, reported apart
            for label, plan in plans.items():
                with remat.apply_(built.model, plan):
                    elapsed = step_ms(built, optimizer)
                if round_:
                    samples[label].append(elapsed)
    base = statistics.median(samples["none"])
    rows = []
    for label in plans:
        measured = statistics.median(samples[label]) / base
        rows.append(
            {
                "model": name,
                "strategy": label,
                "predicted_overhead": predicted[label],
                "measured_overhead": measured,
                "relative_error": abs(measured - predicted[label]) / predicted[label],
                "samples_ms": samples[label],
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()
    # As remat bench does: malloc keeps freed memory, so the unplanned step pays no page faults for
    # what a plan's step freed (without it, interleaved plans measured faster than no plan).
    kept_freed = keep_freed_host_memory()
    result = {
        "format_version": 1,
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch_version": torch.__version__,
        "device": "cpu",
        "dtype": "float32",
        "seed": 0,
        "malloc_keeps_freed_memory": kept_freed,
        "solve_96": solve_time_96(),
        "overhead": overheads("gpt", args.steps) + overheads("cnn", args.steps),
    }
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as stream:
            stream.write(text + "\n")
    for row in result["overhead"]:
        sys.stdout.write(
            f"{row['model']:4s} {row['strategy']:10s} predicted {row['predicted_overhead']:.3f}"
            f" measured {row['measured_overhead']:.3f} error {row['relative_error']:.1%}\n"
        )
    sys.stdout.write(f"96-unit solve: {result['solve_96']['max_solve_time_s']:.3f} s (max of 4)\n")
    ok = result["solve_96"]["max_solve_time_s"] < 1.0 and all(
        r["relative_error"] <= 0.10 for r in result["overhead"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
