"""Discrete-time DDPM as used by DiT.

Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM), with the learned-range
variance, the hybrid loss and the cosine schedule of Nichol & Dhariwal 2021, "Improved
Denoising Diffusion Probabilistic Models" (IDDPM), and the step skipping ("respacing") that
DiT (Peebles & Xie 2023) uses for sampling. Written to reproduce the numbers of
facebookresearch/DiT ``diffusion/`` (see ``tests/test_ddpm.py`` and the ``dit_reference.pt``
fixture).

Conventions of this module (the reference's, not polydiff's):

* integer steps ``t in {0, ..., T-1}``; step ``t`` holds ``x_{t+1}`` of the DDPM paper, so
  ``t = 0`` is already one step of noise. ``DiscreteDDPM.continuous_time`` maps a step to
  polydiff's ``t in [0, 1]`` (data at 0);
* schedule arrays are float64 (as the reference's numpy arrays); a coefficient is looked up
  in float64 and cast to the dtype of the tensor it multiplies BEFORE the product;
* images are ``(B, C, ...)``; a learned-variance network outputs ``(B, 2C, ...)``: the eps
  prediction, then ``v in [-1, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DiscreteDDPM",
    "cosine_betas",
    "discretized_gaussian_log_likelihood",
    "linear_betas",
    "mean_flat",
    "normal_kl",
]


# --------------------------------------------------------------------------- schedules


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linear beta schedule of DDPM (Ho et al. 2020, Sec. 4), float64, shape ``(num_steps,)``.

    The end points are scaled by ``1000 / num_steps`` so that the schedule describes the
    same process for any number of steps (IDDPM's ``get_named_beta_schedule("linear")``).
    The values are computed as ``numpy.linspace`` does (``start + k * step``, last entry set
    to the end point), so they match the reference bit for bit.
    """
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2, got {num_steps!r}")
    scale = 1000 / num_steps
    start, end = scale * beta_start, scale * beta_end
    betas = torch.arange(num_steps, dtype=torch.float64) * ((end - start) / (num_steps - 1)) + start
    betas[-1] = end
    _check_betas(betas, monotone=True)
    return betas


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule of IDDPM (Nichol & Dhariwal 2021, Eq. 17), float64, ``(num_steps,)``.

    ``alpha_bar(u) = cos(((u + s) / (1 + s)) * pi / 2) ** 2`` and
    ``beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta)``; the clip
    avoids the singularity at ``u = 1``.
    """
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2, got {num_steps!r}")
    if not 0.0 < max_beta <= 1.0:
        raise ValueError(f"max_beta must be in (0, 1], got {max_beta!r}")
    if s < 0.0:
        raise ValueError(f"s must be >= 0, got {s!r}")

    def alpha_bar(u: Tensor) -> Tensor:
        return torch.cos((u + s) / (1 + s) * (math.pi / 2)) ** 2

    i = torch.arange(num_steps, dtype=torch.float64)
    betas = (1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps)).clamp(max=max_beta)
    _check_betas(betas, monotone=True)
    return betas


def _check_betas(betas: Tensor, monotone: bool) -> None:
    if betas.ndim != 1 or betas.numel() < 2:
        raise ValueError(f"betas must be 1-D with at least 2 entries, got shape {tuple(betas.shape)}")
    if not torch.isfinite(betas).all():
        raise ValueError(f"betas must be finite, got {betas[~torch.isfinite(betas)][:5].tolist()}")
    bad = (betas <= 0) | (betas > 1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"betas must lie in (0, 1], got betas[{i}] = {betas[i].item()!r}")
    if monotone:
        drops = (betas[1:] < betas[:-1]).nonzero()
        if drops.numel():
            i = int(drops[0])
            raise ValueError(
                f"betas must be non-decreasing (index 0 = least noise), got betas[{i}] = "
                f"{betas[i].item()!r} > betas[{i + 1}] = {betas[i + 1].item()!r}"
            )


# --------------------------------------------------------------------------- Gaussian helpers


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions: ``(B, ...) -> (B,)``."""
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise ``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` in nats (broadcasts)."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    # The tanh approximation of Phi used by the reference (Page 1977, as in GELU-tanh).
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-probability (nats) of 8-bit data under a discretized Gaussian (DDPM Eq. 13).

    ``x`` is assumed to be uint8 data rescaled to ``[-1, 1]`` (256 bins of width ``2/255``);
    the bins at the edges extend to ``-inf`` (``x < -0.999``) and ``+inf`` (``x > 0.999``).
    ``x``, ``means``, ``log_scales`` (log standard deviation) share one shape; returns that shape.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(
            f"x, means, log_scales must share a shape, got {tuple(x.shape)}, {tuple(means.shape)}, "
            f"{tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# --------------------------------------------------------------------------- the process


class DiscreteDDPM:
    """The forward process ``q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)`` and its
    reverse steps, on ``T = len(betas)`` integer steps (DDPM, Ho et al. 2020).

    Args:
        betas: ``(T,)`` noise variances, index 0 = least noise, each in ``(0, 1]``. Kept as
            float64. Must be non-decreasing for a base process.
        timestep_map: for a respaced process (see :meth:`respace`), the step of the original
            process that each of the ``T`` steps stands for; the network is always called
            with these original steps. ``None`` means the identity. A respaced process may
            have non-monotone betas (unevenly kept steps), so only the range is checked then.
        original_num_steps: length of the original process (defaults to ``T``).
    """

    def __init__(
        self,
        betas: Tensor | Iterable[float],
        timestep_map: Iterable[int] | None = None,
        original_num_steps: int | None = None,
    ) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
        _check_betas(betas, monotone=timestep_map is None)
        T = betas.numel()
        self.num_timesteps = T
        self.betas = betas
        self.original_num_steps = T if original_num_steps is None else int(original_num_steps)
        tmap = torch.arange(T) if timestep_map is None else torch.as_tensor(list(timestep_map))
        if tmap.shape != (T,) or (tmap.numel() and (tmap.min() < 0 or tmap.max() >= self.original_num_steps)):
            raise ValueError(
                f"timestep_map must hold {T} steps in [0, {self.original_num_steps}), got {tmap}"
            )
        self.timestep_map = tmap.long()

        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = ac_prev
        self.alphas_cumprod_next = torch.cat([ac[1:], ac.new_zeros(1)])
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        self.log_one_minus_alphas_cumprod = torch.log(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = (1.0 / ac).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ac - 1).sqrt()
        self.log_betas = torch.log(betas)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance)   (DDPM Eq. 6-7)
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The variance is 0 at t = 0; its log is clipped by reusing entry 1.
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]]))
        self.posterior_mean_coef1 = betas * ac_prev.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac)

    # ------------------------------------------------------------------ plumbing

    def _check_t(self, t: Tensor, batch: int | None = None) -> Tensor:
        if not isinstance(t, Tensor):
            raise TypeError(f"t must be an integer tensor of steps, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"t must hold integer steps, got dtype {t.dtype}")
        if t.ndim != 1 or (batch is not None and t.shape[0] != batch):
            raise ValueError(
                f"t must have shape ({batch if batch is not None else 'B'},), got {tuple(t.shape)}"
            )
        bad = (t < 0) | (t >= self.num_timesteps)
        if bad.any():
            raise ValueError(f"t must lie in [0, {self.num_timesteps - 1}], got {t[bad].tolist()}")
        return t

    @staticmethod
    def _extract(arr: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """``arr[t]`` cast to ``like.dtype`` (before any product, as the reference does),
        shaped ``(B, 1, ..., 1)`` to broadcast against ``like``."""
        out = arr.to(t.device)[t].to(like.dtype)
        return out.view(-1, *([1] * (like.ndim - 1)))

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Steps to feed the network: ``timestep_map[t]`` (the identity unless respaced)."""
        self._check_t(t)
        return self.timestep_map.to(t.device)[t]

    def continuous_time(self, t: Tensor) -> Tensor:
        """polydiff time ``(timestep_map[t] + 1) / original_num_steps`` in ``(0, 1]``, float64.

        Step ``i`` holds ``x_{i+1}`` of a ``T``-step chain, i.e. ``i + 1`` of ``T`` noising
        steps taken, so step ``T - 1`` is time 1 and data (``x_0``, not a step here) is time 0.
        """
        return (self.model_timesteps(t).to(torch.float64) + 1) / self.original_num_steps

    def respace(self, use_timesteps: Iterable[int]) -> DiscreteDDPM:
        """A process on the kept steps only (DiT/IDDPM ``SpacedDiffusion``).

        For kept steps ``k_0 < k_1 < ...`` the new betas are ``1 - ac[k_j] / ac[k_{j-1}]``
        (``ac[k_{-1}] = 1``), so the new ``alphas_cumprod`` equals the old one at the kept
        steps. The returned process maps its steps back to the original ones through
        ``timestep_map`` (composed if ``self`` is itself respaced).
        """
        kept = sorted({int(i) for i in use_timesteps})
        if not kept:
            raise ValueError("use_timesteps must not be empty")
        if kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ValueError(
                f"use_timesteps must lie in [0, {self.num_timesteps - 1}], got {kept[0]}..{kept[-1]}"
            )
        new_betas, last = [], 1.0
        for i in kept:
            ac = self.alphas_cumprod[i].item()
            new_betas.append(1 - ac / last)
            last = ac
        return DiscreteDDPM(
            torch.tensor(new_betas, dtype=torch.float64),
            timestep_map=self.timestep_map[kept].tolist(),
            original_num_steps=self.original_num_steps,
        )

    # ------------------------------------------------------------------ forward process

    def q_sample(
        self, x0: Tensor, t: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw ``x_t ~ q(x_t | x_0) = N(sqrt(ac_t) x_0, (1 - ac_t) I)`` (DDPM Eq. 4).

        ``x0``, ``noise``: ``(B, ...)``; ``t``: ``(B,)`` integer steps. Returns ``(B, ...)``.
        """
        self._check_t(t, x0.shape[0])
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior_mean_variance(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of ``q(x_{t-1} | x_t, x_0)`` (DDPM Eq. 6-7).

        ``x0``, ``xt``: ``(B, ...)``; ``t``: ``(B,)``. Mean ``(B, ...)``, the others ``(B, 1, ..., 1)``.
        """
        self._check_t(t, xt.shape[0])
        if x0.shape != xt.shape:
            raise ValueError(f"x0 shape {tuple(x0.shape)} != xt shape {tuple(xt.shape)}")
        mean = (
            self._extract(self.posterior_mean_coef1, t, xt) * x0
            + self._extract(self.posterior_mean_coef2, t, xt) * xt
        )
        var = self._extract(self.posterior_variance, t, xt)
        log_var = self._extract(self.posterior_log_variance_clipped, t, xt)
        return mean, var, log_var

    def predict_x0_from_eps(self, xt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``x_0 = (x_t - sqrt(1 - ac_t) eps) / sqrt(ac_t)``, written as the reference does."""
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, xt) * xt
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps
        )

    def predict_eps_from_x0(self, xt: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """Inverse of :meth:`predict_x0_from_eps`."""
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, xt) * xt - x0) / self._extract(
            self.sqrt_recipm1_alphas_cumprod, t, xt
        )

    # ------------------------------------------------------------------ reverse process

    def p_mean_variance(
        self,
        model_output: Tensor,
        xt: Tensor,
        t: Tensor,
        learn_sigma: bool = True,
        clip_denoised: bool = False,
        sigma_small: bool = False,
    ) -> dict[str, Tensor]:
        """Parameters of ``p(x_{t-1} | x_t)`` from an eps-prediction network output.

        ``model_output``: ``(B, 2C, ...)`` if ``learn_sigma`` (eps, then ``v in [-1, 1]``),
        else ``(B, C, ...)``; ``xt``: ``(B, C, ...)``; ``t``: ``(B,)``.

        Learned range (IDDPM Eq. 15): ``log Sigma = frac log beta_t + (1 - frac) log beta~_t``
        with ``frac = (v + 1) / 2`` and ``beta~_t`` the clipped posterior variance. Without
        ``learn_sigma`` the variance is fixed (DDPM Sec. 3.2): ``beta_t`` ("large", with entry 0
        replaced by ``beta~_1`` for a better decoder likelihood) or ``beta~_t`` (``sigma_small``).
        The mean is the posterior mean at ``x0_hat`` (DDPM Eq. 11 rewritten), ``x0_hat``
        clamped to ``[-1, 1]`` if ``clip_denoised`` (pixel data; DiT's latents use False).

        Returns ``mean``, ``variance``, ``log_variance``, ``pred_x0``, each ``(B, C, ...)``.
        """
        self._check_t(t, xt.shape[0])
        C = xt.shape[1]
        want = (xt.shape[0], 2 * C if learn_sigma else C, *xt.shape[2:])
        if tuple(model_output.shape) != want:
            raise ValueError(
                f"model_output must have shape {want} (learn_sigma={learn_sigma}), got {tuple(model_output.shape)}"
            )
        if learn_sigma:
            eps, v = torch.split(model_output, C, dim=1)
            min_log = self._extract(self.posterior_log_variance_clipped, t, xt)
            max_log = self._extract(self.log_betas, t, xt)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            eps = model_output
            if sigma_small:
                var_arr, log_arr = self.posterior_variance, self.posterior_log_variance_clipped
            else:
                var_arr = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
                log_arr = torch.log(var_arr)
            variance = self._extract(var_arr, t, xt).expand_as(xt)
            log_variance = self._extract(log_arr, t, xt).expand_as(xt)

        pred_x0 = self.predict_x0_from_eps(xt, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, xt, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_x0": pred_x0}

    def p_sample(
        self,
        model_output: Tensor,
        xt: Tensor,
        t: Tensor,
        generator: torch.Generator | None = None,
        learn_sigma: bool = True,
        clip_denoised: bool = False,
    ) -> dict[str, Tensor]:
        """One ancestral step ``x_{t-1} ~ p(x_{t-1} | x_t)`` (DDPM Algorithm 2, line 4).

        ``model_output`` is the network's output at ``(xt, self.model_timesteps(t))``. No noise
        is added where ``t == 0``. Returns ``sample`` and ``pred_x0``, ``(B, C, ...)`` each.
        """
        out = self.p_mean_variance(model_output, xt, t, learn_sigma=learn_sigma, clip_denoised=clip_denoised)
        noise = torch.randn(xt.shape, generator=generator, dtype=xt.dtype, device=xt.device)
        nonzero = (t != 0).to(xt.dtype).view(-1, *([1] * (xt.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_x0": out["pred_x0"]}

    def ddim_step(
        self,
        model_output: Tensor,
        xt: Tensor,
        t: Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        learn_sigma: bool = True,
        clip_denoised: bool = False,
    ) -> dict[str, Tensor]:
        """One DDIM step from step ``t`` to ``t - 1`` (Song et al. 2021, Eq. 12 and 16).

        ``sigma = eta sqrt((1 - ac_prev) / (1 - ac)) sqrt(1 - ac / ac_prev)``; ``eta = 0`` is
        deterministic, ``eta = 1`` has DDPM's posterior variance. eps is re-derived from the
        (possibly clipped) ``pred_x0``. Returns ``sample`` and ``pred_x0``, ``(B, C, ...)`` each.
        """
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta!r}")
        out = self.p_mean_variance(model_output, xt, t, learn_sigma=learn_sigma, clip_denoised=clip_denoised)
        eps = self.predict_eps_from_x0(xt, t, out["pred_x0"])
        ac = self._extract(self.alphas_cumprod, t, xt)
        ac_prev = self._extract(self.alphas_cumprod_prev, t, xt)
        sigma = eta * torch.sqrt((1 - ac_prev) / (1 - ac)) * torch.sqrt(1 - ac / ac_prev)
        mean = out["pred_x0"] * torch.sqrt(ac_prev) + torch.sqrt(1 - ac_prev - sigma**2) * eps
        noise = torch.randn(xt.shape, generator=generator, dtype=xt.dtype, device=xt.device)
        nonzero = (t != 0).to(xt.dtype).view(-1, *([1] * (xt.ndim - 1)))
        return {"sample": mean + nonzero * sigma * noise, "pred_x0": out["pred_x0"]}

    # ------------------------------------------------------------------ losses

    def vb_terms_bpd(
        self,
        model_output: Tensor,
        x0: Tensor,
        xt: Tensor,
        t: Tensor,
        clip_denoised: bool = False,
        learn_sigma: bool = True,
    ) -> Tensor:
        """One term of the variational bound, in bits per dimension, shape ``(B,)`` (DDPM Eq. 5).

        ``L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` for ``t > 0`` and the
        discretized-Gaussian decoder NLL ``L_0 = -log p(x_0 | x_1)`` for ``t == 0``; both are
        averaged over the non-batch dimensions and divided by ``ln 2``.
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        out = self.p_mean_variance(model_output, xt, t, learn_sigma=learn_sigma, clip_denoised=clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model_fn: Callable[..., Tensor],
        x0: Tensor,
        t: Tensor,
        noise: Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
        learn_sigma: bool = True,
        rescale_vb: bool = False,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """IDDPM's hybrid loss ``L_simple + L_vlb`` (Nichol & Dhariwal 2021, Eq. 16), per sample.

        ``model_fn(x_t, steps, **model_kwargs)`` is called with ``steps = model_timesteps(t)``.
        ``x0``, ``noise``: ``(B, C, ...)``; ``t``: ``(B,)``. Returns ``mse`` (``||eps - eps_hat||^2``
        averaged over non-batch dims, DDPM Eq. 14), and with ``learn_sigma`` also ``vb`` (see
        :meth:`vb_terms_bpd`, with the eps prediction detached so that ``L_vlb`` trains only the
        variance), and ``loss = mse + vb``; each ``(B,)``. DiT's default (loss type ``MSE``)
        adds ``vb`` unscaled; ``rescale_vb`` multiplies it by ``T / 1000`` (``RESCALED_MSE``).
        """
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        xt = self.q_sample(x0, t, noise=noise)
        model_output = model_fn(xt, self.model_timesteps(t), **(model_kwargs or {}))
        terms: dict[str, Tensor] = {}
        if learn_sigma:
            C = x0.shape[1]
            if model_output.shape[1] != 2 * C:
                raise ValueError(
                    f"learn_sigma=True needs {2 * C} output channels, got shape {tuple(model_output.shape)}"
                )
            eps, v = torch.split(model_output, C, dim=1)
            frozen = torch.cat([eps.detach(), v], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x0, xt, t, clip_denoised=False, learn_sigma=True)
            if rescale_vb:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        else:
            eps = model_output
        if eps.shape != noise.shape:
            raise ValueError(f"eps prediction shape {tuple(eps.shape)} != noise shape {tuple(noise.shape)}")
        terms["mse"] = mean_flat((noise - eps) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms
