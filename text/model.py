"""Language models of the text domain: one token transformer, three ways to use it.

``TextModel`` = token embedding (``V + 1`` rows) -> ``core.nn.TokenTransformer`` with 1D RoPE ->
DiT's adaLN ``FinalLayer`` to ``V`` logits. The parameter count is the same for every kind:

- ``sedd`` (Lou et al. 2024, "Discrete Diffusion Modeling by Estimating the Ratios of the Data
  Distribution"): bidirectional, conditioned on the total noise ``sigma`` through the time
  embedder; the extra embedding row is the absorbing mask. Its log concrete score is the
  official absorbing parameterisation: ``logits - log(e^sigma - 1) - log V`` on the data tokens,
  0 at the current token and in the mask column (:meth:`TextModel.log_score`).
- ``radd`` (Ou et al. 2024, RADD; MDLM): bidirectional and time-independent (the time
  embedder gets a constant 0); the softmax of the logits is ``p(x0^l | unmasked tokens)``
  (:meth:`TextModel.log_probs`).
- ``ar``: the same transformer in causal mode; the extra embedding row is a begin-of-sequence
  token, the input is ``[BOS, x_0, .., x_{L-2}]`` and position ``l`` predicts ``x_l``
  (:meth:`TextModel.ar_log_probs`).

- ``difformer`` (Gao et al. 2022, Difformer; Li et al. 2022, Diffusion-LM): continuous diffusion
  of the token embeddings on a ``core.paths`` Gaussian path. Embeddings are layer-normalised and
  scaled by ``embed_scale`` (Difformer's normalisation against embedding collapse; a scale below 1
  acts as its noise factor); the network reads ``x_t`` and ``t`` and its logits give
  ``x0_hat = softmax(logits) @ E`` (:meth:`TextModel.denoise`), trained with the x0 MSE plus
  Difformer's anchor cross-entropy on the logits.

Token ids are ``(B, L)`` int64 in ``[0, V]`` (``V`` = the mask / BOS id).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.discrete import (
    Absorbing,
    LogLinear,
    absorbing_dce_loss,
    lambda_dce_loss,
    score_entropy_loss,
    stratified_uniform,
)
from core.nn.transformer import FinalLayer, TokenTransformer, TransformerConfig

__all__ = ["TextModelConfig", "TextModel", "KINDS", "make_loss", "sedd_log_score"]

KINDS = ("sedd", "radd", "ar", "difformer")
TIME_SAMPLING = ("iid", "stratified")


@dataclass
class TextModelConfig:
    kind: str = "radd"  # sedd | radd | ar
    dim: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    noise_eps: float = 1e-3  # LogLinear: mask probability (1 - eps) t
    sampling_eps: float = 1e-3  # training times t ~ U(eps, 1) (SEDD / RADD); 0 < eps < 1
    loss: str = "tdce"  # radd only: "tdce" (MDLM / RADD t-DCE) or "lambda" (RADD lambda-DCE)
    path: str = "cosine"  # difformer only: the core Gaussian path in embedding space
    embed_scale: float = 0.5  # difformer: norm of the normalised embeddings / sqrt(dim) (1 / noise factor)
    # training times (sedd / radd / difformer): "iid" U per sequence, or "stratified" one per stratum
    # [i/B, (i+1)/B) of the batch (MDLM's low-discrepancy sampler): same expectation, lower variance
    time_sampling: str = "iid"
    dropout: float = 0.0  # residual dropout in every block (training only), as SEDD's DDiT uses 0.1

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model.kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.loss not in ("tdce", "lambda"):
            raise ValueError(f"model.loss must be 'tdce' or 'lambda', got {self.loss!r}")
        if self.loss != "tdce" and self.kind != "radd":
            # only RADD chooses its loss; the other kinds would train on with theirs, ignoring it
            raise ValueError(f"model.loss={self.loss!r} applies to model.kind=radd only; model.kind={self.kind!r} "
                             "does not use it (leave model.loss at 'tdce')")
        for name in ("dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0.0 < self.noise_eps < 1.0:
            raise ValueError(f"model.noise_eps must be in (0, 1), got {self.noise_eps!r}")
        if not 0.0 < self.sampling_eps < 1.0:
            # t = 0 exactly (no noise) gives t-DCE an infinite weight dsigma / expm1(sigma)
            raise ValueError(f"model.sampling_eps must be in (0, 1), got {self.sampling_eps!r}")
        if self.time_sampling not in TIME_SAMPLING:
            raise ValueError(f"model.time_sampling must be one of {list(TIME_SAMPLING)}, got {self.time_sampling!r}")
        if not self.embed_scale > 0:
            raise ValueError(f"model.embed_scale must be > 0, got {self.embed_scale!r}")
        if self.kind == "difformer":
            from core.paths import get_path

            get_path(self.path)  # ValueError naming an unknown path
        self.transformer()  # head_dim / RoPE divisibility

    def transformer(self) -> TransformerConfig:
        try:
            return TransformerConfig(dim=self.dim, depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                                     rope_axes=1, causal=self.kind == "ar", dropout=self.dropout)
        except ValueError as e:
            raise ValueError(f"model: {e}") from None


def sedd_log_score(logits: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """SEDD's absorbing log score from logits (B, L, V): ``logits - log(e^sigma - 1) - log V``.

    The mask column and the current token's column are 0 (score 1), as the official network scatters.
    Returns (B, L, V + 1) float32.
    """
    logits = logits.float()
    # log(e^sigma - 1) in float64, so that a small sigma does not cancel.
    sigma = torch.as_tensor(sigma, device=x.device).double().reshape(-1)
    log_esigm1 = torch.log(torch.expm1(sigma)).float()[:, None, None]
    out = logits - log_esigm1 - math.log(logits.shape[-1])
    out = torch.cat([out, torch.zeros_like(out[..., :1])], dim=-1)
    return out.scatter(-1, x[..., None], 0.0)


class TextModel(nn.Module):
    """See the module docstring. ``vocab_size`` = V data tokens; id V is the mask (diffusion) or BOS (AR)."""

    def __init__(self, cfg: TextModelConfig, vocab_size: int):
        super().__init__()
        cfg.validate()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed = nn.Embedding(vocab_size + 1, cfg.dim)
        self.body = TokenTransformer(cfg.transformer())
        self.head = FinalLayer(cfg.dim, vocab_size)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.graph = Absorbing(vocab_size)
        self.noise = LogLinear(cfg.noise_eps)

    @property
    def kind(self) -> str:
        return self.cfg.kind

    def _check(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.dtype != torch.int64:
            raise ValueError(f"token ids must be (B, L) int64, got shape {tuple(x.shape)} dtype {x.dtype}")
        return x

    # -- difformer: embedding-space continuous diffusion -----------------------------------------
    def embeddings(self) -> Tensor:
        """The V normalised word embeddings (V, D): LayerNorm (no affine) times ``embed_scale``."""
        e = self.embed.weight[: self.vocab_size]
        return F.layer_norm(e, e.shape[-1:]) * self.cfg.embed_scale

    def continuous_logits(self, xt: Tensor, t: Tensor) -> Tensor:
        """Logits (B, L, V) of the clean tokens from noisy embeddings xt (B, L, D) at times t (B,)."""
        if self.kind != "difformer":
            raise ValueError(f"continuous_logits needs a 'difformer' model, got {self.kind!r}")
        B, L, _ = xt.shape
        c = self.body.condition(1000.0 * t.to(torch.float32))  # DiT's time scale (0..1000)
        positions = torch.arange(L, device=xt.device, dtype=torch.float32)[:, None]
        return self.head(self.body(xt, c, positions=positions), c)

    def denoise(self, xt: Tensor, t: Tensor) -> Tensor:
        """``D(x_t, t) = softmax(logits) @ E``: the x0 prediction of the shared sampler signature."""
        return self.continuous_logits(xt, t).float().softmax(-1) @ self.embeddings()

    def round(self, x: Tensor) -> Tensor:
        """Nearest word embedding of each vector (B, L, D) -> ids (B, L) (Diffusion-LM's rounding)."""
        e = self.embeddings()
        return (x.float() @ e.T - 0.5 * (e * e).sum(-1)).argmax(-1)

    def forward(self, x: Tensor, sigma: Tensor | None = None) -> Tensor:
        """Logits (B, L, V) of ids x (B, L) in [0, V]; ``sigma`` (B,) conditions SEDD only.

        A difformer model takes noisy embeddings (B, L, D) and times t (B,) instead.
        """
        if self.kind == "difformer":
            if sigma is None or not torch.is_floating_point(x):
                raise ValueError("a difformer model takes noisy embeddings (B, L, D) and times t (B,)")
            return self.continuous_logits(x, sigma)
        x = self._check(x)
        B, L = x.shape
        if (sigma is None) != (self.kind != "sedd"):
            raise ValueError(f"a {self.kind} model takes {'sigma' if self.kind == 'sedd' else 'no sigma'}")
        t = sigma.to(torch.float32) if sigma is not None else torch.zeros(B, device=x.device)
        c = self.body.condition(t)
        positions = torch.arange(L, device=x.device, dtype=torch.float32)[:, None]
        h = self.body(self.embed(x), c, positions=positions)
        return self.head(h, c)

    # -- the three parameterisations ------------------------------------------------------------
    def log_score(self, x: Tensor, sigma: Tensor) -> Tensor:
        """SEDD: log concrete score (B, L, V + 1) of the absorbing graph at ids x (B, L), sigma (B,)."""
        return sedd_log_score(self(x, sigma), x, sigma)

    def log_probs(self, x: Tensor) -> Tensor:
        """RADD: log p(x0^l = . | x) (B, L, V), float32."""
        return F.log_softmax(self(x).float(), dim=-1)

    def ar_log_probs(self, x: Tensor) -> Tensor:
        """AR: log p(x_l = . | x_<l) (B, L, V) for every position of x (B, L), float32."""
        x = self._check(x)
        bos = torch.full_like(x[:, :1], self.vocab_size)
        return F.log_softmax(self(torch.cat([bos, x[:, :-1]], dim=1)).float(), dim=-1)

    def ar_nll(self, x: Tensor) -> Tensor:
        """Exact ``-log p(x)`` per sequence (B,) in nats under the causal model."""
        return -self.ar_log_probs(x).gather(-1, x[..., None]).squeeze(-1).sum(1)


def make_loss(model_cfg: TextModelConfig):
    """``loss_fn(model, x0, generator) -> {"loss": nats per token, ...}`` for the engine's Trainer."""

    def loss_fn(model: nn.Module, x0: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        net: TextModel = getattr(model, "module", model)  # DDP wraps the model
        L = x0.shape[1]
        call = model  # the wrapper, so DDP sees the forward
        if model_cfg.kind == "ar":
            bos = torch.full_like(x0[:, :1], net.vocab_size)
            logits = call(torch.cat([bos, x0[:, :-1]], dim=1)).float()
            return {"loss": F.cross_entropy(logits.flatten(0, 1), x0.flatten())}
        # iid: u is None and each loss draws its own time first, the draw order of the runs quoted so far
        u = stratified_uniform(x0.shape[0], generator, x0.device) if model_cfg.time_sampling == "stratified" else None
        lo = model_cfg.sampling_eps
        t = None if u is None else (1.0 - lo) * u + lo  # as the losses' own U(sampling_eps, 1) draw
        if model_cfg.kind == "difformer":
            from core.paths import get_path

            path = get_path(model_cfg.path)
            e0 = net.embeddings()[x0]
            if u is None:
                u = torch.rand(x0.shape[0], device=x0.device, generator=generator)
            t = path.t_min + (path.t_max - path.t_min) * u
            eps = torch.randn(e0.shape, device=x0.device, generator=generator)
            xt = path.marginal(e0, t, eps)
            logits = call(xt, t).float()
            x0_hat = logits.softmax(-1) @ net.embeddings()
            mse = (x0_hat - e0).pow(2).sum(-1).mean()
            anchor = F.cross_entropy(logits.flatten(0, 1), x0.flatten())
            return {"loss": mse + anchor, "mse": mse.detach(), "anchor": anchor.detach()}
        if model_cfg.kind == "sedd":
            def log_score_fn(xt, sigma):
                return sedd_log_score(call(xt, sigma), xt, sigma)

            per_seq = score_entropy_loss(log_score_fn, net.graph, net.noise, x0, t=t,
                                         sampling_eps=model_cfg.sampling_eps, generator=generator)
            return {"loss": per_seq.mean() / L}

        def log_probs_fn(xt):
            return F.log_softmax(call(xt).float(), dim=-1)

        if model_cfg.loss == "lambda":
            lam = None if u is None else 1.0 - u  # in (0, 1], as the loss's own draw
            per_seq = lambda_dce_loss(log_probs_fn, net.graph, x0, lam=lam, generator=generator).float()
        else:
            per_seq = absorbing_dce_loss(log_probs_fn, net.graph, net.noise, x0, t=t,
                                         sampling_eps=model_cfg.sampling_eps, generator=generator)
        return {"loss": per_seq.mean() / L}

    return loss_fn
