"""Layers of GDSS's score networks (Jo et al. 2022, seed 184).

- :class:`DenseGCNConv`: a graph convolution on dense adjacency (Kipf & Welling 2017),
  ``D^-1/2 (A + I) D^-1/2 X W + b``, as ``torch_geometric``'s ``DenseGCNConv``;
- :class:`MLP`: linear layers with an activation between them;
- :class:`Attention`: graph multi-head attention (GMH, Baek et al. 2021): queries, keys and values are
  graph convolutions of the node features over one adjacency channel; the attention map, averaged over
  heads and symmetrised, is the layer's new adjacency channel;
- :class:`AttentionLayer`: one GMH per input channel; their values are mixed into new node features,
  their maps (with the input channels) into new adjacency channels.

Parameter names follow the official code so its state dicts load with ``strict=True``.
Shapes: ``x`` ``(B, N, F)``, ``adj`` ``(B, N, N)``, channel stacks ``(B, C, N, N)``, ``flags`` ``(B, N)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .utils import mask_adjs, mask_x

__all__ = ["glorot", "DenseGCNConv", "MLP", "Attention", "AttentionLayer"]


def glorot(weight: Tensor) -> None:
    """Glorot / Xavier uniform init, ``U(-a, a)`` with ``a = sqrt(6 / (fan_in + fan_out))``."""
    bound = math.sqrt(6.0 / (weight.size(-2) + weight.size(-1)))
    with torch.no_grad():
        weight.uniform_(-bound, bound)


class DenseGCNConv(nn.Module):
    """Dense GCN layer: ``out = D^-1/2 A_hat D^-1/2 (X W) + b`` with ``A_hat = A`` whose diagonal is set to 1
    (2 with ``improved``) and ``D = rowsum(A_hat)`` clamped below at 1. ``weight`` is ``(in, out)``."""

    def __init__(self, in_channels: int, out_channels: int, improved: bool = False, bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels, self.improved = in_channels, out_channels, improved
        self.weight = nn.Parameter(torch.empty(in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        glorot(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, adj: Tensor, mask: Tensor | None = None, add_loop: bool = True) -> Tensor:
        x = x.unsqueeze(0) if x.dim() == 2 else x
        adj = adj.unsqueeze(0) if adj.dim() == 2 else adj
        b, n, _ = adj.shape
        if add_loop:
            # The diagonal is *set*, not incremented: existing self-loop weights are replaced.
            idx = torch.arange(n, device=adj.device)
            adj = adj.clone()
            adj[:, idx, idx] = 2.0 if self.improved else 1.0
        out = torch.matmul(x, self.weight)
        d = adj.sum(dim=-1).clamp(min=1).pow(-0.5)
        out = torch.matmul(d.unsqueeze(-1) * adj * d.unsqueeze(-2), out)
        if self.bias is not None:
            out = out + self.bias
        if mask is not None:
            out = out * mask.view(b, n, 1).to(x.dtype)
        return out

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}"


class MLP(nn.Module):
    """``num_layers`` linear layers (``linears.{i}``; a single one is ``linear``) with ``activate_func``
    between them, optionally batch-normalised (``batch_norms.{i}``)."""

    def __init__(
        self,
        num_layers: int,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        use_bn: bool = False,
        activate_func: Callable[[Tensor], Tensor] = F.relu,
    ):
        super().__init__()
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        self.num_layers, self.use_bn, self.activate_func = num_layers, use_bn, activate_func
        if num_layers == 1:
            self.linear = nn.Linear(input_dim, output_dim)
            return
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.linears = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))
        if use_bn:
            self.batch_norms = nn.ModuleList(nn.BatchNorm1d(hidden_dim) for _ in range(num_layers - 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.num_layers == 1:
            return self.linear(x)
        for i, lin in enumerate(self.linears[:-1]):
            x = lin(x)
            if self.use_bn:
                x = self.batch_norms[i](x)
            x = self.activate_func(x)
        return self.linears[-1](x)


class Attention(nn.Module):
    """Graph multi-head attention over one adjacency channel (GMH of Baek et al. 2021, as GDSS uses it).

    ``Q = GNN_q(X, A)``, ``K = GNN_k(X, A)``, ``V = GNN_v(X, A)``; per head ``h`` (``attn_dim / num_heads``
    columns of Q and K) ``S_h = tanh(Q_h K_h^T / sqrt(out_dim))``; the returned map is the head average,
    symmetrised, ``(S + S^T) / 2``. With ``conv="MLP"`` the queries and keys are MLPs of X alone.
    Returns ``(V, map)`` of shapes ``(B, N, out_dim)`` and ``(B, N, N)``.
    """

    def __init__(self, in_dim: int, attn_dim: int, out_dim: int, num_heads: int = 4, conv: str = "GCN"):
        super().__init__()
        if attn_dim % num_heads:
            raise ValueError(f"attn_dim={attn_dim} must be divisible by num_heads={num_heads}")
        self.num_heads, self.attn_dim, self.out_dim, self.conv = num_heads, attn_dim, out_dim, conv
        if conv == "GCN":
            self.gnn_q = DenseGCNConv(in_dim, attn_dim)
            self.gnn_k = DenseGCNConv(in_dim, attn_dim)
        elif conv == "MLP":
            self.gnn_q = MLP(2, in_dim, 2 * attn_dim, attn_dim, activate_func=torch.tanh)
            self.gnn_k = MLP(2, in_dim, 2 * attn_dim, attn_dim, activate_func=torch.tanh)
        else:
            raise ValueError(f"unknown conv {conv!r}; choose 'GCN' or 'MLP'")
        self.gnn_v = DenseGCNConv(in_dim, out_dim)

    def forward(self, x: Tensor, adj: Tensor, flags: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.conv == "GCN":
            q, k = self.gnn_q(x, adj), self.gnn_k(x, adj)
        else:
            q, k = self.gnn_q(x), self.gnn_k(x)
        v = self.gnn_v(x, adj)
        b, n, _ = q.shape
        heads = lambda t: t.view(b, n, self.num_heads, -1).transpose(1, 2)  # noqa: E731  (B, H, N, d)
        # Scaled by sqrt(out_dim), not by the head width: the official scaling, kept for its weights.
        s = torch.tanh(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(self.out_dim)).mean(dim=1)
        return v, (s + s.transpose(-1, -2)) / 2


class AttentionLayer(nn.Module):
    """One layer of ScoreNetworkA: ``input_dim`` adjacency channels in, ``output_dim`` out.

    Channel ``c`` runs a GMH on ``adj[:, c]``; the values of all channels, concatenated, pass through
    ``multi_channel`` (an MLP) and tanh to the new node features; the attention maps, concatenated with
    the input channels, pass per node pair through ``mlp`` to ``output_dim`` channels, symmetrised as
    ``M + M^T``. Node features and channels are masked with ``flags``.
    """

    def __init__(
        self,
        num_linears: int,
        conv_input_dim: int,
        attn_dim: int,
        conv_output_dim: int,
        input_dim: int,
        output_dim: int,
        num_heads: int = 4,
        conv: str = "GCN",
    ):
        super().__init__()
        self.attn = nn.ModuleList(
            Attention(conv_input_dim, attn_dim, conv_output_dim, num_heads=num_heads, conv=conv)
            for _ in range(input_dim)
        )
        self.hidden_dim = 2 * max(input_dim, output_dim)
        self.mlp = MLP(num_linears, 2 * input_dim, self.hidden_dim, output_dim, activate_func=F.elu)
        self.multi_channel = MLP(2, input_dim * conv_output_dim, self.hidden_dim, conv_output_dim, activate_func=F.elu)

    def forward(self, x: Tensor, adj: Tensor, flags: Tensor | None) -> tuple[Tensor, Tensor]:
        values, maps = zip(*(att(x, adj[:, c], flags) for c, att in enumerate(self.attn)))
        x_out = torch.tanh(mask_x(self.multi_channel(torch.cat(values, dim=-1)), flags))
        pairs = torch.cat([torch.stack(maps, dim=-1), adj.permute(0, 2, 3, 1)], dim=-1)  # (B, N, N, 2 C_in)
        out = self.mlp(pairs).permute(0, 3, 1, 2)
        return x_out, mask_adjs(out + out.transpose(-1, -2), flags)
