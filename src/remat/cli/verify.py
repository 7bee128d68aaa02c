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
        description="Run one training step without the plan and one with it, from the same seed"
        " and weights; compare every module's output, the loss, every parameter's and input's"
        " gradient and every buffer (bitwise unless --rtol/--atol), name the first mismatch, and"
        " check that the plan took effect (the bytes the forward keeps for backward fell as"
        " predicted, within 5%). Exit code 1 when anything differs or the plan did not take effect.",
    )
    add_model_arguments(parser)
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
        seed=args.seed,
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
        print(
            f"applied:   {'yes' if report.applied else 'NO'}: saved"
            f" {format_bytes(report.measured_saved_bytes)} of forward activations, predicted"
            f" {format_bytes(report.predicted_saved_bytes)}"
        )
        print(
            f"peak:      {format_bytes(report.measured_peak_bytes)} with the plan,"
            f" {format_bytes(report.unplanned_peak_bytes)} without (forward and backward)"
        )
        if report.first_mismatch:
            print(f"first mismatch: {report.first_mismatch}")
    return EXIT_OK if report.ok else EXIT_ERROR
