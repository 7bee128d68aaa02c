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

Time: recomputing a unit costs its forward time (``forward_ms``, medians of measured steps), or its
forward FLOPs where no time was measured (``meta``). Imports no torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from remat.plan import Plan

__all__ = [
    "FORMAT_VERSION",
    "Block",
    "BlockCost",
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


@dataclass(kw_only=True)
class UnitProfile:
    """One unit's measurements (bytes are live tensor storage; see the module docstring)."""

    fqn: str
    class_name: str = ""
    input_bytes: int = 0
    """Bytes of the unit's input tensors (what a checkpoint of it stores)."""
    output_bytes: int = 0
    saved_bytes: int = 0
    """Activation bytes the unit keeps for backward besides its outputs."""
    keep_bytes: int = 0
    """Retention after its forward when kept."""
    recompute_bytes: int = 0
    """Retention after its forward when recomputed."""
    skip_outputs: list[list[int]] = field(default_factory=list)
    """[index of the last unit that reads it, bytes] for each output that a later, non-adjacent
    unit reads (skip connections): the parent holds it for that unit, so a segment that ends
    before the reader cannot drop it."""

    def skip_bytes(self, beyond: int) -> int:
        """Bytes of skip outputs read by a unit after index ``beyond``."""
        return sum(nbytes for reader, nbytes in self.skip_outputs if reader > beyond)

    forward_need_keep_bytes: int = 0
    forward_need_recompute_bytes: int = 0
    gap_need_bytes: int = 0
    """Need of the interval after its forward (parent code, or the head and loss after the last
    unit), relative to the retention of the units up to and including this one."""
    backward_need_keep_bytes: int = 0
    backward_need_recompute_bytes: int = 0
    backward_start_recompute_bytes: int = 0
    """Live bytes when its backward starts under recompute, less the earlier units' retention."""
    forward_excess_bytes: int = 0
    """Largest rise of live bytes during its forward (what replaying it needs on top)."""
    forward_ms: float | None = None
    backward_ms: float | None = None
    forward_flops: int = 0
    backward_flops: int = 0

    def recompute_cost(self, time_source: str) -> float:
        """What recomputing this unit costs: ms, or FLOPs when no time was measured."""
        if time_source == "measured" and self.forward_ms is not None:
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
    fixed_peak_bytes: int
    """Largest live total in parts of the step no plan changes (before the first unit, the
    optimizer step)."""
    peak_bytes: int
    """Measured peak of the step with no plan."""
    full_peak_bytes: int | None = None
    """Measured peak of the step with every unit recomputed."""
    step_ms: float | None = None
    """Median measured step time with no plan."""
    time_source: str = "measured"
    """``measured`` (ms) or ``flops`` (no times: costs are forward FLOPs)."""
    model_class: str = ""
    device: str = ""
    dtype: str = ""
    optimizer: str = ""
    torch_version: str = ""
    fingerprint: dict[str, Any] | None = None
    cross_unit: list[dict[str, Any]] = field(default_factory=list)
    """Tensors that live across non-adjacent units (skip connections): from, to, bytes."""
    notes: list[str] = field(default_factory=list)

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
        unit_names = {f.name for f in fields(UnitProfile)}
        try:
            units = [
                UnitProfile(**{k: v for k, v in unit.items() if k in unit_names})
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
    """A run of the plan: ``keep`` (one unit) or ``replay`` (units ``start..end`` checkpointed
    together; ``start == end`` is plain recompute)."""

    kind: str
    start: int
    end: int

    def describe(self, fqns: Sequence[str]) -> str:
        if self.kind == "keep":
            return f"keep {fqns[self.start]}"
        if self.start == self.end:
            return f"recompute {fqns[self.start]}"
        return f"segment {fqns[self.start]}..{fqns[self.end]}"


@dataclass(frozen=True, kw_only=True)
class BlockCost:
    """A block as the solver sees it: live total ``retention_before + need_bytes`` at its worst
    moment, ``delta_bytes`` more retained after it, ``cost`` to recompute it."""

    need_bytes: int
    delta_bytes: int
    cost: float
    where: str


def block_cost(profile: Profile, block: Block) -> BlockCost:
    """The need, retention and recompute cost of one block (see the module docstring)."""
    units = profile.units
    if block.kind == "keep":
        unit = units[block.start]
        candidates = {
            f"forward of {unit.fqn}": unit.forward_need_keep_bytes,
            f"backward of {unit.fqn}": unit.backward_need_keep_bytes,
            f"after {unit.fqn}": unit.keep_bytes + unit.gap_need_bytes,
        }
        where = max(candidates, key=candidates.__getitem__)
        return BlockCost(
            need_bytes=candidates[where], delta_bytes=unit.keep_bytes, cost=0.0, where=where
        )
    start, end = block.start, block.end
    candidates: dict[str, int] = {}
    # Outputs of the segment's units that the parent holds for units after the segment.
    skipped = sum(units[j].skip_bytes(end) for j in range(start, end))
    for j in range(start, end + 1):
        unit = units[j]
        before = units[j - 1].recompute_bytes if j > start else 0
        held = sum(units[t].skip_bytes(end) for t in range(start, max(j - 1, start)))
        candidates[f"forward of {unit.fqn}"] = held + before + unit.forward_need_recompute_bytes
        if j < end:
            held = sum(units[t].skip_bytes(end) for t in range(start, j))
            candidates[f"after {unit.fqn}"] = held + unit.recompute_bytes + unit.gap_need_bytes
    last = units[end]
    candidates[f"after {last.fqn}"] = skipped + last.recompute_bytes + last.gap_need_bytes
    replayed = 0  # keep-retention of the segment's units replayed so far
    for k in range(start, end):
        unit = units[k]
        candidates[f"replay of {unit.fqn}"] = (
            skipped + last.backward_start_recompute_bytes + replayed + unit.forward_excess_bytes
        )
        replayed += unit.keep_bytes
    candidates[f"backward of {last.fqn}"] = skipped + replayed + last.backward_need_recompute_bytes
    replayed = 0
    for k in range(start, end):
        unit = units[k]
        candidates[f"backward of {unit.fqn}"] = max(
            candidates.get(f"backward of {unit.fqn}", -math.inf),
            replayed + unit.backward_need_keep_bytes + _skips_after(units, k, end),
        )
        replayed += unit.keep_bytes
    where = max(candidates, key=candidates.__getitem__)
    cost = sum(units[j].recompute_cost(profile.time_source) for j in range(start, end + 1))
    return BlockCost(
        need_bytes=int(candidates[where]),
        delta_bytes=skipped + last.recompute_bytes,
        cost=cost,
        where=where,
    )


def _skips_after(units: Sequence[UnitProfile], k: int, end: int) -> int:
    """Skip outputs of the segment's units k+1..end-1, still held while unit k runs backward."""
    return sum(units[j].skip_bytes(end) for j in range(k + 1, end))


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
        else:
            end = index
            while end + 1 < len(fqns) and actions[fqns[end + 1]] == action:
                end += 1
            blocks.append(Block("replay", index, end))
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
    retention = 0
    peak, where = profile.fixed_peak_bytes, "fixed"
    cost = 0.0
    for block in blocks:
        bc = block_cost(profile, block)
        if retention + bc.need_bytes > peak:
            peak, where = retention + bc.need_bytes, bc.where
        retention += bc.delta_bytes
        cost += bc.cost
    step_ms = overhead = None
    if profile.time_source == "measured" and profile.step_ms:
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
            forward_need_keep_bytes=1150,
            forward_need_recompute_bytes=1150,
            gap_need_bytes=1020,
            backward_need_keep_bytes=1120,
            backward_need_recompute_bytes=1230,
            backward_start_recompute_bytes=1020,
            forward_excess_bytes=50,
            forward_ms=1.0,
        )
        for i in range(num_units)
    ]
    return Profile(
        units=units, static_bytes=1000, fixed_peak_bytes=1000, peak_bytes=1450, step_ms=8.0
    )
