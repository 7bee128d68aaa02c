"""What the profiler measures for the actions finer than recompute: ``selective`` and ``offload``.

- :func:`time_unit_ops` runs one forward and times (and counts the FLOPs of) every op of every unit,
  numbered as the selective engine numbers them (overload and call index within the unit call);
- :func:`kept_by_policy` runs one forward under a ``selective`` plan and reports, per unit, which
  ops' outputs it kept and their bytes;
- :func:`op_set_candidates` turns those into the save sets worth measuring: per op, the replay time
  that keeping its outputs saves per byte kept, best first, cut at fractions of what could be kept
  (the Pareto frontier of a knapsack with additive weights, sampled);
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
from remat.apply.selective import op_name
from remat.apply.units import call_model
from remat.plan import Plan

__all__ = ["copy_bandwidth", "kept_by_policy", "op_set_candidates", "time_unit_ops"]

OpKey = tuple[Any, int]


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
    model: nn.Module, example_inputs: Any, unit_modules: Sequence[nn.Module]
) -> list[dict[OpKey, tuple[float, int]]]:
    """Per unit, per op (overload, call index in the unit): (ms, FLOPs) in one forward.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> ops = time_unit_ops(model, (torch.randn(2, 4),), [model[0]])
        >>> sorted(op_name(key[0]) for key in ops[0])
        ['addmm', 't']
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
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
    covers: list[dict[OpKey, tuple[OpKey, ...]]] | None = None,
) -> list[dict[OpKey, int]]:
    """Per unit, the ops whose outputs ``selective:<policy>`` keeps in one forward, and their bytes.

    ``covers``, if given, is filled with one dict per unit: kept op -> the ops the replay skips
    for it (itself; for a tensor filled in place, such as dropout's mask, also the ops that made
    and filled it).

    Example:
        >>> import torch
        >>> block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
        >>> model = torch.nn.Sequential(block)
        >>> kept = kept_by_policy(model, (torch.randn(2, 4),), ["0"], "ops.addmm.gelu")
        >>> [(op_name(key[0]), nbytes) for key, nbytes in kept[0].items()]  # GELU saves its input
        [('addmm', 32)]
    """
    plan = Plan(actions=dict.fromkeys(unit_fqns, f"selective:{policy}"), units=list(unit_fqns))
    modules = dict(model.named_modules())
    with apply_(model, plan):
        call_model(model, example_inputs)
        regions = [modules[fqn].__dict__["forward"].__remat_region__ for fqn in unit_fqns]
        if covers is not None:
            covers[:] = [dict(region.last_covers) for region in regions]
        return [dict(region.last_kept_bytes) for region in regions]


def op_set_candidates(
    op_times: Sequence[dict[OpKey, tuple[float, int]]],
    kept: Sequence[dict[OpKey, int]],
    *,
    count: int = 2,
    time_source: str = "measured",
    covers: Sequence[dict[OpKey, tuple[OpKey, ...]]] | None = None,
) -> list[str]:
    """``selective`` policies (``ops.<op>...``) worth measuring: ops ranked by the replay time
    their kept outputs save per byte, cut where the kept bytes reach 1/(count+1), 2/(count+1)...
    of all that can be kept. With ``covers`` (from :func:`kept_by_policy`), keeping an op saves
    the time of every op it covers (a dropout mask's ``div_`` saves its ``bernoulli_`` too).

    Example:
        >>> mm, gelu, add = (torch.ops.aten.mm.default, torch.ops.aten.gelu.default,
        ...                  torch.ops.aten.add.Tensor)
        >>> times = [{(mm, 0): (5.0, 100), (gelu, 0): (1.0, 0), (add, 0): (0.1, 0)}]
        >>> kept = [{(mm, 0): 400, (gelu, 0): 400, (add, 0): 400}]
        >>> op_set_candidates(times, kept, count=2)
        ['ops.mm', 'ops.gelu.mm']
    """
    per_op_bytes: dict[str, int] = defaultdict(int)
    per_op_cost: dict[str, float] = defaultdict(float)
    unit_covers = list(covers) if covers is not None else [{} for _ in kept]
    for unit_times, unit_kept, unit_cover in zip(op_times, kept, unit_covers, strict=True):
        for key, nbytes in unit_kept.items():
            name = op_name(key[0])
            per_op_bytes[name] += nbytes
            for covered in unit_cover.get(key, (key,)):
                ms, flops = unit_times.get(covered, (0.0, 0))
                per_op_cost[name] += ms if time_source == "measured" else flops
    total = sum(per_op_bytes.values())
    if total == 0:
        return []
    ranked = sorted(
        (name for name in per_op_bytes if per_op_cost[name] > 0),
        key=lambda name: (-per_op_cost[name] / max(per_op_bytes[name], 1), name),
    )
    candidates: list[str] = []
    chosen: list[str] = []
    cumulative = 0
    cuts = [total * (k + 1) / (count + 1) for k in range(count)]
    for name in ranked:
        chosen.append(name)
        cumulative += per_op_bytes[name]
        while cuts and cumulative >= cuts[0]:
            cuts.pop(0)
            label = "ops." + ".".join(sorted(chosen))
            if label not in candidates:
                candidates.append(label)
    if cuts and chosen:
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
