"""Benchmarking: every strategy on the same training step, measured side by side, and the reports.

:func:`bench` measures (:mod:`remat.benchmarking.run`), :class:`BenchResult` holds the samples and
verdicts (:mod:`remat.benchmarking.result`), :func:`write_report` renders Markdown, a Pareto PNG, HTML
and JSON (:mod:`remat.benchmarking.report`).
"""

from remat.benchmarking.report import render_html, render_markdown, render_plot, write_report
from remat.benchmarking.result import BenchResult, Claim, Dominance, StrategyResult
from remat.benchmarking.run import DEFAULT_BUDGETS, bench, default_strategies

__all__ = [
    "DEFAULT_BUDGETS",
    "BenchResult",
    "Claim",
    "Dominance",
    "StrategyResult",
    "bench",
    "default_strategies",
    "render_html",
    "render_markdown",
    "render_plot",
    "write_report",
]
