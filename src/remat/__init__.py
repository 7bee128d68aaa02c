"""remat: fit PyTorch training into a memory budget by recomputing activations.

Measure what each unit of a model holds for backward (:func:`track_memory`), plan which units to
recompute (:class:`Plan`, baseline strategies), and install the plan in place (:func:`apply_`),
renaming nothing and undoably. Importing remat does not initialise CUDA.
"""

from remat.apply import Handle, apply_, execution_order, find_units, fingerprint
from remat.plan import Action, Plan
from remat.profiling import MemoryReport, ModuleStats, track_memory
from remat.solve import baseline_plan

__all__ = [
    "Action",
    "Handle",
    "MemoryReport",
    "ModuleStats",
    "Plan",
    "apply_",
    "baseline_plan",
    "execution_order",
    "find_units",
    "fingerprint",
    "track_memory",
]
__version__ = "0.1.0"
