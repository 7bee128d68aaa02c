"""Train the built-in GPT with FSDP2 and a remat plan, under torchrun.

    torchrun --nproc_per_node 2 examples/train_fsdp.py --budget 60% --steps 5
    torchrun --nproc_per_node 8 examples/train_fsdp.py --n-layer 24 --d-model 1024 --compile inductor

The documented order: rank 0 profiles one rank's batch and solves a plan for one of the ranks under
FSDP2 (sharded parameters, gradients and optimizer state; see docs/distributed.md); every rank
receives that plan (``broadcast_plan``) and applies it (``remat.apply_``), then compiles each block
(``remat.compile_units_``, optional), then shards (``fully_shard`` per block, then the root). Each
rank trains on its own batch; rank 0 prints every rank's peak and median step time.

Peak: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's maximum resident set size
(which includes the interpreter and libraries, so it is only an upper bound on tensor memory).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import remat
from remat.apply.compile import compile_units_
from remat.integrations.distributed import broadcast_plan, fully_shard_units
from remat.models.gpt import build
from remat.units import format_bytes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="60%", help="per-rank memory budget (default: 60%%)")
    parser.add_argument("--steps", type=int, default=5, help="training steps (default: 5)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank (default: 4)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument(
        "--compile",
        default="none",
        metavar="BACKEND",
        help="torch.compile each block with this backend (inductor, aot_eager), or none (default)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        sys.exit("run me with torchrun, e.g. torchrun --nproc_per_node 2 examples/train_fsdp.py")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank; fully_shard keeps each shard
    with device:
        built = build(
            batch=args.batch,
            seq=args.seq,
            n_layer=args.n_layer,
            d_model=args.d_model,
            n_head=args.n_head,
            vocab=args.vocab,
            dropout=0.0,
        )
    model = built.model
    data = torch.Generator(device=device).manual_seed(1 + rank)  # each rank its own batches
    idx = torch.randint(args.vocab, (args.batch, args.seq), device=device, generator=data)
    targets = torch.randint(args.vocab, (args.batch, args.seq), device=device, generator=data)

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def solve() -> remat.Plan:
        prof = remat.profile(
            model, (idx,), loss_fn=loss_fn, optimizer="adamw", world_size=world, fsdp=True
        )
        result = remat.solve(prof, args.budget)
        if result.status == "INFEASIBLE":
            print(f"rank 0: no plan fits {args.budget}; using the plan with the least peak")
        print(
            f"rank 0: {result.status} plan for {world} ranks, budget {args.budget} ->"
            f" {format_bytes(result.budget_bytes)}, predicted peak per rank"
            f" {format_bytes(result.predicted_peak_bytes)} (at {result.where});"
            f" recompute {result.plan.to_dict()['actions']}",
            flush=True,
        )
        return result.plan

    plan = broadcast_plan(solve if rank == 0 else None)  # 0. one plan, solved once
    handle = remat.apply_(model, plan)  # 1. remat
    if args.compile != "none":
        compile_units_(model, handle, backend=args.compile)  # 2. per-block compile
    fully_shard_units(model, plan)  # 3. fully_shard per block, then the root

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step_ms = []
    for step in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(idx))
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        step_ms.append((time.perf_counter() - start) * 1e3)
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}, {step_ms[-1]:.1f} ms", flush=True)

    if cuda:
        peak, what = torch.cuda.max_memory_allocated(device), "max_memory_allocated"
    else:
        peak, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "max RSS"
    timed = step_ms[1:] or step_ms  # the first step warms up (and compiles)
    mine = {"rank": rank, "peak_bytes": peak, "step_ms": statistics.median(timed)}
    everyone: list[dict] = [{}] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        for row in everyone:
            print(
                f"rank {row['rank']}: peak {format_bytes(row['peak_bytes'])} ({what}),"
                f" step {row['step_ms']:.1f} ms (median of {len(timed)})"
            )
    # Every rank's collectives done before the group goes: gloo's worker threads still holding
    # work at teardown abort the process at exit now and then ("terminate called without an
    # active exception", seen 2 runs in 7 on this CPU).
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
