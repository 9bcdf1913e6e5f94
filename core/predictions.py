"""One conversion module for what a network predicts, and EDM preconditioning.

A network on a Gaussian path ``x_t = alpha x0 + sigma eps`` may predict

- ``eps``: the noise (DDPM, seed 132),
- ``x0``: the clean data (a denoiser, EDM's ``D``),
- ``v``: ``alpha eps - sigma x0`` (Salimans & Ho 2022; the same formula on every path),
- ``score``: ``grad log p_t(x_t) = -eps / sigma`` (Song et al. 2021),
- ``velocity``: ``alpha' x0 + sigma' eps``, the flow-matching / SiT target.

All five determine ``(x0, eps)`` given ``x_t`` and ``t`` (Luo 2022, seed 14, sec. 2); every
conversion goes through that pair. Samplers in polydiff consume a *denoiser*
``D(x, t) -> x0_hat``; :func:`as_denoiser` turns any network into one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .paths import GaussianPath

PREDICTIONS = ("eps", "x0", "v", "score", "velocity")

__all__ = ["PREDICTIONS", "to_x0_eps", "from_x0_eps", "convert", "as_denoiser", "EDMPrecond", "per_sample_t"]


def _check_kind(kind: str) -> None:
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {kind!r}; choose one of {PREDICTIONS}")


def _coef_time(t, x: Tensor) -> Tensor:
    """Times in float64 for computing path coefficients (cast to x's dtype by ``path.expand``)."""
    t = torch.as_tensor(t, device=x.device)
    return t.to(torch.float64) if x.device.type != "mps" else t.to(x.dtype)


def per_sample_t(t, x: Tensor) -> Tensor:
    """Return ``t`` as a ``(B,)`` tensor of x's dtype and device (a float or 0-d tensor is broadcast)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t


def to_x0_eps(pred: Tensor, kind: str, x_t: Tensor, t, path: GaussianPath) -> tuple[Tensor, Tensor]:
    """Recover ``(x0, eps)`` from a prediction of type ``kind`` at ``(x_t, t)``; ``t`` is ``(B,)`` or scalar."""
    _check_kind(kind)
    t = _coef_time(t, x_t)
    a, s = path.expand(path.alpha(t), x_t), path.expand(path.sigma(t), x_t)
    if kind == "x0":
        return pred, (x_t - a * pred) / s
    if kind in ("eps", "score"):
        eps = pred if kind == "eps" else -s * pred
        return (x_t - s * eps) / a, eps
    if kind == "v":
        n = a * a + s * s
        return (a * x_t - s * pred) / n, (s * x_t + a * pred) / n
    # velocity u = a' x0 + s' eps together with x_t = a x0 + s eps: a 2x2 linear system.
    da, ds = path.expand(path.d_alpha(t), x_t), path.expand(path.d_sigma(t), x_t)
    det = a * ds - s * da
    return (ds * x_t - s * pred) / det, (a * pred - da * x_t) / det


def from_x0_eps(x0: Tensor, eps: Tensor, kind: str, x_t: Tensor, t, path: GaussianPath) -> Tensor:
    """Express ``(x0, eps)`` as a prediction of type ``kind``."""
    _check_kind(kind)
    t = _coef_time(t, x_t)
    if kind == "x0":
        return x0
    if kind == "eps":
        return eps
    a, s = path.expand(path.alpha(t), x_t), path.expand(path.sigma(t), x_t)
    if kind == "score":
        return -eps / s
    if kind == "v":
        return a * eps - s * x0
    return path.expand(path.d_alpha(t), x_t) * x0 + path.expand(path.d_sigma(t), x_t) * eps


def convert(pred: Tensor, src: str, dst: str, x_t: Tensor, t, path: GaussianPath) -> Tensor:
    """Convert a prediction from type ``src`` to type ``dst`` (see module docstring)."""
    _check_kind(dst)
    if src == dst:
        _check_kind(src)
        return pred
    x0, eps = to_x0_eps(pred, src, x_t, t, path)
    return from_x0_eps(x0, eps, dst, x_t, t, path)


def as_denoiser(
    model: Callable[..., Tensor], path: GaussianPath, prediction: str = "eps", **model_kwargs
) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap ``model(x_t, t, **model_kwargs)`` predicting ``prediction`` into ``D(x_t, t) -> x0``.

    ``t`` reaches the model as a ``(B,)`` tensor in polydiff's convention (data at 0).
    """
    _check_kind(prediction)

    def denoiser(x: Tensor, t) -> Tensor:
        t = per_sample_t(t, x)
        out = model(x, t, **model_kwargs)
        return out if prediction == "x0" else to_x0_eps(out, prediction, x, t, path)[0]

    denoiser.path = path  # type: ignore[attr-defined]
    return denoiser


class EDMPrecond(nn.Module):
    """EDM preconditioning (Karras et al. 2022, Table 1) as a wrapper around any network.

    ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` with
    ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
    ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4``.

    On a general path the input is first scaled to ``x / alpha`` with noise level
    ``sigma / alpha`` (EDM sec. 4, "scaling"), so the same wrapper serves VP, linear, ... paths.
    ``forward(x, t)`` returns the denoised estimate of x0; ``net(x_in, c_noise, **kw)`` gets
    ``c_noise`` as a ``(B,)`` tensor.
    """

    def __init__(self, net: nn.Module, path: GaussianPath, sigma_data: float = 0.5):
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.net, self.path, self.sigma_data = net, path, float(sigma_data)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        n = sigma * sigma + sd2
        return sd2 / n, sigma * self.sigma_data / n.sqrt(), 1.0 / n.sqrt(), torch.log(sigma) / 4

    def forward(self, x: Tensor, t, **kwargs) -> Tensor:
        t = per_sample_t(t, x)
        a = self.path.expand(self.path.alpha(t), x)
        sigma = self.path.sigma_hat(t)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        y = x / a
        e = self.path.expand
        return e(c_skip, x) * y + e(c_out, x) * self.net(e(c_in, x) * y, c_noise, **kwargs)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """EDM's ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2``, which makes the effective weight 1."""
        return (sigma * sigma + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

