"""Any optimizer (issue 15, item 3): an instance or a factory ``params -> Optimizer`` besides the
shortcuts; its state bytes come from its own step, and planning never changes the user's optimizer
or model.

Oracle: the same optimizer built by hand on a copy of the model, one plain step, its ``state``
tensors summed by hand; the tracked peak of a plain loop with that state alive.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import remat
from memory_oracle import oracle_step_peak
from remat.models.gpt import GPT
from remat.profiling.tracker import track_memory


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(vocab=64, max_seq=16, n_layer=2, d_model=32, n_head=4)


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def _loss(output: torch.Tensor) -> torch.Tensor:
    return output.float().mean()


BUILDERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.1),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True),
    "SGD": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=0.01),
    "Adafactor": lambda p: torch.optim.Adafactor(p, lr=1e-2),
}


def _by_hand(model: GPT, ids: torch.Tensor, build: Callable[..., torch.optim.Optimizer]) -> tuple:
    """On a copy: one plain step makes the state; its bytes summed by hand (tensors of at least one
    dimension: the 0-dim step counters are left out, as remat documents); then the tracked peak of
    a second plain step with that state alive."""
    model = copy.deepcopy(model)
    opt = build([p for p in model.parameters() if p.requires_grad])
    _loss(model(ids)).backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    state_bytes = 0
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                state_bytes += value.numel() * value.element_size()
    with track_memory(model, ids, opt) as tracker:
        output = model(ids)
        _loss(output).backward()
        opt.step()
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers(), ids])
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return held + grads + state_bytes, tracker.peak_bytes, state_bytes


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("form", ["instance", "factory"])
def test_any_optimizer_is_profiled_from_its_own_step(name: str, form: str) -> None:
    model, ids = _model(), _ids()
    build = BUILDERS[name]
    mine = build(model.parameters())
    _loss(model(ids)).backward()
    mine.step()  # the user's optimizer has state of its own already
    model.zero_grad(set_to_none=True)
    state_before = copy.deepcopy(mine.state_dict())
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = mine if form == "instance" else build
    prof = remat.profile(model, (ids,), loss_fn=_loss, optimizer=spec, options=(), repeats=0)
    static_bytes, peak_bytes, state_bytes = _by_hand(model, ids, build)
    assert state_bytes > 0  # every optimizer here keeps state
    assert prof.optimizer == name
    assert prof.static_bytes == static_bytes
    assert prof.peak_bytes == peak_bytes
    # Nothing the user owns changed, bitwise.
    after = mine.state_dict()
    assert after["param_groups"] == state_before["param_groups"]
    for key, state in state_before["state"].items():
        for field, value in state.items():
            got = after["state"][key][field]
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights_before[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_auto_plans_with_an_optimizer_instance() -> None:
    model, ids = _model(), _ids()
    mine = torch.optim.Adam(model.parameters(), lr=1e-3)
    handle = remat.auto_(
        model, (ids,), budget="50%", loss_fn=_loss, optimizer=mine, actions=["keep", "recompute"]
    )
    assert handle.result.iterations == 1  # the first plan fit when measured
    # the plan as applied, measured outside remat with a copy of the same optimizer
    assert oracle_step_peak(model, (ids,), loss_fn=_loss, optimizer=mine) <= (
        handle.result.budget_bytes
    )
    handle.remove()
    assert not mine.state  # planning ran its own copy


def test_a_factory_must_return_an_optimizer() -> None:
    with pytest.raises(ValueError, match="the factory returned list"):
        remat.profile(_model(), (_ids(),), optimizer=lambda p: list(p), options=(), repeats=0)
    with pytest.raises(ValueError, match="optimizer: got 'adam'"):
        remat.profile(_model(), (_ids(),), optimizer="adam", options=(), repeats=0)


def test_per_rank_shards_any_optimizers_measured_state() -> None:
    """``per_rank`` read AdamW's two states from a table by name and refused other optimizers;
    it now shards the state the optimizer's own step made: an Adam instance, with AdamW's two
    moments, gives AdamW's per-rank figures."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(4)])
    x = (torch.randn(4, 16),)
    ranked = {
        name: remat.profile(
            model, x, optimizer=spec, options=(), repeats=0, world_size=4, fsdp=True
        )
        for name, spec in [("adamw", "adamw"), ("Adam", torch.optim.Adam(model.parameters()))]
    }
    assert ranked["Adam"].optimizer == "Adam"
    assert ranked["Adam"].static_bytes == ranked["adamw"].static_bytes
    assert ranked["Adam"].base_bytes == ranked["adamw"].base_bytes
    one = remat.profile(model, x, optimizer="adamw", options=(), repeats=0)
    assert ranked["Adam"].static_bytes < one.static_bytes / 2  # parameters and states sharded
