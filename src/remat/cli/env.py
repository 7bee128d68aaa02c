"""``remat env``: is my environment ready? Versions, devices and the device remat will use."""

from __future__ import annotations

import argparse
from typing import Any

from remat.cli._common import EXIT_OK, emit_json
from remat.env import EnvReport, collect_env
from remat.units import format_bytes

HELP = "print torch / CUDA / cuDNN / NCCL versions, the devices and what remat will use"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``env`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    parser = subparsers.add_parser(
        "env",
        help=HELP,
        description=(
            "Print the versions of remat, Python, torch, CUDA, cuDNN and NCCL, the CPU and the "
            "accelerators torch can see, and the device remat will use by default. "
            "Does not initialise CUDA on a machine without a GPU."
        ),
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document instead of tables"
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Collect the environment and print it (tables, or JSON with ``--json``); returns 0."""
    report = collect_env()
    if getattr(args, "json", False):
        emit_json(report.to_dict())
    else:
        print(render(report))
    return EXIT_OK


def render(report: EnvReport) -> str:
    """The human-readable form: a key/value table, the devices table, then the notes."""
    rows = [
        ("remat", report.remat_version),
        ("python", report.python_version),
        ("platform", report.platform),
        ("torch", report.torch_version),
        ("CUDA (torch build)", _or_dash(report.cuda_version)),
        ("cuDNN", _format_cudnn(report.cudnn_version)),
        ("NCCL", _or_dash(report.nccl_version)),
        ("CPU threads (torch)", str(report.cpu_threads)),
        ("CPU count", _or_dash(report.cpu_count)),
        ("CPU bf16", _yes_no(report.cpu_bf16_supported)),
        ("default device", report.default_device),
    ]
    lines = _table(rows, header=None)
    lines.append("")
    if report.devices:
        device_rows = [
            (
                f"{device.kind}:{device.index}" if device.kind == "cuda" else device.kind,
                device.name,
                _format_memory(device.total_memory_bytes),
                _or_dash(device.compute_capability),
                _yes_no(device.bf16_supported),
            )
            for device in report.devices
        ]
        lines.extend(_table(device_rows, header=("device", "name", "memory", "capability", "bf16")))
    else:
        lines.append("no CUDA devices")
    if report.notes:
        lines.append("")
        lines.extend(f"note: {note}" for note in report.notes)
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...] | None) -> list[str]:
    all_rows = ([header] if header else []) + rows
    widths = [max(len(row[col]) for row in all_rows) for col in range(len(all_rows[0]))]
    lines = []
    for row in all_rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    if header:
        lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


def _format_memory(num_bytes: int | None) -> str:
    return "-" if num_bytes is None else format_bytes(num_bytes)


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _format_cudnn(version: int | None) -> str:
    """90100 -> ``"9.1.0 (90100)"``; 8902 -> ``"8.9.2 (8902)"``; None -> ``"-"``."""
    if version is None:
        return "-"
    if version >= 10000:  # cuDNN 9+: major*10000 + minor*100 + patch
        major, rest = divmod(version, 10000)
    else:  # cuDNN 8: major*1000 + minor*100 + patch
        major, rest = divmod(version, 1000)
    minor, patch = divmod(rest, 100)
    return f"{major}.{minor}.{patch} ({version})"
