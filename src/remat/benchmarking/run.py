"""``remat.bench``: the same training step under every strategy, side by side, in one run.

Consumes a model, example inputs, the peers to compare (``none``, ``full``, ``every_n:K``,
``sqrt_n``, ``megatron``, ``save_matmuls``, ``offload``, optionally torch.compile with
``activation_memory_budget``) and remat's budgets; produces a
:class:`~remat.benchmarking.result.BenchResult`.

How it measures (what honest timing on a noisy machine takes):

1. Profile the model once (:func:`remat.profile`) for the predictions (:func:`remat.simulate` for
   the peers, :func:`remat.solve` for remat's plans).
2. Peaks: one tracked training step per strategy (:func:`~remat.profiling.step.measure_step`; exact
   on every device), and on CUDA one untracked step under ``torch.cuda.max_memory_allocated``.
   Tracked steps are slow and are never timed. remat's plans are solved in a closed loop
   (:func:`remat.auto.solve_measured`), whose measurement is the plan's tracked peak. Then remat
   solves once more at each peer's measured peak (``remat:@<peer>``): the plan meant to dominate it.
3. Time: warm-up rounds (forward, backward and optimizer step; reported apart), then rounds that
   run every strategy once, interleaved (A B C A B C ...), each step from the same weights and
   seed; the median per strategy; overhead is the ratio to ``none`` of the same run.

Strategies with exactly the same plan (e.g. remat's plan at ``full``'s peak may be ``full``) are
measured once and reported under both names (``same_as``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from remat import _compat
from remat.apply.apply import apply_
from remat.apply.units import UnitSpec
from remat.auto import measure_plan, plan_step, profile_step
from remat.benchmarking.result import (
    BenchResult,
    StrategyResult,
    check_claims,
    check_dominance,
    summarize,
)
from remat.cost.model import TIMED_SOURCES, Profile, simulate
from remat.feedback import as_progress
from remat.plan import Plan
from remat.profiling.step import (
    LossFn,
    Step,
    as_step,
    make_optimizer,
    make_scaler,
    preserved_state,
    training_step,
)
from remat.solve.baselines import baseline_plan, parse_strategy
from remat.solve.budget import Budget
from remat.solve.solver import INFEASIBLE, SolveResult, solve

__all__ = [
    "DEFAULT_BUDGETS",
    "DEFAULT_COMPILE_FRACTIONS",
    "DEFAULT_PEERS",
    "Timed",
    "Timing",
    "bench",
    "default_strategies",
    "keep_freed_host_memory",
    "run_interleaved",
]

logger = logging.getLogger(__name__)

DEFAULT_BUDGETS = ("80%", "60%", "50%", "40%", "25%", "min")
DEFAULT_COMPILE_FRACTIONS = (1.0, 0.5, 0.1)
"""``activation_memory_budget`` values for ``--with-compile`` (1.0 is torch.compile's default)."""
DEFAULT_PEERS = ("none", "full", "every_n:2", "every_n:3", "sqrt_n", "megatron", "save_matmuls")

Clock = Callable[[], float]
Progress = Callable[[str], None]
PeakFn = Callable[[nn.Module, Any], int]


def default_strategies(device: str | torch.device = "cpu") -> list[str]:
    """The peers compared by default; ``offload`` only on CUDA (on the CPU it moves nothing).

    Example:
        >>> default_strategies("cpu")
        ['none', 'full', 'every_n:2', 'every_n:3', 'sqrt_n', 'megatron', 'save_matmuls']
        >>> default_strategies("cuda")[-1]
        'offload'
    """
    peers = list(DEFAULT_PEERS)
    if torch.device(device).type == "cuda":
        peers.append("offload")
    return peers


@dataclass
class Timing:
    """Wall-clock samples of one strategy, in ms.

    Example:
        >>> Timing(warmup_ms=[50.0], samples_ms=[10.0, 12.0, 11.0]).median_ms
        11.0
    """

    warmup_ms: list[float] = field(default_factory=list)
    samples_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.samples_ms) if self.samples_ms else None


@dataclass
class Timed:
    """One strategy's step: ``before`` and ``after`` run around each call of ``run``, untimed.

    Example:
        >>> calls = []
        >>> step = Timed(run=lambda: calls.append("run"), before=lambda: calls.append("before"))
        >>> _ = run_interleaved({"a": step}, rounds=1, warmup=0)
        >>> calls
        ['before', 'run']
    """

    run: Callable[[], None]
    before: Callable[[], None] | None = None
    after: Callable[[], None] | None = None


def run_interleaved(
    steps: Mapping[str, Timed | Callable[[], None]],
    *,
    rounds: int,
    warmup: int = 1,
    clock: Clock = time.perf_counter,
    synchronize: Callable[[], None] | None = None,
    progress: Progress | None = None,
) -> dict[str, Timing]:
    """Run every step ``warmup + rounds`` times, interleaved (A B C A B C ...), timing each call.

    The first ``warmup`` rounds are recorded apart (``warmup_ms``), never in the samples.
    ``synchronize`` (e.g. ``torch.cuda.synchronize``) runs before the clock is read on both sides;
    a :class:`Timed`'s ``before`` and ``after`` run outside the timed region.

    Example:
        >>> ticks = iter(range(0, 100, 5))
        >>> order = []
        >>> timings = run_interleaved(
        ...     {"a": lambda: order.append("a"), "b": lambda: order.append("b")},
        ...     rounds=2, clock=lambda: next(ticks) / 1000)
        >>> order, [round(t) for t in timings["a"].warmup_ms + timings["a"].samples_ms]
        (['a', 'b', 'a', 'b', 'a', 'b'], [5, 5, 5])
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(
            f"steps: got {rounds} timed and {warmup} warm-up rounds; expected at least 1 timed"
            " round and no negative warm-up"
        )
    sync = synchronize or (lambda: None)
    plan = {name: s if isinstance(s, Timed) else Timed(run=s) for name, s in steps.items()}
    timings = {name: Timing() for name in plan}
    total = warmup + rounds
    for round_ in range(total):
        if progress is not None:
            label = "warm-up" if round_ < warmup else "timed"
            progress(f"bench: round {round_ + 1}/{total} ({label}), {len(plan)} strategies")
        for name, step in plan.items():
            if step.before is not None:
                step.before()
            try:
                sync()
                start = clock()
                step.run()
                sync()
                elapsed_ms = (clock() - start) * 1e3
            finally:
                if step.after is not None:
                    step.after()
            target = timings[name].warmup_ms if round_ < warmup else timings[name].samples_ms
            target.append(elapsed_ms)
    return timings


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit systems


def keep_freed_host_memory() -> bool:
    """Ask glibc's malloc to keep freed memory in the process (no trimming of the heap, and
    blocks up to 32 MiB from the heap rather than ``mmap``) for the rest of the process; ``True``
    if it took. ``remat.bench`` calls it on the CPU: by default malloc hands large freed blocks
    back to the kernel, so a step that follows a step of lower peak page-faults its memory in
    again, and an interleaved benchmark times the allocator rather than the strategies (on this
    2-core machine, ``none`` ran 10-60% slower interleaved than alone). The CUDA caching
    allocator keeps freed memory the same way.

    Example:
        >>> keep_freed_host_memory() in (True, False)
        True
    """
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trimmed = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    mapped = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    return bool(trimmed and mapped)


def _plan_key(plan: Plan, units: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """What a plan does to each unit, with segment labels replaced by where the segment starts,
    so that equal plans from different builders compare equal."""
    resolved = {u: plan.action_for(u) for u in units}
    first: dict[str, int] = {}
    key = []
    for index, unit in enumerate(units):
        action = resolved[unit]
        if action.kind in ("segment", "nested"):
            start = first.setdefault(str(action), index)
            key.append((unit, f"{action.kind}:{start}"))
        else:
            key.append((unit, str(action)))
    return tuple(key)


def _default_peak(step: Step) -> PeakFn:
    """The peers' peaks: the step as :func:`remat.measure_plan` measures it, on the model as
    it is (a plan installed or not)."""

    def peak(model: nn.Module, example_inputs: Any) -> int:
        return measure_plan(step.replace(model=model, batch=example_inputs))

    return peak


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on Windows
        return None


def _machine() -> str:
    return (
        f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} torch threads,"
        f" python {platform.python_version()}"
    )


def bench(
    model: nn.Module | Step,
    example_inputs: Any = None,
    *,
    loss_fn: LossFn | None = None,
    strategies: Sequence[str] | None = None,
    budgets: Sequence[str] = DEFAULT_BUDGETS,
    steps: int = 5,
    warmup: int = 1,
    optimizer: Any = "adamw",
    seed: int = 0,
    units: UnitSpec = None,
    dominate: bool = True,
    with_compile: bool = False,
    compile_fractions: Sequence[float] = DEFAULT_COMPILE_FRACTIONS,
    compile_backend: str = "inductor",
    model_name: str = "",
    progress: bool | Progress | None = None,
    clock: Clock = time.perf_counter,
    measure_peak: PeakFn | None = None,
    precision: str = "32",
) -> BenchResult:
    """Measure peak memory and step time of every strategy on the same training step.

    Args:
        model: the model, on the device to measure on; or a :class:`~remat.profiling.step.Step`
            stating the whole step (its accumulation and capacity then hold for every measured
            peak; give no ``example_inputs`` nor step arguments beside it).
        example_inputs: one batch (tuple of positional arguments, dict of keyword arguments).
        loss_fn: output -> scalar loss (default: the output if scalar, else the mean of its floats).
        strategies: the peers (see :func:`default_strategies`); ``none`` is always added, since
            overheads are ratios to it.
        budgets: remat's budgets (``"50%"``, ``"8GiB"``, ``"min"``); each gives ``remat:<budget>``.
            ``P%`` is ``P%`` of the way from the least peak any plan reaches to the unplanned one.
        steps: timed steps per strategy, after ``warmup`` warm-up steps each.
        optimizer: whose step is part of the training step: ``"adamw"``, ``"sgd"``, ``"none"``, an
            optimizer instance or a factory (see :func:`remat.profile`).
        seed: set before every step, so dropout draws the same under every strategy.
        units: what plans act on (see :func:`remat.find_units`).
        dominate: also solve at each peer's measured peak (``remat:@<peer>``).
        with_compile: add ``compile:<fraction>`` for each of ``compile_fractions`` (torch.compile
            with ``activation_memory_budget``; compiling takes minutes on a CPU), and
            ``remat:<budget>+compile`` for each budget: remat's plan priced on the compiled path
            (:mod:`remat.profiling.compiled`) and run with each unit compiled
            (:func:`remat.compile_units_`, ``compile_backend``).
        compile_backend: the ``torch.compile`` backend of the ``remat:<budget>+compile`` rows
            (the ``compile:<fraction>`` rows are inductor's: the fraction is its partitioner's).
        model_name: a label for the report.
        precision: the step's precision (``"32"``, ``"bf16-mixed"``, ``"fp16-mixed"``,
            ``"bf16-true"``; see :func:`remat.profile`): every strategy's step runs in it.
        progress: a line of text as each stage starts: logged (``None``, the ``remat`` logger at
            INFO), on stderr (``True``, a bar on a terminal) or to a callable.
        clock: seconds, for the timed steps (tests pass a fake one).
        measure_peak: ``(model, example_inputs) -> bytes`` for the peaks of the peers (default:
            one tracked training step); remat's plans take the closed loop's measurement.

    Returns:
        A :class:`~remat.benchmarking.result.BenchResult` with every sample, the medians,
        overheads, the dominance of each peer and the claims.

    Raises:
        ValueError: an unknown strategy or optimizer, a malformed budget, ``steps`` < 1.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(4)])
        >>> result = bench(model, (torch.randn(8, 16),), strategies=["full"], budgets=["min"],
        ...                steps=1, optimizer="sgd")
        >>> [r.strategy for r in result.results]
        ['none', 'full', 'remat:min', 'remat:@none', 'remat:@full']
        >>> result.row("remat:min").budget_met, result.row("none").overhead
        (True, 1.0)
    """
    started = time.perf_counter()
    say = as_progress(progress)
    step = as_step(
        model,
        example_inputs,
        loss_fn=loss_fn,
        optimizer=optimizer,
        units=units,
        precision=precision,
    )
    if step.estimated:
        raise ValueError(
            f"bench: got a step estimated for {step.target!r}; expected one that runs here"
            " (bench measures every strategy). Fix: step.replace(target=None), or use"
            " remat plan --device for an estimate"
        )
    model, example_inputs, loss_fn = step.model, step.batch, step.loss_fn
    optimizer, precision = step.optimizer, step.precision
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps: got {steps} (warm-up {warmup}); expected steps >= 1, warmup >= 0")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "meta":
        raise ValueError(
            "bench: the model is on meta, where nothing runs and time means nothing; build it on"
            " cpu or cuda (remat plan --device meta predicts without running)"
        )
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    cuda = device.type == "cuda"
    peers = list(strategies) if strategies is not None else default_strategies(device)
    for name in peers:
        parse_strategy(name)  # a ValueError naming the accepted forms
    if "none" not in peers:
        peers.insert(0, "none")
    peers = list(dict.fromkeys(peers))
    parsed_budgets = [Budget.parse(b) for b in budgets]
    measure = measure_peak or _default_peak(step)
    notes: list[str] = [] if precision == "32" else [f"every step runs in precision {precision}"]
    if any(b.kind == "percent" for b in parsed_budgets):
        notes.append(
            "a percentage budget P% is P% of the way from the least peak any plan reaches (0%) to"
            " the unplanned peak (100%), as torch.compile's activation_memory_budget"
        )
    if device.type == "cpu" and keep_freed_host_memory():
        notes.append(
            "host malloc keeps freed memory for this process (glibc mallopt), as the CUDA caching"
            " allocator does: no strategy's step pays page faults for what another one freed"
        )

    torch.manual_seed(seed)
    say("bench: profiling the model (tracked and timed steps)")
    prof = profile_step(step)
    unit_fqns = prof.unit_fqns

    rows: list[StrategyResult] = []
    plans: dict[str, Plan] = {}
    keys: dict[tuple[tuple[str, str], ...], str] = {}
    compiled: dict[str, nn.Module] = {}

    def register(row: StrategyResult, plan: Plan | None) -> None:
        rows.append(row)
        if plan is None:
            return
        plan.precision = precision  # the step it runs in: no warning about another autocast
        row.plan = {u: str(plan.action_for(u)) for u in unit_fqns}
        key = _plan_key(plan, unit_fqns)
        if key in keys:
            row.same_as = keys[key]
        else:
            keys[key] = row.strategy
            plans[row.strategy] = plan

    for name in peers:
        plan = baseline_plan(name, unit_fqns)
        row = StrategyResult(strategy=name, kind="peer")
        try:
            sim = simulate(prof, plan)
            row.predicted_peak_bytes, row.predicted_overhead = sim.peak_bytes, sim.overhead
        except ValueError as error:  # a plan kind the cost model cannot predict
            row.notes.append(f"no prediction: {error}")
        register(row, plan)

    # Peaks of the peers: one tracked step each (never timed).
    for row in rows:
        if row.same_as is not None:
            continue
        say(f"bench: measuring the peak of {row.strategy}")
        try:
            with apply_(model, plans[row.strategy]):
                row.peak_bytes = measure(model, example_inputs)
        except (ValueError, RuntimeError, NotImplementedError) as error:
            if row.strategy == "none":
                raise  # nothing to compare with
            # e.g. a selective policy that does not apply to this model: reported, not fatal
            row.status = "failed"
            row.notes.append(f"{type(error).__name__}: {error}")
            del plans[row.strategy]
            for key in [k for k, name in keys.items() if name == row.strategy]:
                del keys[key]

    if with_compile:
        for fraction in compile_fractions:
            if not 0.0 <= float(fraction) <= 1.0:
                raise ValueError(
                    f"compile_fractions: got {fraction!r}; expected numbers from 0 to 1 (the share"
                    " of activation bytes torch.compile may keep)"
                )
            row = StrategyResult(strategy=f"compile:{float(fraction):g}", kind="compile")
            rows.append(row)
            say(f"bench: compiling {row.strategy} (minutes on a CPU)")
            target = _compat.compile_with_activation_budget(model, float(fraction))
            begun = time.perf_counter()
            try:  # the first step compiles; it is neither timed nor the warm-up
                torch.manual_seed(seed)
                peak = _allocator_peak(
                    model,
                    None,
                    target,
                    example_inputs,
                    loss_fn,
                    optimizer,
                    cuda=cuda,
                    precision=precision,
                )
            except Exception as error:  # a missing C++ compiler, an unsupported op: reported
                row.status = "failed"
                row.notes.append(f"torch.compile failed: {type(error).__name__}: {error}")
                continue
            compiled[row.strategy] = target
            row.notes.append(f"compiled in {time.perf_counter() - begun:.1f} s (not timed)")
            if peak is not None:
                row.peak_bytes = row.allocator_peak_bytes = peak
            else:
                row.notes.append(
                    "peak not measured: compiled kernels allocate outside the dispatcher, where the"
                    " tracker cannot see, and the CPU has no allocator statistics"
                )

    def solve_row(name: str, budget: Budget | int, label: str) -> None:
        result = solve(prof, budget)
        # The bound for the budget as asked (the closed loop below may solve a tighter one).
        bound = _overhead_bound(prof, result)
        known = keys.get(_plan_key(result.plan, unit_fqns)) if result.fits else None
        peak = next((r.peak_bytes for r in rows if r.strategy == known), None)
        if peak is not None and peak <= result.budget_bytes:
            # A plan already measured, and it fits: measuring it again would tell nothing new.
            say(f"bench: {name} is the plan of {known}, measured already")
            result = dataclasses.replace(result, measured_peak_bytes=peak)
        else:
            say(f"bench: solving {name} and measuring its peak")
            result = plan_step(step, budget, profile_=prof, progress=say).result
        row = StrategyResult(
            strategy=name,
            kind="remat",
            budget=label,
            budget_bytes=result.budget_bytes,
            predicted_peak_bytes=result.predicted_peak_bytes,
            predicted_overhead=result.predicted_overhead,
            solve_status=result.status,
            min_peak_bytes=result.min_peak_bytes,
            overhead_bound=bound,
            notes=list(result.notes),
        )
        if result.status == INFEASIBLE:
            row.status = "infeasible"
            row.notes.append(
                f"no plan fits {result.budget_bytes:,} bytes; the least achievable peak is"
                f" {result.min_peak_bytes:,}"
            )
            rows.append(row)
            return
        row.peak_bytes = result.measured_peak_bytes
        result.plan.fingerprint = prof.fingerprint
        register(row, result.plan)

    for parsed in parsed_budgets:
        solve_row(f"remat:{parsed.text}", parsed, parsed.text)
    if dominate:
        for peer in [r for r in rows if r.kind != "remat" and r.peak_bytes is not None]:
            assert peer.peak_bytes is not None
            solve_row(f"remat:@{peer.strategy}", int(peer.peak_bytes), f"@{peer.strategy}")

    if with_compile:
        say("bench: timing the compiled path for remat's compiled plans")
        for row, target in _compiled_plans(
            step, prof, parsed_budgets, compile_backend, seed=seed, progress=say
        ):
            rows.append(row)
            if target is not None:
                compiled[row.strategy] = target

    by_name = {r.strategy: r for r in rows}
    for row in rows:  # measured once, reported under both names
        if row.same_as is not None:
            row.peak_bytes = by_name[row.same_as].peak_bytes
            row.notes.append(f"the same plan as {row.same_as}")

    # CUDA: the allocator's peak over one untracked step per strategy.
    if device.type == "cuda":
        for name in plans:
            say(f"bench: allocator peak of {name}")
            by_name[name].allocator_peak_bytes = _allocator_peak(
                model,
                plans[name],
                None,
                example_inputs,
                loss_fn,
                optimizer,
                cuda=True,
                precision=precision,
            )

    # Time: the same weights and seed before every step; one optimizer for all (its state exists
    # after the first warm-up step, so no timed step creates it).
    opt = make_optimizer(optimizer, model)
    scaler = make_scaler(precision, device)
    params = [*model.parameters(), *model.buffers()]
    losses: dict[str, float] = {}

    def step_of(name: str) -> Timed:
        plan, target = plans.get(name), compiled.get(name, model)
        handles: list[Any] = []

        def before() -> None:
            with torch.no_grad():
                for tensor, value in zip(params, initial, strict=True):
                    tensor.copy_(value)
            torch.manual_seed(seed)
            if plan is not None:
                handles.append(apply_(model, plan))

        def run() -> None:
            loss = training_step(
                target,
                example_inputs,
                loss_fn=loss_fn,
                optimizer=opt,
                precision=precision,
                scaler=scaler,
            )
            losses.setdefault(name, float(loss))

        def after() -> None:
            while handles:
                handles.pop().remove()

        return Timed(run=run, before=before, after=after)

    runnable = _timing_order([r.strategy for r in rows if r.status == "ok" and r.same_as is None])
    load_avg = [_load_avg()]
    with preserved_state(model):
        initial = [t.detach().clone() for t in params]
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        timings = run_interleaved(
            {name: step_of(name) for name in runnable},
            rounds=steps,
            warmup=warmup,
            clock=clock,
            synchronize=sync,
            progress=say,
        )
    load_avg.append(_load_avg())
    for row in rows:
        source = row.same_as or row.strategy
        if source in timings:
            row.warmup_ms = list(timings[source].warmup_ms)
            row.samples_ms = list(timings[source].samples_ms)
            row.loss = losses.get(source)
    summarize(rows)
    eager_losses = {
        r.loss
        for r in rows
        if r.kind != "compile" and not r.strategy.endswith(COMPILED_SUFFIX) and r.loss is not None
    }
    if len(eager_losses) > 1:
        notes.append(
            f"the eager strategies' first losses differ ({sorted(eager_losses)}): a plan changed"
            " the computation; run remat verify"
        )
    dominance = check_dominance(rows)
    result = BenchResult(
        model=model_name or type(model).__name__,
        results=rows,
        torch_version=torch.__version__,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        seed=seed,
        optimizer=prof.optimizer,
        machine=_machine(),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        steps=steps,
        warmup_steps=warmup,
        units=unit_fqns,
        static_bytes=prof.static_bytes,
        unplanned_peak_bytes=by_name["none"].peak_bytes,
        dominance=dominance,
        claims=check_claims(rows, dominance),
        notes=notes,
    )
    result.wall_s = time.perf_counter() - started
    affinity = getattr(os, "sched_getaffinity", None)  # the cores this process may use (Linux)
    result.cpu_count = len(affinity(0)) if affinity is not None else os.cpu_count()
    result.load_avg = [v for v in load_avg if v is not None]
    if result.busy:
        result.notes.append(
            f"the machine was busy while timing (load average {max(result.load_avg):.1f} on"
            f" {result.cpu_count} cores): step times and overheads are unreliable; run again on a"
            " quiet machine"
        )
    return result


def _allocator_peak(
    model: nn.Module,
    plan: Plan | None,
    compiled: nn.Module | None,
    example_inputs: Any,
    loss_fn: LossFn | None,
    optimizer: Any,
    *,
    cuda: bool,
    precision: str = "32",
) -> int | None:
    """``torch.cuda.max_memory_allocated`` over one untracked training step (``None`` off CUDA,
    where the step still runs: it compiles a compiled model)."""
    with preserved_state(model, optimizer):
        opt = make_optimizer(optimizer, model)
        handle = apply_(model, plan) if plan is not None else None
        try:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            training_step(
                model if compiled is None else compiled,
                example_inputs,
                loss_fn=loss_fn,
                optimizer=opt,
                precision=precision,
            )
            if not cuda:
                return None
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        finally:
            if handle is not None:
                handle.remove()


COMPILED_SUFFIX = "+compile"
"""The suffix of remat's compiled plans' rows (``remat:50%+compile``)."""


def _compiled_plans(
    step: Step,
    prof: Profile,
    budgets: Sequence[Budget],
    backend: str,
    *,
    seed: int,
    progress: Progress,
) -> list[tuple[StrategyResult, nn.Module | None]]:
    """``remat:<budget>+compile`` rows: remat's plans priced on the compiled path, each on its
    own copy of the model's modules (sharing its parameters) with the plan applied and every
    unit compiled; the copy to time, or ``None`` where the row does not run. The first step
    compiles, untimed; on CUDA it gives the allocator's peak. On the CPU no peak is measured
    (see :mod:`remat.profiling.compiled`): the row has the predicted peak only, no budget bytes
    (so no claim counts it as a miss), and says so."""
    from remat.apply.compile import compile_units_
    from remat.profiling.compiled import compiled_actions, compiled_profile, shared_copy

    cuda = next((p.device.type for p in step.model.parameters()), "cpu") == "cuda"
    try:
        cprof = compiled_profile(step, prof, backend=backend, progress=progress)
    except Exception as error:  # a missing C++ compiler, an unsupported op: reported
        failed = []
        for budget in budgets:
            row = StrategyResult(
                strategy=f"remat:{budget.text}{COMPILED_SUFFIX}", kind="remat", status="failed"
            )
            row.notes.append(f"torch.compile failed: {type(error).__name__}: {error}")
            failed.append((row, None))
        return failed
    out: list[tuple[StrategyResult, nn.Module | None]] = []
    for budget in budgets:
        result = solve(cprof, budget, actions=compiled_actions(None))
        # Over the eager unplanned step, as the measured overhead is over eager `none`: the
        # solver's own overhead is over the compiled unplanned step.
        eager_ms = prof.step_ms
        predicted = (
            result.predicted_step_ms / eager_ms
            if result.predicted_step_ms is not None and eager_ms
            else result.predicted_overhead
        )
        row = StrategyResult(
            strategy=f"remat:{budget.text}{COMPILED_SUFFIX}",
            kind="remat",
            budget=f"{budget.text}{COMPILED_SUFFIX}",
            predicted_peak_bytes=result.predicted_peak_bytes,
            predicted_overhead=predicted,
            solve_status=result.status,
            min_peak_bytes=result.min_peak_bytes,
            notes=[*result.notes, f"budget {result.budget_bytes:,} bytes; {cprof.notes[-1]}"],
        )
        if result.status == INFEASIBLE:
            row.status = "infeasible"
            out.append((row, None))
            continue
        row.plan = {u: str(result.plan.action_for(u)) for u in cprof.unit_fqns}
        result.plan.precision = step.precision
        target = shared_copy(step.model)
        handle = apply_(target, result.plan)
        compile_units_(target, handle, backend=backend)
        progress(f"bench: compiling {row.strategy}")
        begun = time.perf_counter()
        try:
            torch.manual_seed(seed)
            peak = _allocator_peak(
                target,
                None,
                None,
                step.batch,
                step.loss_fn,
                step.optimizer,
                cuda=cuda,
                precision=step.precision,
            )
        except Exception as error:  # as for compile:<f>
            row.status = "failed"
            row.notes.append(f"torch.compile failed: {type(error).__name__}: {error}")
            out.append((row, None))
            continue
        row.notes.append(f"compiled in {time.perf_counter() - begun:.1f} s (not timed)")
        if peak is not None:
            row.peak_bytes = row.allocator_peak_bytes = peak
            row.budget_bytes = result.budget_bytes
            row.budget_met = peak <= result.budget_bytes
        else:
            row.notes.append(
                "peak not measured: compiled kernels allocate outside the dispatcher, and the CPU"
                " has no allocator statistics; predicted peak from the eager profile's bytes"
            )
        out.append((row, target))
    return out


def _overhead_bound(prof: Profile, result: SolveResult) -> float | None:
    """The solver's lower bound on the recompute cost, as an overhead (timed profiles only)."""
    if not result.fits or prof.time_source not in TIMED_SOURCES or not prof.step_ms:
        return None
    return (prof.step_ms + result.lower_bound) / prof.step_ms


def _timing_order(names: Sequence[str]) -> list[str]:
    """The order of one timing round: each peer followed at once by ``remat:@<peer>``, the plan
    judged against it, so the two steps of a comparison run seconds apart and the machine's drift
    within a round touches both alike; the other remat plans after the peers.

    Example:
        >>> _timing_order(["none", "full", "every_n:2", "remat:50%", "remat:@every_n:2"])
        ['none', 'full', 'every_n:2', 'remat:@every_n:2', 'remat:50%']
    """
    order = []
    for name in names:
        if name.startswith("remat:"):
            continue
        order.append(name)
        if f"remat:@{name}" in names:
            order.append(f"remat:@{name}")
    return order + [name for name in names if name not in order]
