"""Train the built-in GPT with Hugging Face accelerate, remat planned before accelerator.prepare.

    python examples/accelerate_train.py --steps 3                   # tiny, on the CPU
    python examples/accelerate_train.py --budget 60% --mixed-precision bf16 --steps 50
    accelerate launch examples/accelerate_train.py --budget 2GiB    # several processes

The order matters: remat measures and plans the bare model, then prepare moves, wraps (DDP, FSDP),
autocasts and compiles it around the plan, as torchtitan applies activation checkpointing before
compile and fully_shard. plan_before_prepare reads the step from the Accelerator (its mixed precision,
gradient accumulation, processes, FSDP) and refuses a model prepare already returned.

The measured peak is a steady-state step's (the second: the optimizer's state, made by the first, alive
through it) under remat.track_memory (on CUDA, torch.cuda.max_memory_allocated); after training, one
more step with the plan removed gives the unplanned peak beside it. Results go to stdout.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import remat
from remat.integrations.accelerate import plan_before_prepare
from remat.models import build_builtin
from remat.units import format_bytes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="50%", help="22GiB, bytes, 60%%, min, or none")
    parser.add_argument("--steps", type=int, default=20, help="at least 2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps: got {args.steps}; expected at least 2 (the second is measured)")
    return args


def counting_data(args: argparse.Namespace) -> torch.utils.data.TensorDataset:
    """Each sequence counts up (mod vocab) from a random start: learnable in a few dozen steps."""
    start = torch.randint(args.vocab, (args.steps * args.batch, 1))
    tokens = (start + torch.arange(args.seq + 1)) % args.vocab
    return torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def main(argv: list[str] | None = None) -> int:
    from accelerate import Accelerator  # the accelerate extra: pip install 'remat[accelerate]'

    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    torch.manual_seed(args.seed)
    with accelerator.device:
        model = build_builtin(
            "gpt",
            batch=args.batch,
            seq=args.seq,
            n_layer=args.n_layer,
            d_model=args.d_model,
            n_head=args.n_head,
            vocab=args.vocab,
            dropout=0.0,
        ).model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loader = torch.utils.data.DataLoader(counting_data(args), batch_size=args.batch)

    # 1. remat on the bare model, for one batch of the training shapes; 2. then prepare
    handle = None
    if args.budget != "none":
        x, y = (t.to(accelerator.device) for t in next(iter(loader)))
        handle = plan_before_prepare(
            model,
            (x,),
            accelerator,
            budget=args.budget,
            optimizer=optimizer,
            loss_fn=lambda logits: next_token_loss(logits, y),
        )
        plan = handle.plan
        print(f"plan:           {plan.strategy}, recompute {', '.join(handle.checkpointed) or '-'}")
        print(f"precision:      {plan.precision}")
        print(f"budget:         {format_bytes(plan.budget_bytes)} ({plan.budget_bytes:,} bytes)")
        print(
            f"predicted peak: {format_bytes(plan.predicted_peak_bytes)}"
            f" ({plan.predicted_peak_bytes:,} bytes)"
        )
    prepared, prepared_optimizer, prepared_loader = accelerator.prepare(model, optimizer, loader)

    losses: list[float] = []
    peak_bytes = 0
    for step, (x, y) in enumerate(prepared_loader):
        if step == 1:  # the optimizer's state alive from the first step on
            peak_bytes, loss = measured_step(accelerator, prepared, prepared_optimizer, x, y)
        else:
            loss = train_step(accelerator, prepared, prepared_optimizer, x, y)
        losses.append(loss.item())

    print(f"measured peak:  {format_bytes(peak_bytes)} ({peak_bytes:,} bytes), a steady-state step")
    if handle is not None:
        handle.remove()  # one more step without the plan, on a batch of the same shapes
        x, y = next(iter(prepared_loader))
        unplanned_bytes, _ = measured_step(accelerator, prepared, prepared_optimizer, x, y)
        print(f"unplanned peak: {format_bytes(unplanned_bytes)} ({unplanned_bytes:,} bytes)")
    print(f"loss:           {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0


def train_step(accelerator, model, optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    optimizer.zero_grad(set_to_none=True)
    loss = next_token_loss(model(x), y)
    accelerator.backward(loss)
    optimizer.step()
    return loss.detach()


def measured_step(accelerator, model, optimizer, x, y) -> tuple[int, torch.Tensor]:  # type: ignore[no-untyped-def]
    """One training step and its peak bytes: torch's counter on CUDA, remat's tracker elsewhere."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss = train_step(accelerator, model, optimizer, x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), loss
    with remat.track_memory(model, optimizer, x, y) as tracker:
        loss = train_step(accelerator, model, optimizer, x, y)
    return tracker.peak_bytes, loss


if __name__ == "__main__":
    sys.exit(main())
