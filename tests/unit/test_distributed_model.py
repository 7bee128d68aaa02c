"""The torch-free per-rank model (remat.cost.distributed) and the solver's world_size / fsdp.

Profiles are synthetic (``example_profile`` with parameter records); expected figures are worked
out by hand from the rules in the module docstring.
"""

from __future__ import annotations

import dataclasses

import pytest

from remat.cost.distributed import parameter_bytes, per_rank, shard_bytes
from remat.cost.model import Profile, blocks_of, example_profile, simulate
from remat.plan import Plan
from remat.solve.solver import solve


def profile_with_parameters(optimizer: str = "adamw") -> Profile:
    """Four units of 100 B each with a 30-row parameter (10 B a row: 300 B), a root parameter of
    50 rows (500 B) and a frozen root one (7 rows of 4 B)."""
    prof = example_profile()
    prof.parameters = [
        {"owner": "", "dim0": 50, "row_bytes": 10, "trainable": True},
        {"owner": "", "dim0": 7, "row_bytes": 4, "trainable": False},
        *({"owner": f, "dim0": 30, "row_bytes": 10, "trainable": True} for f in prof.unit_fqns),
    ]
    prof.start_peak_bytes = 1000
    prof.optimizer_peak_bytes = 1000
    prof.optimizer = optimizer
    return prof


def test_shard_bytes_pads_dim0() -> None:
    assert shard_bytes(30, 10, 4) == 80  # ceil(30 / 4) = 8 rows
    assert shard_bytes(32, 10, 4) == 80
    assert shard_bytes(3, 10, 8) == 10  # fewer rows than ranks: one padded row each
    assert shard_bytes(30, 10, 1) == 300


def test_one_rank_without_fsdp_is_the_profile_itself() -> None:
    prof = profile_with_parameters()
    assert per_rank(prof, world_size=1) is prof
    default = solve(prof, "60%")
    explicit = solve(prof, "60%", world_size=1, fsdp=False)
    assert explicit.plan == default.plan
    assert explicit.predicted_peak_bytes == default.predicted_peak_bytes


def test_ddp_adds_gradient_buckets_to_every_moment() -> None:
    prof = profile_with_parameters()
    ddp = per_rank(prof, world_size=8)
    trainable = 500 + 4 * 300  # the frozen parameter has no gradient, so no bucket
    assert ddp.static_bytes == prof.static_bytes + trainable
    assert ddp.base_bytes == prof.base_bytes + trainable
    assert ddp.fixed_peak_bytes == prof.fixed_peak_bytes + trainable
    assert [u.keep_bytes for u in ddp.units] == [u.keep_bytes for u in prof.units]
    assert ddp.units == prof.units  # needs are relative: unchanged
    assert ddp.peak_bytes == simulate(prof, Plan()).peak_bytes + trainable
    assert (ddp.world_size, ddp.fsdp) == (8, False)


def test_fsdp_static_is_shards_of_parameters_gradients_and_adam_states() -> None:
    prof = profile_with_parameters("adamw")
    fsdp = per_rank(prof, world_size=4, fsdp=True)
    # root: 50 rows -> 13 per rank (130 B of 500); frozen 7 rows of 4 B -> 2 rows (8 B of 28);
    # units: 30 rows -> 8 per rank (80 B of 300).
    saved_params = (500 - 130) + (28 - 8) + 4 * (300 - 80)
    saved_trainable = (500 - 130) + 4 * (300 - 80)
    assert fsdp.static_bytes == prof.static_bytes - saved_params - 3 * saved_trainable
    owners = parameter_bytes(prof, 4)
    assert (
        owners["b.0"].shard == 80 and owners[""].shard == 138 and owners[""].trainable_shard == 130
    )


def test_fsdp_unit_terms() -> None:
    prof = profile_with_parameters("sgd")
    fsdp = per_rank(prof, world_size=4, fsdp=True)
    one, four = prof.units, fsdp.units
    # Gathered: 4 shards of 80 B = 320 B (padded, 300 B unpadded); the root: 4 * 138 = 552 B.
    # Forward: gathered parameters and the all-gather output held (2 * 320), or while gathering,
    # the previous unit's output and its own (the root's for the first unit).
    assert four[0].forward_need_keep_bytes == max(one[0].forward_need_keep_bytes + 640, 552 + 320)
    assert four[1].forward_need_keep_bytes == max(one[1].forward_need_keep_bytes + 640, 640)
    # Backward of b.1: gathered b.1, b.0's all-gather output prefetched (320 each), b.2's
    # reduce-scatter input still held (4 * 80), and b.2, b.3 finished: their gradients are shards
    # (220 B less each).
    assert four[1].backward_need_keep_bytes == one[1].backward_need_keep_bytes + 640 + 320 - 440
    # The last unit's backward runs first: no reduce-scatter before it, nothing finished.
    assert four[3].backward_need_keep_bytes == one[3].backward_need_keep_bytes + 640
    # The first unit's backward runs last: nothing left to prefetch.
    assert four[0].backward_need_keep_bytes == one[0].backward_need_keep_bytes + 320 + 320 - 660
    # Base: the units' parameters are shards; the root's are gathered (padded) on top of its
    # shards, instead of whole.
    assert fsdp.base_bytes == prof.base_bytes - 4 * (300 - 80) + 138 + 552 - 528
    # Before the first unit, the root's all-gather output is held as well.
    assert fsdp.start_peak_bytes == prof.start_peak_bytes - 4 * (300 - 80) + 138 + 552 - 528 + 552
    assert fsdp.peak_bytes == simulate(fsdp, Plan()).peak_bytes
    assert (
        fsdp.full_peak_bytes == simulate(fsdp, Plan(actions={"_default": "recompute"})).peak_bytes
    )


def test_fsdp_plans_have_no_segments() -> None:
    prof = profile_with_parameters("sgd")
    one_process = solve(prof, "min")
    assert any(b.kind != "keep" and b.end > b.start for b in blocks_of(prof, one_process.plan))
    sharded = solve(prof, "min", world_size=4, fsdp=True)
    actions = {str(a) for a in sharded.plan.actions.values()}
    assert actions <= {"keep", "recompute"} and "recompute" in actions


def test_percent_budget_resolves_against_per_rank_figures() -> None:
    prof = profile_with_parameters()
    fsdp = per_rank(prof, world_size=4, fsdp=True)
    result = solve(prof, "50%", world_size=4, fsdp=True)
    least = solve(fsdp, "min").predicted_peak_bytes  # the least peak of one rank
    assert result.min_peak_bytes == least != solve(prof, "min").predicted_peak_bytes
    assert result.budget_bytes == least + (fsdp.peak_bytes - least) // 2


def test_per_rank_profile_round_trips_json() -> None:
    fsdp = per_rank(profile_with_parameters(), world_size=4, fsdp=True)
    assert Profile.from_json(fsdp.to_json()) == fsdp
    assert per_rank(fsdp, world_size=4, fsdp=True) is fsdp


@pytest.mark.parametrize("world_size", [0, -2, 1.5, True, "8"])
def test_bad_world_size(world_size: object) -> None:
    with pytest.raises(ValueError, match="world_size: got"):
        per_rank(profile_with_parameters(), world_size=world_size, fsdp=True)  # type: ignore[arg-type]


def test_a_per_rank_profile_is_not_sharded_again() -> None:
    fsdp = per_rank(profile_with_parameters(), world_size=4, fsdp=True)
    with pytest.raises(ValueError, match="already per rank"):
        solve(fsdp, "min", world_size=8)


def test_an_old_profile_without_parameter_records_is_refused() -> None:
    old = dataclasses.replace(example_profile(), optimizer="sgd")
    with pytest.raises(ValueError, match="profile the model again"):
        per_rank(old, world_size=2, fsdp=True)
