"""Lightning DDP on the CPU, two ranks: the same fit with remat's RematCallback and without.

Run by tests/integration/test_lightning.py as ``python lightning_ddp.py OUT``; Lightning starts
the second rank by running this script again. Each rank writes, per fit, its losses, the modules
that carried remat's forward while training and its trained weights to ``OUT``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from remat.integrations.lightning import RematCallback
from remat.models import build_builtin


class TinyGPT(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        sizes = {"n_layer": 4, "d_model": 32, "n_head": 4, "seq": 32, "batch": 4, "vocab": 64}
        self.model = build_builtin("gpt", dropout=0.0, **sizes).model

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class Record(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.recomputed: list[str] = []

    def on_train_batch_end(self, trainer: Any, module: Any, out: Any, batch: Any, idx: int) -> None:
        self.losses.append(out["loss"].item())
        self.recomputed = sorted(
            name
            for name, m in module.named_modules()
            if hasattr(m.__dict__.get("forward"), "__remat_region__")
        )


def fit(out: Path, with_remat: bool) -> None:
    pl.seed_everything(0, verbose=False)
    tokens = torch.randint(64, (32, 33), generator=torch.Generator().manual_seed(1))
    data = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    record = Record()
    remat_callback = RematCallback(budget="min", actions=["keep", "recompute"], output_dir=out)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=3,
        callbacks=[remat_callback, record] if with_remat else [record],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = TinyGPT()
    trainer.fit(module, loader)
    name = f"rank{trainer.global_rank}-{'remat' if with_remat else 'plain'}"
    torch.save(module.state_dict(), out / f"{name}.pt")
    result = {"losses": record.losses, "recomputed": record.recomputed}
    if with_remat:
        result["world_size"] = remat_callback.plan.metadata["trainer"]["world_size"]
    (out / f"{name}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    fit(out, with_remat=True)
    fit(out, with_remat=False)
