"""Train the built-in GPT within a memory budget: remat.auto_ plans and applies, the loop is plain.

    python examples/train_gpt.py --budget 50%            # halfway from the least peak to the unplanned one
    python examples/train_gpt.py --budget none           # the same training without a plan
    python examples/train_gpt.py --budget 2GiB --device cuda --n-layer 24 --d-model 1024 --seq 1024

The data is synthetic and learnable: each sequence counts up from a random token (mod the vocabulary),
so the next token follows from the current one and the loss falls within a few dozen steps.

The measured peak is a steady-state step's: the second step (the optimizer's state made by the first
and alive through it), under remat.track_memory (on CUDA, torch.cuda.max_memory_allocated). The first
step's peak is the optimizer creating its state, the same with a plan and without, so it says nothing
about the plan. With a plan, one more step after training, the plan removed, gives the unplanned peak
beside it. The step time is the median of the steps after the measured one. Progress goes to stderr,
results to stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import remat
from remat.models import build_builtin
from remat.units import format_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from progress_bar import Progress


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget", default="50%", help="22GiB, bytes, 60%%, min, or none (no plan)"
    )
    parser.add_argument("--steps", type=int, default=50, help="at least 2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(
            f"--steps: got {args.steps}; expected at least 2 (the second step is measured)"
        )
    return args


def batch_of(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets: each sequence counts up (mod vocab) from a random start."""
    start = torch.randint(args.vocab, (args.batch, 1), device=device)
    tokens = (start + torch.arange(args.seq + 1, device=device)) % args.vocab
    return tokens[:, :-1], tokens[:, 1:]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


MEASURED_STEP = 1
"""The step whose peak is reported: the second, the first having made the optimizer's state."""


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)  # kept through backward, as remat's profile does
    loss = next_token_loss(logits, y)
    loss.backward()
    optimizer.step()
    return loss


def measured_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> tuple[int, torch.Tensor]:
    """One training step and its peak bytes: torch's counter on CUDA, remat's tracker elsewhere."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss = train_step(model, optimizer, x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), loss
    with remat.track_memory(model, optimizer, x, y) as tracker:
        loss = train_step(model, optimizer, x, y)
    return tracker.peak_bytes, loss


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    with device:
        built = build_builtin(
            "gpt",
            batch=args.batch,
            seq=args.seq,
            n_layer=args.n_layer,
            d_model=args.d_model,
            n_head=args.n_head,
            vocab=args.vocab,
            dropout=0.0,
        )
    model = built.model
    x, y = batch_of(args, device)

    # Plan once, on one batch of the shapes the loop uses; the plan stays installed while training.
    handle = None
    if args.budget != "none":
        try:
            handle = remat.auto_(
                model, (x,), budget=args.budget, loss_fn=lambda out: next_token_loss(out, y)
            )
        except remat.InfeasibleBudgetError as error:
            print(error, file=sys.stderr)
            return 3
        result = handle.result
        print(f"plan:           {result.status}, recompute {', '.join(handle.checkpointed) or '-'}")
        print(
            f"budget:         {format_bytes(result.budget_bytes)} ({result.budget_bytes:,} bytes)"
        )
        print(
            f"predicted peak: {format_bytes(result.predicted_peak_bytes)}"
            f" ({result.predicted_peak_bytes:,} bytes), overhead {result.predicted_overhead:.3f}x"
        )

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses: list[float] = []
    times_ms: list[float] = []
    peak_bytes = 0
    bar = Progress(range(args.steps), args.steps, label="train ")
    for step in bar:
        x, y = batch_of(args, device)
        start = time.perf_counter()
        if step == MEASURED_STEP:  # the optimizer's state is alive from the first step on
            peak_bytes, loss = measured_step(model, optimizer, x, y)
        else:
            loss = train_step(model, optimizer, x, y)
        if step > MEASURED_STEP:
            times_ms.append((time.perf_counter() - start) * 1e3)
        losses.append(loss.item())
        bar.set_postfix(f"loss {losses[-1]:.3f}")

    print(f"measured peak:  {format_bytes(peak_bytes)} ({peak_bytes:,} bytes), a steady-state step")
    if handle is not None:
        handle.remove()  # one more step without the plan, on a batch of the same shapes
        unplanned_bytes, _ = measured_step(model, optimizer, *batch_of(args, device))
        print(f"unplanned peak: {format_bytes(unplanned_bytes)} ({unplanned_bytes:,} bytes)")
    if times_ms:
        step_ms = statistics.median(times_ms)
        print(f"step time:      {step_ms:.1f} ms (median of {len(times_ms)} steps)")
    else:
        print("step time:      - (no step after the measured one; run --steps 3 or more)")
    print(f"loss:           {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
