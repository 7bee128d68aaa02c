"""Applying plans to models in place: units, the checkpoint engine, ``apply_`` and its handle."""

from remat.apply.apply import Handle, apply_, fingerprint
from remat.apply.units import execution_order, find_units

__all__ = ["Handle", "apply_", "execution_order", "find_units", "fingerprint"]
