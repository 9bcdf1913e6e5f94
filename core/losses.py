"""Denoising score matching and flow matching on a Gaussian path: one loss, many weightings.

Every training objective of the continuous seeds is ``E_t E_{x0, eps} w(t) || f(model) - f* ||^2``
on the path ``x_t = alpha(t) x0 + sigma(t) eps``, where ``f`` is one of the five coordinates of
:mod:`core.predictions` (eps, x0, v, score, velocity). Because all five are affine in ``x0`` at fixed
``(x_t, t)``, the squared errors differ only by a factor that depends on ``t``:

    eps-MSE = SNR * x0-MSE,   velocity-MSE = ((alpha' sigma - alpha sigma') / sigma)^2 * x0-MSE,  ...

so a weighting is fully described by the coordinate it is defined on and a weight ``w(t)``; the network
may predict any coordinate. :func:`denoising_loss` converts the network output to the weighting's
coordinate with :func:`core.predictions.convert` and computes the weighted MSE there.

Weightings (:func:`get_weighting`; ``SNR = alpha^2 / sigma^2``, ``sigma_hat = sigma / alpha``):

===========  ==========  =====================================  =======================================
name         coordinate  weight                                 source
===========  ==========  =====================================  =======================================
eps          eps         1                                      DDPM "L_simple" (Ho et al. 2020, seed 132)
snr          x0          1   (= eps-MSE / SNR; alias ``x0``)    the x0-MSE
v            v           1                                      Salimans & Ho 2022
velocity     velocity    1                                      flow matching / SiT (seed 2)
min_snr      x0          min(SNR, gamma)                        Hang et al. 2023 (Min-SNR-gamma)
edm          x0          (sigma_hat^2 + sd^2) / (sigma_hat sd)^2 Karras et al. 2022, Table 1 (seed 28)
likelihood   score       g(t)^2                                 Song et al. 2021, Thm. 1 (seed 24)
p2           eps         1 / (k + SNR)^gamma                    Choi et al. 2022, eq. 8 (seed 159)
===========  ==========  =====================================  =======================================

Notes on the mapping between coordinates (what :func:`loss_weight` computes for any pair):

- ``min_snr`` with an eps network is ``min(SNR, gamma) / SNR`` on the eps-MSE; with a v network on a
  variance-preserving path (alpha^2 + sigma^2 = 1) it is ``min(SNR, gamma) / (SNR + 1)`` on the v-MSE
  (Hang et al., sec. 3.4); with a velocity network on the linear path (alpha = 1 - t, sigma = t) it is
  ``min(SNR, gamma) t^2`` on the velocity-MSE. These follow from the x0 definition, nothing is special-cased.
- ``likelihood``: ``g^2 || s_theta - grad log p(x_t | x0) ||^2`` integrated over ``t`` is, up to the factor
  1/2 and a constant, an upper bound on the negative log-likelihood of the probability-flow/SDE model
  (Song et al. 2021b, "Maximum likelihood training of score-based diffusion models", Thm. 1). Pair it
  with ``t ~ U[t_min, t_max]``; the bound is per dimension here since the loss averages over dimensions.
- ``edm``: with :class:`core.predictions.EDMPrecond` the weight times ``c_out^2`` is 1, so the loss equals
  the unit-weight MSE of the raw network ``F`` against its effective target (EDM eq. 8).

Time samplers (:func:`get_time_sampler`) draw the training times: ``uniform`` (optionally stratified
or antithetic), ``lognormal`` (EDM: ``ln sigma_hat ~ N(P_mean, P_std^2)``) and ``logit_normal``
(Esser et al. 2024: ``t = sigmoid(N(m, s^2))``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .paths import GaussianPath, LinearPath, check_time
from .predictions import PREDICTIONS, convert, from_x0_eps

__all__ = [
    "WEIGHTINGS",
    "DEFAULT_WEIGHTING",
    "Weighting",
    "get_weighting",
    "loss_weight",
    "TIME_SAMPLERS",
    "stratified_uniform",
    "uniform_time",
    "lognormal_time",
    "logit_normal_time",
    "get_time_sampler",
    "denoising_loss",
    "flow_matching_loss",
]


# ------------------------------------------------------------------------------------------ weightings

# name -> (coordinate the weight multiplies, default parameters)
WEIGHTINGS: dict[str, tuple[str, dict]] = {
    "eps": ("eps", {}),
    "snr": ("x0", {}),
    "x0": ("x0", {}),
    "v": ("v", {}),
    "velocity": ("velocity", {}),
    "min_snr": ("x0", {"gamma": 5.0}),
    "edm": ("x0", {"sigma_data": 0.5}),
    "likelihood": ("score", {}),
    "p2": ("eps", {"k": 1.0, "gamma": 1.0}),
}

# The standard loss of each parameterisation, used when no weighting is named. A score network
# defaults to Song et al.'s lambda(t) = sigma^2, which is the eps-MSE.
DEFAULT_WEIGHTING = {"eps": "eps", "x0": "snr", "v": "v", "score": "eps", "velocity": "velocity"}


def _positive(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(value, bool) or not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


@dataclass(frozen=True)
class Weighting:
    """A loss weighting: ``weight(path, t)`` multiplies the squared error of the ``space`` coordinate."""

    name: str
    space: str
    params: dict = field(default_factory=dict)

    def __call__(self, path: GaussianPath, t: Tensor) -> Tensor:
        """Weight at times ``t`` (computed in float64; shape of ``t``)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        p = self.params
        if self.name in ("eps", "snr", "x0", "v", "velocity"):
            return torch.ones_like(t)
        if self.name == "min_snr":
            return torch.exp(path.log_snr(t)).clamp(max=p["gamma"])
        if self.name == "edm":
            s, sd = path.sigma_hat(t), p["sigma_data"]
            return (s * s + sd * sd) / (s * sd) ** 2
        if self.name == "likelihood":
            return path.g2(t)
        if self.name == "p2":
            return (p["k"] + torch.exp(path.log_snr(t))) ** (-p["gamma"])
        raise ValueError(f"unknown weighting {self.name!r}")  # unreachable through get_weighting


def get_weighting(name: str | Weighting, **params) -> Weighting:
    """Build a weighting by name (see the module table) with its parameters.

    ``min_snr``: ``gamma`` (default 5); ``edm``: ``sigma_data`` (0.5); ``p2``: ``k`` (1) and ``gamma`` (1; the
    paper uses 0.5 or 1). Unknown names or parameters and non-positive values raise ValueError.
    """
    if isinstance(name, Weighting):
        if params:
            raise ValueError(f"parameters {sorted(params)} given with an already built weighting {name.name!r}")
        return name
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; choose one of {sorted(WEIGHTINGS)}")
    space, defaults = WEIGHTINGS[name]
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"weighting {name!r} takes {sorted(defaults) or 'no parameters'}, got {sorted(unknown)}")
    merged = {k: _positive(f"{name}.{k}", params.get(k, v)) for k, v in defaults.items()}
    return Weighting(name, space, merged)


def loss_weight(weighting: str | Weighting, path: GaussianPath, t, prediction: str) -> Tensor:
    """The weight that ``weighting`` puts on the squared error of the ``prediction`` coordinate.

    At fixed ``(x_t, t)`` the weighting's coordinate is ``A x_t + B * prediction`` (see
    :mod:`core.predictions`), so its squared error is ``B^2`` times the prediction's. ``B`` is read off
    :func:`core.predictions.convert` applied to a unit prediction at ``x_t = 0``. Float64, shape of ``t``.
    """
    w = get_weighting(weighting)
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; choose one of {PREDICTIONS}")
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    one = torch.ones_like(t)
    b = convert(one, prediction, w.space, torch.zeros_like(t), t, path)
    return w(path, t) * b * b


# ------------------------------------------------------------------------------------------ time samplers


def _check_batch(batch) -> int:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    return batch


def stratified_uniform(n: int, generator: torch.Generator | None = None, device=None,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` uniforms in [0, 1), the i-th drawn uniformly in ``[i/n, (i+1)/n)`` (``dtype``, shape (n,)).

    Each entry on its own is not U(0, 1) but the batch is: a batch mean of ``f(u)`` keeps the
    expectation of ``f(U)`` and its variance drops from ``Var f / n`` to at most that (``O(n^-3)`` for
    smooth ``f``). MDLM samples its training times so; the batch order carries no meaning since the
    data loader shuffles.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    u = torch.rand(n, generator=generator, dtype=dtype, device=device if generator is None else generator.device)
    # (n - 1 + u) / n can round up to 1.0 in float32; keep the result in [0, 1) as torch.rand does
    return ((torch.arange(n, device=u.device, dtype=u.dtype) + u) / n).clamp_(max=1.0 - torch.finfo(u.dtype).eps / 2)


def uniform_time(
    path: GaussianPath,
    batch: int,
    generator: torch.Generator | None = None,
    device=None,
    dtype: torch.dtype = torch.float64,
    *,
    stratified: bool = False,
    antithetic: bool = False,
) -> Tensor:
    """``t ~ U[t_min, t_max]`` of shape ``(batch,)``.

    ``stratified``: one draw in each of ``batch`` equal strata, ``t_i = (i + u_i) / batch`` (lower variance
    of the batch mean, Kingma et al. 2021, sec. 4). ``antithetic``: draws come in pairs ``u, 1 - u``.
    Either way every entry is marginally uniform over the batch.
    """
    batch = _check_batch(batch)
    if stratified and antithetic:
        raise ValueError("choose stratified or antithetic time sampling, not both")
    if stratified:
        u = stratified_uniform(batch, generator, device, torch.float64)
    elif antithetic:
        h = torch.rand((batch + 1) // 2, generator=generator, dtype=torch.float64, device=device)
        u = torch.cat([h, 1.0 - h])[:batch]
    else:
        u = torch.rand(batch, generator=generator, dtype=torch.float64, device=device)
    return (path.t_min + (path.t_max - path.t_min) * u).to(dtype)


def lognormal_time(
    path: GaussianPath,
    batch: int,
    generator: torch.Generator | None = None,
    device=None,
    dtype: torch.dtype = torch.float64,
    *,
    p_mean: float = -1.2,
    p_std: float = 1.2,
) -> Tensor:
    """EDM's training noise levels (Karras et al. 2022, Table 1): ``ln sigma_hat ~ N(p_mean, p_std^2)``.

    ``sigma_hat = sigma / alpha`` is mapped to time by :meth:`GaussianPath.t_from_sigma` and clipped to
    ``[t_min, t_max]`` (on EDM's path this clips ``sigma`` to ``[0.002, 80]``, a mass of about 1e-5).
    """
    batch = _check_batch(batch)
    if not (isinstance(p_mean, (int, float)) and math.isfinite(p_mean)):
        raise ValueError(f"p_mean must be a finite number, got {p_mean!r}")
    p_std = _positive("p_std", p_std)
    z = torch.randn(batch, generator=generator, dtype=torch.float64, device=device)
    t = path.t_from_sigma(torch.exp(p_mean + p_std * z))
    return t.clamp(path.t_min, path.t_max).to(dtype)


def logit_normal_time(
    path: GaussianPath,
    batch: int,
    generator: torch.Generator | None = None,
    device=None,
    dtype: torch.dtype = torch.float64,
    *,
    m: float = 0.0,
    s: float = 1.0,
) -> Tensor:
    """Logit-normal times (Esser et al. 2024, sec. 3.1): ``t = sigmoid(N(m, s^2))``.

    Mapped affinely onto ``[t_min, t_max]`` (the identity on the linear path, whose range is [0, 1]).
    """
    batch = _check_batch(batch)
    if not (isinstance(m, (int, float)) and math.isfinite(m)):
        raise ValueError(f"m must be a finite number, got {m!r}")
    s = _positive("s", s)
    u = torch.sigmoid(m + s * torch.randn(batch, generator=generator, dtype=torch.float64, device=device))
    return (path.t_min + (path.t_max - path.t_min) * u).to(dtype)


TIME_SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "uniform": uniform_time,
    "lognormal": lognormal_time,
    "logit_normal": logit_normal_time,
}
_TIME_PARAMS = {"uniform": {"stratified", "antithetic"}, "lognormal": {"p_mean", "p_std"}, "logit_normal": {"m", "s"}}


def get_time_sampler(name: str, **params) -> Callable[..., Tensor]:
    """``fn(path, batch, generator=None, device=None, dtype=float64) -> t`` for a named sampler.

    Parameters are checked here, once, by a dry run on a unit-range path.
    """
    if name not in TIME_SAMPLERS:
        raise ValueError(f"unknown time sampler {name!r}; choose one of {sorted(TIME_SAMPLERS)}")
    unknown = set(params) - _TIME_PARAMS[name]
    if unknown:
        raise ValueError(f"time sampler {name!r} takes {sorted(_TIME_PARAMS[name])}, got {sorted(unknown)}")
    fn = TIME_SAMPLERS[name]
    # A dry run validates the parameters now rather than at the first training step; its private
    # generator leaves the global random state alone.
    fn(LinearPath(), 1, torch.Generator().manual_seed(0), **params)

    def sampler(path, batch, generator=None, device=None, dtype=torch.float64):
        return fn(path, batch, generator, device, dtype, **params)

    sampler.name = name  # type: ignore[attr-defined]
    return sampler


# ------------------------------------------------------------------------------------------ the loss


def denoising_loss(
    model: Callable[..., Tensor],
    x0: Tensor,
    path: GaussianPath,
    *,
    prediction: str = "eps",
    weighting: str | Weighting | None = None,
    time_sampler: str | Callable[..., Tensor] = "uniform",
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    model_kwargs: dict | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Weighted denoising score-matching / flow-matching loss on a Gaussian path.

    ``E w(t) || convert(model(x_t, t), prediction -> space) - target_space ||^2`` with
    ``x_t = alpha(t) x0 + sigma(t) eps`` and the target ``space`` coordinate of ``(x0, eps)``:
    eps (Ho et al. 2020), x0, v, the conditional score ``-eps / sigma`` (Vincent 2011; Song et al. 2021,
    eq. 7) or the conditional velocity ``alpha' x0 + sigma' eps`` (flow matching, Lipman et al. 2023;
    SiT). The squared error is averaged over non-batch dimensions.

    Args:
        model: ``model(x_t, t, **model_kwargs)`` with ``x_t`` like ``x0`` and ``t`` a ``(B,)`` tensor in
            x0's dtype (data at 0), returning the ``prediction`` coordinate.
        x0: clean data ``(B, ...)``.
        path: the Gaussian path.
        prediction: what the model outputs, one of ``eps, x0, v, score, velocity``.
        weighting: a name or :class:`Weighting` (module table); ``None`` takes the prediction's own
            standard loss (:data:`DEFAULT_WEIGHTING`).
        time_sampler: a name of :data:`TIME_SAMPLERS` (default parameters) or a callable from
            :func:`get_time_sampler`. Ignored when ``t`` is given.
        t, noise: fixed ``(B,)`` times and ``eps`` like ``x0``, overriding the draws (fixtures, common
            random numbers). Otherwise ``t`` is drawn first, then ``eps``, both from ``generator``.
        reduction: ``"mean"`` (scalar, mean over the batch) or ``"none"`` (``(B,)`` per-sample losses).

    Where a conversion is singular (an eps network scored in x0 at ``alpha = 0``, an x0 network scored
    in eps at ``sigma = 0``) the loss is infinite or NaN: draw times inside the range where the pair is
    defined (the uniform sampler never returns ``t_max`` itself).
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; choose one of {PREDICTIONS}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; choose 'mean' or 'none'")
    w = get_weighting(DEFAULT_WEIGHTING[prediction] if weighting is None else weighting)
    batch = x0.shape[0]
    if t is None:
        sampler = get_time_sampler(time_sampler) if isinstance(time_sampler, str) else time_sampler
        t64 = sampler(path, batch, generator, x0.device, torch.float64)
    else:
        t64 = check_time(torch.as_tensor(t, dtype=torch.float64, device=x0.device), "t")
        if t64.ndim == 0:
            t64 = t64.expand(batch)
    if t64.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},), got {tuple(t64.shape)}")
    t64 = t64.to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")

    # Coefficients in float64, cast to the data's dtype by expand.
    x_t = path.marginal(x0, t64, noise)
    t_in = t64.to(x0.dtype)
    out = model(x_t, t_in, **(model_kwargs or {}))
    pred = convert(out, prediction, w.space, x_t, t64, path)
    target = from_x0_eps(x0, noise, w.space, x_t, t64, path)
    err = (pred - target).pow(2).flatten(1).mean(1)
    per_sample = w(path, t64).to(err.dtype) * err
    return per_sample if reduction == "none" else per_sample.mean()


def flow_matching_loss(model: Callable[..., Tensor], x0: Tensor, path: GaussianPath, **kwargs) -> Tensor:
    """Conditional flow matching (Lipman et al. 2023; SiT, seed 2): :func:`denoising_loss` with a
    velocity network and, unless another is named, the unit-weight velocity MSE."""
    kwargs.setdefault("prediction", "velocity")
    return denoising_loss(model, x0, path, **kwargs)
