"""Deterministic samplers: solvers of the probability-flow ODE of a Gaussian path.

Every sampler has the shared signature of :mod:`core.samplers.registry`,

    fn(denoiser, path, x, grid, *, generator=None, callback=None, **options) -> (sample, nfe)

and sees the model only through ``D(x, t) -> x0_hat``. On ``x_t = alpha x0 + sigma eps`` the
probability-flow ODE (Song et al. 2021, eq. 13) written with the denoiser is

    dx/dt = alpha'(t) D + sigma'(t) eps_hat,    eps_hat = (x - alpha D) / sigma,          (1)

the velocity of the path through ``(D, eps_hat)``. In the half log-SNR ``lambda = log(alpha/sigma)``
it is semi-linear, and its exact solution from ``t`` to ``s`` (Lu et al. 2022, DPM-Solver++, eq. 9) is

    x_s = (sigma_s / sigma_t) x_t + sigma_s int_{lambda_t}^{lambda_s} e^lambda D dlambda,        (2)

which the exponential integrators (ddim, dpmpp_2m, dpmpp_3m, unipc) approximate by a polynomial
in lambda through past denoiser outputs, while euler, heun and dopri5 integrate (1) in t.

Ends of the path. A grid may end at t = 0, where sigma = 0 for every path but VE: (1) divides by
sigma there and lambda is +inf, so the step onto sigma = 0 is always first order and returns its
limit ``alpha(0) D`` (the DDIM step with h = inf; it is also the Euler step in t wherever sigma is
linear in t, e.g. on edm and linear paths). No denoiser is ever evaluated at sigma = 0. A grid may
start where alpha = 0 (linear, gvp at t = 1): (1) is finite there, lambda = -inf and (2) gives a
finite step, but a point at lambda = -inf cannot enter a polynomial in lambda, so the multistep
solvers leave it out of their history (the next step is then of lower order).

Callback: every sampler calls ``callback(i, t, x, denoised)`` once per step ``i`` with the state
``x`` at time ``t`` where the step starts (after churn for heun) and the denoiser output there
(``None`` for dopri5, which does not evaluate the denoiser at grid points). The final state is the
return value.

Path coefficients are computed in float64 from the float64 grid and enter the arithmetic as Python
floats, so the samplers run in ``x``'s dtype (float32 or float64).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..grids import validate_grid
from ..paths import GaussianPath
from ._common import check_callback, evaluate, gaussian_like, time_vector
from .registry import register

__all__ = [
    "sample_euler",
    "sample_heun",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_dpmpp_3m",
]


# -- helpers --------------------------------------------------------------------------------


class _Schedule:
    """float64 ``t, alpha, sigma, lambda = log(alpha / sigma)`` at the grid points, as Python floats."""

    def __init__(self, path: GaussianPath, grid):
        g = validate_grid(grid)
        self.t = g.tolist()
        self.alpha = path.alpha(g).tolist()
        self.sigma = path.sigma(g).tolist()
        # half log-SNR: +inf where sigma = 0 (data), -inf where alpha = 0 (pure noise)
        self.lam = (0.5 * path.log_snr(g)).tolist()
        self.steps = len(self.t) - 1


def _coefficients(path: GaussianPath, t: float) -> tuple[float, float, float, float]:
    tt = torch.tensor(t, dtype=torch.float64)
    return float(path.alpha(tt)), float(path.sigma(tt)), float(path.d_alpha(tt)), float(path.d_sigma(tt))


def _denoise(denoiser, x: Tensor, t: float) -> Tensor:
    return denoiser(x, time_vector(t, x))


def _velocity(path: GaussianPath, x: Tensor, denoised: Tensor, t: float) -> Tensor:
    """Eq. (1): ``dx/dt = alpha' D + sigma' (x - alpha D) / sigma`` at a time with sigma > 0."""
    a, s, da, ds = _coefficients(path, t)
    return (ds / s) * (x - a * denoised) + da * denoised


# -- Euler and Heun in t ----------------------------------------------------------------------


@register("euler", stochastic=False, nfe=lambda steps, final_zero: steps)
def sample_euler(denoiser, path: GaussianPath, x: Tensor, grid, *, generator=None, callback=None):
    """Euler's method on the probability-flow ODE (1) in t.

    ``x_{i+1} = x_i + (t_{i+1} - t_i) (alpha' D + sigma' eps_hat)``. On the linear path this is
    DDIM, and with ``t = 1 - tau`` it is SiT's Euler ODE sampler (Ma et al. 2024) for a
    velocity model. One evaluation per step; the step onto sigma = 0 returns ``alpha(0) D``.
    """
    check_callback(callback)
    sch = _Schedule(path, grid)
    nfe = 0
    for i in range(sch.steps):
        t, t_next = sch.t[i], sch.t[i + 1]
        denoised = evaluate(denoiser, x, time_vector(t, x), i, t, callback)
        nfe += 1
        if sch.sigma[i + 1] == 0.0:
            x = sch.alpha[i + 1] * denoised
        else:
            x = x + (t_next - t) * _velocity(path, x, denoised, t)
    return x, nfe


@register("heun", stochastic=False, nfe=lambda steps, final_zero: 2 * steps - int(final_zero), min_steps=2)
def sample_heun(
    denoiser,
    path: GaussianPath,
    x: Tensor,
    grid,
    *,
    generator: torch.Generator | None = None,
    callback=None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
):
    """Heun's second-order method in t (Karras et al. 2022, EDM, Algorithm 1), with the optional
    stochastic churn of Algorithm 2.

    Each step evaluates (1) at ``t_i`` and at the Euler prediction at ``t_{i+1}`` and averages the
    two slopes (2 evaluations); the step onto sigma = 0 is the first-order step (1 evaluation).

    Churn (``s_churn > 0``): where the noise level ``sigma_hat = sigma / alpha`` lies in
    ``[s_tmin, s_tmax]`` it is raised to ``sigma_hat (1 + gamma)``, ``gamma = min(s_churn / N,
    sqrt(2) - 1)``, at the time ``t_hat = path.t_from_sigma(.)`` (capped at ``path.t_max``), by
    ``x_hat = (alpha_hat / alpha) x + sqrt(sigma(t_hat)^2 - (alpha_hat / alpha)^2 sigma^2) s_noise z``,
    i.e. EDM's ``sqrt(sigma_hat'^2 - sigma_hat^2)`` noise in the scaled variable ``x / alpha``,
    scaled back by alpha. ``z`` is drawn with ``generator``. A start at alpha = 0 is not churned.
    """
    check_callback(callback)
    for name, val in (("s_churn", s_churn), ("s_noise", s_noise), ("s_tmin", s_tmin)):
        if not (val >= 0 and math.isfinite(val)):
            raise ValueError(f"{name} must be finite and >= 0, got {val}")
    if not s_tmax >= s_tmin:
        raise ValueError(f"need s_tmin <= s_tmax, got s_tmin={s_tmin}, s_tmax={s_tmax}")
    sch = _Schedule(path, grid)
    n = sch.steps
    nfe = 0
    for i in range(n):
        t, t_next = sch.t[i], sch.t[i + 1]
        a, s = sch.alpha[i], sch.sigma[i]
        shat = s / a if a > 0 else math.inf
        gamma = min(s_churn / n, math.sqrt(2.0) - 1.0) if (math.isfinite(shat) and s_tmin <= shat <= s_tmax) else 0.0
        if gamma > 0:
            t_hat = min(float(path.t_from_sigma(torch.tensor(shat * (1 + gamma), dtype=torch.float64))), path.t_max)
            if t_hat > t:
                a_hat, s_hat, _, _ = _coefficients(path, t_hat)
                scale = a_hat / a
                std = math.sqrt(max(s_hat**2 - (scale * s) ** 2, 0.0))
                z = gaussian_like(x, generator)
                x = scale * x + (std * s_noise) * z
                t = t_hat
        denoised = evaluate(denoiser, x, time_vector(t, x), i, t, callback)
        nfe += 1
        if sch.sigma[i + 1] == 0.0:
            x = sch.alpha[i + 1] * denoised
            continue
        d = _velocity(path, x, denoised, t)
        x_euler = x + (t_next - t) * d
        d_next = _velocity(path, x_euler, _denoise(denoiser, x_euler, t_next), t_next)
        nfe += 1
        x = x + (t_next - t) * 0.5 * (d + d_next)
    return x, nfe


# -- exponential integrators in lambda --------------------------------------------------------


@register("ddim", stochastic=False, nfe=lambda steps, final_zero: steps)
def sample_ddim(
    denoiser,
    path: GaussianPath,
    x: Tensor,
    grid,
    *,
    generator: torch.Generator | None = None,
    callback=None,
    eta: float = 0.0,
):
    """DDIM (Song, Meng & Ermon 2021, eq. 12) on any path: the first-order exponential integrator
    of (2) in data prediction (DPM-Solver++ 1, Lu et al. 2022),

        x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) D,    h = lambda_s - lambda_t.

    ``eta in [0, 1]`` gives the stochastic DDIM: of the variance ``sigma_s^2`` at ``s``,
    ``c^2 = eta^2 sigma_s^2 (1 - e^{-2h})`` is fresh noise (drawn with ``generator``) and the rest
    keeps the direction ``eps_hat``; on VP paths this is the paper's ``sigma_t(eta)``, and
    ``eta = 1`` is the ancestral (DDPM-like) step.
    """
    check_callback(callback)
    if not (0.0 <= eta <= 1.0):
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    sch = _Schedule(path, grid)
    nfe = 0
    for i in range(sch.steps):
        denoised = evaluate(denoiser, x, time_vector(sch.t[i], x), i, sch.t[i], callback)
        nfe += 1
        s_s, a_s = sch.sigma[i + 1], sch.alpha[i + 1]
        h = sch.lam[i + 1] - sch.lam[i]
        one_minus_e2h = -math.expm1(-2.0 * h)
        # ratio = sqrt(sigma_s^2 - c^2) / sigma_s: the share of sigma_s kept along eps_hat
        ratio = math.sqrt(1.0 - eta**2 * one_minus_e2h)
        x_new = (ratio * s_s / sch.sigma[i]) * x + (a_s * (-math.expm1(-h) + (1.0 - ratio) * math.exp(-h))) * denoised
        c = eta * s_s * math.sqrt(one_minus_e2h)
        if c > 0:
            x_new = x_new + c * gaussian_like(x, generator)
        x = x_new
    return x, nfe


@register("dpmpp_2m", stochastic=False, nfe=lambda steps, final_zero: steps)
def sample_dpmpp_2m(denoiser, path: GaussianPath, x: Tensor, grid, *, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): second-order multistep in lambda with
    data prediction. With ``r = h_{i-1} / h_i``,

        D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},   x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) D'.

    First order on the first step and on a step onto sigma = 0 (as k-diffusion and diffusers).
    """
    return _multistep_dpmpp(denoiser, path, x, grid, 2, callback)


@register("dpmpp_3m", stochastic=False, nfe=lambda steps, final_zero: steps)
def sample_dpmpp_3m(
    denoiser, path: GaussianPath, x: Tensor, grid, *, generator=None, callback=None, legacy: bool = False
):
    """DPM-Solver++(3M): the third-order multistep update of the official dpm-solver repository
    (``multistep_dpm_solver_third_update``, data prediction) on top of (2M).

    With ``phi_1 = e^{-h} - 1``, ``phi_2 = phi_1 / h + 1``, ``phi_3 = phi_2 / h - 1/2`` and the
    divided differences ``D1, D2`` of the last three denoiser outputs in lambda,
    ``x_s = (sigma_s/sigma_t) x_t - alpha_s phi_1 D_i + alpha_s phi_2 D1 - alpha_s phi_3 D2``.
    Orders 1 and 2 on the first two steps, first order on a step onto sigma = 0.

    Deviation from the official code: there ``D2 = (D1_0 - D1_1) / (r0 + r1)`` estimates
    ``h^2 D''/2`` while its coefficient ``-phi_3`` multiplies ``h^2 D''`` in the Taylor expansion of
    (2), so the update is only second order (local error O(h^3); k-diffusion's ``dpmpp_3m_sde`` and
    diffusers' multistep scheduler share it). We use ``D2 = 2 (D1_0 - D1_1) / (r0 + r1)``, which
    makes the local error O(h^4) and the measured global order 3 (tests/test_samplers_ode.py);
    ``legacy=True`` restores the official coefficient, e.g. to compare with those libraries.
    """
    return _multistep_dpmpp(denoiser, path, x, grid, 3, callback, d2_scale=1.0 if legacy else 2.0)


def _multistep_dpmpp(denoiser, path, x, grid, order, callback, d2_scale=2.0):
    check_callback(callback)
    sch = _Schedule(path, grid)
    history: list[tuple[float, Tensor]] = []  # (lambda, D) of earlier points with finite lambda
    nfe = 0
    for i in range(sch.steps):
        lam_t, lam_s = sch.lam[i], sch.lam[i + 1]
        denoised = evaluate(denoiser, x, time_vector(sch.t[i], x), i, sch.t[i], callback)
        nfe += 1
        h = lam_s - lam_t
        a_s = sch.alpha[i + 1]
        phi1 = math.expm1(-h)  # e^{-h} - 1; -1 when the step lands on sigma = 0 (h = inf)
        x_new = (sch.sigma[i + 1] / sch.sigma[i]) * x - (a_s * phi1) * denoised
        # past points enter only when both ends of the step have finite lambda
        k = min(order, len(history) + 1) if math.isfinite(h) else 1
        if k >= 2:
            lam1, d1 = history[-1]
            r0 = (lam_t - lam1) / h
            d1_0 = (denoised - d1) / r0
            if k == 2:
                x_new = x_new - (0.5 * a_s * phi1) * d1_0
            else:
                lam2, d2 = history[-2]
                r1 = (lam1 - lam2) / h
                d1_1 = (d1 - d2) / r1
                first = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                second = (d2_scale / (r0 + r1)) * (d1_0 - d1_1)
                phi2 = phi1 / h + 1.0
                phi3 = phi2 / h - 0.5
                x_new = x_new + (a_s * phi2) * first - (a_s * phi3) * second
        if math.isfinite(lam_t):
            history = (history + [(lam_t, denoised)])[-2:]
        x = x_new
    return x, nfe


def _unipc_coefficients(h: float, rks: list[float], order: int, variant: str):
    """UniPC's linear system (Zhao et al. 2023, Alg. 2 and 3, data prediction).

    ``rks`` are ``(lambda_{i-k} - lambda_i) / h`` for the ``order - 1`` earlier points. Returns the
    predictor weights (UniP), the corrector weights (UniC, last one for the new point) and ``B(h)``.
    ``R[k][j] = r_j^k`` and ``b_k = k! phi_{k+1}(h) / B(h)`` with ``hh = -h`` (data prediction).
    """
    hh = -h
    h_phi_1 = math.expm1(hh)  # h phi_1
    h_phi_k = h_phi_1 / hh - 1.0  # h phi_2 / h, then the recursion phi_{k+1} = (phi_k - 1/k!) / hh
    b_h = hh if variant == "bh1" else h_phi_1
    r = rks + [1.0]
    R = torch.tensor([[rk**k for rk in r] for k in range(order)], dtype=torch.float64)
    b, factorial = [], 1
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    b = torch.tensor(b, dtype=torch.float64)
    # order 2 predictor and order 1 corrector: the h -> 0 limit 1/2, as in the official code
    if order == 1:
        rhos_p = []
    elif order == 2:
        rhos_p = [0.5]
    else:
        rhos_p = torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
    rhos_c = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
    return rhos_p, rhos_c, b_h


@register("unipc", stochastic=False, nfe=lambda steps, final_zero: steps)
def sample_unipc(
    denoiser,
    path: GaussianPath,
    x: Tensor,
    grid,
    *,
    generator=None,
    callback=None,
    order: int = 2,
    variant: str = "bh2",
):
    """UniPC (Zhao et al. 2023): multistep predictor UniP-p plus corrector UniC-p in data prediction.

    Each step predicts ``x_s`` from the denoiser outputs at the last ``p`` points (UniP-p), evaluates
    the denoiser at the prediction, and corrects ``x_s`` with that new value (UniC-p, one order
    higher). The evaluation at the *uncorrected* prediction is reused by the next step, so the cost
    is one evaluation per step; the last step has no corrector (and no evaluation after it).
    ``variant="bh2"`` takes ``B(h) = e^{h} - 1`` (in ``-h`` for data prediction), ``"bh1"`` ``B(h) = h``.
    ``order`` p in {1, 2, 3}; lower orders on the first steps, first order on a step onto sigma = 0.
    With p = 1 the predictor is DDIM. The callback's ``denoised`` at step i > 0 is that evaluation at
    the uncorrected prediction of ``x_i``, which is what the step uses.
    """
    check_callback(callback)
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    sch = _Schedule(path, grid)
    denoised = _denoise(denoiser, x, sch.t[0])
    nfe = 1
    history: list[tuple[float, Tensor]] = []  # (lambda, D) of earlier points with finite lambda
    for i in range(sch.steps):
        lam_t = sch.lam[i]
        if callback is not None:
            callback(i, sch.t[i], x, denoised)
        h = sch.lam[i + 1] - lam_t
        a_s = sch.alpha[i + 1]
        x_ddim = (sch.sigma[i + 1] / sch.sigma[i]) * x - (a_s * math.expm1(-h)) * denoised
        finite = math.isfinite(h)
        p = min(order, len(history) + 1) if finite else 1
        if finite:
            past = history[len(history) - (p - 1) :][::-1]  # newest first
            rks = [(lam_k - lam_t) / h for lam_k, _ in past]
            diffs = [(d_k - denoised) / rk for (_, d_k), rk in zip(past, rks)]
            rhos_p, rhos_c, b_h = _unipc_coefficients(h, rks, p, variant)
            x_pred = x_ddim
            if diffs:
                x_pred = x_ddim - (a_s * b_h) * sum(rho * d for rho, d in zip(rhos_p, diffs))
        else:
            x_pred = x_ddim
        if i == sch.steps - 1:
            x = x_pred
            break
        denoised_next = _denoise(denoiser, x_pred, sch.t[i + 1])
        nfe += 1
        if finite:
            corr = rhos_c[-1] * (denoised_next - denoised)
            for rho, d in zip(rhos_c[:-1], diffs):
                corr = corr + rho * d
            x = x_ddim - (a_s * b_h) * corr
        else:
            x = x_pred
        if math.isfinite(lam_t):
            history = (history + [(lam_t, denoised)])[-2:]
        denoised = denoised_next
    return x, nfe


@register("dopri5", stochastic=False, nfe=None)
def sample_dopri5(
    denoiser,
    path: GaussianPath,
    x: Tensor,
    grid,
    *,
    generator=None,
    callback=None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
):
    """Adaptive Dormand-Prince 5(4) on the probability-flow ODE (1), via ``torchdiffeq.odeint``.

    Integrates in t (float64 times; the state stays in x's dtype), as score_sde's ODE sampler and
    SiT do: t covers both ends of every path, including a start at alpha = 0 where lambda and
    sigma/alpha are infinite. The grid only sets the output times (callback points). dopri5
    evaluates the right-hand side at the end of each step, so it cannot integrate onto sigma = 0:
    a grid ending there is integrated up to its last positive-sigma time and finished with the
    first-order step ``alpha(0) D`` (one more evaluation). ``nfe`` counts every evaluation.
    Callback gets ``denoised=None`` except on that last step.
    """
    from torchdiffeq import odeint

    check_callback(callback)
    for name, val in (("rtol", rtol), ("atol", atol)):
        if not (val > 0 and math.isfinite(val)):
            raise ValueError(f"{name} must be positive and finite, got {val}")
    sch = _Schedule(path, grid)
    lands = sch.sigma[-1] == 0.0
    n_ode = sch.steps - 1 if lands else sch.steps
    nfe = 0

    def rhs(t: Tensor, y: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        tt = float(t)
        return _velocity(path, y, _denoise(denoiser, y, tt), tt)

    states = [x]
    if n_ode >= 1:
        times = torch.tensor(sch.t[: n_ode + 1], dtype=torch.float64, device=x.device)
        # torchdiffeq steps past the last output time and interpolates back, and its initial
        # step-size guess may also land beyond it: both would evaluate the denoiser outside the
        # grid (t < 0 on a grid ending at t_min, where paths are undefined). A forced step onto
        # the last time and a given first step (1% of the span; the controller grows it) avoid both.
        options = {"step_t": times[-1:].clone(), "first_step": 0.01 * abs(sch.t[n_ode] - sch.t[0])}
        traj = odeint(rhs, x, times, rtol=rtol, atol=atol, method="dopri5", options=options)
        states = list(traj.unbind(0))
    if callback is not None:
        for i in range(n_ode):
            callback(i, sch.t[i], states[i], None)
    x = states[n_ode]
    if lands:
        denoised = _denoise(denoiser, x, sch.t[-2])
        nfe += 1
        if callback is not None:
            callback(sch.steps - 1, sch.t[-2], x, denoised)
        x = sch.alpha[-1] * denoised
    return x, nfe
