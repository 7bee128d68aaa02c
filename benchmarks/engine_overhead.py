"""What remat's engines cost one unit, in Python, apart from the ops (issue 18, item 1).

One block of the built-in GPT (``d_model`` 256) on a tiny input (batch 1, 8 tokens), so that its
ops take microseconds and what a step spends above the unplanned one is the engines' own work:
the op log's ``__torch_dispatch__`` for every op of the forward, the saved-tensor hooks, the
replay's dispatch of every op in backward, and the bookkeeping around them. Per action: the least
of ``--rounds`` forwards and of as many forwards and backwards (the action applied once, warmed
up), and the difference to ``keep``. ``selective:all`` names every op of the block, so its replay
runs no op; ``selective:A`` is the save set the solver picks for most blocks at the GPT's 50%
budget (``ops.add.addmm.clone.div_``), whose replay runs the attention core, the norms and GELU.

On real sizes the same Python costs more per op (the ops' data evicts it from the caches between
calls): ``remat.profiling.options.time_unit_engines`` measures that, per unit, for the cost model.
This script is the steady yardstick for changes to the engine: its numbers move by a few percent
between runs, where a whole step's move by more than the engine costs.

    .venv/bin/python benchmarks/engine_overhead.py [--rounds 300] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import remat
from remat.apply.selective import lenient_save_sets
from remat.models import build_builtin

ACTIONS = {
    "keep": "keep",
    "recompute": "recompute",
    "offload": "offload",
    "selective:A": "selective:ops.add.addmm.clone.div_",
    "selective:all": "selective:ops.add.addmm.clone.div_.gelu.layer_norm.mul.softmax",
}


def measure(rounds: int) -> dict[str, dict[str, float]]:
    """Per action: the least forward and forward+backward time (ms) of one tiny GPT block."""
    torch.manual_seed(0)
    built = build_builtin("gpt", n_layer=1)
    block = built.model.get_submodule("blocks.0")
    x = torch.randn(1, 8, 256, requires_grad=True)
    found: dict[str, dict[str, float]] = {}
    for name, action in ACTIONS.items():
        plan = remat.Plan(actions={"blocks.0": action}, units=["blocks.0"])
        forward_s, step_s = [], []
        with lenient_save_sets(), remat.apply_(built.model, plan):
            for _ in range(30):  # warm-up: the plan's first calls set up
                block(x).sum().backward()
            for _ in range(rounds):
                start = time.perf_counter()
                y = block(x)
                middle = time.perf_counter()
                y.sum().backward()
                forward_s.append(middle - start)
                step_s.append(time.perf_counter() - start)
        found[name] = {"forward_ms": min(forward_s) * 1e3, "step_ms": min(step_s) * 1e3}
    keep = found["keep"]
    for row in found.values():
        row["forward_over_keep_ms"] = row["forward_ms"] - keep["forward_ms"]
        row["step_over_keep_ms"] = row["step_ms"] - keep["step_ms"]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="timed calls per action")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    found = measure(args.rounds)
    print(f"{'action':15s} {'forward ms':>10s} {'+ keep':>8s} {'fwd+bwd ms':>10s} {'+ keep':>8s}")
    for name, row in found.items():
        print(
            f"{name:15s} {row['forward_ms']:10.3f} {row['forward_over_keep_ms']:+8.3f}"
            f" {row['step_ms']:10.3f} {row['step_over_keep_ms']:+8.3f}"
        )
    if args.out:
        result: dict[str, Any] = {
            "format_version": 1,
            "kind": "remat.benchmark.engine_overhead",
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "load_average": os.getloadavg()[0],
            "torch_version": torch.__version__,
            "rounds": args.rounds,
            "actions": ACTIONS,
            "results": found,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
