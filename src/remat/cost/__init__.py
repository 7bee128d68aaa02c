"""Cost models: profiles and the simulator of a plan's peak and time. Imports no torch."""

from remat.cost.model import Profile, Simulation, UnitProfile, example_profile, simulate

__all__ = ["Profile", "Simulation", "UnitProfile", "example_profile", "simulate"]
