"""Check the FSDP2 per-rank memory model against measured FSDP2 steps, on CPU, with no GPU.

For each built-in model, world size and plan: profile the model in one process, predict one rank's
peak under FSDP2 (``remat.profile(..., world_size=N, fsdp=True)`` then ``remat.simulate``), then run
a real FSDP2 training step as rank 0 of N on the fake process group (collectives do nothing; FSDP2
allocates, gathers into, frees and reduce-scatters from buffers of the real sizes) and measure it
with ``remat.track_memory``. Prints one line per case and a summary; exit code 1 if any prediction
is below its measurement.

    PYTHONPATH=src python scripts/check_fsdp_model.py
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore  # private torch test API

import remat
from remat.integrations.distributed import fully_shard_units
from remat.models.spec import load_model
from remat.profiling.step import make_optimizer, measure_step

CASES = [
    ("gpt", {}, "adamw"),
    ("gpt", {"n_layer": 4, "d_model": 36, "n_head": 2, "vocab": 100}, "adamw"),
    ("mlp", {}, "adamw"),
    ("mlp", {}, "sgd"),
    ("cnn", {}, "adamw"),
    ("unet", {}, "adamw"),
]
WORLD_SIZES = (3, 8)
PLANS = ("none", "full", "every_n:2")


def main() -> int:
    rows = []
    for world_size in WORLD_SIZES:
        dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
        for name, overrides, optimizer in CASES:
            torch.manual_seed(0)
            built = load_model(
                name, batch=2, seq=16 if name == "gpt" else None, overrides=overrides
            )
            ranked = remat.profile(
                built.model,
                built.example_inputs,
                loss_fn=built.loss_fn,
                optimizer=optimizer,
                repeats=0,
                world_size=world_size,
                fsdp=True,
            )
            for strategy in PLANS:
                plan = remat.baseline_plan(strategy, ranked.unit_fqns)
                model = copy.deepcopy(built.model)
                remat.apply_(model, plan)
                fully_shard_units(model, ranked.unit_fqns)
                measured = measure_step(
                    model,
                    built.example_inputs,
                    loss_fn=built.loss_fn,
                    optimizer=make_optimizer(optimizer, model),
                ).peak_bytes
                predicted = remat.simulate(ranked, plan).peak_bytes
                label = (
                    f"{name}{'(small)' if overrides else ''} {optimizer} N={world_size} {strategy}"
                )
                rows.append((label, predicted, measured))
                print(
                    f"{label:<36} predicted {predicted:>13,}  measured {measured:>13,}"
                    f"  {100 * (predicted - measured) / measured:+.2f}%",
                    flush=True,
                )
        dist.destroy_process_group()
    exact = sum(p == m for _, p, m in rows)
    below = [label for label, p, m in rows if p < m]
    print(f"{exact} of {len(rows)} exact to the byte; below the measurement: {below or 'none'}")
    return 1 if below else 0


if __name__ == "__main__":
    sys.exit(main())
