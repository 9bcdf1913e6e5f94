"""Training losses of discrete diffusion: SEDD's score entropy and the absorbing cross-entropy bounds.

Two parameterisations of the same absorbing model:

- SEDD (Lou et al. 2024): a network ``log_score_fn(x, sigma) -> (B, L, dim)`` gives the log
  concrete score ``log p_t(y) / p_t(x)`` for every one-token change; trained with the
  denoising score entropy (DSE) weighted by ``dsigma/dt`` (SEDD's likelihood bound).
- RADD (Ou et al. 2024, "Your Absorbing Discrete Diffusion Secretly Models the Conditional
  Distributions of Clean Data") shows that at a masked position the concrete score is
  ``p_0(x^l = y | unmasked tokens) / (e^sigma - 1)``: a time-independent conditional of clean
  data times an analytic scalar. A network ``log_probs_fn(x) -> (B, L, V)`` (log-probabilities
  of the V clean tokens, no time input) is trained with the denoising cross-entropy (DCE):

  * ``t``-DCE: ``sum_{masked l} -log p(x0^l | x_t) * dsigma / (e^sigma - 1)``. For the
    log-linear schedule the weight is exactly ``1 / t``, which is MDLM's continuous-time
    continuous-time objective (Sahoo et al. 2024, with ``alpha_t = 1 - t``).
  * ``lambda``-DCE (RADD): ``lambda ~ U(0, 1]`` is the masking probability itself and
    the loss is ``sum_{masked l} -log p(x0^l | x_lambda) / lambda``; its expectation is the
    any-order autoregressive NLL and upper-bounds ``-log p_theta(x0)``.

With normalised probabilities the score entropy of the converted score equals the t-DCE term
by term (the positive and constant terms of the DSE cancel), see :func:`absorbing_log_score`.

Every loss returns a per-sequence ``(B,)`` tensor (sum over tokens); average it for training.

:func:`stratified_uniform` gives a batch one uniform per stratum ``[i/B, (i+1)/B)`` (MDLM's
low-discrepancy "antithetic" time sampler); pass ``t``/``lam`` built from it to any loss here to cut the
variance of the batch mean without changing its expectation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..losses import stratified_uniform
from .graphs import Absorbing, Graph, _per_token
from .noise import Noise

__all__ = [
    "stratified_uniform",
    "score_entropy_loss",
    "absorbing_log_score",
    "absorbing_score",
    "dce_weight",
    "absorbing_dce_loss",
    "lambda_dce_loss",
]


def _check_eps(sampling_eps: float):
    if isinstance(sampling_eps, bool) or not isinstance(sampling_eps, (int, float)) or not 0.0 <= sampling_eps < 1.0:
        raise ValueError(f"sampling_eps must be a number in [0, 1), got {sampling_eps!r}")


def _sample_t(x0: Tensor, sampling_eps: float, generator) -> Tensor:
    # As SEDD's losses.get_loss_fn: t ~ U(eps, 1), one per sequence, drawn before the noise.
    _check_eps(sampling_eps)
    u = torch.rand(x0.shape[0], generator=generator, device=x0.device)
    return (1.0 - sampling_eps) * u + sampling_eps


def _check_x0(graph: Graph, x0) -> Tensor:
    x0 = graph.check_clean(x0)
    if x0.ndim < 1:
        raise ValueError(f"x0 must be batched as (B, ...), got shape {tuple(x0.shape)}")
    return x0


def _forward(graph: Graph, noise: Noise, x0, t, xt, sampling_eps: float, generator):
    """The noised input of a training loss: ``(x0, t, sigma(t), dsigma/dt(t), xt)``, each checked.

    ``t`` (B,) defaults to ``U(sampling_eps, 1)``, ``xt`` to a draw of the forward process at ``sigma(t)``;
    draw order (t, then the noise) as the official ``losses.get_loss_fn``.
    """
    x0 = _check_x0(graph, x0)
    if t is None:
        t = _sample_t(x0, sampling_eps, generator)
    sigma, dsigma = noise(t)
    if sigma.shape != (x0.shape[0],):
        raise ValueError(f"t must have shape (B,) = ({x0.shape[0]},), got {tuple(sigma.shape)}")
    xt = graph.sample_transition(x0, sigma, generator) if xt is None else graph.check_ids(xt, "xt")
    if xt.shape != x0.shape:
        raise ValueError(f"xt shape {tuple(xt.shape)} differs from x0 shape {tuple(x0.shape)}")
    return x0, t, sigma, dsigma, xt


def score_entropy_loss(
    log_score_fn: Callable[[Tensor, Tensor], Tensor],
    graph: Graph,
    noise: Noise,
    x0: Tensor,
    *,
    t: Tensor | None = None,
    xt: Tensor | None = None,
    sampling_eps: float = 1e-3,
    generator: torch.Generator | None = None,
) -> Tensor:
    """SEDD's training loss: ``dsigma/dt * sum_tokens score_entropy`` (Lou et al. 2024).

    log_score_fn(xt (B, L), sigma (B,)) -> log concrete scores (B, L, graph.dim).
    x0 (B, L) clean ids. ``t`` (B,) defaults to ``U(sampling_eps, 1)``; ``xt`` defaults to a draw
    of the forward process at ``sigma(t)``. Draw order (t, then the noise) follows the official
    ``losses.get_loss_fn``, so a seeded global RNG reproduces it. Returns (B,).
    """
    x0, t, sigma, dsigma, xt = _forward(graph, noise, x0, t, xt, sampling_eps, generator)
    log_score = log_score_fn(xt, sigma)
    se = graph.score_entropy(log_score, sigma, xt, x0)
    return (_per_token(dsigma, se).to(se.dtype) * se).flatten(1).sum(1)


def absorbing_log_score(log_probs: Tensor, x: Tensor, sigma, graph: Absorbing | None = None) -> Tensor:
    """RADD's factorisation: SEDD's log concrete score from clean-token log-probabilities.

    ``log s[y] = log p(x0^l = y | x) - log(e^sigma - 1)`` for the V data tokens, 0 (score 1) in
    the mask column and in the current token's column (as SEDD's network scatters 0 at ``x``).
    Unmasked positions get the same finite values; no absorbing rate uses them.
    log_probs (B, L, V), x (B, L) ids in [0, V], sigma float or (B,). Returns (B, L, V + 1).
    """
    V = log_probs.shape[-1]
    graph = graph or Absorbing(V)
    if graph.vocab_size != V:
        raise ValueError(f"log_probs has {V} classes but the graph has vocab_size={graph.vocab_size}")
    x = graph.check_ids(x, "x")
    sigma = _per_token(sigma, x)
    log_esigm1 = torch.log(torch.expm1(sigma.double())).to(log_probs.dtype)[..., None]
    out = torch.cat([log_probs - log_esigm1, torch.zeros_like(log_probs[..., :1])], dim=-1)
    return out.scatter(-1, x[..., None], 0.0)


def absorbing_score(probs: Tensor, x: Tensor, sigma, graph: Absorbing | None = None) -> Tensor:
    """RADD's factorisation for samplers: concrete score ``p(y | x) / (e^sigma - 1)``, 1 at the mask and at ``x``.

    probs (B, L, V) clean-token probabilities, x (B, L), sigma float or (B,). Returns (B, L, V + 1).
    """
    V = probs.shape[-1]
    graph = graph or Absorbing(V)
    if graph.vocab_size != V:
        raise ValueError(f"probs has {V} classes but the graph has vocab_size={graph.vocab_size}")
    x = graph.check_ids(x, "x")
    sigma = _per_token(sigma, x)
    esigm1 = torch.expm1(sigma.double()).to(probs.dtype)[..., None]
    out = torch.cat([probs / esigm1, torch.ones_like(probs[..., :1])], dim=-1)
    return out.scatter(-1, x[..., None], 1.0)


def dce_weight(noise: Noise, t) -> Tensor:
    """Weight ``dsigma/dt / (e^sigma - 1)`` of the t-DCE loss; ``1 / t`` for :class:`LogLinear`.

    (For the log-linear schedule ``e^sigma - 1 = (1 - eps) t / (1 - (1 - eps) t)`` and the rate
    is ``(1 - eps) / (1 - (1 - eps) t)``; their quotient is ``1 / t`` for every ``eps``.)
    """
    t = torch.as_tensor(t)
    sigma, dsigma = noise(t.double())
    return (dsigma / torch.expm1(sigma)).to(t.dtype if torch.is_floating_point(t) else torch.get_default_dtype())


def _masked_nll(log_probs_fn, graph: Absorbing, x0: Tensor, xt: Tensor) -> Tensor:
    """Per-token ``-log p(x0 | xt)`` at masked positions, 0 elsewhere; (B, L)."""
    log_probs = log_probs_fn(xt)
    if log_probs.shape != (*xt.shape, graph.vocab_size):
        raise ValueError(
            f"log_probs_fn must return shape {(*xt.shape, graph.vocab_size)}, got {tuple(log_probs.shape)}"
        )
    nll = -log_probs.gather(-1, x0[..., None]).squeeze(-1)
    return torch.where(xt == graph.mask_id, nll, torch.zeros((), dtype=nll.dtype, device=nll.device))


def _check_absorbing(graph):
    if not isinstance(graph, Absorbing):
        raise ValueError(f"the cross-entropy bounds need an Absorbing graph, got {graph!r}")


def absorbing_dce_loss(
    log_probs_fn: Callable[[Tensor], Tensor],
    graph: Absorbing,
    noise: Noise,
    x0: Tensor,
    *,
    t: Tensor | None = None,
    xt: Tensor | None = None,
    sampling_eps: float = 1e-3,
    generator: torch.Generator | None = None,
) -> Tensor:
    """RADD's t-DCE / MDLM's loss: ``dce_weight(t) * sum_{masked} -log p(x0^l | xt)``.

    log_probs_fn(xt (B, L)) -> (B, L, V) log-probabilities of the clean tokens (time-independent).
    Draws ``t`` and ``xt`` exactly as :func:`score_entropy_loss`, so with the same generator and
    normalised probabilities the two losses agree. Returns (B,).
    """
    _check_absorbing(graph)
    x0, t, _, _, xt = _forward(graph, noise, x0, t, xt, sampling_eps, generator)
    nll = _masked_nll(log_probs_fn, graph, x0, xt)
    weight = _per_token(dce_weight(noise, t), nll).to(nll.dtype)
    return (weight * nll).flatten(1).sum(1)


def lambda_dce_loss(
    log_probs_fn: Callable[[Tensor], Tensor],
    graph: Absorbing,
    x0: Tensor,
    *,
    lam: Tensor | None = None,
    xt: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """RADD's lambda-DCE: ``sum_{masked l} -log p(x0^l | x_lambda) / lambda``.

    Each token is masked independently with probability ``lambda`` (B,), drawn as ``1 - U[0, 1)``
    so it lies in (0, 1] and never divides by zero; then ``xt`` (mask uniforms drawn second).
    The expectation over ``lambda ~ U(0, 1]`` equals the any-order autoregressive NLL
    ``E_order[-log prod_l p(x0^{order_l} | x0^{order_<l})]`` (RADD's link to any-order autoregressive models), an upper bound on
    ``-log p_theta(x0)`` that is tight when the conditionals are those of one joint distribution.
    log_probs_fn(xt (B, L)) -> (B, L, V). Returns (B,) in float64 (RADD accumulates in float64 too).
    """
    _check_absorbing(graph)
    x0 = _check_x0(graph, x0)
    if lam is None:
        lam = 1.0 - torch.rand(x0.shape[0], generator=generator, device=x0.device)
    lam = torch.as_tensor(lam, device=x0.device)
    if lam.shape != (x0.shape[0],) or not bool(((lam > 0) & (lam <= 1)).all()):
        raise ValueError(f"lam must be a (B,) = ({x0.shape[0]},) tensor in (0, 1], got {lam}")
    if xt is None:
        u = torch.rand(x0.shape, generator=generator, device=x0.device)
        xt = torch.where(u < _per_token(lam, x0), graph.mask_id, x0)
    else:
        xt = graph.check_ids(xt, "xt")
    nll = _masked_nll(log_probs_fn, graph, x0, xt)
    return nll.flatten(1).sum(1).double() / lam.double()
