"""Entry point of the ``remat`` command.

Exit codes: 0 ok, 1 error, 2 usage (bad model name, strategy, flag), 3 infeasible budget.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from remat.cli import bench as bench_cmd
from remat.cli import env as env_cmd
from remat.cli import plan as plan_cmd
from remat.cli import profile as profile_cmd
from remat.cli import timeline as timeline_cmd
from remat.cli import verify as verify_cmd
from remat.cli._common import EXIT_ERROR, EXIT_USAGE, UsageError

_SUBCOMMANDS = (env_cmd, profile_cmd, plan_cmd, verify_cmd, bench_cmd, timeline_cmd)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to check the CLI reference in docs/)."""
    parser = argparse.ArgumentParser(
        prog="remat",
        description="Measure, plan and apply activation recomputation for PyTorch training.",
        epilog="Exit codes: 0 ok, 1 error, 2 usage, 3 infeasible budget.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also the process's, through the console script)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `remat ... | head`: the reader left; not an error
        sys.stdout = open(os.devnull, "w")  # the flush at exit would raise again
        return 0
    except UsageError as error:
        parser.exit(EXIT_USAGE, f"remat {args.command}: error: {error}\n")
    except (ValueError, TypeError, RuntimeError, OSError) as error:
        sys.stderr.write(f"remat {args.command}: error: {error}\n")
        return EXIT_ERROR
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
