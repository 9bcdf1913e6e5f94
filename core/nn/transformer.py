"""The generic token transformer: tokens (B, N, D) in, tokens out, conditioned by a vector.

Blocks are DiT blocks with adaLN-Zero (Peebles & Xie 2023, "Scalable Diffusion Models
with Transformers", Fig. 3): LayerNorm without affine, then ``x * (1 + scale) + shift``
from a linear map of the conditioning vector, and a gate on each residual branch, all
initialised to zero so that every block starts as the identity.

Options, each off by default:

- cross-attention to context tokens (B, M, context_dim), with a context mask;
- causal self-attention and a key padding mask (for sequence domains);
- qk-norm (RMSNorm or LayerNorm per head) and axial RoPE over 1, 2 or 3 coordinates;
- U-ViT long skips (Bao et al. 2023, "All are Worth Words"; seed "Exploring Vision
  Transformers as Diffusion Learners"): block ``depth-1-i`` takes ``Linear(cat(x, skip_i))``
  where ``skip_i`` is the output of block i;
- MDT token masking (Gao et al. 2023, "Masked Diffusion Transformer"): the caller passes
  the indices of kept tokens; the first ``depth - mask_decoder_depth`` blocks see only
  them, the last blocks see all tokens, the dropped ones replaced by a learned mask token;
- TREAD routing (Krause et al. 2025): in training, a random fraction ``route_ratio`` of
  tokens skips blocks ``[route_start, route_end)`` and is put back unchanged after them;
- gradient checkpointing of each block;
- dropout on both residual branches (attention and MLP outputs, before the gate), as in
  SEDD's DDiT blocks; active in training only.

The conditioning vector ``c = t_embedder(t) + y_embedder(y) + cond_embedder(cond)`` is
built by ``TokenTransformer.condition``; the domain's head (e.g. ``FinalLayer``) uses it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from core.nn.embeddings import ConditionDropout, LabelEmbedder, RotaryEmbedding, TimestepEmbedder, apply_rotary


@dataclass
class TransformerConfig:
    """Typed configuration of ``TokenTransformer``; ``__post_init__`` rejects bad values."""

    dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: str | None = None  # None, "rms" or "layer"
    norm_eps: float = 1e-6
    # conditioning vector
    frequency_dim: int = 256
    num_classes: int = 0  # 0: no class labels
    class_dropout_prob: float = 0.0
    cond_dim: int = 0  # 0: no global condition vector
    # attention variants
    context_dim: int = 0  # > 0: cross-attention to context tokens in every block
    causal: bool = False
    rope_axes: int = 0  # 0: no RoPE; 1, 2, 3: axial RoPE over that many coordinates
    rope_theta: float = 10000.0
    # architecture / training variants
    long_skip: bool = False  # U-ViT
    mask_ratio: float = 0.0  # MDT: fraction of tokens dropped by ``sample_keep_idx``
    mask_decoder_depth: int = 2  # MDT: last blocks that see all tokens
    route_ratio: float = 0.0  # TREAD: fraction of tokens routed past the span in training
    route_start: int = 0
    route_end: int = 0
    grad_checkpointing: bool = False
    dropout: float = 0.0  # residual-branch dropout (training only)

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"TransformerConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("dim", "depth", "num_heads", "frequency_dim"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.dim % self.num_heads:
            bad("dim", f"must be divisible by num_heads={self.num_heads}")
        if not (math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0):
            bad("mlp_ratio", "must be a positive finite number")
        if self.mlp_hidden < 1:
            bad("mlp_ratio", f"gives an MLP of int(dim * mlp_ratio) = {self.mlp_hidden} hidden units "
                             f"(dim={self.dim}); it must be >= 1")
        if self.qk_norm not in (None, "rms", "layer"):
            bad("qk_norm", "must be None, 'rms' or 'layer'")
        if self.rope_axes not in (0, 1, 2, 3):
            bad("rope_axes", "must be 0, 1, 2 or 3")
        if self.rope_axes and (self.dim // self.num_heads) % (2 * self.rope_axes):
            bad("rope_axes", f"head_dim={self.dim // self.num_heads} must be divisible by 2 * rope_axes")
        for name in ("mask_ratio", "route_ratio", "class_dropout_prob", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "must be in [0, 1)")
        if self.mask_ratio > 0 and not 1 <= self.mask_decoder_depth <= self.depth:
            bad("mask_decoder_depth", f"must be in [1, depth={self.depth}] when mask_ratio > 0")
        if self.route_ratio > 0 and not 0 <= self.route_start < self.route_end <= self.depth:
            bad("route_end", f"need 0 <= route_start={self.route_start} < route_end <= depth={self.depth}")
        if self.long_skip and (self.mask_ratio > 0 or self.route_ratio > 0):
            bad("long_skip", "cannot be combined with token masking or routing (skip pairs would see different tokens)")
        if self.mask_ratio > 0 and self.route_ratio > 0:
            bad("route_ratio", "token routing and token masking cannot be combined")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of each block's MLP, ``int(dim * mlp_ratio)``."""
        return int(self.dim * self.mlp_ratio)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift``, shift/scale (B, 1, D) broadcast over tokens."""
    return torch.addcmul(shift, x, 1 + scale)


def _qk_norm(kind: str | None, head_dim: int) -> nn.Module:
    if kind == "rms":
        return nn.RMSNorm(head_dim, eps=1e-6)
    if kind == "layer":
        return nn.LayerNorm(head_dim, eps=1e-6)
    return nn.Identity()


class Attention(nn.Module):
    """Multi-head self-attention, fused qkv (output features ordered q, k, v; heads contiguous)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: str | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = _qk_norm(qk_norm, dim // num_heads)
        self.k_norm = _qk_norm(qk_norm, dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        """x (B, N, D); rope: (cos, sin) from ``RotaryEmbedding``; attn_mask (B, 1, N, N) bool."""
        B, N, D = x.shape
        # unbind on the (B, N, 3, H, hd) view: in backward the three gradients are stacked
        # straight into the qkv layout (one copy, where permute-then-unbind needs two).
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(B, N, 3, self.num_heads, -1).unbind(2))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """Queries from tokens (B, N, D), keys/values from context (B, M, context_dim)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, qkv_bias=True, qk_norm=None):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.q_norm = _qk_norm(qk_norm, dim // num_heads)
        self.k_norm = _qk_norm(qk_norm, dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context, context_mask=None):
        """context_mask (B, M) bool, True = attend. A sample with no valid context gets 0."""
        B, N, D = x.shape
        H, hd = self.num_heads, D // self.num_heads
        q = self.q_norm(self.q(x).view(B, N, H, hd).transpose(1, 2))
        k, v = (t.transpose(1, 2) for t in self.kv(context).view(B, context.shape[1], 2, H, hd).unbind(2))
        k = self.k_norm(k)
        mask = None
        if context_mask is not None:
            # An all-masked row would make softmax NaN: let it attend everywhere, then zero it.
            any_valid = context_mask.any(dim=-1)
            mask = (context_mask | ~any_valid[:, None])[:, None, None, :]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = self.proj(x.transpose(1, 2).reshape(B, N, D))
        if context_mask is not None:
            x = x * any_valid[:, None, None].to(x.dtype)
        return x


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero block. ``c`` is the conditioning vector after SiLU, (B, D)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        D = cfg.dim
        self.eps = cfg.norm_eps
        self.dropout = cfg.dropout
        self.attn = Attention(D, cfg.num_heads, cfg.qkv_bias, cfg.qk_norm)
        cross = cfg.context_dim > 0
        self.norm_cross = nn.LayerNorm(D, eps=cfg.norm_eps) if cross else None
        self.cross_attn = CrossAttention(D, cfg.context_dim, cfg.num_heads, cfg.qkv_bias, cfg.qk_norm) if cross else None
        self.mlp = Mlp(D, cfg.mlp_hidden)
        # chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
        self.modulation = nn.Linear(D, 6 * D)

    def forward(self, x, c, rope=None, attn_mask=None, is_causal=False, context=None, context_mask=None):
        # torch.addcmul(a, b, c) = a + b * c in one pass; it carries the gates and modulate().
        D = x.shape[-1]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)[:, None].chunk(6, -1)
        h = modulate(F.layer_norm(x, (D,), eps=self.eps), shift_msa, scale_msa)
        p = self.dropout if self.training else 0.0
        a = self.attn(h, rope, attn_mask, is_causal)
        x = torch.addcmul(x, gate_msa, F.dropout(a, p, True) if p else a)
        if context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        h = modulate(F.layer_norm(x, (D,), eps=self.eps), shift_mlp, scale_mlp)
        m = self.mlp(h)
        return torch.addcmul(x, gate_mlp, F.dropout(m, p, True) if p else m)


class FinalLayer(nn.Module):
    """adaLN head of DiT: LayerNorm, modulate with (shift, scale) from c, Linear to out_dim."""

    def __init__(self, dim: int, out_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out_dim)
        for p in self.parameters():
            nn.init.zeros_(p)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, N, D), c (B, D) the conditioning vector (before SiLU) -> (B, N, out_dim)."""
        shift, scale = self.modulation(F.silu(c))[:, None].chunk(2, -1)
        return self.linear(modulate(F.layer_norm(x, x.shape[-1:], eps=self.eps), shift, scale))


def sample_keep_idx(batch, n, drop_ratio, generator=None, device=None) -> torch.Tensor:
    """Random subset of ``n - round(n * drop_ratio)`` token indices per sample, sorted: (B, n_keep).

    Sorting keeps the relative order of tokens, so causal attention over a subset is still
    causal in the original positions.
    """
    n_keep = n - int(round(n * drop_ratio))
    if not 1 <= n_keep <= n:
        raise ValueError(f"drop_ratio={drop_ratio} leaves {n_keep} of {n} tokens")
    noise = torch.rand(batch, n, generator=generator, device=generator.device if generator else device)
    return noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values.to(device)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Tokens ``idx`` (B, n) of x (B, N, ...)."""
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def _put(full: torch.Tensor, idx: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """``full`` with tokens ``idx`` replaced by ``part`` (out of place)."""
    return full.scatter(1, idx[..., None].expand(-1, -1, full.shape[-1]), part)


class TokenTransformer(nn.Module):
    """Stack of DiT blocks over tokens (B, N, D), conditioned on c (B, D). See module docstring."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        cfg = self.config = config
        D = cfg.dim
        self.t_embedder = TimestepEmbedder(D, cfg.frequency_dim)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob) if cfg.num_classes else None
        self.cond_embedder = ConditionDropout(cfg.cond_dim, D, cfg.class_dropout_prob) if cfg.cond_dim else None
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_axes, cfg.rope_theta) if cfg.rope_axes else None
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        # U-ViT: one Linear(2D -> D) per deep block that receives a skip.
        self.skip_linears = nn.ModuleList(nn.Linear(2 * D, D) for _ in range(cfg.depth // 2)) if cfg.long_skip else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.mask_ratio > 0 else None
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init: xavier-uniform linears with zero bias, N(0, 0.02) embeddings, adaLN zeroed.

        Cross-attention output projections are zeroed too, so every residual branch starts
        closed and each block is the identity at init.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def condition(self, t, y=None, cond=None, force_drop_ids=None, generator=None) -> torch.Tensor:
        """Conditioning vector (B, D) = t_embedder(t) [+ y_embedder(y)] [+ cond_embedder(cond)].

        t (B,) as the caller's convention feeds the sinusoidal embedder (see the domain model);
        y (B,) int64 class labels (``num_classes`` = null class); cond (B, cond_dim).
        Label/condition dropout applies in training; ``force_drop_ids`` (B,) forces it (1 = drop).
        """
        c = self.t_embedder(t)
        if y is not None:
            if self.y_embedder is None:
                raise ValueError("class labels y given but TransformerConfig.num_classes == 0")
            c = c + self.y_embedder(y, force_drop_ids, generator)
        if cond is not None:
            if self.cond_embedder is None:
                raise ValueError("cond given but TransformerConfig.cond_dim == 0")
            c = c + self.cond_embedder(cond, force_drop_ids, generator)
        return c

    def sample_keep_idx(self, batch: int, n: int, generator=None, device=None) -> torch.Tensor:
        """MDT: indices (B, n_keep) of the tokens kept when ``mask_ratio`` of them are dropped."""
        return sample_keep_idx(batch, n, self.config.mask_ratio, generator, device)

    def _attention_inputs(self, rope, padding_mask, idx, n):
        """RoPE angles and self-attention mask for the token subset ``idx`` (None: all n tokens)."""
        if idx is not None:
            n = idx.shape[1]
            if rope is not None:
                rope = tuple(_take(r.expand(idx.shape[0], 1, *r.shape[-2:]).transpose(1, 2), idx).transpose(1, 2)
                             for r in rope)
            if padding_mask is not None:
                padding_mask = padding_mask.gather(1, idx)
        if padding_mask is None:
            return rope, None, self.config.causal
        mask = padding_mask[:, None, None, :]
        eye = torch.eye(n, dtype=torch.bool, device=mask.device)
        if self.config.causal:
            mask = mask & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
        # Every query keeps at least itself, so a padded query never sees an empty row (NaN);
        # real queries are unaffected because the added entries are padded keys of padded rows.
        return rope, mask | eye, False

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        *,
        pos_embed: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        keep_idx: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Tokens x (B, N, D) and conditioning c (B, D) from ``condition`` -> (B, N, D).

        pos_embed: additive table (N, D) or (B, N, D), added to x first (and to MDT mask tokens).
        positions: RoPE coordinates (N, rope_axes) or (B, N, rope_axes); required with RoPE.
        context (B, M, context_dim), context_mask (B, M) bool (True = attend).
        padding_mask (B, N) bool, True = real token; padded keys are never attended to.
        keep_idx (B, n_keep): MDT masking, from ``sample_keep_idx``; the caller keeps it for the loss.
        generator: randomness of TREAD routing (training only).
        """
        cfg = self.config
        B, N, D = x.shape
        if D != cfg.dim:
            raise ValueError(f"tokens have dim {D}, TransformerConfig.dim is {cfg.dim}")
        if pos_embed is not None:
            x = x + pos_embed
        rope = None
        if self.rope is not None:
            if positions is None:
                raise ValueError("TransformerConfig.rope_axes > 0 needs `positions`")
            rope = self.rope(positions.to(x.device))
        if keep_idx is not None and self.mask_token is None:
            raise ValueError("keep_idx given but TransformerConfig.mask_ratio == 0")
        if context is not None and not cfg.context_dim:
            raise ValueError("context given but TransformerConfig.context_dim == 0 (no cross-attention)")
        if context_mask is not None and context is None:
            raise ValueError("context_mask given without context")
        for name, mask in (("padding_mask", padding_mask), ("context_mask", context_mask)):
            if mask is not None and mask.dtype != torch.bool:
                raise TypeError(f"{name} must be a bool tensor (True = real token), got {mask.dtype}")
        c = F.silu(c)  # every adaLN modulation starts with SiLU(c): compute it once
        route = self.training and cfg.route_ratio > 0
        checkpointed = cfg.grad_checkpointing and self.training and torch.is_grad_enabled()
        full_rope, full_pad = rope, padding_mask

        rope, attn_mask, is_causal = self._attention_inputs(full_rope, full_pad, keep_idx, N)
        if keep_idx is not None:  # MDT encoder: only the kept tokens
            x = _take(x, keep_idx)
        skips = []
        for i, block in enumerate(self.blocks):
            if keep_idx is not None and i == cfg.depth - cfg.mask_decoder_depth:
                # MDT decoder: all tokens again, the dropped ones as (positioned) mask tokens.
                filler = self.mask_token.expand(B, N, D)
                if pos_embed is not None:
                    filler = filler + pos_embed
                x = _put(filler, keep_idx, x)
                rope, attn_mask, is_causal = self._attention_inputs(full_rope, full_pad, None, N)
            if route and i == cfg.route_start:
                # TREAD: only the kept tokens enter blocks [route_start, route_end).
                route_idx = sample_keep_idx(B, N, cfg.route_ratio, generator, x.device)
                x_full, x = x, _take(x, route_idx)
                rope, attn_mask, is_causal = self._attention_inputs(full_rope, full_pad, route_idx, N)
            if self.skip_linears is not None and i >= cfg.depth - cfg.depth // 2:
                x = self.skip_linears[cfg.depth - 1 - i](torch.cat([x, skips.pop()], dim=-1))

            args = (x, c, rope, attn_mask, is_causal, context, context_mask)
            x = checkpoint(block, *args, use_reentrant=False) if checkpointed else block(*args)

            if self.skip_linears is not None and i < cfg.depth // 2:
                skips.append(x)
            if route and i == cfg.route_end - 1:
                x = _put(x_full, route_idx, x)
                rope, attn_mask, is_causal = self._attention_inputs(full_rope, full_pad, None, N)
        return x
