"""Transition graphs of a discrete diffusion: the rate matrix ``Q`` of a CTMC on a vocabulary.

Lou et al. 2024 (SEDD), the forward CTMC: each token evolves independently with
``d p_t / dt = dsigma/dt * Q p_t``, so ``p(x_t | x_0) = exp(sigma(t) Q)[:, x_0]``. Column ``i`` of
``Q`` holds the rates out of state ``i`` (``Q[j, i]`` = rate ``i -> j``, columns sum to 0).

- :class:`Absorbing` (``Q = 1_mask e^T - I`` on ``V + 1`` states): every token jumps to the
  extra mask state ``V`` at rate 1 and stays there. ``exp(sigma Q)`` keeps a token with
  probability ``exp(-sigma)`` and masks it otherwise.
- :class:`Uniform` (``Q = 1 1^T / V - I``): a token jumps to a uniformly drawn token at rate
  ``(V - 1) / V``; ``exp(sigma Q) = exp(-sigma) I + (1 - exp(-sigma)) 1 1^T / V``.

Tensors: token ids ``i`` of any shape ``(...)`` (typically ``(B, L)``), int64 in ``[0, dim)``;
vectors over the states come out as ``(..., dim)``. ``sigma`` is a float, a per-sequence
``(B,)`` tensor (viewed as ``(B, 1, ..., 1)``), or any shape that broadcasts against ``i``
(SEDD passes ``(B, 1)``). Scores are concrete scores ``s[..., y] ~ p_t(y) / p_t(x)`` for
changing one token from ``x = i`` to ``y``; ``score_entropy`` takes their log.

Per-sequence coefficients (``exp(-sigma)`` and friends) are computed in float64 with ``expm1``
and cast to the output dtype, which avoids the float32 cancellation of ``1 - exp(-sigma)``
at small ``sigma`` in the official code (see the fixture README).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Graph", "Absorbing", "Uniform", "get_graph"]


def _check_ids(i: Tensor, high: int, name: str = "token ids") -> Tensor:
    """``i`` as an int64 tensor after checking every id lies in ``[0, high)``."""
    i = torch.as_tensor(i)
    if i.dtype == torch.bool or torch.is_floating_point(i) or torch.is_complex(i):
        raise ValueError(f"{name} must be an integer tensor, got dtype {i.dtype}")
    i = i.long()
    if i.numel():
        lo, hi = (int(v) for v in torch.aminmax(i))
        if lo < 0 or hi >= high:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} must lie in [0, {high}), got {bad}")
    return i


def _per_token(sigma, ref: Tensor, name: str = "sigma") -> Tensor:
    """``sigma`` as float64, shaped to broadcast against the ids ``ref``; ``(B,)`` becomes ``(B, 1, ..)``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=ref.device)
    if not bool(torch.isfinite(sigma).all()) or bool((sigma < 0).any()):
        bad = sigma[~torch.isfinite(sigma) | (sigma < 0)].flatten()[0].item()
        raise ValueError(f"{name} must be finite and >= 0, got {bad}")
    if sigma.ndim == 1 and ref.ndim > 1 and sigma.shape[0] == ref.shape[0]:
        sigma = sigma.view(-1, *([1] * (ref.ndim - 1)))
    return sigma


def _out_dtype(sigma) -> torch.dtype:
    """Output dtype of a kernel: a floating ``sigma`` tensor's own, else the default dtype."""
    if isinstance(sigma, Tensor) and torch.is_floating_point(sigma):
        return sigma.dtype
    return torch.get_default_dtype()


def _hot(i: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """One-hot (..., dim) in ``dtype`` (a scatter: cheaper than F.one_hot, which re-checks the ids)."""
    return torch.zeros(*i.shape, dim, dtype=dtype, device=i.device).scatter_(-1, i[..., None], 1.0)


def _coef(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A float64 coefficient cast to ``dtype``, with a trailing axis for the states."""
    return x.to(dtype)[..., None]


class Graph:
    """Shared parts of a transition graph; subclasses define the rates and transitions."""

    absorb = False

    def __init__(self, vocab_size: int):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < self._min_vocab:
            raise ValueError(
                f"{type(self).__name__} vocab_size must be an int >= {self._min_vocab}, got {vocab_size!r}"
            )
        self.vocab_size = vocab_size

    _min_vocab = 1

    @property
    def dim(self) -> int:
        """Number of CTMC states (the network's output width)."""
        raise NotImplementedError

    def check_ids(self, i, name: str = "token ids") -> Tensor:
        """Token ids of states, in ``[0, dim)``; ValueError naming the first bad id otherwise."""
        return _check_ids(i, self.dim, name)

    def check_clean(self, x0, name: str = "x0") -> Tensor:
        """Clean data ids, in ``[0, vocab_size)`` (the absorbing mask is not a data token)."""
        return _check_ids(x0, self.vocab_size, name)

    def reverse_rate(self, i: Tensor, score: Tensor) -> Tensor:
        """Reverse rates ``R(i -> y) = Q[i, y] s[y]`` for ``y != i`` and ``-sum`` on the diagonal.

        SEDD's reverse process (time reversal of a CTMC): the reverse CTMC jumps from ``i`` to ``y`` at rate
        ``(p_t(y) / p_t(i)) Q[i, y]``. ``score`` (..., dim) is the concrete score at ``i``.
        Returns (..., dim): each row sums to 0 (multiply by ``dsigma/dt`` for rates in ``t``).
        """
        i = self.check_ids(i)
        rate = self._transp_rate(i, score.dtype) * score
        rate = rate.scatter(-1, i[..., None], 0.0)
        return rate.scatter(-1, i[..., None], -rate.sum(-1, keepdim=True))

    # -- subclasses ------------------------------------------------------------------------
    def rate(self, i, dtype=None) -> Tensor:
        """Column ``i`` of ``Q``: forward rates out of state ``i`` (``(..., dim)``)."""
        raise NotImplementedError

    def transp_rate(self, i, dtype=None) -> Tensor:
        """Row ``i`` of ``Q``: rates into state ``i`` from every state (``(..., dim)``)."""
        return self._transp_rate(self.check_ids(i), dtype or torch.get_default_dtype())

    def _transp_rate(self, i: Tensor, dtype: torch.dtype) -> Tensor:
        raise NotImplementedError

    def transition(self, i, sigma, dtype=None) -> Tensor:
        """Column ``i`` of ``exp(sigma Q)``: ``p(x_t = . | x_0 = i)`` (``(..., dim)``).

        The output dtype is ``dtype``, else ``sigma``'s if it is a float tensor, else the default.
        """
        raise NotImplementedError

    def transp_transition(self, i, sigma, dtype=None) -> Tensor:
        """Row ``i`` of ``exp(sigma Q)``: ``p(x_t = i | x_0 = .)`` (``(..., dim)``)."""
        raise NotImplementedError

    def sample_transition(self, i, sigma, generator=None) -> Tensor:
        """Draw ``x_t ~ exp(sigma Q)[:, i]`` for every token (same shape as ``i``)."""
        raise NotImplementedError

    def staggered_score(self, score: Tensor, dsigma) -> Tensor:
        """``exp(-dsigma Q) s``: the ratios ``p_{sigma - dsigma}(y) / p_sigma(x)`` (SEDD's Tweedie tau-leaping).

        Exact when ``score`` is the exact concrete score (the backward heat equation applied to
        the ratios), so ``staggered_score * transp_transition`` is the Tweedie posterior of one
        token. ``score`` (..., dim), ``dsigma`` a float, ``(B,)`` or broadcastable to score[..., 0].
        """
        raise NotImplementedError

    def sample_limit(self, *batch_dims, generator=None, device=None) -> Tensor:
        """Draw from the limit ``exp(inf Q)``: the prior at ``t = 1`` (int64, shape ``batch_dims``)."""
        raise NotImplementedError

    def score_entropy(self, log_score: Tensor, sigma, x: Tensor, x0: Tensor) -> Tensor:
        """Denoising score entropy per token, zero at the exact ratios (SEDD's DSE with its constant)."""
        raise NotImplementedError


class Absorbing(Graph):
    """Absorbing (mask) graph on ``vocab_size + 1`` states; the mask id is ``vocab_size``.

    SEDD's ``graph_lib.Absorbing``; the forward process of MDLM (Sahoo et al. 2024) and RADD
    (Ou et al. 2024). Tokens never leave the mask, so the reverse process only unmasks.
    """

    absorb = True

    @property
    def dim(self) -> int:
        return self.vocab_size + 1

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def rate(self, i, dtype=None):
        i = self.check_ids(i)
        dtype = dtype or torch.get_default_dtype()
        out = -_hot(i, self.dim, dtype)
        out[..., self.mask_id] += 1.0
        return out

    def _transp_rate(self, i, dtype):
        # Row mask of Q is 1 everywhere but its own column; row j != mask is -e_j.
        return (i == self.mask_id)[..., None].to(dtype) - _hot(i, self.dim, dtype)

    def transition(self, i, sigma, dtype=None):
        i = self.check_ids(i)
        dtype = dtype or _out_dtype(sigma)
        sigma = _per_token(sigma, i)
        keep = _coef(torch.exp(-sigma), dtype)
        hot = _hot(i, self.dim, dtype)
        is_mask = (i == self.mask_id)[..., None]
        out = torch.where(is_mask, hot, keep * hot)
        out[..., self.mask_id] += torch.where(is_mask[..., 0], 0.0, 1.0 - keep[..., 0])
        return out

    def transp_transition(self, i, sigma, dtype=None):
        i = self.check_ids(i)
        dtype = dtype or _out_dtype(sigma)
        sigma = _per_token(sigma, i)
        keep = torch.exp(-sigma)
        hot = _hot(i, self.dim, dtype)
        # p(x_t = mask | x_0 = j) = 1 - exp(-sigma) for j != mask and 1 for j = mask.
        moved = _coef(-torch.expm1(-sigma), dtype)
        into_mask = torch.where(hot.bool(), 1.0, moved).to(dtype)
        return torch.where((i == self.mask_id)[..., None], into_mask, _coef(keep, dtype) * hot)

    def sample_transition(self, i, sigma, generator=None):
        i = self.check_ids(i)
        sigma = _per_token(sigma, i)
        move_chance = -torch.expm1(-sigma)
        u = torch.rand(i.shape, generator=generator, device=i.device)
        return torch.where(u < move_chance, self.mask_id, i)

    def staggered_score(self, score, dsigma):
        dsigma = _per_token(dsigma, score[..., 0], "dsigma")
        grow = _coef(torch.exp(dsigma), score.dtype)
        # (1 - e^dsigma) * sum_z s_z flows into the mask column (row mask of exp(-dsigma Q)).
        extra = _coef(-torch.expm1(dsigma), score.dtype)[..., 0] * score.sum(-1)
        out = score * grow
        out[..., self.mask_id] += extra
        return out

    def sample_limit(self, *batch_dims, generator=None, device=None):
        return torch.full(batch_dims, self.mask_id, dtype=torch.int64, device=device)

    def score_entropy(self, log_score, sigma, x, x0):
        """SEDD's denoising score entropy (DSE) for the absorbing graph, per token.

        Only masked tokens contribute. There the exact ratio ``p(y | x0) / p(mask | x0)`` is
        ``1 / (e^sigma - 1)`` for ``y = x0`` and 0 for other tokens, so with ``r = 1 / (e^sigma - 1)``
        the loss is ``sum_{y != mask} e^{s_y} - r s_{x0} + r (log r - 1) >= 0``.
        ``log_score`` (..., dim), ``x`` (...) noisy ids, ``x0`` (...) clean ids. Returns (...).
        """
        x = self.check_ids(x, "x")
        x0 = self.check_clean(x0)
        sigma = _per_token(sigma, x)
        masked = x == self.mask_id
        esigm1 = torch.expm1(sigma)
        ratio = (1.0 / esigm1).to(log_score.dtype)
        const = ((1.0 / esigm1) * (-torch.log(esigm1) - 1.0)).to(log_score.dtype)
        # Zero the unmasked rows first so that a large score there cannot overflow into the
        # gradient of the discarded branch.
        s = torch.where(masked[..., None], log_score, torch.zeros((), dtype=log_score.dtype, device=x.device))
        pos = s[..., : self.mask_id].exp().sum(-1)
        neg = ratio * s.gather(-1, x0[..., None]).squeeze(-1)
        return torch.where(masked, pos - neg + const, torch.zeros((), dtype=log_score.dtype, device=x.device))

    def __repr__(self):
        return f"Absorbing(vocab_size={self.vocab_size})"


class Uniform(Graph):
    """Uniform graph on ``vocab_size`` states, ``Q = 1 1^T / V - I`` (SEDD's ``graph_lib.Uniform``)."""

    _min_vocab = 2

    @property
    def dim(self) -> int:
        return self.vocab_size

    def rate(self, i, dtype=None):
        return self._transp_rate(self.check_ids(i), dtype or torch.get_default_dtype())  # Q is symmetric

    def _transp_rate(self, i, dtype):
        return (1.0 / self.dim) - _hot(i, self.dim, dtype)

    def transition(self, i, sigma, dtype=None):
        i = self.check_ids(i)
        dtype = dtype or _out_dtype(sigma)
        sigma = _per_token(sigma, i)
        moved = -torch.expm1(-sigma)
        off = _coef(moved / self.dim, dtype)
        keep = _coef(torch.exp(-sigma), dtype)
        return off + keep * _hot(i, self.dim, dtype)

    def transp_transition(self, i, sigma, dtype=None):
        return self.transition(i, sigma, dtype)  # exp(sigma Q) is symmetric

    def sample_transition(self, i, sigma, generator=None):
        # Same draw order as the official code: move decisions first, then a uniform token for
        # every position (so a fixed seed gives the same noisy batch).
        i = self.check_ids(i)
        sigma = _per_token(sigma, i)
        move_chance = -torch.expm1(-sigma)
        u = torch.rand(i.shape, generator=generator, device=i.device)
        new = torch.randint(0, self.dim, i.shape, generator=generator, device=i.device)
        return torch.where(u < move_chance, new, i)

    def staggered_score(self, score, dsigma):
        dsigma = _per_token(dsigma, score[..., 0], "dsigma")
        grow = _coef(torch.exp(dsigma), score.dtype)
        # exp(-dsigma Q) = e^dsigma I + (1 - e^dsigma) 1 1^T / V, i.e. mean + e^dsigma (score - mean):
        # written so, not as score e^dsigma + (1 - e^dsigma) sum / V, whose two terms cancel to 0 in
        # float32 once e^dsigma passes 2^24 (dsigma > ~17, the first step of Geometric(1e-4, 20))
        mean = score.mean(-1, keepdim=True)
        return mean + grow * (score - mean)

    def sample_limit(self, *batch_dims, generator=None, device=None):
        return torch.randint(0, self.dim, batch_dims, generator=generator, device=device)

    def score_entropy(self, log_score, sigma, x, x0):
        """SEDD's denoising score entropy (DSE) for the uniform graph, per token.

        Weights ``Q[x, y] = 1 / V``. With ``E = e^sigma - 1`` the exact ratios ``p(y | x0) / p(x | x0)``
        are ``E / (E + V)`` for every ``y != x`` if ``x = x0``, and if ``x != x0``: ``1 + V / E`` for
        ``y = x0`` and 1 for the other ``V - 2`` tokens. The constant ``sum_y K(ratio_y) / V`` with
        ``K(a) = a (log a - 1)`` makes the loss vanish at those ratios.
        ``log_score`` (..., V), ``x`` (...) noisy ids, ``x0`` (...) clean ids. Returns (...).
        """
        x = self.check_ids(x, "x")
        x0 = self.check_clean(x0)
        sigma = _per_token(sigma, x)
        V = self.dim
        dtype = log_score.dtype
        esigm1 = torch.expm1(sigma)
        ratio = esigm1 / (esigm1 + V)  # = 1 - V / (E + V), without the float cancellation
        inv_ratio = 1.0 + V / esigm1
        stay_const = ((V - 1) / V * ratio * (torch.log(ratio) - 1.0)).to(dtype)
        move_const = ((inv_ratio * (torch.log(inv_ratio) - 1.0) - (V - 2)) / V).to(dtype)

        s_x = log_score.gather(-1, x[..., None]).squeeze(-1)
        s_x0 = log_score.gather(-1, x0[..., None]).squeeze(-1)
        neg = (log_score.sum(-1) - s_x) / V  # (1/V) sum_{y != x} s_y
        same = x == x0
        neg = torch.where(same, ratio.to(dtype) * neg, s_x0 / esigm1.to(dtype) + neg)
        sexp = log_score.exp()
        pos = (sexp.sum(-1) - sexp.gather(-1, x[..., None]).squeeze(-1)) / V
        return pos - neg + torch.where(same, stay_const, move_const)

    def __repr__(self):
        return f"Uniform(vocab_size={self.vocab_size})"


def get_graph(name: str, vocab_size: int) -> Graph:
    """Graph by name: ``"absorb"`` or ``"uniform"`` (SEDD's config names)."""
    table = {"absorb": Absorbing, "absorbing": Absorbing, "uniform": Uniform}
    if name not in table:
        raise ValueError(f"unknown graph {name!r}; choose one of {sorted(table)}")
    return table[name](vocab_size)
