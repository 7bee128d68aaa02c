"""Lightning's Trainer with remat's RematCallback (issue 16's must-show): a few steps of a tiny
LightningModule around the built-in GPT on the CPU. The plan is on while training (units carry
remat's forward), the losses and the trained weights equal the same run without the callback
bitwise, and a steady-state step's peak (remat's tracker around the step, from a callback) is
below the run without. The plan is saved and a second fit reuses it; what cannot be planned is
refused by name."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from memory_oracle import StorageOracle
from remat.models import build_builtin

pl = pytest.importorskip("lightning.pytorch")
from remat.integrations.lightning import RematCallback, _check_trainer  # noqa: E402

SIZES = {"n_layer": 4, "d_model": 32, "n_head": 4, "seq": 32, "batch": 4, "vocab": 64}
STEPS = 3
MEASURED = 2  # the third step: the optimizer's state made by the first is alive through it


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a shared, loaded CPU two of them
    spin against each other (this file took 100 s instead of 15 under a load of 6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyGPT(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = build_builtin("gpt", dropout=0.0, **SIZES).model

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def loader() -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(1)
    n, seq = STEPS * SIZES["batch"], SIZES["seq"]
    tokens = torch.randint(SIZES["vocab"], (n, seq + 1), generator=generator)
    data = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
    return torch.utils.data.DataLoader(data, batch_size=SIZES["batch"])


class Watch(pl.Callback):
    """Each step's loss; one steady-state step's peak under the independent oracle
    (tests/memory_oracle.py, not remat's tracker); the modules that
    carry remat's forward while training."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.peak_bytes = 0
        self.recomputed: list[str] = []
        self._tracker: Any = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        if idx == MEASURED:
            self._tracker = StorageOracle([pl_module, trainer.optimizers[0], *batch])
            self._tracker.__enter__()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.losses.append(outputs["loss"].detach().clone())
        if idx == MEASURED:
            self._tracker.__exit__(None, None, None)
            self.peak_bytes = self._tracker.peak_bytes
            self.recomputed = [
                name
                for name, module in pl_module.named_modules()
                if hasattr(module.__dict__.get("forward"), "__remat_region__")
            ]


@dataclass
class Fit:
    module: TinyGPT
    watch: Watch
    remat: Any = None
    trainer: Any = None
    weights: dict[str, torch.Tensor] = field(default_factory=dict)


def fit(root: Path, *callbacks: Any, module: TinyGPT | None = None) -> Fit:
    pl.seed_everything(0, verbose=False)
    module = module or TinyGPT()
    watch = Watch()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=str(root),
        callbacks=[*callbacks, watch],
    )
    trainer.fit(module, loader())
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return Fit(module, watch, callbacks[0] if callbacks else None, trainer, weights)


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Fit, Fit, Fit]:
    root = tmp_path_factory.mktemp("lightning")
    planned = fit(root, RematCallback(budget="min", actions=["keep", "recompute"]))
    plain = fit(root)
    again = fit(root, RematCallback(budget="min", actions=["keep", "recompute"]))
    return planned, plain, again


def test_the_plan_is_on_while_training(fits: tuple[Fit, Fit, Fit]) -> None:
    planned, plain, _ = fits
    assert planned.watch.recomputed, "nothing recomputed: the test would prove nothing"
    assert set(planned.watch.recomputed) == {
        fqn for fqn, action in planned.remat.plan.actions.items() if str(action) != "keep"
    }
    assert all(name.startswith("model.blocks.") for name in planned.watch.recomputed)
    assert plain.watch.recomputed == []
    # taken off at the fit's end
    assert not any("forward" in m.__dict__ for m in planned.module.modules())


def test_losses_and_weights_bitwise_as_without_the_callback(fits: tuple[Fit, Fit, Fit]) -> None:
    planned, plain, _ = fits
    assert len(planned.watch.losses) == len(plain.watch.losses) == STEPS
    for a, b in zip(planned.watch.losses, plain.watch.losses, strict=True):
        assert torch.equal(a, b)
    assert planned.weights.keys() == plain.weights.keys()
    for name, value in planned.weights.items():
        assert torch.equal(value, plain.weights[name]), name


def test_steady_state_peak_below_the_run_without(fits: tuple[Fit, Fit, Fit]) -> None:
    planned, plain, _ = fits
    assert 0 < planned.watch.peak_bytes < plain.watch.peak_bytes
    # within the plan's budget, by the oracle (an independent count), outside remat
    assert planned.watch.peak_bytes <= planned.remat.plan.budget_bytes


def test_logged_saved_and_reused(fits: tuple[Fit, Fit, Fit]) -> None:
    planned, _, again = fits
    metrics = planned.trainer.callback_metrics
    checkpointed = len(planned.watch.recomputed)
    assert metrics["remat/checkpointed_units"].item() == checkpointed
    assert metrics["remat/plan_reused"].item() == 0
    assert Path(planned.remat.summary["remat/plan_file"]).is_file()
    assert again.remat.summary["remat/plan_reused"] is True
    assert again.watch.recomputed == planned.watch.recomputed
    for a, b in zip(again.watch.losses, planned.watch.losses, strict=True):
        assert torch.equal(a, b)


class ManualGPT(TinyGPT):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class SelfCheckpointing(TinyGPT):
    def __init__(self) -> None:
        super().__init__()
        self.model.gradient_checkpointing = True  # as Hugging Face's gradient_checkpointing_enable


def test_manual_optimization_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"automatic_optimization = False.*Fix:"):
        fit(tmp_path, RematCallback(budget="min"), module=ManualGPT())


def test_a_module_that_checkpoints_itself_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="checkpoints itself"):
        fit(tmp_path, RematCallback(budget="min"), module=SelfCheckpointing())


def test_sharding_strategies_refused() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy(), optimizers=[])
    with pytest.raises(ValueError, match=r"got the FSDPStrategy.*Fix:"):
        _check_trainer(trainer, TinyGPT())


def test_missing_lightning_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from remat.integrations.lightning import _lightning

    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    with pytest.raises(ImportError, match=r"pip install 'remat\[lightning\]'"):
        _lightning()


def doc_blocks(section: str) -> list[str]:
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "lightning.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.DOTALL)


def test_docs_lightning_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/lightning.md's Lightning example, as written: the plan saved in the working
    directory (the Trainer's default root), units checkpointed."""
    (block,) = doc_blocks("Lightning")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "docs_lightning"}
    exec(compile(block, "docs/lightning.md", "exec"), namespace)
    summary = namespace["callback"].summary
    assert summary["remat/checkpointed_units"] > 0
    assert Path(summary["remat/plan_file"]).resolve() == (tmp_path / "remat_plan.json").resolve()


@pytest.mark.slow
def test_ddp_two_ranks_bitwise_as_without(tmp_path: Path) -> None:
    """Lightning's DDP strategy on the CPU, two ranks (one launch, ~20 s, mostly start-up): rank 0
    plans one rank's step and both ranks train with the plan, each with the losses and weights of
    the same fit without the callback."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), env.get("PYTHONPATH", "")])
    script = root / "tests" / "integration" / "dist_scripts" / "lightning_ddp.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    units = set()
    for rank in (0, 1):
        planned = json.loads((tmp_path / f"rank{rank}-remat.json").read_text())
        plain = json.loads((tmp_path / f"rank{rank}-plain.json").read_text())
        assert planned["world_size"] == 2
        assert planned["recomputed"] and plain["recomputed"] == []
        units.add(tuple(planned["recomputed"]))
        assert len(planned["losses"]) == STEPS
        assert planned["losses"] == plain["losses"]  # floats from float32: equal is bitwise
        weights = torch.load(tmp_path / f"rank{rank}-remat.pt")
        oracle = torch.load(tmp_path / f"rank{rank}-plain.pt")
        for name, value in weights.items():
            assert torch.equal(value, oracle[name]), (rank, name)
    assert len(units) == 1  # one plan on both ranks
