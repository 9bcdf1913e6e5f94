"""Gaussian probability paths ``x_t = alpha(t) x0 + sigma(t) eps`` with ``t in [0, 1]``, data at 0.

Every diffusion, score-based and flow model in polydiff is defined on one of these paths:

=========  =====================================================  ===========================
name       alpha(t), sigma(t)                                     source
=========  =====================================================  ===========================
vp         exp(-t^2 (b1-b0)/4 - t b0/2), sqrt(1 - alpha^2)          Song et al. 2021 (seed 24)
subvp      as vp, 1 - alpha^2                                     Song et al. 2021, eq. 29
cosine     cos(phi(t)) / cos(phi(0)), sqrt(1 - alpha^2)             Nichol & Dhariwal 2021
ve         1, s0 (s1/s0)^t                                        Song et al. 2021 (SMLD)
edm        1, sigma_max t   (sigma is time up to a constant)      Karras et al. 2022 (seed 28)
linear     1 - t, t                                               rectified flow / SiT Linear
gvp        cos(pi t/2), sin(pi t/2)                               SiT GVP (seed 2)
=========  =====================================================  ===========================

Each path gives alpha, sigma, their time derivatives, the log signal-to-noise ratio
``logSNR = 2 log(alpha / sigma)`` and its inverse, the forward SDE ``dx = f(t) x dt + g(t) dW``
whose marginals are the path (Kingma et al. 2021: ``f = alpha'/alpha``,
``g^2 = d sigma^2/dt - 2 f sigma^2``), and a prior sampler. ``t_max < 1`` truncates the
diffusion time (Franzese et al., seed 6); ``t_min`` is the smallest time a sampler or a loss
visits by default.

The SiT convention (data at t=1) maps by ``t_polydiff = 1 - t_sit``; DiT's integer steps and
EDM's sigma map through :mod:`core.ddpm` and :meth:`GaussianPath.t_from_sigma`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "GaussianPath",
    "VPPath",
    "SubVPPath",
    "CosinePath",
    "VEPath",
    "EDMPath",
    "LinearPath",
    "GVPPath",
    "PATHS",
    "get_path",
    "check_time",
]


def check_time(t: Tensor | float, name: str = "t", lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """Return ``t`` as a tensor after checking that every entry is finite and in ``[lo, hi]``."""
    t = torch.as_tensor(t)
    if not torch.is_floating_point(t):
        t = t.to(torch.get_default_dtype())
    if not bool(torch.isfinite(t).all()):
        bad = t[~torch.isfinite(t)].flatten()[0].item()
        raise ValueError(f"{name} must be finite, got {bad}")
    if t.numel() and (bool((t < lo).any()) or bool((t > hi).any())):
        bad = t[(t < lo) | (t > hi)].flatten()[0].item()
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {bad}")
    return t


class GaussianPath:
    """Base class: subclasses define ``alpha``, ``sigma`` and their derivatives.

    All methods take ``t`` as a float or a tensor of any shape and return tensors of that
    shape. Use :meth:`expand` to broadcast a per-sample coefficient against ``(B, ...)`` data.
    """

    name = "base"

    def __init__(self, t_min: float = 0.0, t_max: float = 1.0):
        if not (0.0 <= t_min < t_max <= 1.0):
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        self.t_min = float(t_min)
        self.t_max = float(t_max)

    # -- coefficients (subclasses) ---------------------------------------------------------
    def alpha(self, t):
        raise NotImplementedError

    def sigma(self, t):
        raise NotImplementedError

    def d_alpha(self, t):
        raise NotImplementedError

    def d_sigma(self, t):
        raise NotImplementedError

    # -- derived quantities ----------------------------------------------------------------
    def log_snr(self, t) -> Tensor:
        """``lambda(t) = 2 log(alpha / sigma)``; decreasing in t; +inf where sigma = 0."""
        t = torch.as_tensor(t)
        return 2.0 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def t_from_log_snr(self, lam) -> Tensor:
        """Inverse of :meth:`log_snr` (bisection in float64; subclasses override analytically)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        lo = torch.zeros_like(lam)
        hi = torch.ones_like(lam)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > lam  # log_snr decreases: target lies later
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def sigma_hat(self, t) -> Tensor:
        """Noise level of the scaled variable ``x / alpha``: ``sigma / alpha = exp(-lambda / 2)``."""
        t = torch.as_tensor(t)
        return self.sigma(t) / self.alpha(t)

    def t_from_sigma(self, sigma_hat) -> Tensor:
        """Time at which ``sigma / alpha`` equals ``sigma_hat`` (EDM's sigma-as-time convention)."""
        sigma_hat = torch.as_tensor(sigma_hat, dtype=torch.float64)
        return self.t_from_log_snr(-2.0 * torch.log(sigma_hat))

    def f(self, t) -> Tensor:
        """Drift coefficient of the forward SDE, ``f(t) = alpha'(t) / alpha(t)``."""
        t = torch.as_tensor(t)
        return self.d_alpha(t) / self.alpha(t)

    def g2(self, t) -> Tensor:
        """Squared diffusion ``g^2 = 2 sigma sigma' - 2 f sigma^2 = -sigma^2 dlambda/dt``."""
        t = torch.as_tensor(t)
        s = self.sigma(t)
        return 2.0 * s * self.d_sigma(t) - 2.0 * self.f(t) * s * s

    def g(self, t) -> Tensor:
        return torch.sqrt(self.g2(t))

    def d_log_snr(self, t) -> Tensor:
        """``dlambda/dt = 2 (alpha'/alpha - sigma'/sigma)``."""
        t = torch.as_tensor(t)
        return 2.0 * (self.d_alpha(t) / self.alpha(t) - self.d_sigma(t) / self.sigma(t))

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Forward SDE of seed 24: drift ``f(t) x`` and diffusion ``g(t)`` (broadcast to x)."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        return self.expand(self.f(t), x) * x, self.expand(self.g(t), x)

    # -- sampling --------------------------------------------------------------------------
    @staticmethod
    def expand(c: Tensor, x: Tensor) -> Tensor:
        """Broadcast a scalar or per-sample ``(B,)`` coefficient against ``x`` of shape ``(B, ...)``."""
        c = torch.as_tensor(c, dtype=x.dtype, device=x.device)
        if c.ndim == 0:
            return c
        return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))

    def marginal(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``x_t = alpha(t) x0 + sigma(t) eps`` for per-sample ``t`` of shape ``(B,)`` or scalar."""
        return self.expand(self.alpha(t), x0) * x0 + self.expand(self.sigma(t), x0) * eps

    def velocity(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Conditional velocity ``d x_t / dt = alpha'(t) x0 + sigma'(t) eps`` (flow-matching target)."""
        return self.expand(self.d_alpha(t), x0) * x0 + self.expand(self.d_sigma(t), x0) * eps

    def sample(self, x0: Tensor, t: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``eps ~ N(0, I)`` and return ``(x_t, eps)``."""
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        return self.marginal(x0, t, eps), eps

    def prior_std(self, t: float | None = None, data_std: float = 0.0) -> float:
        """Std of the Gaussian prior at time ``t`` (default ``t_max``).

        ``sqrt(sigma^2 + alpha^2 data_std^2)`` is the variance-matched prior for data of std
        ``data_std``; with ``data_std=0`` (default) it is ``sigma(t)``, the usual choice.
        """
        t = self.t_max if t is None else float(t)
        tt = torch.tensor(t, dtype=torch.float64)
        return float(torch.sqrt(self.sigma(tt) ** 2 + (self.alpha(tt) * data_std) ** 2))

    def prior_sample(
        self,
        shape,
        t: float | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device=None,
        data_std: float = 0.0,
    ) -> Tensor:
        """Draw the starting noise of a sampler: ``N(0, prior_std(t)^2 I)``."""
        z = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        return self.prior_std(t, data_std) * z

    def prior_logp(self, z: Tensor, t: float | None = None, data_std: float = 0.0) -> Tensor:
        """Log density of the prior at ``z`` of shape ``(B, ...)``, summed over non-batch dims."""
        s = self.prior_std(t, data_std)
        d = z[0].numel()
        return -0.5 * z.flatten(1).pow(2).sum(1) / s**2 - d * (math.log(s) + 0.5 * math.log(2 * math.pi))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t_min={self.t_min}, t_max={self.t_max})"


def _t(t) -> Tensor:
    t = torch.as_tensor(t)
    return t if torch.is_floating_point(t) else t.to(torch.get_default_dtype())


class VPPath(GaussianPath):
    """Variance preserving SDE with linear ``beta(t) = b0 + t (b1 - b0)`` (Song et al. 2021, eq. 11).

    ``alpha = exp(-t^2 (b1 - b0)/4 - t b0 / 2)``, ``sigma = sqrt(1 - alpha^2)``, ``f = -beta/2``,
    ``g^2 = beta``. Default ``t_min = 1e-3`` follows the sampling epsilon of the paper.
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        super().__init__(t_min, t_max)
        if not (0 < beta_min < beta_max):
            raise ValueError(f"need 0 < beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def beta(self, t):
        return self.beta_min + _t(t) * (self.beta_max - self.beta_min)

    def _log_alpha(self, t):
        t = _t(t)
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t):
        return torch.exp(self._log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self._log_alpha(t)))

    def d_alpha(self, t):
        return -0.5 * self.beta(t) * self.alpha(t)

    def d_sigma(self, t):
        a = self.alpha(t)
        return 0.5 * self.beta(t) * a * a / self.sigma(t)

    def f(self, t):
        return -0.5 * self.beta(t)

    def g2(self, t):
        return self.beta(t)

    def log_snr(self, t):
        la = self._log_alpha(t)
        return 2.0 * la - torch.log(-torch.expm1(2.0 * la))

    def _t_from_log_alpha(self, neg2la: Tensor) -> Tensor:
        # -2 log alpha = t^2 (b1 - b0)/2 + t b0: take the positive root, written stably.
        db = self.beta_max - self.beta_min
        return 2.0 * neg2la / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * db * neg2la))

    def t_from_log_snr(self, lam):
        lam = torch.as_tensor(lam, dtype=torch.float64)
        # alpha^2 = sigmoid(lambda)  =>  -2 log alpha = softplus(-lambda)
        return self._t_from_log_alpha(torch.nn.functional.softplus(-lam))


class SubVPPath(VPPath):
    """sub-VP SDE (Song et al. 2021, eq. 29): alpha as VP, ``sigma = 1 - alpha^2``, ``g^2 = beta (1 - alpha^4)``."""

    name = "subvp"

    def sigma(self, t):
        return -torch.expm1(2.0 * self._log_alpha(t))

    def d_sigma(self, t):
        a = self.alpha(t)
        return self.beta(t) * a * a

    def g2(self, t):
        return self.beta(t) * -torch.expm1(4.0 * self._log_alpha(t))

    def log_snr(self, t):
        la = self._log_alpha(t)
        return 2.0 * la - 2.0 * torch.log(-torch.expm1(2.0 * la))

    def t_from_log_snr(self, lam):
        lam = torch.as_tensor(lam, dtype=torch.float64)
        e = torch.exp(lam)
        # u = alpha^2 solves e u^2 - (2e + 1) u + e = 0; the root in (0, 1), written stably.
        u = 2.0 * e / ((2.0 * e + 1.0) + torch.sqrt(4.0 * e + 1.0))
        return self._t_from_log_alpha(-torch.log(u))


class CosinePath(GaussianPath):
    """Cosine schedule of improved DDPM: ``alpha^2 = cos^2(phi(t)) / cos^2(phi(0))``,
    ``phi(t) = (t + s) / (1 + s) * pi / 2``, ``sigma = sqrt(1 - alpha^2)``; alpha(1) = 0."""

    name = "cosine"

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 1.0):
        if not (math.isfinite(s) and s >= 0):  # as core.ddpm.cosine_betas: s < 0 collapses alpha to 0
            raise ValueError(f"CosinePath offset s must be finite and >= 0, got {s!r}")
        super().__init__(t_min, t_max)
        self.s = float(s)
        self._c0 = math.cos(self.s / (1 + self.s) * math.pi / 2)

    def _phi(self, t):
        return (_t(t) + self.s) / (1 + self.s) * (math.pi / 2)

    def alpha(self, t):
        return (torch.cos(self._phi(t)) / self._c0).clamp(min=0.0)

    def sigma(self, t):
        a = self.alpha(t)
        return torch.sqrt((1.0 - a * a).clamp(min=0.0))

    def d_alpha(self, t):
        return -torch.sin(self._phi(t)) / self._c0 * (math.pi / 2 / (1 + self.s))

    def d_sigma(self, t):
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def t_from_log_snr(self, lam):
        lam = torch.as_tensor(lam, dtype=torch.float64)
        a = torch.sqrt(torch.sigmoid(lam))
        phi = torch.acos((a * self._c0).clamp(-1.0, 1.0))
        return phi * (2 / math.pi) * (1 + self.s) - self.s


class VEPath(GaussianPath):
    """Variance exploding SDE (SMLD; Song et al. 2021, eq. 9): ``alpha = 1``,
    ``sigma = s0 (s1 / s0)^t``, ``g^2 = 2 sigma sigma'``. Note ``sigma(0) = s0 > 0``."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 0.0, t_max: float = 1.0):
        super().__init__(t_min, t_max)
        if not (0 < sigma_min < sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def alpha(self, t):
        return torch.ones_like(_t(t))

    def d_alpha(self, t):
        return torch.zeros_like(_t(t))

    def sigma(self, t):
        return self.sigma_min * torch.exp(_t(t) * self._log_ratio)

    def d_sigma(self, t):
        return self.sigma(t) * self._log_ratio

    def f(self, t):
        return torch.zeros_like(_t(t))

    def t_from_log_snr(self, lam):
        lam = torch.as_tensor(lam, dtype=torch.float64)
        return (-0.5 * lam - math.log(self.sigma_min)) / self._log_ratio


class EDMPath(GaussianPath):
    """EDM's path (Karras et al. 2022): ``alpha = 1``, ``sigma = sigma_max t``.

    Sigma is the time variable up to the constant ``sigma_max``, so ``sigma(t) = t`` of the
    paper becomes ``t = sigma / sigma_max``. Default ``t_min`` gives EDM's ``sigma_min = 0.002``.
    """

    name = "edm"

    def __init__(self, sigma_max: float = 80.0, sigma_min: float = 0.002, t_max: float = 1.0):
        if not (0 < sigma_min < sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        super().__init__(sigma_min / sigma_max, t_max)
        self.sigma_max, self.sigma_min = float(sigma_max), float(sigma_min)

    def alpha(self, t):
        return torch.ones_like(_t(t))

    def d_alpha(self, t):
        return torch.zeros_like(_t(t))

    def sigma(self, t):
        return self.sigma_max * _t(t)

    def d_sigma(self, t):
        return torch.full_like(_t(t), self.sigma_max)

    def f(self, t):
        return torch.zeros_like(_t(t))

    def t_from_log_snr(self, lam):
        lam = torch.as_tensor(lam, dtype=torch.float64)
        return torch.exp(-0.5 * lam) / self.sigma_max


class LinearPath(GaussianPath):
    """Linear interpolant ``x_t = (1 - t) x0 + t eps`` (rectified flow; SiT "Linear").

    Pure noise at ``t = 1`` (alpha = 0, logSNR = -inf); the velocity is ``eps - x0``.
    """

    name = "linear"

    def alpha(self, t):
        return 1.0 - _t(t)

    def sigma(self, t):
        return _t(t).clone()

    def d_alpha(self, t):
        return torch.full_like(_t(t), -1.0)

    def d_sigma(self, t):
        return torch.ones_like(_t(t))

    def t_from_log_snr(self, lam):
        lam = torch.as_tensor(lam, dtype=torch.float64)
        return torch.sigmoid(-0.5 * lam)


class GVPPath(GaussianPath):
    """Generalised variance preserving interpolant of SiT: ``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)``."""

    name = "gvp"

    def alpha(self, t):
        return torch.cos(_t(t) * (math.pi / 2))

    def sigma(self, t):
        return torch.sin(_t(t) * (math.pi / 2))

    def d_alpha(self, t):
        return -(math.pi / 2) * torch.sin(_t(t) * (math.pi / 2))

    def d_sigma(self, t):
        return (math.pi / 2) * torch.cos(_t(t) * (math.pi / 2))

    def t_from_log_snr(self, lam):
        lam = torch.as_tensor(lam, dtype=torch.float64)
        return torch.atan(torch.exp(-0.5 * lam)) * (2 / math.pi)


PATHS: dict[str, Callable[..., GaussianPath]] = {
    cls.name: cls for cls in (VPPath, SubVPPath, CosinePath, VEPath, EDMPath, LinearPath, GVPPath)
}


def get_path(name: str, **kwargs) -> GaussianPath:
    """Build a path by name (``vp, subvp, cosine, ve, edm, linear, gvp``) with its keyword options."""
    if isinstance(name, GaussianPath):
        return name
    if name not in PATHS:
        raise ValueError(f"unknown path {name!r}; choose one of {sorted(PATHS)}")
    return PATHS[name](**kwargs)
