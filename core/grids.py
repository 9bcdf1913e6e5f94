"""Time grids for samplers: descending float64 tensors of times ``t`` from noise to data.

A grid with ``n + 1`` points makes ``n`` steps. When ``final_zero`` is set (the default) the last
point is ``t = 0``: the last step lands on data, as EDM and k-diffusion append ``sigma = 0``.

- :func:`karras_grid`: EDM's ``rho`` spacing of ``sigma_hat = sigma / alpha`` (Karras et al. 2022, eq. 5).
- :func:`uniform_t_grid`: equal steps in ``t`` (SiT, DDPM).
- :func:`logsnr_grid`: equal steps in ``logSNR`` (DPM-Solver, Lu et al. 2022).
- :func:`validate_grid`: the checks every sampler applies to a grid it is given.

A grid optimised for a given model and NFE budget lives in :mod:`core.grid_search`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .paths import GaussianPath

__all__ = ["lands_on_data", "karras_grid", "uniform_t_grid", "logsnr_grid", "make_grid", "validate_grid", "GRIDS", "sigma_range"]

DEFAULT_SIGMA_MAX = 80.0  # EDM's sigma_max, used where the path reaches pure noise (sigma/alpha = inf)
DEFAULT_SIGMA_MIN = 0.002  # EDM's sigma_min, used where the path reaches clean data (sigma/alpha = 0)


def validate_grid(grid, name: str = "grid") -> Tensor:
    """Return ``grid`` as a float64 1D tensor after checking it: finite, in [0, 1], strictly decreasing."""
    g = torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
    if g.ndim != 1 or g.numel() < 2:
        raise ValueError(f"{name} must be a 1D sequence of at least 2 times, got shape {tuple(g.shape)}")
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"{name} must be finite, got {g[~torch.isfinite(g)][0].item()}")
    if bool((g < 0).any()) or bool((g > 1).any()):
        raise ValueError(f"{name} times must lie in [0, 1], got {g[(g < 0) | (g > 1)][0].item()}")
    steps = g[1:] - g[:-1]
    if not bool((steps < 0).all()):
        i = int(torch.nonzero(steps >= 0)[0])
        raise ValueError(
            f"{name} must be strictly decreasing (noise to data), got {g[i].item()} then {g[i + 1].item()} at index {i}"
        )
    return g


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return steps


def sigma_range(path: GaussianPath, sigma_min: float | None = None, sigma_max: float | None = None):
    """Range of ``sigma_hat = sigma / alpha`` a grid spans on ``path``.

    Defaults are the path's own ends ``[t_min, t_max]``; where those are 0 or infinite (data or pure
    noise: sigma/alpha above 1e3) EDM's 0.002 and 80 stand in, and the grid then starts at ``t(sigma_max)`` rather than
    ``t_max``: draw the starting noise there (``path.prior_sample(shape, t=grid[0])``).
    """
    if sigma_max is None:
        s = float(path.sigma_hat(torch.tensor(path.t_max, dtype=torch.float64)))
        # alpha(t_max) = 0 up to rounding (linear, GVP, cosine at t = 1) gives inf or ~1e16.
        sigma_max = s if s < 1e3 else DEFAULT_SIGMA_MAX
    if sigma_min is None:
        s = float(path.sigma_hat(torch.tensor(path.t_min, dtype=torch.float64)))
        sigma_min = s if s > 0 else DEFAULT_SIGMA_MIN
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return float(sigma_min), float(sigma_max)


def lands_on_data(path: GaussianPath, final_zero: bool) -> bool:
    """``final_zero`` applies only where the path reaches clean data (sigma(0) = 0); VE stops at sigma_min."""
    return final_zero and float(path.sigma(torch.tensor(0.0, dtype=torch.float64))) == 0.0


def _finish(path: GaussianPath, t: Tensor, final_zero: bool) -> Tensor:
    t = t.clamp(0.0, 1.0)
    if final_zero:
        t = torch.cat([t, t.new_zeros(1)])
    return validate_grid(t)


def karras_grid(
    path: GaussianPath,
    steps: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    final_zero: bool = True,
) -> Tensor:
    """EDM time steps: ``sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``, mapped to t."""
    steps = _check_steps(steps)
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho}")
    final_zero = lands_on_data(path, final_zero)
    s_min, s_max = sigma_range(path, sigma_min, sigma_max)
    n = steps if final_zero else steps + 1
    if n == 1:
        sig = torch.tensor([s_max], dtype=torch.float64)
    else:
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        sig = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return _finish(path, path.t_from_sigma(sig), final_zero)


def uniform_t_grid(
    path: GaussianPath, steps: int, t_start: float | None = None, t_end: float | None = None, final_zero: bool = False
) -> Tensor:
    """``steps`` equal steps in t from ``t_start`` (default ``t_max``) to ``t_end`` (default ``t_min``)."""
    steps = _check_steps(steps)
    final_zero = lands_on_data(path, final_zero)
    t0 = path.t_max if t_start is None else float(t_start)
    t1 = path.t_min if t_end is None else float(t_end)
    if final_zero and t1 <= 0.0:  # the uniform grid already ends on data: nothing to append
        final_zero = False
    n = steps if final_zero else steps + 1
    if final_zero and n == 1:
        return _finish(path, torch.tensor([t0], dtype=torch.float64), True)
    return _finish(path, torch.linspace(t0, t1, n, dtype=torch.float64), final_zero)


def logsnr_grid(
    path: GaussianPath,
    steps: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_zero: bool = True,
) -> Tensor:
    """Equal steps in ``logSNR = -2 log sigma_hat`` between the ends of :func:`sigma_range`."""
    steps = _check_steps(steps)
    final_zero = lands_on_data(path, final_zero)
    s_min, s_max = sigma_range(path, sigma_min, sigma_max)
    n = steps if final_zero else steps + 1
    if n == 1:
        lam = torch.tensor([-2 * math.log(s_max)], dtype=torch.float64)
    else:
        lam = torch.linspace(-2 * math.log(s_max), -2 * math.log(s_min), n, dtype=torch.float64)
    return _finish(path, path.t_from_log_snr(lam), final_zero)


GRIDS = {"karras": karras_grid, "uniform": uniform_t_grid, "logsnr": logsnr_grid}


def make_grid(kind: str, path: GaussianPath, steps: int, **kwargs) -> Tensor:
    """Build a grid by name: ``karras``, ``uniform`` or ``logsnr``."""
    if kind not in GRIDS:
        raise ValueError(f"unknown grid {kind!r}; choose one of {sorted(GRIDS)}")
    return GRIDS[kind](path, steps, **kwargs)
