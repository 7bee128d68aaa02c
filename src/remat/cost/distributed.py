"""Per-rank figures for data-parallel training: a one-process :class:`Profile` turned into what one
of ``world_size`` ranks holds under DDP or FSDP2. Imports no torch.

The activations of a rank are those of its own batch (profile with the per-rank batch); what changes
with the ranks is static memory and what the data-parallel engine adds around each unit. The model,
term by term, with ``S`` a rank's shard of a unit's parameters and ``G = N * S`` the unit gathered
(``docs/distributed.md`` says the same with the reasons):

FSDP2 (``fully_shard`` on each unit, then on the root; ``reshard_after_forward=True``):

- At rest (``static_bytes``): every parameter, gradient and optimizer state is a shard: dim 0 split
  over the ranks and padded, ``ceil(dim0 / N)`` rows of each (FSDP2's ``Shard(0)``). Buffers and
  inputs are not sharded. The optimizer step's temporaries shrink in the same proportion; what the
  caller still holds then (the output, the loss) does not.
- Gathered parameters keep the padding: ``G`` bytes. The root's own parameters (outside units:
  embeddings, head) stay gathered, on top of their shards, from the root's forward to the end of
  backward (FSDP2 does not reshard the root after forward).
- A unit's forward: its gathered parameters and its all-gather output (``2 G``), since FSDP2 keeps
  a forward all-gather's output until the next unit's copy-out; while gathering, the previous
  unit's output (the root's for the first unit) with its own.
- A unit's backward: its gathered parameters, the all-gather output of the unit prefetched for the
  next backward (FSDP2 prefetches one), the reduce-scatter input of the unit whose backward ran
  before it (FSDP2 keeps it until the next reduce-scatter); the gradients of the units whose
  backward finished are shards.

DDP: every rank holds full parameters, gradients and optimizer state, plus the gradient buckets that
all-reduce them: with ``gradient_as_bucket_view=False`` (the default) the buckets hold every
gradient a second time, from DDP's construction on.

The FSDP2 terms were fitted to, and are tested against, steps measured by the tracker on ranks of
the fake process group (tests/integration/test_distributed.py); ``peak_bytes`` and
``full_peak_bytes`` of a per-rank profile are the simulator's predictions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from remat.cost.model import Block, Profile, UnitProfile, evaluate_blocks

__all__ = [
    "STATES_PER_PARAMETER",
    "ParameterBytes",
    "parameter_bytes",
    "per_rank",
    "shard_bytes",
    "state_ratio",
    "static_parts",
]

STATES_PER_PARAMETER = {"adamw": 2, "sgd": 0, "none": 0}
"""Optimizer state tensors per trainable parameter, each the parameter's size."""


def shard_bytes(dim0: int, row_bytes: int, world_size: int) -> int:
    """Bytes of one rank's shard of a parameter: ``ceil(dim0 / world_size)`` rows (FSDP2 pads
    dim 0 to a multiple of the world size).

    Example:
        >>> shard_bytes(10, 4, 4)  # 10 rows of 4 bytes over 4 ranks: 3 rows each, padded
        12
    """
    return math.ceil(dim0 / world_size) * row_bytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParameterBytes:
    """Bytes of one owner's parameters (a unit, or ``""``: the root), full and per-rank shard."""

    full: int = 0
    shard: int = 0
    trainable_full: int = 0
    trainable_shard: int = 0


def parameter_bytes(profile: Profile, world_size: int) -> dict[str, ParameterBytes]:
    """Per owner (unit FQN, ``""`` for parameters outside units), full and shard bytes.

    Example:
        >>> from remat.cost.model import example_profile
        >>> prof = example_profile()
        >>> prof.parameters = [{"owner": "b.0", "dim0": 10, "row_bytes": 4, "trainable": True}]
        >>> parameter_bytes(prof, 4)["b.0"]
        ParameterBytes(full=40, shard=12, trainable_full=40, trainable_shard=12)
    """
    totals: dict[str, list[int]] = {fqn: [0, 0, 0, 0] for fqn in ["", *profile.unit_fqns]}
    for entry in profile.parameters:
        owner = entry.get("owner", "")
        full = int(entry["dim0"]) * int(entry["row_bytes"])
        shard = shard_bytes(int(entry["dim0"]), int(entry["row_bytes"]), world_size)
        row = totals.setdefault(owner, [0, 0, 0, 0])
        row[0] += full
        row[1] += shard
        if entry.get("trainable", True):
            row[2] += full
            row[3] += shard
    return {
        owner: ParameterBytes(full=a, shard=b, trainable_full=c, trainable_shard=d)
        for owner, (a, b, c, d) in totals.items()
    }


def static_parts(profile: Profile) -> tuple[int, int, int]:
    """Bytes of the parameters, gradients and optimizer state that one rank holds at rest, for the
    profile's own ``world_size`` and ``fsdp`` (what :func:`per_rank` put in ``static_bytes``):
    shards under FSDP2; under DDP full replicas, with the gradient buckets counted as gradients.

    The optimizer state is ``STATES_PER_PARAMETER`` tensors per trainable parameter (none for an
    optimizer not in that table).

    Example:
        >>> from remat.cost.model import example_profile
        >>> prof = example_profile()
        >>> prof.parameters = [{"owner": "", "dim0": 10, "row_bytes": 4, "trainable": True}]
        >>> prof.optimizer = "adamw"
        >>> static_parts(prof)  # 40 B of parameters, their gradients, AdamW's two states
        (40, 40, 80)
        >>> prof.world_size, prof.fsdp = 4, True
        >>> static_parts(prof)  # 3 of the 10 rows each
        (12, 12, 24)
    """
    owners = parameter_bytes(profile, profile.world_size).values()
    states = state_ratio(profile)
    if profile.fsdp:
        params = sum(p.shard for p in owners)
        trainable = sum(p.trainable_shard for p in owners)
        gradients = trainable
    else:
        params = sum(p.full for p in owners)
        trainable = sum(p.trainable_full for p in owners)
        gradients = trainable * (2 if profile.world_size > 1 else 1)  # DDP's buckets
    return params, gradients, round(states * trainable)


def state_ratio(profile: Profile) -> float:
    """Bytes of optimizer state per byte of trainable parameter: measured (the profile's
    ``optimizer_state_bytes`` over its trainable bytes, one process), else
    ``STATES_PER_PARAMETER`` by the optimizer's name (older profiles; 0 for a name not there).

    Example:
        >>> from remat.cost.model import example_profile
        >>> prof = example_profile()
        >>> prof.parameters = [{"owner": "", "dim0": 10, "row_bytes": 4, "trainable": True}]
        >>> prof.optimizer, prof.optimizer_state_bytes = "Adafactor", 20
        >>> state_ratio(prof)  # 20 bytes of state over 40 of parameters
        0.5
    """
    if profile.optimizer_state_bytes is not None:
        trainable = sum(p.trainable_full for p in parameter_bytes(profile, 1).values())
        return profile.optimizer_state_bytes / trainable if trainable else 0.0
    return float(STATES_PER_PARAMETER.get(profile.optimizer, 0))


def _check(profile: Profile, world_size: Any, fsdp: bool) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(
            f"world_size: got {world_size!r}; expected an integer >= 1 (the number of ranks that"
            " share the model, as torchrun's --nproc_per_node times --nnodes)"
        )
    if (profile.world_size, profile.fsdp) != (1, False):
        raise ValueError(
            f"per_rank: the profile is already per rank (world_size={profile.world_size},"
            f" fsdp={profile.fsdp}); expected a one-process profile. Profile again with"
            " world_size=1, or pass the profile's own world_size and fsdp"
        )
    if not profile.parameters or profile.start_peak_bytes is None:
        raise ValueError(
            "per_rank: the profile records no parameters (made by an older remat?); profile the"
            " model again with remat.profile"
        )
    if profile.optimizer_state_bytes is None and profile.optimizer not in STATES_PER_PARAMETER:
        raise ValueError(
            f"per_rank: the profile's optimizer is {profile.optimizer!r}; expected one of"
            f" {', '.join(STATES_PER_PARAMETER)}"
        )


def per_rank(profile: Profile, *, world_size: int, fsdp: bool = False) -> Profile:
    """What one of ``world_size`` ranks holds, from a one-process profile of the per-rank batch.

    ``world_size=1, fsdp=False`` returns the profile itself; a profile that is already per rank for
    the same ``world_size`` and ``fsdp`` is returned as it is.

    Args:
        profile: from :func:`remat.profile` with ``world_size=1`` (the default).
        world_size: the number of data-parallel ranks.
        fsdp: ``True`` for FSDP2 (sharded parameters, gradients and optimizer state), ``False``
            for DDP (replicas and gradient buckets).

    Returns:
        A new :class:`Profile` with per-rank figures, ``world_size`` and ``fsdp`` set, and a note.

    Raises:
        ValueError: a bad ``world_size``, a profile already per rank for other settings, or one
            without the parameter records this needs.

    Example:
        >>> from remat.cost.model import example_profile
        >>> prof = example_profile()
        >>> prof.parameters = [{"owner": o, "dim0": 100, "row_bytes": 1, "trainable": True}
        ...                    for o in ["", *prof.unit_fqns]]
        >>> prof.start_peak_bytes, prof.optimizer_peak_bytes, prof.optimizer = 1000, 1000, "sgd"
        >>> ddp, fsdp = per_rank(prof, world_size=4), per_rank(prof, world_size=4, fsdp=True)
        >>> prof.static_bytes, ddp.static_bytes, fsdp.static_bytes  # 500 B params, grads in static
        (1000, 1500, 250)
    """
    if (world_size, fsdp) == (profile.world_size, profile.fsdp):
        return profile
    _check(profile, world_size, fsdp)
    owners = parameter_bytes(profile, world_size)
    states = state_ratio(profile)
    assert profile.start_peak_bytes is not None  # _check
    start = profile.start_peak_bytes
    optimizer = profile.optimizer_peak_bytes
    units = [dataclasses.replace(unit) for unit in profile.units]
    if not fsdp:
        buckets = sum(p.trainable_full for p in owners.values())
        static = profile.static_bytes + buckets
        base = profile.base_bytes + buckets
        start += buckets
        optimizer = None if optimizer is None else optimizer + buckets
        note = (
            f"per rank of {world_size} under DDP: full replicas plus gradient buckets holding every"
            f" gradient once more ({buckets:,} bytes; gradient_as_bucket_view=False)"
        )
    else:
        saved_all = sum(p.full - p.shard for p in owners.values())
        saved_trainable = sum(p.trainable_full - p.trainable_shard for p in owners.values())
        at_rest = saved_all + saved_trainable + round(states * saved_trainable)
        static = profile.static_bytes - at_rest
        # During forward and backward the root's parameters are gathered, on top of their shards;
        # the units' parameters are shards except the unit running.
        root = owners[""]
        units_saved = sum(owners[u.fqn].full - owners[u.fqn].shard for u in units)
        # Gathered parameters keep FSDP2's padding: N shards each.
        root_gathered = world_size * root.shard
        # The optimizer states are alive through the step (steady state), as shards.
        states_saved = round(states * saved_trainable)
        base = (
            profile.base_bytes - units_saved - states_saved + root.shard + root_gathered - root.full
        )
        # Before the first unit the root's all-gather output is held too (FSDP2 frees a forward
        # all-gather's output at the next unit's copy-out, to overlap them).
        start += root.shard + root_gathered - root.full - units_saved + root_gathered - states_saved
        if optimizer is not None:
            # Beyond static memory, the optimizer step holds what the caller still holds (the
            # output, the loss: not sharded) and its temporaries (foreach AdamW's per-parameter
            # intermediates), which shrink with the shards they are computed from.
            full = sum(p.trainable_full for p in owners.values())
            shards = sum(p.trainable_shard for p in owners.values())
            held = 0
            if profile.optimizer_start_bytes is not None:  # the states exist (steady state)
                held = max(profile.optimizer_start_bytes - profile.static_bytes, 0)
            temporaries = max(optimizer - profile.static_bytes - held, 0)
            optimizer = static + held + (-(-temporaries * shards // full) if full else temporaries)
        _shard_units(units, owners, world_size, root_gathered)
        note = (
            f"per rank of {world_size} under FSDP2: parameters, gradients and optimizer state"
            f" sharded ({at_rest:,} bytes less at rest); each unit's parameters gathered while it"
            " runs, one more prefetched in backward, and its gradients reduce-scattered"
        )
    fixed = max(start, optimizer) if optimizer is not None else profile.fixed_peak_bytes
    result = dataclasses.replace(
        profile,
        units=units,
        static_bytes=static,
        base_bytes=base,
        fixed_peak_bytes=fixed,
        start_peak_bytes=start,
        optimizer_peak_bytes=optimizer,
        world_size=world_size,
        fsdp=fsdp,
        notes=[*profile.notes, note + "; peak_bytes and full_peak_bytes are predictions"],
    )
    n = len(units)
    none = evaluate_blocks(result, [Block("keep", j, j) for j in range(n)])
    full = evaluate_blocks(result, [Block("replay", j, j) for j in range(n)])
    return dataclasses.replace(result, peak_bytes=none.peak_bytes, full_peak_bytes=full.peak_bytes)


def _shard_units(
    units: list[UnitProfile], owners: dict[str, ParameterBytes], world_size: int, root: int
) -> None:
    """Add FSDP2's per-unit terms to the units' needs (in place; see the module docstring).
    ``root``: the root's gathered bytes."""
    gathered_of = [world_size * owners[unit.fqn].shard for unit in units]  # padded, as gathered
    for j, unit in enumerate(units):
        gathered = gathered_of[j]
        # Forward: the unit's gathered parameters and its all-gather output, held until the next
        # unit's copy-out; while gathering, the previous one's output (the root's for the first).
        previous = gathered_of[j - 1] if j > 0 else root
        for name in (
            "forward_need_keep_bytes",
            "forward_need_recompute_bytes",
            "forward_need_inner_bytes",
            "forward_excess_bytes",
        ):
            need = getattr(unit, name)
            setattr(unit, name, max(need + 2 * gathered, previous + gathered))
        prefetched = gathered_of[j - 1] if j > 0 else 0
        # Units after this one finished backward: their gradients are shards by now.
        done = sum(
            owners[u.fqn].trainable_full - owners[u.fqn].trainable_shard for u in units[j + 1 :]
        )
        # FSDP2 holds a reduce-scatter's input until the next one: during this unit's backward,
        # that of the unit whose backward ran before it (the next unit; none for the last).
        later = owners[units[j + 1].fqn].trainable_shard if j + 1 < len(units) else 0
        reduce_scatter = world_size * later
        for name, extra in (
            ("backward_need_keep_bytes", reduce_scatter),
            ("backward_need_recompute_bytes", reduce_scatter),
            ("backward_start_recompute_bytes", 0),
        ):
            value = getattr(unit, name)
            if value is not None:
                setattr(unit, name, value - done + gathered + prefetched + extra)
        # Selective and offload options: the same terms as recompute.
        unit.options = [dataclasses.replace(option) for option in unit.options]
        for option in unit.options:
            option.forward_need_bytes = max(
                option.forward_need_bytes + 2 * gathered, previous + gathered
            )
            if option.backward_need_bytes is not None:
                option.backward_need_bytes += -done + gathered + prefetched + reduce_scatter
