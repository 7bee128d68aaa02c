"""``remat verify``: does a plan leave training unchanged, and did it take effect?"""

from __future__ import annotations

import argparse
from typing import Any

from remat.cli._common import (
    EXIT_ERROR,
    EXIT_OK,
    UsageError,
    add_model_arguments,
    emit_json,
    load_model_from_args,
)
from remat.units import format_bytes

FORMAT_VERSION = 1


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check that a plan leaves outputs, gradients and buffers unchanged and takes effect",
        description="Run one forward and backward without the plan and one with it, from the same"
        " seed and weights; compare every module's output, the loss, every parameter's and input's"
        " gradient and every buffer (bitwise unless --rtol/--atol), name the first mismatch, and"
        " check that the plan took effect: every planned unit kept for backward no more than its"
        " action allows (recompute, segment, nested: nothing of its own beyond what it keeps when"
        " autograd saves nothing and the engine's buffer copies; selective: also the ops its save"
        " set keeps; offload: nothing on the device but tensors under 1 KiB; keep: what it kept"
        " without the plan). Also print the peak of one full training step (--optimizer included)"
        " with and without the plan, measured as remat plan measures. Exit code 1 when anything"
        " differs or a unit kept more than its action allows.",
    )
    add_model_arguments(parser)
    parser.set_defaults(precision=None)  # the plan's own (verify runs the step it was made for)
    parser.add_argument(
        "--plan", required=True, metavar="PATH", help="plan JSON (remat plan --out)"
    )
    parser.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default 0)")
    parser.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import remat

    if args.device == "meta":
        raise UsageError("--device meta has no values to compare; use cpu (or cuda)")
    try:
        plan = remat.Plan.load(args.plan)
    except ValueError as error:
        raise UsageError(str(error)) from None
    built = load_model_from_args(args)
    report = remat.verify(
        built.model,
        plan,
        built.example_inputs,
        loss_fn=built.loss_fn,
        rtol=args.rtol,
        atol=args.atol,
        optimizer=args.optimizer,
        seed=args.seed,
        precision=args.precision or plan.precision,
    )
    payload = {
        "format_version": FORMAT_VERSION,
        "model": args.model,
        "plan": args.plan,
        **report.to_dict(),
    }
    if args.json:
        emit_json(payload)
    else:
        exact = "bitwise " if args.rtol == 0 and args.atol == 0 else ""

        def verdict(ok: bool, what: list[str]) -> str:
            return f"{exact}equal" if ok else "DIFFER: " + ", ".join(what[:5])

        print(f"{args.model} with {args.plan}: {len(report.checkpointed)} modules checkpointed")
        print(f"outputs:   {verdict(report.outputs_equal, [report.first_mismatch or ''])}")
        print(f"gradients: {verdict(report.grads_equal, report.differing_grads)}")
        print(f"buffers:   {verdict(report.buffers_equal, report.differing_buffers)}")
        print(f"applied:   {'yes' if report.applied else 'NO: ' + '; '.join(report.not_applied)}")
        print(
            f"peak:      {format_bytes(report.measured_peak_bytes)} with the plan,"
            f" {format_bytes(report.unplanned_peak_bytes)} without (one training step,"
            f" optimizer {report.optimizer})"
        )
        _print_units(report)
        if report.first_mismatch:
            print(f"first mismatch: {report.first_mismatch}")
    return EXIT_OK if report.ok else EXIT_ERROR


def _print_units(report: Any) -> None:
    """The per-unit table: what each planned unit kept for backward, and what its action allows."""
    if not report.units:
        return
    width = max(len(unit.fqn) for unit in report.units)
    action_width = max(len(unit.action) for unit in report.units)
    print(
        f"{'unit':<{width}}  {'action':<{action_width}}  {'kept without':>12}  {'kept with':>10}"
        f"  {'allowed':>10}"
    )
    for unit in report.units:
        print(
            f"{unit.fqn:<{width}}  {unit.action:<{action_width}}"
            f"  {format_bytes(unit.unplanned_kept_bytes):>12}"
            f"  {format_bytes(unit.planned_kept_bytes):>10}"
            f"  {format_bytes(unit.allowed_bytes):>10}{'' if unit.ok else '  NO'}"
        )
