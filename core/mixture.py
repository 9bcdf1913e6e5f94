"""A Gaussian mixture with diagonal covariances: a data distribution whose every diffused
marginal, score and denoiser is known in closed form under every Gaussian path.

If ``x0 ~ sum_k w_k N(mu_k, diag(v_k))`` then ``x_t = alpha x0 + sigma eps`` has density
``sum_k w_k N(alpha mu_k, diag(alpha^2 v_k + sigma^2))``, and the posterior mean is
``E[x0 | x_t] = sum_k r_k(x_t) (mu_k + alpha v_k (x_t - alpha mu_k) / (alpha^2 v_k + sigma^2))``
with responsibilities ``r_k``. This is the exact denoiser the tests and benchmarks use; it is
well defined at ``alpha = 0`` (pure noise) and at ``sigma = 0`` (data).

For a single Gaussian the probability-flow ODE is solvable: in the scaled variable
``y = x / alpha`` with noise level ``s = sigma / alpha`` each coordinate moves as
``y(s) - mu = (y(s') - mu) sqrt((v + s^2) / (v + s'^2))`` (:meth:`GaussianMixture.pf_ode_exact`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .paths import GaussianPath

__all__ = ["GaussianMixture", "sliced_wasserstein", "checkerboard_mixture"]


class GaussianMixture:
    """``K`` components in ``d`` dimensions.

    Args:
        weights: ``(K,)`` non-negative, normalised internally.
        means: ``(K, d)``.
        variances: ``(K, d)`` (diagonal), ``(K,)`` (isotropic) or a float.
    """

    def __init__(self, weights: Tensor, means: Tensor, variances):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
        k, d = means.shape
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError(f"weights must be {k} non-negative numbers with a positive sum, got {weights}")
        v = torch.as_tensor(variances, dtype=torch.float64)
        v = v.expand(k).unsqueeze(1).expand(k, d) if v.ndim <= 1 and v.shape != (k, d) else v
        if v.shape != (k, d) or bool((v <= 0).any()):
            raise ValueError(f"variances must be positive with shape (K, d)=({k}, {d}), got {tuple(v.shape)}")
        self.weights = weights / weights.sum()
        self.means = means
        self.variances = v.clone()
        self.dim = d

    @classmethod
    def random(cls, dim: int, n_components: int, seed: int = 0, spread: float = 1.0, var_range=(0.01, 0.1)):
        """A reproducible random mixture (used by tests and the sampler benchmark)."""
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(n_components, dim, generator=g, dtype=torch.float64)
        lo, hi = var_range
        var = lo + (hi - lo) * torch.rand(n_components, dim, generator=g, dtype=torch.float64)
        w = 0.5 + torch.rand(n_components, generator=g, dtype=torch.float64)
        return cls(w, means, var)

    # -- data ------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> Tensor:
        """``(n, d)`` exact samples of the data distribution."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[comp] + self.variances[comp].sqrt() * z).to(dtype)

    def mean(self) -> Tensor:
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Full ``(d, d)`` covariance of the mixture."""
        mu = self.mean()
        second = torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        second = second + torch.diag(self.weights @ self.variances)
        return second - torch.outer(mu, mu)

    # -- diffused marginals ----------------------------------------------------------------
    def _coeffs(self, x: Tensor, t, path: GaussianPath):
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        a = path.alpha(t).reshape(-1, 1, 1)
        s = path.sigma(t).reshape(-1, 1, 1)
        return a, s

    def _components(self, x: Tensor, t, path: GaussianPath):
        """Per-component log-weights ``(B, K)``, centred inputs and marginal variances."""
        x64 = x.to(torch.float64).reshape(x.shape[0], 1, -1)
        a, s = self._coeffs(x, t, path)
        var_t = a * a * self.variances + s * s  # (B, K, d)
        diff = x64 - a * self.means  # (B, K, d)
        logn = -0.5 * ((diff * diff) / var_t + torch.log(2 * math.pi * var_t)).sum(-1)
        return torch.log(self.weights) + logn, diff, var_t, a

    def log_prob(self, x: Tensor, t=0.0, path: GaussianPath | None = None) -> Tensor:
        """``log p_t(x)`` of ``(B, d)`` points; with ``path=None`` the data density."""
        if path is None:
            x64 = x.to(torch.float64).unsqueeze(1)
            diff = x64 - self.means
            logn = -0.5 * ((diff * diff) / self.variances + torch.log(2 * math.pi * self.variances)).sum(-1)
            return torch.logsumexp(torch.log(self.weights) + logn, dim=1).to(x.dtype)
        lw, _, _, _ = self._components(x, t, path)
        return torch.logsumexp(lw, dim=1).to(x.dtype)

    def score(self, x: Tensor, t, path: GaussianPath) -> Tensor:
        """Exact ``grad_x log p_t(x)`` of shape ``(B, d)``."""
        lw, diff, var_t, _ = self._components(x, t, path)
        r = torch.softmax(lw, dim=1).unsqueeze(-1)
        return (r * (-diff / var_t)).sum(1).to(x.dtype)

    def denoise(self, x: Tensor, t, path: GaussianPath) -> Tensor:
        """Exact posterior mean ``E[x0 | x_t = x]`` of shape ``(B, d)`` (float64 inside)."""
        lw, diff, var_t, a = self._components(x, t, path)
        r = torch.softmax(lw, dim=1).unsqueeze(-1)
        post = self.means + a * self.variances * diff / var_t
        return (r * post).sum(1).to(x.dtype)

    def denoiser(self, path: GaussianPath):
        """``D(x, t)`` for the samplers, with an evaluation counter ``D.nfe``."""

        def D(x: Tensor, t) -> Tensor:
            D.nfe += 1
            return self.denoise(x, t, path)

        D.nfe = 0
        D.path = path
        return D

    def pf_ode_exact(self, x_start: Tensor, t_start: float, t_end: float, path: GaussianPath) -> Tensor:
        """Closed-form PF-ODE map from ``t_start`` to ``t_end``; single-component mixtures only."""
        if self.means.shape[0] != 1:
            raise ValueError("pf_ode_exact needs a single Gaussian component")
        ts = torch.tensor([t_start, t_end], dtype=torch.float64)
        a, s = path.alpha(ts), path.sigma(ts)
        mu, v = self.means[0], self.variances[0]
        shat0, shat1 = s[0] / a[0], s[1] / a[1]
        y0 = x_start.to(torch.float64) / a[0]
        y1 = mu + (y0 - mu) * torch.sqrt((v + shat1**2) / (v + shat0**2))
        return (a[1] * y1).to(x_start.dtype)


def sliced_wasserstein(
    x: Tensor, y: Tensor, n_proj: int = 256, p: int = 2, generator: torch.Generator | None = None
) -> float:
    """Sliced p-Wasserstein distance between two ``(n, d)`` point sets of equal size.

    Projects on ``n_proj`` random unit directions and averages the 1D distances (sorted samples).
    """
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"need two (n, d) tensors of the same shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    x, y = x.to(torch.float64), y.to(torch.float64)
    dirs = torch.randn(x.shape[1], n_proj, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ dirs, dim=0)
    py, _ = torch.sort(y @ dirs, dim=0)
    return float((px - py).abs().pow(p).mean().pow(1.0 / p))


def checkerboard_mixture(n_side: int = 4, scale: float = 1.0, var: float = 0.01) -> GaussianMixture:
    """A 2D checkerboard of small Gaussians (half of the ``n_side x n_side`` cells filled)."""
    centres = []
    for i in range(n_side):
        for j in range(n_side):
            if (i + j) % 2 == 0:
                centres.append([(i - (n_side - 1) / 2) * scale, (j - (n_side - 1) / 2) * scale])
    means = torch.tensor(centres, dtype=torch.float64)
    return GaussianMixture(torch.ones(len(centres)), means, var)
