"""Portable save sets: device-independent op names (``remat.opnames``) and the refusal of save sets
that name ops that never ran.

Oracles: the family table against the aten ops this torch build has; which ops a policy keeps
(the region's kept op keys) and the gradients, bitwise, against the model without a plan.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import remat
from remat import Plan, apply_
from remat.apply.selective import (
    ATTENTION_OPS,
    CORE_ATTENTION_OPS,
    OpLog,
    lenient_save_sets,
    op_name,
    policy_for,
    save_name,
)
from remat.opnames import OP_FAMILIES, canonical_op, canonical_ops
from remat.plan import Action

aten = torch.ops.aten
SDPA_KERNELS = (
    "_scaled_dot_product_flash_attention_for_cpu",  # the CPU's
    "_scaled_dot_product_flash_attention",  # CUDA's three
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)

# ----------------------------------------------------------------------------------- the table


def test_cpu_and_cuda_kernels_of_one_op_share_a_name() -> None:
    assert {canonical_op(k) for k in SDPA_KERNELS} == {"attention"}
    assert {canonical_op(k) for k in ("_softmax", "_safe_softmax", "softmax")} == {"softmax"}
    assert canonical_op("native_batch_norm") == canonical_op("cudnn_batch_norm") == "batch_norm"
    assert canonical_op("native_layer_norm") == "layer_norm"
    assert canonical_op("native_dropout") == "dropout"
    for plain in ("mm", "addmm", "bmm", "gelu", "add", "div_", "convolution"):
        assert canonical_op(plain) == plain  # the same kernel on every device keeps its name
    assert canonical_ops(["_softmax", "mm", "_safe_softmax"]) == ("softmax", "mm")


def test_every_kernel_of_the_table_is_an_aten_op() -> None:
    for family, kernels in OP_FAMILIES.items():
        for kernel in kernels:
            assert hasattr(aten, kernel), (family, kernel)
    assert set(ATTENTION_OPS) == set(OP_FAMILIES["attention"])
    assert set(OP_FAMILIES["softmax"]) <= CORE_ATTENTION_OPS


def test_save_name_of_the_cpu_attention_kernel() -> None:
    cpu_kernel = aten._scaled_dot_product_flash_attention_for_cpu.default
    assert op_name(cpu_kernel) == "_scaled_dot_product_flash_attention_for_cpu"
    assert save_name(cpu_kernel) == save_name(aten._scaled_dot_product_flash_attention.default)
    assert save_name(cpu_kernel) == "attention"


def test_plan_labels_read_raw_kernels_as_families() -> None:
    old = Action.parse("selective:ops._safe_softmax.add.addmm.clone.div_.native_layer_norm")
    assert old.saved_ops == ("softmax", "add", "addmm", "clone", "div_", "layer_norm")
    assert str(old) == "selective:ops._safe_softmax.add.addmm.clone.div_.native_layer_norm"
    assert Action.parse("selective:ops.attention.layer_norm").saved_ops == (
        "attention",
        "layer_norm",
    )
    rule = policy_for("ops._scaled_dot_product_cudnn_attention")
    assert rule("_scaled_dot_product_flash_attention_for_cpu", False)
    assert rule("_scaled_dot_product_efficient_attention", True)
    assert not rule("_safe_softmax", False) and not rule("addmm", False)


# ------------------------------------------------------------------- plans across devices


class Attention(nn.Module):
    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm(x)).split(w, dim=-1)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.out(y.transpose(1, 2).reshape(b, t, w))


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(Attention(), Attention())


def _step(model: nn.Module, plan: Plan | None) -> tuple[list[torch.Tensor], list[dict[Any, int]]]:
    """Gradients of one step, and per unit the bytes of each op key the plan's regions kept."""
    torch.manual_seed(1)
    x = torch.randn(2, 8, 16, requires_grad=True)
    model.zero_grad(set_to_none=True)
    if plan is None:
        model(x).square().sum().backward()
        return [x.grad, *(p.grad for p in model.parameters())], []
    with apply_(model, plan):
        model(x).square().sum().backward()
        planned = [m for m in model if "forward" in m.__dict__]
        regions = [m.__dict__["forward"].__remat_region__ for m in planned]
        kept = [dict(r.last_kept_bytes) for r in regions]
    return [x.grad, *(p.grad for p in model.parameters())], kept


@pytest.mark.parametrize(
    "label",
    [
        "ops._scaled_dot_product_flash_attention",  # a CUDA kernel, on the CPU
        "ops._scaled_dot_product_cudnn_attention",
        "ops._scaled_dot_product_flash_attention_for_cpu",  # a plan made on the CPU
        "ops.attention",
    ],
)
def test_a_save_set_naming_any_attention_kernel_keeps_the_attention_output(label: str) -> None:
    model = _model()
    expected, _ = _step(model, None)
    plan = Plan(actions={"_default": f"selective:{label}"}, units=["0", "1"])
    grads, kept = _step(model, plan)
    for unit in kept:
        # The CPU kernel's output (out, logsumexp): what attention's backward reads, kept.
        assert [op_name(key[0]) for key in unit] == ["_scaled_dot_product_flash_attention_for_cpu"]
        (nbytes,) = unit.values()
        assert nbytes == 2 * 2 * 8 * 8 * 4 + 2 * 2 * 8 * 4  # out (2, 2, 8, 8), lse (2, 2, 8)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected, strict=True))


def test_old_raw_kernel_plans_keep_what_their_families_keep() -> None:
    model = _model()
    units = ["0", "1"]
    _, raw = _step(
        model, Plan(actions={"_default": "selective:ops.native_layer_norm.addmm"}, units=units)
    )
    _, family = _step(
        model, Plan(actions={"_default": "selective:ops.layer_norm.addmm"}, units=units)
    )
    assert [sorted(k[1] for k in u) for u in raw] == [sorted(k[1] for k in u) for u in family]
    assert [list(u.values()) for u in raw] == [list(u.values()) for u in family]
    assert {op_name(k[0]) for u in raw for k in u} == {"native_layer_norm", "addmm"}


# ------------------------------------------------------------------ ops that never ran


class _Names(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.add(save_name(func))
        return func(*args, **(kwargs or {}))


def _ran_in(module: nn.Module) -> set[str]:
    """The save names of the ops a forward of ``module`` runs."""
    with _Names() as mode:
        module(torch.randn(2, 8, 16, requires_grad=True))
    return mode.names


def test_a_save_set_naming_no_op_is_refused_at_the_first_forward() -> None:
    model = _model()
    plan = Plan(actions={"_default": "selective:ops.addmm.flash_attn_nonexistent"}, units=["0"])
    with apply_(model, plan):  # nothing has run yet: applying says nothing
        with pytest.raises(ValueError) as caught:
            model(torch.randn(2, 8, 16, requires_grad=True))
    message = str(caught.value)
    assert "selective unit '0': got op flash_attn_nonexistent" in message
    assert "ops.addmm.flash_attn_nonexistent" in message
    # The ops that ran, by family (attention, not the CPU kernel), closest first.
    close = message.split("closest: ")[1].split(")")[0].split(", ")
    assert len(close) == 8 and set(close) <= _ran_in(model[0]), close
    assert "attention" in close and "_scaled_dot_product" not in message
    assert "Fix:" in message and "layer_norm" in message


def test_the_refusal_names_the_unit() -> None:
    log = OpLog(policy_for("ops.flash_attn_nonexistent"), unit="blocks.3")
    x = torch.randn(4, 4, requires_grad=True)
    with log:
        (x @ x).relu()
    with pytest.raises(ValueError, match=r"selective unit 'blocks\.3': got op flash_attn_non"):
        log.finish()


def test_only_the_first_forward_is_checked() -> None:
    rule = policy_for("ops.bogus_op")
    with pytest.raises(ValueError, match="bogus_op"):
        rule.check_ran({"mm"}, "u")
    rule.check_ran({"mm"}, "u")  # checked once: later forwards cost nothing


def test_a_real_op_that_did_not_run_in_the_unit_is_refused_naming_it() -> None:
    """``div_`` is the CPU's dropout mask; under CUDA's fused dropout (or in a unit without
    dropout, as here) it never runs, so the plan does not mean what it says: refused."""
    model = _model()
    plan = Plan(actions={"_default": "selective:ops.addmm.div_"}, units=["0", "1"])
    with apply_(model, plan), pytest.raises(ValueError) as caught:
        model(torch.randn(2, 8, 16, requires_grad=True))
    message = str(caught.value)
    assert "selective unit '0': got op div_ in save set ops.addmm.div_" in message
    assert "did not run in the unit" in message and "no aten op" not in message
    assert "addmm" in message.split("closest: ")[1] and "Fix:" in message


def test_a_family_that_did_not_run_is_warned_about_and_the_rest_kept() -> None:
    """A family's kernels differ by device (CUDA's fused RMS norm is several ops on the CPU):
    one that did not run keeps nothing there, which is said, and the plan goes on."""
    model = _model()
    expected, _ = _step(model, None)
    plan = Plan(actions={"_default": "selective:ops.addmm.rms_norm.attention"}, units=["0", "1"])
    with pytest.warns(UserWarning, match="families rms_norm of save set .* did not run"):
        grads, kept = _step(model, plan)
    assert {op_name(k[0]) for u in kept for k in u} == {
        "addmm",
        "_scaled_dot_product_flash_attention_for_cpu",
    }
    assert all(torch.equal(a, b) for a, b in zip(grads, expected, strict=True))


def test_lenient_save_sets_let_real_ops_through_but_not_typos() -> None:
    model = _model()
    expected, _ = _step(model, None)
    with lenient_save_sets(), warnings.catch_warnings():
        warnings.simplefilter("error")
        grads, kept = _step(model, Plan(actions={"_default": "selective:ops.addmm.div_"}))
    assert {op_name(k[0]) for u in kept for k in u} == {"addmm"}
    assert all(torch.equal(a, b) for a, b in zip(grads, expected, strict=True))
    with lenient_save_sets(), pytest.raises(ValueError, match="flash_attn_nonexistent"):
        _step(model, Plan(actions={"_default": "selective:ops.addmm.flash_attn_nonexistent"}))


class _Mixed(nn.Module):
    """Unlike units: an attention block, then an MLP block with GELU and no attention."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.ModuleList([Attention(), Attention()])
        self.mlp = nn.ModuleList(
            [nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(2)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, mlp in zip(self.attn, self.mlp, strict=True):
            x = x + mlp(attn(x))
        return x


def test_profiled_save_sets_name_per_unit_only_the_ops_that_ran_there() -> None:
    """One save set is measured on every unit; each unit's option names only its own ops, so
    the solver's plan applies under the strict check, with the same gradients."""
    model = _Mixed()
    x = torch.randn(2, 8, 16)
    label = "selective:ops.addmm.gelu.attention"
    profile = remat.profile(model, x, options=[label], repeats=0)
    actions = {u.fqn: [o.action for o in u.options] for u in profile.units}
    assert actions["attn.0"] == actions["attn.1"] == ["selective:ops.addmm.attention"]
    assert actions["mlp.0"] == actions["mlp.1"] == ["selective:ops.addmm.gelu"]
    plan = Plan(
        actions={u.fqn: u.options[0].action for u in profile.units},
        units=[u.fqn for u in profile.units],
    )
    torch.manual_seed(1)
    x = torch.randn(2, 8, 16, requires_grad=True)
    model(x).square().sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with apply_(model, plan), warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x).square().sum().backward()
    assert all(torch.equal(p.grad, e) for p, e in zip(model.parameters(), expected, strict=True))


def test_a_save_set_of_families_of_which_nothing_ran_is_warned_about() -> None:
    """Only families, none run here (a CUDA plan's fused norms): the unit keeps nothing."""
    model = _model()
    expected, _ = _step(model, None)
    plan = Plan(actions={"0": "selective:ops.rms_norm.batch_norm"}, units=["0"])
    with pytest.warns(UserWarning, match="nothing in save set ops.rms_norm.batch_norm ran there"):
        grads, kept = _step(model, plan)
    assert kept == [{}]
    assert all(torch.equal(a, b) for a, b in zip(grads, expected, strict=True))
