"""Solving for plans. Everything here imports no torch: solvers run on plain numbers."""

from remat.solve.baselines import STRATEGIES, baseline_plan, parse_strategy

__all__ = ["STRATEGIES", "baseline_plan", "parse_strategy"]
