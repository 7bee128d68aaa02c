"""What a benchmark produced, and what follows from it: medians, overheads, dominance and claims.

Consumes the raw samples and peaks that :func:`remat.benchmarking.run.bench` measured; produces a
:class:`BenchResult` that round-trips through JSON (``format_version``), from which
:mod:`remat.benchmarking.report` renders tables, plots and HTML. Imports no torch.

Names of strategies:

- the peers, as :func:`remat.baseline_plan` names them: ``none``, ``full``, ``every_n:K``,
  ``sqrt_n``, ``megatron``, ``save_matmuls``, ``offload``; and ``compile:<fraction>`` (torch.compile
  with ``activation_memory_budget`` at that fraction);
- ``remat:<budget>``: remat's plan for a budget the user asked for (``remat:50%``, ``remat:min``;
  ``P%`` is ``P%`` of the way from the least peak any plan reaches to the unplanned peak);
- ``remat:@<peer>``: remat's plan solved with the peer's *measured* peak as its budget in bytes, the
  plan that should dominate that peer (no more memory, no more time).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT_VERSION",
    "NOISE_MARGIN",
    "BenchResult",
    "Claim",
    "Dominance",
    "StrategyResult",
    "check_claims",
    "check_dominance",
    "summarize",
    "time_ratio",
]

FORMAT_VERSION = 1
NOISE_MARGIN = 0.02
"""How much slower (relative) a remat plan may be than a peer and still count as no slower: CPU
step times here vary by a few percent between identical runs."""
HALF_BUDGET_MAX_OVERHEAD = 1.05
"""Claim: at the 50% budget (halfway from the least peak any plan reaches to the unplanned peak)
remat's overhead (step time over the unplanned step's) is at most this."""
HALF_BUDGET_STATEMENT = (
    "at the 50% budget (halfway from the least peak any plan reaches to the unplanned peak)"
    f" remat's overhead is at most {HALF_BUDGET_MAX_OVERHEAD}"
)
FULL_MEMORY_OVERHEAD_SHARE = 0.90
"""Claim: at the memory ``full`` reaches, remat's overhead is at most this share of ``full``'s."""


@dataclass(kw_only=True)
class StrategyResult:
    """One strategy of one benchmark run: its measured and predicted peak and time.

    Example:
        >>> row = StrategyResult(strategy="full", kind="peer", samples_ms=[12.0, 10.0, 11.0])
        >>> summarize([StrategyResult(strategy="none", kind="peer", samples_ms=[10.0]), row])
        >>> row.step_ms, row.overhead
        (11.0, 1.1)
    """

    strategy: str
    """``none``, ``full``, ..., ``compile:0.5``, ``remat:50%``, ``remat:@full``."""
    kind: str
    """``peer`` (what people use today), ``remat`` (a plan of remat's solver) or ``compile``."""
    status: str = "ok"
    """``ok``; ``infeasible`` (no plan fits the budget: not run); ``failed`` (see notes)."""
    budget: str | None = None
    """The budget as asked (``50%``, ``min``, ``@full``), for remat plans."""
    budget_bytes: int | None = None
    peak_bytes: int | None = None
    """Measured peak of one training step (the tracker; exact on every device)."""
    allocator_peak_bytes: int | None = None
    """``torch.cuda.max_memory_allocated`` over one untracked step (CUDA only)."""
    predicted_peak_bytes: int | None = None
    predicted_overhead: float | None = None
    step_ms: float | None = None
    """Median of the timed steps."""
    overhead: float | None = None
    """``step_ms`` over the ``step_ms`` of ``none`` in the same run; 1.0 means free."""
    budget_met: bool | None = None
    """``peak_bytes <= budget_bytes`` (``None`` where no budget applies)."""
    warmup_ms: list[float] = field(default_factory=list)
    """Warm-up steps (backward and optimizer included), reported apart and not in the median."""
    samples_ms: list[float] = field(default_factory=list)
    """Every timed step, in the order run."""
    loss: float | None = None
    """The loss of the strategy's first step (every step starts from the same weights and seed,
    so the eager strategies' losses agree)."""
    solve_status: str | None = None
    min_peak_bytes: int | None = None
    """For remat plans: the least peak the solver predicts any plan reaches."""
    overhead_bound: float | None = None
    """For remat plans: the solver's lower bound on the overhead of any plan that fits the budget
    (every action it may use, with the profile's measured costs); a claim below it cannot be met
    by remat on this model and machine, whatever the noise."""
    same_as: str | None = None
    """An earlier strategy with exactly the same plan: measured once, reported under both names."""
    plan: dict[str, Any] | None = None
    """The plan's actions per unit (``None`` for compile)."""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (every field)."""
        return asdict(self)


@dataclass(kw_only=True)
class Dominance:
    """Whether some remat plan dominates a peer: measured peak no higher, step time at most
    ``NOISE_MARGIN`` above.

    Example:
        >>> Dominance(peer="full", dominated_by="remat:@full", margin=0.01).dominated
        True
    """

    peer: str
    dominated_by: str | None
    """The remat plan that dominates (the fastest among those that do), or ``None``."""
    margin: float | None = None
    """That plan's step time over the peer's, minus 1 (negative: faster)."""
    reason: str = ""

    @property
    def dominated(self) -> bool:
        return self.dominated_by is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, with ``dominated`` spelled out."""
        return {**asdict(self), "dominated": self.dominated}


@dataclass(kw_only=True)
class Claim:
    """A statement about the run, checked against its numbers: ``pass``, ``fail`` or
    ``not_evaluated`` (the run lacks what the claim needs).

    Example:
        >>> Claim(name="x", statement="1 <= 2", status="pass").passed
        True
    """

    name: str
    statement: str
    status: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return asdict(self)


def summarize(rows: Sequence[StrategyResult]) -> None:
    """Fill ``step_ms`` (median of samples), ``overhead`` (against ``none`` of the same rows) and
    ``budget_met`` in place.

    Example:
        >>> none = StrategyResult(strategy="none", kind="peer", samples_ms=[9.0, 10.0, 30.0])
        >>> plan = StrategyResult(strategy="remat:50%", kind="remat", samples_ms=[12.0, 11.0],
        ...                       peak_bytes=90, budget_bytes=100)
        >>> summarize([none, plan])
        >>> none.step_ms, plan.step_ms, plan.overhead, plan.budget_met
        (10.0, 11.5, 1.15, True)
    """
    for row in rows:
        row.step_ms = statistics.median(row.samples_ms) if row.samples_ms else None
        if row.budget_bytes is not None and row.peak_bytes is not None:
            row.budget_met = row.peak_bytes <= row.budget_bytes
    base = next((r for r in rows if r.strategy == "none"), None)
    for row in rows:
        row.overhead = time_ratio(row, base) if base is not None else None


def time_ratio(row: StrategyResult, other: StrategyResult) -> float | None:
    """How much longer ``row``'s step takes than ``other``'s: with samples from the same rounds
    (interleaved, one of each per round), the median of the per-round ratios, which a machine
    that slows down and speeds up between rounds touches far less than the ratio of medians;
    otherwise the ratio of the medians.

    Example:
        >>> a = StrategyResult(strategy="a", kind="peer", samples_ms=[10.0, 20.0, 10.0])
        >>> b = StrategyResult(strategy="b", kind="peer", samples_ms=[11.0, 22.0, 11.0])
        >>> summarize([a, b]); round(time_ratio(b, a), 3)
        1.1
    """
    mine, theirs = row.samples_ms, other.samples_ms
    if mine and theirs and len(mine) == len(theirs) and all(t > 0 for t in theirs):
        return statistics.median(m / t for m, t in zip(mine, theirs, strict=True))
    if row.step_ms is None or not other.step_ms:
        return None
    return row.step_ms / other.step_ms


def _measured(row: StrategyResult) -> bool:
    return row.status == "ok" and row.peak_bytes is not None and row.step_ms is not None


def check_dominance(
    rows: Sequence[StrategyResult], margin: float = NOISE_MARGIN
) -> list[Dominance]:
    """For every measured peer (and compile strategy), the fastest remat plan whose measured peak
    is no higher and whose step time is at most ``margin`` above the peer's (compared by
    :func:`time_ratio`: per round, where both have samples from the same rounds).

    Example:
        >>> rows = [
        ...     StrategyResult(strategy="full", kind="peer", peak_bytes=100, step_ms=13.0),
        ...     StrategyResult(strategy="remat:@full", kind="remat", peak_bytes=100, step_ms=13.1),
        ...     StrategyResult(strategy="remat:min", kind="remat", peak_bytes=80, step_ms=15.0),
        ... ]
        >>> [(d.peer, d.dominated_by) for d in check_dominance(rows)]
        [('full', 'remat:@full')]
        >>> check_dominance(rows, margin=0.0)[0].dominated_by is None
        True
    """
    remat_rows = [r for r in rows if r.kind == "remat" and _measured(r)]
    verdicts = []
    for peer in rows:
        if peer.kind == "remat":
            continue
        if not _measured(peer):
            reason = "peak not measured" if peer.status == "ok" else f"peer {peer.status}"
            verdicts.append(Dominance(peer=peer.strategy, dominated_by=None, reason=reason))
            continue
        assert peer.peak_bytes is not None and peer.step_ms is not None
        ratios = {
            r.strategy: ratio
            for r in remat_rows
            if r.peak_bytes is not None
            and r.peak_bytes <= peer.peak_bytes
            and (ratio := time_ratio(r, peer)) is not None
        }
        winners = [r for r in remat_rows if ratios.get(r.strategy, float("inf")) <= 1 + margin]
        if winners:
            best = min(winners, key=lambda r: (ratios[r.strategy], r.peak_bytes))
            verdicts.append(
                Dominance(
                    peer=peer.strategy,
                    dominated_by=best.strategy,
                    margin=ratios[best.strategy] - 1,
                )
            )
            continue
        low = [
            r for r in remat_rows if r.peak_bytes is not None and r.peak_bytes <= peer.peak_bytes
        ]
        if low:
            fastest = min(low, key=lambda r: ratios.get(r.strategy, float("inf")))
            reason = (
                f"the fastest remat plan within its peak, {fastest.strategy}, takes"
                f" {ratios.get(fastest.strategy, float('nan')) - 1:+.1%} time"
            )
        else:
            reason = "no remat plan reaches its peak"
        verdicts.append(Dominance(peer=peer.strategy, dominated_by=None, reason=reason))
    return verdicts


def check_claims(rows: Sequence[StrategyResult], dominance: Sequence[Dominance]) -> list[Claim]:
    """The claims the benchmark exists to check, each computed from the rows (never assumed).

    1. ``budgets_met``: every remat plan the solver found feasible has a measured peak within its
       budget.
    2. ``pareto``: every peer is dominated by some remat plan (see :func:`check_dominance`).
    3. ``fits_where_peers_do_not``: at every budget asked for that no peer's measured peak fits,
       remat's plan fits (budgets below the least peak any plan reaches are listed, not counted).
    4. ``overhead_at_50pct``: remat's overhead at the 50% budget (halfway from the least peak any
       plan reaches to the unplanned peak) is at most 1.05.
    5. ``overhead_at_full_memory``: at the memory ``full`` reaches (``remat:@full``), remat's
       overhead is at most 90% of ``full``'s (overheads as ratios to the unplanned step).

    Example:
        >>> rows = [
        ...     StrategyResult(strategy="none", kind="peer", peak_bytes=200, step_ms=10.0, overhead=1.0),
        ...     StrategyResult(strategy="full", kind="peer", peak_bytes=100, step_ms=13.0, overhead=1.3),
        ...     StrategyResult(strategy="remat:@full", kind="remat", budget="@full", budget_bytes=100,
        ...                    peak_bytes=100, step_ms=11.0, overhead=1.1, budget_met=True),
        ... ]
        >>> {c.name: c.status for c in check_claims(rows, check_dominance(rows))}  # doctest: +NORMALIZE_WHITESPACE
        {'budgets_met': 'pass', 'pareto': 'fail', 'fits_where_peers_do_not': 'not_evaluated',
         'overhead_at_50pct': 'not_evaluated', 'overhead_at_full_memory': 'pass'}
    """
    remat_rows = [r for r in rows if r.kind == "remat"]
    peers = [r for r in rows if r.kind != "remat"]
    claims = []

    checked = [r for r in remat_rows if r.status == "ok" and r.budget_met is not None]
    over = [r.strategy for r in checked if not r.budget_met]
    claims.append(
        Claim(
            name="budgets_met",
            statement="every feasible remat plan's measured peak is within its budget",
            status="not_evaluated" if not checked else ("fail" if over else "pass"),
            detail=f"over budget: {', '.join(over)}" if over else f"{len(checked)} plans checked",
        )
    )

    judged = [d for d in dominance if d.reason not in ("peak not measured", "peer failed")]
    beaten = [d.peer for d in judged if not d.dominated]
    unjudged = [d.peer for d in dominance if d not in judged]
    detail = f"not dominated: {', '.join(beaten)}" if beaten else f"{len(judged)} peers dominated"
    if unjudged:
        detail += f"; not judged (failed, or peak not measured): {', '.join(unjudged)}"
    claims.append(
        Claim(
            name="pareto",
            statement=(
                "every peer is dominated by a remat plan: measured peak no higher, step time at"
                f" most {NOISE_MARGIN:.0%} above"
            ),
            status="not_evaluated" if not judged else ("fail" if beaten else "pass"),
            detail=detail,
        )
    )

    asked = [
        r for r in remat_rows if r.budget_bytes is not None and not str(r.budget).startswith("@")
    ]
    open_budgets = [
        r
        for r in asked
        if not any(p.peak_bytes is not None and p.peak_bytes <= r.budget_bytes for p in peers)  # type: ignore[operator]
    ]
    # A budget below the least peak any plan reaches cannot be met by any strategy: not counted.
    below_min = [
        r
        for r in open_budgets
        if r.status == "infeasible"
        and r.min_peak_bytes is not None
        and r.budget_bytes is not None
        and r.budget_bytes < r.min_peak_bytes
    ]
    open_budgets = [r for r in open_budgets if r not in below_min]
    unmet = [r.strategy for r in open_budgets if not r.budget_met]
    detail = f"budgets no peer fits: {', '.join(r.budget or '' for r in open_budgets) or 'none'}"
    if unmet:
        detail += f"; remat misses: {', '.join(unmet)}"
    if below_min:
        detail += (
            f"; below the least achievable peak, for every plan: "
            f"{', '.join(r.budget or '' for r in below_min)}"
        )
    claims.append(
        Claim(
            name="fits_where_peers_do_not",
            statement="at every achievable budget no peer fits, remat's plan fits",
            status="not_evaluated" if not open_budgets else ("fail" if unmet else "pass"),
            detail=detail,
        )
    )

    half = next((r for r in remat_rows if r.budget == "50%"), None)
    if half is None or half.overhead is None:
        claims.append(
            Claim(
                name="overhead_at_50pct",
                statement=HALF_BUDGET_STATEMENT,
                status="not_evaluated",
                detail="no measured remat:50% in this run",
            )
        )
    else:
        detail = f"remat:50% overhead {half.overhead:.3f}" + _prediction_note(
            half, HALF_BUDGET_MAX_OVERHEAD
        )
        claims.append(
            Claim(
                name="overhead_at_50pct",
                statement=HALF_BUDGET_STATEMENT,
                status="pass" if half.overhead <= HALF_BUDGET_MAX_OVERHEAD else "fail",
                detail=detail,
            )
        )

    full = next((r for r in peers if r.strategy == "full"), None)
    at_full = next((r for r in remat_rows if r.budget == "@full"), None)
    statement = (
        f"at the memory full reaches, remat's overhead is at most {FULL_MEMORY_OVERHEAD_SHARE:.0%}"
        " of full's"
    )
    if full is None or at_full is None or full.overhead is None or at_full.overhead is None:
        claims.append(
            Claim(
                name="overhead_at_full_memory",
                statement=statement,
                status="not_evaluated",
                detail="needs measured full and remat:@full",
            )
        )
    else:
        limit = FULL_MEMORY_OVERHEAD_SHARE * full.overhead
        fits = at_full.peak_bytes is not None and full.peak_bytes is not None
        fits = fits and at_full.peak_bytes <= full.peak_bytes  # type: ignore[operator]
        detail = (
            f"remat:@full {at_full.overhead:.3f} vs full {full.overhead:.3f} (limit {limit:.3f})"
        )
        if not fits:
            detail += "; remat:@full's peak is above full's"
        if at_full.same_as == "full":
            detail += "; the solver's plan at full's peak is full's own"
        detail += _prediction_note(at_full, limit)
        claims.append(
            Claim(
                name="overhead_at_full_memory",
                statement=statement,
                status="pass" if fits and at_full.overhead <= limit else "fail",
                detail=detail,
            )
        )
    return claims


def _prediction_note(row: StrategyResult, limit: float) -> str:
    """What the solver predicted for ``row`` and its bound over every plan that fits, and whether
    that bound already breaks ``limit`` (then no plan can meet the claim, whatever the noise).

    Example:
        >>> row = StrategyResult(strategy="remat:50%", kind="remat", predicted_overhead=1.2,
        ...                      overhead_bound=1.1)
        >>> _prediction_note(row, 1.05)  # doctest: +NORMALIZE_WHITESPACE
        ' (predicted 1.200; no plan that fits is predicted under 1.100, above the limit:
        out of reach on this model and machine)'
    """
    if row.predicted_overhead is None:
        return ""
    note = f" (predicted {row.predicted_overhead:.3f}"
    if row.overhead_bound is not None:
        note += f"; no plan that fits is predicted under {row.overhead_bound:.3f}"
        if row.overhead_bound > limit:
            note += ", above the limit: out of reach on this model and machine"
    return note + ")"


@dataclass(kw_only=True)
class BenchResult:
    """A benchmark run: its setting, every strategy's samples and summary, and the verdicts.

    Example:
        >>> rows = [StrategyResult(strategy="none", kind="peer", samples_ms=[10.0], peak_bytes=5)]
        >>> result = BenchResult(model="tiny", results=rows)
        >>> BenchResult.from_json(result.to_json()).results[0].peak_bytes
        5
    """

    model: str
    results: list[StrategyResult]
    torch_version: str = ""
    device: str = ""
    dtype: str = ""
    seed: int = 0
    optimizer: str = ""
    machine: str = ""
    date: str = ""
    steps: int = 0
    """Timed steps per strategy (after the warm-up)."""
    warmup_steps: int = 0
    units: list[str] = field(default_factory=list)
    static_bytes: int | None = None
    unplanned_peak_bytes: int | None = None
    """The ``none`` strategy's measured peak: the 100% of percentage budgets."""
    wall_s: float | None = None
    cpu_count: int | None = None
    load_avg: list[float] = field(default_factory=list)
    """The machine's 1-minute load average before and after the timed rounds (Unix): above
    ``cpu_count``, other processes competed for the cores and the step times are unreliable."""
    dominance: list[Dominance] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def busy(self) -> bool:
        """Whether the load average exceeded the cores while timing (see ``load_avg``).

        Example:
            >>> BenchResult(model="m", results=[], cpu_count=2, load_avg=[0.4, 3.1]).busy
            True
        """
        return bool(self.cpu_count and self.load_avg and max(self.load_avg) > self.cpu_count)

    def row(self, strategy: str) -> StrategyResult:
        """The row of one strategy (``KeyError`` naming the strategies there are)."""
        for row in self.results:
            if row.strategy == strategy:
                return row
        raise KeyError(f"{strategy!r}; this run has {[r.strategy for r in self.results]}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, with ``format_version`` and ``kind``."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["results"] = [r.to_dict() for r in self.results]
        data["dominance"] = [d.to_dict() for d in self.dominance]
        data["claims"] = [c.to_dict() for c in self.claims]
        return {"format_version": FORMAT_VERSION, "kind": "remat.bench", **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        """Write the JSON form to ``path``."""
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "bench result") -> BenchResult:
        """Read the JSON form; anything else is a ``ValueError`` saying what was expected."""
        if not isinstance(data, Mapping) or data.get("kind") != "remat.bench":
            raise ValueError(
                f"{source}: not a remat bench result (expected a JSON object with kind"
                " 'remat.bench', as remat bench writes)"
            )
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{source}: format_version {version!r} is not one this remat reads"
                f" (<= {FORMAT_VERSION}); upgrade remat, or re-run remat bench"
            )
        try:
            row_names = {f.name for f in fields(StrategyResult)}
            rows = [
                StrategyResult(**{k: v for k, v in row.items() if k in row_names})
                for row in data["results"]
            ]
            dominance = [
                Dominance(**{k: v for k, v in d.items() if k != "dominated"})
                for d in data.get("dominance", [])
            ]
            claims = [Claim(**c) for c in data.get("claims", [])]
            names = {f.name for f in fields(cls)} - {"results", "dominance", "claims"}
            rest = {k: v for k, v in data.items() if k in names}
            return cls(results=rows, dominance=dominance, claims=claims, **rest)
        except (KeyError, TypeError) as error:
            raise ValueError(f"{source}: not a remat bench result ({error})") from None

    @classmethod
    def from_json(cls, text: str, *, source: str = "bench result") -> BenchResult:
        """Parse the JSON form."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{source}: not valid JSON at line {error.lineno}, column {error.colno}"
            ) from None
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls, path: str | Path) -> BenchResult:
        """Read a file that :meth:`save` (or ``remat bench``) wrote."""
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise ValueError(
                f"bench result {str(path)!r}: cannot read it ({error.strerror}); run remat bench"
                " MODEL --out DIR to make one"
            ) from None
        return cls.from_json(text, source=str(path))
