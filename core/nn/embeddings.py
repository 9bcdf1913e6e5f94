"""Embeddings for the token transformer: time, labels, fixed sin-cos positions and RoPE.

- ``timestep_embedding`` / ``TimestepEmbedder``: the sinusoidal time features and MLP of DiT
  (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"), ``[cos, sin]`` order.
- ``LabelEmbedder``: class table with label dropout and a null class for classifier-free
  guidance (Ho & Salimans 2022), as in DiT.
- ``sincos_pos_embed_1d/2d/3d``: fixed tables (Vaswani et al. 2017; MAE/DiT 2-D layout).
- ``RotaryEmbedding``: axial rotary position embedding (Su et al. 2021, RoFormer eq. 34)
  over 1, 2 or 3 coordinate axes.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of a (B,) time tensor -> (B, dim), ``[cos, sin]`` (cos first).

    Frequencies ``exp(-ln(max_period) * k / half)`` for k = 0..half-1, computed in float32
    in the same order of operations as DiT's ``TimestepEmbedder.timestep_embedding``, so
    the result reproduces it exactly. ``t`` may be integer steps or floats; it is used as
    given (no rescaling).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, dim): sinusoidal features then Linear-SiLU-Linear (DiT)."""

    def __init__(self, dim: int, frequency_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_dim, self.max_period)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


def drop_mask(
    batch: int,
    prob: float,
    training: bool,
    force_drop_ids: torch.Tensor | None,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """Which samples lose their condition: (B,) bool, or None when nothing can be dropped.

    ``force_drop_ids`` (B,) overrides randomness (1 = drop), as in DiT; otherwise in
    training each sample is dropped with probability ``prob``.
    """
    if force_drop_ids is not None:
        return force_drop_ids.to(device) == 1
    if training and prob > 0:
        return torch.rand(batch, device=device, generator=generator) < prob
    return None


class LabelEmbedder(nn.Module):
    """Class labels (B,) int64 -> (B, dim), with label dropout to a null class.

    The table has ``num_classes + 1`` rows when ``dropout_prob > 0``; row ``num_classes``
    is the null class, used for dropped labels in training and as the unconditional
    input of classifier-free guidance (pass ``y = num_classes``).
    """

    def __init__(self, num_classes: int, dim: int, dropout_prob: float = 0.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"dropout_prob must be in [0, 1), got {dropout_prob}")
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(
        self,
        labels: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        drop = drop_mask(
            labels.shape[0], self.dropout_prob, self.training, force_drop_ids, labels.device, generator
        )
        if drop is not None:
            if self.dropout_prob == 0:
                raise ValueError("force_drop_ids needs a null class: build LabelEmbedder with dropout_prob > 0")
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class ConditionDropout(nn.Module):
    """Global condition vector (B, cond_dim) -> (B, dim), dropped to a learned null vector.

    The continuous counterpart of ``LabelEmbedder``: dropped samples (training, or
    ``force_drop_ids == 1``) use ``null`` instead of the projected condition.
    """

    def __init__(self, cond_dim: int, dim: int, dropout_prob: float = 0.0):
        super().__init__()
        self.dropout_prob = dropout_prob
        self.proj = nn.Linear(cond_dim, dim)
        self.null = nn.Parameter(torch.zeros(dim))

    def forward(self, cond, force_drop_ids=None, generator=None) -> torch.Tensor:
        emb = self.proj(cond)
        drop = drop_mask(cond.shape[0], self.dropout_prob, self.training, force_drop_ids, cond.device, generator)
        if drop is not None:
            emb = torch.where(drop[:, None], self.null.to(emb.dtype), emb)
        return emb



# ---------------------------------------------------------------------------------------
# Fixed sin-cos position tables
# ---------------------------------------------------------------------------------------


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos (M,) float64 -> (M, dim) ``[sin(pos*omega), cos(pos*omega)]``, omega_k = 10000^(-2k/dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_nd(dim: int, sizes: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fixed sin-cos table for a grid of ``sizes`` (slowest axis first) -> (prod(sizes), dim).

    Row index is row-major over the grid (for 2-D: ``row * W + col``, the patch order of a
    Conv2d patchifier). Each axis gets ``dim / len(sizes)`` channels; the per-axis tables are
    concatenated fastest axis first, which for 2-D is DiT/MAE's ``get_2d_sincos_pos_embed``
    layout: first half encodes the column, second half the row. Computed in float64.
    """
    n = len(sizes)
    if n < 1 or dim % (2 * n):
        raise ValueError(f"dim must be divisible by 2 * number of axes ({2 * n}), got dim={dim}, sizes={sizes}")
    axes = [torch.arange(s, dtype=torch.float64) for s in sizes]
    grid = torch.meshgrid(*axes, indexing="ij")
    parts = [_sincos_1d(dim // n, g.reshape(-1)) for g in reversed(grid)]
    return torch.cat(parts, dim=1).to(dtype)


def sincos_pos_embed_1d(dim: int, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(length, dim) table for positions 0..length-1."""
    return sincos_pos_embed_nd(dim, (length,), dtype)


def sincos_pos_embed_2d(dim: int, height: int, width: int | None = None, dtype=torch.float32) -> torch.Tensor:
    """(H*W, dim) table, DiT layout (``get_2d_sincos_pos_embed(dim, H)`` when H == W)."""
    return sincos_pos_embed_nd(dim, (height, height if width is None else width), dtype)


def sincos_pos_embed_3d(dim: int, frames: int, height: int, width: int, dtype=torch.float32) -> torch.Tensor:
    """(T*H*W, dim) table; channel thirds encode column, row, frame (in that order)."""
    return sincos_pos_embed_nd(dim, (frames, height, width), dtype)


# ---------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------


def grid_positions(*sizes: int, device=None) -> torch.Tensor:
    """Integer coordinates of a row-major grid: (prod(sizes), len(sizes)) float32.

    ``grid_positions(H, W)[row * W + col] == (row, col)``, the token order of patchify.
    """
    axes = [torch.arange(s, dtype=torch.float32, device=device) for s in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(sizes))


class RotaryEmbedding(nn.Module):
    """Axial RoPE: each of ``axes`` coordinates rotates its own ``head_dim / axes`` channels.

    ``forward(pos)`` takes coordinates (N, axes) or (B, N, axes) and returns ``(cos, sin)``,
    each (N, head_dim/2) or (B, 1, N, head_dim/2), ready for ``apply_rotary``. Channel pairs
    are (i, i + head_dim/2) ("rotate half"); rotation angles for axis a are
    ``pos[a] * theta^(-2k/d_a)``, k = 0..d_a/2-1.
    """

    def __init__(self, head_dim: int, axes: int = 1, theta: float = 10000.0):
        super().__init__()
        if axes not in (1, 2, 3):
            raise ValueError(f"RoPE axes must be 1, 2 or 3, got {axes}")
        if head_dim % (2 * axes):
            raise ValueError(f"head_dim must be divisible by 2 * axes ({2 * axes}), got {head_dim}")
        per_axis = head_dim // axes
        freqs = theta ** (-torch.arange(0, per_axis, 2, dtype=torch.float64) / per_axis)
        self.axes = axes
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() would round the frequencies (0.44 rad of error at position
        # 1000, head_dim 64): they follow the model's device but stay float32
        exact = self.freqs
        super()._apply(fn, recurse)
        if self.freqs.dtype != torch.float32:
            self.freqs = exact.to(self.freqs.device)
        return self

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if pos.shape[-1] != self.axes:
            raise ValueError(f"RoPE positions must have {self.axes} coordinates, got shape {tuple(pos.shape)}")
        angles = (pos.float()[..., None] * self.freqs).flatten(-2)  # (..., N, head_dim/2)
        if angles.dim() == 3:
            angles = angles[:, None]  # per-sample positions broadcast over heads
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, N, head_dim) queries or keys by the angles from ``RotaryEmbedding``: in float32 at
    least, returned in ``x``'s dtype (a bf16 model's q and k stay bf16, as its v, for SDPA)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


__all__ = [
    "ConditionDropout",
    "LabelEmbedder",
    "RotaryEmbedding",
    "TimestepEmbedder",
    "apply_rotary",
    "drop_mask",
    "grid_positions",
    "sincos_pos_embed_1d",
    "sincos_pos_embed_2d",
    "sincos_pos_embed_3d",
    "sincos_pos_embed_nd",
    "timestep_embedding",
]
