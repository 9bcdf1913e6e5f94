"""Stochastic samplers (reverse SDE); filled in by the SDE sampler work."""
