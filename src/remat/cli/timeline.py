"""``remat timeline``: one training step without and with a plan, op by op, as one HTML page."""

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
    load_model_from_args,
)

DEFAULT_OUT = "timeline.html"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "timeline",
        help="draw one training step's memory, op by op, without and with a plan (HTML)",
        description="Record one training step (forward, loss, backward, optimizer step) under"
        " remat's memory tracker, unplanned and with the plan (--plan, or solved for --budget),"
        " and write one self-contained HTML page (no network): live bytes as a stacked area by"
        " category (parameters, gradients, optimizer state, activations per unit, transients),"
        " both steps on the same axes, the budget as a line, each peak marked with its module and"
        " op; hover for an op's bytes, click a unit for its saved tensors' lifetimes and their"
        " recompute. --device h100-80gb (any device of the table but cpu) estimates on meta for"
        " that device: the x axis is then the op index. --snapshot also writes PyTorch's memory"
        " snapshot (one device per step) for pytorch.org/memory_viz.",
    )
    add_model_arguments(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--plan", metavar="PLAN.json", help="the plan to draw (from remat plan --out)"
    )
    which.add_argument(
        "--budget",
        help="solve a plan for this budget and draw it: 22GiB, 22GB, bytes, 60%%, min or device"
        " (as remat plan). Neither --plan nor --budget: the unplanned step alone",
    )
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="PATH",
        help=f"where the page goes (default: {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--snapshot",
        metavar="PATH",
        help="also write the steps in PyTorch's memory snapshot format (a pickle, as"
        " torch.cuda.memory._dump_snapshot writes; device 0 unplanned, device 1 planned)",
    )
    parser.add_argument(
        "--actions",
        help="comma-separated actions a solved plan may use (as remat plan; default: all)",
    )
    parser.add_argument(
        "--accumulate",
        type=int,
        default=1,
        metavar="N",
        help="gradient accumulation over N micro-batches: the step drawn is the last one"
        " (default: 1, none)",
    )
    parser.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "flash", "efficient", "math"],
        help="estimate mode: the attention kernel to assume (default auto: the device's choice)",
    )
    parser.add_argument(
        "--x-axis",
        default="auto",
        choices=["auto", "time", "op"],
        help="the x axis: time (milliseconds under the tracker; measured steps), op (the op"
        " index; steadier on a busy machine) or auto (time when measured, op on meta; default)",
    )
    parser.add_argument(
        "--max-points",
        type=int,
        default=2000,
        metavar="N",
        help="points kept per step in the page; longer steps are downsampled, peaks kept"
        " (default: 2000)",
    )
    parser.set_defaults(func=run)


def _progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _estimating(device: str) -> bool:
    from remat.devices import is_device_name

    return is_device_name(device) and device.strip().lower() != "cpu"


def build_step(
    args: argparse.Namespace, estimate: bool | None = None, capacity: int | None = None
) -> Any:
    """The :class:`remat.Step` the arguments describe: measured where ``--device`` is, or, for a
    device of the table other than cpu (or ``estimate``), built on meta and estimated for it."""
    import remat
    from remat.models.spec import load_model, parse_overrides

    if args.accumulate < 1:
        raise UsageError(f"--accumulate: got {args.accumulate}; expected an integer >= 1")
    check_precision_args(args)
    if _estimating(args.device) if estimate is None else estimate:
        try:
            built = load_model(
                args.model,
                device="meta",
                dtype=args.dtype,
                batch=args.batch,
                seq=args.seq,
                overrides=parse_overrides(args.overrides),
            )
        except ValueError as error:
            raise UsageError(str(error)) from None
        fields: dict[str, Any] = {
            "target": args.device.strip().lower(),
            "attention": args.attention,
        }
        units = args.units
    else:
        built = load_model_from_args(args)
        fields = {}
        units = remat.apply.units.find_units_with_inputs(
            built.model, args.units, built.example_inputs
        )
    try:
        return remat.Step(
            built.model,
            built.example_inputs,
            loss_fn=built.loss_fn,
            optimizer=args.optimizer,
            precision=args.precision,
            accumulation_steps=args.accumulate,
            units=units,
            capacity_bytes=capacity,
            **fields,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    import remat
    from remat.auto import InfeasibleBudgetError, profile_options

    if args.max_points < 4:
        raise UsageError(f"--max-points: got {args.max_points}; expected at least 4")
    if args.x_axis == "time" and (_estimating(args.device) or args.device == "meta"):
        raise UsageError(
            f"--x-axis time: got --device {args.device}, where nothing is timed; expected"
            " --x-axis op or auto there"
        )
    if args.budget is not None:
        try:
            remat.Budget.parse(args.budget)
        except ValueError as error:
            raise UsageError(str(error)) from None
    actions = None
    if args.actions is not None:
        actions = [a.strip() for a in args.actions.split(",") if a.strip()]
        try:
            profile_options(actions)
        except ValueError as error:
            raise UsageError(str(error)) from None
    plan = None
    if args.plan is not None:
        try:
            plan = remat.Plan.load(args.plan)
        except (OSError, ValueError) as error:
            raise UsageError(f"--plan: {error}") from None
    step = build_step(args)
    try:
        line = remat.timeline(
            step,
            plan=plan,
            budget=args.budget,
            out=args.out,
            snapshot=args.snapshot,
            actions=actions,
            title=f"remat timeline: {args.model}",
            max_points=args.max_points,
            x_axis=args.x_axis,
            progress=_progress,
        )
    except InfeasibleBudgetError as error:
        sys.stderr.write(f"remat timeline: {error}\n")
        return EXIT_INFEASIBLE
    for text in line.summary():
        print(text)
    print(f"timeline written to {args.out}")
    if args.snapshot:
        print(f"snapshot written to {args.snapshot} (open it at pytorch.org/memory_viz)")
    return EXIT_OK


def write_beside(
    args: argparse.Namespace,
    path: str,
    *,
    plan: Any = None,
    step: Any = None,
    estimate: bool = False,
    capacity: int | None = None,
) -> None:
    """``remat plan --timeline PATH``: the page of ``plan`` for ``step`` (or the step the
    arguments describe; estimated, the plan is solved again for ``--budget``, as estimate mode
    solved it); says where it went on stderr, so ``--json`` output stays one document."""
    import remat

    if step is None:
        step = build_step(args, estimate=estimate, capacity=capacity)
    budget = None if plan is not None else (args.budget or "device")
    remat.timeline(step, plan=plan, budget=budget, out=path, title=f"remat timeline: {args.model}")
    sys.stderr.write(f"timeline written to {path}\n")


def write_bench_timelines(args: argparse.Namespace, result: Any, built: Any, units: Any) -> None:
    """``remat bench --timelines``: each plan's page in ``--out`` (named by
    :func:`remat.benchmarking.report.timeline_filename`), the unplanned step recorded once."""
    from pathlib import Path

    import remat
    from remat.benchmarking.report import timeline_filename
    from remat.timeline.build import write_timelines

    plans, paths = {}, {}
    for row in result.results:
        if row.plan is None or row.same_as is not None or row.status != "ok":
            continue
        if set(row.plan.values()) == {"keep"}:
            continue  # the unplanned step itself
        plan = remat.Plan(actions=dict(row.plan), units=list(row.plan), precision=args.precision)
        plans[row.strategy] = (plan, row.budget_bytes)
        paths[row.strategy] = Path(args.out) / timeline_filename(row.strategy)
    if not plans:
        return
    _progress(f"bench: recording {len(plans)} memory timelines")
    step = remat.Step(
        built.model,
        built.example_inputs,
        loss_fn=built.loss_fn,
        optimizer=args.optimizer,
        precision=args.precision,
        units=units,
    )
    write_timelines(step, plans, paths, title=f"remat bench: {args.model}")
