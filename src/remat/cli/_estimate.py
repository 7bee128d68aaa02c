"""``remat plan`` for a target device from shapes alone: estimate mode, ``--max-batch``/``--max-seq``.

``remat plan MODEL --device h100-80gb --dtype bfloat16 --budget device [--max-batch | --max-seq]``
builds the model on ``meta``, profiles it in estimate mode for the device (kernels modelled as the
device runs them, times from a roofline), solves, and prints the plan, the predicted peak and step
time, the kernels assumed and a memory breakdown; with ``--max-batch`` / ``--max-seq`` it first
searches for the largest size that fits (:func:`remat.fit.max_size`). With ``--world-size N``
(and ``--fsdp``) every figure, the search's included, is one rank's, as when measuring.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from remat.cli._common import EXIT_INFEASIBLE, EXIT_OK, UsageError, emit_json, plan_lines
from remat.units import format_bytes, format_ms


def add_estimate_arguments(parser: Any) -> None:
    """The flags of estimate mode on ``remat plan``."""
    group = parser.add_argument_group(
        "estimate mode (no hardware: --device names a device of the table, e.g. h100-80gb)"
    )
    group.add_argument(
        "--estimate",
        action="store_true",
        help="estimate from shapes for --device instead of running (implied when --device names"
        " a device of the table other than cpu, and by --max-batch / --max-seq)",
    )
    search = group.add_mutually_exclusive_group()
    search.add_argument(
        "--max-batch",
        action="store_true",
        help="find the largest batch whose best plan fits --budget (default budget: device)",
    )
    search.add_argument(
        "--max-seq",
        action="store_true",
        help="find the largest sequence length whose best plan fits --budget",
    )
    group.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "flash", "efficient", "math"],
        help="attention kernel to assume (default auto: what the device would choose)",
    )


def wants_estimate(args: argparse.Namespace) -> bool:
    """Whether ``remat plan`` runs in estimate mode for these arguments."""
    from remat.devices import is_device_name

    named = is_device_name(args.device) and args.device.strip().lower() != "cpu"
    return bool(args.estimate or args.max_batch or args.max_seq or named)


def _progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def run_estimate(args: argparse.Namespace, capacity: int | None = None) -> int:
    """``remat plan`` in estimate mode (``capacity``: ``--capacity`` in bytes)."""
    from remat import fit
    from remat.devices import get_device
    from remat.models.spec import parse_overrides
    from remat.profiling.estimate import NotEstimableError
    from remat.solve.budget import Budget

    if args.strategy != "auto":
        raise UsageError("--strategy: estimate mode solves (auto); drop --strategy")
    try:
        spec = get_device(args.device)
        overrides = parse_overrides(args.overrides)
        budget = Budget.parse(args.budget or "device")
    except ValueError as error:
        raise UsageError(str(error)) from None
    for flag in ("batch", "seq"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag}: got {value}; expected a positive integer")
    if args.world_size < 1:
        raise UsageError(f"--world-size: got {args.world_size}; expected an integer >= 1")
    progress = _progress
    try:
        if args.max_batch or args.max_seq:
            dim = "batch" if args.max_batch else "seq"
            result = fit.max_size(
                args.model,
                device=spec.name,
                dim=dim,
                dtype=args.dtype,
                budget=budget,
                optimizer=args.optimizer,
                overrides=overrides,
                batch=args.batch,
                seq=args.seq,
                units=args.units,
                attention=args.attention,
                world_size=args.world_size,
                fsdp=args.fsdp,
                accumulation_steps=args.accumulate,
                capacity_bytes=capacity,
                progress=progress,
            )
        else:
            result = _fixed_size(args, spec.name, budget, overrides, progress, capacity)
    except NotEstimableError:
        raise  # the model, not the command line: exit code 1 with the message
    except ValueError as error:
        raise UsageError(str(error)) from None
    payload = result.to_dict()
    payload["model"] = args.model
    payload["budget"] = budget.text
    chart = None
    if args.out and result.solved is not None:
        if args.out.lower().endswith(".png"):
            chart = fit.plot_breakdown(
                result.breakdown,
                args.out,
                title=f"{args.model} on {spec.name}",
                budget_bytes=result.budget_bytes,
            )
        else:
            result.solved.plan.save(args.out)
    payload["out"] = args.out
    if args.json:
        emit_json(payload)
    else:
        _print_human(args, result, spec, chart)
    if result.solved is None or result.solved.status == "INFEASIBLE":
        least = result.table[0].min_peak_bytes if result.table else None
        sys.stderr.write(
            f"remat plan: nothing fits {result.budget_bytes:,} bytes on {spec.name}"
            + (f"; the least peak at the smallest size is {format_bytes(least)}" if least else "")
            + "\n"
        )
        return EXIT_INFEASIBLE
    return EXIT_OK


def _fixed_size(
    args: argparse.Namespace,
    device: str,
    budget: Any,
    overrides: dict,
    progress: Any,
    capacity: int | None,
) -> Any:
    """Estimate and solve at the given --batch / --seq (no search)."""
    from remat import fit
    from remat.auto import plan_step
    from remat.models.spec import load_model
    from remat.profiling.step import Step
    from remat.solve.solver import solve

    built = load_model(
        args.model,
        device="meta",
        dtype=args.dtype,
        batch=args.batch,
        seq=args.seq,
        overrides=overrides,
    )
    step = Step(
        built.model,
        built.example_inputs,
        loss_fn=built.loss_fn,
        optimizer=args.optimizer,
        units=args.units,
        world_size=args.world_size,
        fsdp=args.fsdp,
        accumulation_steps=args.accumulate,
        capacity_bytes=capacity,
        target=device,
        attention=args.attention,
    )
    planned = plan_step(step, budget, progress=progress, measure=False)
    prof, solved = planned.profile, planned.result
    least = solve(prof, "min")
    breakdown = fit.memory_breakdown(prof, solved.plan)
    point = fit.SizePoint(
        size=args.batch or 0,
        fits=solved.status != "INFEASIBLE",
        static_bytes=prof.static_bytes,
        none_peak_bytes=prof.peak_bytes,
        full_peak_bytes=prof.full_peak_bytes,
        min_peak_bytes=least.min_peak_bytes,
    )
    return fit.FitResult(
        status=fit.FOUND if point.fits else fit.NONE_FITS,
        dim="batch",
        max_size=None,
        device=device,
        dtype=prof.dtype,
        budget_bytes=solved.budget_bytes,
        profile=prof,
        solved=solved,
        table=[point],
        breakdown=breakdown,
        world_size=prof.world_size,
        fsdp=prof.fsdp,
    )


def _print_human(args: argparse.Namespace, result: Any, spec: Any, chart: str | None) -> None:
    print(
        f"{args.model} on {spec.name} ({spec.description}), {result.dtype}, estimated from shapes"
    )
    if result.world_size > 1 or result.fsdp:
        engine = "FSDP2" if result.fsdp else "DDP"
        print(f"per rank of {result.world_size} under {engine}: every figure is one rank's")
    print(
        f"budget {args.budget or 'device'} -> {result.budget_bytes:,} bytes"
        f" ({format_bytes(result.budget_bytes)}; capacity {format_bytes(spec.memory_bytes)} less"
        f" reserve {format_bytes(spec.reserve_bytes)})"
    )
    prof = result.profile
    if prof is not None:
        print("kernels assumed:")
        for line in prof.kernels:
            print(f"  {line}")
    if result.table:
        dim = result.dim if args.max_batch or args.max_seq else "size"
        print()
        print(f"  {dim:>8}  {'none':>12}  {'full':>12}  {'remat (min)':>12}  fits")
        for point in result.table:
            full = format_bytes(point.full_peak_bytes) if point.full_peak_bytes else "-"
            print(
                f"  {point.size or args.batch or '-':>8}  {format_bytes(point.none_peak_bytes):>12}"
                f"  {full:>12}  {format_bytes(point.min_peak_bytes):>12}"
                f"  {'yes' if point.fits else 'no'}"
            )
    if result.max_size is not None:
        print()
        print(f"max {result.dim}: {result.max_size} ({result.status})")
    elif args.max_batch or args.max_seq:
        print()
        print(f"max {result.dim}: none fits")
    solved = result.solved
    if solved is None or prof is None:
        return
    print()
    for line in plan_lines(prof, solved.plan):
        print(line)
    print()
    print(f"status:         {solved.status}")
    print(
        f"predicted peak: {format_bytes(solved.predicted_peak_bytes)}"
        f" ({solved.predicted_peak_bytes:,} bytes, at {solved.where})"
    )
    if solved.predicted_step_ms is not None:
        print(
            f"predicted step: {format_ms(solved.predicted_step_ms)} (roofline; unplanned"
            f" {format_ms(prof.step_ms)}, overhead {solved.predicted_overhead:.3f}x)"
        )
    breakdown = result.breakdown
    if breakdown is not None:
        print()
        print("memory at the peak          no plan        plan")
        rows = [
            ("parameters", breakdown.parameter_bytes, breakdown.parameter_bytes),
            ("gradients", breakdown.gradient_bytes, breakdown.gradient_bytes),
            ("optimizer state", breakdown.optimizer_state_bytes, breakdown.optimizer_state_bytes),
            ("buffers and inputs", breakdown.other_static_bytes, breakdown.other_static_bytes),
        ]
        for fqn, (unplanned, planned) in breakdown.unit_activation_bytes.items():
            rows.append((f"activations {fqn}", unplanned, planned))
        unplanned_act = sum(a for a, _ in breakdown.unit_activation_bytes.values())
        rows.append(
            (
                "transients and other",
                max(breakdown.unplanned_peak_bytes - breakdown.static_bytes - unplanned_act, 0),
                breakdown.transient_bytes,
            )
        )
        rows.append(("peak", breakdown.unplanned_peak_bytes, breakdown.peak_bytes))
        for label, unplanned, planned in rows:
            print(f"  {label:<24} {format_bytes(unplanned):>10}  {format_bytes(planned):>10}")
        print(f"  the plan saved {format_bytes(breakdown.saved_bytes)}")
    if chart:
        print(f"chart written to {chart}")
    elif args.out:
        print(f"plan written to {args.out}")
