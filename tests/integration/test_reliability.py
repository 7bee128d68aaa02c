"""Reliability: remat never silently changes training, and says clearly when it cannot help.

Each test is one row of docs/reliability.md.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import remat
from remat.apply.apply import Handle
from remat.cli.main import main
from remat.models import build_builtin

verify_module = importlib.import_module("remat.verify")  # remat.verify is also the function


class Block(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.BatchNorm1d(width)
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(torch.tanh(self.norm(self.fc(x))))


class NoisyBlock(Block):
    """Draws from its own generator, which no checkpointing implementation can replay."""

    def __init__(self, width: int = 16) -> None:
        super().__init__(width)
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(x.shape, generator=self.generator)
        return super().forward(x) * noise


def chain(block: type[Block] = Block, depth: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[block() for _ in range(depth)])


INPUTS = (torch.randn(8, 16),)


@pytest.mark.parametrize("name", ["gpt", "mlp", "cnn", "unet", "moe"])
@pytest.mark.parametrize("strategy", ["full", "sqrt_n"])
def test_verify_passes_on_every_builtin(name: str, strategy: str) -> None:
    small = {"gpt": {"n_layer": 3, "d_model": 32, "n_head": 2, "seq": 16, "batch": 2, "vocab": 64}}
    torch.manual_seed(0)
    built = build_builtin(name, **small.get(name, {}))
    plan = remat.baseline_plan(strategy, remat.find_units(built.model))
    report = remat.verify(built.model, plan, built.example_inputs, loss_fn=built.loss_fn)
    assert report.ok, report
    assert report.measured_saved_bytes > 0 and report.applied and report.not_applied == []
    # every recomputed unit kept no more than its action allows, and less than without the plan
    checked = [u for u in report.units if u.action != "keep"]
    assert checked and all(u.planned_kept_bytes < u.unplanned_kept_bytes for u in checked)
    assert all("forward" not in m.__dict__ for m in built.model.modules())  # no plan left behind


def test_verify_names_the_first_module_that_differs() -> None:
    # A private generator is not part of the RNG state checkpointing replays: recompute differs.
    model = chain(NoisyBlock, depth=3)
    report = remat.verify(model, remat.Plan(actions={"1": "recompute"}), INPUTS)
    assert not report.grads_equal and not report.ok
    # outputs in forward are identical; the replay in backward drew other noise
    assert report.outputs_equal
    assert report.first_mismatch is not None and report.first_mismatch.startswith("gradient of ")
    assert report.differing_grads[0].startswith(("0.", "1."))


def test_verify_fails_a_plan_that_did_not_take_effect(monkeypatch: pytest.MonkeyPatch) -> None:
    def install_nothing(model: nn.Module, plan: remat.Plan, **_: object) -> Handle:
        handle = Handle(model=model, plan=plan, units=["1"], actions={"1": "recompute"})
        return handle  # claims a checkpointed unit, installs no hook: "memory did not go down"

    monkeypatch.setattr(verify_module, "apply_", install_nothing)
    report = remat.verify(chain(), remat.Plan(actions={"1": "recompute"}), INPUTS)
    assert report.grads_equal and report.buffers_equal
    assert report.predicted_saved_bytes > 0 and report.measured_saved_bytes == 0
    assert not report.applied and not report.ok
    [unit] = report.units
    assert unit.planned_kept_bytes == unit.unplanned_kept_bytes > unit.allowed_bytes == 0
    assert report.not_applied == [unit.describe()] and unit.describe().startswith("1: kept ")


class JitterBlock(nn.Module):
    """Scales by 1 + 1e-6 x noise from its own generator: a recomputed forward differs from the
    first by about 1e-6 relative, so gradients differ in the last bits, not bitwise."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        return torch.tanh(x * (1 + 1e-6 * torch.rand(x.shape, generator=self.generator)))


def test_verify_with_tolerances() -> None:
    # Gradients ~1e-6 apart: not bitwise (the default), within rtol 1e-4 / atol 1e-6, not within
    # 1e-9. A verify that ignored rtol/atol would fail the second; one that always passed with
    # tolerances given, the third.
    plan = remat.Plan(actions={"_default": "recompute"})
    jitter = chain(JitterBlock, depth=3)
    assert not remat.verify(jitter, plan, INPUTS).ok
    assert remat.verify(jitter, plan, INPUTS, rtol=1e-4, atol=1e-6).ok
    assert not remat.verify(jitter, plan, INPUTS, rtol=1e-9, atol=0.0).ok
    # and a plan that is bitwise stays ok under tolerances
    assert remat.verify(chain(), plan, INPUTS, rtol=1e-6, atol=1e-7).ok


FACTORY = """
import torch
from torch import nn
class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.generator = torch.Generator().manual_seed(0)
    def forward(self, x):
        return self.fc(x) * torch.rand(x.shape, generator=self.generator)
def build(batch=4):
    torch.manual_seed(0)
    return nn.Sequential(Noisy(), Noisy(), Noisy()), (torch.randn(batch, 8),)
"""


def test_cli_verify_exits_nonzero_when_gradients_differ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "noisy_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    plan = tmp_path / "plan.json"
    remat.Plan(actions={"_default": "recompute"}).save(plan)
    code = main(["verify", "noisy_models:build", "--plan", str(plan), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 1
    assert data["grads_equal"] is False and data["first_mismatch"].startswith("gradient of")
    assert {"grads_equal", "buffers_equal", "applied", "first_mismatch"} <= set(data)


def test_batchnorm_statistics_after_several_steps_equal_unplanned() -> None:
    plain, planned = chain(), chain()
    handle = remat.apply_(planned, remat.Plan(actions={"_default": "segment:all"}))
    for step in range(5):
        for model in (plain, planned):
            torch.manual_seed(step)
            model(INPUTS[0]).square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_buffers(), planned.named_buffers(), strict=True):
        assert torch.equal(a, b), name
    assert int(planned[0].norm.num_batches_tracked) == 5
    handle.remove()


def test_forward_hooks_that_run_again_are_reported_by_name() -> None:
    model = chain()
    model[2].fc.register_forward_hook(lambda *_: None)
    model[3].register_forward_hook(lambda *_: None)  # on the unit itself: runs once, not reported
    with pytest.warns(UserWarning, match=r"hooks on 2\.fc will run again when 2 is recomputed"):
        handle = remat.apply_(model, remat.Plan(actions={"_default": "recompute"}))
    assert len(handle.notes) == 1 and "3" not in handle.notes[0].split("when")[1].split()[0]
    handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        remat.apply_(model, remat.Plan(actions={"0": "recompute"})).remove()  # no hooked module


def test_double_checkpointing_is_refused_with_what_to_turn_off() -> None:
    model = chain()
    model[1].gradient_checkpointing = True  # what Hugging Face's gradient_checkpointing_enable sets
    with pytest.raises(ValueError, match="gradient_checkpointing_disable"):
        remat.apply_(model, remat.Plan(actions={"_default": "recompute"}))

    class CheckpointWrapper(nn.Module):  # the name torch's checkpoint_wrapper gives its wrapper
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    model = chain()
    model[2].fc = CheckpointWrapper(model[2].fc)
    with pytest.raises(ValueError, match=r"2\.fc is wrapped by torch's checkpoint_wrapper"):
        remat.apply_(model, remat.Plan(actions={"_default": "recompute"}))
    remat.apply_(model, remat.Plan(actions={"0": "recompute"})).remove()  # elsewhere: fine


def test_data_dependent_routing_is_detected_when_planning_and_recompute_stays_equal() -> None:
    torch.manual_seed(0)
    built = build_builtin("moe")
    prof = remat.profile(built.model, built.example_inputs, loss_fn=built.loss_fn, repeats=0)
    assert any("blocks.0 runs data-dependent ops (nonzero)" in note for note in prof.notes)
    plan = remat.baseline_plan("full", prof.unit_fqns)
    assert remat.verify(built.model, plan, built.example_inputs, loss_fn=built.loss_fn).ok


def test_replay_that_saves_other_shapes_names_the_unit() -> None:
    class Drifting(nn.Module):
        """Routes by a counter that changes between forward and replay."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            keep = x[: 8 - self.calls % 2]  # a different number of rows on the replay
            return self.fc(keep).sum(0, keepdim=True).expand_as(x) + x

    torch.manual_seed(0)
    model = nn.Sequential(Drifting(), Drifting())
    handle = remat.apply_(model, remat.Plan(actions={"_default": "recompute"}))
    out = model(torch.randn(8, 16, requires_grad=True)).sum()
    with pytest.raises(remat.apply.checkpoint.CheckpointMismatchError, match="replaying 1"):
        out.backward()
    handle.remove()


def test_in_place_change_of_a_saved_tensor_names_the_unit() -> None:
    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))  # relu saves its output...
            y = self.b(x)
            h.mul_(2)  # ...which the parent then changes in place
            return (h + y).sum()

    class Unit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(x))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.u1, self.u2 = Unit(), Unit()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.u1(x)
            out = self.u2(x)
            h.mul_(2)  # relu inside u1 saved h
            return (h + out).sum(), h  # h stays referenced (see docs/reliability.md, Limits)

    x = torch.randn(4, 16)
    plain = Model()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        plain(x)[0].backward()  # autograd alone refuses
    model = Model()
    handle = remat.apply_(model, remat.Plan(actions={"_default": "recompute"}))
    loss, _h = model(x)
    with pytest.raises(RuntimeError, match="u1 saved for backward was modified in place"):
        loss.backward()
    handle.remove()
    del Parent


def test_autocast_inside_a_unit_is_bitwise_equal() -> None:
    class MixedBlock(Block):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = self.fc(x)
            return x + torch.tanh(self.norm(h.float()))

    report = remat.verify(chain(MixedBlock), remat.Plan(actions={"_default": "segment:s"}), INPUTS)
    assert report.ok, report


def test_cli_verify_exits_nonzero_when_the_plan_did_not_take_effect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        verify_module,
        "apply_",
        lambda model, plan, **_: Handle(
            model=model, plan=plan, units=["blocks.0"], actions={"blocks.0": "recompute"}
        ),
    )
    plan = tmp_path / "plan.json"
    remat.Plan(actions={"_default": "recompute"}).save(plan)
    args = [
        "--set",
        "n_layer=2",
        "d_model=32",
        "n_head=2",
        "vocab=64",
        "--seq",
        "16",
        "--batch",
        "2",
    ]
    code = main(["verify", "gpt", *args, "--plan", str(plan), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 1 and data["applied"] is False and data["grads_equal"] is True
    assert data["not_applied"][0].startswith("blocks.0: kept ")


def test_in_place_change_of_a_dropped_saved_output_gives_the_out_of_place_gradients() -> None:
    # Once the parent drops its last reference, nothing can read the tensor's version; replay then
    # reproduces the value autograd saved, so gradients are those of the out-of-place program
    # (where plain autograd would refuse). See docs/reliability.md.
    class Unit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.fc(x))  # sigmoid's backward reads its saved output

    class Model(nn.Module):
        def __init__(self, in_place: bool) -> None:
            super().__init__()
            self.u1, self.u2 = Unit(), Unit()
            self.in_place = in_place

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.u1(x)
            out = self.u2(x)
            h = h.mul_(3) if self.in_place else h * 3
            return (h * out).sum()

    torch.manual_seed(0)
    reference = Model(in_place=False)
    planned = Model(in_place=True)
    planned.load_state_dict(reference.state_dict())
    x = torch.randn(4, 16)
    reference(x).backward()
    with remat.apply_(planned, remat.Plan(actions={"_default": "recompute"})):
        planned(x).backward()
    for a, b in zip(reference.parameters(), planned.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


def test_parameter_changed_between_forward_and_backward_names_the_unit() -> None:
    model = chain()
    handle = remat.apply_(model, remat.Plan(actions={"_default": "recompute"}))
    loss = model(INPUTS[0]).square().mean()
    with torch.no_grad():
        model[2].fc.weight.add_(1.0)  # an optimizer step before backward
    with pytest.raises(RuntimeError, match="a parameter of 2 was modified in place"):
        loss.backward()
    handle.remove()
