"""remat: fit PyTorch training into a memory budget by recomputing activations.

Measure what each unit of a model holds for backward (:func:`track_memory`, :func:`profile`),
solve for the cheapest plan that fits a budget (:func:`solve`), install it in place
(:func:`apply_`), renaming nothing and undoably, or do all three with :func:`auto_`. A
:class:`Step` states the training step once (model, batch, loss, optimizer, precision,
accumulation, ranks, where it is measured); :func:`plan_step` is the pipeline every entry point
runs (profile -> solve -> measure). Compare
strategies side by side with :func:`bench`. Importing remat
does not initialise CUDA.
"""

from remat import fit
from remat.apply import Handle, apply_, execution_order, find_units, fingerprint
from remat.apply.compile import compile_units_
from remat.apply.units import NoUnitsError
from remat.auto import InfeasibleBudgetError, Planned, auto_, measure_plan, plan_step, profile_step
from remat.benchmarking import BenchResult, bench
from remat.cost import Profile, UnitProfile, simulate
from remat.plan import Action, Plan
from remat.profiling import MemoryReport, ModuleStats, track_memory
from remat.profiling.profiler import profile
from remat.profiling.step import Step
from remat.solve import Budget, SolveResult, baseline_plan, solve
from remat.timeline import timeline
from remat.verify import UnitCheck, VerifyReport, verify

__all__ = [
    "Action",
    "BenchResult",
    "Budget",
    "Handle",
    "InfeasibleBudgetError",
    "MemoryReport",
    "ModuleStats",
    "NoUnitsError",
    "Plan",
    "Planned",
    "Profile",
    "SolveResult",
    "Step",
    "UnitCheck",
    "UnitProfile",
    "VerifyReport",
    "apply_",
    "auto_",
    "baseline_plan",
    "bench",
    "compile_units_",
    "execution_order",
    "find_units",
    "fingerprint",
    "fit",
    "measure_plan",
    "plan_step",
    "profile",
    "profile_step",
    "simulate",
    "solve",
    "timeline",
    "track_memory",
    "verify",
]
__version__ = "0.1.0"
