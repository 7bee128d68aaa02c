"""remat side by side with today's strategies on the built-in GPT, CNN and U-Net (``remat bench``).

For each model: the peers (none, full, every_n:2, every_n:3, sqrt_n, megatron, save_matmuls;
offload on CUDA) and remat's plans at 80%, 60%, 50%, 40%, 25% and min and at each peer's measured
peak, measured in one run each (warm-up, interleaved steps, medians; see ``remat.bench``). Writes
``results/bench_<model>.{json,md,png,html}`` (the JSON records date, machine, torch version) and
prints every claim's verdict. Exit code 1 when a claim fails on the GPT.

Run (about 5 minutes per model on 2 quiet cores; run it alone, CPU timing is noisy):

    .venv/bin/python benchmarks/bench_models.py                 # all three
    .venv/bin/python benchmarks/bench_models.py --models gpt    # one
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

import remat
from remat.benchmarking import write_report
from remat.models import build_builtin

MODELS = ("gpt", "cnn", "unet")
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("remat.apply").setLevel(logging.WARNING)
    failed = False
    for name in args.models:
        torch.manual_seed(0)
        built = build_builtin(name)
        result = remat.bench(
            built.model,
            built.example_inputs,
            loss_fn=built.loss_fn,
            steps=args.steps,
            model_name=name,
        )
        paths = write_report(result, args.out, stem=f"bench_{name}")
        sys.stdout.write(f"{name}: {paths['md']} ({result.wall_s:.0f} s)\n")
        for claim in result.claims:
            sys.stdout.write(f"  {claim.status:13s} {claim.name}: {claim.detail}\n")
            failed |= name == "gpt" and claim.status == "fail"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
