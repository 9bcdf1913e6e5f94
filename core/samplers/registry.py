"""Sampler registry: every sampler is a plain function with one signature.

    fn(denoiser, path, x, grid, *, generator=None, **options) -> (sample, nfe)

- ``denoiser(x, t) -> x0_hat``: ``x`` of shape ``(B, ...)``, ``t`` a ``(B,)`` tensor (data at 0);
  wrap a network that predicts eps / v / score / velocity with :func:`core.predictions.as_denoiser`.
- ``path``: a :class:`core.paths.GaussianPath`.
- ``x``: the starting noise at time ``grid[0]``.
- ``grid``: a descending 1D tensor of times (see :mod:`core.grids`) or an int number of steps,
  which builds the sampler's default grid.
- ``generator``: an optional ``torch.Generator`` for every random draw.
- returns the sample and the number of denoiser evaluations (NFE).

:func:`sample` dispatches by name and turns an NFE budget into a grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..grids import lands_on_data, make_grid, validate_grid
from ..paths import GaussianPath

__all__ = ["SamplerSpec", "SAMPLERS", "register", "resolve_grid", "sample", "steps_for_nfe"]


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: Callable
    stochastic: bool
    # NFE spent by a grid of ``steps`` steps (final_zero tells whether the grid ends at t = 0);
    # None for adaptive samplers, whose cost is not fixed by the grid.
    nfe: Callable[[int, bool], int] | None
    default_grid: str = "karras"
    min_steps: int = 1


SAMPLERS: dict[str, SamplerSpec] = {}


def register(name: str, *, stochastic: bool, nfe=lambda steps, final_zero: steps, default_grid="karras", min_steps=1):
    """Decorator that adds a sampler function to :data:`SAMPLERS` under ``name``."""

    def wrap(fn):
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} is registered twice")
        SAMPLERS[name] = SamplerSpec(name, fn, stochastic, nfe, default_grid, min_steps)
        fn.sampler_name = name
        return fn

    return wrap


def get_spec(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def resolve_grid(path: GaussianPath, grid, kind: str = "karras") -> Tensor:
    """A grid tensor is validated; an int number of steps builds a ``kind`` grid."""
    if isinstance(grid, int) and not isinstance(grid, bool):
        return make_grid(kind, path, grid)
    return validate_grid(grid)


def steps_for_nfe(name: str, nfe: int, final_zero: bool = True) -> int:
    """Largest number of steps whose cost fits ``nfe`` evaluations; ValueError if none does."""
    spec = get_spec(name)
    if spec.nfe is None:
        raise ValueError(f"sampler {name!r} is adaptive: its NFE is not set by a budget")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    best = None
    for steps in range(spec.min_steps, nfe + 1):
        if spec.nfe(steps, final_zero) <= nfe:
            best = steps
        else:
            break
    if best is None:
        need = spec.nfe(spec.min_steps, final_zero)
        raise ValueError(f"an NFE budget of {nfe} is below what sampler {name!r} needs ({need})")
    return best


def sample(
    name: str,
    denoiser,
    path: GaussianPath,
    x: Tensor,
    grid=None,
    *,
    nfe: int | None = None,
    grid_kind: str | None = None,
    generator: torch.Generator | None = None,
    **options,
) -> tuple[Tensor, int]:
    """Run sampler ``name`` on a grid, a number of steps (``grid=int``) or an NFE budget (``nfe=``)."""
    spec = get_spec(name)
    kind = grid_kind or spec.default_grid
    if grid is None:
        if nfe is None:
            raise ValueError("give a grid, a number of steps or an NFE budget")
        # A grid ends at t = 0 only on paths that reach clean data there (not VE): cost it that way.
        final_zero = lands_on_data(path, True)
        grid = make_grid(kind, path, steps_for_nfe(name, nfe, final_zero=final_zero), final_zero=final_zero)
    elif nfe is not None:
        raise ValueError("give either a grid or an NFE budget, not both")
    else:
        grid = resolve_grid(path, grid, kind)
    return spec.fn(denoiser, path, x, grid, generator=generator, **options)
