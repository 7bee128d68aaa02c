"""``remat profile``: one training step under the tracker, and what each module holds."""

from __future__ import annotations

import argparse
from typing import Any

from torch import nn

from remat.cli._common import (
    EXIT_OK,
    UsageError,
    add_model_arguments,
    emit_json,
    load_model_from_args,
)
from remat.solve.baselines import parse_strategy
from remat.units import format_bytes, format_ms

FORMAT_VERSION = 1


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="run one training step under the memory tracker and print the peak and a"
        " per-module table",
        description="Run one training step (forward, loss, backward, optimizer step) under remat's"
        " exact memory tracker and print the step's peak, the peak by category, and per module:"
        " activation bytes saved for backward, output bytes, FLOPs, and (on real devices) op time."
        " With --device meta nothing is allocated: bytes come from shapes alone.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--strategy",
        default="none",
        help="plan applied before measuring: none, full, every_n:K or sqrt_n (default: none)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untracked steps before the measured one on real devices, for stable op times"
        " (default: 1; meta never warms up)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(func=run)


def _rows(model: nn.Module, units: list[str]) -> list[str]:
    """Units, plus the modules around them: children of the root (or of a root-level container)
    that are not inside a unit."""
    containers = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
    unit_set = set(units)
    rows: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(u + ".") for u in units):
            continue
        parent = name.rpartition(".")[0]
        parent_module = model.get_submodule(parent) if parent else model
        top_level = not parent or (isinstance(parent_module, containers) and "." not in parent)
        if name in unit_set or (top_level and not isinstance(module, containers)):
            rows.append(name)
    return rows


def run(args: argparse.Namespace) -> int:
    import torch

    import remat
    from remat.profiling.step import measure_step, training_step

    try:
        parse_strategy(args.strategy)
    except ValueError as error:
        raise UsageError(str(error)) from None
    built = load_model_from_args(args)
    model = built.model
    try:
        units = remat.apply.units.find_units_with_inputs(model, args.units, built.example_inputs)
    except ValueError as error:
        raise UsageError(str(error)) from None
    units = remat.execution_order(model, units, built.example_inputs)
    plan = remat.baseline_plan(args.strategy, units)
    on_meta = args.device == "meta"
    with remat.apply_(model, plan) as handle:
        if not on_meta:
            for _ in range(max(args.warmup, 0)):
                training_step(
                    model, built.example_inputs, loss_fn=built.loss_fn, precision=args.precision
                )
            for param in model.parameters():
                param.grad = None
        torch.manual_seed(args.seed)
        report = measure_step(
            model,
            built.example_inputs,
            loss_fn=built.loss_fn,
            optimizer=args.optimizer,
            time_ops=not on_meta,
            precision=args.precision,
        )
        actions = dict(handle.actions)
    modules = dict(model.named_modules())
    rows = []
    for fqn in _rows(model, units):
        stats = report.modules.get(fqn, remat.ModuleStats())
        rows.append(
            {
                "fqn": fqn,
                "class": type(modules[fqn]).__name__,
                "unit": fqn in units,
                "action": actions.get(fqn, "keep") if fqn in units else "context",
                "calls": stats.calls,
                "saved_bytes": stats.saved_bytes,
                "activation_bytes": stats.activation_bytes,
                "output_bytes": stats.output_bytes,
                "forward_flops": stats.forward_flops,
                "backward_flops": stats.backward_flops,
                "forward_ms": stats.forward_ms,
                "backward_ms": stats.backward_ms,
                "peak_forward_bytes": report.module_peaks.get(fqn, {}).get("forward"),
                "peak_backward_bytes": report.module_peaks.get(fqn, {}).get("backward"),
            }
        )
    payload = {
        "format_version": FORMAT_VERSION,
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "optimizer": args.optimizer,
        "precision": args.precision,
        "strategy": args.strategy,
        "torch_version": torch.__version__,
        "peak_bytes": report.peak_bytes,
        "static_bytes": report.static_bytes,
        "peak_phase": report.peak_phase,
        "peak_module": report.peak_module,
        "peak_by_category": report.peak_by_category,
        "num_units": len(units),
        "units": [row for row in rows if row["unit"]],
        "context": [row for row in rows if not row["unit"]],
    }
    if args.json:
        emit_json(payload)
    else:
        _print_human(payload, rows, report)
    return EXIT_OK


def _print_human(payload: dict[str, Any], rows: list[dict[str, Any]], report: Any) -> None:
    size = ", ".join(f"{k} {payload[k]}" for k in ("batch", "seq") if payload[k] is not None)
    print(
        f"{payload['model']} on {payload['device']} ({payload['dtype']}{', ' + size if size else ''}),"
        f" strategy {payload['strategy']}, optimizer {payload['optimizer']}"
    )
    where = f" at {payload['peak_module']}" if payload["peak_module"] else ""
    print(
        f"step peak: {format_bytes(payload['peak_bytes'])} ({payload['peak_bytes']:,} bytes),"
        f" reached in {payload['peak_phase']}{where}"
    )
    print(f"static:    {format_bytes(payload['static_bytes'])} (parameters, buffers, inputs)")
    print(
        "at the peak: "
        + ", ".join(
            f"{name} {format_bytes(value)}"
            for name, value in payload["peak_by_category"].items()
            if value
        )
    )
    print()
    header = (
        "module",
        "class",
        "action",
        "saved",
        "output",
        "fwd GFLOP",
        "bwd GFLOP",
        "fwd",
        "bwd",
    )
    table = [header]
    for row in rows:
        table.append(
            (
                row["fqn"],
                row["class"],
                row["action"],
                format_bytes(row["saved_bytes"]),
                format_bytes(row["output_bytes"]),
                f"{row['forward_flops'] / 1e9:.3f}",
                f"{row['backward_flops'] / 1e9:.3f}",
                format_ms(row["forward_ms"]),
                format_ms(row["backward_ms"]),
            )
        )
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    for index, line in enumerate(table):
        cells = [
            str(cell).ljust(width) if col < 3 else str(cell).rjust(width)
            for col, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
        if index == 0:
            print("  ".join("-" * w for w in widths))
    print()
    print(
        f"{payload['num_units']} units. saved: activation bytes a module created in forward, still"
        " alive when forward ended, other than its outputs (what recomputing it frees)."
    )
