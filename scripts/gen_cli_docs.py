"""Write docs/cli.md from the argparse parsers, so the CLI reference never drifts from --help.

Run: .venv/bin/python scripts/gen_cli_docs.py   (tests/integration/test_cli.py checks it is current)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HEADER = """# CLI reference

Generated from the argparse parsers by `scripts/gen_cli_docs.py`; a test fails when this file and
`--help` disagree. Exit codes: 0 ok, 1 error, 2 usage (unknown model, strategy or flag), 3 infeasible
budget.
"""


def render() -> str:
    os.environ["COLUMNS"] = "100"
    from remat.cli.main import build_parser

    parser = build_parser()
    parts = [HEADER, "## remat\n", "```text\n" + parser.format_help() + "```\n"]
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, sub in subparsers.choices.items():
        parts.append(f"## remat {name}\n")
        parts.append("```text\n" + sub.format_help() + "```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    target = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
    target.write_text(render())
    sys.stdout.write(f"wrote {target}\n")
