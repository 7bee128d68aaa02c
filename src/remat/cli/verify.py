"""``remat verify``: one step with and one without a plan; are gradients and buffers unchanged?"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch

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
        help="check that a plan leaves loss, gradients and buffers bitwise unchanged",
        description="Run one training step without the plan and one with it, from the same seed"
        " and the same weights, and compare the loss, every parameter's gradient and every buffer"
        " (bitwise); report the measured peak of both. Exit code 1 when anything differs.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--plan", required=True, metavar="PATH", help="plan JSON (remat plan --out)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import remat
    from remat.profiling.step import measure_step

    if args.device == "meta":
        raise UsageError("--device meta has no values to compare; use cpu (or cuda)")
    try:
        plan = remat.Plan.load(args.plan)
    except ValueError as error:
        raise UsageError(str(error)) from None
    built = load_model_from_args(args)
    reference = copy.deepcopy(built.model)
    torch.manual_seed(args.seed)
    plain = measure_step(reference, built.example_inputs, loss_fn=built.loss_fn, optimizer="none")
    with remat.apply_(built.model, plan) as handle:
        torch.manual_seed(args.seed)
        planned = measure_step(
            built.model, built.example_inputs, loss_fn=built.loss_fn, optimizer="none"
        )
        checkpointed = handle.checkpointed
    differing_grads = [
        name
        for (name, a), (_, b) in zip(
            reference.named_parameters(), built.model.named_parameters(), strict=True
        )
        if (a.grad is None) != (b.grad is None)
        or (a.grad is not None and not torch.equal(a.grad, b.grad))
    ]
    differing_buffers = [
        name
        for (name, a), (_, b) in zip(
            reference.named_buffers(), built.model.named_buffers(), strict=True
        )
        if not torch.equal(a, b)
    ]
    payload = {
        "format_version": FORMAT_VERSION,
        "model": args.model,
        "plan": args.plan,
        "checkpointed": checkpointed,
        "grads_equal": not differing_grads,
        "buffers_equal": not differing_buffers,
        "differing_grads": differing_grads,
        "differing_buffers": differing_buffers,
        "measured_peak_bytes": planned.peak_bytes,
        "unplanned_peak_bytes": plain.peak_bytes,
    }
    if args.json:
        emit_json(payload)
    else:
        print(f"{args.model} with {args.plan}: {len(checkpointed)} modules checkpointed")
        print(
            f"gradients: {'bitwise equal' if not differing_grads else 'DIFFER: ' + ', '.join(differing_grads[:5])}"
        )
        print(
            f"buffers:   {'bitwise equal' if not differing_buffers else 'DIFFER: ' + ', '.join(differing_buffers[:5])}"
        )
        print(
            f"peak:      {format_bytes(planned.peak_bytes)} with the plan,"
            f" {format_bytes(plain.peak_bytes)} without (forward and backward, no optimizer)"
        )
    return EXIT_OK if not differing_grads and not differing_buffers else EXIT_ERROR
