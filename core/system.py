"""A system of Gaussian paths over several tensors, diffused and sampled jointly.

GDSS (Jo et al. 2022, "Score-based Generative Modeling of Graphs via the System of Stochastic
Differential Equations", seed 184) diffuses node features ``X`` and adjacency ``A`` with one forward
SDE each,

    dX = f_X(t) X dt + g_X(t) dW_X,        dA = f_A(t) A dt + g_A(t) dW_A,      t in [0, 1],

sharing the time ``t`` but not the noise, and generates by solving the *system* of reverse-time
SDEs, where each component's drift needs the score of the *joint* density with respect to that
component (a "partial score"), ``grad_X log p_t(X, A)`` and ``grad_A log p_t(X, A)``: one network per
component, each seeing the whole state.

Here a system is a tuple of :class:`Component`\\ s, each a :class:`core.paths.GaussianPath` (GDSS's
VP SDE with ``beta_min, beta_max`` is :class:`core.paths.VPPath`, its VE SDE :class:`core.paths.VEPath`,
its sub-VP SDE :class:`core.paths.SubVPPath`) plus how its noise is drawn and masked:

- ``"iid"``: ``(B, N, ...)`` entries with i.i.d. N(0, 1) noise, rows of padded nodes zeroed;
- ``"symmetric"``: ``(B, N, N)`` symmetric matrices with zero diagonal: the strict upper triangle is
  i.i.d. N(0, 1) and mirrored (GDSS ``gen_noise(sym=True)``), rows and columns of padded nodes zeroed.

``mask`` is a ``(B, N)`` 0/1 tensor of real nodes (GDSS's ``flags``), or None for no padding.

A system model is a sequence of callables, one per component, ``model_k(state, t, mask)`` with
``state`` the tuple of all components' tensors and ``t`` a ``(B,)`` tensor in the data's dtype; each
returns its component's prediction in the coordinate ``Component.prediction`` (``eps``, ``score``,
``x0``, ``v`` or ``velocity``; GDSS's VP networks predict ``eps`` since its score is ``-out / sigma``, its
VE networks the ``score`` itself). Scores come from :func:`core.predictions.convert`.

Contents:

- masks and noise: :func:`mask_nodes`, :func:`mask_pairs`, :func:`iid_noise`, :func:`symmetric_noise`;
- score_sde / GDSS discretisations of a path over ``N`` steps: :func:`discrete_betas`,
  :func:`discrete_sigmas`, :func:`discrete_index`, :func:`discrete_kernel`, :func:`langevin_alpha`;
  the S4 kernel :func:`transition`; the sampling times :func:`discrete_grid`;
- :func:`system_loss`: GDSS's denoising score matching of every partial score;
- :func:`system_pc`: the predictor-corrector sampler of a system (reverse-diffusion or Euler-Maruyama
  predictor, Langevin corrector; GDSS ``get_pc_sampler``);
- :func:`system_s4`: GDSS's Symmetric Splitting for System of SDEs (S4).

Samplers follow the registry's shape, ``fn(models, system, state, grid, *, generator=None,
**options) -> (state, nfe)``, take every draw from ``generator`` (or from ``noise``, a replayable
source: :func:`replay_noise`), and within a step update every component from the state *before* the
step (a Jacobi sweep: GDSS's adjacency update uses the node features from before their update).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .grids import validate_grid
from .paths import GaussianPath, SubVPPath, VEPath, VPPath
from .predictions import PREDICTIONS, convert, from_x0_eps
from .samplers._common import coef as _coef
from .samplers._common import gaussian_like
from .samplers._common import time_vector as _tvec

__all__ = [
    "NOISE_KINDS",
    "Component",
    "GaussianSystem",
    "mask_nodes",
    "mask_pairs",
    "iid_noise",
    "symmetric_noise",
    "replay_noise",
    "discrete_betas",
    "discrete_sigmas",
    "discrete_index",
    "discrete_kernel",
    "langevin_alpha",
    "transition",
    "discrete_grid",
    "langevin_step",
    "system_loss",
    "system_pc",
    "system_s4",
]

NOISE_KINDS = ("iid", "symmetric")
PC_PREDICTORS = ("reverse_diffusion", "euler_maruyama", "none")
PC_CORRECTORS = ("langevin", "none")
LAST_STEPS = ("mean", "none")

State = tuple[Tensor, ...]
NoiseSource = Callable[[int, Tensor], Tensor]


# ------------------------------------------------------------------------------------ masks and noise


def _check_mask(mask: Tensor | None, x: Tensor, n_axis: int) -> None:
    if mask is None:
        return
    if mask.ndim != 2 or mask.shape[0] != x.shape[0] or mask.shape[1] != x.shape[n_axis]:
        raise ValueError(
            f"mask must have shape (B, N) = ({x.shape[0]}, {x.shape[n_axis]}) for a tensor of shape "
            f"{tuple(x.shape)}, got {tuple(mask.shape)}"
        )


def mask_nodes(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zero the rows of padded nodes: ``x`` is ``(B, N, ...)``, ``mask`` ``(B, N)`` (None: no mask)."""
    if mask is None:
        return x
    _check_mask(mask, x, 1)
    return x * mask.to(x.dtype).reshape(mask.shape + (1,) * (x.ndim - 2))


def mask_pairs(a: Tensor, mask: Tensor | None) -> Tensor:
    """Zero rows and columns of padded nodes: ``a`` is ``(B, N, N)`` or ``(B, C, N, N)``, ``mask`` ``(B, N)``."""
    if mask is None:
        return a
    if a.ndim not in (3, 4) or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"pairwise tensors must be (B, N, N) or (B, C, N, N), got {tuple(a.shape)}")
    _check_mask(mask, a, -1)
    m = mask.to(a.dtype)
    if a.ndim == 4:
        m = m.unsqueeze(1)
    return a * m.unsqueeze(-1) * m.unsqueeze(-2)


def iid_noise(like: Tensor, mask: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """N(0, I) noise shaped like ``like`` ``(B, N, ...)``, padded rows zeroed (GDSS ``gen_noise(sym=False)``)."""
    return mask_nodes(gaussian_like(like, generator), mask)


def symmetric_noise(like: Tensor, mask: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Symmetric noise with zero diagonal for ``(B, N, N)`` matrices (GDSS ``gen_noise(sym=True)``).

    One full N(0, 1) draw of ``like``'s shape (so the random stream matches GDSS) is cut to its strict
    upper triangle and mirrored: each off-diagonal pair shares one unit-variance value, the diagonal is
    0, and rows and columns of padded nodes are zeroed.
    """
    if like.ndim < 2 or like.shape[-1] != like.shape[-2]:
        raise ValueError(f"symmetric noise needs square trailing dimensions, got shape {tuple(like.shape)}")
    z = gaussian_like(like, generator).triu(1)
    return mask_pairs(z + z.transpose(-1, -2), mask)


def replay_noise(*per_component: Sequence[Tensor]) -> NoiseSource:
    """A noise source that hands out recorded draws: component ``k`` gets ``per_component[k]`` in order.

    For fixtures and common random numbers; the draws are used as given (already masked/symmetric).
    Running out of draws raises ValueError.
    """
    iters = [iter(list(seq)) for seq in per_component]

    def source(k: int, like: Tensor) -> Tensor:
        try:
            z = next(iters[k])
        except StopIteration:
            raise ValueError(f"replayed noise for component {k} is exhausted") from None
        if z.shape != like.shape:
            raise ValueError(f"replayed noise for component {k} has shape {tuple(z.shape)}, need {tuple(like.shape)}")
        return z.to(dtype=like.dtype, device=like.device)

    return source


# ------------------------------------------------------------------------------------ components


@dataclass(frozen=True)
class Component:
    """One tensor of a system.

    Args:
        name: a label (``"x"``, ``"adj"``), used in error messages.
        path: its Gaussian path.
        noise: ``"iid"`` (node-like, ``(B, N, ...)``) or ``"symmetric"`` (``(B, N, N)``, zero diagonal).
        prediction: the coordinate its model outputs (see :mod:`core.predictions`).
        prior_std: std of the sampler's starting noise; None takes ``path.prior_std()``. GDSS starts
            every component from N(0, I), the stationary law of the VP SDE, even where
            ``sigma(1) < 1`` (its VP with ``beta_max = 1`` has ``sigma(1) = 0.65``).
    """

    name: str
    path: GaussianPath
    noise: str = "iid"
    prediction: str = "eps"
    prior_std: float | None = None

    def __post_init__(self):
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"component {self.name!r}: unknown noise {self.noise!r}; choose one of {NOISE_KINDS}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(
                f"component {self.name!r}: unknown prediction {self.prediction!r}; choose one of {PREDICTIONS}"
            )
        if not isinstance(self.path, GaussianPath):
            raise TypeError(f"component {self.name!r}: path must be a GaussianPath, got {type(self.path).__name__}")
        if self.prior_std is not None and not (math.isfinite(self.prior_std) and self.prior_std > 0):
            raise ValueError(
                f"component {self.name!r}: prior_std must be a positive finite number, got {self.prior_std}"
            )

    def mask(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return mask_pairs(x, mask) if self.noise == "symmetric" else mask_nodes(x, mask)

    def draw(self, like: Tensor, mask: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        fn = symmetric_noise if self.noise == "symmetric" else iid_noise
        return fn(like, mask, generator)

    def start_std(self) -> float:
        return self.path.prior_std() if self.prior_std is None else float(self.prior_std)


class GaussianSystem:
    """A tuple of :class:`Component`\\ s sharing the diffusion time (GDSS's system of SDEs)."""

    def __init__(self, components: Sequence[Component]):
        components = tuple(components)
        if not components or not all(isinstance(c, Component) for c in components):
            raise ValueError("a system needs at least one Component")
        names = [c.name for c in components]
        if len(set(names)) != len(names):
            raise ValueError(f"component names must be distinct, got {names}")
        self.components = components

    def __len__(self) -> int:
        return len(self.components)

    def __iter__(self):
        return iter(self.components)

    def __getitem__(self, k: int) -> Component:
        return self.components[k]

    def __repr__(self) -> str:
        inner = ", ".join(f"{c.name}: {c.path!r} ({c.noise}, {c.prediction})" for c in self.components)
        return f"GaussianSystem({inner})"

    def check_state(self, state: Sequence[Tensor], name: str = "state") -> State:
        state = tuple(state)
        if len(state) != len(self):
            raise ValueError(f"{name} must hold {len(self)} tensors ({[c.name for c in self]}), got {len(state)}")
        b = state[0].shape[0]
        for c, s in zip(self.components, state):
            if s.shape[0] != b:
                raise ValueError(f"{name}: component {c.name!r} has batch {s.shape[0]}, expected {b}")
        return state

    def prior_sample(
        self,
        shapes: Sequence[Sequence[int]],
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device=None,
    ) -> State:
        """Starting state: component ``k`` is ``start_std * noise_k`` of shape ``shapes[k]``, drawn in order."""
        if len(shapes) != len(self):
            raise ValueError(f"need {len(self)} shapes, got {len(shapes)}")
        out = []
        for c, shape in zip(self.components, shapes):
            like = torch.empty(tuple(shape), dtype=dtype, device=device)
            out.append(c.start_std() * c.draw(like, mask, generator))
        return tuple(out)

    def scores(self, models, state: State, t: Tensor, mask: Tensor | None, which: Sequence[int] | None = None) -> list:
        """``grad_k log p_t(state)`` for each component ``k`` in ``which`` (default all) at float64 ``t``.

        ``t`` is a scalar or ``(B,)``; model ``k`` sees the whole state and ``t`` as ``(B,)`` in the data's dtype.
        """
        which = range(len(self)) if which is None else which
        out = [None] * len(self)
        for k in which:
            c, x = self.components[k], state[k]
            tv = _tvec(t, x)
            pred = models[k](state, tv, mask)
            if pred.shape != x.shape:
                raise ValueError(
                    f"model for component {c.name!r} returned shape {tuple(pred.shape)}, expected {tuple(x.shape)}"
                )
            out[k] = convert(pred, c.prediction, "score", x, _t64(t, x), c.path)
        return out


def _t64(t, x: Tensor) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64, device=x.device)


def _check_models(models, system: GaussianSystem) -> None:
    if len(models) != len(system):
        raise ValueError(f"need one model per component ({len(system)}), got {len(models)}")


# ------------------------------------------------------------------------------------ discretisations


def discrete_betas(path: GaussianPath, n: int) -> Tensor:
    """DDPM's betas of a VP path over ``n`` steps: ``linspace(beta_min / n, beta_max / n, n)`` (float64).

    score_sde / GDSS ``VPSDE.discrete_betas``; ``1 - betas`` is their ``alphas``.
    """
    n = _check_n(n)
    if not isinstance(path, VPPath):
        raise ValueError(f"discrete betas need a vp or subvp path, got {path!r}")
    return torch.linspace(path.beta_min / n, path.beta_max / n, n, dtype=torch.float64)


def discrete_sigmas(path: GaussianPath, n: int) -> Tensor:
    """SMLD's noise levels of a VE path: ``n`` geometric steps from sigma_min to sigma_max (float64)."""
    n = _check_n(n)
    if not isinstance(path, VEPath):
        raise ValueError(f"discrete sigmas need a ve path, got {path!r}")
    return torch.exp(torch.linspace(math.log(path.sigma_min), math.log(path.sigma_max), n, dtype=torch.float64))


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"the number of discrete steps must be an integer >= 2, got {n!r}")
    return n


def discrete_index(t, n: int) -> Tensor:
    """Index of time ``t`` in an ``n``-entry table: ``floor(t (n - 1))`` (score_sde's ``timestep``)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return (t * (_check_n(n) - 1)).long()


def discrete_kernel(path: GaussianPath, t, n: int) -> tuple[Tensor, Tensor]:
    """The forward step ``x_t = a x_s + sqrt(var) z`` into time ``t`` of score_sde's ``n``-step discretisation.

    Returns float64 ``(a, var)`` shaped like ``t``. GDSS's ``discretize(x, t) -> (f, G)`` is
    ``f = (a - 1) x``, ``G = sqrt(var)``:

    - VP (DDPM, Ho et al. 2020): ``a = sqrt(1 - beta_i)``, ``var = beta_i`` with ``i = floor(t (n - 1))``;
    - VE (SMLD, Song & Ermon 2019): ``a = 1``, ``var = sigma_i^2 - sigma_{i-1}^2`` (``sigma_{-1} = 0``);
    - sub-VP: Euler-Maruyama of the forward SDE over ``1 / n``: ``a = 1 + f(t) / n``, ``var = g(t)^2 / n``
      (GDSS's ``subVPSDE`` has no discretisation of its own and inherits this one).
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    if isinstance(path, SubVPPath):
        return 1.0 + path.f(t) / n, path.g2(t) / n
    if isinstance(path, VPPath):
        beta = discrete_betas(path, n)[discrete_index(t, n)]
        return torch.sqrt(1.0 - beta), beta
    if isinstance(path, VEPath):
        sig = discrete_sigmas(path, n)
        i = discrete_index(t, n)
        prev = torch.where(i > 0, sig[(i - 1).clamp(min=0)], torch.zeros_like(t))
        return torch.ones_like(t), sig[i] ** 2 - prev**2
    raise ValueError(f"score_sde's discrete tables exist for the vp, subvp and ve paths, got {path!r}")


def langevin_alpha(path: GaussianPath, t, n: int) -> Tensor:
    """The factor ``a_i`` of the Langevin step size in the ``n``-step discretisation (float64, like ``t``).

    score_sde / GDSS: the DDPM ``alphas[i] = 1 - beta_i`` on VP and sub-VP paths, 1 otherwise.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    if isinstance(path, VPPath):
        return 1.0 - discrete_betas(path, n)[discrete_index(t, n)]
    return torch.ones_like(t)


def _grid_kernel(path: GaussianPath, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """The path's exact forward kernel from ``s`` to ``t > s``: ``a = alpha_t / alpha_s``, ``var = sigma_{t|s}^2``.

    ``sigma_{t|s}^2 = sigma_t^2 - a^2 sigma_s^2 = sigma_t^2 (1 - exp(lambda_t - lambda_s))``, written with
    expm1 so that short steps do not cancel (Kingma et al. 2021, eq. 32-33).
    """
    a = path.alpha(t) / path.alpha(s)
    var = path.sigma(t) ** 2 * -torch.expm1(path.log_snr(t) - path.log_snr(s))
    return a, var


def transition(path: GaussianPath, x: Tensor, t, s) -> tuple[Tensor, Tensor]:
    """S4's transition kernel from ``t`` back to ``s < t`` (GDSS ``transition(x, t, dt)``, ``dt = s - t``).

    Mean ``alpha_s / alpha_t x`` undoes the forward drift over the step; std ``sigma_{t|s}`` is the forward
    kernel's (``sqrt(1 - exp(-int beta))`` for VP, ``sqrt(sigma_t^2 - sigma_s^2)`` for VE, as in GDSS).
    Coefficients in float64 (GDSS computes ``sqrt(1 - exp(small))`` in float32, which cancels). Returns the
    mean like ``x`` and the std as a float64 tensor shaped like ``t``.
    """
    t, s = torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(s, dtype=torch.float64)
    a, var = _grid_kernel(path, t, s)
    return x / _coef(a, x), torch.sqrt(var)


def discrete_grid(n: int = 1000, eps: float = 1e-3) -> Tensor:
    """GDSS's and score_sde's sampling times: ``linspace(1, eps, n)`` then 0, as float64.

    The ``n`` times are computed in float32 as the official code does, so that tables indexed by
    ``floor(t (n - 1))`` see the same times; the appended 0 only closes the grid (with
    ``discrete_steps=n`` every step has length ``1 / n``, whatever the grid spacing).
    """
    n = _check_n(n)
    if not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
    times = torch.linspace(1.0, eps, n, dtype=torch.float32).to(torch.float64)
    return validate_grid(torch.cat([times, times.new_zeros(1)]))


# ------------------------------------------------------------------------------------ loss


def system_loss(
    models,
    system: GaussianSystem,
    state0: Sequence[Tensor],
    *,
    mask: Tensor | None = None,
    t: Tensor | None = None,
    noise: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
    eps: float = 1e-5,
    reduce_mean: bool = False,
    likelihood_weighting: bool = False,
) -> tuple[Tensor, ...]:
    """GDSS's denoising score matching for a system (Jo et al. 2022, seed 184; GDSS ``get_sde_loss_fn``).

    One time ``t ~ U[eps, 1]`` per sample, shared by all components; each component is perturbed
    ``x_t^k = mask(alpha_k(t) x0^k + sigma_k(t) z^k)`` with its own noise ``z^k``, and model ``k``, seeing
    the whole perturbed state, is scored against ``z^k``:

    - default: ``|| sigma_k s_k + z^k ||^2`` = the eps-MSE (Song et al. 2021's ``lambda = sigma^2``);
    - ``likelihood_weighting``: ``g_k(t)^2 || s_k + z^k / sigma_k ||^2`` (Song et al. 2021b, Thm. 1).

    The squared error is summed over a sample's entries and halved (GDSS's default), or averaged with
    ``reduce_mean`` (over all entries, padded ones included, as GDSS does), then averaged over the batch.

    Args:
        models: one ``model_k(state, t, mask)`` per component (module docstring).
        state0: clean tensors, masked.
        mask: ``(B, N)`` real-node mask or None.
        t, noise: the draws, to replay recorded ones; otherwise ``t`` is drawn first (uniform in the
            data's dtype, as GDSS draws it), then the noise of each component in order, all from
            ``generator``.
        eps: the smallest training time.

    Returns:
        one scalar loss per component.
    """
    _check_models(models, system)
    state0 = system.check_state(state0, "state0")
    if not (isinstance(eps, (int, float)) and 0 <= eps < 1):
        raise ValueError(f"eps must lie in [0, 1), got {eps!r}")
    ref = state0[0]
    b = ref.shape[0]
    if t is None:
        t = torch.rand(b, generator=generator, dtype=ref.dtype, device=ref.device) * (1.0 - eps) + eps
    t64 = torch.as_tensor(t, dtype=torch.float64, device=ref.device)
    if t64.ndim == 0:
        t64 = t64.expand(b)
    if t64.shape != (b,):
        raise ValueError(f"t must have shape ({b},), got {tuple(t64.shape)}")
    if not bool(torch.isfinite(t64).all()) or bool((t64 <= 0).any()) or bool((t64 > 1).any()):
        raise ValueError(f"training times must lie in (0, 1], got {t64.tolist()}")
    if noise is None:
        noise = [c.draw(x, mask, generator) for c, x in zip(system, state0)]
    else:
        noise = system.check_state(noise, "noise")
        for c, z, x in zip(system, noise, state0):
            if z.shape != x.shape:
                raise ValueError(f"noise for {c.name!r} has shape {tuple(z.shape)}, expected {tuple(x.shape)}")
    x_t = tuple(c.mask(c.path.marginal(x, t64, z), mask) for c, x, z in zip(system, state0, noise))
    space = "score" if likelihood_weighting else "eps"
    losses = []
    for k, c in enumerate(system):
        out = models[k](x_t, _tvec(t64, ref), mask)
        pred = convert(out, c.prediction, space, x_t[k], t64, c.path)
        target = from_x0_eps(state0[k], noise[k], space, x_t[k], t64, c.path)
        err = (pred - target).square().flatten(1)
        per_sample = err.mean(1) if reduce_mean else 0.5 * err.sum(1)
        if likelihood_weighting:
            per_sample = per_sample * c.path.g2(t64).to(per_sample.dtype)
        losses.append(per_sample.mean())
    return tuple(losses)


# ------------------------------------------------------------------------------------ samplers


def langevin_step(
    x: Tensor, score: Tensor, z: Tensor, alpha, snr: float, scale_eps: float = 1.0
) -> tuple[Tensor, Tensor]:
    """One Langevin correction (Song et al. 2021, Algorithm 5; GDSS ``LangevinCorrector``).

    ``step = 2 alpha (snr ||z|| / ||score||)^2``, ``mean = x + step * score``,
    ``x' = mean + sqrt(2 step) * scale_eps * z``, with per-sample L2 norms averaged over the batch (one
    step size for the batch, as the official code does). ``scale_eps < 1`` is GDSS's damped noise.
    Returns ``(x', mean)``.
    """
    g_norm = score.flatten(1).norm(dim=1).mean().clamp(min=torch.finfo(x.dtype).tiny)
    z_norm = z.flatten(1).norm(dim=1).mean()
    step = _coef(alpha, x) * (2.0 * (snr * z_norm / g_norm) ** 2)
    mean = x + step * score
    return mean + torch.sqrt(2.0 * step) * z * scale_eps, mean


def _check_inputs(models, system: GaussianSystem, state, snr, scale_eps, last_step, discrete_steps) -> State:
    """The checks :func:`system_pc` and :func:`system_s4` share; returns the checked state."""
    _check_models(models, system)
    state = system.check_state(state)
    if isinstance(snr, bool) or not isinstance(snr, (int, float)) or not (math.isfinite(snr) and snr > 0):
        raise ValueError(f"snr must be a finite number > 0, got {snr!r}")
    if (
        isinstance(scale_eps, bool)
        or not isinstance(scale_eps, (int, float))
        or not (math.isfinite(scale_eps) and scale_eps >= 0)
    ):
        raise ValueError(f"scale_eps must be a finite number >= 0, got {scale_eps!r}")
    if last_step not in LAST_STEPS:
        raise ValueError(f"unknown last_step {last_step!r}; choose one of {LAST_STEPS}")
    if discrete_steps is not None:
        _check_n(discrete_steps)
    return state


def _noise_source(system: GaussianSystem, noise: NoiseSource | None, mask: Tensor | None, generator) -> NoiseSource:
    """``draw(k, like)``: the replayed ``noise`` if given, else component ``k``'s own masked draw."""

    def draw(k: int, like: Tensor) -> Tensor:
        return noise(k, like) if noise is not None else system[k].draw(like, mask, generator)

    return draw


def _resolve(system: GaussianSystem, grid, discrete_steps, need_alpha: bool = False) -> Tensor:
    """The grid as float64 times; an int ``n`` gives GDSS's ``n`` times with tables, else ``n`` equal steps."""
    if isinstance(grid, int) and not isinstance(grid, bool):
        if discrete_steps is not None:
            g = discrete_grid(grid)
        else:
            p = system[0].path
            g = validate_grid(torch.linspace(p.t_max, p.t_min, grid + 1, dtype=torch.float64))
    else:
        g = validate_grid(grid)
    starts = g[:-1]
    for c in system:
        # Scores divide by sigma; the forward drift f = alpha'/alpha (Euler, S4) needs alpha > 0.
        if not bool((c.path.sigma(starts) > 0).all()):
            raise ValueError(f"component {c.name!r}: every step must start where sigma(t) > 0, got grid {g.tolist()}")
        if need_alpha and not bool((c.path.alpha(starts) > 0).all()):
            raise ValueError(
                f"component {c.name!r}: this sampler needs alpha(t) > 0 where a step starts, got grid {g.tolist()}"
            )
    return g


def _step(system, t: Tensor, s: Tensor, discrete_steps):
    """Per component: ``(a, var, langevin alpha)`` of the step ``t -> s``, and the step length ``h > 0``."""
    out = []
    for c in system:
        if discrete_steps is None:
            a, var = _grid_kernel(c.path, t, s)
            out.append((a, var, a * a))
        else:
            a, var = discrete_kernel(c.path, t, discrete_steps)
            out.append((a, var, langevin_alpha(c.path, t, discrete_steps)))
    h = (t - s) if discrete_steps is None else torch.tensor(1.0 / discrete_steps, dtype=torch.float64)
    return out, h


def _onto_data(c: Component, s: Tensor, discrete_steps) -> bool:
    return discrete_steps is None and float(c.path.sigma(s)) == 0.0


def _data_limit(c: Component, x: Tensor, score: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """A step onto sigma(s) = 0 returns its limit ``alpha(s) D``, D the posterior mean at t (as the core
    samplers do): the reverse SDE ends at a draw of ``p(x0 | x_t)``, whose mean is D."""
    return _coef(c.path.alpha(s), x) * convert(score, "score", "x0", x, t, c.path)


def system_pc(
    models,
    system: GaussianSystem,
    state: Sequence[Tensor],
    grid,
    *,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: NoiseSource | None = None,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.1,
    scale_eps: float = 1.0,
    n_corrector: int = 1,
    probability_flow: bool = False,
    discrete_steps: int | None = None,
    last_step: str = "mean",
    callback=None,
) -> tuple[State, int]:
    """Predictor-corrector sampling of a system (Song et al. 2021, Alg. 2-3; GDSS ``get_pc_sampler``).

    At each grid time ``t_i``, towards ``s = t_{i+1}``:

    1. corrector: for each component ``k``, ``n_corrector`` :func:`langevin_step`\\ s with the score of
       component ``k`` and the other components held at their values before the corrector;
    2. predictor, every component from the state after the corrector, with the step's kernel
       ``x_t = a x_s + sqrt(var) z``:

       - ``"reverse_diffusion"`` (score_sde ``ReverseDiffusionPredictor``, Song et al. eq. 46-47):
         ``x_s = (2 - a) x + var * score + sqrt(var) z``;
       - ``"euler_maruyama"``: ``x_s = x - h (f x - g^2 score) + g sqrt(h) z`` (the reverse SDE of
         Song et al. 2021);
       - ``probability_flow=True`` halves the score term and drops the noise (the PF-ODE).

    ``discrete_steps=None`` (default) takes the kernel and step length from the grid (``a = alpha_t /
    alpha_s``, ``var = sigma_{t|s}^2``, ``h = t - s``, Langevin ``alpha = a^2``, as
    :func:`core.samplers.sde.pc`); a predictor step onto ``sigma = 0`` (a grid ending at t = 0) returns
    its limit ``alpha(0) D``, the posterior mean, without noise, as the core samplers do.
    ``discrete_steps=n`` reproduces score_sde / GDSS: the DDPM / SMLD tables of :func:`discrete_kernel`
    and :func:`langevin_alpha` at ``floor(t (n - 1))``, and ``h = 1 / n`` for Euler-Maruyama, on the
    times of :func:`discrete_grid`.

    Every noise is drawn, in GDSS's order (corrector x, corrector adj, predictor x, predictor adj),
    also the last step's, so a seeded run follows the official random stream.

    Args:
        models: one ``model_k(state, t, mask)`` per component.
        state: the starting tensors at ``grid[0]`` (e.g. :meth:`GaussianSystem.prior_sample`).
        grid: descending times or an int number of steps.
        mask: ``(B, N)`` real-node mask, applied to every draw.
        noise: ``noise(k, like) -> z`` replaces the draws (:func:`replay_noise`).
        snr, scale_eps: the corrector's signal-to-noise ratio and noise scale (GDSS: 0.05-0.2, 0.7).
        last_step: ``"mean"`` returns the last predictor step without its noise (GDSS ``denoise=True``),
            ``"none"`` the full step.

    Returns:
        the final state and the NFE: system evaluations (each one call of every component's model),
        ``steps * (n_corrector + 1)`` with a predictor.
    """
    state = _check_inputs(models, system, state, snr, scale_eps, last_step, discrete_steps)
    if predictor not in PC_PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; choose one of {PC_PREDICTORS}")
    if corrector not in PC_CORRECTORS:
        raise ValueError(f"unknown corrector {corrector!r}; choose one of {PC_CORRECTORS}")
    if isinstance(n_corrector, bool) or not isinstance(n_corrector, int) or n_corrector < 0:
        raise ValueError(f"n_corrector must be an integer >= 0, got {n_corrector!r}")
    grid = _resolve(system, grid, discrete_steps, need_alpha=predictor == "euler_maruyama")
    draw = _noise_source(system, noise, mask, generator)
    half = 0.5 if probability_flow else 1.0
    means = state
    nfe = 0
    for i in range(len(grid) - 1):
        t, s = grid[i], grid[i + 1]
        coefs, h = _step(system, t, s, discrete_steps)
        if callback is not None:
            callback(i, float(t), state)
        if corrector == "langevin" and n_corrector > 0:
            new, new_means = [], []
            for k in range(len(system)):
                local = list(state)
                for _ in range(n_corrector):
                    score = system.scores(models, tuple(local), t, mask, which=[k])[k]
                    local[k], mean = langevin_step(local[k], score, draw(k, local[k]), coefs[k][2], snr, scale_eps)
                new.append(local[k])
                new_means.append(mean)
            state, means = tuple(new), tuple(new_means)
            nfe += n_corrector
        if predictor == "none":
            continue
        scores = system.scores(models, state, t, mask)
        nfe += 1
        new, new_means = [], []
        for k, c in enumerate(system):
            x, score = state[k], scores[k]
            if _onto_data(c, s, discrete_steps):
                new_means.append(_data_limit(c, x, score, t, s))
                new.append(new_means[-1])
                continue
            if predictor == "reverse_diffusion":
                a, var, _ = coefs[k]
                mean = _coef(2.0 - a, x) * x + _coef(half * var, x) * score
                std = torch.sqrt(var)
            else:
                f, g2 = c.path.f(t), c.path.g2(t)
                mean = x - _coef(h * f, x) * x + _coef(half * h * g2, x) * score
                std = torch.sqrt(h * g2)
            z = draw(k, x)
            new_means.append(mean)
            new.append(mean if probability_flow else mean + _coef(std, x) * z)
        state, means = tuple(new), tuple(new_means)
    return (means if last_step == "mean" else state), nfe


def system_s4(
    models,
    system: GaussianSystem,
    state: Sequence[Tensor],
    grid,
    *,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: NoiseSource | None = None,
    snr: float = 0.1,
    scale_eps: float = 1.0,
    discrete_steps: int | None = None,
    last_step: str = "mean",
    callback=None,
) -> tuple[State, int]:
    """Symmetric Splitting for System of SDEs, S4 (Jo et al. 2022, seed 184; GDSS ``S4_solver``).

    One score evaluation per step. From ``t`` to ``s = t - h``, with the scores ``s_k`` of the state at ``t``:

    1. Langevin correction of every component with ``s_k`` (:func:`langevin_step`);
    2. Strang splitting of the reverse SDE into its linear part (the forward SDE ``f x dt + g dW``,
       solved by :func:`transition`) and the score drift ``-g^2 s_k``, integrated once, in the middle:
       ``x <- transition(x, t, t - h/2) + noise``, ``x <- x + h g_k(t)^2 s_k``,
       ``x <- transition(x, t - h/2, s) + noise``; the step's mean is the last transition's mean.

    Grid, ``discrete_steps`` (table Langevin factor, ``h = 1 / n``), ``noise``, ``mask`` and ``last_step``
    as in :func:`system_pc`. With ``discrete_steps`` a step never passes t = 0 (``h = min(1/n, t)``;
    GDSS's last step overshoots to ``eps - 1/n``, where sigma is undefined for VP). On a grid, a
    component whose step lands on sigma = 0 returns ``alpha(0) D`` from the step's score instead.
    Draw order per step: Langevin noise of every component, then the first transition's, then the
    second's (GDSS's order). Returns the state and the NFE (one per step).
    """
    state = _check_inputs(models, system, state, snr, scale_eps, last_step, discrete_steps)
    grid = _resolve(system, grid, discrete_steps, need_alpha=True)
    draw = _noise_source(system, noise, mask, generator)
    means = state
    nfe = 0
    n = len(system)
    for i in range(len(grid) - 1):
        t, s = grid[i], grid[i + 1]
        coefs, h = _step(system, t, s, discrete_steps)
        if discrete_steps is not None:
            # GDSS's last step overshoots to eps - 1/n < 0, where sigma(s) is undefined: stop at 0.
            h = torch.minimum(h, t)
        if callback is not None:
            callback(i, float(t), state)
        scores = system.scores(models, state, t, mask)
        nfe += 1
        # Components whose step lands on data (sigma(s) = 0) take the step's limit; the others split.
        done = {
            k: _data_limit(system[k], state[k], scores[k], t, s)
            for k in range(n)
            if _onto_data(system[k], s, discrete_steps)
        }
        todo = [k for k in range(n) if k not in done]
        xs = dict(done)
        for k in todo:
            xs[k] = langevin_step(state[k], scores[k], draw(k, state[k]), coefs[k][2], snr, scale_eps)[0]
        mid = t - h / 2
        for k in todo:
            mu, std = transition(system[k].path, xs[k], t, mid)
            xs[k] = mu + _coef(std, mu) * draw(k, mu)
        for k in todo:
            xs[k] = xs[k] + _coef(h * system[k].path.g2(t), xs[k]) * scores[k]
        new, new_means = dict(done), dict(done)
        for k in todo:
            mu, std = transition(system[k].path, xs[k], mid, t - h)
            new_means[k] = mu
            new[k] = mu + _coef(std, mu) * draw(k, mu)
        state, means = tuple(new[k] for k in range(n)), tuple(new_means[k] for k in range(n))
    return (means if last_step == "mean" else state), nfe
