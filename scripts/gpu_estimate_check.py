"""Estimate vs measured: remat's estimate for a named GPU beside what that GPU then measures.

For each case (the built-in GPT and a Llama-shaped transformers model, bf16, AdamW) it runs
``remat plan MODEL --device <gpu> --dtype bfloat16 --budget 50% --json`` (estimate mode: shapes on
``meta``, the GPU's kernels modelled), which predicts the peak of the unplanned step, of every unit
recomputed and of the solver's plan. Then, where CUDA is available, it builds the same model with
the same seed on the card, applies each of the three plans and measures one steady-state training
step (the optimizer's state made, a warm-up step run first) with ``torch.cuda.max_memory_allocated``.

The measured peak is the allocator's less what it holds that is no tensor of the step (cuBLAS
workspaces made by the warm-up: ``untracked_bytes``, what was allocated before the step beyond the
parameters, buffers, optimizer state and inputs); both raw figures are written too. The relative
error is ``(predicted - measured) / measured``.

The estimate half runs anywhere; ``--rehearse`` uses tiny shapes and runs the measuring half on
the CPU as far as it goes without CUDA (the model built, each plan applied, the step run), leaving
the measured fields ``null``.

Usage:
    python scripts/gpu_estimate_check.py --out OUT/estimate.json [--markdown OUT/estimate.md]
        [--device-name h100-80gb] [--cases gpt,llama] [--rehearse]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("gpu_estimate_check")

BUDGET = "50%"
DTYPE = "bfloat16"
SEED = 0

# Sizes on the GPU: a few hundred MB to a few GB of activations, a second or two per step on an
# H100; the estimate on meta takes seconds. Rehearsal: the same models, tiny.
CASES: dict[str, dict[str, Any]] = {
    "gpt": {
        "model": "gpt",
        "batch": 8,
        "seq": 1024,
        "set": {"n_layer": 8, "d_model": 1024, "n_head": 16, "vocab": 50304},
    },
    "llama": {
        "model": "hf:llama",
        "batch": 4,
        "seq": 1024,
        "set": {
            "num_hidden_layers": 8,
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "max_position_embeddings": 2048,
            "vocab_size": 32000,
        },
    },
}
REHEARSAL_CASES: dict[str, dict[str, Any]] = {
    "gpt": {
        "model": "gpt",
        "batch": 2,
        "seq": 32,
        "set": {"n_layer": 2, "d_model": 64, "n_head": 4, "vocab": 256},
    },
    "llama": {
        "model": "hf:llama",
        "batch": 2,
        "seq": 32,
        "set": {
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 256,
        },
    },
}
PLANS = ("none", "full", "solver")
"""The plans compared: the unplanned step, every unit recomputed, the solver's plan at BUDGET."""

# torch.cuda.get_device_name -> remat.devices name, by the GPU's family in the name; a family with
# several memory sizes is told apart by the card's total memory.
_FAMILIES = {
    "h200": ("h200",),
    "h100": ("h100-80gb",),
    "a100": ("a100-80gb", "a100-40gb"),
    "a40": ("a40",),
    "l4": ("l4",),
    "3090": ("rtx-3090",),
    "4090": ("rtx-4090",),
    "v100": ("v100-32gb", "v100-16gb"),
    "t4": ("t4",),
}


def device_for_gpu(cuda_name: str, total_memory_bytes: int) -> str | None:
    """The remat device (``remat.devices``) for a CUDA device name and memory, or ``None``.

    Example:
        >>> device_for_gpu("NVIDIA H100 80GB HBM3", 85 * 10**9)
        'h100-80gb'
        >>> device_for_gpu("NVIDIA A100-SXM4-40GB", 42 * 10**9), device_for_gpu("Tesla P4", 8)
        ('a100-40gb', None)
    """
    from remat.devices import get_device

    lowered = cuda_name.lower()
    for family, names in _FAMILIES.items():
        if family in lowered:
            specs = [get_device(name) for name in names]
            best = min(specs, key=lambda spec: abs(spec.memory_bytes - total_memory_bytes))
            return best.name
    return None


def plan_argv(case: dict[str, Any], device: str) -> list[str]:
    """The ``remat plan`` arguments of a case's estimate."""
    argv = [
        "plan",
        case["model"],
        "--device",
        device,
        "--dtype",
        DTYPE,
        "--batch",
        str(case["batch"]),
        "--seq",
        str(case["seq"]),
        "--seed",
        str(SEED),
        "--budget",
        BUDGET,
        "--json",
    ]
    if case["set"]:
        argv += ["--set", *(f"{key}={value}" for key, value in case["set"].items())]
    return argv


def estimate(case: dict[str, Any], device: str) -> dict[str, Any]:
    """Run ``remat plan ... --json`` in this process and return what it predicts."""
    from remat.cli.main import main

    argv = plan_argv(case, device)
    stdout = io.StringIO()
    begun = time.perf_counter()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"remat {' '.join(argv)} exited {code}")
    payload = json.loads(stdout.getvalue())
    row = payload["table"][0]
    return {
        "command": "remat " + " ".join(argv),
        "seconds": round(time.perf_counter() - begun, 2),
        "kernels": payload.get("kernels", []),
        "plan": payload["plan"],
        "predicted_peak_bytes": {
            "none": row["none_peak_bytes"],
            "full": row["full_peak_bytes"],
            "solver": payload["predicted_peak_bytes"],
        },
    }


def _storage_bytes(tensors: list[Any], round_bytes: int) -> int:
    """Bytes of the distinct storages of ``tensors`` on the device, each rounded up as CUDA's
    caching allocator rounds a block."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = -(-storage.nbytes() // round_bytes) * round_bytes
    return sum(seen.values())


def _step_tensors(model: Any, inputs: Any, optimizer: Any, loss_fn: Any = None) -> list[Any]:
    """What exists before a step: parameters, buffers, optimizer state, the batch, the tensors
    the loss function holds."""
    import torch

    from remat._compat import tree_flatten

    tensors = [*model.parameters(), *model.buffers()]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    tensors += [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
    # a loss function's own tensors (the built-in GPT's targets), which the estimate counts too
    cells = getattr(loss_fn, "__closure__", None) or ()
    tensors += [c.cell_contents for c in cells if isinstance(c.cell_contents, torch.Tensor)]
    device = next(model.parameters()).device
    return [t for t in tensors if t.device == device]


def measure(built: Any, plan: Any, on_cuda: bool) -> dict[str, Any]:
    """One steady-state training step of ``built`` under ``plan``; on CUDA its allocator peak."""
    import torch

    import remat
    from remat.profiling.step import make_optimizer, training_step

    model, inputs = built.model, built.example_inputs
    handle = remat.apply_(model, plan)
    try:
        optimizer = make_optimizer("adamw", model)  # its state made, as the estimate's step has it
        # warm-up: cuBLAS workspaces and lazily loaded kernels, outside the step measured
        training_step(model, inputs, loss_fn=built.loss_fn, optimizer=optimizer)
        for param in model.parameters():
            param.grad = None
        gc.collect()  # the previous plan's optimizer, if a cycle holds it
        if not on_cuda:
            training_step(model, inputs, loss_fn=built.loss_fn, optimizer=optimizer)
            return {"allocator_peak_bytes": None, "untracked_bytes": None, "peak_bytes": None}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        untracked = before - _storage_bytes(
            _step_tensors(model, inputs, optimizer, built.loss_fn), 512
        )
        training_step(model, inputs, loss_fn=built.loss_fn, optimizer=optimizer)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {
            "allocator_peak_bytes": peak,
            "untracked_bytes": untracked,
            "peak_bytes": peak - untracked,
        }
    finally:
        handle.remove()
        for param in model.parameters():
            param.grad = None


def attention_kernel(built: Any) -> str | None:
    """The SDPA kernel the device picks for the model's attention (causal, no mask, its dropout;
    the batch and length do not change the choice)."""
    import torch

    from remat._compat import sdpa_backend

    config = getattr(built.model, "config", None)
    if config is not None:
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = config.hidden_size // heads
        dropout = float(getattr(config, "attention_dropout", 0.0))
    else:
        block = built.model.blocks[0].attn
        heads = kv_heads = block.n_head
        head_dim = block.d_model // heads
        dropout = float(block.dropout)
    param = next(built.model.parameters())
    batch, seq = 1, 128
    q = torch.empty(batch, heads, seq, head_dim, device=param.device, dtype=param.dtype)
    kv = torch.empty(batch, kv_heads, seq, head_dim, device=param.device, dtype=param.dtype)
    try:
        return sdpa_backend(q, kv, kv, None, dropout, True, None, enable_gqa=heads != kv_heads)
    except (RuntimeError, TypeError) as error:  # a kernel check this torch does not have
        return f"unknown ({type(error).__name__}: {error})"


def run_case(
    name: str,
    case: dict[str, Any],
    device: str,
    on_cuda: bool,
    result: dict[str, Any],
    save: Any = lambda: None,
) -> None:
    """Estimate, then measure, one case into ``result``, calling ``save`` after the estimate
    (a run cut short keeps the predictions); errors are recorded, not raised."""
    import torch

    import remat
    from remat.models.spec import load_model

    result.update(case=name, model=case["model"], batch=case["batch"], seq=case["seq"])
    result.update(set=case["set"], dtype=DTYPE, budget=BUDGET, device=device)
    try:
        result["estimate"] = estimate(case, device)
    except Exception as error:
        result["error"] = f"estimate: {type(error).__name__}: {error}"
        return
    rows = {
        plan: {"predicted_peak_bytes": result["estimate"]["predicted_peak_bytes"][plan]}
        for plan in PLANS
    }
    result["plans"] = rows
    save()
    try:
        torch.manual_seed(SEED)
        built = load_model(
            case["model"],
            device="cuda" if on_cuda else "cpu",
            dtype=DTYPE,
            batch=case["batch"],
            seq=case["seq"],
            overrides=case["set"],
        )
        result["attention_kernel_on_device"] = attention_kernel(built)
        units = remat.find_units(built.model)
        plans = {
            "none": remat.baseline_plan("none", units),
            "full": remat.baseline_plan("full", units),
            "solver": remat.Plan.from_dict(result["estimate"]["plan"]),
        }
        for plan_name, plan in plans.items():
            begun = time.perf_counter()
            measured = measure(built, plan, on_cuda)
            row = rows[plan_name]
            row.update(measured_peak_bytes=measured["peak_bytes"])
            row.update(allocator_peak_bytes=measured["allocator_peak_bytes"])
            row.update(untracked_bytes=measured["untracked_bytes"])
            row["relative_error"] = (
                None
                if measured["peak_bytes"] is None
                else (row["predicted_peak_bytes"] - measured["peak_bytes"]) / measured["peak_bytes"]
            )
            row["seconds"] = round(time.perf_counter() - begun, 2)
        del built
    except Exception as error:
        log.exception("measuring %s", name)
        result["error"] = f"measure: {type(error).__name__}: {error}"
    finally:
        if on_cuda:
            torch.cuda.empty_cache()


def markdown(report: dict[str, Any]) -> str:
    """The comparison as a Markdown table."""
    lines = [
        f"# Estimate vs measured on {report['cuda_device_name'] or 'no GPU (rehearsal)'}",
        "",
        f"remat device `{report['device']}`, torch {report['torch_version']}, {report['date']};"
        f" {DTYPE}, AdamW, solver budget {BUDGET}. Measured: `torch.cuda.max_memory_allocated`"
        " over one steady-state step, less the untracked bytes (cuBLAS workspaces).",
        "",
        "| case | plan | predicted | measured | error | allocator raw | untracked |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]

    def mib(value: int | None) -> str:
        return "-" if value is None else f"{value / 2**20:,.1f} MiB"

    for case in report["cases"]:
        for plan, row in case.get("plans", {}).items():
            error = row.get("relative_error")
            lines.append(
                f"| {case['case']} | {plan} | {mib(row['predicted_peak_bytes'])}"
                f" | {mib(row.get('measured_peak_bytes'))}"
                f" | {'-' if error is None else f'{error:+.2%}'}"
                f" | {mib(row.get('allocator_peak_bytes'))} | {mib(row.get('untracked_bytes'))} |"
            )
        if case.get("error"):
            lines.append(f"| {case['case']} | error | {case['error']} | | | | |")
    return "\n".join(lines) + "\n"


def _write(report: dict[str, Any], args: argparse.Namespace) -> None:
    """Write the report as it stands: a run cut short by its time limit keeps what it has."""
    report["errors"] = [case["error"] for case in report["cases"] if case.get("error")]
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the JSON report's path")
    parser.add_argument("--markdown", help="also write the table here")
    parser.add_argument(
        "--device-name",
        help="remat device to estimate for (default: from torch.cuda.get_device_name; h100-80gb"
        " without CUDA)",
    )
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: gpt,llama")
    parser.add_argument(
        "--rehearse", action="store_true", help="tiny shapes; measured fields null off CUDA"
    )
    args = parser.parse_args(argv)
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        parser.error(f"--cases: got {unknown}; expected names from {', '.join(CASES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    import torch

    on_cuda = torch.cuda.is_available()
    cuda_name = torch.cuda.get_device_name(0) if on_cuda else None
    device = args.device_name
    if device is None and on_cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        device = device_for_gpu(cuda_name or "", total)
        if device is None:
            log.warning("no remat device for %r: estimating for h100-80gb", cuda_name)
    device = device or "h100-80gb"
    table = REHEARSAL_CASES if args.rehearse else CASES
    report: dict[str, Any] = {
        "device": device,
        "cuda_device_name": cuda_name,
        "torch_version": torch.__version__,
        "rehearsal": bool(args.rehearse),
        "date": time.strftime("%Y-%m-%d"),
        "cases": [],
    }
    for name in args.cases.split(","):
        log.info(
            "case %s: estimate for %s, then measure%s",
            name,
            device,
            "" if on_cuda else " (no CUDA: null)",
        )
        result: dict[str, Any] = {}
        report["cases"].append(result)
        run_case(name, table[name], device, on_cuda, result, save=lambda: _write(report, args))
        _write(report, args)
    errors = report["errors"]
    sys.stdout.write(markdown(report))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
