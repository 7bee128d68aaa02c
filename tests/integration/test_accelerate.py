"""remat before accelerate's ``prepare``: a plan made on the bare model, then
``accelerator.prepare(model, optimizer, loader)``, trains with the losses and gradients of the same
run without remat, bitwise, and a steady-state step's peak below it; a model already prepared is
refused by name; the Accelerator's precision and accumulation reach the plan."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

import remat
from remat.integrations.accelerate import accelerator_settings, plan_before_prepare
from remat.models import build_builtin

accelerate = pytest.importorskip("accelerate")

SIZES = {"n_layer": 4, "d_model": 32, "n_head": 4, "seq": 32, "batch": 4, "vocab": 64}
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a shared, loaded CPU two of them
    spin against each other (this file took 100 s instead of 15 under a load of 6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_builtin("gpt", dropout=0.0, **SIZES).model


def make_loader() -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(
        SIZES["vocab"], (STEPS * SIZES["batch"], SIZES["seq"] + 1), generator=generator
    )
    data = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
    return torch.utils.data.DataLoader(data, batch_size=SIZES["batch"], shuffle=False)


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


@dataclass
class Run:
    losses: list[torch.Tensor]
    grads: list[dict[str, torch.Tensor]]
    steady_peak_bytes: int
    checkpointed: list[str]
    precision: str | None = None
    warnings: list[str] = field(default_factory=list)


def train(accelerator: object, *, plan: bool) -> Run:
    """STEPS steps through accelerate; the last one's peak under remat's tracker."""
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = make_loader()
    checkpointed: list[str] = []
    precision = None
    if plan:
        x, y = next(iter(loader))
        handle = plan_before_prepare(
            model,
            (x,),
            accelerator,
            budget="min",
            optimizer=optimizer,
            loss_fn=lambda logits: loss_of(logits, y),
            actions=["keep", "recompute"],  # whole units: a faster profile
        )
        checkpointed, precision = handle.checkpointed, handle.plan.precision
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses, grads, peak = [], [], 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, (x, y) in enumerate(loader):
            with remat.track_memory(model, optimizer, x, y) as tracker:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_of(model(x), y)
                accelerator.backward(loss)
                grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
                optimizer.step()
            losses.append(loss.detach())
            if step == STEPS - 1:  # the optimizer's state alive since the first step
                peak = tracker.peak_bytes
    said = [str(w.message) for w in caught if "remat" in str(w.message)]
    return Run(losses, grads, peak, checkpointed, precision, said)


def fresh_state() -> None:
    """accelerate keeps one process-wide state (its precision among it): start each test anew."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    fresh_state()
    yield
    fresh_state()


@pytest.fixture(scope="module", params=["no", "bf16"])
def runs(request: pytest.FixtureRequest) -> tuple[Run, Run]:
    """With and without remat, in full precision and under accelerate's bf16 autocast (which
    accelerate enters inside model.forward, around the plan's units)."""
    fresh_state()
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision=request.param)
    return train(accelerator, plan=True), train(accelerator, plan=False)


def test_plan_then_prepare_trains_bitwise_as_without_remat(runs: tuple[Run, Run]) -> None:
    planned, plain = runs
    assert planned.checkpointed, "the plan checkpoints nothing: the test would prove nothing"
    assert planned.precision in ("32", "bf16-mixed")
    assert planned.warnings == []  # the plan's precision is the one the step runs
    assert len(planned.losses) == len(plain.losses) == STEPS
    for a, b in zip(planned.losses, plain.losses, strict=True):
        assert torch.equal(a, b)
    for step_a, step_b in zip(planned.grads, plain.grads, strict=True):
        assert step_a.keys() == step_b.keys()
        for name in step_a:
            assert torch.equal(step_a[name], step_b[name]), name


def test_steady_state_peak_below_the_run_without(runs: tuple[Run, Run]) -> None:
    planned, plain = runs
    assert 0 < planned.steady_peak_bytes < plain.steady_peak_bytes


def test_a_prepared_model_is_refused() -> None:
    accelerator = accelerate.Accelerator(cpu=True)
    model = accelerator.prepare(make_model())
    x = torch.zeros(2, SIZES["seq"], dtype=torch.long)
    with pytest.raises(ValueError, match=r"before accelerator\.prepare.*Fix: plan the model first"):
        plan_before_prepare(model, (x,), accelerator, budget="min")


def test_settings_from_the_accelerator() -> None:
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=3)
    assert accelerator_settings(accelerator) == {
        "precision": "32",
        "accumulation_steps": 3,
        "world_size": 1,
        "fsdp": False,
    }
    fresh_state()
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    assert accelerator_settings(accelerator)["precision"] == "bf16-mixed"
    with pytest.raises(ValueError, match="mixed_precision: got 'fp8'"):
        accelerator_settings(type("A", (), {"mixed_precision": "fp8"})())


def test_docs_accelerate_block_runs() -> None:
    """docs/lightning.md's accelerate example, as written: trains, with units checkpointed."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "lightning.md").read_text()
    body = text.split("\n## accelerate\n", 1)[1]
    (block,) = re.findall(r"```python\n(.*?)```", body, re.DOTALL)
    namespace: dict[str, object] = {"__name__": "docs_accelerate"}
    exec(compile(block, "docs/lightning.md", "exec"), namespace)
    assert namespace["handle"].checkpointed  # type: ignore[attr-defined]
