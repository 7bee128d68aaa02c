"""Measuring: the exact memory tracker and one-step profiles of a model."""

from remat.profiling.tracker import MemoryReport, MemoryTracker, ModuleStats, track_memory

__all__ = ["MemoryReport", "MemoryTracker", "ModuleStats", "track_memory"]
