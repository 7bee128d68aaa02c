"""Reports of a benchmark: a Markdown table, a Pareto plot (PNG), an HTML page, and the JSON.

Consumes a :class:`~remat.benchmarking.result.BenchResult` (fresh, or loaded from ``bench.json``:
``remat report`` re-renders from the file alone); produces text and files. The plot needs
matplotlib (the ``plot`` extra), imported only when a plot is drawn. Imports no torch.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

from remat.benchmarking.result import BenchResult, StrategyResult
from remat.units import format_bytes

__all__ = ["render_html", "render_markdown", "render_plot", "timeline_filename", "write_report"]

_COLUMNS = (
    "strategy",
    "budget",
    "measured peak",
    "predicted peak",
    "step time",
    "overhead",
    "budget met",
    "notes",
)


def _bytes(value: int | None) -> str:
    return "-" if value is None else format_bytes(value)


def _cells(row: StrategyResult) -> list[str]:
    budget = "-"
    if row.budget is not None:
        budget = row.budget
        if row.budget_bytes is not None:
            budget += f" ({format_bytes(row.budget_bytes)})"
    met = {True: "yes", False: "NO", None: "-"}[row.budget_met]
    notes = []
    if row.status != "ok":
        notes.append(row.status)
    if row.same_as:
        notes.append(f"same plan as {row.same_as}")
    compiled = row.kind == "compile" or row.strategy.endswith("+compile")
    if compiled and row.status == "ok" and row.peak_bytes is None:
        notes.append("compiled: peak not measured here")
    return [
        row.strategy,
        budget,
        _bytes(row.peak_bytes),
        _bytes(row.predicted_peak_bytes),
        "-" if row.step_ms is None else f"{row.step_ms:.1f} ms",
        "-" if row.overhead is None else f"{row.overhead:.3f}",
        met,
        "; ".join(notes),
    ]


def _setting(result: BenchResult) -> str:
    return (
        f"{result.model} on {result.device} ({result.dtype}), optimizer {result.optimizer},"
        f" seed {result.seed}, torch {result.torch_version}; {result.warmup_steps} warm-up and"
        f" {result.steps} timed steps per strategy, interleaved, medians; {result.machine};"
        f" {result.date}" + (f"; load average {result.load_avg}" if result.load_avg else "")
    )


def render_markdown(result: BenchResult) -> str:
    """The table of every strategy, then the dominance of each peer and the claims.

    Example:
        >>> from remat.benchmarking.result import StrategyResult, summarize
        >>> rows = [StrategyResult(strategy="none", kind="peer", samples_ms=[10.0], peak_bytes=2**20)]
        >>> summarize(rows)
        >>> print(render_markdown(BenchResult(model="tiny", results=rows)).splitlines()[6])
        | none | - | 1.00 MiB | - | 10.0 ms | 1.000 | - |  |
    """
    lines = [f"# remat bench: {result.model}", "", _setting(result), ""]
    lines.append("| " + " | ".join(_COLUMNS) + " |")
    lines.append("|" + "---|" * len(_COLUMNS))
    for row in result.results:
        lines.append("| " + " | ".join(_cells(row)) + " |")
    lines.append("")
    lines.append(
        "Overhead: step time over `none`'s in the same round, median over the rounds."
        " Peaks: the tracker's, one tracked step per strategy (never timed)."
        " `remat:<budget>` is remat's plan for that budget; `remat:@<peer>` is remat's plan with"
        " the peer's measured peak as its budget."
    )
    if any(r.kind == "compile" or r.strategy.endswith("+compile") for r in result.results):
        lines.append(
            "`compile:<f>` is the model under torch.compile (inductor) with"
            " `activation_memory_budget = f`; `remat:<budget>+compile` is remat's plan priced on"
            " the compiled path and run with each unit compiled (`remat.compile_units_`: the"
            " compiler applies the plan), its predicted peak from the eager profile's bytes."
            " A compiled step's peak is measured on CUDA only (the allocator's)."
        )
    if result.dominance:
        lines += ["", "## Dominance", ""]
        for verdict in result.dominance:
            if verdict.dominated:
                assert verdict.margin is not None
                lines.append(
                    f"- {verdict.peer}: dominated by {verdict.dominated_by}"
                    f" ({verdict.margin:+.1%} time, no more memory)"
                )
            else:
                lines.append(f"- {verdict.peer}: not dominated ({verdict.reason})")
    if result.claims:
        lines += ["", "## Claims", ""]
        for claim in result.claims:
            lines.append(f"- **{claim.status}** {claim.name}: {claim.statement} ({claim.detail})")
    for note in result.notes:
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"


def _frontier(rows: list[StrategyResult]) -> list[StrategyResult]:
    """remat's plans not dominated by another remat plan, by increasing step time."""
    points = sorted(rows, key=lambda r: (r.step_ms, r.peak_bytes))
    frontier: list[StrategyResult] = []
    for row in points:
        if not frontier or row.peak_bytes < frontier[-1].peak_bytes:  # type: ignore[operator]
            frontier.append(row)
    return frontier


def render_plot(result: BenchResult) -> bytes:
    """A PNG of measured peak against step time: one marker per strategy, remat's frontier as a
    line (needs matplotlib: ``pip install 'remat[plot]'``).

    Raises:
        ValueError: matplotlib is not installed (the message names the ``plot`` extra).

    Example:
        >>> from remat.benchmarking.result import StrategyResult, summarize
        >>> rows = [StrategyResult(strategy="none", kind="peer", samples_ms=[10.0], peak_bytes=2**20)]
        >>> summarize(rows)
        >>> render_plot(BenchResult(model="tiny", results=rows))[:4]
        b'\\x89PNG'
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(
            "the Pareto plot needs matplotlib, which is not installed: pip install 'remat[plot]'"
            " (the plot extra); the Markdown table and bench.json need nothing"
        ) from None
    measured = [
        r
        for r in result.results
        if r.status == "ok" and r.step_ms is not None and r.peak_bytes is not None
    ]
    mib = 2**20
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    markers = "osD^v<>pPhX*"
    peers = [r for r in measured if r.kind != "remat"]
    for index, row in enumerate(peers):
        assert row.peak_bytes is not None
        ax.scatter(
            row.step_ms,
            row.peak_bytes / mib,
            marker=markers[index % len(markers)],
            s=60,
            label=row.strategy,
            zorder=3,
        )
    plans = [r for r in measured if r.kind == "remat"]
    if plans:
        ax.scatter(
            [r.step_ms for r in plans],
            [r.peak_bytes / mib for r in plans],  # type: ignore[operator]
            marker="*",
            s=90,
            color="black",
            label="remat plans",
            zorder=4,
        )
        labels: dict[tuple[float, int], list[str]] = {}  # a plan measured once, named often
        for row in plans:
            labels.setdefault((row.step_ms, row.peak_bytes), []).append(  # type: ignore[arg-type]
                row.strategy.removeprefix("remat:")
            )
        for (step_ms, peak_bytes), names in labels.items():
            text = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
            ax.annotate(
                text,
                (step_ms, peak_bytes / mib),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=7,
            )
        frontier = _frontier(plans)
        ax.step(
            [r.step_ms for r in frontier],
            [r.peak_bytes / mib for r in frontier],  # type: ignore[operator]
            where="post",
            color="black",
            linewidth=1.2,
            label="remat frontier",
            zorder=2,
        )
    ax.set_xlabel("step time (ms, median)")
    ax.set_ylabel("measured peak (MiB)")
    ax.set_title(f"{result.model} on {result.device}: peak memory against step time")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def timeline_filename(strategy: str) -> str:
    """The file a strategy's memory timeline is written to beside the report
    (``remat bench --timelines``), linked from the HTML page when it exists.

    Example:
        >>> timeline_filename("remat:50%")
        'timeline-remat_50_.html'
    """
    return "timeline-" + re.sub(r"[^A-Za-z0-9.-]+", "_", strategy) + ".html"


def render_html(
    result: BenchResult, png: bytes | None = None, timelines: dict[str, str] | None = None
) -> str:
    """A self-contained page: the setting, the table, the plot (inlined), dominance and claims;
    ``timelines`` (strategy -> relative link) adds links to each plan's memory timeline.

    Example:
        >>> from remat.benchmarking.result import StrategyResult
        >>> page = render_html(BenchResult(model="tiny", results=[
        ...     StrategyResult(strategy="none", kind="peer")]))
        >>> page.startswith("<!DOCTYPE html>"), "<td>none</td>" in page
        (True, True)
    """
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in _COLUMNS)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in _cells(row)) + "</tr>"
        for row in result.results
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>remat bench: {esc(result.model)}</title>",
        "<style>body{font-family:sans-serif;max-width:72em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.25em .6em;"
        "text-align:right}td:first-child,th:first-child{text-align:left}"
        ".pass{color:#070}.fail{color:#b00}</style></head><body>",
        f"<h1>remat bench: {esc(result.model)}</h1>",
        f"<p>{esc(_setting(result))}</p>",
        f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>",
        "<p>Overhead: step time over <code>none</code>'s in the same round, median over the"
        " rounds. <code>remat:@peer</code> is remat's plan with that peer's measured peak as its budget.</p>",
    ]
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<img alt="Pareto plot" src="data:image/png;base64,{data}">')
    else:
        parts.append("<p>No plot: matplotlib is not installed (pip install 'remat[plot]').</p>")
    if timelines:
        parts.append(
            "<h2>Memory timelines</h2><p>Each plan's training step beside the unplanned"
            " one, op by op (remat timeline):</p><ul>"
        )
        for strategy, href in timelines.items():
            parts.append(f'<li><a href="{esc(href)}">{esc(strategy)}</a></li>')
        parts.append("</ul>")
    if result.dominance:
        parts.append("<h2>Dominance</h2><ul>")
        for verdict in result.dominance:
            if verdict.dominated:
                text = f"dominated by {verdict.dominated_by} ({verdict.margin:+.1%} time)"
            else:
                text = f"not dominated ({verdict.reason})"
            parts.append(f"<li>{esc(verdict.peer)}: {esc(text)}</li>")
        parts.append("</ul>")
    if result.claims:
        parts.append("<h2>Claims</h2><ul>")
        for claim in result.claims:
            parts.append(
                f'<li><b class="{esc(claim.status)}">{esc(claim.status)}</b>'
                f" {esc(claim.name)}: {esc(claim.statement)} ({esc(claim.detail)})</li>"
            )
        parts.append("</ul>")
    for note in result.notes:
        parts.append(f"<p>Note: {esc(note)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(
    result: BenchResult, out_dir: str | Path, *, stem: str = "bench", plot: bool = True
) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md``, ``<stem>.png`` (with ``plot``) and ``<stem>.html``.

    The JSON and Markdown are written first, so that a missing matplotlib loses nothing measured.

    Returns:
        The paths written, by kind (``json``, ``md``, ``png``, ``html``).

    Raises:
        ValueError: ``plot`` without matplotlib (after the JSON and Markdown are written).

    Example:
        >>> import tempfile
        >>> from remat.benchmarking.result import StrategyResult
        >>> result = BenchResult(model="tiny", results=[StrategyResult(strategy="none", kind="peer")])
        >>> sorted(write_report(result, tempfile.mkdtemp(), plot=False))
        ['html', 'json', 'md']
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    result.save(paths["json"])
    paths["md"].write_text(render_markdown(result))
    png = None
    if plot:
        png = render_plot(result)
        paths["png"] = out / f"{stem}.png"
        paths["png"].write_bytes(png)
    paths["html"] = out / f"{stem}.html"
    timelines = {  # written by remat bench --timelines; a plan measured once is linked by both
        row.strategy: name
        for row in result.results
        if (out / (name := timeline_filename(row.same_as or row.strategy))).exists()
    }
    paths["html"].write_text(render_html(result, png, timelines))
    return paths
