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

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from remat._compat import TorchDispatchMode, flop_formula
from remat.apply.apply import apply_
from remat.apply.selective import ReplayGraph, replayed_by, save_name
from remat.apply.units import call_model
from remat.plan import Plan

__all__ = [
    "copy_bandwidth",
    "kept_by_policy",
    "save_set_candidates",
    "time_unit_ops",
]

OpKey = tuple[Any, int]
TIE_TOLERANCE = 0.1
"""Op names whose replay time per byte freed is within this fraction of the best are a tie for
:func:`save_set_candidates` (broken by FLOPs, then by name): measured times differ by more than
that from run to run on a shared machine, and a save set that followed the noise would change
the plan."""


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
    again). Names within :data:`TIE_TOLERANCE` of the best are a tie, broken by the FLOPs the
    replay adds per byte freed, then by name. The sets where the freed bytes first reach
    1/(count+1), 2/(count+1)... of all are returned.

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
    cuts = [total * (k + 1) / (count + 1) for k in range(count)]
    candidates: list[str] = []
    while chosen and cuts:
        options = []
        for name in sorted(chosen):
            r, f, k = evaluate(chosen - {name})
            freed = max(kept - k, 1)
            options.append(((r - replay) / freed, (f - replay_flops) / freed, name, r, f, k))
        # Times are measured: names whose time per byte freed is within TIE_TOLERANCE of the
        # best are a tie, broken by FLOPs per byte, then by name, so noise does not pick.
        best = min(option[0] for option in options)
        tied = [o for o in options if o[0] <= best + TIE_TOLERANCE * abs(best)]
        _, _, name, replay, replay_flops, kept = min(tied, key=lambda o: (o[1], o[2]))
        chosen.discard(name)
        while cuts and total - kept >= cuts[0]:
            cuts.pop(0)
            if chosen:
                label = "ops." + ".".join(sorted(chosen))
                if label not in candidates:
                    candidates.append(label)
    return candidates[:count]


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
