"""Where the time of a planned step goes, above the unplanned one (issue 18, item 1).

On the built-in GPT at a budget (default: 485904588 bytes, static plus half the activations, the
budget of ``half_budget_floor.py``), remat's solver plans the step; then, in interleaved rounds
after a warm-up, this script times the unplanned step, the planned step, and one forward with every
op of every unit timed (``time_unit_ops``). It splits the planned step's extra time into:

- ``replay_ops_ms``: the op time of what the plan's replays run in backward (per unit, the ops
  the engine reported replaying, ``region.last_replayed``, at their median measured time); this is
  work any engine running the same plan does;
- ``remat_python_ms``: time spent in remat's own Python (functions under ``src/remat``: the op
  log's ``__torch_dispatch__``, saved-tensor hooks, replay bookkeeping), from ``cProfile`` of one
  planned step, scaled to the step's unprofiled time (an upper bound, and a loose one: cProfile
  slows Python more than it slows kernels, and its total misses the kernel time of ops called
  through ``OpOverload.__call__``, 0.13 s of profile for ten GPT block forwards that took 0.7 s on
  2026-12-08, so the scale factor inflates the Python; ``engine_overhead.py`` measures the engines
  directly, on a tiny block);
- ``dispatch_python_ms``: torch's Python around a dispatch mode (``torch/_ops.py``,
  ``torch/utils/_python_dispatch.py``), counted the same way: what the op log costs beyond remat;
- ``rest_ms``: what is left (allocation, cache effects, timing noise).

The solver's predicted overhead is printed beside the measured one. Prints a table and writes JSON
(``format_version`` 1).

    .venv/bin/python benchmarks/engine_cost.py [--budget 485904588] [--rounds 7]
        [--out benchmarks/results/engine_cost.json]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import logging
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import remat
from remat.benchmarking.run import keep_freed_host_memory
from remat.models import build_builtin
from remat.profiling.options import time_unit_ops
from remat.profiling.step import make_optimizer, preserved_state, training_step

DISPATCH_FILES = ("torch/_ops.py", "torch/utils/_python_dispatch.py", "torch/_library/")


def _timed_step(model: Any, inputs: Any, loss_fn: Any, optimizer: Any) -> float:
    start = time.perf_counter()
    training_step(model, inputs, loss_fn=loss_fn, optimizer=optimizer)
    elapsed_ms = (time.perf_counter() - start) * 1e3
    for param in model.parameters():
        param.grad = None
    return elapsed_ms


def _python_ms(profiler: cProfile.Profile) -> tuple[float, float, float]:
    """(remat's own Python, torch's dispatch-mode Python, the whole profiled run) in ms."""
    stats = pstats.Stats(profiler)
    remat_s = dispatch_s = 0.0
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        path = filename.replace("\\", "/")
        if "/src/remat/" in path or "/site-packages/remat/" in path:
            remat_s += tottime
        elif any(part in path for part in DISPATCH_FILES):
            dispatch_s += tottime
    return remat_s * 1e3, dispatch_s * 1e3, stats.total_tt * 1e3  # type: ignore[attr-defined]


def measure(
    budget: int | str, rounds: int, log: logging.Logger, sizes: dict[str, int] | None = None
) -> dict[str, Any]:
    """Plan the GPT (``sizes``: overrides of its defaults) at ``budget`` and split the planned
    step's extra time (see the module)."""
    keep_freed_host_memory()
    torch.manual_seed(0)
    built = build_builtin("gpt", **(sizes or {}))
    model, inputs, loss_fn = built.model, built.example_inputs, built.loss_fn
    step = remat.Step(model, inputs, loss_fn=loss_fn, optimizer="adamw")
    prof = remat.profile_step(step, progress=log.info)
    result = remat.solve(prof, budget)
    plan = result.plan
    modules = dict(model.named_modules())
    units = [modules[fqn] for fqn in prof.unit_fqns]
    unplanned, planned, op_runs = [], [], []
    with preserved_state(model):
        optimizer = make_optimizer("adamw", model)
        for round_ in range(rounds + 1):
            log.info("engine_cost: round %d/%d", round_, rounds)
            plain_ms = _timed_step(model, inputs, loss_fn, optimizer)
            with remat.apply_(model, plan):
                _timed_step(model, inputs, loss_fn, optimizer)  # a plan's first step sets up
                plan_ms = _timed_step(model, inputs, loss_fn, optimizer)
            ops = time_unit_ops(model, inputs, units, repeats=1)
            if round_ > 0:
                unplanned.append(plain_ms)
                planned.append(plan_ms)
                op_runs.append(ops)
        with remat.apply_(model, plan):
            _timed_step(model, inputs, loss_fn, optimizer)
            regions = [getattr(m.__dict__.get("forward"), "__remat_region__", None) for m in units]
            replayed = [set(r.last_replayed) if r is not None else set() for r in regions]
            profiler = cProfile.Profile()
            profiler.enable()
            _timed_step(model, inputs, loss_fn, optimizer)
            profiler.disable()
    times = [
        {key: statistics.median(run[i][key][0] for run in op_runs) for key in op_runs[0][i]}
        for i in range(len(units))
    ]
    actions = plan.to_dict()["actions"]
    replay_ms = 0.0
    for fqn, unit_times, keys in zip(prof.unit_fqns, times, replayed, strict=True):
        action = actions.get(fqn, "keep")
        if action.startswith("selective:"):  # the ops the engine replayed
            replay_ms += sum(unit_times.get(key, 0.0) for key in keys)
        elif action != "keep":  # recompute, segment, nested: the whole forward again
            replay_ms += sum(unit_times.values()) * (2 if action.startswith("nested") else 1)
    plain = statistics.median(unplanned)
    with_plan = statistics.median(planned)
    remat_ms, dispatch_ms, profiled_ms = _python_ms(profiler)
    scale = with_plan / profiled_ms if profiled_ms > 0 else 1.0
    remat_ms, dispatch_ms = remat_ms * scale, dispatch_ms * scale
    extra = with_plan - plain
    return {
        "format_version": 1,
        "kind": "remat.benchmark.engine_cost",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg()[0],
        "torch_version": torch.__version__,
        "model": f"gpt {sizes or '(built-in defaults)'}",
        "budget_bytes": result.budget_bytes,
        "plan": plan.to_dict()["actions"],
        "rounds": rounds,
        "unplanned_step_ms": plain,
        "planned_step_ms": with_plan,
        "measured_overhead": with_plan / plain,
        "predicted_overhead": result.predicted_overhead,
        "extra_ms": extra,
        "replay_ops_ms": replay_ms,
        "remat_python_ms": remat_ms,
        "dispatch_python_ms": dispatch_ms,
        "rest_ms": extra - replay_ms - remat_ms - dispatch_ms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="485904588", help="bytes, a size or a percentage")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds after a warm-up")
    parser.add_argument("--out", default="benchmarks/results/engine_cost.json")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="GPT sizes, e.g. n_layer=2"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    log = logging.getLogger("engine_cost")
    logging.getLogger("remat.apply").setLevel(logging.WARNING)
    budget: int | str = int(args.budget) if args.budget.isdigit() else args.budget
    sizes = {key: int(value) for key, _, value in (item.partition("=") for item in args.set)}
    found = measure(budget, args.rounds, log, sizes)
    step = found["unplanned_step_ms"]
    print(f"plan at {found['budget_bytes']:,} bytes: {found['plan']}")
    print(
        f"measured overhead {found['measured_overhead']:.3f}, predicted {found['predicted_overhead']:.3f}"
    )
    for name in ("extra_ms", "replay_ops_ms", "remat_python_ms", "dispatch_python_ms", "rest_ms"):
        print(f"  {name:20s} {found[name]:9.1f} ms  ({found[name] / step:+.3f} of a step)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(found, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
