"""Will it fit, and with what plan? The largest batch or sequence length for a device, from shapes.

Consumes a model spec (a built-in name or ``package.module:factory`` whose factory takes ``batch=``
/ ``seq=``), a device from :mod:`remat.devices`, a dtype and a budget; produces a
:class:`FitResult`: the largest size whose least achievable peak (under the best plan the solver
finds) is within the budget, the plan and predicted step time at that size, and the least peak
under ``none``, ``full`` and the solver's plan at every size it tried.

The search never runs on real hardware and never tries an out-of-memory step: each size is built on
``meta`` and profiled in estimate mode (:mod:`remat.profiling.estimate`). Every probe costs the same
on ``meta`` whatever the size, so the search probes few sizes: the least peak is close to a line
in the size (piecewise linear: activations grow with batch and sequence length), so it follows the
line through two probed peaks to where it reaches the budget (regula falsi, Anderson-Bjorck
weighted, with geometric bisection as a fallback), growing eightfold while it has no line. The
answer ``n`` is always a probed size that fits with ``n + 1`` probed and shown not to fit; only the
number of probes depends on how straight the line is (about six for a transformer's sequence
length, where doubling and bisecting took about thirty). It assumes that the least peak grows with
the size, as it does for batch and sequence length.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from remat.cost.distributed import static_parts
from remat.cost.model import Profile, Simulation, simulate
from remat.devices import get_device
from remat.feedback import as_progress
from remat.plan import Plan
from remat.solve.baselines import baseline_plan
from remat.solve.budget import Budget
from remat.solve.solver import INFEASIBLE, SolveResult, solve
from remat.units import format_bytes

__all__ = [
    "AT_LIMIT",
    "FOUND",
    "NONE_FITS",
    "Breakdown",
    "FitResult",
    "SizePoint",
    "max_size",
    "memory_breakdown",
    "plot_breakdown",
]

logger = logging.getLogger(__name__)

FOUND = "FOUND"
"""``max_size`` fits and ``max_size + 1`` does not."""
NONE_FITS = "NONE_FITS"
"""Not even size 1 fits: ``max_size`` is ``None``."""
AT_LIMIT = "AT_LIMIT"
"""Every size up to ``limit`` (or the largest the model takes) fits; ``max_size`` is that limit."""
DIMENSIONS = ("batch", "seq")


@dataclass(frozen=True, kw_only=True)
class SizePoint:
    """The least peak at one size under ``none``, ``full`` and the solver's least-peak plan.

    Example:
        >>> SizePoint(size=8, fits=True, static_bytes=10, none_peak_bytes=50, full_peak_bytes=30,
        ...           min_peak_bytes=25).min_peak_bytes
        25
    """

    size: int
    fits: bool
    static_bytes: int
    none_peak_bytes: int
    full_peak_bytes: int | None
    min_peak_bytes: int
    """The least peak any plan reaches (the solver's ``min``)."""


@dataclass(frozen=True, kw_only=True)
class Breakdown:
    """Where the bytes of a step's peak go, for one plan (see :func:`memory_breakdown`).

    Example:
        >>> b = Breakdown(parameter_bytes=4, gradient_bytes=4, optimizer_state_bytes=8,
        ...               other_static_bytes=1, unit_activation_bytes={"b.0": (10, 2)},
        ...               transient_bytes=3, peak_bytes=22, unplanned_peak_bytes=30)
        >>> b.static_bytes, b.activation_bytes, b.saved_bytes
        (17, 2, 8)
    """

    parameter_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    other_static_bytes: int
    """Buffers and the example inputs."""
    unit_activation_bytes: dict[str, tuple[int, int]]
    """Per unit: (bytes it holds after its forward unplanned, bytes it holds under the plan)."""
    transient_bytes: int
    """The rest of the peak: activations outside the units (embeddings, head, loss) and
    temporaries at the peak moment."""
    peak_bytes: int
    """The plan's predicted peak."""
    unplanned_peak_bytes: int

    @property
    def static_bytes(self) -> int:
        return (
            self.parameter_bytes
            + self.gradient_bytes
            + self.optimizer_state_bytes
            + self.other_static_bytes
        )

    @property
    def activation_bytes(self) -> int:
        """Bytes the units hold under the plan."""
        return sum(planned for _, planned in self.unit_activation_bytes.values())

    @property
    def saved_bytes(self) -> int:
        """What the plan saved: the unplanned peak less the plan's."""
        return self.unplanned_peak_bytes - self.peak_bytes

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "parameter_bytes": self.parameter_bytes,
            "gradient_bytes": self.gradient_bytes,
            "optimizer_state_bytes": self.optimizer_state_bytes,
            "other_static_bytes": self.other_static_bytes,
            "static_bytes": self.static_bytes,
            "unit_activation_bytes": {
                fqn: {"unplanned": a, "planned": b}
                for fqn, (a, b) in self.unit_activation_bytes.items()
            },
            "activation_bytes": self.activation_bytes,
            "transient_bytes": self.transient_bytes,
            "peak_bytes": self.peak_bytes,
            "unplanned_peak_bytes": self.unplanned_peak_bytes,
            "saved_bytes": self.saved_bytes,
        }


@dataclass(frozen=True, kw_only=True)
class FitResult:
    """What :func:`max_size` found.

    Example:
        >>> FitResult(status=NONE_FITS, dim="batch", max_size=None, device="t4", dtype="float32",
        ...           budget_bytes=1).to_dict()["max_batch"] is None
        True
    """

    status: str
    """``FOUND``, ``NONE_FITS`` or ``AT_LIMIT``."""
    dim: str
    """``batch`` or ``seq``."""
    max_size: int | None
    device: str
    dtype: str
    budget_bytes: int
    profile: Profile | None = None
    """Estimate-mode profile at ``max_size``, with roofline times."""
    solved: SolveResult | None = None
    """The solver's plan for the budget at ``max_size``."""
    table: list[SizePoint] = field(default_factory=list)
    """Every size tried, ascending."""
    breakdown: Breakdown | None = None
    world_size: int = 1
    """The data-parallel ranks the figures are for: every byte is one rank's."""
    fsdp: bool = False
    """Whether the ranks shard parameters, gradients and optimizer state (FSDP2) or not (DDP)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``max_batch`` or ``max_seq`` holds ``max_size``."""
        solved = self.solved
        return {
            "format_version": 1,
            "status": self.status,
            f"max_{self.dim}": self.max_size,
            "device": self.device,
            "dtype": self.dtype,
            "world_size": self.world_size,
            "fsdp": self.fsdp,
            "budget_bytes": self.budget_bytes,
            "predicted_peak_bytes": solved.predicted_peak_bytes if solved else None,
            "predicted_step_ms": solved.predicted_step_ms if solved else None,
            "predicted_overhead": solved.predicted_overhead if solved else None,
            "plan": solved.plan.to_dict() if solved else None,
            "kernels": list(self.profile.kernels) if self.profile else [],
            "table": [vars(point) for point in self.table],
            "breakdown": self.breakdown.to_dict() if self.breakdown else None,
        }


def memory_breakdown(profile: Profile, plan: Plan) -> Breakdown:
    """Split the plan's predicted peak into static memory, each unit's activations and the rest.

    The parameters, gradients and optimizer state are one rank's, from the profile's parameter
    records and its ``world_size`` and ``fsdp`` (:func:`remat.cost.distributed.static_parts`).

    Args:
        profile: the step's profile.
        plan: the plan (``Plan()`` for none).

    Example:
        >>> from remat.cost.model import example_profile
        >>> prof = example_profile()
        >>> prof.optimizer = "adamw"
        >>> prof.parameters = [{"owner": "", "dim0": 50, "row_bytes": 4, "trainable": True}]
        >>> b = memory_breakdown(prof, Plan(actions={"_default": "recompute"}))
        >>> b.parameter_bytes, b.gradient_bytes, b.optimizer_state_bytes, b.other_static_bytes
        (200, 200, 400, 200)
        >>> b.static_bytes, b.unit_activation_bytes["b.0"], b.peak_bytes, b.saved_bytes
        (1000, (100, 10), 1260, 190)
    """
    sim: Simulation = simulate(profile, plan)
    unplanned = simulate(profile, Plan()).peak_bytes
    actions = plan.resolve(profile.unit_fqns)
    units: dict[str, tuple[int, int]] = {}
    for unit in profile.units:
        kind = actions[unit.fqn].kind
        planned = (
            unit.keep_bytes
            if kind == "keep"
            else unit.recompute_bytes
            if kind == "recompute"
            else unit.inner_bytes
        )
        units[unit.fqn] = (unit.keep_bytes, planned)
    parameter_bytes, gradient, state = static_parts(profile)
    other = max(profile.static_bytes - parameter_bytes - gradient - state, 0)
    activations = sum(planned for _, planned in units.values())
    return Breakdown(
        parameter_bytes=parameter_bytes,
        gradient_bytes=gradient,
        optimizer_state_bytes=state,
        other_static_bytes=other,
        unit_activation_bytes=units,
        transient_bytes=max(sim.peak_bytes - profile.static_bytes - activations, 0),
        peak_bytes=sim.peak_bytes,
        unplanned_peak_bytes=unplanned,
    )


def plot_breakdown(
    breakdown: Breakdown, path: str, *, title: str = "", budget_bytes: int = 0
) -> str:
    """Write a PNG bar chart of the breakdown: unplanned and planned, stacked by category.

    Raises:
        ImportError: matplotlib is missing (install the ``plot`` extra: ``pip install remat[plot]``).

    Example:
        >>> import os, tempfile
        >>> b = Breakdown(parameter_bytes=4, gradient_bytes=4, optimizer_state_bytes=8,
        ...               other_static_bytes=1, unit_activation_bytes={"b.0": (10, 2)},
        ...               transient_bytes=3, peak_bytes=22, unplanned_peak_bytes=30)
        >>> path = plot_breakdown(b, os.path.join(tempfile.mkdtemp(), "b.png"))
        >>> os.path.getsize(path) > 0
        True
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "plot_breakdown needs matplotlib: install the plot extra (pip install 'remat[plot]')"
        ) from None
    gib = 2**30
    unplanned_act = sum(a for a, _ in breakdown.unit_activation_bytes.values())
    unplanned_rest = max(breakdown.unplanned_peak_bytes - breakdown.static_bytes - unplanned_act, 0)
    layers = [
        ("parameters", breakdown.parameter_bytes, breakdown.parameter_bytes),
        ("gradients", breakdown.gradient_bytes, breakdown.gradient_bytes),
        ("optimizer state", breakdown.optimizer_state_bytes, breakdown.optimizer_state_bytes),
        ("buffers and inputs", breakdown.other_static_bytes, breakdown.other_static_bytes),
        ("unit activations", unplanned_act, breakdown.activation_bytes),
        ("transients and other", unplanned_rest, breakdown.transient_bytes),
    ]
    figure, axes = plt.subplots(figsize=(6, 4.5))
    bottoms = [0.0, 0.0]
    for label, unplanned, planned in layers:
        heights = [unplanned / gib, planned / gib]
        axes.bar(["no plan", "plan"], heights, bottom=bottoms, label=label)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    if budget_bytes:
        axes.axhline(budget_bytes / gib, color="black", linestyle="--", label="budget")
    axes.set_ylabel("GiB at the peak")
    axes.set_title(title or "memory at the step's peak")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


GROWTH = 8
"""How much the search grows the size while it has no line to follow (one probe, or a flat one)."""


@dataclass
class _Search:
    """Which size to probe next: the largest that fits is ``low``, the least that does not ``high``.

    Within a bracket it steps to where the chord between the ends reaches the budget (regula falsi;
    an end kept twice has its excess scaled, Anderson-Bjorck), bisecting geometrically when three
    steps did not halve the bracket; before one, it extrapolates the line through the two largest
    sizes that fit (at least doubling once that has fallen short twice), else it grows by
    ``GROWTH``. A step is never outside the bracket, so the answer is exact whatever the line.
    """

    budget_bytes: int
    limit: int
    peaks: dict[int, int] = field(default_factory=dict)
    low: int = 0
    high: int | None = None
    excess: dict[str, float] = field(default_factory=dict)
    """``peak - budget`` at ``low`` and ``high``, scaled while that end is kept (Anderson-Bjorck)."""
    side: str = ""
    guided: bool = False
    """Whether the last size came from a line."""
    short: int = 0
    """How many sizes in a row a line gave that fit (it fell short of the crossing)."""
    widths: list[int] = field(default_factory=list)
    checked: bool = False
    """Whether the last size was next to an end of the bracket."""

    def done(self) -> bool:
        return self.high - self.low <= 1 if self.high is not None else self.low >= self.limit

    def next_size(self) -> int:
        low, high = self.low, self.high
        if high is None:
            fitting = sorted(self.peaks)
            line = (
                _crossing(
                    fitting[-2], self.peaks[fitting[-2]], low, self.peaks[low], self.budget_bytes
                )
                if len(fitting) > 1
                else None
            )
            size = low * GROWTH if line is None else math.floor(line)
            if self.short >= 2:
                size = max(size, 2 * low)  # the line keeps falling short
            self.guided = line is not None
            return min(max(size, low + 1), self.limit)
        f_low, f_high = self.excess["low"], self.excess["high"]
        size = min(
            max(math.floor(low - f_low * (high - low) / (f_high - f_low)), low + 1), high - 1
        )
        stalled = len(self.widths) >= 3 and self.widths[-1] > self.widths[-3] / 2
        next_to_end = size in (low + 1, high - 1)  # checks a crossing the line puts at an end
        if stalled and (not next_to_end or self.checked):
            size = min(max(math.isqrt(low * high), low + 1), high - 1)
        self.checked = size in (low + 1, high - 1)
        return size

    def record(self, size: int, peak_bytes: int) -> bool:
        """Note the least peak at ``size``; whether it fits."""
        self.peaks[size] = peak_bytes
        fits = peak_bytes <= self.budget_bytes
        side = "low" if fits else "high"
        excess = float(peak_bytes - self.budget_bytes)
        if self.high is not None and side == self.side:  # the other end is kept again
            kept = "high" if fits else "low"
            ratio = 1 - excess / self.excess[side] if self.excess[side] else 0.0
            self.excess[kept] *= ratio if ratio > 0 else 0.5
        self.short = self.short + 1 if fits and self.guided else 0
        self.side = side
        self.excess[side] = excess
        if fits:
            self.low = size
        else:
            self.high = size
        if self.high is not None:
            self.widths.append(self.high - self.low)
        return fits


class _TooLarge(Exception):
    """The model spec refuses this size (it is more than the model takes)."""


def _largest_buildable(build: Callable[[int], Any], low: int, high: int) -> int:
    """The largest size in ``[low, high)`` that ``build`` accepts, ``low`` accepted and ``high``
    refused (a binary search: a refusal costs no profile)."""
    while high - low > 1:
        middle = (low + high) // 2
        try:
            build(middle)
        except _TooLarge:
            high = middle
        else:
            low = middle
    return low


def _crossing(s1: int, v1: int, s2: int, v2: int, budget_bytes: int) -> float | None:
    """Where the line through ``(s1, v1)`` and ``(s2, v2)`` reaches the budget (None if flat)."""
    if s2 <= s1 or v2 <= v1:
        return None
    return s1 + (budget_bytes - v1) * (s2 - s1) / (v2 - v1)


def max_size(
    model: str,
    *,
    device: str,
    dim: str = "batch",
    dtype: str | None = None,
    budget: str | int | Budget = "device",
    optimizer: str = "adamw",
    overrides: Mapping[str, Any] | None = None,
    batch: int | None = None,
    seq: int | None = None,
    units: Any = None,
    attention: str = "auto",
    world_size: int = 1,
    fsdp: bool = False,
    accumulation_steps: int = 1,
    capacity_bytes: int | None = None,
    start: int = 1,
    limit: int = 1 << 20,
    progress: bool | Callable[[str], None] | None = None,
) -> FitResult:
    """The largest ``batch`` (or ``seq``) whose best plan fits ``budget`` on ``device``.

    Args:
        model: a built-in name or ``package.module:factory`` taking ``batch=`` / ``seq=``.
        device: a name from :mod:`remat.devices`.
        dim: ``batch`` or ``seq``: the size searched; the other is ``batch`` / ``seq`` (or the
            factory's default).
        dtype: parameters' and inputs' dtype (``bfloat16``, ...; default: the factory's).
        budget: ``device`` (capacity less the reserve), ``device:NAME`` or a size.
        optimizer, units, attention: as :func:`remat.profile`.
        world_size, fsdp: search for one of ``world_size`` data-parallel ranks under DDP or FSDP2
            (as :func:`remat.profile`): ``batch`` is then one rank's batch, and every size is
            judged by one rank's peak (sharded parameters, gradients and optimizer state under
            FSDP2).
        accumulation_steps, capacity_bytes: the step's gradient accumulation and simulated
            capacity (see :class:`remat.Step`).
        overrides: more factory arguments (``n_layer``, ``d_model``, ...).
        start, limit: the first size tried and the largest considered. A size the model refuses
            (``load_model`` raises ``ValueError``, as for a sequence longer than a transformers
            model's ``max_position_embeddings``) lowers the limit to the largest it takes.
        progress: a line of text per size tried: logged (``None``), on stderr (``True``; the
            CLI's choice) or to a callable (:func:`remat.feedback.as_progress`).

    Returns:
        A :class:`FitResult`; status ``NONE_FITS`` when size ``start`` does not fit.

    Raises:
        NotEstimableError: the model runs data-dependent ops (no shape-only form).
        ValueError: an unknown device or dimension, a budget that depends on the profile, a
            ``world_size`` that is not an integer >= 1.

    Example:
        >>> result = max_size("mlp", device="cpu", budget="4MiB", optimizer="sgd",
        ...                   overrides={"n_blocks": 2, "width": 128})
        >>> fits = {point.size: point.fits for point in result.table}
        >>> result.status, fits[result.max_size], fits[result.max_size + 1]
        ('FOUND', True, False)
        >>> result.solved.predicted_peak_bytes <= result.budget_bytes
        True
    """
    from remat.auto import plan_step, profile_step
    from remat.models.spec import load_model
    from remat.profiling.meta_target import roofline_times
    from remat.profiling.step import Step

    if dim not in DIMENSIONS:
        raise ValueError(f"dim: got {dim!r}; expected one of {', '.join(DIMENSIONS)}")
    spec = get_device(device)
    parsed = Budget.parse(budget)
    if parsed.kind not in ("bytes", "device"):
        raise ValueError(
            f"budget: got {parsed.text!r}, which depends on each size's profile; expected a size"
            " (22GiB) or device, which stay the same as the size changes"
        )
    budget_bytes = parsed.resolve(peak_bytes=0, device=spec.name)
    say = as_progress(progress)
    points: dict[int, SizePoint] = {}
    sizes = {"batch": batch, "seq": seq}

    def build(size: int) -> Any:
        try:
            return load_model(
                model, device="meta", dtype=dtype, **{**sizes, dim: size}, overrides=overrides
            )
        except ValueError as error:  # beyond what the model takes (its longest sequence, ...)
            if size == start:
                raise
            raise _TooLarge(str(error)) from error

    profiles: dict[int, Profile] = {}
    steps: dict[int, Step] = {}

    def probe(size: int) -> bool:
        built = build(size)
        step = Step(
            built.model,
            built.example_inputs,
            loss_fn=built.loss_fn,
            optimizer=optimizer,
            units=units,
            world_size=world_size,
            fsdp=fsdp,
            accumulation_steps=accumulation_steps,
            capacity_bytes=capacity_bytes,
            target=spec.name,
            attention=attention,
        )
        prof = profile_step(step, timing=False)
        steps[size] = step
        profiles[size] = prof
        least = solve(prof, "min")
        point = SizePoint(
            size=size,
            fits=least.min_peak_bytes <= budget_bytes,
            static_bytes=prof.static_bytes,
            none_peak_bytes=prof.peak_bytes,
            full_peak_bytes=prof.full_peak_bytes,
            min_peak_bytes=least.min_peak_bytes,
        )
        points[size] = point
        say(
            f"fit: {dim} {size}: least peak {format_bytes(point.min_peak_bytes)}"
            f" ({'fits' if point.fits else 'does not fit'} {format_bytes(budget_bytes)})"
        )
        return point.fits

    dtype_name = str(dtype or "as built")
    if not probe(start):
        return FitResult(
            status=NONE_FITS,
            dim=dim,
            max_size=None,
            device=spec.name,
            dtype=dtype_name,
            budget_bytes=budget_bytes,
            table=sorted(points.values(), key=lambda p: p.size),
            world_size=world_size,
            fsdp=fsdp,
        )
    search = _Search(budget_bytes=budget_bytes, limit=limit, low=start)
    search.record(start, points[start].min_peak_bytes)
    while not search.done():
        size = search.next_size()
        try:
            probe(size)
        except _TooLarge as error:
            search.limit = _largest_buildable(build, search.low, size)
            say(f"fit: {dim} {size}: {error}; searching up to {search.limit}")
            continue
        search.record(size, points[size].min_peak_bytes)
    low, high = search.low, search.high
    say(f"fit: {dim} {low}: solving with roofline times on {spec.name}")
    built = build(low)  # the probe's profile, with times from one roofline step
    prof = roofline_times(
        profiles[low],
        built.model,
        built.example_inputs,
        device=spec,
        attention=attention,
        loss_fn=built.loss_fn,
        optimizer=optimizer,
    )
    solved = plan_step(steps[low], budget_bytes, measure=False, profile_=prof).result
    assert solved.status != INFEASIBLE, "the probe found a plan that fits at this size"
    breakdown = memory_breakdown(prof, solved.plan)
    return FitResult(
        status=FOUND if high is not None else AT_LIMIT,
        dim=dim,
        max_size=low,
        device=spec.name,
        dtype=prof.dtype,
        budget_bytes=budget_bytes,
        profile=prof,
        solved=solved,
        table=sorted(points.values(), key=lambda p: p.size),
        breakdown=breakdown,
        world_size=world_size,
        fsdp=fsdp,
    )


def baseline_peaks(profile: Profile) -> dict[str, int]:
    """Predicted peaks of ``none`` and ``full`` (what the table shows beside the solver's).

    Example:
        >>> from remat.cost.model import example_profile
        >>> baseline_peaks(example_profile())
        {'none': 1450, 'full': 1260}
    """
    return {
        name: simulate(profile, baseline_plan(name, profile.unit_fqns)).peak_bytes
        for name in ("none", "full")
    }
