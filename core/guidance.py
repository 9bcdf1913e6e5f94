"""Classifier-free guidance as a denoiser wrapper, with a guidance interval and Adaptive Guidance.

Classifier-free guidance (Ho & Salimans 2022) mixes a conditional and an unconditional prediction,

    D(x, t) = D_u(x, t) + s (D_c(x, t) - D_u(x, t)),

``s = 1`` being the conditional model and ``s = 0`` the unconditional one. The mix has weights that sum
to one, so it commutes with the affine maps of :mod:`core.predictions`: guiding x0, eps, v or velocity
outputs gives the same sampler input. The wrappers here therefore accept models of any prediction
type and return the same type; wrap the result with :func:`core.predictions.as_denoiser` if needed.

- **Guidance interval** (Kynkaanniemi et al. 2024): guide only for ``t`` in ``[t_lo, t_hi]`` and use the
  conditional prediction alone elsewhere, one network evaluation instead of two. The paper states the
  interval in EDM's sigma; :func:`sigma_interval` converts it to times on any path.
- **Adaptive Guidance** (Castillo et al. 2023, seed 185): once the conditional and unconditional
  predictions of a sample are aligned, cosine similarity above ``gamma``, the rest of that sample's
  trajectory uses the conditional prediction alone: the unconditional pass is dropped for it for the
  remaining steps. The similarity is taken between the outputs of the wrapped models as they are:
  Castillo et al. compare noise predictions, which is what one gets by guiding an eps network and
  wrapping the guided model with :func:`core.predictions.as_denoiser`; guiding denoisers compares x0
  predictions. Near pure noise both eps predictions are close to ``x / sigma``, so in eps the
  similarity starts near 1 and ``gamma`` must sit very close to 1 (or the interval exclude early t).

Counting. ``.nfe`` counts network evaluations on the batch: the conditional pass counts 1 and the
unconditional pass counts 1, whether they run as two calls or as one concatenated call over
``[y, null]`` (a batched guided step costs 2, a conditional-only step 1; a pass over a sub-batch still
counts 1). ``.sample_nfe`` counts per sample (``(B,)``), which is what Adaptive Guidance saves when
samples stop at different steps; ``.calls`` counts invocations of the underlying callables.

A wrapper holds per-run state (counters, which samples stopped guidance): call :meth:`reset` or build a
fresh wrapper before each sampling run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .paths import GaussianPath
from .predictions import per_sample_t

__all__ = ["GuidedDenoiser", "cfg_denoiser", "cfg_net", "adaptive_guidance", "sigma_interval"]


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance scale must be a finite number >= 0, got {scale!r}")
    return float(scale)


def _check_interval(interval) -> tuple[float, float] | None:
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance interval must be a pair (t_lo, t_hi), got {interval!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo < hi <= 1.0):
        raise ValueError(f"guidance interval must satisfy 0 <= t_lo < t_hi <= 1, got {interval!r}")
    return lo, hi


def _check_gamma(gamma) -> float | None:
    if gamma is None:
        return None
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"adaptive guidance threshold gamma must be a finite number > 0, got {gamma!r}")
    return float(gamma)


def sigma_interval(path: GaussianPath, sigma_lo: float, sigma_hi: float) -> tuple[float, float]:
    """Times ``(t_lo, t_hi)`` at which ``sigma_hat = sigma / alpha`` equals ``sigma_lo`` and ``sigma_hi``.

    Kynkaanniemi et al. 2024 guide EDM2 models for ``sigma`` in ``(0.28, 5.42]``; on EDM's path this is
    ``sigma_interval(path, 0.28, 5.42)``. Both ends are clipped to ``[0, 1]``.
    """
    if not (0 < sigma_lo < sigma_hi):
        raise ValueError(f"need 0 < sigma_lo < sigma_hi, got sigma_lo={sigma_lo}, sigma_hi={sigma_hi}")
    t = path.t_from_sigma(torch.tensor([sigma_lo, sigma_hi], dtype=torch.float64)).clamp(0.0, 1.0)
    return float(t[0]), float(t[1])


class GuidedDenoiser:
    """``x, t -> D_u + s (D_c - D_u)`` with interval, Adaptive Guidance and evaluation counters.

    Built by :func:`cfg_denoiser`, :func:`cfg_net` or :func:`adaptive_guidance`; see the module docstring.

    Args:
        cond: ``(x, t) -> prediction`` of the conditional model (1 evaluation).
        pair: ``(x, t, mask) -> (cond of all B samples, uncond of the samples in mask)`` (2 evaluations).
        scale, interval, gamma: as in :func:`adaptive_guidance`.
        pair_calls: how many calls ``pair`` makes (2 for two models, 1 for a concatenated batch).
    """

    def __init__(
        self,
        cond: Callable[[Tensor, Tensor], Tensor],
        pair: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]],
        scale: float,
        interval=None,
        gamma: float | None = None,
        pair_calls: int = 2,
    ):
        self._cond, self._pair = cond, pair
        self.scale = _check_scale(scale)
        self.interval = _check_interval(interval)
        self.gamma = _check_gamma(gamma)
        self.pair_calls = pair_calls
        self.reset()

    def reset(self) -> None:
        """Forget the previous sampling run: counters and which samples stopped guidance."""
        self.nfe = 0
        self.calls = 0
        self.sample_nfe: Tensor | None = None
        self.stopped: Tensor | None = None  # (B,) bool: Adaptive Guidance switched this sample off
        self.stop_t: Tensor | None = None  # (B,) time of the step that switched it off (nan if never)

    def _start(self, x: Tensor) -> None:
        b = x.shape[0]
        if self.sample_nfe is not None and self.sample_nfe.shape[0] != b:
            if self.gamma is not None:
                raise ValueError(
                    f"batch size changed from {self.sample_nfe.shape[0]} to {b} during a run of adaptive "
                    "guidance; call reset() between sampling runs"
                )
            self.sample_nfe = None
        if self.sample_nfe is None:
            self.sample_nfe = torch.zeros(b, dtype=torch.long, device=x.device)
            self.stopped = torch.zeros(b, dtype=torch.bool, device=x.device)
            self.stop_t = torch.full((b,), float("nan"), dtype=torch.float64, device=x.device)

    @staticmethod
    def _similarity(c: Tensor, u: Tensor) -> Tensor:
        cos = F.cosine_similarity(c.flatten(1).double(), u.flatten(1).double(), dim=1)
        # clamp: rounding may put cos a hair above 1, and gamma = 1 must never trigger
        return torch.nan_to_num(cos.clamp(-1.0, 1.0), nan=-1.0)

    def __call__(self, x: Tensor, t) -> Tensor:
        t = per_sample_t(t, x)
        self._start(x)
        guide = ~self.stopped
        if self.interval is not None:
            t64 = t.double()
            guide = guide & (t64 >= self.interval[0]) & (t64 <= self.interval[1])
        if not bool(guide.any()):
            out = self._cond(x, t)
            self.nfe += 1
            self.calls += 1
            self.sample_nfe += 1
            return out

        c, u = self._pair(x, t, guide)
        self.nfe += 2
        self.calls += self.pair_calls
        self.sample_nfe += 1 + guide.long()
        every = bool(guide.all())
        cg = c if every else c[guide]
        out_g = u + self.scale * (cg - u)
        if every:
            out = out_g
        else:
            out = c.clone()
            out[guide] = out_g

        if self.gamma is not None:
            tg = t if every else t[guide]
            now = self._similarity(cg, u) > self.gamma
            idx = guide.nonzero().squeeze(1)[now]
            self.stopped[idx] = True
            self.stop_t[idx] = tg[now].double()
        return out


def cfg_denoiser(
    cond_denoiser: Callable[[Tensor, Tensor], Tensor],
    uncond_denoiser: Callable[[Tensor, Tensor], Tensor],
    scale: float,
    interval: tuple[float, float] | None = None,
) -> GuidedDenoiser:
    """Classifier-free guidance of two models ``(x, t) -> prediction``: ``D_u + s (D_c - D_u)`` where
    ``t`` lies in ``interval`` (all ``t`` if None), the conditional prediction alone elsewhere."""
    return adaptive_guidance(cond_denoiser, uncond_denoiser, scale, None, interval)


def adaptive_guidance(
    cond_denoiser: Callable[[Tensor, Tensor], Tensor],
    uncond_denoiser: Callable[[Tensor, Tensor], Tensor],
    scale: float,
    gamma: float | None,
    interval: tuple[float, float] | None = None,
) -> GuidedDenoiser:
    """Adaptive Guidance (Castillo et al. 2023): CFG until, for each sample, the cosine similarity of
    its conditional and unconditional predictions (over all non-batch dims) exceeds ``gamma``
    (e.g. 0.99 .. 0.9999); from the next step on that sample takes the conditional prediction only.

    ``gamma >= 1`` never triggers and ``gamma=None`` is plain CFG. The step at which a sample triggers
    is still guided (both predictions are at hand); ``.stop_t`` records its time. A non-finite
    similarity never triggers.
    """

    def cond(x, t):
        return cond_denoiser(x, t)

    def pair(x, t, mask):
        c = cond_denoiser(x, t)
        u = uncond_denoiser(x, t) if bool(mask.all()) else uncond_denoiser(x[mask], t[mask])
        return c, u

    return GuidedDenoiser(cond, pair, scale, interval, gamma, pair_calls=2)


def cfg_net(
    net: Callable[..., Tensor],
    y: Tensor,
    null_label,
    scale: float,
    interval: tuple[float, float] | None = None,
    *,
    gamma: float | None = None,
    **net_kwargs,
) -> GuidedDenoiser:
    """Guidance of one class-conditional network ``net(x, t, y, **net_kwargs)`` that takes a null label.

    A guided step runs one call on ``[x, x]`` with labels ``[y, null]`` (DiT's ``forward_with_cfg``
    batching), counted as 2 network evaluations; outside the interval, or for samples that Adaptive
    Guidance switched off, the null half is left out. ``y``: ``(B,)``; ``null_label``: a label or ``(B,)``.
    """
    y = torch.as_tensor(y)
    null = torch.as_tensor(null_label, dtype=y.dtype, device=y.device)
    null = null.expand(y.shape) if null.ndim == 0 else null
    if null.shape != y.shape:
        raise ValueError(f"null_label must be a label or have the shape of y {tuple(y.shape)}, got {tuple(null.shape)}")

    def labels(x):
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"y has {y.shape[0]} labels for a batch of {x.shape[0]}")
        return y.to(x.device), null.to(x.device)

    def cond(x, t):
        return net(x, t, labels(x)[0], **net_kwargs)

    def pair(x, t, mask):
        yc, yn = labels(x)
        every = bool(mask.all())
        xs, ts, ns = (x, t, yn) if every else (x[mask], t[mask], yn[mask])
        out = net(torch.cat([x, xs]), torch.cat([t, ts]), torch.cat([yc, ns]), **net_kwargs)
        return out[: x.shape[0]], out[x.shape[0] :]

    return GuidedDenoiser(cond, pair, scale, interval, gamma, pair_calls=1)
