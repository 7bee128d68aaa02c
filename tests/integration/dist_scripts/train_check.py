"""Run by ``torchrun --nproc_per_node 2`` from tests/integration/test_distributed.py.

Trains a tiny built-in GPT with a remat plan (solved on rank 0, broadcast) under DDP and under FSDP2,
on CPU with gloo, each rank on its half of one global batch; rank 0 also runs the unplanned model
on the whole batch in a single process. Rank 0 writes everything the test compares to ``--out``
(torch.save): per configuration the losses, the full gradients after the first backward and the full
parameters after one optimizer step, and the reference's.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import remat
from remat.apply.compile import compile_units_
from remat.integrations.distributed import broadcast_plan, fully_shard_units
from remat.models.gpt import build

SIZES = {"batch": 4, "seq": 16, "n_layer": 3, "d_model": 32, "n_head": 2, "vocab": 64}


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2) gathered to the full tensor; a plain tensor as it is."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return (full_tensor() if full_tensor is not None else tensor).detach().clone()


def loss_of(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(idx)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> dict:
    """Two steps of SGD; the gradients of the first and the parameters after it."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    grads: dict[str, torch.Tensor] = {}
    params: dict[str, torch.Tensor] = {}
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, idx, targets)
        loss.backward()
        losses.append(loss.detach().clone())
        if step == 0:
            grads = {n: full(p.grad) for n, p in model.named_parameters()}
        opt.step()
        if step == 0:
            params = {n: full(p) for n, p in model.named_parameters()}
    return {"losses": losses, "grads": grads, "params": params}


def dropout_pairs(
    plans: dict[bool, remat.Plan],
    units: list[str],
    rank: int,
    idx: torch.Tensor,
    targets: torch.Tensor,
) -> dict[str, dict]:
    """The same model with dropout on, trained under DDP and under FSDP2 with the plan and
    without it, each rank seeded alike for both: a recomputed unit must replay the dropout masks
    its forward drew, so planned and unplanned runs are bitwise equal, rank by rank."""
    torch.manual_seed(0)
    dropped = build(dropout=0.25, **SIZES).model
    with torch.no_grad():  # dropout is on: training mode's loss is not evaluation mode's
        torch.manual_seed(100 + rank)
        train_loss = loss_of(dropped, idx, targets)
        eval_loss = loss_of(dropped.eval(), idx, targets)
        dropped.train()
    out: dict[str, dict] = {"dropout_check": {"train": train_loss, "eval": eval_loss}}
    for fsdp in (False, True):
        for planned in (True, False):
            model = copy.deepcopy(dropped)
            plan = plans[fsdp] if planned else remat.baseline_plan("none", units)
            handle = remat.apply_(model, plan)
            if fsdp:
                fully_shard_units(model, plan)
                trained: torch.nn.Module = model
            else:
                trained = DistributedDataParallel(model)
            torch.manual_seed(100 + rank)  # the same masks for both runs of this rank
            result = train(trained, idx, targets)
            result["actions"] = handle.actions
            if not fsdp:
                result["grads"] = {k.removeprefix("module."): v for k, v in result["grads"].items()}
                result["params"] = {
                    k.removeprefix("module."): v for k, v in result["params"].items()
                }
            name = f"{'fsdp' if fsdp else 'ddp'}_dropout{'' if planned else '_plain'}"
            out[name] = result
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--configs", nargs="+", default=["ddp", "ddp_sqrt_n", "fsdp", "fsdp_compile"]
    )
    parser.add_argument("--dropout", action="store_true", help="also the dropout pairs")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    built = build(dropout=0.0, **SIZES)
    initial = copy.deepcopy(built.model)
    idx = built.example_inputs[0]
    targets = torch.randint(SIZES["vocab"], idx.shape, generator=torch.Generator().manual_seed(1))
    share = SIZES["batch"] // world
    local_idx = idx[rank * share : (rank + 1) * share]
    local_targets = targets[rank * share : (rank + 1) * share]
    results: dict[str, dict] = {}
    if rank == 0:
        results["reference"] = train(copy.deepcopy(initial), idx, targets)
    units = remat.find_units(initial)

    profiled: list[remat.Profile] = []

    def solve_plan(fsdp: bool) -> remat.Plan:
        # Only rank 0 profiles (one process, its own half batch) and solves, per rank of `world`.
        if not profiled:
            profiled.append(
                remat.profile(
                    copy.deepcopy(initial),
                    (local_idx,),
                    loss_fn=lambda logits: F.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), local_targets.reshape(-1)
                    ),
                    optimizer="sgd",
                    units=units,
                    repeats=1,
                )
            )
        return remat.solve(profiled[0], "min", world_size=world, fsdp=fsdp).plan

    plans = {
        fsdp: broadcast_plan((lambda fsdp=fsdp: solve_plan(fsdp)) if rank == 0 else None)
        for fsdp in (False, True)
    }
    # Every rank reports the plans it received: they must be the same.
    received: list = [None] * world
    dist.all_gather_object(received, {k: v.to_dict() for k, v in plans.items()})
    results["plans_per_rank"] = received
    for config in args.configs:
        model = copy.deepcopy(initial)
        plan = plans[config.startswith("fsdp")]
        if config == "ddp_sqrt_n":  # segments of several units, which DDP allows
            plan = remat.baseline_plan("sqrt_n", plan.units or units)
        handle = remat.apply_(model, plan)  # 1. remat
        if config.endswith("_compile"):
            # 2. torch.compile per block (each unit module.compile()-d: the compiler applies the plan)
            compile_units_(model, handle, backend=os.environ.get("COMPILE_BACKEND", "aot_eager"))
        if config.startswith("fsdp"):
            fully_shard_units(model, plan)  # 3. fully_shard per unit, then the root
            trained = model
        else:
            trained = DistributedDataParallel(model)
        out = train(trained, local_idx, local_targets)
        # Each rank's loss is the mean over its half; the global loss is their mean.
        losses = [loss.clone() for loss in out["losses"]]
        for loss in losses:
            dist.all_reduce(loss)
            loss /= world
        out["losses"] = losses
        out["actions"] = handle.actions
        if config.startswith("ddp"):
            out["grads"] = {k.removeprefix("module."): v for k, v in out["grads"].items()}
            out["params"] = {k.removeprefix("module."): v for k, v in out["params"].items()}
        results[config] = out
    if args.dropout:
        results.update(dropout_pairs(plans, units, rank, local_idx, local_targets))
    if rank == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
