"""GDSS (Jo et al. 2022, seed 184) on polydiff's core: the graph system, its models, sampling and loss.

A graph is the pair ``(X, A)``, node features ``(B, N, F)`` and symmetric adjacency ``(B, N, N)``,
with node flags ``(B, N)``. GDSS diffuses each with its own SDE (:func:`gdss_path`) and learns one
score network per component; :mod:`core.system` holds the system machinery (loss, PC sampler, S4).

GDSS's configs name SDEs as ``{type: VP|VE|subVP, beta_min, beta_max, num_scales}``; for VE the two
betas are passed as ``sigma_min, sigma_max`` (``utils/loader.py load_sde``), so QM9's VE runs on
``sigma in [0.1, 1]``. Its VP and sub-VP networks predict ``-sigma * score`` (``eps``), its VE networks
the score itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from core.paths import GaussianPath, SubVPPath, VEPath, VPPath
from core.system import Component, GaussianSystem, discrete_grid, system_loss, system_pc, system_s4

from .utils import mask_adjs, mask_x

__all__ = ["SDE_TYPES", "gdss_path", "gdss_system", "gdss_models", "gdss_sample", "gdss_loss"]

SDE_TYPES = ("VP", "VE", "subVP")


def gdss_path(sde_type: str, beta_min: float, beta_max: float) -> GaussianPath:
    """GDSS's SDE as a path: ``VP``/``subVP`` with ``beta(t)`` from beta_min to beta_max, ``VE`` with
    ``sigma`` from beta_min to beta_max (GDSS's loader passes the betas as sigmas). ``t_min`` is 0:
    GDSS's own ``eps`` (1e-5 in training, 1e-4 when sampling) is an argument of the loss and grid."""
    if sde_type == "VP":
        return VPPath(beta_min, beta_max, t_min=0.0)
    if sde_type == "subVP":
        return SubVPPath(beta_min, beta_max, t_min=0.0)
    if sde_type == "VE":
        return VEPath(sigma_min=beta_min, sigma_max=beta_max)
    raise ValueError(f"unknown GDSS sde type {sde_type!r}; choose one of {SDE_TYPES}")


def _component(name: str, sde, noise: str) -> Component:
    if isinstance(sde, GaussianPath):
        path, kind = sde, ("VE" if isinstance(sde, VEPath) else "VP")
    else:
        if isinstance(sde, dict):
            sde = (sde["type"], sde["beta_min"], sde["beta_max"])
        kind = sde[0]
        path = gdss_path(*sde)
    # GDSS's prior is N(0, I) for every SDE (prior_sampling ignores sigma(1) and sigma_max).
    return Component(name, path, noise=noise, prediction="score" if kind == "VE" else "eps", prior_std=1.0)


def gdss_system(sde_x=("VP", 0.1, 1.0), sde_adj=("VP", 0.1, 1.0)) -> GaussianSystem:
    """The system ``(X, A)``: X with i.i.d. node noise, A with symmetric zero-diagonal noise.

    Each SDE is ``(type, beta_min, beta_max)``, a GDSS config dict (``{"type", "beta_min", "beta_max"}``)
    or a :class:`~core.paths.GaussianPath`. Defaults: community_small's VP(0.1, 1.0) for both.
    """
    return GaussianSystem([_component("x", sde_x, "iid"), _component("adj", sde_adj, "symmetric")])


def gdss_models(model_x: Callable, model_adj: Callable) -> tuple[Callable, Callable]:
    """Adapt GDSS networks ``net(x, adj, flags)`` to the system signature ``model(state, t, mask)``."""
    return (lambda s, t, m: model_x(s[0], s[1], m)), (lambda s, t, m: model_adj(s[0], s[1], m))


def gdss_sample(
    model_x,
    model_adj,
    system: GaussianSystem,
    flags: Tensor,
    n_feat: int,
    *,
    solver: str = "pc",
    steps: int = 1000,
    eps: float = 1e-4,
    generator: torch.Generator | None = None,
    **options,
) -> tuple[Tensor, Tensor, int]:
    """Generate graphs with the node counts of ``flags`` ``(B, N)`` as GDSS's ``sample.py`` does.

    Draws the masked N(0, I) prior (X first, then A), then runs :func:`core.system.system_pc`
    (``solver="pc"``; options ``predictor``, ``corrector``, ``snr``, ``scale_eps``, ...) or
    :func:`core.system.system_s4` (``solver="s4"``) on GDSS's ``steps`` times ``linspace(1, eps, steps)``
    with its discrete tables. Returns ``(x, adj, nfe)``; quantise ``adj`` with :func:`graph.utils.quantize`.
    """
    if solver not in ("pc", "s4"):
        raise ValueError(f"unknown solver {solver!r}; choose 'pc' or 's4'")
    b, n = flags.shape
    with torch.no_grad():
        state = system.prior_sample(
            [(b, n, n_feat), (b, n, n)], flags, generator, dtype=flags.dtype, device=flags.device
        )
        fn = system_pc if solver == "pc" else system_s4
        grid = discrete_grid(steps, eps)
        (x, adj), nfe = fn(
            gdss_models(model_x, model_adj),
            system,
            state,
            grid,
            mask=flags,
            generator=generator,
            discrete_steps=steps,
            **options,
        )
    return mask_x(x, flags), mask_adjs(adj, flags), nfe


def gdss_loss(model_x, model_adj, system: GaussianSystem, x: Tensor, adj: Tensor, flags: Tensor, **options):
    """GDSS's training loss ``(loss_x, loss_adj)`` (:func:`core.system.system_loss`; options ``t``, ``noise``,
    ``generator``, ``eps``, ``reduce_mean``, ``likelihood_weighting``). ``flags``: :func:`graph.utils.node_flags`."""
    return system_loss(gdss_models(model_x, model_adj), system, (x, adj), mask=flags, **options)
