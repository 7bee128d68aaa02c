"""Every misprediction of the property search, collected instead of failing at the first one.

Draws models and plans as ``test_properties_search.py`` does (its strategies), profiles each
model, measures every plan with the memory oracle (the tracker's device bytes with offload, as
the test does) and writes one row per plan: predicted and measured peak, their relative
difference, where the simulator puts the peak, and the case. No bitwise checks. Prints counts.

    .venv/bin/python tests/integration/collect_property_misses.py misses.json --seed 1 --models 60

``--seed -1``: hypothesis's derandomized draws (of this script's function, not the same models as
the test's derandomized run). Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, given, seed, settings

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import test_properties_search as search_test  # noqa: E402

import remat  # noqa: E402
from memory_oracle import oracle_step_peak  # noqa: E402


def measure_case(case: search_test.ModelCase) -> list[dict[str, Any]]:
    """One row per plan of ``case``: predicted, measured, where."""
    torch.manual_seed(1234)
    model = search_test.Chain(case.width, case.specs, case.skips).train()
    x = torch.randn(case.batch, case.width)
    units = [f"blocks.{i}" for i in range(len(case.specs))]
    state = copy.deepcopy(model.state_dict())
    step = remat.Step(
        model, (x,), loss_fn=search_test.loss_fn, optimizer="sgd", precision=case.precision
    )
    prof = remat.profile(
        model,
        (x,),
        loss_fn=search_test.loss_fn,
        optimizer="sgd",
        units=units,
        options=search_test.OPTIONS,
        precision=case.precision,
        warmup=0,
        repeats=0,
    )
    rows = []
    for index, actions in enumerate(case.plans):
        plan = remat.Plan(actions=dict(zip(units, actions, strict=True)), units=units)
        model.load_state_dict(state)
        with remat.apply_(model, plan):
            if "offload" in actions:
                measured = remat.measure_plan(step)
            else:
                measured = oracle_step_peak(
                    model, (x,), loss_fn=search_test.loss_fn, optimizer="sgd",
                    precision=case.precision,
                )  # fmt: skip
        sim = remat.simulate(prof, plan)
        rows.append(
            {
                "index": index,
                "actions": actions,
                "predicted": sim.peak_bytes,
                "measured": measured,
                "rel": (sim.peak_bytes - measured) / measured,
                "where": sim.where,
                "composed": any(a.startswith(("segment:", "nested:")) for a in actions),
                "offload": "offload" in actions,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=-1)
    parser.add_argument("--models", type=int, default=60)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    count = [0]

    @settings(
        derandomize=args.seed < 0,
        phases=(Phase.explicit, Phase.reuse, Phase.generate),
        max_examples=args.models,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=search_test.model_cases())
    def collect(case: search_test.ModelCase) -> None:
        count[0] += 1
        described = {
            "width": case.width,
            "batch": case.batch,
            "precision": case.precision,
            "skips": case.skips,
            "specs": [[s.kind, s.norm, s.activation, s.dropout] for s in case.specs],
        }
        for row in measure_case(case):
            rows.append({"model": count[0], **row, "case": described})

    if args.seed >= 0:
        collect = seed(args.seed)(collect)
    started = time.time()
    collect()
    args.out.write_text(json.dumps(rows))
    composed = [r for r in rows if r["composed"]]
    over = [r for r in composed if r["rel"] > search_test.TOLERANCE]
    under = [r for r in composed if r["rel"] < -search_test.TOLERANCE]
    print(
        f"models {count[0]} plans {len(rows)} composed {len(composed)}:"
        f" over by more than 0.2% {len(over)} (at most {max((r['rel'] for r in over), default=0):.2%}),"
        f" under {len(under)} (at most {-min((r['rel'] for r in under), default=0):.2%},"
        f" {sum(r['offload'] for r in under)} with offload); {time.time() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
