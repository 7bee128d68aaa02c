"""Solving for plans. Everything here imports no torch: solvers run on plain numbers."""

from remat.solve.baselines import STRATEGIES, baseline_plan, parse_strategy
from remat.solve.budget import Budget
from remat.solve.solver import FEASIBLE, INFEASIBLE, OPTIMAL, SolveResult, solve

__all__ = [
    "FEASIBLE",
    "INFEASIBLE",
    "OPTIMAL",
    "STRATEGIES",
    "Budget",
    "SolveResult",
    "baseline_plan",
    "parse_strategy",
    "solve",
]
