"""remat side by side with today's strategies on the built-in GPT, CNN and U-Net (``remat bench``).

For each model: the peers (none, full, every_n:2, every_n:3, sqrt_n, megatron, save_matmuls;
offload on CUDA) and remat's plans at 80%, 60%, 50%, 40%, 25% and min and at each peer's measured
peak, measured in one run each (warm-up, interleaved steps, medians; see ``remat.bench``). Writes
``results/bench_<model>.{json,md,png,html}`` (the JSON records date, machine, torch version and the
load average), rewrites the GPT's table between the ``bench:gpt`` markers of the top-level README,
and prints every claim's verdict. Exit code 1 when a claim fails on the GPT.

Run (about 6 minutes for the GPT and under a minute each for the CNN and U-Net on 2 quiet cores;
run it alone, CPU timing is noisy):

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
from remat.benchmarking import BenchResult, write_report
from remat.models import build_builtin
from remat.units import format_bytes

MODELS = ("gpt", "cnn", "unet")
DEFAULT_STEPS = {"gpt": 9, "cnn": 41, "unet": 41}
"""Timed rounds: the CNN's and U-Net's steps take about 50 ms, so many rounds cost seconds and
shrink the noise that a few rounds of such short steps leave (one round of every strategy takes
a second there, and half a minute on the GPT)."""
RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- bench:gpt:start -->", "<!-- bench:gpt:end -->"


def readme_block(result: BenchResult) -> str:
    """The README's table: the measured columns of every strategy, the claims, the setting."""
    lines = [
        "| strategy | measured peak | step time | overhead | budget met |",
        "|---|---|---|---|---|",
    ]
    for row in result.results:
        if row.status != "ok" or row.step_ms is None:
            continue
        name = row.strategy + (f" (= {row.same_as})" if row.same_as else "")
        peak = "-" if row.peak_bytes is None else format_bytes(row.peak_bytes)
        met = {True: "yes", False: "no", None: ""}[row.budget_met]
        lines.append(f"| {name} | {peak} | {row.step_ms:.0f} ms | {row.overhead:.2f} | {met} |")
    lines.append("")
    for claim in result.claims:
        lines.append(f"- {claim.status}: {claim.statement} ({claim.detail})")
    lines.append("")
    load = f", load average {max(result.load_avg):.1f}" if result.load_avg else ""
    lines.append(
        f"Measured {result.date[:10]}: {result.model} on {result.device} ({result.dtype}), torch"
        f" {result.torch_version}, {result.machine}{load}; {result.steps} timed steps per"
        " strategy after a warm-up, interleaved, medians; overheads are medians of per-round"
        " ratios to none."
    )
    lines += [f"Note: {note}" for note in result.notes]
    return "\n".join(lines)


def update_readme(result: BenchResult) -> None:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{README}: the markers {START} and {END} are missing")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{readme_block(result)}\n{END}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed rounds per model (default: "
        + ", ".join(f"{m} {n}" for m, n in DEFAULT_STEPS.items())
        + ")",
    )
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--no-readme", action="store_true", help="leave README.md alone")
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
            steps=args.steps or DEFAULT_STEPS[name],
            model_name=name,
        )
        paths = write_report(result, args.out, stem=f"bench_{name}")
        if name == "gpt" and not args.no_readme:
            update_readme(result)
        sys.stdout.write(f"{name}: {paths['md']} ({result.wall_s:.0f} s)\n")
        for claim in result.claims:
            sys.stdout.write(f"  {claim.status:13s} {claim.name}: {claim.detail}\n")
            failed |= name == "gpt" and claim.status == "fail"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
