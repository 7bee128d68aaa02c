"""What the profiler measures for the actions finer than recompute: ``selective`` and ``offload``.

- :func:`time_unit_ops` runs one forward and times (and counts the FLOPs of) every op of every unit,
  numbered as the selective engine numbers them (overload and call index within the unit call);
- :func:`kept_by_policy` runs one forward under a ``selective`` plan and reports, per unit, which
  ops' outputs it kept and their bytes;
- :func:`save_set_candidates` turns those into the save sets worth measuring: from keeping every
  op, drop the op name whose outputs free the most bytes for the least replay time, the replay
  walked through the unit's :class:`~remat.apply.selective.ReplayGraph`, and take the sets at
  fractions of what could be freed; ops are named by device-independent family
  (:mod:`remat.opnames`), so a save set found on one device keeps the same tensors on another;
- :func:`copy_bandwidth` measures the host link (CUDA: pinned host to device) or, on the CPU, a
  memory copy, for the cost of ``offload``.

The profiler then measures each option with a tracked step (every unit under it), exactly as it
measures ``full``, so a plan's predicted peak is as exact with these actions as without.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from remat._compat import TorchDispatchMode, flop_formula, tree_map
from remat.apply.apply import apply_
from remat.apply.selective import ReplayGraph, replayed_by, save_name
from remat.apply.units import call_model, tensors_in
from remat.plan import Plan

__all__ = [
    "EngineCost",
    "UnitEngine",
    "copy_bandwidth",
    "engine_cost",
    "kept_by_policy",
    "save_set_candidates",
    "time_unit_engines",
    "time_unit_ops",
]

logger = logging.getLogger(__name__)
OpKey = tuple[Any, int]
TIE_TOLERANCE = 0.08
"""Op names whose replay times per byte freed differ by less than this fraction of the dearest
name's are a tie for :func:`save_set_candidates` (dropped together): the times of small ops (a
residual add, a GELU, a layer norm, about a millisecond a block) differ by 10-50% between two
profiles on a shared machine, and a save set that followed their order would change the plan.
Relative to the dearest, not to each other: two cheap ops half as dear as each other differ by
noise, two dear ones by a real difference."""
TIE_SPAN = 2.5
"""A tie never spans more than this factor from its cheapest name's price: beside one dear op (a
convolution) every other op is cheap by :data:`TIE_TOLERANCE`, and without a cap they would all go
in one step, leaving no save set for the units that run them (an attention block beside conv
blocks)."""


class _OpTimer(TorchDispatchMode):
    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.unit: int | None = None
        self.counter: dict[Any, int] = defaultdict(int)
        self.ops: dict[int, dict[OpKey, tuple[float, int]]] = defaultdict(dict)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        timed = self.device.type in ("cpu", "cuda")
        if timed and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        out = func(*args, **kwargs)
        if timed and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed_ms = (time.perf_counter() - start) * 1e3 if timed else 0.0
        if self.unit is not None:
            key = (func, self.counter[func])
            self.counter[func] += 1
            formula = flop_formula(func)
            flops = 0
            if formula is not None:
                try:
                    flops = int(formula(*args, **kwargs, out_val=out))
                except Exception:
                    flops = 0
            self.ops[self.unit][key] = (elapsed_ms, flops)
        return out


def time_unit_ops(
    model: nn.Module,
    example_inputs: Any,
    unit_modules: Sequence[nn.Module],
    *,
    repeats: int = 3,
) -> list[dict[OpKey, tuple[float, int]]]:
    """Per unit, per op (overload, call index in the unit): (ms, FLOPs), the least time over
    ``repeats`` forwards after one warm-up forward.

    The least, not the median: what else runs on the machine only ever adds time to an op, and
    the first forward pays for allocations and caches the others do not. Save sets are chosen
    from these times, and a save set that changed with the machine's load would change the plan
    from run to run.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> ops = time_unit_ops(model, (torch.randn(2, 4),), [model[0]])
        >>> sorted(save_name(key[0]) for key in ops[0])
        ['addmm', 't']
    """
    if repeats < 1:
        raise ValueError(f"time_unit_ops: repeats got {repeats}; expected 1 or more")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type not in ("cpu", "cuda"):  # nothing runs (meta): one forward gives the FLOPs
        return _time_forward(model, example_inputs, unit_modules, device)
    runs = [_time_forward(model, example_inputs, unit_modules, device) for _ in range(1 + repeats)]
    least: list[dict[OpKey, tuple[float, int]]] = []
    for index, unit in enumerate(runs[-1]):
        samples = [run[index] for run in runs[1:]]
        least.append(
            {
                key: (min(s[key][0] for s in samples if key in s), flops)
                for key, (_, flops) in unit.items()
            }
        )
    return least


def _time_forward(
    model: nn.Module, example_inputs: Any, unit_modules: Sequence[nn.Module], device: torch.device
) -> list[dict[OpKey, tuple[float, int]]]:
    """One forward under the op timer: per unit, per op, (ms, FLOPs)."""
    timer = _OpTimer(device)
    handles = []
    for index, module in enumerate(unit_modules):

        def pre(_module: nn.Module, _args: Any, index: int = index) -> None:
            timer.unit = index
            timer.counter.clear()

        def post(_module: nn.Module, _args: Any, _out: Any) -> None:
            timer.unit = None

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with timer:
            call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return [timer.ops.get(i, {}) for i in range(len(unit_modules))]


def kept_by_policy(
    model: nn.Module,
    example_inputs: Any,
    unit_fqns: Sequence[str],
    policy: str,
    *,
    graphs: list[ReplayGraph] | None = None,
) -> list[dict[OpKey, int]]:
    """Per unit, the ops whose outputs ``selective:<policy>`` keeps in one forward, and their bytes.

    ``graphs``, if given, is filled with each unit's :class:`ReplayGraph` (with, per kept op,
    the ops keeping it covers: for a tensor filled in place, such as dropout's mask, also the ops
    that made and filled it).

    Example:
        >>> import torch
        >>> block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
        >>> model = torch.nn.Sequential(block)
        >>> kept = kept_by_policy(model, (torch.randn(2, 4),), ["0"], "ops.addmm.gelu")
        >>> [(save_name(key[0]), nbytes) for key, nbytes in kept[0].items()]  # GELU saves its input
        [('addmm', 32)]
    """
    plan = Plan(actions=dict.fromkeys(unit_fqns, f"selective:{policy}"), units=list(unit_fqns))
    modules = dict(model.named_modules())
    with apply_(model, plan):
        call_model(model, example_inputs)
        regions = [modules[fqn].__dict__["forward"].__remat_region__ for fqn in unit_fqns]
        if graphs is not None:
            graphs[:] = [region.last_graph for region in regions]
        return [dict(region.last_kept_bytes) for region in regions]


def save_set_candidates(
    op_times: Sequence[dict[OpKey, tuple[float, int]]],
    graphs: Sequence[ReplayGraph],
    *,
    count: int = 2,
    time_source: str = "measured",
) -> list[str]:
    """``selective`` policies (``ops.<op>...``) worth measuring, from each unit's replay graph
    (:func:`kept_by_policy` with every op named), their ops named by device-independent family
    (:func:`~remat.apply.selective.save_name`: ``attention``, not the CPU's flash kernel, so the
    plan means the same on CUDA): starting from keeping every op, drop the op name
    whose outputs free the most bytes for the least replay time added, where the replay time is
    that of every op the replay must then run (:func:`~remat.apply.selective.replayed_by`: a
    norm's saved input may need the residual stream, and with it the attention output, run
    again). Names whose prices per byte are within :data:`TIE_TOLERANCE` of the dearest name's
    of each other, chained from the cheapest and at most :data:`TIE_SPAN` times its price, are a
    tie and are dropped together. Every set the
    walk passes through is returned if there are at most ``count``; else the sets where the
    freed bytes first reach 1/(count+1), 2/(count+1)... of all.

    Example:
        >>> from remat.apply.selective import ReplayGraph
        >>> mm, gelu, add = ("mm", 0), ("gelu", 0), ("add", 0)
        >>> # add's output and gelu's are saved; add reads mm's, which nothing saves
        >>> graph = ReplayGraph(deps={add: frozenset({mm})}, always=frozenset(),
        ...     forced=frozenset(), kept_bytes={gelu: 400, add: 400},
        ...     covers={gelu: (gelu,), add: (add,)})
        >>> times = [{mm: (5.0, 0), gelu: (1.0, 0), add: (0.1, 0)}]
        >>> save_set_candidates(times, [graph], count=1)  # replaying add means mm too: keep it
        ['ops.add']
    """

    def cost(unit_times: dict[OpKey, tuple[float, int]], key: OpKey) -> tuple[float, int]:
        ms, flops = unit_times.get(key, (0.0, 0))
        return (ms if time_source == "measured" else float(flops)), flops

    names = {save_name(key[0]) for graph in graphs for key in graph.kept_bytes}

    def evaluate(chosen: set[str]) -> tuple[float, int, int]:
        replay, replay_flops, kept = 0.0, 0, 0
        for unit_times, graph in zip(op_times, graphs, strict=True):
            for key in replayed_by(graph, chosen):
                ms, flops = cost(unit_times, key)
                replay, replay_flops = replay + ms, replay_flops + flops
            kept += sum(b for key, b in graph.kept_bytes.items() if save_name(key[0]) in chosen)
        return replay, replay_flops, kept

    chosen = set(names)
    replay, replay_flops, kept = evaluate(chosen)
    total = kept
    if total == 0:
        return []
    walk: list[tuple[int, str]] = []  # (bytes freed, label) of every set the walk passes
    scale: float | None = None
    while chosen:
        options = []
        for name in sorted(chosen):
            r, f, k = evaluate(chosen - {name})
            freed = max(kept - k, 1)
            options.append(((r - replay) / freed, (f - replay_flops) / freed, name, r, f, k))
        # Times are measured: names whose time per byte freed is within TIE_TOLERANCE of the
        # dearest name's (at the walk's start) of the next cheaper one, from the cheapest up, are
        # a tie and are dropped together, so that the order noise puts them in changes no set
        # the walk passes through.
        options.sort()
        if scale is None:
            scale = TIE_TOLERANCE * max(abs(o[0]) for o in options)
        tied = {options[0][2]}
        for previous, option in itertools.pairwise(options):
            if option[0] - previous[0] > scale or option[0] > TIE_SPAN * max(options[0][0], 0.0):
                break
            tied.add(option[2])
        chosen -= tied
        replay, replay_flops, kept = evaluate(chosen)
        logger.debug(
            "save_set_candidates: dropped %s (%s)",
            sorted(tied),
            ", ".join(f"{o[2]} {o[0] * 1e6:.3g}" for o in options),
        )
        if chosen and total - kept > 0:
            walk.append((total - kept, "ops." + ".".join(sorted(chosen))))
    if len(walk) <= count:
        return [label for _, label in walk]
    # More sets than asked for: the first to free each fraction of what could be freed.
    candidates: list[str] = []
    for k in range(count):
        cut = total * (k + 1) / (count + 1)
        label = next((label for freed, label in walk if freed >= cut), None)
        if label is not None and label not in candidates:
            candidates.append(label)
    return candidates


@dataclass(frozen=True)
class EngineCost:
    """What remat's engines add to a step beyond the work they replay, in ms (see
    :func:`engine_cost`)."""

    unit_ms: float
    """Per recomputed unit: the checkpoint's wrapper, its saved-tensor hooks and the backward
    node that runs the replay."""
    op_ms: float
    """Per op of a ``selective`` unit's forward: the op log while the forward runs, and the
    replay's dispatch of the same op in backward (a kept output handed back, or the op run)."""


_PROBE_UNITS = 8
_PROBE_OPS = 24
_PROBE_NUMEL = 8


class _Probe(nn.Module):
    """A unit of ``_PROBE_OPS`` elementwise ops on a tensor too small to cost anything but the
    dispatch: what remains of a step under a plan is the engine."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(_PROBE_OPS // 2):
            x = (x * 1.5).tanh()
        return x


def engine_cost(device: torch.device, *, repeats: int = 15) -> EngineCost | None:
    """Time remat's engines on a probe (``_PROBE_UNITS`` units of ``_PROBE_OPS`` ops on eight
    numbers): the step kept, every unit recomputed, and every unit ``selective`` with each op's
    output kept (so nothing is replayed but the dispatch). The least of ``repeats`` rounds each,
    interleaved: a constant of the machine and of torch, not of the model, measured once per
    process and device. ``None`` where nothing runs (``meta``).

    The profiler prices a plan's actions with it: recompute adds the unit's forward and
    ``unit_ms``; a save set adds the share of the forward its replay runs and ``op_ms`` per op
    of the unit. Both come from times that scale together with the machine's speed, so a plan
    chosen on them does not change with the load, as differences of measured steps do.

    Example:
        >>> cost = engine_cost(torch.device("cpu"), repeats=2)
        >>> cost.unit_ms >= 0.0 and cost.op_ms >= 0.0
        True
    """
    if device.type not in ("cpu", "cuda"):
        return None
    key = (str(device), repeats)
    if key not in _ENGINE_COSTS:
        _ENGINE_COSTS[key] = _probe_engines(device, repeats)
    return _ENGINE_COSTS[key]


_ENGINE_COSTS: dict[tuple[str, int], EngineCost] = {}
""":func:`engine_cost` per device and repeats: measured once per process."""


def _probe_engines(device: torch.device, repeats: int) -> EngineCost:
    model = nn.Sequential(*[_Probe() for _ in range(_PROBE_UNITS)]).to(device)
    fqns = [str(i) for i in range(_PROBE_UNITS)]
    x = torch.randn(_PROBE_NUMEL, device=device, requires_grad=True)
    plans = [
        None,
        Plan(actions=dict.fromkeys(fqns, "recompute"), units=fqns),
        Plan(actions=dict.fromkeys(fqns, "selective:ops.mul.tanh"), units=fqns),
    ]

    def step(plan: Plan | None) -> float:
        with apply_(model, plan) if plan is not None else contextlib.nullcontext():
            start = time.perf_counter()  # applying the plan is not part of a step
            model(x).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return (time.perf_counter() - start) * 1e3

    best = [float("inf")] * len(plans)
    forward_ms = float("inf")
    for _ in range(repeats + 1):  # the first round warms up
        for which, plan in enumerate(plans):
            best[which] = min(best[which], step(plan))
        start = time.perf_counter()
        with torch.no_grad():
            model(x)
        forward_ms = min(forward_ms, (time.perf_counter() - start) * 1e3)
    kept, recomputed, selective = best
    unit_ms = max(recomputed - kept - forward_ms, 0.0) / _PROBE_UNITS
    op_ms = max(selective - kept, 0.0) / (_PROBE_UNITS * _PROBE_OPS)
    return EngineCost(unit_ms=unit_ms, op_ms=op_ms)


@dataclass(frozen=True)
class UnitEngine:
    """What remat's engines cost one unit, as shares of its forward (see
    :func:`time_unit_engines`): shares, so that the profile prices them at the forward time its
    timed steps measured, and every cost of a unit moves with the machine's speed alike."""

    recompute_share: float
    """Recomputing the unit: its forward again in backward, and the checkpoint's work."""
    engine_share: float | None
    """A ``selective`` unit whose replay runs no op: the op log and the replay's dispatch
    (``None`` where no save set was timed)."""


def time_unit_engines(
    model: nn.Module,
    example_inputs: Any,
    unit_fqns: Sequence[str],
    save_sets: Sequence[str | None],
    keys: Sequence[Any],
    *,
    rounds: int = 7,
    context: Any = contextlib.nullcontext,
) -> list[UnitEngine | None]:
    """Time each unit alone, on the inputs the model gives it, with the least of ``rounds``
    interleaved runs of each: its forward; forward and backward kept, recomputed, and
    ``selective:<save_sets[j]>`` (a save set naming every op of the unit, so that the replay
    runs none and what remains is the engine; ``None``: not timed). Units with equal ``keys`` are timed once. A
    unit that cannot run alone (no tensor output that needs a gradient) gets ``None``.

    Timing a unit alone, not the whole step under a plan, makes these small differences
    measurable: the least of a few runs of one unit moves by a few percent between runs on a
    shared machine, a difference of whole steps by more than what the engine costs.
    ``context`` is entered around each run (the step's autocast).

    Example:
        >>> import torch
        >>> blocks = [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()) for _ in range(2)]
        >>> model = torch.nn.Sequential(*blocks)
        >>> found = time_unit_engines(model, (torch.randn(4, 8),), ["0", "1"],
        ...     ["ops.addmm.gelu.t"] * 2, ["block", "block"], rounds=2)
        >>> found[0] == found[1] and found[0].recompute_share > 0
        True
    """
    modules = dict(model.named_modules())
    first: dict[Any, int] = {}
    for j, key in enumerate(keys):
        first.setdefault(key, j)
    captured = _unit_inputs(model, example_inputs, [modules[unit_fqns[j]] for j in first.values()])
    timed: dict[Any, UnitEngine | None] = {}
    for (key, j), inputs in zip(first.items(), captured, strict=True):
        fqn = unit_fqns[j]
        try:
            timed[key] = _time_alone(
                model, modules[fqn], fqn, inputs, save_sets[j], rounds, context
            )
        except Exception as error:  # a unit that does not run alone is priced without it
            logger.debug("time_unit_engines: %s not timed alone (%r)", fqn, error)
            timed[key] = None
    return [timed[key] for key in keys]


def _unit_inputs(model: nn.Module, example_inputs: Any, units: Sequence[nn.Module]) -> list[Any]:
    """Each unit's (args, kwargs) in one forward without autograd (no activations held, for a
    model that fits only planned), detached; floating tensors need a gradient, as a unit's
    input does in training."""
    found: list[Any] = [None] * len(units)

    def grab(index: int) -> Callable[..., None]:
        def pre(_module: nn.Module, args: Any, kwargs: Any) -> None:
            if found[index] is None:
                found[index] = tree_map(_leaf, (args, kwargs))

        return pre

    handles = [u.register_forward_pre_hook(grab(i), with_kwargs=True) for i, u in enumerate(units)]
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _leaf(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        trains = value.requires_grad or value.is_floating_point() or value.is_complex()
        return value.detach().clone().requires_grad_(trains)
    return value


def _time_alone(
    model: nn.Module,
    unit: nn.Module,
    fqn: str,
    inputs: Any,
    save_set: str | None,
    rounds: int,
    context: Any,
) -> UnitEngine | None:
    """The least time of each variant of one unit over ``rounds`` interleaved rounds, as shares
    of its forward."""
    if inputs is None:
        return None
    actions = ["recompute"] + ([f"selective:{save_set}"] if save_set else [])
    plans = [None, *(Plan(actions={fqn: a}, units=[fqn]) for a in actions)]
    device = next((t.device for t in tensors_in(inputs)), torch.device("cpu"))

    def run(plan: Plan | None, backward: bool) -> float:
        args, kwargs = tree_map(_leaf, inputs)  # a unit may write its inputs in place
        # the plan is applied outside the timed part: applying it is not part of a step
        with apply_(model, plan) if plan is not None else contextlib.nullcontext():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with context():
                out = unit(*args, **kwargs)
            if backward:
                grads = [t for t in tensors_in(out) if t.requires_grad]
                if not grads:
                    raise ValueError("no output needs a gradient")
                seeds = [torch.ones_like(t) for t in grads]
                torch.autograd.backward(grads, seeds)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return (time.perf_counter() - start) * 1e3

    forward_ms = float("inf")
    best = [float("inf")] * len(plans)
    for _ in range(rounds + 1):  # the first round warms each up
        forward_ms = min(forward_ms, run(None, backward=False))
        for which, plan in enumerate(plans):
            best[which] = min(best[which], run(plan, backward=True))
    for param in unit.parameters():
        param.grad = None
    kept, recomputed, *selective = best
    return UnitEngine(
        recompute_share=max(recomputed - kept, 0.0) / forward_ms,
        engine_share=max(selective[0] - kept, 0.0) / forward_ms if selective else None,
    )


def copy_bandwidth(device: torch.device, nbytes: int = 32 * 2**20) -> float | None:
    """Bytes per millisecond of the host link (CUDA: pinned host to device), or of a memory copy on
    the CPU; ``None`` where nothing runs (``meta``).

    Example:
        >>> copy_bandwidth(torch.device("cpu"), nbytes=2**20) > 0
        True
    """
    if device.type == "cuda":
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        target = torch.empty(nbytes, dtype=torch.uint8, device=device)
        target.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(3):
            target.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        return 3 * nbytes / ((time.perf_counter() - start) * 1e3)
    if device.type != "cpu":
        return None
    source = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    source.clone()
    start = time.perf_counter()
    for _ in range(3):
        source.clone()
    return 3 * nbytes / max((time.perf_counter() - start) * 1e3, 1e-6)
