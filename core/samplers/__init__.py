"""Samplers for Gaussian paths: deterministic ODE solvers and stochastic SDE solvers.

See :mod:`core.samplers.registry` for the shared signature. Importing this package registers
every sampler in :data:`SAMPLERS`.
"""

from .registry import SAMPLERS, SamplerSpec, register, resolve_grid, sample, steps_for_nfe

__all__ = ["SAMPLERS", "SamplerSpec", "register", "resolve_grid", "sample", "steps_for_nfe"]

# Sampler modules register themselves on import.
from . import ode as ode  # noqa: E402,F401
from . import sde as sde  # noqa: E402,F401
