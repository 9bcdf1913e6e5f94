"""Noise schedules of a discrete diffusion: total noise ``sigma(t)`` and its rate ``dsigma/dt``.

The forward CTMC on a vocabulary has generator ``dsigma/dt * Q`` (Lou et al. 2024, "Discrete
Diffusion Modeling by Estimating the Ratios of the Data Distribution", SEDD),
so at time ``t`` a token has moved along ``exp(sigma(t) Q)``. Time runs over ``[0, 1]`` with data
at ``t = 0`` (``sigma(0)`` is 0 or tiny); a sampler integrates from ``t = 1`` down to a small
``eps``.

=============  =========================================  ==========================================
schedule       sigma(t)                                   use
=============  =========================================  ==========================================
``LogLinear``  ``-log(1 - (1 - eps) t)``                  absorbing graphs: ``P(mask) = (1-eps) t``
``Geometric``  ``sigma_min^(1-t) sigma_max^t``            uniform graphs (SEDD's geometric noise)
=============  =========================================  ==========================================

Calling a schedule returns ``(sigma(t), dsigma/dt(t))`` like SEDD's ``Noise.forward``. Values
are computed in float64 and returned in ``t``'s floating dtype (float64 in, float64 out), so a
float32 caller gets the correctly rounded float32 of the exact value.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..paths import check_time

__all__ = ["Noise", "LogLinear", "Geometric", "get_noise"]


class Noise:
    """A schedule: ``sigma(t)`` (total noise) and ``rate(t)`` (``dsigma/dt``), ``t`` in [0, 1]."""

    name = "base"

    def _sigma(self, t: Tensor) -> Tensor:  # float64 in, float64 out
        raise NotImplementedError

    def _rate(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def _prepare(t) -> tuple[Tensor, torch.dtype]:
        t = check_time(t)
        return t.to(torch.float64), t.dtype

    def sigma(self, t) -> Tensor:
        """Total noise ``sigma(t) = int_0^t dsigma`` (plus ``sigma(0)``); shape of ``t``."""
        t64, dtype = self._prepare(t)
        return self._sigma(t64).to(dtype)

    def rate(self, t) -> Tensor:
        """Noise rate ``dsigma/dt``; shape of ``t``."""
        t64, dtype = self._prepare(t)
        return self._rate(t64).to(dtype)

    def __call__(self, t) -> tuple[Tensor, Tensor]:
        """``(sigma(t), dsigma/dt(t))``, as SEDD's ``Noise.forward``."""
        t64, dtype = self._prepare(t)
        return self._sigma(t64).to(dtype), self._rate(t64).to(dtype)

    def mask_prob(self, t) -> Tensor:
        """``1 - exp(-sigma(t))``: the chance that a token has left its state (absorbing: is masked)."""
        t64, dtype = self._prepare(t)
        return (-torch.expm1(-self._sigma(t64))).to(dtype)


class LogLinear(Noise):
    """SEDD's log-linear schedule ``sigma(t) = -log(1 - (1 - eps) t)`` (``noise_lib.LogLinearNoise``).

    With an absorbing graph the mask probability ``1 - exp(-sigma)`` is ``(1 - eps) t``: linear
    in time, as in MDLM (Sahoo et al. 2024) and RADD (Ou et al. 2024). ``eps`` keeps ``sigma(1)``
    finite (``-log eps``); it must lie in (0, 1).
    """

    name = "loglinear"

    def __init__(self, eps: float = 1e-3):
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0.0 < eps < 1.0):
            raise ValueError(f"LogLinear eps must be a number in (0, 1), got {eps!r}")
        self.eps = float(eps)

    def _sigma(self, t):
        return -torch.log1p(-(1.0 - self.eps) * t)

    def _rate(self, t):
        return (1.0 - self.eps) / (1.0 - (1.0 - self.eps) * t)

    def __repr__(self):
        return f"LogLinear(eps={self.eps})"


class Geometric(Noise):
    """SEDD's geometric schedule ``sigma(t) = sigma_min^(1-t) sigma_max^t`` (``noise_lib.GeometricNoise``).

    ``dsigma/dt = sigma(t) log(sigma_max / sigma_min)``. SEDD's uniform-graph models use
    ``(1e-4, 20)``; the class defaults ``(1e-3, 1)`` are those of the official code.
    """

    name = "geometric"

    def __init__(self, sigma_min: float = 1e-3, sigma_max: float = 1.0):
        for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"Geometric {name} must be a finite number > 0, got {v!r}")
        if not sigma_min < sigma_max:
            raise ValueError(f"Geometric needs sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self._log_ratio = math.log(self.sigma_max) - math.log(self.sigma_min)

    def _sigma(self, t):
        return torch.exp((1.0 - t) * math.log(self.sigma_min) + t * math.log(self.sigma_max))

    def _rate(self, t):
        return self._sigma(t) * self._log_ratio

    def __repr__(self):
        return f"Geometric(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


def get_noise(name: str, **kwargs) -> Noise:
    """Schedule by name: ``"loglinear"`` or ``"geometric"``."""
    table = {"loglinear": LogLinear, "geometric": Geometric}
    if name not in table:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {sorted(table)}")
    return table[name](**kwargs)
