"""Profiles and the simulator: the predicted peak and step time of any plan, without torch.

A :class:`Profile` holds, per unit in execution order, what the planner needs, measured in two
tracked training steps of the real model: one with every unit kept and one with every unit
recomputed. Its byte figures are *retentions* and *needs*:

- ``keep_bytes`` / ``recompute_bytes``: how many bytes the unit's forward leaves alive (its saved
  activations and output, or its output alone), i.e. what it adds to every later moment until its
  backward;
- a *need* is the peak of an interval of the step (the unit's forward, the gap after it, its
  backward) minus the retention of the units before it in the run it was measured in. The live total
  in that interval under any plan is then the retention of the earlier units under that plan plus the
  need.

The simulator walks the plan as blocks (a kept unit, a recomputed unit, or a segment of consecutive
units replayed together) and evaluates every interval; a segment's backward replays its units one
after the other, so its inner units are modelled as kept once replayed (Chen et al. 2016). With the
two measured plans (``none``, ``full``) it reproduces the measured peaks exactly; for the others it is
a model, checked against measurement by the closed loop of ``remat.auto_``.

What a unit's backward frees of the unit before it depends on that unit's action: a kept ReLU
block holds its output until its own backward, a checkpoint does not, and a segment's checkpoint
holds its inner units' inputs and state until its first unit's backward ends. The profiler measures
these from the storages' lifetimes (``*_released_*``, ``backward_*_held_*``, ``recompute_state_bytes``,
``backward_keep_split_bytes``) and the simulator composes them by the
previous block (:func:`block_cost`'s ``previous``); docs/memory-model.md says how exact that is.

Time: recomputing a unit costs its forward time (``forward_ms``, medians of measured steps), or its
forward FLOPs where no time was measured (``meta``).

Options finer than a whole unit (``selective:<policy>``, ``offload``) are measured like recompute: a
tracked step with every unit under that action gives each unit's retention and needs under it
(:class:`OptionProfile`), and its cost is the part of the forward that the replay runs again
(selective) or the host transfer time not hidden behind compute (offload). Imports no torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from remat.plan import Plan

__all__ = [
    "FORMAT_VERSION",
    "TIMED_SOURCES",
    "Block",
    "BlockCost",
    "OptionProfile",
    "Profile",
    "Simulation",
    "UnitProfile",
    "block_cost",
    "blocks_of",
    "evaluate_blocks",
    "example_profile",
    "simulate",
]

FORMAT_VERSION = 1
TIMED_SOURCES = ("measured", "roofline")
"""Time sources whose ``forward_ms`` and ``step_ms`` are milliseconds: ``measured`` on the device,
``roofline`` estimated for a target device (:mod:`remat.cost.roofline`)."""


@dataclass(kw_only=True)
class OptionProfile:
    """One unit under an action finer than recompute (``selective:<policy>`` or ``offload``), as
    measured in a tracked step with every unit under it. Bytes as in :class:`UnitProfile`.

    Example:
        >>> option = OptionProfile(action="offload", retain_bytes=10, cost_ms=0.5, cost_flops=0)
        >>> option.cost("measured"), option.cost("flops")
        (0.5, 0.0)
    """

    action: str
    retain_bytes: int = 0
    """What the unit adds to the live total until its backward (like ``recompute_bytes``)."""
    forward_only_bytes: int = 0
    cache_bytes: int = 0
    """Part of ``retain_bytes`` that dies when autocast exits (see ``UnitProfile.keep_cache_bytes``)."""
    forward_need_bytes: int = 0
    backward_need_bytes: int | None = None
    released_bytes: int = 0
    """See ``UnitProfile.keep_released_bytes``."""
    backward_held_extra_bytes: int = 0
    """See ``UnitProfile.backward_keep_held_extra_bytes``."""
    saved_bytes: int = 0
    """Bytes held as they are (selective) or sent to host memory (offload) per call."""
    cost_ms: float | None = None
    """Extra step time (ms): the replayed part of the forward, or unhidden transfer time."""
    cost_flops: float = 0.0
    """The same in FLOPs (what replaying costs; profiles without measured times)."""

    def cost(self, time_source: str) -> float:
        """The option's cost in the profile's unit (ms, or FLOPs)."""
        if time_source in TIMED_SOURCES and self.cost_ms is not None:
            return self.cost_ms
        return float(self.cost_flops)


@dataclass(kw_only=True)
class UnitProfile:
    """One unit's measurements. Bytes are live tensor storage; each ``*_need_*`` figure is a peak
    minus the live total when the unit's forward started, in the run named (see the module
    docstring).

    Example:
        >>> unit = UnitProfile(fqn="blocks.0", forward_ms=2.5, forward_flops=10**9)
        >>> unit.recompute_cost("measured"), unit.recompute_cost("flops")
        (2.5, 1000000000.0)
    """

    fqn: str
    class_name: str = ""
    input_bytes: int = 0
    """Bytes of the unit's input tensors (what a checkpoint of it stores)."""
    output_bytes: int = 0
    keep_bytes: int = 0
    """What the unit adds to the live total, from its forward's start to the next unit's, when kept."""
    recompute_bytes: int = 0
    """The same when recomputed (its output, mostly)."""
    inner_bytes: int = 0
    """The same inside a segment (its output is not stored; skips the parent holds are)."""
    keep_forward_only_bytes: int = 0
    """Part of ``keep_bytes`` that dies when the model's forward returns (held by the parent only,
    such as skip tensors in a list): it counts in forward moments, not in backward ones."""
    recompute_forward_only_bytes: int = 0
    inner_forward_only_bytes: int = 0
    keep_cache_bytes: int = 0
    """Part of ``keep_bytes`` that dies when autocast exits after the loss: low-precision copies
    of the unit's parameters that autocast cached in the forward and nothing saved for backward
    (a bias an addmm does not save; a recomputed unit's weights, whose casts its replay makes
    again). It counts in forward moments and the loss, not in backward ones. Zero without autocast."""
    recompute_cache_bytes: int = 0
    inner_cache_bytes: int = 0
    input_freed_bytes: int = 0
    """Inside a segment, bytes of its input from the previous unit that died during its forward; a
    segment that starts with this unit stores that input instead."""
    forward_need_keep_bytes: int = 0
    """Peak from its forward's start to the next unit's (the last unit: to its backward), kept."""
    forward_need_recompute_bytes: int = 0
    forward_need_inner_bytes: int = 0
    forward_excess_bytes: int = 0
    """Peak of its own forward alone, kept (what replaying it adds)."""
    backward_need_keep_bytes: int | None = None
    """Peak of its backward, kept (``None``: no backward ran through it)."""
    backward_need_recompute_bytes: int | None = None
    backward_start_recompute_bytes: int | None = None
    """Live total when its backward starts, recomputed (before the replay)."""
    backward_keep_split_bytes: list[int] | None = None
    """``backward_need_keep_bytes`` split where the last tensor the forward made (up to this unit)
    dies in it, which is where its last saved tensor is released: the need before, and from then
    on (a segment's checkpoint, and what it holds, dies there when the unit is the segment's
    first). ``None``: not measured."""
    backward_recompute_split_bytes: list[int] | None = None
    """``backward_need_recompute_bytes`` split the same way: before and from the death of the
    last tensor the forward made up to this unit, which is where the unit's checkpoint dies (a
    nested segment's one checkpoint, with every boundary it holds, when the unit is its first).
    ``None``: not measured."""
    buffer_bytes: int = 0
    """Bytes of the unit's buffers (BatchNorm's running statistics): a replay clones them all
    while it runs the unit, to put them back after it."""
    keep_call_bytes: int | None = None
    """What the unit's forward call leaves alive as it returns, kept (its saved tensors and
    outputs), before the parent drops anything: what a segment's replay holds of it until the
    replay ends. ``None``: not measured (older profiles)."""
    keep_released_bytes: int = 0
    """Bytes the unit made (its output) that the next unit's backward freed, both kept: the next
    unit held them (its saved input), this one did not. Zero when this unit holds what it leaves
    alive until its own backward (a ReLU saves its output)."""
    keep_released_between_bytes: int = 0
    """Bytes the parent made between this unit and the next (the next one's input, such as a
    skip's sum) that the next unit's backward freed, both kept."""
    recompute_released_bytes: int = 0
    """As ``keep_released_bytes``, both recomputed (a checkpoint does not hold its output)."""
    recompute_released_between_bytes: int = 0
    recompute_state_bytes: int = 0
    """What a recomputed unit's forward leaves alive that its own backward frees: its
    checkpoint's state (clones of buffers its forward changes, such as BatchNorm's counter)."""
    backward_keep_held_made_bytes: int = 0
    """What ``backward_need_keep_bytes`` lacks when the previous unit's ``keep_released_bytes``
    stay alive through this unit's backward (the previous unit holds them): the peak of that
    interval had they lived, less its peak (they died in it when measured)."""
    backward_keep_held_between_bytes: int = 0
    """The same for the previous unit's ``keep_released_between_bytes`` (held by a segment's
    checkpoint, which stores its inner units' inputs)."""
    backward_keep_held_both_bytes: int = 0
    """The same for both."""
    backward_recompute_held_made_bytes: int = 0
    """As ``backward_keep_held_made_bytes``, for ``backward_need_recompute_bytes``."""
    backward_recompute_held_between_bytes: int = 0
    backward_recompute_held_both_bytes: int = 0
    forward_ms: float | None = None
    backward_ms: float | None = None
    recompute_ms: float | None = None
    """What recomputing it added to its forward and backward, measured (the replay and the
    checkpoint's own work); ``None``: not measured, the forward time stands in."""
    forward_flops: int = 0
    options: list[OptionProfile] = field(default_factory=list)
    """Measured ``selective:<policy>`` and ``offload`` options: for solver-chosen op sets, the
    Pareto set of (retained bytes, cost) among those measured."""

    def option(self, action: str) -> OptionProfile | None:
        """The measured option for ``action`` (``None`` if the profile has none)."""
        return next((o for o in self.options if o.action == action), None)

    def recompute_cost(self, time_source: str) -> float:
        """What recomputing this unit costs: ms, or FLOPs when no time was measured."""
        if time_source in TIMED_SOURCES and self.recompute_ms is not None:
            return self.recompute_ms
        if time_source in TIMED_SOURCES and self.forward_ms is not None:
            return self.forward_ms
        return float(self.forward_flops)


@dataclass(kw_only=True)
class Profile:
    """What the planner knows about one model's training step. Round-trips through JSON.

    Example:
        >>> profile = example_profile()
        >>> Profile.from_json(profile.to_json()) == profile
        True
    """

    units: list[UnitProfile]
    static_bytes: int
    """Parameters, buffers, inputs, gradients and optimizer state."""
    base_bytes: int = 0
    """Live total when the first unit's forward starts (the same under every plan)."""
    end_need_bytes: int = 0
    """Peak after the model's forward returns (loss, its backward, the head's backward), less the
    base and the retention alive into the backward, with every unit kept. With ``loss_need_bytes``
    set, only from autocast's exit on (the loss's and the head's backward)."""
    loss_need_bytes: int | None = None
    """Under autocast whose cache some unit's retention holds (``*_cache_bytes``): the peak from
    the model's forward return to autocast's exit (the loss), less the base and the retention
    that outlives the forward, with every unit kept; ``None``: the loss is in ``end_need_bytes``."""
    fixed_peak_bytes: int
    """Largest live total in parts of the step no plan changes (before the first unit, the
    optimizer step)."""
    peak_bytes: int
    """Measured peak of the step with no plan."""
    full_peak_bytes: int | None = None
    """Measured peak of the step with every unit recomputed."""
    step_ms: float | None = None
    """Median measured step time with no plan."""
    time_resolution_ms: float | None = None
    """Costs closer than this are a tie for the solver (see :func:`remat.solve`), which then
    takes the plan with the fewest FLOPs: measured times differ by more from run to run, and a
    plan that followed the noise would change between identical runs. Set by the profiler
    (a share of ``step_ms``); ``None``: costs are exact (estimated or synthetic profiles)."""
    time_source: str = "measured"
    """``measured`` (ms), ``roofline`` (ms estimated for a target device) or ``flops`` (no times:
    costs are forward FLOPs)."""
    model_class: str = ""
    device: str = ""
    dtype: str = ""
    optimizer: str = ""
    """The optimizer whose step and state the figures include: ``adamw``, ``sgd``, ``none``, or
    the class name of an optimizer passed as an instance or built by a factory."""
    precision: str = "32"
    """The step's precision (Lightning's names: ``32``, ``bf16-mixed``, ``fp16-mixed``,
    ``bf16-true``); plans made from the profile record it."""
    torch_version: str = ""
    fingerprint: dict[str, Any] | None = None
    cross_unit: list[dict[str, Any]] = field(default_factory=list)
    """Tensors that live across non-adjacent units (skip connections): from, to, bytes."""
    notes: list[str] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)
    """Estimate mode: the device-dependent kernels assumed for the target (attention, dropout,
    optimizer path); empty for measured profiles."""
    world_size: int = 1
    """Ranks the figures are per rank for (1: one process; see :mod:`remat.cost.distributed`)."""
    fsdp: bool = False
    """Whether parameters, gradients and optimizer state are sharded (FSDP2) across the ranks."""
    parameters: list[dict[str, Any]] = field(default_factory=list)
    """Per parameter (counted once): ``owner`` (the unit FQN, ``""`` outside units), ``dim0``,
    ``row_bytes`` (bytes per index of dim 0) and ``trainable``: what sharding needs."""
    start_peak_bytes: int | None = None
    """Peak before the first unit's forward (part of ``fixed_peak_bytes``)."""
    optimizer_peak_bytes: int | None = None
    """Peak of the optimizer step (part of ``fixed_peak_bytes``)."""
    optimizer_start_bytes: int | None = None
    """Live total when the optimizer step starts (its states not created yet: first step)."""
    profiling_peak_bytes: int | None = None
    """The most tensor memory profiling held at once on the device: the highest peak of its
    tracked steps (of their windows, for a step that did not fit whole) plus what it kept beside
    them (gradients the model had, copies of a CPU model's parameters)."""
    capacity_bytes: int | None = None
    """The device capacity profiling was held to (simulated), if one was given."""
    optimizer_state_bytes: int | None = None
    """Bytes of the optimizer's state, measured by its own step (``None`` in older profiles);
    :func:`remat.cost.distributed.per_rank` shards it with the parameters."""
    accumulation_steps: int = 1
    """Micro-batches of gradient accumulation the step was profiled for (above 1: the last
    one, with the gradients alive)."""
    input_shapes: list[list[int]] | None = None
    """Shapes of the example batch's tensors, in order: the batch the step was profiled on."""

    @property
    def unit_fqns(self) -> list[str]:
        return [unit.fqn for unit in self.units]

    @property
    def activation_bytes(self) -> int:
        """The unplanned step's activation memory: its peak minus the static bytes."""
        return max(self.peak_bytes - self.static_bytes, 0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {"format_version": FORMAT_VERSION, "kind": "remat.profile", **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "profile") -> Profile:
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a JSON object")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{source}: format_version {version!r} is not one this remat reads"
                f" (<= {FORMAT_VERSION}); upgrade remat, or re-run remat.profile"
            )
        names = {f.name for f in fields(cls)}
        unit_names = {f.name for f in fields(UnitProfile)} - {"options"}
        option_names = {f.name for f in fields(OptionProfile)}
        try:
            units = [
                UnitProfile(
                    **{k: v for k, v in unit.items() if k in unit_names},
                    options=[
                        OptionProfile(**{k: v for k, v in o.items() if k in option_names})
                        for o in unit.get("options") or []
                    ],
                )
                for unit in data["units"]
            ]
            kwargs = {k: v for k, v in data.items() if k in names and k != "units"}
            return cls(units=units, **kwargs)
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{source}: not a remat profile ({error})") from None

    @classmethod
    def from_json(cls, text: str, *, source: str = "profile") -> Profile:
        try:
            return cls.from_dict(json.loads(text), source=source)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{source}: not valid JSON at line {error.lineno}, column {error.colno}"
            ) from None


@dataclass(frozen=True)
class Block:
    """A run of the plan: ``keep`` (one unit), ``replay`` (units ``start..end`` checkpointed
    together; ``start == end`` is plain recompute), ``nested`` (the same, with each unit
    replayed again before its own backward) or ``option`` (one unit under ``action``, a measured
    :class:`OptionProfile` such as ``selective:megatron`` or ``offload``)."""

    kind: str
    start: int
    end: int
    action: str | None = None

    def describe(self, fqns: Sequence[str]) -> str:
        if self.kind == "keep":
            return f"keep {fqns[self.start]}"
        if self.kind == "option":
            return f"{self.action} {fqns[self.start]}"
        if self.start == self.end:
            return f"recompute {fqns[self.start]}"
        return f"{'segment' if self.kind == 'replay' else 'nested'} {fqns[self.start]}..{fqns[self.end]}"


@dataclass(frozen=True, kw_only=True)
class BlockCost:
    """A block as the solver sees it. With ``T`` the retention of the blocks before it and ``P``
    the part of ``T`` alive in the backward (it outlives the forward, and autocast's cache,
    which dies after the loss), its worst forward moment is ``base + T + forward_need_bytes`` and
    its worst backward moment ``base + P + backward_need_bytes``; it adds ``delta_bytes`` to ``T``
    (``persistent_delta_bytes`` to ``P``) and costs ``cost``.

    Under autocast whose cache a unit holds (``Profile.loss_need_bytes`` set), the block that ends
    with the last unit has the loss among its forward moments: ``T`` then less the forward-only
    bytes of that block (those of blocks before it, held by the parent only, are counted as if
    alive: exact when there are none, as in a transformer; above the measured loss otherwise)."""

    forward_need_bytes: int
    backward_need_bytes: int
    delta_bytes: int
    persistent_delta_bytes: int
    cost: float
    forward_where: str
    backward_where: str


def _worst(candidates: dict[str, float | None]) -> tuple[int, str]:
    known = {k: v for k, v in candidates.items() if v is not None}
    if not known:
        return 0, "nothing"
    where = max(known, key=known.__getitem__)
    return int(known[where]), where


def block_cost(
    profile: Profile, block: Block, previous: Block | Literal[False] | None = None
) -> BlockCost:
    """The needs, retention and recompute cost of one block (see the module docstring).

    ``previous``: the block before it in the plan, whose last unit may hold what it leaves alive
    through this block's first backward or let that block's backward free it; ``False``: the block
    starts at the first unit; ``None``: not known, the larger need is taken (that of a previous
    unit that holds it).

    Example:
        >>> profile = example_profile()
        >>> cost = block_cost(profile, Block("replay", 0, 1))
        >>> cost.forward_need_bytes, cost.backward_need_bytes, cost.delta_bytes, cost.cost
        (70, 330, 10, 2.0)
    """
    units = profile.units
    start, end = block.start, block.end
    if block.kind == "option":
        unit = units[start]
        option = unit.option(block.action or "")
        if option is None:
            raise ValueError(
                f"simulate: the profile has no measurement of {block.action!r} for {unit.fqn};"
                f" it has {[o.action for o in unit.options] or 'none'}. Profile with that option"
                " (remat.profile(..., options=[...]))."
            )
        outlives = option.retain_bytes - option.forward_only_bytes
        forward = _with_loss(
            profile, block, {f"forward of {unit.fqn}": option.forward_need_bytes}, outlives
        )
        fwd, fwd_where = _worst(forward)
        need = option.backward_need_bytes
        if need is not None and _previous_holds(profile, previous):
            need += option.backward_held_extra_bytes
        bwd, bwd_where = _worst({f"backward of {unit.fqn}": need})
        return BlockCost(
            forward_need_bytes=fwd,
            backward_need_bytes=bwd,
            delta_bytes=option.retain_bytes,
            persistent_delta_bytes=outlives - option.cache_bytes,
            cost=option.cost(profile.time_source),
            forward_where=fwd_where,
            backward_where=bwd_where,
        )
    if block.kind == "keep" or start == end:
        unit = units[start]
        keep = block.kind == "keep"
        delta = unit.keep_bytes if keep else unit.recompute_bytes
        only = unit.keep_forward_only_bytes if keep else unit.recompute_forward_only_bytes
        cached = unit.keep_cache_bytes if keep else unit.recompute_cache_bytes
        need = unit.forward_need_keep_bytes if keep else unit.forward_need_recompute_bytes
        fwd, fwd_where = _worst(
            _with_loss(profile, block, {f"forward of {unit.fqn}": need}, delta - only)
        )
        need = unit.backward_need_keep_bytes if keep else unit.backward_need_recompute_bytes
        if need is not None:
            need += _held(unit, block.kind, _previous_holds(profile, previous), False)
        bwd, bwd_where = _worst({f"backward of {unit.fqn}": need})
        cost = 0.0 if keep else unit.recompute_cost(profile.time_source)
        return BlockCost(
            forward_need_bytes=fwd,
            backward_need_bytes=bwd,
            delta_bytes=delta,
            persistent_delta_bytes=delta - only - cached,
            cost=cost,
            forward_where=fwd_where,
            backward_where=bwd_where,
        )
    # A segment. Forward: each unit runs as inside a segment; the segment stores its first input.
    # ``persistent``: what the segment holds in its backward (not autocast's cache, dead by then).
    forward: dict[str, float | None] = {}
    held = persistent = units[start].input_freed_bytes
    for j in range(start, end + 1):
        forward[f"forward of {units[j].fqn}"] = held + units[j].forward_need_inner_bytes
        held += units[j].inner_bytes
        if j < end:
            persistent += (
                units[j].inner_bytes
                - units[j].inner_forward_only_bytes
                - units[j].inner_cache_bytes
            )
    last = units[end]
    last_outlives = last.inner_bytes - last.inner_forward_only_bytes
    backward: dict[str, float | None] = {}
    cost_of = [units[j].recompute_cost(profile.time_source) for j in range(start, end + 1)]
    if block.kind == "nested":
        # Backward: the units before the last are replayed without autograd, keeping only their
        # outputs (the boundaries); then each unit is replayed alone before its backward, as if
        # recomputed, while every boundary stays stored.
        boundaries = 0
        for m in range(start, end):
            unit = units[m]
            if last.backward_start_recompute_bytes is not None:
                backward[f"replay of {unit.fqn}"] = (
                    persistent
                    + last.backward_start_recompute_bytes
                    + boundaries
                    + unit.forward_need_recompute_bytes
                )
            boundaries += unit.recompute_bytes - unit.recompute_cache_bytes
        # Each unit's input is a boundary the frame holds (or, for the first, the previous
        # block's output). The frame's state of each unit (a BatchNorm's counter) lives as long
        # as the frame, through every unit's backward: ``boundaries`` counts it for the units
        # before the last, the unit's own need for itself; the last's is added before it runs.
        for k in range(start, end + 1):
            need = units[k].backward_need_recompute_bytes
            if need is None:
                continue
            inner = k > start
            extra = _held(units[k], "replay", inner or _previous_holds(profile, previous), inner)
            frame = boundaries
            if k < end:
                frame += last.recompute_state_bytes - units[k].recompute_state_bytes
            split = units[k].backward_recompute_split_bytes
            # the frame dies with the first unit's checkpoint, as that unit's own did when it
            # was recomputed alone: its boundaries count only until then (where the split marks
            # that death, and the previous block does not hold the unit's input beyond it)
            marks_death = _split_marks_checkpoint(units, k) and not (
                k > 0 and _previous_holds(profile, previous)
            )
            if k == start < end and split is not None and marks_death:
                need = max(split[0] + frame, split[1])
            else:
                need += frame
            backward[f"backward of {units[k].fqn}"] = need + extra
        outlives = persistent + _cache(units, start, end - 1) + last_outlives
        fwd, fwd_where = _worst(_with_loss(profile, block, forward, outlives))
        bwd, bwd_where = _worst(backward)
        cost = 2 * sum(cost_of[:-1]) + cost_of[-1]
        return BlockCost(
            forward_need_bytes=fwd,
            backward_need_bytes=bwd,
            delta_bytes=held,
            persistent_delta_bytes=(
                persistent + last_outlives - last.inner_cache_bytes + _last_output(profile, end)
            ),
            cost=cost,
            forward_where=fwd_where,
            backward_where=bwd_where,
        )
    # Backward: the last unit's backward replays the whole segment, then each unit's backward runs
    # as if it had been kept. Replayed units hold what they would hold if kept; the checkpoint
    # holds its units' inputs that are not the unit before's output (``stored``: a skip's sum)
    # and its units' state, all until the first unit's backward ends.
    state = [units[j].recompute_state_bytes for j in range(start, end + 1)]
    stored = [units[j].recompute_released_between_bytes for j in range(start, end)]
    # The replay, at the last unit's backward: the checkpoint's input and what it holds, what
    # the last unit's backward had made when it started, and each replayed unit's call (all its
    # outputs stay referenced until the replay ends), and the replayed unit's forward.
    replaying = (
        units[start].input_freed_bytes
        + sum(stored)
        + sum(state[:-1])
        + (last.backward_start_recompute_bytes or 0)
    )
    for k in range(start, end + 1):
        unit = units[k]
        if last.backward_start_recompute_bytes is not None and unit.keep_call_bytes is not None:
            backward[f"replay of {unit.fqn}"] = (
                replaying + unit.buffer_bytes + unit.forward_excess_bytes
            )
            replaying += unit.keep_call_bytes - unit.keep_cache_bytes
    replayed = 0
    for k in range(start, end + 1):
        unit = units[k]
        if k < end and last.backward_start_recompute_bytes is not None:
            if unit.keep_call_bytes is None:  # older profiles
                backward[f"replay of {unit.fqn}"] = (
                    persistent
                    + last.backward_start_recompute_bytes
                    + replayed
                    + unit.forward_excess_bytes
                )
        need = last.backward_need_recompute_bytes if k == end else unit.backward_need_keep_bytes
        if need is not None:
            # the replayed unit before it holds what it made as a kept one does (the first
            # unit's input: as the previous block does); the checkpoint holds the parent's
            if k == start:
                holds = _previous_holds(profile, previous)
            else:
                holds = units[k - 1].keep_released_bytes == 0
            need += _held(unit, "replay" if k == end else "keep", holds, k > start)
            # what the checkpoint holds for the units after this one, and every unit's state
            # (the last unit's own is in its need), until the first unit's saved tensors die
            frame = sum(stored[k - start :]) + sum(state) - (state[-1] if k == end else 0)
            split = unit.backward_keep_split_bytes
            # (the split is where the checkpoint dies only if the unit's input dies there too,
            # the previous kept unit not holding it; otherwise the checkpoint is held throughout)
            marks_death = start == 0 or units[start - 1].keep_released_bytes > 0
            if k == start < end and split is not None and marks_death:
                extra = need - unit.backward_need_keep_bytes
                need = max(split[0] + frame, split[1]) + extra
            else:
                need += frame
            backward[f"backward of {unit.fqn}"] = replayed + need
        # (a replay's own autocast drops its cache when the replayed unit returns)
        replayed += unit.keep_bytes - unit.keep_forward_only_bytes - unit.keep_cache_bytes
    bwd, bwd_where = _worst(backward)
    cost = sum(cost_of)
    persistent_delta = (
        persistent + last_outlives - last.inner_cache_bytes + _last_output(profile, end)
    )
    # The inner figures come from one segment over every unit, where a skip tensor from an
    # earlier unit is internal and dies at its last use. A shorter segment whose inner unit takes
    # a skip from outside stores it (a checkpoint input), so it outlives the forward. What the
    # units retain recomputed one by one, less the boundaries between them that the segment does
    # not store, counts that; the block retains at least as much.
    if _takes_skip_from_outside(profile, start, end):
        one_by_one = sum(
            units[j].recompute_bytes
            - units[j].recompute_forward_only_bytes
            - units[j].recompute_cache_bytes
            for j in range(start, end + 1)
        ) - sum(min(units[j].output_bytes, units[j].recompute_bytes) for j in range(start, end))
        persistent_delta = max(persistent_delta, one_by_one)
    outlives = persistent_delta + _cache(units, start, end)
    fwd, fwd_where = _worst(_with_loss(profile, block, forward, outlives))
    return BlockCost(
        forward_need_bytes=fwd,
        backward_need_bytes=bwd,
        delta_bytes=held,
        persistent_delta_bytes=persistent_delta,
        cost=cost,
        forward_where=fwd_where,
        backward_where=bwd_where,
    )


def _previous_holds(profile: Profile, previous: Block | Literal[False] | None) -> bool:
    """Whether the previous block's last unit holds what it leaves alive until its own
    backward (the next unit's backward does not free it); not known (``None``): held, the larger
    need. A checkpoint does not hold its output, so segments count as recomputed."""
    if previous is False:
        return False
    if previous is None:
        return True
    unit = profile.units[previous.end]
    if previous.kind == "keep":
        return unit.keep_released_bytes == 0
    if previous.kind == "option":
        option = unit.option(previous.action or "")
        return option is None or option.released_bytes == 0
    return unit.recompute_released_bytes == 0


def _split_marks_checkpoint(units: Sequence[UnitProfile], k: int) -> bool:
    """Whether unit ``k``'s recomputed backward split (``backward_recompute_split_bytes``) is
    where its checkpoint died: something that checkpoint alone held died there (its state, or
    its input made by the unit before)."""
    if units[k].recompute_state_bytes > 0:
        return True
    before = units[k - 1] if k > 0 else None
    return before is not None and (
        before.recompute_released_bytes + before.recompute_released_between_bytes > 0
    )


def _held(unit: UnitProfile, kind: str, made: bool, between: bool) -> int:
    """What the unit's backward need (measured kept for ``kind`` ``keep``, else recomputed)
    lacks when what the unit before made (``made``) and what the parent made between them
    (``between``) stay alive through it (they died in it when measured, if at all)."""
    prefix = "backward_keep_held_" if kind == "keep" else "backward_recompute_held_"
    which = "both" if made and between else "made" if made else "between" if between else None
    return getattr(unit, f"{prefix}{which}_bytes") if which else 0


def _last_output(profile: Profile, end: int) -> int:
    """Bytes of a segment's last output (not the model's) that the next block may hold into the
    backward: the segment's figures come from one segment over every unit, where that output was
    the next unit's chained input and died with the forward (``inner_forward_only_bytes``). A
    segment's retention counts them, the larger; :func:`evaluate_blocks` takes them off where the
    next block does not hold them."""
    if end >= len(profile.units) - 1:
        return 0
    unit = profile.units[end]
    return min(unit.inner_forward_only_bytes, unit.output_bytes)


def _output_dropped_after_segment(profile: Profile, previous: Block, block: Block) -> int:
    """:func:`_last_output` of the segment before ``block``, if ``block`` does not store it."""
    if previous.kind not in ("replay", "nested") or previous.start == previous.end:
        return 0
    unit = profile.units[previous.end]
    if block.kind == "keep":
        holds = unit.keep_released_bytes > 0
    elif block.kind == "option" and not (block.action or "").startswith("selective"):
        option = unit.option(block.action or "")
        holds = option is not None and option.released_bytes > 0
    else:  # a checkpoint (recompute, segment, selective) stores its input, if that input is
        # this output (not a sum with a skip): as the next unit's checkpoint did in the run
        # where every unit was recomputed, where nothing else held it
        holds = unit.recompute_released_bytes > 0
    return 0 if holds else _last_output(profile, previous.end)


def _cache(units: Sequence[UnitProfile], start: int, end: int) -> int:
    """Autocast's cache that units ``start..end`` hold inside a segment (dies after the loss)."""
    return sum(units[j].inner_cache_bytes for j in range(start, end + 1))


def _with_loss(
    profile: Profile, block: Block, forward: dict[str, float | None], outlives_bytes: int
) -> dict[str, float | None]:
    """``forward`` with the loss, for the block that ends with the last unit under autocast
    whose cache a unit holds (``Profile.loss_need_bytes``): the block's retention that outlives
    the forward (``outlives_bytes``), autocast's cache included, plus the loss's need."""
    if profile.loss_need_bytes is None or block.end != len(profile.units) - 1:
        return forward
    return {**forward, "loss": outlives_bytes + profile.loss_need_bytes}


def _takes_skip_from_outside(profile: Profile, start: int, end: int) -> bool:
    """Whether a unit after the first of ``start..end`` reads a tensor that a unit before
    ``start`` made (``Profile.cross_unit``)."""
    if not profile.cross_unit:
        return False
    index = {fqn: i for i, fqn in enumerate(profile.unit_fqns)}
    return any(
        index.get(edge["from"], end) < start < index.get(edge["to"], -1) <= end
        for edge in profile.cross_unit
    )


def blocks_of(profile: Profile, plan: Plan) -> list[Block]:
    """The plan's blocks over the profile's units (raises ``ValueError`` for a plan that does not
    fit the profile: unknown selectors, non-consecutive segments)."""
    fqns = profile.unit_fqns
    actions = plan.resolve(fqns)
    extra = [fqn for fqn in actions if fqn not in fqns and actions[fqn].checkpoints]
    if extra:
        raise ValueError(
            f"simulate: the plan acts on modules that are not units of the profile: {extra[:3]};"
            " profile with units= that include them"
        )
    blocks: list[Block] = []
    index = 0
    while index < len(fqns):
        action = actions[fqns[index]]
        if action.kind == "keep":
            blocks.append(Block("keep", index, index))
            index += 1
        elif action.kind == "recompute":
            blocks.append(Block("replay", index, index))
            index += 1
        elif action.kind in ("selective", "offload"):
            blocks.append(Block("option", index, index, str(action)))
            index += 1
        else:
            end = index
            while end + 1 < len(fqns) and actions[fqns[end + 1]] == action:
                end += 1
            kind = "nested" if action.kind == "nested" and end > index else "replay"
            blocks.append(Block(kind, index, end))
            index = end + 1
    return blocks


@dataclass(frozen=True, kw_only=True)
class Simulation:
    """A plan's predicted peak and time."""

    peak_bytes: int
    where: str
    """The moment of the peak ("backward of blocks.3", "fixed": outside the units' reach)."""
    recompute_cost: float
    """Extra ms (or FLOPs when the profile has no times) spent recomputing."""
    step_ms: float | None
    """Predicted step time (``None`` without measured times)."""
    overhead: float | None
    """``step_ms`` over the unplanned step's; 1.0 means free."""


def evaluate_blocks(profile: Profile, blocks: Sequence[Block]) -> Simulation:
    """Simulate a sequence of blocks covering the units in order."""
    total = persistent = 0
    peak, where = profile.fixed_peak_bytes, "fixed"
    cost = 0.0
    for index, block in enumerate(blocks):
        bc = block_cost(profile, block, blocks[index - 1] if index else False)
        if index:
            persistent -= _output_dropped_after_segment(profile, blocks[index - 1], block)
        for value, at in (
            (total + bc.forward_need_bytes, bc.forward_where),
            (persistent + bc.backward_need_bytes, bc.backward_where),
        ):
            if profile.base_bytes + value > peak:
                peak, where = profile.base_bytes + value, at
        total += bc.delta_bytes
        persistent += bc.persistent_delta_bytes
        cost += bc.cost
    if profile.base_bytes + persistent + profile.end_need_bytes > peak:
        peak, where = profile.base_bytes + persistent + profile.end_need_bytes, "loss and head"
    step_ms = overhead = None
    if profile.time_source in TIMED_SOURCES and profile.step_ms:
        step_ms = profile.step_ms + cost
        overhead = step_ms / profile.step_ms
    return Simulation(
        peak_bytes=int(peak), where=where, recompute_cost=cost, step_ms=step_ms, overhead=overhead
    )


def simulate(profile: Profile, plan: Plan) -> Simulation:
    """Predict the peak and step time of ``plan`` from ``profile``.

    Example:
        >>> profile = example_profile()
        >>> none = simulate(profile, Plan())
        >>> full = simulate(profile, Plan(actions={"_default": "recompute"}))
        >>> none.peak_bytes, full.peak_bytes, full.overhead
        (1450, 1260, 1.5)
    """
    return evaluate_blocks(profile, blocks_of(profile, plan))


def example_profile(num_units: int = 4) -> Profile:
    """A small synthetic profile (1000 static bytes, identical units) for examples and tests."""
    units = [
        UnitProfile(
            fqn=f"b.{i}",
            keep_bytes=100,
            recompute_bytes=10,
            inner_bytes=0,
            input_freed_bytes=10,
            forward_need_keep_bytes=150,
            forward_need_recompute_bytes=60,
            forward_need_inner_bytes=60,
            forward_excess_bytes=140,
            backward_need_keep_bytes=120,
            backward_need_recompute_bytes=230,
            backward_start_recompute_bytes=20,
            forward_ms=1.0,
        )
        for i in range(num_units)
    ]
    return Profile(
        units=units,
        static_bytes=1000,
        base_bytes=1000,
        fixed_peak_bytes=1000,
        peak_bytes=1450,
        step_ms=8.0,
    )
