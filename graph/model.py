"""GDSS's score networks (Jo et al. 2022, seed 184): one for node features, one for adjacency.

Both see the noisy graph ``(X, A)`` and the node flags and no time (GDSS's networks are not
time-conditioned: the VP score is ``-out / sigma(t)``, see :mod:`graph.gdss`).

- :class:`ScoreNetworkX`: ``depth`` GCN layers over ``A`` with tanh, the input and every layer's
  features concatenated and mapped by a 3-layer MLP back to ``F`` features.
- :class:`ScoreNetworkX_GMH`: the same read-out over GMH attention layers (used for ZINC250k).
- :class:`ScoreNetworkA`: the adjacency powers ``A, ..., A^c_init`` as channels, then
  ``num_layers`` :class:`~graph.layers.AttentionLayer`\\ s; every layer's channels, concatenated per node
  pair, are mapped by a 3-layer MLP to one score per pair; the diagonal and padded nodes are zeroed.

Parameter names are the official ones: the official state dicts load with ``strict=True``
(:func:`load_gdss_checkpoint` reads the released checkpoints with ``weights_only=True``).
"""

from __future__ import annotations

import collections
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import MLP, AttentionLayer, DenseGCNConv
from .utils import mask_adjs, mask_x, pow_tensor

__all__ = ["ScoreNetworkX", "ScoreNetworkX_GMH", "ScoreNetworkA", "load_gdss_checkpoint", "build_network"]


class ScoreNetworkX(nn.Module):
    """Node-feature score network: ``(B, N, F), (B, N, N), (B, N) -> (B, N, F)``."""

    def __init__(self, max_feat_num: int, depth: int, nhid: int):
        super().__init__()
        self.nfeat, self.depth, self.nhid = max_feat_num, depth, nhid
        self.layers = nn.ModuleList(DenseGCNConv(max_feat_num if i == 0 else nhid, nhid) for i in range(depth))
        self.fdim = max_feat_num + depth * nhid
        self.final = MLP(3, self.fdim, 2 * self.fdim, max_feat_num, activate_func=F.elu)

    def forward(self, x: Tensor, adj: Tensor, flags: Tensor | None) -> Tensor:
        feats = [x]
        for layer in self.layers:
            x = torch.tanh(layer(x, adj))
            feats.append(x)
        return mask_x(self.final(torch.cat(feats, dim=-1)), flags)


def _attention_stack(num_layers, num_linears, feat_in, nhid, adim, c_init, c_hid, c_final, num_heads, conv):
    """GDSS's layer sizes: the first layer reads the features (attention width nhid), the last writes c_final."""
    layers = nn.ModuleList()
    for i in range(num_layers):
        c_in = c_init if i == 0 else c_hid
        c_out = c_final if i == num_layers - 1 else c_hid
        layers.append(
            AttentionLayer(
                num_linears, feat_in if i == 0 else nhid, nhid if i == 0 else adim, nhid, c_in, c_out, num_heads, conv
            )
        )
    return layers


class ScoreNetworkX_GMH(nn.Module):
    """Node-feature score network over GMH attention layers (GDSS ``ScoreNetworkX_GMH``)."""

    def __init__(
        self,
        max_feat_num: int,
        depth: int,
        nhid: int,
        num_linears: int,
        c_init: int,
        c_hid: int,
        c_final: int,
        adim: int,
        num_heads: int = 4,
        conv: str = "GCN",
    ):
        super().__init__()
        self.depth, self.c_init = depth, c_init
        self.layers = _attention_stack(
            depth, num_linears, max_feat_num, nhid, adim, c_init, c_hid, c_final, num_heads, conv
        )
        fdim = max_feat_num + depth * nhid
        self.final = MLP(3, fdim, 2 * fdim, max_feat_num, activate_func=F.elu)

    def forward(self, x: Tensor, adj: Tensor, flags: Tensor | None) -> Tensor:
        adjc = pow_tensor(adj, self.c_init)
        feats = [x]
        for layer in self.layers:
            x, adjc = layer(x, adjc, flags)
            x = torch.tanh(x)
            feats.append(x)
        return mask_x(self.final(torch.cat(feats, dim=-1)), flags)


class ScoreNetworkA(nn.Module):
    """Adjacency score network: ``(B, N, F), (B, N, N), (B, N) -> (B, N, N)``, symmetric, zero diagonal.

    ``max_node_num`` is kept for the official signature; unlike the official code (whose diagonal mask
    is fixed at construction) any ``N`` works.
    """

    def __init__(
        self,
        max_feat_num: int,
        max_node_num: int,
        nhid: int,
        num_layers: int,
        num_linears: int,
        c_init: int,
        c_hid: int,
        c_final: int,
        adim: int,
        num_heads: int = 4,
        conv: str = "GCN",
    ):
        super().__init__()
        self.nfeat, self.max_node_num, self.nhid = max_feat_num, max_node_num, nhid
        self.num_layers, self.num_linears = num_layers, num_linears
        self.c_init, self.c_hid, self.c_final = c_init, c_hid, c_final
        self.adim, self.num_heads, self.conv = adim, num_heads, conv
        self.layers = _attention_stack(
            num_layers, num_linears, max_feat_num, nhid, adim, c_init, c_hid, c_final, num_heads, conv
        )
        self.fdim = c_hid * (num_layers - 1) + c_final + c_init
        self.final = MLP(3, self.fdim, 2 * self.fdim, 1, activate_func=F.elu)

    def forward(self, x: Tensor, adj: Tensor, flags: Tensor | None) -> Tensor:
        adjc = pow_tensor(adj, self.c_init)
        channels = [adjc]
        for layer in self.layers:
            x, adjc = layer(x, adjc, flags)
            channels.append(adjc)
        score = self.final(torch.cat(channels, dim=1).permute(0, 2, 3, 1)).squeeze(-1)
        n = score.shape[-1]
        off_diag = 1.0 - torch.eye(n, dtype=score.dtype, device=score.device)
        return mask_adjs(score * off_diag, flags)


NETWORKS = {"ScoreNetworkX": ScoreNetworkX, "ScoreNetworkX_GMH": ScoreNetworkX_GMH, "ScoreNetworkA": ScoreNetworkA}


def build_network(name: str, **params) -> nn.Module:
    """Build a network by its official class name with the official keyword arguments."""
    if name not in NETWORKS:
        raise ValueError(f"unknown GDSS network {name!r}; choose one of {sorted(NETWORKS)}")
    return NETWORKS[name](**params)


class _EasyDictStandIn:
    """Lets ``weights_only`` unpickling read the ``easydict.EasyDict`` configs inside GDSS checkpoints.

    Its ``__new__`` returns an OrderedDict, one of the few types the restricted unpickler may fill
    (SETITEMS) and set attributes on (BUILD); nothing else is allowed through.
    """

    def __new__(cls, *args):
        return collections.OrderedDict()


def load_gdss_checkpoint(path: str | Path, ema: bool = False) -> dict:
    """Read an official GDSS checkpoint (``checkpoints/<data>/gdss_<data>.pth``) without executing pickled code.

    Returns ``{"model_x", "model_adj", "config"}``: the two networks, built from the checkpoint's
    ``params_x`` / ``params_adj`` (class name under ``model_type``), loaded with ``strict=True`` from
    ``x_state_dict`` / ``adj_state_dict`` (or the EMA shadow parameters ``ema_x`` / ``ema_adj`` with
    ``ema=True``), in eval mode;
    and the training config as nested dicts.
    """
    with torch.serialization.safe_globals([(_EasyDictStandIn, "easydict.EasyDict")]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    nets = {}
    for key, sd_key, ema_key in (("model_x", "x_state_dict", "ema_x"), ("model_adj", "adj_state_dict", "ema_adj")):
        params = dict(ckpt["params_x" if key == "model_x" else "params_adj"])
        net = build_network(params.pop("model_type"), **params)
        state = ckpt[sd_key]
        if ema:
            if ema_key not in ckpt:
                raise ValueError(f"checkpoint {path} has no EMA weights ({ema_key!r})")
            # GDSS's EMA keeps a list of shadow parameters in the order of model.parameters().
            shadow = ckpt[ema_key]["shadow_params"]
            names = [n for n, _ in net.named_parameters()]
            if len(shadow) != len(names):
                raise ValueError(f"{ema_key!r} holds {len(shadow)} tensors, the network has {len(names)} parameters")
            state = dict(zip(names, shadow))
        net.load_state_dict(state, strict=True)
        nets[key] = net.eval()

    def plain(v):
        return {k: plain(w) for k, w in v.items()} if isinstance(v, dict) else v

    return {**nets, "config": plain(ckpt.get("model_config", {}))}
