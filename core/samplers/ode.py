"""Deterministic samplers (probability-flow ODE); filled in by the ODE sampler work."""
