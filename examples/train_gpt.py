"""Train the built-in GPT within a memory budget: remat.auto_ plans and applies, the loop is plain.

    python examples/train_gpt.py --budget 50%            # halfway from the least peak to the unplanned one
    python examples/train_gpt.py --budget none           # the same training without a plan
    python examples/train_gpt.py --budget 2GiB --device cuda --n-layer 24 --d-model 1024 --seq 1024

The data is synthetic and learnable: each sequence counts up from a random token (mod the vocabulary),
so the next token follows from the current one and the loss falls within a few dozen steps. The first step
runs under remat.track_memory (on CUDA, torch.cuda.max_memory_allocated), which gives the measured
peak; the step time is the median of the other steps. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
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
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def batch_of(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets: each sequence counts up (mod vocab) from a random start."""
    start = torch.randint(args.vocab, (args.batch, 1), device=device)
    tokens = (start + torch.arange(args.seq + 1, device=device)) % args.vocab
    return tokens[:, :-1], tokens[:, 1:]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


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
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        tracked = step == 0 and device.type != "cuda"
        with remat.track_memory(model, optimizer, x, y) if tracked else nullcontext() as tracker:
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)  # kept through backward, as remat's profile does
            loss = next_token_loss(logits, y)
            loss.backward()
            optimizer.step()
        if tracked:
            peak_bytes = tracker.peak_bytes
        if device.type == "cuda":
            torch.cuda.synchronize()
            if step == 0:
                peak_bytes = torch.cuda.max_memory_allocated()
        if step > 0:  # the first step creates the optimizer state and is tracked: not timed
            times_ms.append((time.perf_counter() - start) * 1e3)
        losses.append(loss.item())
        bar.set_postfix(f"loss {losses[-1]:.3f}")

    step_ms = statistics.median(times_ms) if times_ms else float("nan")
    print(f"measured peak:  {format_bytes(peak_bytes)} ({peak_bytes:,} bytes)")
    print(f"step time:      {step_ms:.1f} ms (median of {len(times_ms)} steps)")
    print(f"loss:           {losses[0]:.4f} -> {losses[-1]:.4f}")
    if handle is not None:
        handle.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
