"""Samplers of discrete diffusion models: tau-leaping (Euler), Tweedie (analytic), RADD's cached sampler.

Every sampler is a short function with one signature, integrating the reverse CTMC from
``t = 1`` down to ``eps`` and (by default) finishing with a denoising step:

    fn(model_fn, graph, noise, x, steps, *, eps=1e-5, denoise=True, fixed_mask=None,
       generator=None, **options) -> (sample, nfe)

- ``model_fn``: for :func:`sample_euler` / :func:`sample_analytic` a ``score_fn(x, sigma)``
  with ``x`` (B, L) int64 and ``sigma`` (B,) (float32) returning the concrete score
  (B, L, graph.dim) -- positive ratios, i.e. ``exp`` of a SEDD network's log-score (as the
  official ``get_score_fn(..., sampling=True)``); for :func:`sample_absorbing` a
  time-independent ``probs_fn(x) -> (B, L, V)`` of clean-token probabilities (RADD).
  :func:`core.discrete.losses.absorbing_score` turns the latter into the former.
- ``x``: (B, L) the start at ``t = 1``: ``graph.sample_limit(B, L)``, with any fixed tokens
  written in (:func:`prefix_condition`, :func:`infill_condition`).
- ``steps``: an int (a uniform grid ``linspace(1, eps, steps + 1)`` as SEDD's ``pc_sampler``),
  or a descending float tensor of times in (0, 1] (its last entry plays the role of ``eps``).
- ``fixed_mask``: (B, L) or (L,) bool, True where the token of ``x`` is given and must stay.
  Conditioning needs no retraining (SEDD and RADD both infill this way): the network sees the given
  tokens, and they are written back after every update.
- ``generator``: every random draw (the Gumbel uniforms of :func:`sample_categorical`, the
  uniform prior) uses it; ``None`` uses the global RNG, in the official call order.
- returns the sample and ``nfe``, an int64 (B,) tensor: the network evaluations that each
  sequence received (its mean is RADD's expected NFE).

The single updates (:func:`euler_probs`, :func:`analytic_probs`, :func:`denoise_probs`) return the
unnormalised categorical weights that :func:`sample_categorical` draws from, so a test can feed
recorded uniforms through ``sample_categorical(probs, uniforms=u)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .graphs import Absorbing, Graph, _per_token
from .noise import Noise

__all__ = [
    "sample_categorical",
    "time_grid",
    "euler_probs",
    "analytic_probs",
    "denoise_probs",
    "sample_euler",
    "sample_analytic",
    "sample_absorbing",
    "prefix_condition",
    "infill_condition",
    "SAMPLERS",
]


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None, *, uniforms: Tensor | None = None):
    """Draw ``argmax(probs / E)`` with ``E = -log U`` (Gumbel-max in exponential form), as SEDD's catsample.

    For non-negative weights ``P(argmax = k) = probs_k / sum(probs)`` (the smallest of independent
    ``Exp(probs_k)`` times wins). ``probs`` (..., K) need not be normalised; negative entries
    (an Euler step that overshoots) are never drawn while a positive one exists. ``uniforms``
    (..., K) replaces the draw ``torch.rand(probs.shape)``. Returns int64 (...).
    """
    if uniforms is None:
        uniforms = torch.rand(probs.shape, generator=generator, dtype=probs.dtype, device=probs.device)
    elif uniforms.shape != probs.shape:
        raise ValueError(f"uniforms shape {tuple(uniforms.shape)} differs from probs shape {tuple(probs.shape)}")
    # The 1e-10 offsets match the official code bit for bit (and keep log(0) away).
    gumbel_norm = 1e-10 - torch.log(uniforms + 1e-10)
    return (probs / gumbel_norm).argmax(dim=-1)


def time_grid(steps, eps: float = 1e-5) -> Tensor:
    """Descending float64 times from 1: ``linspace(1, eps, steps + 1)`` or a validated tensor grid."""
    if isinstance(steps, int) and not isinstance(steps, bool):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")
        return torch.linspace(1.0, eps, steps + 1, dtype=torch.float64)
    grid = torch.as_tensor(steps)
    if not torch.is_floating_point(grid) or grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"a time grid must be a 1D float tensor with >= 2 entries, got {steps!r}")
    grid = grid.to(torch.float64)
    if not bool(torch.isfinite(grid).all()) or bool((grid <= 0).any()) or bool((grid > 1).any()):
        raise ValueError(f"grid times must lie in (0, 1] (t = 0 is the data), got {grid.tolist()}")
    if bool((grid[1:] >= grid[:-1]).any()):
        raise ValueError(f"grid must be strictly decreasing, got {grid.tolist()}")
    return grid


# -- single updates --------------------------------------------------------------------------
def euler_probs(graph: Graph, x: Tensor, score: Tensor, rate_scale) -> Tensor:
    """Tau-leaping / Euler weights ``e_x + dt * dsigma/dt * R(x -> .)`` for each token (SEDD's Euler step).

    ``rate_scale`` (float or (B,)) is ``dt * dsigma/dt`` at the current time; ``score`` (B, L, dim).
    Each token moves independently with the first-order probability of its reverse rate.
    """
    scale = _per_token(rate_scale, x, "rate_scale").to(score.dtype)[..., None]
    rev = scale * graph.reverse_rate(x, score)
    return rev.scatter_add(-1, x[..., None], torch.ones_like(rev[..., :1]))  # + one_hot(x)


def analytic_probs(graph: Graph, x: Tensor, score: Tensor, dsigma) -> Tensor:
    """Tweedie tau-leaping weights ``(exp(-dsigma Q) s)[y] * exp(dsigma Q)[x, y]`` (SEDD's Tweedie tau-leaping).

    The exact one-token posterior ``p(x_{t-dt} = y | x_t = x)`` when ``score`` is exact, with
    ``dsigma = sigma(t) - sigma(t - dt)`` (float or (B,)). score (B, L, dim) -> (B, L, dim).
    """
    return graph.staggered_score(score, dsigma) * graph.transp_transition(x, dsigma, dtype=score.dtype)


def denoise_probs(graph: Graph, x: Tensor, score: Tensor, sigma) -> Tensor:
    """Final denoising step: the Tweedie update from ``sigma`` all the way to 0 (SEDD's ``Denoiser``).

    For absorbing graphs the mask column is dropped so that every token is unmasked:
    returns (B, L, V) then, (B, L, dim) otherwise.
    """
    probs = analytic_probs(graph, x, score, sigma)
    return probs[..., :-1] if graph.absorb else probs


# -- helpers shared by the samplers ------------------------------------------------------------
def _prepare(graph: Graph, x: Tensor, fixed_mask):
    x = graph.check_ids(x, "x")
    if x.ndim < 1:
        raise ValueError(f"x must be batched as (B, ...), got shape {tuple(x.shape)}")
    if fixed_mask is None:
        return x, None
    fixed_mask = torch.as_tensor(fixed_mask, device=x.device)
    if fixed_mask.dtype != torch.bool:
        raise ValueError(f"fixed_mask must be a bool tensor, got dtype {fixed_mask.dtype}")
    try:
        fixed_mask = fixed_mask.expand_as(x)
    except RuntimeError:
        raise ValueError(
            f"fixed_mask shape {tuple(fixed_mask.shape)} does not broadcast to x {tuple(x.shape)}"
        ) from None
    if graph.absorb and bool((x[fixed_mask] == graph.mask_id).any()):
        raise ValueError(f"a fixed token is the mask id {graph.mask_id}: write the given tokens into x first")
    return x, fixed_mask


def _keep_fixed(new: Tensor, x_init: Tensor, fixed_mask) -> Tensor:
    return new if fixed_mask is None else torch.where(fixed_mask, x_init, new)


def _batch_sigma(value: Tensor, x: Tensor) -> Tensor:
    # The network gets one sigma per sequence in the default float dtype, as SEDD's score_fn.
    return value.to(torch.get_default_dtype()).expand(x.shape[0]).to(x.device)


def _nfe(x: Tensor, count: int) -> Tensor:
    return torch.full((x.shape[0],), count, dtype=torch.int64, device=x.device)


def _score(score_fn, x, sigma, graph):
    score = score_fn(x, sigma)
    if score.shape != (*x.shape, graph.dim):
        raise ValueError(f"score_fn must return shape {(*x.shape, graph.dim)}, got {tuple(score.shape)}")
    return score


def _tau_leaping(score_fn, graph, noise, x_init, grid, sigma, step_probs, denoise, fixed_mask, generator):
    """The loop of SEDD's predictors (the official ``pc_sampler`` without corrector).

    Step ``i`` (``grid[i] -> grid[i + 1]``) evaluates the score at ``sigma[i]`` and draws every token
    from ``step_probs(i, x, score)`` (:func:`euler_probs` or :func:`analytic_probs` weights), writing
    the fixed tokens back; ``denoise`` ends with the Tweedie step from ``grid[-1]`` to 0
    (:func:`denoise_probs`). One network call per step (+1 to denoise).
    """
    x = x_init
    for i in range(len(grid) - 1):
        score = _score(score_fn, x, _batch_sigma(sigma[i], x), graph)
        x = _keep_fixed(sample_categorical(step_probs(i, x, score), generator), x_init, fixed_mask)
    if denoise:
        sigma_last = noise.sigma(grid[-1])
        score = _score(score_fn, x, _batch_sigma(sigma_last, x), graph)
        probs = denoise_probs(graph, x, score, sigma_last)
        x = _keep_fixed(sample_categorical(probs, generator), x_init, fixed_mask)
    return x, _nfe(x, len(grid) - 1 + int(denoise))


# -- samplers ------------------------------------------------------------------------------------
@torch.no_grad()
def sample_euler(
    score_fn: Callable[[Tensor, Tensor], Tensor],
    graph: Graph,
    noise: Noise,
    x: Tensor,
    steps,
    *,
    eps: float = 1e-5,
    denoise: bool = True,
    fixed_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """SEDD's Euler predictor (tau-leaping): each token jumps with probability ``dt * dsigma * R``.

    Lou et al. 2024, the official ``EulerPredictor``. The
    rates are taken at the start of each interval. One network call per step (+1 to denoise).
    """
    grid = time_grid(steps, eps)
    x, fixed_mask = _prepare(graph, x, fixed_mask)
    sigma, dsigma = noise(grid)

    def step_probs(i, x, score):
        return euler_probs(graph, x, score, ((grid[i] - grid[i + 1]) * dsigma[i]).to(score.dtype))

    return _tau_leaping(score_fn, graph, noise, x, grid, sigma, step_probs, denoise, fixed_mask, generator)


@torch.no_grad()
def sample_analytic(
    score_fn: Callable[[Tensor, Tensor], Tensor],
    graph: Graph,
    noise: Noise,
    x: Tensor,
    steps,
    *,
    eps: float = 1e-5,
    denoise: bool = True,
    fixed_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """SEDD's analytic (Tweedie tau-leaping) predictor: sample each token from ``analytic_probs``.

    Lou et al. 2024, Tweedie tau-leaping, the official ``AnalyticPredictor``: exact per token given the
    exact score, so its only error is the factorisation over tokens within a step.
    """
    grid = time_grid(steps, eps)
    x, fixed_mask = _prepare(graph, x, fixed_mask)
    sigma = noise.sigma(grid)

    def step_probs(i, x, score):
        # dsigma in float64: no cancellation between nearby sigmas
        return analytic_probs(graph, x, score, sigma[i] - sigma[i + 1])

    return _tau_leaping(score_fn, graph, noise, x, grid, sigma, step_probs, denoise, fixed_mask, generator)


@torch.no_grad()
def sample_absorbing(
    probs_fn: Callable[[Tensor], Tensor],
    graph: Absorbing,
    noise: Noise,
    x: Tensor,
    steps,
    *,
    eps: float = 1e-5,
    denoise: bool = True,
    fixed_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    method: str = "analytic",
    cache: bool = True,
) -> tuple[Tensor, Tensor]:
    """RADD's sampler for a time-independent absorbing model, caching the network between changes.

    Ou et al. 2024: ``probs_fn(x) -> (B, L, V)`` gives ``p(x0^l | unmasked tokens)``,
    which does not depend on ``t``, so while a sequence does not change its last output is
    reused (``cache=True``) and its NFE only grows at steps where some token was unmasked.

    In each interval ``t -> t'`` a masked token is unmasked with probability ``rate`` and then
    takes a token drawn from ``probs``:

    - ``method="analytic"``: ``rate = (lambda(t) - lambda(t')) / lambda(t)`` with
      ``lambda = 1 - e^-sigma``; identical in law to SEDD's analytic step with the RADD score;
    - ``method="euler"``: ``rate = dt * dsigma/dt / (e^sigma - 1)`` (SEDD's Euler step).

    ``denoise`` unmasks every remaining token at the end (SEDD's ``Denoiser`` for this score).
    Draws per step: ``rand(B, L)`` for the unmasking decisions, then one categorical per
    unmasked token. Cached and uncached runs make the same draws, so with the same generator
    they return the same sample whenever ``probs_fn`` gives each sequence the same output
    whether evaluated alone or in a batch (true of row-independent networks; a batched matmul
    may differ in the last bits, which could flip a near-tie).
    """
    if not isinstance(graph, Absorbing):
        raise ValueError(f"sample_absorbing needs an Absorbing graph, got {graph!r}")
    if method not in ("analytic", "euler"):
        raise ValueError(f"method must be 'analytic' or 'euler', got {method!r}")
    grid = time_grid(steps, eps)
    x, fixed_mask = _prepare(graph, x, fixed_mask)
    sigma, dsigma = noise(grid)
    if method == "analytic":
        lam = -torch.expm1(-sigma)
        rates = (lam[:-1] - lam[1:]) / lam[:-1]
    else:
        rates = (grid[:-1] - grid[1:]) * dsigma[:-1] / torch.expm1(sigma[:-1])
    rates = rates.tolist()
    if denoise:
        rates.append(None)  # unmask everything left

    B = x.shape[0]
    nfe = torch.zeros(B, dtype=torch.int64, device=x.device)
    stale = torch.ones(B, dtype=torch.bool, device=x.device)  # rows whose cached output is out of date
    probs = None
    x = x.clone()
    for rate in rates:
        masked = x == graph.mask_id
        todo = stale & masked.flatten(1).any(1) if cache else torch.ones_like(stale)
        if bool(todo.any()):
            rows = todo.nonzero().squeeze(1)
            out = probs_fn(x if len(rows) == B else x[rows])
            if out.shape != (len(rows), *x.shape[1:], graph.vocab_size):
                raise ValueError(
                    f"probs_fn must return shape {(len(rows), *x.shape[1:], graph.vocab_size)}, got {tuple(out.shape)}"
                )
            if probs is None:
                probs = out.new_zeros(*x.shape, graph.vocab_size)
            probs[rows] = out
            nfe[rows] += 1
        if rate is None:
            unmask = masked
        else:
            unmask = masked & (torch.rand(x.shape, generator=generator, device=x.device) < rate)
        if probs is not None:
            x[unmask] = sample_categorical(probs[unmask], generator)
        stale = unmask.flatten(1).any(1)
    return x, nfe


SAMPLERS = {"euler": sample_euler, "analytic": sample_analytic, "absorbing": sample_absorbing}


# -- conditioning ----------------------------------------------------------------------------------
def infill_condition(x: Tensor, positions, tokens) -> tuple[Tensor, Tensor]:
    """Write given ``tokens`` at ``positions`` of the start ``x`` (B, L); returns ``(x, fixed_mask)``.

    positions (K,) int in [0, L) (any order, need not be contiguous); tokens (K,) or (B, K).
    Pass both to a sampler (``fixed_mask=``) to generate the rest with those tokens held fixed.
    """
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"x must be (B, L), got shape {tuple(x.shape)}")
    positions = torch.as_tensor(positions, device=x.device).long().reshape(-1)
    L = x.shape[1]
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= L):
        bad = [p for p in positions.tolist() if not 0 <= p < L][0]
        raise ValueError(f"infill positions must lie in [0, {L}), got {bad}")
    if positions.unique().numel() != positions.numel():
        raise ValueError(f"infill positions must be distinct, got {positions.tolist()}")
    tokens = torch.as_tensor(tokens, device=x.device).long()
    if tokens.shape[-1:] != positions.shape:
        raise ValueError(f"tokens shape {tuple(tokens.shape)} does not match {positions.numel()} positions")
    if tokens.numel() and int(tokens.min()) < 0:
        raise ValueError(f"tokens must be >= 0, got {int(tokens.min())}")
    x = x.clone()
    x[:, positions] = tokens.expand(x.shape[0], -1)
    fixed_mask = torch.zeros_like(x, dtype=torch.bool)
    fixed_mask[:, positions] = True
    return x, fixed_mask


def prefix_condition(x: Tensor, prefix) -> tuple[Tensor, Tensor]:
    """Prompt with a prefix: ``prefix`` (P,) or (B, P) written at positions ``0..P-1``; see :func:`infill_condition`."""
    prefix = torch.as_tensor(prefix)
    return infill_condition(x, torch.arange(prefix.shape[-1]), prefix)
