"""Unit tests of the selective-recompute and offload engine (``remat.apply.selective``).

Tiny tensors and modules, each with an oracle: what a policy keeps, what a replay skips, what an
offloaded unit gives back, and the errors. The model-level tests are in
tests/integration/test_selective.py.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import remat.apply.selective as selective
from helpers import StorageIds
from remat import Plan, apply_
from remat.apply.checkpoint import Region
from remat.apply.selective import (
    ATTENTION_OPS,
    CORE_ATTENTION_OPS,
    MATMUL_OPS,
    CheckpointMismatchError,
    Offloader,
    OpLog,
    ReplayCache,
    eager_policy,
    op_name,
    policy_for,
)
from remat.plan import Action
from remat.profiling.tracker import track_memory

aten = torch.ops.aten

# ------------------------------------------------------------------------- policies, actions


def test_save_matmuls_keeps_matmuls_and_attention_only() -> None:
    rule = policy_for("save_matmuls")
    for op in MATMUL_OPS | ATTENTION_OPS:
        assert rule(op, False) and rule(op, True), op
    for op in ("gelu", "_softmax", "_safe_softmax", "native_layer_norm", "add", "mul", "relu"):
        assert not rule(op, False) and not rule(op, True), op
    assert eager_policy("save_matmuls")


def test_megatron_recomputes_the_attention_core_only() -> None:
    rule = policy_for("megatron")
    for op in CORE_ATTENTION_OPS:  # softmax and fused attention: never kept
        assert not rule(op, False) and not rule(op, True), op
    for op in ("add", "gelu", "native_layer_norm", "mul", "addmm", "bmm", "convolution"):
        assert rule(op, False), op  # everything outside the core is kept
    for op in ("mul", "div_", "where", "clone", "_unsafe_view"):
        assert not rule(op, True), op  # fed by the core (masking, dropout): part of it
    for op in ("bmm", "mm", "matmul"):
        assert rule(op, True), op  # the product with V ends the core
    assert not eager_policy("megatron")


def test_ops_policy_keeps_exactly_the_named_ops() -> None:
    rule = policy_for("ops.gelu.addmm")
    assert rule("gelu", False) and rule("addmm", True)
    assert not rule("mm", False) and not rule("gel", False) and not rule("add", False)
    nothing = policy_for("ops")
    assert not any(nothing(op, False) for op in ("mm", "gelu", "add"))
    assert not eager_policy("ops.mm")


@pytest.mark.parametrize("label", ["bogus", "", "save_matmul", "Megatron"])
def test_unknown_policy_is_a_value_error(label: str) -> None:
    with pytest.raises(ValueError, match="save_matmuls, megatron or ops"):
        policy_for(label)


@pytest.mark.parametrize(
    "text", ["selective:bogus", "selective", "selective:", "selective:ops.mm+addmm", "offload:x"]
)
def test_bad_selective_and_offload_actions(text: str) -> None:
    with pytest.raises(ValueError):
        Action.parse(text)
    with pytest.raises(ValueError):
        Plan(actions={"_default": text})


def test_selective_action_parts() -> None:
    action = Action.parse("selective:ops.addmm.gelu")
    assert (action.kind, action.label, action.saved_ops) == (
        "selective",
        "ops.addmm.gelu",
        ("addmm", "gelu"),
    )
    assert Action.parse("selective:megatron").saved_ops is None
    assert Action.parse("offload").checkpoints and str(Action.parse("offload")) == "offload"


def test_selective_and_offload_regions_hold_one_unit() -> None:
    units = [("a", nn.Linear(2, 2)), ("b", nn.Linear(2, 2))]
    with pytest.raises(ValueError, match="exactly one unit"):
        Region("r", units, policy="megatron")
    with pytest.raises(ValueError, match="exactly one unit"):
        Region("r", units, offload=True)
    with pytest.raises(ValueError, match="selective policy"):
        Region("r", units[:1], policy="bogus")


def test_op_name() -> None:
    assert op_name(aten.mm.default) == "mm"
    assert op_name(aten.add.Tensor) == "add"
    assert op_name(aten._scaled_dot_product_flash_attention_for_cpu.default) in ATTENTION_OPS


# ----------------------------------------------------------------------------------- OpLog


def test_oplog_keeps_only_what_autograd_saves_among_the_named_ops() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(4, 4), torch.randn(4, 4)
    log = OpLog(policy_for("ops.mm"))
    with log:
        h = x @ w
        y = h.tanh()
        unused = y @ w  # an mm whose output autograd never saves
    assert log.keep(h)  # mm: named
    assert not log.keep(y)  # tanh: not named
    assert not log.keep(x)  # made outside the unit
    kept, _ = log.finish()
    assert [(op_name(key[0]), key[1]) for key in kept] == [("mm", 0)]
    output, versions, rng, *_checks = kept[(aten.mm.default, 0)]
    assert torch.equal(output, h) and output.untyped_storage().data_ptr() == h.data_ptr()
    assert rng is None and len(versions) == 1
    assert unused.shape == (4, 4)


def test_eager_policy_keeps_every_named_op() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(4, 4), torch.randn(4, 4)
    log = OpLog(policy_for("save_matmuls"), eager=True)
    with log:
        h = x @ w
        z = h.relu() @ w
    kept, _ = log.finish()  # no keep() asked: kept anyway
    assert sorted(key[1] for key in kept if key[0] is aten.mm.default) == [0, 1]
    assert torch.equal(kept[(aten.mm.default, 1)][0], z)


def test_oplog_does_not_keep_an_output_changed_in_place() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(4, 4), torch.randn(4, 4)
    log = OpLog(policy_for("ops.mm"))
    with log:
        h = x @ w
        h.add_(1)  # as a dropout's bernoulli_ fills a tensor it made
    assert not log.keep(h)
    kept, _ = log.finish()
    assert not kept


def _dropout_with_log(policy: str, seed: int = 5) -> tuple[OpLog, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(6, 8, requires_grad=True)
    log = OpLog(policy_for(policy))
    masks: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not log.keep(tensor):
            log.note_recomputed(tensor)
        masks.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), log:
        y = torch.nn.functional.dropout(x, 0.5, training=True)  # empty_like, bernoulli_, div_
    return log, x, masks[0] if masks else y


def test_oplog_keeps_a_tensor_filled_in_place_as_a_whole() -> None:
    log, _x, mask = _dropout_with_log("ops.div_")
    kept, skippable = log.finish()
    names = sorted(op_name(key[0]) for key in kept)
    # The mask is handed out where empty_like made it; bernoulli_ and div_ are skipped.
    assert names == ["bernoulli_", "div_", "empty_like"], names
    assert [op_name(k[0]) for k in log.kept_outputs] == ["div_"]
    (covered,) = log.covers.values()
    assert sorted(op_name(k[0]) for k in covered) == ["bernoulli_", "div_", "empty_like"]
    assert not any(op_name(k[0]) in ("bernoulli_", "empty_like") for k in log.needed)
    assert not any(op_name(k[0]) == "empty_like" for k in skippable)
    assert torch.equal(log.kept_outputs[next(iter(log.kept_outputs))], mask)


def test_replay_of_a_kept_filled_tensor_draws_nothing_and_restores_the_generator() -> None:
    log, x, mask = _dropout_with_log("ops.div_", seed=11)
    after_forward = torch.rand(7)  # what the forward's generator drew next
    kept, skippable = log.finish()

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: Counter[str] = Counter()

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
            self.seen[op_name(func)] += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(11)
    torch.randn(6, 8)  # the replay starts where the forward started
    ops, saved = Ops(), []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ops:
        with ReplayCache(kept, skippable):
            torch.nn.functional.dropout(x, 0.5, training=True)
    assert ops.seen["bernoulli_"] == 0 and ops.seen["div_"] == 0
    assert len(saved) == 1 and torch.equal(saved[0], mask)  # the mask mul saves: the kept one
    assert torch.equal(torch.rand(7), after_forward)  # later random ops draw what they drew


def test_oplog_names_a_filled_tensor_by_its_last_writer() -> None:
    log, *_ = _dropout_with_log("ops.bernoulli_")
    kept, _ = log.finish()
    assert not kept  # bernoulli_ filled the mask, div_ wrote it last: policies name div_


def _recording_keep(log_of: Any) -> tuple[Any, list[bool]]:
    """A pack hook asking the op log ``log_of()`` to keep every saved tensor; what it answered."""
    answers: list[bool] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        answers.append(log_of().keep(tensor))
        return tensor

    return pack, answers


def test_oplog_does_not_keep_a_tensor_read_before_its_last_write() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 4, requires_grad=True)
    log = OpLog(policy_for("ops.relu_"))
    pack, kept = _recording_keep(lambda: log)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), log:
        h = x * 3  # mul saves nothing for x's grad here but the constant
        doubled = h * 2  # reads h before relu_ writes it: the replay needs h as it was then
        h.relu_()  # saves its output
        _ = doubled + h
    assert kept == [False]
    log = OpLog(policy_for("ops.relu_"))
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), log:
        h = x * 3
        h.relu_()  # nothing read h before: kept whole, handed out where mul made it
        _ = h * 2
    assert kept == [True]


def test_oplog_keeps_a_tensor_another_in_place_op_only_reads() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 4, requires_grad=True)
    log = OpLog(policy_for("ops.mm"))
    pack, kept = _recording_keep(lambda: log)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), log:
        h = x @ x  # mm saves x twice (not made here)
        acc = torch.zeros(4, 4)
        acc.add_(h)  # reads h, writes acc: h is still mm's own output
        y = h.sin()  # saves h
    assert kept[-1] is True and y.shape == (4, 4)


def test_oplog_does_not_keep_a_tensor_written_through_a_view() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 4, requires_grad=True)
    log = OpLog(policy_for("ops.fill_.empty_like"))
    pack, saved = _recording_keep(lambda: log)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), log:
        scale = torch.empty_like(x)
        scale.fill_(2.0)
        scale[:2].fill_(3.0)  # a write into part of it: not a whole-tensor chain
        _ = x * scale
    assert saved == [False]


def test_eager_keep_sees_in_place_changes_after_the_op() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(4, 4), torch.randn(4, 4)
    eager = OpLog(policy_for("save_matmuls"), eager=True)
    with eager:
        g = x @ w
        inside = x @ w
        inside.mul_(2)  # changed in the forward, after the op: not kept
    eager.watch_outputs(g)  # as the engine does with what the unit returns
    kept, _ = eager.finish()
    assert len(kept) == 1  # the first mm's output, unchanged so far
    g.mul_(2)  # changed after the forward: the replay refuses rather than use changed values
    with pytest.raises(CheckpointMismatchError, match="changed in place"), ReplayCache(kept):
        x @ w


def test_oplog_megatron_on_a_tiny_attention() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    log = OpLog(policy_for("megatron"))
    with log:
        scores = q @ k.transpose(-1, -2)  # bmm, not fed by the core: kept
        probs = scores.softmax(-1)  # the core
        masked = probs * 0.5  # fed by the core: part of it
        out = masked @ v  # the product with V: kept
        after = out + 1  # outside the core again: kept
    assert log.keep(scores)
    assert not log.keep(probs)
    assert not log.keep(masked)
    assert log.keep(out)
    assert log.keep(after)


def test_oplog_skips_ops_that_feed_only_kept_ones() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4)
    log = OpLog(policy_for("ops.mm"))
    with log:
        a = x.sin()  # feeds only the mm, whose output is kept: the replay may skip it
        h = a @ w
        y = h.tanh()  # saved, not kept: the replay must produce it
    assert log.keep(h)
    log.note_recomputed(y)
    kept, skippable = log.finish()
    assert (aten.mm.default, 0) in kept
    assert (aten.sin.default, 0) in skippable
    assert (aten.tanh.default, 0) in log.needed


def _after_a_dead_core_storage() -> tuple[bool, bool]:
    """Megatron on: scores, softmax (the core), product with V; the softmax's output dies; then
    two ops outside the core. Returns whether each of their outputs is kept."""
    torch.manual_seed(0)
    q, k, v = torch.randn(4, 4), torch.randn(4, 4), torch.randn(4, 4)
    log = OpLog(policy_for("megatron"))
    with log:
        scores = q @ k
        probs = scores.softmax(-1)
        out = probs @ v
        del probs  # the core's storage dies; its id may be given to the next storage
        doubled = out * 2
        shifted = doubled + 1
    return log.keep(doubled), log.keep(shifted)


def test_megatron_keeps_ops_outside_the_core_with_fresh_ids(monkeypatch: Any) -> None:
    monkeypatch.setattr(selective, "_storage_id", StorageIds(reuse=False))
    assert _after_a_dead_core_storage() == (True, True)


def test_megatron_core_forgets_dead_storages(monkeypatch: Any) -> None:
    monkeypatch.setattr(selective, "_storage_id", StorageIds(reuse=True))
    assert _after_a_dead_core_storage() == (True, True)


def test_megatron_with_torchs_storage_ids() -> None:
    assert _after_a_dead_core_storage() == (True, True)


# ------------------------------------------------------------------------------- ReplayCache


class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.seen[op_name(func)] += 1
        return func(*args, **(kwargs or {}))


def test_replay_cache_hands_back_kept_outputs_by_call_index() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(3, 3), torch.randn(3, 3)
    stored = torch.full((3, 3), 7.0)
    cache = ReplayCache({(aten.mm.default, 1): (stored, [stored._version], None)})
    ops = Ops()
    with ops, cache:
        first = a @ b  # call 0: runs
        second = a @ b  # call 1: handed back, not run
        third = a @ b  # call 2: runs
    assert torch.equal(first, a @ b) and torch.equal(third, a @ b)
    assert second is stored
    assert cache.skipped == 1 and not cache.kept  # each kept output is handed back once
    assert ops.seen["mm"] == 2


def test_replay_cache_refuses_a_kept_output_changed_in_place() -> None:
    stored = torch.ones(2, 2)
    cache = ReplayCache({(aten.mm.default, 0): (stored, [stored._version], None)})
    stored.add_(1)
    with pytest.raises(CheckpointMismatchError, match="changed in place"), cache:
        torch.zeros(2, 2) @ torch.zeros(2, 2)


def test_replay_cache_stands_in_for_skippable_ops() -> None:
    x = torch.randn(4, 6)
    layout = [(torch.Size([4, 6]), (6, 1), torch.float32, torch.device("cpu"))]
    spec = torch.utils._pytree.tree_flatten(x)[1]
    cache = ReplayCache({}, {(aten.sin.default, 0): (spec, layout)})
    ops = Ops()
    with ops, cache:
        stand_in = x.sin()  # not run: an uninitialised tensor of the same layout
        real = x.cos()
    assert ops.seen["sin"] == 0 and ops.seen["empty_strided"] == 1
    assert stand_in.shape == (4, 6) and stand_in.stride() == (6, 1)
    assert torch.equal(real, torch.cos(x))
    assert cache.skipped == 1


def test_replay_cache_restores_the_generator_after_a_kept_random_op() -> None:
    torch.manual_seed(3)
    drawn = torch.rand(5)
    after = torch.get_rng_state()
    want = torch.rand(5)  # what the forward drew next
    cache = ReplayCache({(aten.mm.default, 0): (torch.zeros(1, 1), [0], (after, {}))})
    torch.manual_seed(99)
    with cache:
        torch.zeros(1, 1) @ torch.zeros(1, 1)
    assert torch.equal(torch.rand(5), want)
    assert drawn.shape == (5,)


# --------------------------------------------------------------------------------- Offloader


def _saved_hooks_step(model: nn.Module, x: torch.Tensor, off: Offloader | None) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    if off is None:
        loss = model(x).pow(2).sum()
    else:
        with torch.autograd.graph.saved_tensors_hooks(off.pack, off.unpack):
            loss = model(x).pow(2).sum()
    loss.backward()
    return loss.detach()


def test_offloader_round_trip_is_bitwise_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.Tanh())
    x = torch.randn(16, 32)
    want = _saved_hooks_step(model, x, None)
    want_grads = [p.grad.clone() for p in model.parameters()]
    off = Offloader()
    got = _saved_hooks_step(model, x, off)
    assert torch.equal(got, want)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), want_grads, strict=True))
    # Saved activations: x (16x32), the first output (16x64, for GELU), GELU's output (16x64),
    # the Tanh's output (16x32) and the pow's input (the same).
    activations = 4 * (16 * 32 + 16 * 64 + 16 * 64 + 16 * 32 + 16 * 32)
    assert off.offloaded_bytes >= activations
    assert not off.entries and off.loaded is not None  # everything came back and was used


def test_offloader_leaves_views_of_parameters_in_place() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    x = torch.randn(16, 32, requires_grad=True)
    off = Offloader()
    with torch.autograd.graph.saved_tensors_hooks(off.pack, off.unpack):
        model(x).sum().backward()
    # Activations only: x, the first output (for GELU) and GELU's output; not W1^T, W2^T.
    assert off.offloaded_bytes == 4 * (16 * 32 + 16 * 64 + 16 * 64)


def test_offloader_leaves_parameters_and_small_tensors() -> None:
    weight = nn.Parameter(torch.randn(64, 64))
    small = torch.randn(8, requires_grad=True)  # 32 bytes
    off = Offloader()
    with torch.autograd.graph.saved_tensors_hooks(off.pack, off.unpack):
        y = (small * small).sum() + (weight * weight).sum()
    assert off.offloaded_bytes == 0
    assert all(entry[0] is None for entry in off.entries)
    y.backward()
    assert torch.equal(small.grad, 2 * small.detach())
    assert torch.equal(weight.grad, 2 * weight.detach())


def test_offloader_counts_host_bytes_apart() -> None:
    x = torch.randn(128, 128, requires_grad=True)
    with track_memory(x) as plain:
        y = x.exp()
        live_plain = plain.current_bytes
        y.sum().backward()
    x.grad = None
    off = Offloader()
    with track_memory(x) as tracker:
        with torch.autograd.graph.saved_tensors_hooks(off.pack, off.unpack):
            y = x.exp()  # exp saves its output: a host copy of 64 KiB
        live = tracker.current_bytes
        host_after_forward = tracker.host_bytes
        y.sum().backward()
    assert off.offloaded_bytes == 128 * 128 * 4
    assert host_after_forward == tracker.host_peak_bytes == off.offloaded_bytes
    assert tracker.host_bytes == 0  # brought back and freed
    assert live == live_plain  # y itself is alive either way; its saved copy is on the host
    assert torch.equal(x.grad, y.detach())


def test_offloader_refuses_a_second_backward() -> None:
    x = torch.randn(64, 64, requires_grad=True)
    off = Offloader()
    with torch.autograd.graph.saved_tensors_hooks(off.pack, off.unpack):
        y = x.exp().sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="asked for twice"):
        y.backward()


# ------------------------------------------------ a kept output changed in place after forward


class Unit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(x)  # addmm
        return h, torch.sigmoid(h)  # sigmoid saves its output, not h


class Parent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unit = Unit()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, g = self.unit(x)
        h.mul_(2)  # legal without a plan: no saved tensor is h
        return (h * g).sum()


def _grads_with(action: str | None) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = Parent()
    x = torch.randn(4, 8)
    if action is None:
        model(x).backward()
    else:
        with apply_(model, Plan(actions={"unit": action}, units=["unit"])):
            model(x).backward()
    return [p.grad for p in model.parameters()]


def test_in_place_change_of_an_output_autograd_did_not_save() -> None:
    # Documented behaviour: a policy that keeps only what autograd saves (megatron, ops.<op>...)
    # does not keep h (sigmoid saves its output, not h), so the replay recomputes h from the
    # unit's input and the gradients are exact, as with recompute.
    want = _grads_with(None)
    for action in ("recompute", "selective:ops.addmm", "selective:megatron"):
        got = _grads_with(action)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), action


def test_in_place_change_of_an_output_kept_eagerly() -> None:
    # save_matmuls keeps addmm's output h as the forward makes it; h is then changed in place,
    # so the replay cannot use it: refused, naming the cause (never gradients from the changed
    # value, and no longer "either outcome").
    with pytest.raises(CheckpointMismatchError, match="changed in place") as info:
        _grads_with("selective:save_matmuls")
    assert "use recompute for this unit" in str(info.value)


def test_in_place_change_of_a_saved_output_is_refused_as_without_a_plan() -> None:
    class SavesH(Unit):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.fc(x)
            return h, torch.nn.functional.gelu(h)  # gelu saves h

    torch.manual_seed(0)
    model = Parent()
    model.unit = SavesH()
    plain = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        plain(torch.randn(4, 8)).backward()
    with apply_(model, Plan(actions={"unit": "selective:megatron"}, units=["unit"])):
        with pytest.raises(RuntimeError, match=r"in place|inplace"):
            model(torch.randn(4, 8)).backward()


def test_replay_that_runs_other_ops_than_the_forward_is_refused_by_name() -> None:
    # A forward hook that works only outside backward shifts the op numbering of the replay.
    from remat._compat import in_backward

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
    model = nn.Sequential(block)
    copies = []

    def hook(_module: nn.Module, _args: object, output: torch.Tensor) -> None:
        if not in_backward():
            copies.append(torch.nn.functional.gelu(output[:2]))  # forward only, another shape

    block[0].register_forward_hook(hook)
    x = torch.randn(4, 8)
    with (
        pytest.warns(UserWarning, match="will run again"),
        apply_(model, Plan(actions={"0": "selective:ops.gelu"}, units=["0"])),
    ):
        loss = model(x).sum()
        with pytest.raises(CheckpointMismatchError, match="runs different ops"):
            loss.backward()


# ------------------------------------------------------------------ save sets for the profile


def test_kept_by_policy_reports_the_covers_of_a_dropout_mask() -> None:
    from remat.profiling.options import kept_by_policy

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5))
    model = nn.Sequential(block)
    graphs: list[Any] = []
    kept = kept_by_policy(model, (torch.randn(4, 8),), ["0"], "ops.div_", graphs=graphs)
    (key,) = kept[0]
    assert op_name(key[0]) == "div_" and kept[0][key] == 4 * 8 * 4
    covered = graphs[0].covers[key]
    assert sorted(op_name(k[0]) for k in covered) == ["bernoulli_", "div_", "empty_like"]


def test_save_sets_follow_what_the_replay_must_run() -> None:
    from remat.apply.selective import replayed_by
    from remat.profiling.options import kept_by_policy, save_set_candidates, time_unit_ops

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.fc = nn.Linear(16, 64)
            self.out = nn.Linear(64, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x + self.out(nn.functional.gelu(self.fc(x)))  # residual: the next norm saves h
            return self.norm(h)

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    inputs = (torch.randn(32, 16, requires_grad=True),)
    everything = "ops." + ".".join(
        sorted({op_name(k[0]) for unit in time_unit_ops(model, inputs, [*model]) for k in unit})
    )
    graphs: list[Any] = []
    kept = kept_by_policy(model, inputs, ["0", "1"], everything, graphs=graphs)
    names = {op_name(k[0]) for unit in kept for k in unit}
    assert {"addmm", "gelu", "add", "native_layer_norm"} <= names
    graph = graphs[0]
    assert replayed_by(graph, names) == set()  # everything kept: nothing runs again
    # Without the residual add's output, the replay runs the add, and the second linear layer
    # (its input, the GELU's output, is kept) but not the first.
    again = {op_name(k[0]) for k in replayed_by(graph, names - {"add"})}
    assert "add" in again and "gelu" not in again
    without_gelu = {op_name(k[0]) for k in replayed_by(graph, names - {"gelu"})}
    assert without_gelu == {"gelu"}
    # Made-up op times: every op 1 ms. Dropping gelu frees its bytes for 1 ms; dropping add costs
    # the add and the addmm behind it. The first set drops gelu, never add before it.
    times = [{k: (1.0, 0) for k in graph.deps} for graph in graphs]
    (first,) = save_set_candidates(times, graphs, count=1)
    assert "add" in first.split(".")[1:] and "gelu" not in first.split(".")[1:]
