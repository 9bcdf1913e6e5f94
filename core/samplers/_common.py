"""What every step of the samplers in :mod:`core.samplers.ode` and :mod:`core.samplers.sde` begins with.

A step evaluates the denoiser where it starts and reports that to the caller's
``callback(i, t, x, denoised)`` (the contract stated in both modules' docstrings); the stochastic
steps draw their noise like ``x`` from the caller's generator.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_callback", "coef", "evaluate", "gaussian_like", "time_vector"]


def check_callback(callback) -> None:
    """A callback is ``None`` or callable; anything else fails before the first step."""
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable, got {callback!r}")


def evaluate(denoiser, x: Tensor, t_vec: Tensor, i: int, t: float, callback) -> Tensor:
    """``D(x, t_vec)`` at the start of step ``i``, passed on as ``callback(i, t, x, D)``.

    ``t_vec`` is the ``(B,)`` time tensor the denoiser sees, ``t`` the step's time as a float.
    """
    denoised = denoiser(x, t_vec)
    if callback is not None:
        callback(i, t, x, denoised)
    return denoised


def time_vector(t, x: Tensor) -> Tensor:
    """The model's time argument: ``t`` (a float, a 0-d or a ``(B,)`` tensor) as a ``(B,)`` tensor in x's dtype."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]).contiguous() if t.ndim == 0 else t


def coef(c, x: Tensor) -> Tensor:
    """A float64 scalar or ``(B,)`` coefficient in x's dtype, shaped to broadcast against x."""
    c = torch.as_tensor(c, dtype=torch.float64).to(dtype=x.dtype, device=x.device)
    return c if c.ndim == 0 else c.reshape(c.shape + (1,) * (x.ndim - 1))


def gaussian_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise of x's shape, dtype and device, drawn from ``generator``."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
