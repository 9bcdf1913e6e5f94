"""CDTD: Continuous Diffusion for mixed-type Tabular Data (Mueller, Gruber & Fok 2023, seed 34).

One Gaussian diffusion over all columns at once, in the variance-exploding form of EDM
(``x_sigma = x0 + sigma n``, Karras et al. 2022):

- numerical features (quantile-normalised scores, :mod:`tabular.data`) are diffused directly and
  denoised with EDM's preconditioning (c_in, c_skip, c_out; paper Sec. 3 / EDM Table 1) under the
  MSE loss weighted by ``(sigma^2 + sigma_data^2) / (sigma sigma_data)^2``;
- each categorical feature is embedded, ``e = sqrt(d) * normalize(E[k] + b_j)`` (unit-norm
  embeddings scaled to norm sqrt(d), a learnable per-feature bias), noise is added to the
  embedding, and the network outputs logits trained with cross-entropy (paper eq. 5). At sampling
  the denoised embedding is the probability-weighted mean of the feature's embeddings, *score
  interpolation* (Dieleman et al. 2022, CDCD; paper eq. 6): ``D = sum_k p_k e_k``;
- the noise schedule is learned during training (paper Sec. 4, "adaptive noise schedules"): per
  type (``bytype``: one for categorical, one for numerical features), per feature (``all``) or
  shared (``single``). ``u ~ U[0,1]`` is mapped to ``sigma = Q(u)`` with the quantile function of
  a domain-adapted logistic distribution whose CDF, scaled, is fitted to the (calibrated) loss as
  a function of sigma, so that ``u`` spends time where the loss changes (the inverse of the loss
  curve is the time warping of CDCD). Losses are calibrated by the entropy of each categorical
  feature and an adaptive weight network (paper eq. 9).

Features are ordered categorical first (schema categories, then missingness flags of numerical
columns), then numerical, as in the official code.

Sampling runs through :mod:`core.samplers`. The samplers see one path; here every feature ``f``
has its own ``sigma_f(u)`` on the shared uniform time ``u``. The sampler integrates on EDM's path
``sigma = sigma_max t`` (:class:`core.paths.EDMPath`) of the reference schedule (the one with the
largest shape ``v``): ``t = sigma_ref(u) / sigma_max``, so Euler in ``t`` is the official sampler's
Euler step in sigma, and the grid is uniform in ``u`` like the official one (the network is never
asked about noise levels far below those it was trained on). The probability-flow ODE of feature ``f``,

    dx_f/dt = (d log sigma_f / dt) (x_f - D_f),

is written on that path's ``dx/dt = (d log sigma_ref / dt) (x - D')`` with
``D'_f = x_f - r_f (x_f - D_f)``, ``r_f = d log sigma_f / d log sigma_ref`` (analytic for the
logistic schedules and bounded because the reference has the largest ``v``: ``r_f -> v_ref / v_f``
at low noise, ``-> 0`` or a constant at high noise). Features on the reference schedule get
``r = 1``: exactly EDM's ODE. Guard for score interpolation: ``r`` is clamped to ``[0, R_MAX]``,
the softmax is taken in float32 after removing the max logit, and the categories a caller forbids
(e.g. the missing category when imputing) get ``-inf`` logits before interpolation.

Conditioning and imputation: with ``cond_prob > 0`` (default) a random fraction of training rows
has a random subset of features given clean (sigma = 0) and flagged as known to the network, their
loss dropped, so the same network learns ``p(rest | known)`` (the masked-conditioning trick of
inpainting models; an extension of the paper, which trains unconditionally). At sampling, fixed
features are given clean with their flag. With ``cond_prob = 0`` conditioning falls back to
replacement (Song et al. 2021, sec. 5; RePaint without resampling): the known coordinates are set to
``x0 + sigma_f(t) eps`` (one fixed ``eps`` per row, the PF-ODE trajectory of a point mass) before
each network call and their denoised value is ``x0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.losses import uniform_time
from core.nn.embeddings import TimestepEmbedder
from core.nn.transformer import TokenTransformer, TransformerConfig, modulate
from core.paths import EDMPath, LinearPath
from core.samplers import sample as core_sample

R_MAX = 10.0  # guard on the schedule ratio r_f of the sampler (see the module docstring)
TIMEWARPS = ("single", "bytype", "all")
DENOISERS = ("mlp", "transformer")


def check_sampler(name: str, what: str = "sampler") -> None:
    """Refuse a core sampler CDTD cannot use: unknown, or stochastic. The per-feature schedules enter
    only the probability-flow ODE (``D'`` below); an SDE sampler would add the reference schedule's
    noise to every feature (Adult: mean KS 0.26 instead of 0.015)."""
    from core.samplers import SAMPLERS

    ode = sorted(k for k, v in SAMPLERS.items() if not v.stochastic)
    if name not in SAMPLERS or SAMPLERS[name].stochastic:
        why = "is stochastic; CDTD's per-feature noise schedules need an ODE sampler" if name in SAMPLERS \
            else "is not a core sampler"
        raise ValueError(f"{what}={name!r} {why}: choose one of {ode} (euler is the paper's and the default)")


@dataclass
class CDTDConfig:
    """Hyper-parameters of :class:`CDTD`; defaults follow the official ``default_bytype.yaml``
    except the network size (CPU budget)."""

    emb_dim: int = 16  # d, dimension of the categorical embeddings
    denoiser: str = "mlp"  # mlp (TabDDPM-style, as the paper) | transformer (columns as tokens)
    hidden: int = 256  # mlp width
    mlp_layers: int = 4
    token_dim: int = 64  # transformer
    depth: int = 2
    num_heads: int = 4
    sigma_data: float = 1.0
    sigma_max_cat: float = 100.0
    sigma_max_num: float = 80.0
    timewarp: str = "bytype"  # single | bytype | all
    weight_low_noise: float = 3.0  # initial schedule puts this much more weight on low noise
    cat_emb_init_sigma: float = 1e-3
    calibrate_losses: bool = True
    # Fraction of training rows in which a random subset of features is given clean (sigma = 0) and
    # flagged as known, so that one network also learns p(rest | known) for conditioning and
    # imputation. 0 disables it; conditioning then falls back to replacement. 0.5 (default; 0.25 before)
    # sharpens conditionals (Adult: a column fixed by another, imputed right 84% -> 97.5%) at no
    # measured unconditional cost over four sampling seeds on Adult, German credit and diamonds.
    cond_prob: float = 0.5
    # Dequantise tied numerical values (integers, a spike such as Adult's 40 hours or its zero capital
    # gains) while training: each draw of a tied value is spread uniformly over its range of quantile
    # levels, afresh every batch, so the model sees a continuous density whose inverse transform gives
    # every value exactly its frequency. Off (default): a tie is a point mass at the middle of its
    # range. On Adult it lowers mean KS / TV (0.0149 / 0.0095 -> 0.0117 / 0.0075) but the rare extreme
    # ties (capital gain 99999) spread over z up to 5 are under-generated, and correlations (0.0099 ->
    # 0.0208) and ML efficiency (AUC gap 0.017 -> 0.028) get worse (tabular/README.md).
    dequantize: bool = False
    # Dropout in the denoiser while training (MLP: after every hidden layer; transformer: on both
    # residual branches of every block). 0 (default) as the paper; a regulariser against memorising
    # training rows (the DCR share), measured in tabular/README.md.
    dropout: float = 0.0

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"CDTDConfig.{name}={getattr(self, name)!r}: {why}")

        if self.denoiser not in DENOISERS:
            bad("denoiser", f"must be one of {DENOISERS}")
        if self.timewarp not in TIMEWARPS:
            bad("timewarp", f"must be one of {TIMEWARPS}")
        for name in ("emb_dim", "hidden", "mlp_layers", "token_dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.token_dim % self.num_heads:
            bad("token_dim", f"must be divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.cond_prob < 1.0:
            bad("cond_prob", "must be in [0, 1)")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", "must be in [0, 1)")
        for name in ("sigma_data", "sigma_max_cat", "sigma_max_num", "weight_low_noise", "cat_emb_init_sigma"):
            if not getattr(self, name) > 0:
                bad(name, "must be > 0")


# -- learned noise schedule ------------------------------------------------------------------------


def _logistic_quantile(logit_mu: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``sigmoid(logit mu + logit(u) / v)``, exactly 0 at ``u = 0`` and 1 at ``u = 1`` (``u`` clamped to [0, 1])."""
    u = u.clamp(0.0, 1.0)
    s = torch.sigmoid(logit_mu + torch.special.logit(u, eps=1e-12) / v)
    return torch.where(u == 0.0, torch.zeros_like(s), torch.where(u == 1.0, torch.ones_like(s), s))


class LogisticTimewarp(nn.Module):
    """CDTD's time warping with the CDF of a domain-adapted logistic distribution (paper Sec. 4.2).

    For schedule ``k`` with parameters ``logit mu_k`` and ``v_k > 1`` and ``x = sigma / sigma_max``:

        F_k(x) = sigmoid(v_k (logit x - logit mu_k)),    sigma = sigma_max sigmoid(logit mu_k + logit(u) / v_k).

    ``gamma_k F_k`` is fitted to the calibrated loss at ``sigma`` (``fit_loss``, weighted by the
    inverse density so that all noise levels count alike); the quantile function turns uniform
    ``u`` into the training and sampling noise levels. ``groups`` (F,) maps each feature to its
    schedule.
    """

    def __init__(self, groups: torch.Tensor, sigma_max: torch.Tensor, weight_low_noise: float = 3.0):
        super().__init__()
        n = int(groups.max()) + 1
        self.register_buffer("groups", groups.long())
        self.register_buffer("sigma_max", sigma_max.double())
        v0 = 1.01
        p_large = 1.0 / (weight_low_noise + 1.0)
        self.logit_v = nn.Parameter(torch.full((n,), math.log(math.expm1(v0 - 1.0))))
        self.logit_mu = nn.Parameter(torch.full((n,), math.log(1.0 / (1.0 - p_large) - 1.0) / v0))
        self.logit_gamma = nn.Parameter(torch.full((n,), math.log(math.expm1(1.0))))

    def params(self):
        return self.logit_mu, 1.0 + F.softplus(self.logit_v), F.softplus(self.logit_gamma)

    def sigma(self, u: torch.Tensor) -> torch.Tensor:
        """Noise level of every feature (B, F) at uniform time ``u`` (B,), float64."""
        m, v, _ = (p.detach().double() for p in self.params())
        return _logistic_quantile(m[self.groups], v[self.groups], u.double()[:, None]) * self.sigma_max

    def reference_time(self, u: torch.Tensor) -> torch.Tensor:
        """The reference schedule's ``sigma / sigma_max`` at uniform times ``u`` (its quantile), float64."""
        m, v, _ = self.reference()
        return _logistic_quantile(torch.tensor(m, dtype=torch.float64), torch.tensor(v, dtype=torch.float64), u.double())

    def reference_u(self, t: float) -> float:
        """Uniform time ``u`` of ``t = sigma_ref / sigma_max`` (the reference schedule's CDF; inverse of
        :meth:`reference_time`)."""
        m, v, _ = self.reference()
        if t <= 0.0 or t >= 1.0:
            return min(max(t, 0.0), 1.0)
        return 1.0 / (1.0 + math.exp(-v * (math.log(t / (1 - t)) - m)))

    def cdf(self, sigma_scaled: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        m, v, _ = self.params()
        x = sigma_scaled.clamp(1e-7, 1 - 1e-7)
        return torch.sigmoid(v[k] * (torch.logit(x) - m[k]))

    def pdf(self, sigma_scaled: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        m, v, _ = self.params()
        x = sigma_scaled.clamp(1e-7, 1 - 1e-7)
        s = torch.sigmoid(v[k] * (torch.logit(x) - m[k]))
        return v[k] * s * (1 - s) / (x * (1 - x))

    def fit_loss(self, sigma: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Paper eq. 8: ``(gamma F(sigma) - mean loss)^2 / f(sigma)``, one term per schedule (B, K)."""
        n = int(self.groups.max()) + 1
        onehot = F.one_hot(self.groups, n).to(losses.dtype)  # (F, K)
        target = (losses @ onehot) / onehot.sum(0)  # mean loss of each schedule's features (B, K)
        first = onehot.argmax(0)  # one feature of each schedule: they share sigma
        x = (sigma[:, first] / self.sigma_max[first]).float()
        k = torch.arange(n, device=sigma.device)
        _, _, gamma = self.params()
        est = gamma[k] * self.cdf(x, k)
        with torch.no_grad():
            dens = self.pdf(x, k)
        return (est - target.detach()) ** 2 / (dens + 1e-7)

    def ratio(self, u: float) -> torch.Tensor:
        """``r_f = d log sigma_f / d log sigma_ref`` at time ``u`` (F,), the reference being the largest ``v``.

        With ``sigma = sigma_max sigmoid(c)``, ``d log sigma / du = (1 - sigmoid(c)) / (v u (1 - u))``; the
        factor ``1 / (u (1 - u))`` cancels in the ratio.
        """
        m, v, _ = (p.detach().double() for p in self.params())
        ref = int(torch.argmax(v))
        uu = torch.tensor(min(max(u, 1e-9), 1 - 1e-9), dtype=torch.float64, device=m.device)
        c = m + torch.logit(uu) / v
        one_minus = torch.sigmoid(-c) / v  # (K,)
        r = one_minus / one_minus[ref]
        return r[self.groups].clamp(0.0, R_MAX)

    def reference(self) -> tuple[float, float, float]:
        """(logit mu, v, sigma_max) of the reference schedule."""
        m, v, _ = (p.detach().double() for p in self.params())
        ref = int(torch.argmax(v))
        feat = int((self.groups == ref).nonzero()[0])
        return float(m[ref]), float(v[ref]), float(self.sigma_max[feat])


# -- networks --------------------------------------------------------------------------------------


class CatEmbedding(nn.Module):
    """Categorical embeddings ``sqrt(d) * normalize(E[offset_j + k] + b_j)`` (paper Sec. 3.2)."""

    def __init__(self, cardinalities: list[int], dim: int, init_sigma: float):
        super().__init__()
        self.dim = dim
        self.cardinalities = list(cardinalities)
        offsets = torch.tensor([0] + self.cardinalities[:-1], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets)
        self.table = nn.Embedding(max(sum(self.cardinalities), 1), dim)
        nn.init.normal_(self.table.weight, std=init_sigma)
        self.bias = nn.Parameter(torch.zeros(len(self.cardinalities), dim))

    def _norm(self, e: torch.Tensor) -> torch.Tensor:
        return F.normalize(e, dim=-1, eps=1e-20) * math.sqrt(self.dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, n_cat) -> (B, n_cat, d)."""
        return self._norm(self.table(codes + self.offsets) + self.bias)

    def all(self, j: int) -> torch.Tensor:
        """Every embedding of feature j, (K_j, d)."""
        idx = torch.arange(self.cardinalities[j], device=self.offsets.device) + self.offsets[j]
        return self._norm(self.table(idx) + self.bias[j])


class MLPDenoiser(nn.Module):
    """TabDDPM-style MLP (as CDTD's default): inputs concatenated, plus a time embedding, SiLU layers."""

    def __init__(self, n_num: int, n_cat: int, emb_dim: int, out_dim: int, hidden: int, layers: int,
                 known_input: bool = False, dropout: float = 0.0):
        super().__init__()
        self.known_input = known_input
        self.dropout = dropout
        n_in = n_num + n_cat * emb_dim
        # with known features: a second copy of the inputs, zero except on known features, and the flags,
        # so that a known value reaches the network on its own additive path
        self.proj = nn.Linear(n_in + (n_in + n_num + n_cat) * known_input, hidden)
        self.t_embed = TimestepEmbedder(hidden, 128)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_num, x_cat, c_noise, known=None):
        parts = [x_num, x_cat.flatten(1)]
        if self.known_input:
            n_cat = x_cat.shape[1]
            if known is None:
                k = x_num.new_zeros(x_num.shape[0], n_cat + x_num.shape[1])
            else:
                k = known.to(x_num.dtype)
            parts += [x_num * k[:, n_cat:], (x_cat * k[:, :n_cat, None]).flatten(1), k]
        h = self.proj(torch.cat(parts, 1)) + self.t_embed(c_noise)
        for layer in self.layers:
            h = F.silu(layer(F.silu(h)))
            if self.dropout:
                h = F.dropout(h, self.dropout, self.training)
        return self.out(h)


def _unused_as_buffers(module: nn.Module, *names: str) -> None:
    """Turn parameters ``names`` of ``module`` (default: all, recursively) that the forward pass never uses
    into buffers of the same names.

    A parameter without a gradient makes DDP fail unless it is wrapped with ``find_unused_parameters=True``
    (the core Trainer does not set it). As buffers they keep their names in the state dict, so that
    files saved while they were parameters load, and files saved now load in code where they are
    parameters; the optimiser never saw a gradient of them, so training is unchanged.
    """
    for full in names or [n for n, _ in module.named_parameters()]:
        owner_name, _, name = full.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        p = owner._parameters.pop(name)
        owner.register_buffer(name, p.detach())


class NLinear(nn.Module):
    """One linear map per feature: (B, N, i) -> (B, N, o)."""

    def __init__(self, n: int, i: int, o: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, i, o) / math.sqrt(i))
        self.bias = nn.Parameter(torch.zeros(n, o))

    def forward(self, x):
        return torch.einsum("bni,nio->bno", x, self.weight) + self.bias


class TransformerDenoiser(nn.Module):
    """Columns as tokens through :class:`core.nn.TokenTransformer` (DiT blocks, adaLN-Zero on the time).

    Token of a numerical feature: ``w_f x_f + b_f``; of a categorical feature: a per-feature linear
    map of its (noisy) embedding; plus a learned column embedding. The head is adaLN + LayerNorm and
    one linear map per feature to its output (1 value or K_j logits, padded to max K).
    """

    def __init__(self, n_num: int, cardinalities: list[int], emb_dim: int, cfg: CDTDConfig):
        super().__init__()
        D = cfg.token_dim
        self.n_num, self.cards = n_num, list(cardinalities)
        n_feat = n_num + len(self.cards)
        self.num_in = NLinear(max(n_num, 1), 1, D)
        self.cat_in = NLinear(max(len(self.cards), 1), emb_dim, D)
        self.col_embed = nn.Parameter(torch.randn(n_feat, D) * 0.02)
        self.known_embed = nn.Parameter(torch.randn(n_feat, D) * 0.02)  # added to tokens given clean
        # Unused pieces (see _unused_as_buffers): the known-feature embedding of a model trained without
        # known features (cond_prob = 0: no feature is flagged known in training, and sampling conditions
        # by replacement, CDTD.make_denoiser passing no flags), the input map of an absent feature type.
        # Created all the same, so that the layers after them draw the same initial random numbers.
        if cfg.cond_prob == 0:
            _unused_as_buffers(self, "known_embed")
        if not n_num:
            _unused_as_buffers(self.num_in)
        if not self.cards:
            _unused_as_buffers(self.cat_in)
        self.core = TokenTransformer(TransformerConfig(dim=D, depth=cfg.depth, num_heads=cfg.num_heads,
                                                       frequency_dim=128, mlp_ratio=2.0,
                                                       dropout=cfg.dropout))
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(D, 2 * D)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)
        kmax = max(self.cards + [1])
        self.head = NLinear(n_feat, D, kmax)
        nn.init.zeros_(self.head.weight)

    def forward(self, x_num, x_cat, c_noise, known=None):
        tokens = []
        if len(self.cards):
            tokens.append(self.cat_in(x_cat))
        if self.n_num:
            tokens.append(self.num_in(x_num[..., None]))
        h = torch.cat(tokens, 1) + self.col_embed
        if known is not None:
            h = h + known[..., None].to(h.dtype) * self.known_embed
        c = self.core.condition(c_noise)
        h = self.core(h, c)
        shift, scale = self.modulation(F.silu(c)).chunk(2, dim=-1)
        h = self.head(modulate(self.norm(h), shift[:, None], scale[:, None]))  # (B, F, kmax)
        outs = [h[:, j, :k] for j, k in enumerate(self.cards)]
        if self.n_num:
            outs.append(h[:, len(self.cards):, 0])
        return torch.cat(outs, 1)


class WeightNetwork(nn.Module):
    """Adaptive loss weighting (paper eq. 9, after EDM2): log of the expected weighted loss at ``u``."""

    def __init__(self, dim: int = 128, generator: torch.Generator | None = None):
        super().__init__()
        self.register_buffer("freqs", torch.randn(dim // 2, generator=generator))
        self.fc = nn.Linear(dim, 1)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, c):
        a = c[:, None] * self.freqs * 2 * math.pi
        return self.fc(torch.cat([a.sin(), a.cos()], 1)).squeeze(1)


# -- the model -------------------------------------------------------------------------------------


class CDTD(nn.Module):
    """Mixed-type diffusion over ``n_num`` numerical and categorical features of ``cardinalities``.

    ``proportions``: the training frequencies of each categorical feature's categories, used for
    the entropy calibration of the cross-entropy losses and the initial logit biases.
    """

    def __init__(self, n_num: int, cardinalities: list[int], cfg: CDTDConfig | None = None,
                 proportions: list[torch.Tensor] | None = None):
        super().__init__()
        cfg = self.cfg = cfg or CDTDConfig()
        if n_num + len(cardinalities) == 0:
            raise ValueError("CDTD needs at least one feature")
        if any(k < 2 for k in cardinalities):
            raise ValueError(f"every categorical feature needs >= 2 categories, got {cardinalities}")
        self.n_num, self.cards, self.n_cat = n_num, list(cardinalities), len(cardinalities)
        self.n_feat = n_num + self.n_cat
        d = cfg.emb_dim
        self.cat_emb = CatEmbedding(self.cards, d, cfg.cat_emb_init_sigma)
        out_dim = sum(self.cards) + n_num
        if cfg.denoiser == "mlp":
            self.net = MLPDenoiser(n_num, self.n_cat, d, out_dim, cfg.hidden, cfg.mlp_layers, cfg.cond_prob > 0,
                                   cfg.dropout)
        else:
            self.net = TransformerDenoiser(n_num, self.cards, d, cfg)
            if not self.n_cat:  # the transformer has no categorical token to embed: cat_emb is unused
                _unused_as_buffers(self.cat_emb)
        if proportions is None:
            proportions = [torch.full((k,), 1.0 / k) for k in self.cards]
        logp = [p.clamp_min(1e-8).log() for p in proportions]
        # Start the logits at the marginal log-frequencies (the official ``bias_init``).
        self.register_buffer("logit_init", torch.cat(logp) if logp else torch.zeros(0))
        ent = torch.tensor([float(-(p * p.clamp_min(1e-12).log()).sum()) for p in proportions])
        # Calibration of each cross-entropy by the feature's entropy (paper Sec. 4.1); floored
        # so that a nearly constant flag does not dominate the loss.
        norm = torch.cat([ent.clamp_min(0.05), torch.ones(n_num)]) if cfg.calibrate_losses else torch.ones(self.n_feat)
        self.register_buffer("normal_const", norm)
        self.weight_net = WeightNetwork()
        groups = {"single": [0] * self.n_feat,
                  "bytype": [0] * self.n_cat + [1 if self.n_cat else 0] * n_num,
                  "all": list(range(self.n_feat))}[cfg.timewarp]
        smax = [cfg.sigma_max_cat] * self.n_cat + [cfg.sigma_max_num] * n_num
        self.timewarp = LogisticTimewarp(torch.tensor(groups), torch.tensor(smax), cfg.weight_low_noise)
        self._sizes = [n_num, self.n_cat * d]

    # -- EDM preconditioning -------------------------------------------------------------------------

    def precondition(self, x_cat_t, x_num_t, u, sigma, known=None):
        """Logits of each categorical feature (list of (B, K_j)) and denoised numericals D (B, n_num).

        x_cat_t (B, n_cat, d), x_num_t (B, n_num), u (B,), sigma (B, F) float; known (B, F) bool:
        features given clean (their sigma is 0), flagged to the network.
        """
        sd = self.cfg.sigma_data
        s_cat, s_num = sigma[:, : self.n_cat], sigma[:, self.n_cat:]
        c_in_cat = 1.0 / (sd**2 + s_cat**2).sqrt()
        c_in_num = 1.0 / (sd**2 + s_num**2).sqrt()
        c_noise = torch.log(u + 1e-8) * 0.25 * 1000  # official code: log(u) / 4, on DiT's 0..1000 scale
        out = self.net(c_in_num * x_num_t, c_in_cat[..., None] * x_cat_t, c_noise, known)
        logits = out[:, : sum(self.cards)] + self.logit_init
        logits = list(logits.split(self.cards, 1)) if self.cards else []
        f_num = out[:, sum(self.cards):]
        c_skip = sd**2 / (s_num**2 + sd**2)
        c_out = s_num * sd / (s_num**2 + sd**2).sqrt()
        return logits, c_skip * x_num_t + c_out * f_num

    # -- training ------------------------------------------------------------------------------------

    def _noised(self, x_num, x_cat, sigma, generator):
        """The forward process at per-feature noise ``sigma`` (B, F): ``(emb(x_cat) + sigma eps, x_num + sigma eps)``;
        draws the categorical noise, then the numerical (the same draws in training and in :meth:`denoising_error`)."""
        emb0 = self.cat_emb(x_cat)
        noise_cat = torch.randn(emb0.shape, generator=generator, device=x_num.device)
        noise_num = torch.randn(x_num.shape, generator=generator, device=x_num.device)
        return emb0 + noise_cat * sigma[:, : self.n_cat, None], x_num + noise_num * sigma[:, self.n_cat:]

    def loss(self, x_num: torch.Tensor, x_cat: torch.Tensor, num_observed: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """CDTD training loss of a batch: x_num (B, n_num) float, x_cat (B, n_cat) int64.

        ``num_observed`` (B, n_num) bool: False where a numerical value is missing (its score is a
        placeholder; its error is not counted). Returns (loss, stats): the loss to minimise and the logged
        means of the unweighted errors over the noised features (:meth:`_loss_stats`).
        """
        B = x_num.shape[0]
        dev = x_num.device
        if num_observed is not None:  # a placeholder may be NaN: neither the network nor the loss sees it
            x_num = torch.where(num_observed, x_num, torch.zeros((), dtype=x_num.dtype, device=dev))
        u = uniform_time(_UNIT, B, generator=generator, device=dev, stratified=True)  # low-discrepancy (VDM)
        sigma = self.timewarp.sigma(u).float()  # (B, F)
        u = u.float()
        known = None
        free = torch.ones(B, device=dev, dtype=torch.bool)  # rows without known features
        if self.cfg.cond_prob > 0:
            rows = torch.rand(B, generator=generator, device=dev) < self.cfg.cond_prob
            frac = torch.rand(B, 1, generator=generator, device=dev)
            known = (torch.rand(B, self.n_feat, generator=generator, device=dev) < frac) & rows[:, None]
            known &= ~known.all(1, keepdim=True)  # keep at least one feature to generate
            free = ~known.any(1)
            sigma = sigma.masked_fill(known, 0.0)
        x_cat_t, x_num_t = self._noised(x_num, x_cat, sigma, generator)
        logits, d_num = self.precondition(x_cat_t, x_num_t, u, sigma, known)
        ce = (torch.stack([F.cross_entropy(lg, x_cat[:, j], reduction="none") for j, lg in enumerate(logits)], 1)
              if logits else x_num.new_zeros(B, 0))
        mse = (d_num - x_num) ** 2
        if num_observed is not None:
            mse = torch.where(num_observed, mse, torch.zeros((), dtype=mse.dtype, device=dev))
        s_num = sigma[:, self.n_cat:]
        sd = self.cfg.sigma_data
        w_num = (s_num**2 + sd**2) / ((s_num * sd) ** 2 + 1e-7)  # EDM's lambda(sigma)
        unweighted = torch.cat([ce, mse], 1)
        calibrated = unweighted / self.normal_const
        weighted = torch.cat([ce, w_num * mse], 1) / self.normal_const
        if known is not None:  # known features are inputs, not targets
            weighted = weighted * (~known).to(weighted.dtype)
        # schedule and loss-weight fits see only rows without known features (their sigma is the schedule's)
        fw = free.to(weighted.dtype)
        warp = self.timewarp.fit_loss(sigma.double(), calibrated.detach().double()).float()
        warp = (warp * fw[:, None]).sum() / (fw.sum() * warp.shape[1]).clamp_min(1.0)
        log_w = self.weight_net(torch.log(u + 1e-8) * 0.25)
        weight_loss = ((log_w.exp() - weighted.detach().mean(1)) ** 2 * fw).sum() / fw.sum().clamp_min(1.0)
        # Known entries are zeros here; the mean over all B x F entries gives every noised feature the same
        # weight 1 / (B F) whatever else is known in its batch (dividing by the number of noised entries
        # instead would make that weight depend on the batch's draw of known features).
        main = (weighted / log_w.exp().detach()[:, None]).mean()
        total = main + warp + weight_loss
        with torch.no_grad():
            stats = self._loss_stats(ce, mse, known)
        return total, stats

    @staticmethod
    def _loss_stats(ce: torch.Tensor, mse: torch.Tensor, known: torch.Tensor | None) -> dict:
        """Logged means of the unweighted per-feature losses, cross-entropies ``ce`` (B, n_cat) and
        squared errors ``mse`` (B, n_num), over the noised features only.

        A known feature is an input given clean, not a target: its error carries no learning signal
        (zero weight in the loss) and is not logged, so that the logged loss of a model trained with
        ``cond_prob > 0`` is comparable with one trained without (the same per-feature mean, over a
        different number of entries). A missing numerical value counts as 0, as in the loss.
        ``ce``/``mse``: the categorical and numerical parts; 0.0 where a batch has no such entry.
        """
        unweighted = torch.cat([ce, mse], 1)
        if known is None:
            keep = keep_cat = keep_num = None
        else:
            keep = ~known
            keep_cat, keep_num = keep[:, : ce.shape[1]], keep[:, ce.shape[1]:]

        def mean(x: torch.Tensor, keep: torch.Tensor | None) -> float:
            x = x if keep is None else x[keep]
            return float(x.mean()) if x.numel() else 0.0

        return {"loss": mean(unweighted, keep), "ce": mean(ce, keep_cat), "mse": mean(mse, keep_num)}

    @torch.no_grad()
    def denoising_error(self, x_num, x_cat, sigma: float, num_observed=None, generator=None) -> float:
        """Mean unweighted loss (cross-entropy and squared error per feature) at one fixed noise level
        ``sigma`` for every feature: a measure of fit that, unlike the training loss, does not move
        with the learned schedule."""
        B = x_num.shape[0]
        if not float(sigma) >= 0.0:
            raise ValueError(f"sigma must be a noise level >= 0, got {sigma!r}")
        dev = x_num.device
        sig = torch.full((B, self.n_feat), float(sigma), device=dev)
        u = torch.full((B,), 0.5, device=dev)  # only the network's time input; fixed for comparability
        x_cat_t, x_num_t = self._noised(x_num, x_cat, sig, generator)
        logits, d_num = self.precondition(x_cat_t, x_num_t, u, sig)
        errs = [F.cross_entropy(lg, x_cat[:, j]) for j, lg in enumerate(logits)]
        mse = (d_num - x_num) ** 2
        if num_observed is not None:
            mse = mse[num_observed]
        if mse.numel():
            errs.append(mse.mean())
        return float(torch.stack(errs).mean())

    # -- sampling ------------------------------------------------------------------------------------

    def path(self) -> EDMPath:
        """The sampler's path: EDM's ``sigma = sigma_max t`` with the reference schedule's sigma_max."""
        _, _, smax = self.timewarp.reference()
        return EDMPath(sigma_max=smax)

    def u_of_t(self, t: float) -> float:
        """Uniform time ``u`` of sampler time ``t = sigma_ref / sigma_max``: the reference schedule's CDF."""
        return self.timewarp.reference_u(t)

    def u_grid(self, steps: int) -> torch.Tensor:
        """Sampler times of ``steps`` equal steps in ``u`` from 1 to 0 (the official sampler's grid):
        the network is evaluated at the noise levels it was trained on, never far below them."""
        return self.timewarp.reference_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64))

    def _expand(self, per_feature: torch.Tensor) -> torch.Tensor:
        """(..., F) per feature -> (..., P) per coordinate of the flat state [numerical, embeddings]."""
        d = self.cfg.emb_dim
        return torch.cat([per_feature[..., self.n_cat:], per_feature[..., : self.n_cat].repeat_interleave(d, -1)], -1)

    def _split(self, x: torch.Tensor):
        x_num, x_cat = x.split(self._sizes, 1)
        return x_num, x_cat.reshape(x.shape[0], self.n_cat, self.cfg.emb_dim)

    def make_denoiser(self, known: dict | None = None, forbid: list[torch.Tensor] | None = None,
                      grid: torch.Tensor | None = None, logit_bias: list[torch.Tensor] | None = None):
        """``D'(x, t)`` for the core samplers (see the module docstring); keeps the last logits.

        known: ``{"mask": (B, F) bool, "pmask": (B, P) the same per coordinate, "x0": (B, P) clean flat
        state, "eps": (B, P)}``: fixed features, given clean (``cond_prob > 0``) or by replacement.
        forbid: per categorical feature a (K_j,) bool of categories never generated.
        logit_bias: per categorical feature a (K_j,) float added to its logits at every step (the
        marginal calibration of :meth:`tabular.api.TabularDiffusion.calibrate`).
        grid: the sampler's times; when given (Euler), ``r_f`` is the secant ratio over the step from
        ``t`` to the next grid time, ``(1 - sigma_f(u') / sigma_f(u)) / (1 - t' / t)``, which makes the
        Euler step of every feature exactly the official per-feature Euler step in its own sigma
        (the derivative ratio over-shoots on coarse steps where the schedules differ).
        """
        times = grid.tolist() if grid is not None else None
        state = {"logits": None}

        def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            u = self.u_of_t(float(t.reshape(-1)[0]))
            sig_f = self.timewarp.sigma(torch.tensor([u], dtype=torch.float64, device=x.device))[0]  # (F,)
            sig_p = self._expand(sig_f).to(x.dtype)
            B = x.shape[0]
            sig_b = sig_f.float().expand(B, -1)
            flags = None
            if known is not None:
                km = known["pmask"]
                if self.cfg.cond_prob > 0:  # trained with clean known features: give them clean
                    x = torch.where(km, known["x0"], x)
                    flags = known["mask"]
                    sig_b = sig_b.masked_fill(flags, 0.0)
                else:  # replacement: the known features on their own noisy trajectory
                    x = torch.where(km, known["x0"] + sig_p * known["eps"], x)
            x_num, x_cat = self._split(x)
            logits, d_num = self.precondition(x_cat, x_num, torch.full((B,), u, device=x.device), sig_b, flags)
            d_cat = []
            for j, lg in enumerate(logits):
                lg = lg.float()
                if logit_bias is not None:
                    lg = lg + logit_bias[j].to(lg.device)
                if forbid is not None and forbid[j] is not None:
                    lg = lg.masked_fill(forbid[j].to(lg.device), float("-inf"))
                logits[j] = lg
                p = torch.softmax(lg - lg.amax(1, keepdim=True), 1)
                d_cat.append(p @ self.cat_emb.all(j))  # score interpolation
            d_cat = torch.stack(d_cat, 1).flatten(1) if d_cat else x.new_zeros(B, 0)
            D = torch.cat([d_num, d_cat], 1)
            if known is not None:
                D = torch.where(known["pmask"], known["x0"], D)
            state["logits"] = logits
            if times is not None:
                t_cur = float(t.reshape(-1)[0])
                i = min(range(len(times) - 1), key=lambda k: abs(times[k] - t_cur))
                t_next = times[i + 1]
                s_next = self.timewarp.sigma(torch.tensor([self.u_of_t(t_next)], dtype=torch.float64,
                                                          device=x.device))[0]
                ratio = (1.0 - s_next / sig_f.clamp_min(1e-300)) / (1.0 - t_next / t_cur)  # sig_f: sigma_f(u)
                r = self._expand(ratio.clamp(0.0, R_MAX)).to(x.dtype)
            else:
                r = self._expand(self.timewarp.ratio(u)).to(x.dtype)
            return x - r * (x - D)

        denoiser.state = state
        return denoiser

    @torch.no_grad()
    def sample_encoded(self, n: int, *, sampler: str = "euler", steps: int = 50, grid="uniform_u", generator=None,
                       known_mask: torch.Tensor | None = None, known_num: torch.Tensor | None = None,
                       known_cat: torch.Tensor | None = None, forbid=None, logit_bias=None, **options):
        """n rows as (x_num (n, n_num), x_cat codes (n, n_cat)).

        known_mask (n, F) bool with known_num (n, n_num) / known_cat (n, n_cat): features fixed by
        replacement. Noise at t = 1 is ``sigma_f(1) z`` per feature. ``grid``: ``"uniform_u"`` (equal
        steps in the schedule's uniform time, default; for Euler only, the other samplers then get
        their own default grid of ``steps``), else anything :func:`core.samplers.sample` takes (a
        number of steps on its default grid, a grid name through ``grid_kind``, a tensor of times).
        ``sampler``: an ODE sampler of :mod:`core.samplers` (:func:`check_sampler`). ``logit_bias``:
        see :meth:`make_denoiser`.
        """
        dev = self.logit_init.device
        P = sum(self._sizes)
        path = self.path()
        sig1 = self._expand(self.timewarp.sigma(torch.ones(1, dtype=torch.float64, device=dev))[0]).float()
        x = torch.randn(n, P, generator=generator, device=dev) * sig1
        known = None
        if grid is None:
            grid = steps
        if known_mask is not None and bool(known_mask.any()):
            # a feature type the model lacks needs no known values: an omitted empty argument is fine
            known_cat = torch.zeros(n, 0, dtype=torch.long) if known_cat is None and not self.n_cat else known_cat
            known_num = torch.zeros(n, 0) if known_num is None and not self.n_num else known_num
            if known_cat is None or known_num is None:
                raise ValueError("known_mask marks known features: give known_num (n, n_num) and known_cat (n, n_cat)")
            x0_cat = self.cat_emb(known_cat.to(dev)).flatten(1) if self.n_cat else torch.zeros(n, 0, device=dev)
            x0 = torch.cat([known_num.to(dev).float(), x0_cat], 1)
            eps = torch.randn(n, P, generator=generator, device=dev)
            known = {"pmask": self._expand(known_mask.to(dev)), "mask": known_mask.to(dev), "x0": x0, "eps": eps}
        check_sampler(sampler)
        if isinstance(grid, str) and grid == "uniform_u":
            # the secant ratio makes Euler exact per feature on this grid; with the derivative ratio
            # its coarse steps at the ends ruin the other solvers, which get their default grid
            grid = self.u_grid(steps) if sampler == "euler" else steps
        secant = sampler == "euler" and isinstance(grid, torch.Tensor)
        D = self.make_denoiser(known, forbid, grid if secant else None, logit_bias)
        out, _ = core_sample(sampler, D, path, x, grid=grid, generator=generator, **options)
        x_num, _ = self._split(out)
        logits = D.state["logits"]
        x_cat = (torch.stack([lg.argmax(1) for lg in logits], 1) if logits
                 else torch.zeros(n, 0, dtype=torch.long, device=dev))
        if known is not None:
            x_num = torch.where(known_mask[:, self.n_cat:].to(dev), known_num.to(dev).float(), x_num)
            x_cat = torch.where(known_mask[:, : self.n_cat].to(dev), known_cat.to(dev), x_cat)
        return x_num, x_cat


_UNIT = LinearPath()  # only its time range [0, 1] is used, by core.losses.uniform_time
