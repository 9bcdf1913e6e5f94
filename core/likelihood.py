"""Exact log-likelihood through the probability-flow ODE, and bits per dimension.

Song et al. 2021 (seed 24), sec. 4.3 and app. D.2; Chen et al. 2018 / Grathwohl et al. 2019
(FFJORD). The probability-flow ODE of a Gaussian path, written with the denoiser
``D(x, t) -> x0_hat`` (``eps_hat = (x - alpha D) / sigma``),

    dx/dt = v(x, t) = f x - g^2/2 score = alpha'(t) D + sigma'(t) eps_hat,

moves samples of ``p_t`` to samples of ``p_s``, and the instantaneous change of variables gives
``d log p_t(x_t) / dt = -div v(x_t, t)``. Integrating from data (``t_start``) to noise (``t_end``)
jointly with the divergence,

    log p_{t_start}(x) = log p_{t_end}(x(t_end)) + int_{t_start}^{t_end} div v(x(t), t) dt,

with ``log p_{t_end}`` taken as the path's Gaussian prior (:meth:`GaussianPath.prior_logp`).
The divergence is exact (one backward pass per dimension; small ``d``) or Hutchinson's estimate
``E[e^T (dv/dx) e]`` with Rademacher or Gaussian probes ``e``, drawn once and held fixed along
the trajectory (FFJORD), which keeps ``log p`` an unbiased estimate.

For 8-bit data, :func:`dequantize` adds uniform noise and returns the log-Jacobian of the map to
the model's range, and :func:`bits_per_dim` turns a continuous NLL into bits per dimension of the
*discrete* data (an upper bound on it, by Jensen: Theis et al. 2016; Ho et al. 2019), as
score_sde's ``bpd`` with its offset of 7 (data in [-1, 1]) or 8 (data in [0, 1]) bits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchdiffeq import odeint

from .paths import GaussianPath, check_time

__all__ = ["log_likelihood", "pf_ode_velocity", "bits_per_dim", "dequantize", "discrete_bits_per_dim", "embedding_elbo"]

TRACES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
METHODS = ("dopri5", "rk4")
# Song et al. integrate the likelihood ODE from t = 1e-5; we start there when the path's own
# t_min is a time where sigma = 0, at which the velocity divides 0 by 0.
LIKELIHOOD_T_MIN = 1e-5


def pf_ode_velocity(denoiser, path: GaussianPath, x: Tensor, t: Tensor) -> Tensor:
    """``alpha'(t) D + sigma'(t) (x - alpha D) / sigma`` for ``x`` ``(B, ...)`` at a 0-d time with sigma > 0.

    Coefficients are computed in float64 and cast to x's dtype; the denoiser gets a ``(B,)`` time.
    """
    t64 = torch.as_tensor(t, dtype=torch.float64)
    a, s = float(path.alpha(t64)), float(path.sigma(t64))
    da, ds = float(path.d_alpha(t64)), float(path.d_sigma(t64))
    denoised = denoiser(x, torch.full((x.shape[0],), float(t64), dtype=x.dtype, device=x.device))
    return da * denoised + (ds / s) * (x - a * denoised)


def _divergence(v: Tensor, x: Tensor, probes: Tensor | None) -> Tensor:
    """Per-sample ``div_x v`` ``(B,)``: exact (one backward pass per dimension) or Hutchinson's estimate.

    Both rely on samples not interacting inside the denoiser (true of a network in eval mode).
    """
    b = x.shape[0]
    if probes is None:
        vf = v.reshape(b, -1)
        d = vf.shape[1]
        div = torch.zeros(b, dtype=v.dtype, device=v.device)
        for i in range(d):
            (grad,) = torch.autograd.grad(vf[:, i].sum(), x, retain_graph=i < d - 1)
            div = div + grad.reshape(b, -1)[:, i]
        return div
    est = torch.zeros(b, dtype=v.dtype, device=v.device)
    for k, e in enumerate(probes):
        (vjp,) = torch.autograd.grad((v * e).sum(), x, retain_graph=k < len(probes) - 1)  # e^T dv/dx
        est = est + (vjp * e).reshape(b, -1).sum(1)
    return est / len(probes)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def log_likelihood(
    denoiser,
    path: GaussianPath,
    x: Tensor,
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    trace: str = "exact",
    n_probes: int = 1,
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int = 100,
) -> tuple[Tensor, int]:
    """Per-sample ``log p_{t_start}(x)`` in nats by the probability-flow ODE (Song et al. 2021, app. D.2).

    Args:
        denoiser: ``D(x, t) -> x0_hat`` (see :func:`core.predictions.as_denoiser`).
        x: ``(B, ...)`` data points (float). Use float64 for tight tolerances.
        t_start: where the integration starts (default ``path.t_min``, or 1e-5 where sigma(t_min) = 0,
            as Song et al.); the result is the density of the slightly diffused ``p_{t_start}``.
        t_end: where the prior density is applied (default ``path.t_max``).
        trace: ``"exact"`` (d backward passes per evaluation) or ``"hutchinson"``.
        n_probes, probe: Hutchinson probes per sample, ``"rademacher"`` or ``"gaussian"``, drawn
            once from ``generator`` and fixed over the trajectory.
        method: ``"dopri5"`` (adaptive, ``rtol``/``atol``; the paper's RK45 with 1e-5) or ``"rk4"``
            (``steps`` fixed steps in t, 4 evaluations each).

    Returns:
        ``(log_p, nfe)``: ``(B,)`` log-densities in nats (x's dtype) and the number of evaluations of
        the ODE function (each one denoiser call plus its backward passes).
    """
    if not torch.is_tensor(x) or not torch.is_floating_point(x) or x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(
            f"x must be a non-empty float tensor (B, ...), got {type(x).__name__} {getattr(x, 'shape', '')}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite")
    if trace not in TRACES:
        raise ValueError(f"unknown trace {trace!r}; choose one of {TRACES}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; choose one of {PROBES}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    _check_positive_int("n_probes", n_probes)
    _check_positive_int("steps", steps)
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (math.isfinite(tol) and tol > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {tol!r}")
    if t_start is None:
        t_start = path.t_min
        if float(path.sigma(torch.tensor(t_start, dtype=torch.float64))) == 0.0:
            t_start = max(t_start, LIKELIHOOD_T_MIN)
    t0 = float(check_time(torch.tensor(float(t_start), dtype=torch.float64), "t_start"))
    t1 = float(check_time(torch.tensor(float(path.t_max if t_end is None else t_end), dtype=torch.float64), "t_end"))
    if not t0 < t1:
        raise ValueError(f"need t_start < t_end, got t_start={t0}, t_end={t1}")
    if float(path.sigma(torch.tensor(t0, dtype=torch.float64))) == 0.0:
        raise ValueError(
            f"t_start={t0} is a time where sigma = 0 on the {path.name} path; start a little later (e.g. 1e-5)"
        )

    probes = None
    if trace == "hutchinson":
        shape = (n_probes,) + tuple(x.shape)
        if probe == "rademacher":
            probes = torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
        else:
            probes = torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)

    nfe = 0

    def func(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal nfe
        nfe += 1
        with torch.enable_grad():
            xr = state[0].detach().requires_grad_(True)
            v = pf_ode_velocity(denoiser, path, xr, t)
            div = _divergence(v, xr, probes)
        return v.detach(), div.detach()

    ts = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
    options = None
    if method == "rk4":
        options = {
            "grid_constructor": lambda f, y0, t: torch.linspace(t[0], t[-1], steps + 1, dtype=t.dtype, device=t.device)
        }
    state0 = (x.detach(), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
    with torch.no_grad():
        xs, deltas = odeint(func, state0, ts, method=method, rtol=rtol, atol=atol, options=options)
    log_p = path.prior_logp(xs[-1], t=t1) + deltas[-1]
    return log_p, nfe


def bits_per_dim(nll_nats: Tensor | float, dims, *, logdet: Tensor | float = 0.0) -> Tensor:
    """Bits per dimension ``(nll - logdet) / (dims ln 2)``.

    Args:
        nll_nats: negative log-likelihood of the continuous variable ``x`` in nats (per sample or mean).
        dims: number of dimensions per sample (an int or a sample shape).
        logdet: ``log |dx/dy|`` of the map from the dequantised data ``y`` in ``[0, n_bins)^D`` to
            ``x``, as :func:`dequantize` returns it; with it the result is the NLL of ``y``, i.e.
            bits per dimension of the discrete data (an upper bound).
    """
    if not isinstance(dims, int) or isinstance(dims, bool):
        try:
            dims = math.prod(int(s) for s in dims)
        except TypeError:
            raise ValueError(f"dims must be a positive integer or a shape, got {dims!r}") from None
    if dims < 1:
        raise ValueError(f"dims must be a positive integer or a shape, got {dims!r}")
    return (torch.as_tensor(nll_nats) - torch.as_tensor(logdet)) / (dims * math.log(2.0))


def dequantize(
    k: Tensor,
    *,
    n_bins: int = 256,
    data_range: tuple[float, float] = (-1.0, 1.0),
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Uniform dequantisation of discrete data ``k in {0, ..., n_bins - 1}`` of shape ``(B, ...)``.

    ``y = k + u`` with ``u ~ U[0, 1)`` elementwise, then ``x = lo + (hi - lo) y / n_bins`` (score_sde:
    ``(255 k/255 + u) / 256`` then scaled to [-1, 1]). Returns ``x`` and ``logdet = D log((hi - lo) /
    n_bins)`` ``(B,)``, the log-Jacobian of ``y -> x``, so that ``log p_y(y) = log p_x(x) + logdet`` and
    ``-log P(k) <= E_u[-log p_y(k + u)]``. For [-1, 1] and 256 bins, ``-logdet / (D ln 2) = 7`` bits.
    """
    if not torch.is_tensor(k) or k.ndim < 1:
        raise ValueError(f"k must be a tensor (B, ...) of integers, got {type(k).__name__}")
    _check_positive_int("n_bins", n_bins)
    if n_bins < 2:
        raise ValueError(f"n_bins must be at least 2, got {n_bins}")
    lo, hi = (float(v) for v in data_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"data_range must be finite (lo, hi) with lo < hi, got {data_range!r}")
    kf = k.to(torch.float64)
    bad = (kf != kf.round()) | (kf < 0) | (kf > n_bins - 1) | ~torch.isfinite(kf)
    if bool(bad.any()):
        raise ValueError(f"k must hold integers in [0, {n_bins - 1}], got {kf[bad].flatten()[0].item()}")
    u = torch.rand(k.shape, generator=generator, dtype=torch.float64, device=k.device)
    x = (lo + (hi - lo) * (kf + u) / n_bins).to(dtype)
    d = k[0].numel()
    logdet = torch.full((k.shape[0],), d * math.log((hi - lo) / n_bins), dtype=dtype, device=k.device)
    return x, logdet


def discrete_bits_per_dim(
    denoiser,
    path: GaussianPath,
    k: Tensor,
    *,
    n_bins: int = 256,
    data_range: tuple[float, float] = (-1.0, 1.0),
    n_dequant: int = 1,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    **likelihood_options,
) -> tuple[Tensor, int]:
    """Bits per dimension of discrete data ``k`` ``(B, ...)``: :func:`dequantize`, then
    :func:`log_likelihood`, averaged over ``n_dequant`` uniform draws (each an upper bound in
    expectation). Returns ``(bpd (B,), total nfe)``."""
    _check_positive_int("n_dequant", n_dequant)
    total, nfe = 0.0, 0
    for _ in range(n_dequant):
        x, logdet = dequantize(k, n_bins=n_bins, data_range=data_range, generator=generator, dtype=dtype)
        log_p, n = log_likelihood(denoiser, path, x, generator=generator, **likelihood_options)
        total = total + bits_per_dim(-log_p, k[0].numel(), logdet=logdet)
        nfe += n
    return total / n_dequant, nfe


def embedding_elbo(
    ids: Tensor,
    embeddings: Tensor,
    path: GaussianPath,
    denoiser,
    decoder_logits,
    *,
    samples: int = 1,
    t_start: float | None = None,
    t_end: float | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Variational bound on ``-log p(ids)`` of discrete tokens diffused as their embeddings.

    Kingma et al. 2021 (VDM, eq. 17) in the continuous-time limit; Diffusion-LM (Li et al. 2022)
    and Difformer (Gao et al. 2022) diffuse the embedding ``e = E[ids]`` on a Gaussian path and
    decode tokens from the least noisy latent. With ``z_t = alpha e + sigma eps`` on
    ``[t_start, t_end]`` and ``lambda = log SNR = log(alpha^2 / sigma^2)``,

        -log p(ids) <= E[-log p(ids | z_{t_start})]                                 (reconstruction)
                       + KL(q(z_{t_end} | e) || N(0, prior_std^2 I))                (prior)
                       + 1/2 int_{lambda(t_end)}^{lambda(t_start)} e^lambda E||e - D(z_t, t)||^2 dlambda   (diffusion)

    The diffusion term depends on the path only through its SNR (Kingma & Gao 2023: a rescaling of
    ``z_t`` by a time-dependent factor does not change the KLs), so one formula serves every path.
    It is estimated with ``samples`` stratified draws of ``lambda``, uniform in log-SNR; the
    reconstruction uses one draw of ``z_{t_start}``; the prior KL is exact. With the exact
    posterior-mean denoiser and the exact posterior decoder the bound is tight up to the prior
    mismatch (tested on point-mass embeddings, where ``-log p`` is known).

    Args:
        ids: (B, L) int64 token ids.
        embeddings: (V, D) embedding table; the data point of a sequence is ``embeddings[ids]`` (B, L, D).
        denoiser: ``D(z, t) -> e_hat`` (B, L, D) with ``t`` (B,).
        decoder_logits: ``(z, t) -> logits`` (B, L, V) of the tokens given the latent at ``t_start``.
        t_start, t_end: the diffusion interval (default the path's ``t_min``, ``t_max``); sigma must
            be positive at ``t_start``.
    Returns per-sequence (B,) float64 tensors in nats: ``recon``, ``prior``, ``diffusion``, ``total``.
    """
    if ids.ndim != 2 or ids.dtype != torch.int64:
        raise ValueError(f"ids must be (B, L) int64, got shape {tuple(ids.shape)} dtype {ids.dtype}")
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (V, D), got shape {tuple(embeddings.shape)}")
    _check_positive_int("samples", samples)
    t0 = path.t_min if t_start is None else float(t_start)
    t1 = path.t_max if t_end is None else float(t_end)
    check_time(torch.tensor([t0, t1], dtype=torch.float64), "t_start / t_end")
    if not t0 < t1:
        raise ValueError(f"need t_start < t_end, got t_start={t0}, t_end={t1}")
    T = torch.tensor([t0, t1], dtype=torch.float64)
    lam_hi, lam_lo = (float(v) for v in path.log_snr(T))
    if not math.isfinite(lam_hi):
        raise ValueError(f"sigma is 0 at t_start={t0} (log-SNR infinite): start the bound at a t with noise")
    e = embeddings[ids]  # (B, L, D)
    B, dtype, device = ids.shape[0], e.dtype, e.device
    gdev = generator.device if generator is not None else None  # draws on the generator's device

    def noisy(t: Tensor) -> Tensor:  # t (B,) float64 on the CPU
        a = path.expand(path.alpha(t), e).to(dtype=dtype, device=device)
        s = path.expand(path.sigma(t), e).to(dtype=dtype, device=device)
        return a * e + s * torch.randn(e.shape, generator=generator, dtype=dtype, device=gdev).to(device)

    # reconstruction: -log p(ids | z_{t_start})
    tb = torch.full((B,), t0, dtype=torch.float64)
    z0 = noisy(tb)
    logits = decoder_logits(z0, tb.to(dtype).to(device)).double()
    recon = -logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1).sum(-1)

    # prior: KL(N(alpha e, sigma^2 I) || N(0, s^2 I)) summed over every coordinate
    a1, s1 = float(path.alpha(T[1])), float(path.sigma(T[1]))
    sp = path.prior_std(t1)
    n_coord = e[0].numel()
    prior = (n_coord * (math.log(sp / s1) + 0.5 * s1**2 / sp**2 - 0.5)
             + 0.5 * a1**2 * e.double().flatten(1).pow(2).sum(1) / sp**2)

    # diffusion: stratified lambda in [lam_lo, lam_hi]
    diffusion = torch.zeros(B, dtype=torch.float64, device=device)
    if math.isfinite(lam_lo):
        span = lam_hi - lam_lo
    else:  # alpha(t_end) = 0: integrate down to where e^lambda is negligible (SNR 1e-12)
        lam_lo = -12.0 * math.log(10.0)
        span = lam_hi - lam_lo
    for k in range(samples):
        u = (k + torch.rand(B, generator=generator, dtype=torch.float64, device=gdev).cpu()) / samples
        lam = lam_lo + span * u
        t = path.t_from_log_snr(lam).clamp(t0, t1)
        err = (e - denoiser(noisy(t), t.to(dtype).to(device))).double().flatten(1).pow(2).sum(1)
        diffusion += 0.5 * span * torch.exp(lam).to(device) * err / samples
    return {"recon": recon, "prior": prior, "diffusion": diffusion, "total": recon + prior + diffusion}
