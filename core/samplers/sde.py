"""Stochastic samplers: reverse-time SDEs on a Gaussian path ``x_t = alpha(t) x0 + sigma(t) eps``.

Every sampler has the shared signature of :mod:`core.samplers.registry`
(``fn(denoiser, path, x, grid, *, generator=None, **options) -> (sample, nfe)``), draws every
random number from ``generator``, and takes ``callback(i, t, x, denoised)``, called once per
step with the state ``x`` at time ``t`` before the step and the denoiser output there.

Notation (t runs from noise to data, data at t = 0):

- ``D = D(x, t)`` the denoiser (posterior mean of x0), ``eps_hat = (x - alpha D) / sigma``,
- ``score = grad log p_t(x) = (alpha D - x) / sigma^2 = -eps_hat / sigma``,
- forward SDE ``dx = f x dt + g dW`` with ``f = alpha'/alpha``, ``g^2 = 2 sigma sigma' - 2 f sigma^2``.

The reverse-time SDEs with the marginals of the path form a family indexed by a diffusion
``w(t) >= 0`` (SiT, Ma et al. 2024, seed 2, sec. 2, "SDE with tunable diffusion"; Karras et al.
2022, eq. 6; w = g^2 is the reverse SDE of Song et al. 2021, eq. 6)::

    dx = [f x - (g^2 + w)/2 score] dt + sqrt(w) dW      (dt < 0)
       = [alpha' D + (sigma' + w / (2 sigma)) eps_hat] dt + sqrt(w) dW

The second line follows from ``f x - g^2/2 score = alpha' D + sigma' eps_hat`` (the PF-ODE
velocity); written with D it stays finite where alpha = 0 (pure noise on linear, GVP, cosine),
where ``f`` and ``g^2`` separately are infinite.

Ends of the path. A grid may end at t = 0, where sigma = 0 (every path but VE). No denoiser is
evaluated there, and a step onto sigma = 0 returns its limit ``alpha(0) D`` without noise, as
k-diffusion and :mod:`core.samplers.ode` do: the reverse SDE ends at a draw from
``p(x0 | x_t)``, whose mean is D, whereas an Euler-Maruyama step of the ``w = g^2`` drift onto
sigma = 0 would overshoot to ``2D - x`` on VE-like paths. ``w = g^2`` is infinite where
alpha = 0, so a grid for it must start below t = 1 on linear, GVP and cosine paths (the karras
grid does); other w and the ancestral step are finite there.

Samplers: :func:`euler_maruyama` (that SDE, any w), :func:`ancestral` (Gaussian posterior
steps, DDPM / DDIM with eta), :func:`pc` (predictor-corrector with Langevin correction) and
:func:`adaptive_sde` (adaptive EM / stochastic-Heun pair of "Gotta Go Fast").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..paths import GaussianPath
from ._common import check_callback, evaluate, gaussian_like
from ._common import coef as _coef
from ._common import time_vector as _tvec
from .registry import register, resolve_grid

__all__ = ["W_FORMS", "diffusion_fn", "euler_maruyama", "ancestral", "pc", "adaptive_sde"]

W_FORMS = ("g2", "sigma", "linear", "decreasing", "increasing-decreasing", "constant")
LAST_STEPS = ("mean", "denoise", "none")


# --------------------------------------------------------------------------- helpers


def diffusion_fn(w, path: GaussianPath, w_norm: float = 1.0) -> Callable[[Tensor], Tensor]:
    """The diffusion ``w(t)`` of the reverse-SDE family as a function of float64 times.

    ``w`` is one of

    - a name from SiT's ``diffusion_form`` (``transport/path.py``, ``compute_diffusion``), mapped
      to polydiff time (``t = 1 - t_SiT``, data at 0). SiT writes its SDE as
      ``dX = [v + eps_t s] dt + sqrt(2 eps_t) dW``, so ``w = 2 eps_t``; ``n`` is ``w_norm``:

      ========================  =============================  ================================
      name                      w(t)                           SiT ``diffusion_form``
      ========================  =============================  ================================
      ``g2``                    ``n g^2(t)``                   ``SBDM`` (Song's reverse SDE)
      ``sigma``                 ``2 n sigma(t)``               ``sigma`` (SiT's default)
      ``linear``                ``2 n t``                      ``linear``
      ``decreasing``            ``(1 - n cos(pi t))^2 / 2``    ``decreasing`` (0 at data)
      ``increasing-decreasing`` ``2 n sin(pi t)^2``            ``increasing-decreasing``
      ``constant``              ``2 n``                        ``constant``
      ========================  =============================  ================================

    - a float ``c >= 0``: ``w = c g^2`` (0 gives the probability-flow ODE, 1 Song's reverse SDE);
    - a callable ``w(t)`` of a float64 tensor of times.
    """
    if callable(w):
        return lambda t: torch.as_tensor(w(t), dtype=torch.float64)
    if isinstance(w, bool):
        raise ValueError(f"unknown diffusion w {w!r}; give a name from {W_FORMS}, a float >= 0 or a callable")
    if isinstance(w, (int, float)):
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"a constant diffusion factor w must be finite and >= 0, got {w}")
        c = float(w)
        return lambda t: c * path.g2(t)
    if not isinstance(w, str) or w not in W_FORMS:
        raise ValueError(f"unknown diffusion w {w!r}; give a name from {W_FORMS}, a float >= 0 or a callable")
    if not (isinstance(w_norm, (int, float)) and math.isfinite(w_norm) and w_norm >= 0):
        raise ValueError(f"w_norm must be finite and >= 0, got {w_norm!r}")
    n = float(w_norm)
    forms = {
        "g2": lambda t: n * path.g2(t),
        "sigma": lambda t: 2.0 * n * path.sigma(t),
        "linear": lambda t: 2.0 * n * t,
        "decreasing": lambda t: 0.5 * (1.0 - n * torch.cos(math.pi * t)) ** 2,
        "increasing-decreasing": lambda t: 2.0 * n * torch.sin(math.pi * t) ** 2,
        "constant": lambda t: torch.full_like(t, 2.0 * n),
    }
    return forms[w]


def _w_at(wf, t: Tensor) -> Tensor:
    """``w(t)`` in float64, checked: a w that is infinite (``g2`` where alpha = 0) or negative is an error."""
    w = torch.as_tensor(wf(t), dtype=torch.float64)
    w = w.expand(t.shape) if w.shape != t.shape else w
    bad = ~torch.isfinite(w) | (w < 0)
    if bool(bad.any()):
        i = bad.flatten().nonzero()[0]
        raise ValueError(
            f"diffusion w(t) must be finite and >= 0, got w={w.flatten()[i].item()} at t={t.flatten()[i].item()} "
            "(w='g2' is infinite where alpha(t) = 0: start the grid below t = 1, e.g. a karras grid)"
        )
    return w


def _sde_drift(path: GaussianPath, x: Tensor, denoised: Tensor, t: Tensor, w: Tensor) -> Tensor:
    """Drift ``alpha' D + (sigma' + w / (2 sigma)) eps_hat`` of the reverse SDE at float64 ``t`` (sigma(t) > 0)."""
    a, s = path.alpha(t), path.sigma(t)
    eps_hat = (x - _coef(a, x) * denoised) / _coef(s, x)
    return _coef(path.d_alpha(t), x) * denoised + _coef(path.d_sigma(t) + w / (2.0 * s), x) * eps_hat


def _check_last_step(last_step) -> None:
    if last_step not in LAST_STEPS:
        raise ValueError(f"unknown last_step {last_step!r}; choose one of {LAST_STEPS}")


def _final(path: GaussianPath, x: Tensor, denoised: Tensor, s: Tensor, last: bool, last_step: str) -> Tensor | None:
    """The sample, where the step towards ``s`` ends the sampler before its update; else None.

    ``last_step="denoise"`` returns ``D`` at the last grid time; a step onto sigma(s) = 0 returns its
    limit ``alpha(s) D`` (see the module docstring).
    """
    if last and last_step == "denoise":
        return denoised
    if float(path.sigma(s)) == 0.0:
        return _coef(path.alpha(s), x) * denoised
    return None


def _brownian_increment(qdt: Tensor, qdw: Tensor, h: Tensor, generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Increment ``W(h) - W(0)`` of each row's Brownian path, reusing the pieces already drawn.

    The queue holds, per row and in time order from the current time, the pieces of the path
    that earlier, rejected attempts revealed: durations ``qdt`` ``(B, L)`` float64 (0 marks an
    empty slot; empties come last) and increments ``qdw`` ``(B, L, *S)``. Pieces wholly inside
    ``[0, h]`` are summed, the piece that ``h`` cuts is split by a Brownian-bridge draw, and time
    beyond the queue gets a fresh Gaussian: "rejection sampling with memory" (Rackauckas & Nie
    2017, "Adaptive methods for stochastic differential equations via natural embeddings and
    rejection sampling with memory"). Every value drawn is kept, so accepting or rejecting a step
    on the strength of its noise cannot bias the path.

    Returns ``(dW, qdt', qdw', m)``: the increment ``(B, *S)``; the queue ``(B, L + 1)`` with a
    piece boundary at ``h``; ``m`` ``(B,)`` the number of leading pieces that make up ``[0, h]``,
    which :func:`_drop_leading` removes once the step is accepted.
    """
    b, cap = qdt.shape
    rows = torch.arange(b, device=qdt.device)
    tail = (1,) * (qdw.ndim - 2)

    def per_piece(c: Tensor) -> Tensor:  # (B, L') mask or coefficient -> broadcast against (B, L', *S)
        return c.to(qdw.dtype).reshape(c.shape + tail)

    hh = h[:, None]
    eps = 1e-12 * hh
    valid = qdt > 0
    end = qdt.cumsum(1)
    start = end - qdt
    n = valid.sum(1)
    inside = valid & (end <= hh + eps)
    cut = valid & (start < hh - eps) & (end > hh + eps)
    has_cut = cut.any(1)
    k = torch.where(has_cut, cut.to(torch.int64).argmax(1), n)  # slot of the new piece ending at h
    kc = k.clamp(max=cap - 1)
    fresh_dt = torch.where(has_cut, torch.zeros_like(h), (h - (qdt * valid).sum(1)).clamp(min=0.0))
    has_fresh = fresh_dt > eps[:, 0]
    fresh_dt = torch.where(has_fresh, fresh_dt, torch.zeros_like(h))
    # One draw serves both cases: a row either cuts a revealed piece or runs past the queue.
    xi = torch.randn((b,) + qdw.shape[2:], generator=generator, dtype=qdw.dtype, device=qdw.device)
    dt_k = torch.where(has_cut, qdt[rows, kc], torch.ones_like(h))
    f = torch.where(has_cut, (h - start[rows, kc]) / dt_k, torch.zeros_like(h))
    var = torch.where(has_cut, f * (1.0 - f) * dt_k, fresh_dt)
    dw_k = qdw[rows, kc] * _coef(has_cut.to(h), xi)
    head = _coef(f, xi) * dw_k + _coef(var.sqrt(), xi) * xi  # increment over [start of slot k, h]
    dw = (qdw * per_piece(inside)).sum(1) + head

    j = torch.arange(cap + 1, device=qdt.device)[None, :]
    src = torch.where(j <= k[:, None], j, j - 1).clamp(0, cap - 1)
    n_new = n + has_cut.to(n) + has_fresh.to(n)
    new_dt = torch.where(j < n_new[:, None], qdt.gather(1, src), torch.zeros((), dtype=qdt.dtype))
    new_dw = qdw[rows[:, None], src]
    at_k = (j == k[:, None]) & (has_cut | has_fresh)[:, None]
    at_k1 = (j == k[:, None] + 1) & has_cut[:, None]
    head_dt = torch.where(has_cut, f * dt_k, fresh_dt)[:, None]
    new_dt = torch.where(at_k, head_dt, torch.where(at_k1, (1.0 - f)[:, None] * dt_k[:, None], new_dt))
    new_dw = torch.where(
        per_piece(at_k) > 0, head[:, None], torch.where(per_piece(at_k1) > 0, (dw_k - head)[:, None], new_dw)
    )
    new_dw = new_dw * per_piece(j < n_new[:, None])
    m = torch.where(has_cut | has_fresh, k + 1, inside.sum(1))
    return dw, new_dt, new_dw, m


def _drop_leading(qdt: Tensor, qdw: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """Shift each row of the queue left by ``m`` pieces (those an accepted step has used)."""
    cap = qdt.shape[1]
    j = torch.arange(cap, device=qdt.device)[None, :] + m[:, None]
    keep = j < cap
    jc = j.clamp(max=cap - 1)
    rows = torch.arange(qdt.shape[0], device=qdt.device)[:, None]
    out_dt = torch.where(keep, qdt.gather(1, jc), torch.zeros((), dtype=qdt.dtype))
    out_dw = qdw[rows, jc] * keep.reshape(keep.shape + (1,) * (qdw.ndim - 2)).to(qdw)
    return out_dt, out_dw


# --------------------------------------------------------------------------- samplers


@register("euler_maruyama", stochastic=True, nfe=lambda steps, final_zero: steps)
def euler_maruyama(
    denoiser,
    path: GaussianPath,
    x: Tensor,
    grid,
    *,
    generator: torch.Generator | None = None,
    w="g2",
    w_norm: float = 1.0,
    last_step: str = "mean",
    callback=None,
) -> tuple[Tensor, int]:
    """Euler-Maruyama on the reverse SDE with tunable diffusion ``w`` (see module docstring).

    Step ``t_i -> t_{i+1}`` (``h = t_{i+1} - t_i < 0``):
    ``x <- x + h [alpha' D + (sigma' + w/(2 sigma)) eps_hat] + sqrt(w(t_i) |h|) z``.
    With ``w=0`` this is the Euler method on the probability-flow ODE in t (``euler`` of
    :mod:`core.samplers.ode`). A step onto sigma = 0 returns ``alpha(0) D``.

    Args:
        x: ``(B, ...)`` starting noise at ``grid[0]``.
        w, w_norm: the diffusion, see :func:`diffusion_fn` (default ``"g2"``: Song et al.'s reverse SDE).
        last_step: how the last grid interval is taken, as in SiT's ``last_step`` and score_sde's
            ``denoise`` flag: ``"mean"`` (default) the drift-only step, without noise (SiT "Mean";
            score_sde returns this ``x_mean``); ``"denoise"`` returns ``D(x, t_{N-1})`` (Tweedie,
            SiT "Tweedie"); ``"none"`` a full stochastic step. None costs an extra evaluation, and
            none matters on a grid that ends at sigma = 0 (the step onto data returns ``alpha(0) D``).
    """
    grid = resolve_grid(path, grid)
    wf = diffusion_fn(w, path, w_norm)
    _check_last_step(last_step)
    check_callback(callback)
    n = len(grid) - 1
    for i in range(n):
        t, t_next = grid[i], grid[i + 1]
        denoised = evaluate(denoiser, x, _tvec(t, x), i, float(t), callback)
        last = i == n - 1
        end = _final(path, x, denoised, t_next, last, last_step)
        if end is not None:
            return end, n
        w_t = _w_at(wf, t)
        h = t_next - t
        x = x + _coef(h, x) * _sde_drift(path, x, denoised, t, w_t)
        if not (last and last_step == "mean"):
            x = x + _coef(torch.sqrt(-h * w_t), x) * gaussian_like(x, generator)
    return x, n


@register("ancestral", stochastic=True, nfe=lambda steps, final_zero: steps)
def ancestral(
    denoiser,
    path: GaussianPath,
    x: Tensor,
    grid,
    *,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
    callback=None,
) -> tuple[Tensor, int]:
    """Ancestral sampling from the Gaussian posterior ``q(x_s | x_t, x0 = D(x_t, t))``, s < t.

    Ho et al. 2020, eq. 6-7, generalised to any path (Kingma et al. 2021, eq. 32-33): with
    ``alpha_{t|s} = alpha_t / alpha_s`` and ``sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2`` the
    posterior has variance ``sigma_{t|s}^2 sigma_s^2 / sigma_t^2``. DDIM (Song et al. 2021, eq. 12
    and 16) keeps the marginals for any noise ``c = eta * posterior std``:

        x_s = alpha_s D + sqrt(sigma_s^2 - c^2) eps_hat + c z,

    ``eta = 1`` is the posterior draw (DDPM), ``eta = 0`` deterministic DDIM. Written with
    ``r = sigma_{t|s}^2 / sigma_t^2 = 1 - exp(lambda_t - lambda_s)`` (lambda = logSNR), the step is
    ``x_s = alpha_s D + sigma_s (sqrt(1 - eta^2 r) eps_hat + eta sqrt(r) z)``, which divides by no
    alpha and is exact at both ends (alpha_t = 0 gives r = 1; sigma_s = 0 returns D).
    """
    grid = resolve_grid(path, grid)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (0.0 <= eta <= 1.0):
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    check_callback(callback)
    n = len(grid) - 1
    for i in range(n):
        t, s = grid[i], grid[i + 1]
        denoised = evaluate(denoiser, x, _tvec(t, x), i, float(t), callback)
        r = -torch.expm1(path.log_snr(t) - path.log_snr(s))
        a_t, s_t, a_s, s_s = path.alpha(t), path.sigma(t), path.alpha(s), path.sigma(s)
        eps_hat = (x - _coef(a_t, x) * denoised) / _coef(s_t, x)
        x = _coef(a_s, x) * denoised + _coef(s_s * torch.sqrt((1.0 - eta**2 * r).clamp(min=0.0)), x) * eps_hat
        c = s_s * eta * torch.sqrt(r)
        if c > 0:
            x = x + _coef(c, x) * gaussian_like(x, generator)
    return x, n


PREDICTORS = ("reverse_diffusion", "euler_maruyama")


@register("pc", stochastic=True, nfe=lambda steps, final_zero: 2 * steps)
def pc(
    denoiser,
    path: GaussianPath,
    x: Tensor,
    grid,
    *,
    generator: torch.Generator | None = None,
    predictor: str = "reverse_diffusion",
    n_corrector: int = 1,
    snr: float = 0.16,
    last_step: str = "mean",
    callback=None,
) -> tuple[Tensor, int]:
    """Predictor-corrector sampling (Song et al. 2021, Algorithms 2 and 3; score_sde ``pc_sampler``).

    At each grid time ``t_i``: ``n_corrector`` Langevin steps targeting ``p_{t_i}``, then one
    predictor step to ``t_{i+1}``. Costs ``steps * (1 + n_corrector)`` evaluations; the registry's
    NFE budget assumes the default ``n_corrector=1`` (the returned NFE is always the true count).

    Predictors, with the discrete forward kernel of the grid ``x_t = alpha_{t|s} x_s + sigma_{t|s} z``:

    - ``"reverse_diffusion"`` (default; score_sde ``ReverseDiffusionPredictor``, Song et al.
      eq. 46-47): ``x_s = (2 - alpha_{t|s}) x_t + sigma_{t|s}^2 score + sigma_{t|s} z``; for VE this is
      SMLD's ``x + (sigma_t^2 - sigma_s^2) score``, for VP the ``(2 - sqrt(1 - beta_i))`` form of eq. 47.
    - ``"euler_maruyama"``: the Euler-Maruyama step of Song's reverse SDE (``w = g^2``).

    Langevin corrector (score_sde ``LangevinCorrector``, Algorithms 4-5): with ``z ~ N(0, I)``,
    ``step = 2 a_i (snr ||z|| / ||score||)^2``, ``x <- x + step * score + sqrt(2 step) z``, where the
    norms are per-sample L2 norms averaged over the batch (as the official code does, so one step
    size serves the whole batch). score_sde sets ``a_i = 1`` for VE and ``a_i = 1 - beta_i`` (the
    discrete VP ``alphas``) for VP. For a general path we take ``a_i = alpha_{t|s}^2 =
    (alpha(t_i) / alpha(t_{i+1}))^2``, the signal kept by the grid's forward step: it is 1 on VE/EDM
    and ``exp(-int beta) ~ 1 - beta_i`` on VP, reproducing both official choices, and it is 0 at
    pure noise (alpha = 0), where ``p_t`` is the prior and no correction is needed.

    Args:
        snr: the corrector's signal-to-noise ratio r of Algorithms 4-5 (> 0; 0.16 as in the paper's
            CIFAR-10 runs).
        last_step: ``"mean"`` (default: the last predictor step without its noise, score_sde's
            ``denoise=True``), ``"denoise"`` (``D`` at the last grid time with sigma > 0 instead of
            the last predictor step, same NFE) or ``"none"``.
    """
    grid = resolve_grid(path, grid)
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; choose one of {PREDICTORS}")
    if isinstance(n_corrector, bool) or not isinstance(n_corrector, int) or n_corrector < 0:
        raise ValueError(f"n_corrector must be an integer >= 0, got {n_corrector!r}")
    if isinstance(snr, bool) or not isinstance(snr, (int, float)) or not (math.isfinite(snr) and snr > 0):
        raise ValueError(f"snr must be a finite number > 0, got {snr!r}")
    _check_last_step(last_step)
    check_callback(callback)
    wf = diffusion_fn("g2", path)
    n, nfe = len(grid) - 1, 0
    for i in range(n):
        t, s = grid[i], grid[i + 1]
        tv = _tvec(t, x)
        a_t, s_t = path.alpha(t), path.sigma(t)
        a_ts = a_t / path.alpha(s)
        for _ in range(n_corrector):
            score = (_coef(a_t, x) * denoiser(x, tv) - x) / _coef(s_t**2, x)
            nfe += 1
            z = gaussian_like(x, generator)
            z_norm = z.flatten(1).norm(dim=1).mean()
            g_norm = score.flatten(1).norm(dim=1).mean().clamp(min=torch.finfo(x.dtype).tiny)
            step = 2.0 * float(a_ts**2) * (snr * z_norm / g_norm) ** 2
            x = x + step * score + torch.sqrt(2.0 * step) * z
        denoised = evaluate(denoiser, x, tv, i, float(t), callback)
        nfe += 1
        last = i == n - 1
        end = _final(path, x, denoised, s, last, last_step)
        if end is not None:
            return end, nfe
        if predictor == "reverse_diffusion":
            var_ts = s_t**2 * -torch.expm1(path.log_snr(t) - path.log_snr(s))  # sigma_{t|s}^2, stably
            score = (_coef(a_t, x) * denoised - x) / _coef(s_t**2, x)
            x = _coef(2.0 - a_ts, x) * x + _coef(var_ts, x) * score
            noise_std = torch.sqrt(var_ts)
        else:
            w_t = _w_at(wf, t)
            x = x + _coef(s - t, x) * _sde_drift(path, x, denoised, t, w_t)
            noise_std = torch.sqrt((t - s) * w_t)
        if not (last and last_step == "mean"):
            x = x + _coef(noise_std, x) * gaussian_like(x, generator)
    return x, nfe


@register("adaptive_sde", stochastic=True, nfe=None)
def adaptive_sde(
    denoiser,
    path: GaussianPath,
    x: Tensor,
    grid,
    *,
    generator: torch.Generator | None = None,
    w="g2",
    w_norm: float = 1.0,
    eps_abs: float = 0.0078,
    eps_rel: float = 0.05,
    h_init: float = 0.01,
    r: float = 0.9,
    theta: float = 0.9,
    last_step: str = "denoise",
    brownian_memory: bool = True,
    max_iters: int = 100_000,
    callback=None,
) -> tuple[Tensor, int]:
    """Adaptive-step SDE solver of Jolicoeur-Martineau et al. 2021, "Gotta Go Fast" (seed 17), Algorithm 1.

    Each iteration, from ``(x, t)`` with step ``h > 0`` and one Brownian increment ``dW ~ N(0, h)``
    shared by both proposals (``F`` is the reverse drift of the module docstring, time runs backwards):

        x'  = x - h F(x, t) + sqrt(w(t)) dW                             (Euler-Maruyama)
        x~  = x - h F(x', t - h) + sqrt(w(t - h)) dW
        x'' = (x' + x~) / 2                                             (improved Euler / stochastic Heun)
        delta = max(eps_abs, eps_rel * max(|x'|, |x'_prev|))            (elementwise)
        E = ||(x' - x'') / delta||_2 / sqrt(d)

    ``E <= 1`` accepts the step, keeping the higher-order ``x''`` (extrapolation) and
    ``x'_prev <- x'``; in every case ``h <- min(t - t_end, theta * h * E^(-r))``. Steps are per
    sample, as in the paper and its official code: each sample carries its own ``t`` and ``h``, the
    denoiser gets a ``(B,)`` time vector, and finished samples leave the batch. Defaults are the
    paper's: ``eps_abs = 0.0078`` (1/128 of data in [-1, 1]; absolute, in x's units),
    ``eps_rel = 0.05``, ``h_init = 0.01``, ``r = theta = 0.9``.

    ``brownian_memory`` (default True; a deviation from the paper): the paper draws a new ``dW``
    after a rejection. Since ``E`` depends on that draw (through the noise term and through
    ``delta``, which grows with ``|x'|``), accepting or rejecting selects the noise, and in low
    dimension the samples come out biased (measured for a 2D Gaussian of variance 0.05 under VP:
    variance 0.08 at the default tolerances, 0.09 at ``eps_rel = 0.01``, 0.1 at 0.001; in image
    dimensions the norm over ``d`` averages the effect away). With memory, a rejected attempt's increment is kept and the
    shorter retry takes its Brownian-bridge share (:func:`_brownian_increment`), so each sample
    follows one Brownian path and the solver converges to the SDE's solution as the tolerance
    tightens. ``brownian_memory=False`` reproduces the paper's algorithm.

    Only the ends of ``grid`` matter: the solver runs from ``grid[0]`` to ``t_end``, the last grid
    time where sigma > 0 (``grid[-2]`` for a grid that ends on data at t = 0, where the score is
    singular). ``last_step="denoise"`` (default; the paper's final denoising step) then returns
    ``D(x, t_end)`` for one more evaluation; ``"none"`` returns ``x`` at ``t_end``. The callback is
    called after every iteration with the per-sample times ``(B,)`` and the current ``x``.

    Returns the sample and the NFE actually used: each batched denoiser call counts once (two per
    iteration, plus the final denoise).
    """
    grid = resolve_grid(path, grid)
    wf = diffusion_fn(w, path, w_norm)
    if last_step not in ("denoise", "none"):
        raise ValueError(f"unknown last_step {last_step!r}; choose 'denoise' or 'none'")
    for name, val in (("eps_abs", eps_abs), ("eps_rel", eps_rel), ("h_init", h_init), ("r", r), ("theta", theta)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not (math.isfinite(val) and val > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {val!r}")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}")
    check_callback(callback)
    t_end = grid[-1] if float(path.sigma(grid[-1])) > 0 else grid[-2]
    t0 = grid[0]
    tol = 1e-12 * max(1.0, float(t0))  # a sample within rounding of t_end has finished
    x, x_prev = x.clone(), x.clone()
    t = torch.full((x.shape[0],), float(t0), dtype=torch.float64, device=x.device)
    h = torch.full_like(t, min(float(h_init), float(t0 - t_end)))
    last_denoised = torch.full_like(x, float("nan"))
    # Revealed Brownian pieces per sample (see _brownian_increment); one empty slot to start.
    qdt = torch.zeros((x.shape[0], 1), dtype=torch.float64, device=x.device)
    qdw = torch.zeros((x.shape[0], 1) + x.shape[1:], dtype=x.dtype, device=x.device)
    d = x[0].numel()
    nfe, it = 0, 0
    active = t - t_end > tol
    while bool(active.any()):
        if it >= max_iters:
            raise RuntimeError(f"adaptive_sde did not reach t={float(t_end)} in max_iters={max_iters} iterations")
        idx = active.nonzero().squeeze(1)
        xa, ta, ha = x[idx], t[idx], h[idx]
        if brownian_memory:
            dw, new_dt, new_dw, used = _brownian_increment(qdt[idx], qdw[idx], ha, generator)
        else:
            dw = _coef(ha.sqrt(), xa) * gaussian_like(xa, generator)
        d1 = denoiser(xa, _tvec(ta, xa))
        w1 = _w_at(wf, ta)
        x1 = xa - _coef(ha, xa) * _sde_drift(path, xa, d1, ta, w1) + _coef(w1.sqrt(), xa) * dw
        tb = ta - ha
        d2 = denoiser(x1, _tvec(tb, x1))
        w2 = _w_at(wf, tb)
        x_tilde = xa - _coef(ha, xa) * _sde_drift(path, x1, d2, tb, w2) + _coef(w2.sqrt(), xa) * dw
        x2 = 0.5 * (x1 + x_tilde)
        nfe += 2
        delta = torch.maximum(torch.maximum(x1.abs(), x_prev[idx].abs()) * eps_rel, torch.full_like(x1, eps_abs))
        err = ((x1 - x2) / delta).flatten(1).pow(2).sum(1).div(d).sqrt().to(torch.float64)
        accept = err <= 1.0
        acc = idx[accept]
        x[acc], x_prev[acc], t[acc] = x2[accept], x1[accept], tb[accept]
        if brownian_memory:
            new_dt, new_dw = _drop_leading(new_dt, new_dw, torch.where(accept, used, torch.zeros_like(used)))
            qdt, qdw = torch.cat([qdt, qdt[:, :1] * 0], 1), torch.cat([qdw, qdw[:, :1] * 0], 1)
            qdt[idx], qdw[idx] = new_dt, new_dw
            keep = int((qdt > 0).sum(1).max().clamp(min=1))  # trim slots empty in every row
            qdt, qdw = qdt[:, :keep], qdw[:, :keep]
        t = torch.where(t - t_end <= tol, t_end.to(t), t)
        last_denoised[idx] = d1
        # err = 0 (e.g. no noise and a linear drift) gives an infinite factor; the time left caps it.
        h[idx] = torch.minimum(t[idx] - t_end, ha * theta * err.clamp(min=1e-300).pow(-r))
        active = t - t_end > tol
        if callback is not None:
            callback(it, t.clone(), x, last_denoised)
        it += 1
    if last_step == "denoise":
        x = denoiser(x, _tvec(t_end, x))
        nfe += 1
    return x, nfe
