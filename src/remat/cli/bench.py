"""``remat bench`` (every strategy side by side) and ``remat report`` (re-render a bench.json)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from remat.cli._common import (
    EXIT_OK,
    UsageError,
    add_model_arguments,
    emit_json,
    load_model_from_args,
)

DEFAULT_OUT = "out/bench"


def _split(values: list[str] | None) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``: lists may be given with commas, spaces or both."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def register(subparsers: Any) -> None:
    from remat.benchmarking.run import DEFAULT_BUDGETS, DEFAULT_COMPILE_FRACTIONS, DEFAULT_PEERS

    parser = subparsers.add_parser(
        "bench",
        help="measure peak memory and step time of every strategy side by side",
        description="Run the same training step (forward, backward, optimizer step, same weights"
        " and seed) under each strategy: the peers (no checkpointing, every unit as Hugging Face"
        " does, every n-th unit, sqrt(n) segments, Megatron-style and matmul-saving selective"
        " recompute, offload on CUDA) and remat's plans at --budgets (remat:<budget>) and at each"
        " peer's measured peak (remat:@<peer>). Warm-up first, then steps interleaved across"
        " strategies, medians; peaks from one tracked step per strategy (and the CUDA allocator);"
        " overhead is the ratio to no checkpointing in the same run. Writes bench.json, bench.md,"
        " bench.png and bench.html to --out and prints the table; progress goes to stderr.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--strategies",
        nargs="+",
        metavar="S",
        help=f"peers to compare, comma- or space-separated (default: {','.join(DEFAULT_PEERS)}, and"
        " offload on CUDA); none is always included",
    )
    parser.add_argument(
        "--budgets",
        default=",".join(DEFAULT_BUDGETS),
        help="remat's budgets, comma-separated: percentages (P%% is P%% of the way from the least"
        " peak any plan reaches to the unplanned peak), sizes (2GiB) or min (default:"
        " %(default)s); '' for none",
    )
    parser.add_argument(
        "--steps", type=int, default=5, help="timed steps per strategy (default: 5)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="warm-up steps per strategy, untimed (default: 1)"
    )
    parser.add_argument(
        "--no-dominate",
        action="store_true",
        help="skip remat's plans at each peer's measured peak (remat:@<peer>)",
    )
    parser.add_argument(
        "--with-compile",
        action="store_true",
        help="add torch.compile with activation_memory_budget at --compile-fractions"
        " (compile:<fraction>), and remat's plans priced and run on the compiled path, each unit"
        " compiled (remat:<budget>+compile); compiling takes minutes per fraction on a CPU, where"
        " compiled peaks cannot be measured",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        metavar="BACKEND",
        help="torch.compile backend of the remat:<budget>+compile rows (default: inductor;"
        " aot_eager compiles in seconds)",
    )
    parser.add_argument(
        "--compile-fractions",
        default=",".join(f"{f:g}" for f in DEFAULT_COMPILE_FRACTIONS),
        help="activation_memory_budget values for --with-compile, comma-separated, 0 to 1"
        f" (default: {','.join(f'{f:g}' for f in DEFAULT_COMPILE_FRACTIONS)})",
    )
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"where the report goes (default: {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)"
    )
    parser.add_argument(
        "--timelines",
        action="store_true",
        help="also write each plan's memory timeline beside the report (timeline-<strategy>.html,"
        " as remat timeline draws it), linked from bench.html",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the bench result as JSON instead of the table"
    )
    parser.set_defaults(func=run)

    report = subparsers.add_parser(
        "report",
        help="re-render the table, plot and HTML of a bench.json",
        description="Read a bench.json that remat bench wrote and write its Markdown table, Pareto"
        " plot (PNG) and HTML page again, without measuring anything.",
    )
    report.add_argument("bench_json", metavar="BENCH_JSON", help="a bench.json from remat bench")
    report.add_argument(
        "--out",
        metavar="DIR",
        help="where the report goes (default: the directory of BENCH_JSON)",
    )
    report.add_argument(
        "--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)"
    )
    report.set_defaults(func=run_report)


def _progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    import remat
    from remat.benchmarking.report import render_markdown, write_report
    from remat.solve.baselines import parse_strategy

    if args.device == "meta":
        raise UsageError("--device meta runs nothing to time; bench on cpu or cuda")
    if args.steps < 1 or args.warmup < 0:
        raise UsageError(
            f"--steps {args.steps} --warmup {args.warmup}: expected at least 1 step and no"
            " negative warm-up"
        )
    strategies = _split(args.strategies) if args.strategies else None
    budgets = _split([args.budgets])
    try:
        for name in strategies or []:
            parse_strategy(name)
        for budget in budgets:
            remat.Budget.parse(budget)
        fractions = [float(f) for f in _split([args.compile_fractions])]
    except ValueError as error:
        raise UsageError(str(error)) from None
    if any(not 0 <= f <= 1 for f in fractions):
        raise UsageError(f"--compile-fractions: got {args.compile_fractions}; expected 0 to 1")
    built = load_model_from_args(args)
    try:
        units = remat.apply.units.find_units_with_inputs(
            built.model, args.units, built.example_inputs
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    result = remat.bench(
        built.model,
        built.example_inputs,
        loss_fn=built.loss_fn,
        strategies=strategies,
        budgets=budgets,
        steps=args.steps,
        warmup=args.warmup,
        optimizer=args.optimizer,
        seed=args.seed,
        units=units,
        dominate=not args.no_dominate,
        with_compile=args.with_compile,
        compile_fractions=fractions,
        compile_backend=args.compile_backend,
        model_name=args.model,
        progress=_progress,
        precision=args.precision,
    )
    if args.timelines:
        from remat.cli.timeline import write_bench_timelines

        write_bench_timelines(args, result, built, units)
    paths = write_report(result, args.out, plot=not args.no_plot)
    if args.json:
        emit_json(result.to_dict())
    else:
        sys.stdout.write(render_markdown(result))
        sys.stdout.write(f"\nreport: {paths['html']} (also {_others(paths)})\n")
    return EXIT_OK


def _others(paths: dict[str, Path]) -> str:
    return ", ".join(str(p) for kind, p in paths.items() if kind != "html")


def run_report(args: argparse.Namespace) -> int:
    from remat.benchmarking.report import write_report
    from remat.benchmarking.result import BenchResult

    try:
        result = BenchResult.load(args.bench_json)
    except ValueError as error:
        raise UsageError(str(error)) from None
    source = Path(args.bench_json)
    out = Path(args.out) if args.out else source.parent
    stem = source.stem
    paths = write_report(result, out, stem=stem, plot=not args.no_plot)
    sys.stdout.write(f"report: {paths['html']} (also {_others(paths)})\n")
    return EXIT_OK
