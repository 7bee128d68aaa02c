"""What every subcommand shares: exit codes, the usage-error type, and JSON output."""

from __future__ import annotations

import json
import sys
from typing import Any

from remat.cost.model import TIMED_SOURCES, Profile, block_cost, blocks_of
from remat.plan import Plan
from remat.units import format_bytes, format_ms

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INFEASIBLE = 3


class UsageError(ValueError):
    """A mistake in what the user typed; the CLI prints it and exits with code 2."""


def emit_json(payload: Any) -> None:
    """Write one JSON document to stdout."""
    json.dump(payload, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def plan_lines(profile: Profile, plan: Plan) -> list[str]:
    """One line per block of ``plan`` (a unit, or the units of a segment): its action, what it
    holds for backward (what it adds to the live total that outlives the forward, as the simulator
    counts it) and what it costs (ms, or forward FLOPs for a profile without times).

    Example:
        >>> from remat.cost.model import example_profile
        >>> plan = Plan(actions={"b.1": "segment:a", "b.2": "segment:a", "b.3": "recompute"})
        >>> for line in plan_lines(example_profile(4), plan):
        ...     print(line)
          b.0       keep       holds      100 B  costs    0.000 ms
          b.1..b.2  segment    holds       10 B  costs      2.0 ms
          b.3       recompute  holds       10 B  costs      1.0 ms
    """
    fqns = profile.unit_fqns
    timed = profile.time_source in TIMED_SOURCES
    rows = []
    for block in blocks_of(profile, plan):
        cost = block_cost(profile, block)
        action, _, name = block.describe(fqns).partition(" ")  # "segment b.1..b.2"
        spent = format_ms(cost.cost) if timed else f"{cost.cost / 1e9:.3g} GFLOP"
        rows.append((name, action, format_bytes(cost.persistent_delta_bytes), spent))
    name_width = max(len(r[0]) for r in rows)
    action_width = max(len(r[1]) for r in rows)
    return [
        f"  {name.ljust(name_width)}  {action.ljust(action_width)}  holds {held:>10}  costs {spent:>11}"
        for name, action, held, spent in rows
    ]


def add_model_arguments(parser: Any) -> None:
    """The arguments every command that builds a model shares."""
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="a built-in (gpt, mlp, cnn, unet, moe), hf:NAME (gpt2, llama, bert, t5: Hugging Face"
        " models with random weights; the hf extra) or package.module:factory returning"
        " (model, example_inputs[, loss_fn])",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where to run: cpu, cuda, or meta (exact bytes from shapes alone, no memory used;"
        " default: cpu)",
    )
    parser.add_argument("--batch", type=int, help="batch size passed to the model factory")
    parser.add_argument("--seq", type=int, help="sequence length passed to the model factory")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="parameter and input dtype (default: float32)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="size overrides passed to the factory, e.g. --set n_layer=48 d_model=2048",
    )
    parser.add_argument(
        "--units",
        nargs="+",
        metavar="UNIT",
        help="what the plan may act on: class names, FQNs or re: patterns (default: the"
        " finest repeated blocks, e.g. the blocks inside a ConvNeXt or Swin stage)",
    )
    parser.add_argument(
        "--optimizer",
        default="adamw",
        choices=["adamw", "sgd", "none"],
        help="optimizer whose step is part of the measured step (default: adamw)",
    )
    parser.add_argument(
        "--precision",
        default="32",
        choices=["32", "bf16-mixed", "fp16-mixed", "bf16-true"],
        help="precision of the step, by Lightning's names: 32 (as the model is; default),"
        " bf16-mixed / fp16-mixed (forward and loss under torch.autocast, backward outside it;"
        " fp16 with a GradScaler), bf16-true (with --dtype bfloat16)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def check_precision_args(args: Any) -> None:
    """``--precision bf16-true`` needs ``--dtype bfloat16``, and a mixed precision a device that
    autocasts (cpu or cuda): usage errors otherwise."""
    precision = getattr(args, "precision", "32")
    if precision == "bf16-true" and args.dtype != "bfloat16":
        raise UsageError(
            f"--precision bf16-true: got --dtype {args.dtype}; expected --dtype bfloat16 (the"
            " parameters in bfloat16), or --precision bf16-mixed to autocast a float32 model"
        )
    device = args.device.strip().lower()
    if precision in ("bf16-mixed", "fp16-mixed") and device.split(":")[0] not in ("cpu", "cuda"):
        raise UsageError(
            f"--precision {precision}: got --device {args.device}; expected cpu or cuda, where"
            " torch.autocast runs (meta and estimate mode do not model autocast yet: use --dtype"
            " bfloat16 for a bf16 model there)"
        )


def load_model_from_args(args: Any) -> Any:
    """Build the model the arguments name; mistakes in them are usage errors (exit code 2)."""
    import torch

    from remat.models.spec import load_model, parse_overrides

    check_precision_args(args)
    for flag in ("batch", "seq"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag}: got {value}; expected a positive integer")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(
            f"--device: got {args.device!r}; expected cpu, cuda, cuda:N or meta"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here; use cpu, or meta for shapes alone")
    if device.type == "cpu":
        from remat.benchmarking.run import keep_freed_host_memory

        # Every command times steps as remat bench does: without page faults for what an
        # earlier step freed (the CUDA caching allocator keeps freed memory the same way).
        keep_freed_host_memory()
    torch.manual_seed(args.seed)
    try:
        overrides = parse_overrides(args.overrides)
        return load_model(
            args.model,
            device=device,
            dtype=args.dtype,
            batch=args.batch,
            seq=args.seq,
            overrides=overrides,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
