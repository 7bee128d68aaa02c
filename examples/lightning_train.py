"""Train the built-in GPT with Lightning's Trainer, remat planned by RematCallback at the first batch.

    python examples/lightning_train.py --steps 3                          # tiny, on the CPU
    python examples/lightning_train.py --budget 60% --precision bf16-mixed --steps 50
    python examples/lightning_train.py --root runs/gpt   # the plan saved there, reused next time

The callback plans the LightningModule's own training_step for the Trainer's precision, optimizer,
gradient accumulation and world size, logs the plan through self.log_dict, saves remat_plan.json in
the Trainer's default_root_dir and reuses it when run again on the same model and settings.

The measured peak is a steady-state step's (the second: the optimizer's state, made by the first, and
the first step's gradients alive through it), from a callback around the step: remat.track_memory
(on CUDA, torch.cuda.max_memory_allocated). The same run without the callback, two steps, gives the
unplanned peak beside it. Results go to stdout.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any

import torch
import torch.nn.functional as F

import remat
from remat.models import build_builtin
from remat.units import format_bytes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="50%", help="22GiB, bytes, 60%%, min")
    parser.add_argument("--steps", type=int, default=20, help="at least 2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu or auto")
    parser.add_argument("--root", default=None, help="default_root_dir (default: a new temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps: got {args.steps}; expected at least 2 (the second is measured)")
    return args


def make_module(args: argparse.Namespace) -> Any:
    import lightning.pytorch as pl  # the lightning extra: pip install 'remat[lightning]'

    class CountingGPT(pl.LightningModule):
        """The built-in GPT learning to count up (mod the vocabulary) from a random token."""

        def __init__(self) -> None:
            super().__init__()
            sizes = {"batch": args.batch, "seq": args.seq, "vocab": args.vocab}
            self.model = build_builtin(
                "gpt", n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head,
                dropout=0.0, **sizes,
            ).model  # fmt: skip

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self.model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=args.lr)

    return CountingGPT()


def counting_loader(args: argparse.Namespace, steps: int) -> torch.utils.data.DataLoader:
    start = torch.randint(args.vocab, (steps * args.batch, 1))
    tokens = (start + torch.arange(args.seq + 1)) % args.vocab
    data = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
    return torch.utils.data.DataLoader(data, batch_size=args.batch)


def peak_watch() -> Any:
    """A callback measuring the second step's peak, and keeping each step's loss."""
    import lightning.pytorch as pl

    class PeakWatch(pl.Callback):
        def __init__(self) -> None:
            self.peak_bytes = 0
            self.losses: list[float] = []
            self._tracker: Any = None

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, idx: int) -> None:
            if idx != 1:
                return
            if module.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                self._tracker = remat.track_memory(module, trainer.optimizers[0], *batch)
                self._tracker.__enter__()

        def on_train_batch_end(self, trainer: Any, module: Any, out: Any, batch: Any, idx: int) -> None:  # fmt: skip
            self.losses.append(out["loss"].item())
            if idx != 1:
                return
            if self._tracker is None:
                torch.cuda.synchronize()
                self.peak_bytes = torch.cuda.max_memory_allocated()
            else:
                self._tracker.__exit__(None, None, None)
                self.peak_bytes = self._tracker.peak_bytes

    return PeakWatch()


def fit(args: argparse.Namespace, steps: int, root: str, *callbacks: Any) -> Any:
    import lightning.pytorch as pl

    pl.seed_everything(args.seed, verbose=False)
    module = make_module(args)
    watch = peak_watch()
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_steps=steps,
        precision=args.precision,
        default_root_dir=root,
        callbacks=[*callbacks, watch],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, counting_loader(args, steps))
    return watch


def main(argv: list[str] | None = None) -> int:
    from remat.integrations.lightning import RematCallback

    args = parse_args(argv)
    root = args.root or tempfile.mkdtemp(prefix="remat-lightning-")
    callback = RematCallback(budget=args.budget)
    planned = fit(args, args.steps, root, callback)
    summary, plan = callback.summary, callback.plan
    print(f"plan:           {plan.strategy}, recompute {', '.join(plan_units(plan)) or '-'}")
    print(f"precision:      {plan.precision}")
    print(f"plan file:      {summary['remat/plan_file']} (reused: {summary['remat/plan_reused']})")
    print(f"budget:         {format_bytes(plan.budget_bytes)} ({plan.budget_bytes:,} bytes)")
    predicted = plan.predicted_peak_bytes
    print(f"predicted peak: {format_bytes(predicted)} ({predicted:,} bytes)")
    peak = planned.peak_bytes
    print(f"measured peak:  {format_bytes(peak)} ({peak:,} bytes), a steady-state step")
    plain = fit(args, 2, root)  # the same run without the callback
    print(f"unplanned peak: {format_bytes(plain.peak_bytes)} ({plain.peak_bytes:,} bytes)")
    print(f"loss:           {planned.losses[0]:.4f} -> {planned.losses[-1]:.4f}")
    return 0


def plan_units(plan: remat.Plan) -> list[str]:
    return [fqn for fqn, action in plan.actions.items() if str(action) != "keep"]


if __name__ == "__main__":
    sys.exit(main())
