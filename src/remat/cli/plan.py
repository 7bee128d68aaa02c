"""``remat plan``: profile a model, solve for a budget (or simulate a baseline), and show the plan."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from remat.cli._common import (
    EXIT_INFEASIBLE,
    EXIT_OK,
    UsageError,
    add_model_arguments,
    check_precision_args,
    emit_json,
    load_model_from_args,
    plan_lines,
)
from remat.cli._estimate import add_estimate_arguments, run_estimate, wants_estimate
from remat.cli.timeline import write_beside
from remat.solve.baselines import parse_strategy
from remat.units import format_bytes, format_ms

FORMAT_VERSION = 1


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="find the cheapest checkpointing plan that fits a memory budget",
        description="Profile the model (three tracked steps and timed steps on real devices; shapes"
        " alone on meta), then solve for the plan with the least recompute time whose predicted"
        " peak fits --budget, and measure that plan's peak to confirm it (re-solving tighter if"
        " it does not fit). With a baseline --strategy, predict and measure that plan instead."
        " Exit code 3 when no plan fits: the message names the least achievable peak.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--budget",
        help="memory budget: 22GiB (binary), 22GB (decimal), bytes, 60%% (60%% of the way from"
        " the least peak any plan reaches, 0%%, to the unplanned step's peak, 100%%, as"
        " torch.compile's activation_memory_budget=0.6; every percentage has a plan), or min"
        " (the least achievable peak); required with --strategy auto",
    )
    parser.add_argument(
        "--strategy",
        default="auto",
        help="auto (solve; default), or a baseline: none, full, every_n:K, sqrt_n, megatron,"
        " save_matmuls, offload",
    )
    parser.add_argument(
        "--actions",
        help="comma-separated actions the solver may use: keep (required), recompute, segment,"
        " nested, selective, offload (default: all; offload only on CUDA, where it can save"
        " memory without costing the whole transfer)",
    )
    parser.add_argument(
        "--out",
        metavar="PATH",
        help="write the plan as JSON here (estimate mode: a PATH ending in .png gets the memory"
        " breakdown chart instead)",
    )
    parser.add_argument(
        "--no-measure",
        action="store_true",
        help="skip the closed loop that measures the chosen plan's peak",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=1,
        metavar="N",
        help="plan for one of N data-parallel ranks (torchrun); the model's inputs are one"
        " rank's batch. Peaks are then predicted per rank and not measured (default: 1)",
    )
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="the ranks shard parameters, gradients and optimizer state with FSDP2 (fully_shard"
        " per unit); without it, DDP replicas (see docs/distributed.md)",
    )
    parser.add_argument(
        "--capacity",
        metavar="BYTES",
        help="the device's memory, simulated (e.g. 40GiB): any measured step that would hold"
        " more raises torch.OutOfMemoryError, as CUDA would. Profiling then measures a step that"
        " does not fit in windows of units and holds no more than this; a budget above it is"
        " lowered to it. Plans a GPU you do not have, or a step that runs out of memory",
    )
    parser.add_argument(
        "--accumulate",
        type=int,
        default=1,
        metavar="N",
        help="gradient accumulation over N micro-batches: the step planned and measured is the"
        " last one, its forward and backward with the gradients alive (default: 1, none)",
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="price the plan on the compiled path: each unit torch.compile'd with BACKEND"
        " (default inductor; aot_eager compiles in seconds) after the plan is applied, as"
        " remat.compile_units_ does, so the compiler applies recompute and selective save sets"
        " when it traces (no op log per op). The solver then uses keep, recompute and selective"
        " only; bytes stay the eager step's. Apply the plan, then call"
        " remat.compile_units_(model, plan.units, backend=BACKEND). Only with --strategy auto",
    )
    parser.add_argument(
        "--timeline",
        metavar="PATH",
        help="also write the plan's memory timeline here (HTML, as remat timeline draws it)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_estimate_arguments(parser)
    parser.set_defaults(func=run)


def _progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    from remat.units import parse_bytes

    capacity = None
    if args.capacity is not None:
        try:
            capacity = parse_bytes(args.capacity)
        except ValueError as error:
            raise UsageError(f"--capacity: {error}") from None
        if capacity < 1:
            raise UsageError(f"--capacity: got {args.capacity}; expected a size of at least 1 byte")
    if args.accumulate < 1:
        raise UsageError(f"--accumulate: got {args.accumulate}; expected an integer >= 1")
    return _run(args, capacity)


def _run(args: argparse.Namespace, capacity: int | None) -> int:
    import remat
    from remat.auto import plan_step, profile_options

    check_precision_args(args)
    if args.timeline and (args.world_size > 1 or args.fsdp or args.max_batch or args.max_seq):
        raise UsageError(
            "--timeline draws one step of this process at one size: not with --world-size,"
            " --fsdp, --max-batch or --max-seq (use remat timeline at the size found)"
        )
    if wants_estimate(args):
        code = run_estimate(args, capacity)
        if args.timeline and code == EXIT_OK:
            write_beside(args, args.timeline, estimate=True, capacity=capacity)
        return code
    budget = None
    if args.budget is not None:
        try:
            budget = remat.Budget.parse(args.budget)
        except ValueError as error:
            raise UsageError(str(error)) from None
    if args.strategy != "auto":
        try:
            parse_strategy(args.strategy)
        except ValueError as error:
            raise UsageError(f"{error}, or auto") from None
    elif budget is None:
        raise UsageError("--budget is required with --strategy auto (e.g. --budget 60%)")
    if args.world_size < 1:
        raise UsageError(f"--world-size: got {args.world_size}; expected an integer >= 1")
    if args.fsdp and args.strategy.startswith("sqrt_n"):
        raise UsageError(
            "--fsdp with --strategy sqrt_n: its segments cannot replay under FSDP2 (a segment's"
            " earlier units have sharded parameters then); use auto, full or every_n:K"
        )
    distributed = args.world_size > 1 or args.fsdp
    if args.compile is not None and (args.strategy != "auto" or distributed or args.timeline):
        raise UsageError(
            f"--compile: got it with --strategy {args.strategy}"
            f"{', --world-size/--fsdp' if distributed else ''}"
            f"{', --timeline' if args.timeline else ''}; expected --strategy auto on one"
            " process (the compiled path prices keep, recompute and selective plans of this"
            " process; baselines, ranks and timelines are the eager engine's)"
        )
    actions = None
    if args.actions is not None:
        actions = [a.strip() for a in args.actions.split(",") if a.strip()]
        try:
            profile_options(actions)
        except ValueError as error:
            raise UsageError(str(error)) from None
    built = load_model_from_args(args)
    try:
        step = remat.Step(
            built.model,
            built.example_inputs,
            loss_fn=built.loss_fn,
            optimizer=args.optimizer,
            precision=args.precision,
            accumulation_steps=args.accumulate,
            world_size=args.world_size,
            fsdp=args.fsdp,
            capacity_bytes=capacity,
            compile=args.compile,
            units=remat.apply.units.find_units_with_inputs(
                built.model, args.units, built.example_inputs
            ),
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    progress = None if args.json else _progress
    # The closed loop measures this one process, not a rank of a sharded or replicated run.
    measure = not args.no_measure and not distributed
    if args.strategy == "auto":
        planned = plan_step(step, budget, actions=actions, measure=measure, progress=progress)
        prof, plan, figures = planned.profile, planned.result.plan, _solved(planned.result)
        if args.compile is not None:
            plan.metadata["compile"] = args.compile  # priced for remat.compile_units_
    else:
        prof, plan, figures = _baseline(args, step, budget, actions, measure, progress)
    if args.out:
        plan.save(args.out)
    if args.timeline:
        write_beside(args, args.timeline, plan=plan, step=step)
    payload = {
        "format_version": FORMAT_VERSION,
        "model": args.model,
        "device": args.device,
        "strategy": args.strategy,
        "precision": args.precision,
        "compile": args.compile,
        "status": figures["status"],
        "budget": args.budget,
        "budget_bytes": figures["budget_bytes"],
        "predicted_peak_bytes": figures["predicted_peak_bytes"],
        "measured_peak_bytes": figures["measured_peak_bytes"],
        "predicted_step_ms": figures["predicted_step_ms"],
        "predicted_overhead": figures["predicted_overhead"],
        "recompute_cost": figures["recompute_cost"],
        "lower_bound": figures["lower_bound"],
        "cost_unit": "ms" if prof.time_source == "measured" else "forward FLOPs",
        "min_peak_bytes": figures["min_peak_bytes"],
        "unplanned_peak_bytes": prof.peak_bytes,
        "static_bytes": prof.static_bytes,
        "capacity_bytes": capacity,
        "accumulation_steps": args.accumulate,
        "profiling_peak_bytes": prof.profiling_peak_bytes,
        "world_size": prof.world_size,
        "fsdp": prof.fsdp,
        "peak_at": figures["peak_at"],
        "plan": plan.to_dict(),
        "out": args.out,
    }
    if args.json:
        emit_json(payload)
    else:
        _print_human(payload, prof, plan)
    if figures["status"] == "INFEASIBLE":
        min_peak = figures["min_peak_bytes"]
        sys.stderr.write(
            f"remat plan: no plan fits {figures['budget_bytes']:,} bytes; the least feasible"
            f" budget is {min_peak:,} bytes ({format_bytes(min_peak)}): use --budget {min_peak}"
            " or more\n"
        )
        return EXIT_INFEASIBLE
    return EXIT_OK


def _solved(result: Any) -> dict[str, Any]:
    """The JSON's figures for the solver's plan."""
    return {
        "status": result.status,
        "budget_bytes": result.budget_bytes,
        "predicted_peak_bytes": result.predicted_peak_bytes,
        "measured_peak_bytes": result.measured_peak_bytes,
        "predicted_step_ms": result.predicted_step_ms,
        "predicted_overhead": result.predicted_overhead,
        "recompute_cost": result.cost,
        "lower_bound": result.lower_bound,
        "min_peak_bytes": result.min_peak_bytes,
        "peak_at": result.where,
    }


def _baseline(
    args: argparse.Namespace,
    step: Any,
    budget: Any,
    actions: list[str] | None,
    measure: bool,
    progress: Any,
) -> tuple[Any, Any, dict[str, Any]]:
    """A named strategy's plan for the step: its profile, the plan, and the JSON's figures
    (the lower bound is what an optimal plan costs at the same peak: how far it is from
    optimal)."""
    import remat
    from remat.auto import measure_plan, profile_options, profile_step

    options = profile_options(actions, step.model)
    if args.strategy in ("megatron", "save_matmuls", "offload"):
        needed = "offload" if args.strategy == "offload" else f"selective:{args.strategy}"
        options = [*options, needed] if needed not in options else options
    prof = profile_step(step, options=options, progress=progress)
    plan = remat.baseline_plan(args.strategy, prof.unit_fqns)
    plan.fingerprint, plan.precision = prof.fingerprint, prof.precision
    sim = remat.simulate(prof, plan)
    best = remat.solve(prof, sim.peak_bytes)
    budget_bytes = (
        budget.resolve(
            peak_bytes=prof.peak_bytes, min_peak_bytes=best.min_peak_bytes, device=prof.device
        )
        if budget is not None
        else None
    )
    plan.budget_bytes, plan.predicted_peak_bytes, plan.predicted_overhead = (
        budget_bytes,
        sim.peak_bytes,
        sim.overhead,
    )
    fits = budget_bytes is None or sim.peak_bytes <= budget_bytes
    return (
        prof,
        plan,
        {
            "status": "FITS" if fits else "OVER_BUDGET",
            "budget_bytes": budget_bytes,
            "predicted_peak_bytes": sim.peak_bytes,
            "measured_peak_bytes": measure_plan(step, plan) if measure else None,
            "predicted_step_ms": sim.step_ms,
            "predicted_overhead": sim.overhead,
            "recompute_cost": sim.recompute_cost,
            "lower_bound": best.cost,
            "min_peak_bytes": best.min_peak_bytes,
            "peak_at": sim.where,
        },
    )


def _print_human(payload: dict[str, Any], prof: Any, plan: Any) -> None:
    print(
        f"{payload['model']} on {payload['device']}: {len(prof.units)} units, unplanned peak"
        f" {format_bytes(payload['unplanned_peak_bytes'])}, static"
        f" {format_bytes(payload['static_bytes'])}"
    )
    if prof.world_size > 1 or prof.fsdp:
        engine = "FSDP2" if prof.fsdp else "DDP"
        print(f"per rank of {prof.world_size} under {engine} (predicted; not measured)")
    if payload["budget_bytes"] is not None:
        print(
            f"budget {payload['budget']} -> {payload['budget_bytes']:,} bytes"
            f" ({format_bytes(payload['budget_bytes'])})"
        )
    if payload["compile"] is not None:
        print(
            f"priced on the compiled path (each unit torch.compile'd, backend"
            f" {payload['compile']}): apply the plan, then"
            f" remat.compile_units_(model, plan.units, backend={payload['compile']!r})"
        )
    print()
    for line in plan_lines(prof, plan):
        print(line)
    print()
    measured = payload["measured_peak_bytes"]
    print(f"status:         {payload['status']}")
    print(
        f"predicted peak: {format_bytes(payload['predicted_peak_bytes'])}"
        f" ({payload['predicted_peak_bytes']:,} bytes, at {payload['peak_at']})"
    )
    if measured is not None:
        print(f"measured peak:  {format_bytes(measured)} ({measured:,} bytes)")
    if payload["predicted_overhead"] is not None:
        print(
            f"overhead:       {payload['predicted_overhead']:.3f}x step time (predicted,"
            f" {format_ms(payload['predicted_step_ms'])} per step)"
        )
    unit = payload["cost_unit"]
    print(
        f"recompute:      {payload['recompute_cost']:.4g} {unit}; lower bound"
        f" {payload['lower_bound']:.4g} {unit}"
    )
    print(f"least peak any plan reaches: {format_bytes(payload['min_peak_bytes'])}")
    if payload["out"]:
        print(f"plan written to {payload['out']}")
