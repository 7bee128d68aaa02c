"""How long `remat profile` takes on the meta device for a model far larger than this machine.

Issue 2 asks that a 48-layer GPT of width 2048 at sequence 2048 profiles in under a minute on a
2-core machine with no real memory. Run:

    .venv/bin/python benchmarks/meta_profile.py [--out benchmarks/results/meta_profile.json]

It exits 1 when the limit is missed, and records wall time, peak bytes and the process's maximum
resident memory (which shows that the 9 GiB of weights were never allocated).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import resource
import sys
import time
from datetime import date

import torch

from remat.cli.main import main as remat_main

ARGV = [
    "profile",
    "gpt",
    "--device",
    "meta",
    "--seq",
    "2048",
    "--json",
    "--set",
    "n_layer=48",
    "d_model=2048",
    "n_head=16",
]
LIMIT_S = 60.0


def run() -> dict:
    buffer = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(buffer):
        code = remat_main(ARGV)
    elapsed_s = time.perf_counter() - start
    data = json.loads(buffer.getvalue())
    return {
        "format_version": 1,
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch_version": torch.__version__,
        "command": "remat " + " ".join(ARGV),
        "exit_code": code,
        "wall_s": round(elapsed_s, 2),
        "limit_s": LIMIT_S,
        "peak_bytes": data["peak_bytes"],
        "static_bytes": data["static_bytes"],
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()
    result = run()
    text = json.dumps(result, indent=2)
    sys.stdout.write(text + "\n")
    if args.out:
        with open(args.out, "w") as stream:
            stream.write(text + "\n")
    sys.exit(0 if result["exit_code"] == 0 and result["wall_s"] < LIMIT_S else 1)
